"""Training folders named by the seed's convention, for ``charfw tag`` and ``charfw toml``.

A folder of training images is named ``<tags>_<suffix>``: the part before the first
underscore is a comma-separated tag list whose first tag splits at its first space into
the keyword and the class tokens (the whole first tag)::
    kuronekomimi girl, shorthair, choker, ahoge_f0768
    → caption tags: kuronekomimi, shorthair, choker, ahoge
    → class_tokens: "kuronekomimi girl"

A parent folder ``<N>_<name>`` (kohya's convention) gives ``num_repeats = N``; so does the
folder's own name when it starts with ``<N>_`` (``10_sks woman``). ``_flip_`` or
``_noflip_`` anywhere after the tag list switches flip augmentation on or off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from charfw import console
from charfw.build import atomic
from charfw.build.angles import parse_code
from charfw.build.hashing import HashCache
from charfw.build.images import KOHYA_IMAGE_SUFFIXES, is_image_name, probe
from charfw.build.items import ImageItem, list_images
from charfw.build.manifest import MAX_REPEATS
from charfw.build.stages import caption_text, tag_items
from charfw.components import DatasetSpec, SubsetSpec
from charfw.errors import CharfwError, ImageError
from charfw.stage_context import ModelCache, PartInfo, StageContext

REPEATS_RE = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class FolderInfo:
    path: Path
    keyword: str
    class_tokens: str
    #: the tags after the first one
    tags: tuple[str, ...]
    repeats: int | None
    flip: bool | None

    @property
    def caption_tags(self) -> list[str]:
        return [self.keyword, *self.tags]


def parse_folder(path: Path) -> FolderInfo:
    name = path.name
    repeats: int | None = None
    own = REPEATS_RE.match(name)
    if own:
        repeats, name = int(own.group(1)), own.group(2)
    else:
        parent = REPEATS_RE.match(path.parent.name)
        if parent:
            repeats = int(parent.group(1))
    head, _, rest = name.partition("_")
    tags = [t.strip() for t in head.split(",") if t.strip()]
    if not tags:
        raise CharfwError(
            "the folder name gives no keyword",
            path=path,
            hint="name it '<keyword class>, <tags>_<anything>', e.g. 'krnk girl, choker_f512'",
        )
    first = tags[0]
    keyword = first.split(" ", 1)[0]
    tokens = rest.split("_") if rest else []
    flip = True if "flip" in tokens else False if "noflip" in tokens else None
    if repeats is not None and not 1 <= repeats <= MAX_REPEATS:
        raise CharfwError(f"repeats must be 1 to {MAX_REPEATS}, not {repeats}", path=path,
                          hint="rename the folder '<repeats>_<name>'; for more training raise the steps or epochs")
    return FolderInfo(path, keyword, first, tuple(tags[1:]), repeats, flip)


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and is_image_name(p.name, KOHYA_IMAGE_SUFFIXES) for p in folder.iterdir())


def expand_folders(args: list[Path]) -> list[Path]:
    """Image folders from the command line: each folder that holds images, or, for a
    folder that holds none, its sub-folders that do (so ``4_krnk`` works)."""
    out: list[Path] = []
    for arg in args:
        if not arg.is_dir():
            raise CharfwError("not a folder", path=arg)
        if _has_images(arg):
            out.append(arg)
            continue
        subs = sorted(p for p in arg.iterdir() if p.is_dir() and not p.name.startswith(".") and _has_images(p))
        if not subs:
            raise CharfwError("no images here or in its sub-folders", path=arg,
                              hint=f"kohya reads {', '.join(sorted(KOHYA_IMAGE_SUFFIXES))}")
        out.extend(subs)
    seen: list[Path] = []
    for p in out:
        if p.resolve() not in [s.resolve() for s in seen]:
            seen.append(p)
    return seen


# --- charfw tag: captions beside the images ----------------------------------------------


@dataclass
class CaptionChange:
    path: Path
    text: str
    #: "new", "changed", "unchanged", "kept" (differs, not overwritten)
    status: str
    old: str | None = None


def folder_context(ws, folder: Path, *, stage: str, part=None, models=None, strict: bool = False,
                   jobs: int = 1):  # -> StageContext
    """The context a command gives a component it runs outside any build, on ``folder``
    (``charfw tag``, ``charfw wd14`` and ``charfw caption`` on a caption folder, ``charfw
    toml`` for the folder of its config): ``part`` describes the folder (by default a part
    named after it, of kind ``folder``, with no keyword), the stage writes nowhere but
    ``folder``, templates and caches are the workspace's, file hashes are kept in memory,
    and ``models`` are the command's (it clears them when it ends)."""

    if part is None:
        part = PartInfo(target=folder.name, name=folder.name, kind="folder", keyword="", class_tokens="")
    return StageContext(
        workspace_root=ws.root, part=part, stage=stage, stage_dir=folder, inputs={},
        cache_dir=ws.cache_dir, hash_cache=HashCache(None), templates=ws.templates,
        strict=strict, jobs=jobs, models=models if models is not None else ModelCache(),
    )


