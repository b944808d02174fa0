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

from .errors import CharfwError
from .images import KOHYA_IMAGE_SUFFIXES, is_image_name

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
    if repeats is not None and repeats < 1:
        raise CharfwError("repeats must be at least 1", path=path)
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


def plan_captions(ws, folders: list[Path], chain: list, *, strict: bool, jobs: int) -> tuple[list[CaptionChange], list[str]]:
    """Captions for every image of the folders, compared with what is on disk; nothing is
    written here. Returns (changes, problems)."""
    from .angles import parse_code
    from .hashing import HashCache
    from .items import ImageItem, list_images
    from .stage_context import PartInfo, StageContext
    from .stages import caption_text, tag_items

    changes: list[CaptionChange] = []
    problems: list[str] = []
    for folder in folders:
        info = parse_folder(folder)
        part = PartInfo(
            target=folder.name, name=folder.name, kind="folder", keyword=info.keyword,
            class_tokens=info.class_tokens, tags=info.tags, repeats=info.repeats or 1,
            symmetric=info.flip is not False,
        )
        ctx = StageContext(
            workspace_root=ws.root, part=part, stage="tag", stage_dir=folder, inputs={},
            cache_dir=ws.cache_dir, hash_cache=HashCache(None), templates=ws.templates,
            strict=strict, jobs=jobs,
        )
        files = list_images(folder, KOHYA_IMAGE_SUFFIXES)
        by_caption: dict[str, Path] = {}
        items = []
        for path in files:
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
                code=code.code if code else None, width=0, height=0, background=None,
                tags=[], meta={}))
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
            changes.append(CaptionChange(dest, text, status, old))
        problems.extend(ctx.problems)
    return changes, problems


def write_captions(changes: list[CaptionChange], *, overwrite: bool) -> None:
    """Write new captions, and changed ones when ``overwrite``; mark the others as kept."""
    from . import atomic, console

    todo = [c for c in changes if c.status == "new" or (c.status == "changed" and overwrite)]
    with console.progress(len(todo), "writing captions", unit="file") as bar:
        for change in todo:
            atomic.write_text(change.path, change.text)
            bar.advance()
    for change in changes:
        if change.status == "changed" and not overwrite:
            change.status = "kept"


# --- charfw toml: a dataset config from folders ------------------------------------------


def dataset_spec_for_folders(folders: list[Path], *, relative_to: Path | None, jobs: int) -> tuple[object, list[str]]:
    """A :class:`~charfw.components.DatasetSpec` for image folders, reading image sizes
    from headers only. Returns (spec, problems: unreadable images, left out)."""
    from concurrent.futures import ThreadPoolExecutor

    from .components import DatasetSpec, SubsetSpec
    from .errors import ImageError
    from .images import probe
    from .items import list_images

    problems: list[str] = []

    def size(path: Path) -> tuple[int, int] | None:
        try:
            info = probe(path, max_pixels=None)
        except ImageError as exc:
            problems.append(str(exc))
            return None
        return (info.width, info.height)

    from . import console

    subsets = []
    listed = [(folder, parse_folder(folder), list_images(folder, KOHYA_IMAGE_SUFFIXES)) for folder in folders]
    total = sum(len(files) for _, _, files in listed)
    # header reads are mostly Python work in Pillow: threads only help on slow disks
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, \
            console.progress(total, "reading image sizes", unit="img") as bar:
        for folder, info, files in listed:
            sizes = []
            for s in pool.map(size, files) if jobs > 1 else map(size, files):
                bar.advance()
                if s is not None:
                    sizes.append(s)
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