def plan_captions(ws, folders: list[Path], chain: list, *, strict: bool, jobs: int, models,
                  on_folder=None) -> tuple[list[CaptionChange], list[str]]:
    """Captions for every image of the folders, compared with what is on disk; nothing is
    written here, but ``on_folder`` is called with each folder's changes as soon as they are
    known (for a :class:`CaptionWriter` to write them while the next folder is planned).
    The taggers load their models into ``models`` (the command's ModelCache: one load for
    all the folders). Returns (changes, problems)."""

    changes: list[CaptionChange] = []
    problems: list[str] = []
    listed = [list_images(folder, KOHYA_IMAGE_SUFFIXES) for folder in folders]
    # the check charfw toml makes, for all folders at once (worker processes for large sets)
    sizes = iter(image_sizes([p for files in listed for p in files], jobs, "checking images"))
    for folder, files in zip(folders, listed, strict=True):
        info = parse_folder(folder)
        part = PartInfo(
            target=folder.name, name=folder.name, kind="folder", keyword=info.keyword,
            class_tokens=info.class_tokens, tags=info.tags, repeats=info.repeats or 1,
            symmetric=info.flip is not False,
        )
        ctx = folder_context(ws, folder, stage="tag", part=part, models=models, strict=strict, jobs=jobs)
        by_caption: dict[str, Path] = {}
        items = []
        for path in files:
            size = next(sizes)
            if isinstance(size, Unusable):  # no caption for a file kohya cannot read
                ctx.problem(path, size.message, size.hint)
                continue
            dest = path.with_suffix(".txt")
            other = by_caption.get(dest.name.casefold())
            if other is not None:
                ctx.problem(path, f"has the same name as {other.name}, so both would share {dest.name}",
                            hint="rename one of them")
                continue
            by_caption[dest.name.casefold()] = path
            code = parse_code(path.stem)
            # model_construct: these values are ours, no need to validate 10,000 of them
            items.append(ImageItem.model_construct(
                id=path.stem, path=str(path), sha256="", source=str(path),
                code=code.code if code else None, width=size[0], height=size[1], background=None,
                tags=[], meta={}))
        folder_changes: list[CaptionChange] = []
        for item in tag_items(ctx, chain, items):
            if item is None:
                continue
            dest = Path(item.path).with_suffix(".txt")
            text = caption_text(item.tags)
            try:
                old = dest.read_text("utf-8")
            except FileNotFoundError:
                old = None
            except (OSError, UnicodeDecodeError):
                old = ""
            if old is None:
                status = "new"
            elif old.strip() == text:
                status = "unchanged"
            else:
                status = "changed"
            folder_changes.append(CaptionChange(dest, text, status, old))
        problems.extend(ctx.problems)
        changes.extend(folder_changes)
        if on_folder is not None:
            on_folder(folder_changes)
    return changes, problems


class CaptionWriter:
    """Writes planned captions: new ones, and changed ones when ``overwrite``; the others
    are marked as kept when the writer closes.

    ``submit`` takes one folder's changes and returns at once: with ``jobs`` > 1 folders are
    written by threads (one folder per thread at a time, so no two threads contend for one
    directory) while the caller plans the next folder. Creating a file is kernel work, and
    on some file systems (ext4 with ``discard`` on a VM: up to 0.6 ms a file) it is most of
    the time ``charfw tag`` takes.
    """

    def __init__(self, *, overwrite: bool, jobs: int = 1) -> None:
        self.overwrite = overwrite
        self.jobs = jobs
        self.changes: list[CaptionChange] = []
        self._todo = 0

    def __enter__(self) -> CaptionWriter:
        import contextlib
        from concurrent.futures import ThreadPoolExecutor

        self._stack = contextlib.ExitStack()
        self._bar = None  # started with the first caption to write
        self._pool = (self._stack.enter_context(ThreadPoolExecutor(max_workers=self.jobs))
                      if self.jobs > 1 else None)
        self._futures: list = []
        return self

    def _write(self, group: list[CaptionChange]) -> None:
        for change in group:
            atomic.write_text(change.path, change.text)
            self._bar.advance()

    def submit(self, changes: list[CaptionChange]) -> None:
        self.changes.extend(changes)
        todo = [c for c in changes if c.status == "new" or (c.status == "changed" and self.overwrite)]
        if not todo:
            return
        if self._bar is None:
            self._bar = self._stack.enter_context(console.progress(None, "writing captions", unit="file"))
        self._todo += len(todo)
        self._bar.update(total=self._todo)
        if self._pool is None:
            self._write(todo)
        else:
            self._futures.append(self._pool.submit(self._write, todo))

    def __exit__(self, *exc_info: object) -> None:
        try:
            for future in self._futures:
                future.result()  # the first failure is raised, after every write has ended
        finally:
            self._stack.close()
        for change in self.changes:
            if change.status == "changed" and not self.overwrite:
                change.status = "kept"


def write_captions(changes: list[CaptionChange], *, overwrite: bool, jobs: int = 1) -> None:
    """Write planned captions for several folders (see :class:`CaptionWriter`)."""
    by_folder: dict[Path, list[CaptionChange]] = {}
    for change in changes:
        by_folder.setdefault(change.path.parent, []).append(change)
    with CaptionWriter(overwrite=overwrite, jobs=jobs) as writer:
        for group in by_folder.values():
            writer.submit(group)


# --- charfw toml: a dataset config from folders ------------------------------------------


class Unusable(NamedTuple):
    """Why an image file cannot be used (picklable: it comes back from worker processes)."""

    message: str
    hint: str | None


def _image_sizes(files: list[Path]) -> list[tuple[int, int] | Unusable]:
    """(width, height) from each file's header, or why it is unusable."""

    out: list[tuple[int, int] | Unusable] = []
    for path in files:
        try:
            info = probe(path, max_pixels=None)
        except ImageError as exc:
            out.append(Unusable(exc.message, exc.hint))
        else:
            out.append((info.width, info.height))
    return out


#: below this many images, starting worker processes costs more than it saves
PARALLEL_SIZES_FROM = 2000
CHUNK = 250


def image_sizes(files: list[Path], jobs: int, description: str) -> list[tuple[int, int] | Unusable]:
    """The one check of training-folder images that ``charfw tag`` and ``charfw toml``
    share: each file's (width, height) from its header, or why it is unusable (empty, not
    an image, truncated header). Header reads are Python work in Pillow (the GIL makes threads useless), so large
    sets are read by forked worker processes, in chunks, in order. The workers are forked
    before the progress bar starts its thread (a fork copies no running thread)."""
    import contextlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor


    chunks = [files[i:i + CHUNK] for i in range(0, len(files), CHUNK)]
    parallel = (jobs > 1 and len(files) >= PARALLEL_SIZES_FROM
                and "fork" in multiprocessing.get_all_start_methods())
    results: list[tuple[int, int] | Unusable] = []
    with contextlib.ExitStack() as stack:
        if parallel:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs,
                                                           mp_context=multiprocessing.get_context("fork")))
            pool.submit(int).result()  # forks every worker now
            sizes = pool.map(_image_sizes, chunks)
        else:
            sizes = map(_image_sizes, chunks)
        bar = stack.enter_context(console.progress(len(files), description, unit="img"))
        for chunk, chunk_sizes in zip(chunks, sizes, strict=True):
            results.extend(chunk_sizes)
            bar.advance(len(chunk))
    return results


def dataset_spec_for_folders(folders: list[Path], *, relative_to: Path | None, jobs: int) -> tuple[object, list[str]]:
    """A :class:`~charfw.components.DatasetSpec` for image folders, reading image sizes
    from headers only. Returns (spec, problems: unreadable images, left out)."""

    problems: list[str] = []
    listed = [(folder, parse_folder(folder), list_images(folder, KOHYA_IMAGE_SUFFIXES)) for folder in folders]
    every = [path for _, _, files in listed for path in files]
    results = iter(image_sizes(every, jobs, "reading image sizes"))
    subsets = []
    for folder, info, files in listed:
        sizes = []
        for path in files:
            result = next(results)
            if isinstance(result, Unusable):
                problems.append(str(ImageError(result.message, path=path, hint=result.hint)))
            else:
                sizes.append(result)
        if not sizes:
            problems.append(f"{folder}: no readable images (left out)")
            continue
        subsets.append(
            SubsetSpec(
                image_dir=folder.resolve(), sizes=sizes, class_tokens=info.class_tokens,
                num_repeats=info.repeats or 1, flip_aug=info.flip, label=folder.name,
            )
        )
    return DatasetSpec(subsets=subsets, relative_to=relative_to), problems
