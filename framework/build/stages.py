"""The stages of a build, as data, and the runner that carries out each kind of stage.

A part (a face, a body or a group) goes through these stages in order; each is carried
out by the plugin(s) its manifest picks, looked up in the registry of the stage's kind:

=========  ==================  ==================  ============================================
stage      kind                default plugin      parts
=========  ==================  ==================  ============================================
draft      drafter             (off)               face, body (+ its face's LoRA), group (+ members')
ingest     source              folder              face, body
filter     image_filter        (off)               face, body
background background          flat                face, body
prepare    preparer            square              face, body
tag        tagger (chain)      angle-rules         face, body
dataset    dataset_writer      kohya-toml          face, body (+ its face), group (+ members)
lint       linter (chain)      method              face, body, group (a check: nothing reads it)
train      trainer             lora                face, body, group
merge      block_merger        block-weights       face, body, group
compress   compressor          svd                 face, body, group
sample     sampler             (off)               face, body, group
=========  ==================  ==================  ============================================

Runners own everything generic: worker threads, progress bars, per-image caching (an
image whose input and options did not change is not processed again, even after an
interrupted run), atomic writes and clean-up. Components only implement the small
method of their base class in :mod:`charfw.components`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charfw import console
from charfw.build import atomic, images
from charfw.build.hashing import fingerprint
from charfw.build.items import ImageItem, safe_file_stem
from charfw.components import Component, DatasetSpec, Finding, SubsetSpec, color_name
from charfw.errors import CharfwError
from charfw.stage_context import PartInfo, StageContext, StageOutput

Chain = list[tuple[Component, Any]]

MEMO_DIR = ".memo"


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    #: plugin used when the manifest names none; None means the stage is off by default
    default: str | None
    #: which part kinds go through this stage
    parts: frozenset[str]
    runner: Callable[[StageContext, Chain], StageOutput]
    #: PartInfo fields whose change must re-run the stage
    part_fields: tuple[str, ...] = ()
    #: several plugins may run one after another (taggers)
    chainable: bool = False
    #: the stage may be switched off in a manifest (`merge: off`)
    can_disable: bool = True
    #: its outputs hold absolute paths (a dataset config), so moving the workspace re-runs it
    absolute_paths: bool = False
    #: a side branch of the part (the draft stage): it reads the finished LoRAs of the
    #: parts it builds on, and no stage of its own part reads it
    side_branch: bool = False
    #: a check before the next stage (lint): it reads the stages before it and hands
    #: nothing on (the next stage reads the one before it); its key holds the plugin
    #: chains of the part's other stages, the workspace's keywords and ``--strict``, as a
    #: strict build stops on its findings
    gate: bool = False


# --- per-image caching -------------------------------------------------------------------


class ItemMemo:
    """Per-image results of a stage, kept under ``<stage>/.memo/<key>.json``.

    The key covers the stage's key (the component chain with plugin versions, options and
    cache keys, and the part fields the stage reads: a part's tags, keyword or class tokens
    for the tag stage) and the input image, so a re-run after a change (or after an
    interruption) only redoes the images that need it, and always redoes those.
    """

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.dir = ctx.stage_dir / MEMO_DIR
        if not ctx.stage_key:
            raise RuntimeError("per-image caching needs the stage key the engine puts on the context")
        self.static = fingerprint(ctx.stage_key)
        self.used: set[str] = set()

    def key(self, item: ImageItem, *extra: Any) -> str:
        return fingerprint(
            self.static, item.sha256, item.id, item.code, item.background, item.tags, *extra
        )[:20]

    def get(self, key: str) -> list[ImageItem] | None:
        if self.ctx.force:
            return None
        path = self.dir / f"{key}.json"
        try:
            data = json.loads(path.read_text("utf-8"))
            result = [ImageItem.model_validate(d) for d in data]
        except (OSError, ValueError):
            return None
        for item in result:
            if not self.ctx.path(item.path).is_file():
                return None
        self.used.add(key)
        return result

    def put(self, key: str, result: list[ImageItem]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.dir / f"{key}.json", json.dumps([r.model_dump(mode="json") for r in result]))
        self.used.add(key)


def _clean_stage_dir(ctx: StageContext, memo: ItemMemo, outputs: Iterable[ImageItem]) -> None:
    """Remove files of earlier runs that the current output no longer uses."""
    atomic.remove_others(ctx.stage_dir, [ctx.path(item.path) for item in outputs], "*.png")
    if memo.dir.is_dir():
        for entry in memo.dir.iterdir():
            if entry.stem not in memo.used:
                entry.unlink()


def _map_items(ctx: StageContext, items: list[ImageItem], work: Callable[[ImageItem], list[ImageItem]], what: str) -> list[ImageItem]:
    """Run ``work`` on every item in worker threads, keeping the input order."""
    results: list[list[ImageItem]] = [[] for _ in items]
    with ctx.progress(len(items), what) as bar:
        if ctx.jobs <= 1 or len(items) <= 1:
            for i, item in enumerate(items):
                results[i] = work(item)
                bar.advance()
        else:
            with ThreadPoolExecutor(max_workers=ctx.jobs) as pool:
                futures = [pool.submit(work, item) for item in items]
                for i, fut in enumerate(futures):
                    results[i] = fut.result()
                    bar.advance()
    return [out for group in results for out in group]


def _load_rgb_or_rgba(ctx: StageContext, item: ImageItem) -> Any | None:
    try:
        return images.to_rgb_or_rgba(images.load(ctx.path(item.path), max_pixels=None))
    except CharfwError as exc:
        ctx.error_problem(exc)
        return None


def _write_png(ctx: StageContext, image: Any, item: ImageItem, new_id: str, key: str) -> ImageItem:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    data = buf.getvalue()
    dest = ctx.stage_dir / f"{safe_file_stem(new_id)}.{key[:10]}.png"
    atomic.write_bytes(dest, data)
    import hashlib

    return item.model_copy(
        update={
            "id": new_id,
            "path": ctx.record_path(dest),
            "sha256": hashlib.sha256(data).hexdigest(),
            "width": image.width,
            "height": image.height,
        }
    )


# --- runners -----------------------------------------------------------------------------


def run_ingest(ctx: StageContext, chain: Chain) -> StageOutput:
    source, options = chain[0]
    items = source.collect(ctx, options)
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise CharfwError(f"{ctx.part.label}: image source '{source.name}' returned duplicate ids")
    summary = [f"{len(items)} source images"]
    # angle coverage: which expected codes have no image, which codes were not expected
    found = {i.code for i in items if i.code}
    missing = [c for c in ctx.part.angles if c not in found]
    extra = sorted(found - set(ctx.part.angles)) if ctx.part.angles else []
    if missing:
        summary.append(f"no image for angle(s) {', '.join(missing)}")
        console.warn(f"{ctx.part.label}: no image for angle(s) {', '.join(missing)}")
    if extra:
        summary.append(f"angle(s) {', '.join(extra)} not in the part's angle list (used anyway)")
    return StageOutput(items=items, summary=summary, problems=list(ctx.problems))


def run_filter(ctx: StageContext, chain: Chain) -> StageOutput:
    items = ctx.input_items()
    total = len(items)
    for component, options in chain:
        ids = {i.id for i in items}
        kept = component.select(ctx, options, items)
        if any(k.id not in ids for k in kept):
            raise CharfwError(f"image filter '{component.name}' returned images it was not given")
        items = kept
    summary = [f"kept {len(items)} of {total} images"]
    return StageOutput(items=items, summary=summary, problems=list(ctx.problems))


def _per_image(
    ctx: StageContext, chain: Chain, transform: Callable[[Any, ImageItem, str], list[ImageItem]]
) -> list[ImageItem]:
    """Decode each input image and ``transform`` it (image, item, memo key → new items),
    in worker threads, reusing per-image results of earlier runs."""
    memo = ItemMemo(ctx)

    def work(item: ImageItem) -> list[ImageItem]:
        key = memo.key(item)
        cached = memo.get(key)
        if cached is not None:
            return cached
        image = _load_rgb_or_rgba(ctx, item)
        if image is None:
            return []
        result = transform(image, item, key)
        memo.put(key, result)
        return result

    out = _map_items(ctx, ctx.input_items(), work, "")
    _clean_stage_dir(ctx, memo, out)
    return out


def run_background(ctx: StageContext, chain: Chain) -> StageOutput:
    remover, options = chain[0]
    colors = options.rgb_colors()

    def transform(image: Any, item: ImageItem, key: str) -> list[ImageItem]:
        cut = remover.cutout(ctx, options, image, item)
        if cut is None or not images.has_transparency(cut):
            return [item]  # nothing to remove: the image passes through unchanged
        cut = cut.convert("RGBA")
        result = []
        for color in colors:
            new_id = item.id if len(colors) == 1 else f"{item.id}-{color_name(color).lstrip('#')}"
            out = _write_png(ctx, images.composite(cut, color), item, new_id, fingerprint(key, color))
            result.append(out.model_copy(update={"background": color}))
        return result

    out = _per_image(ctx, chain, transform)
    flat = sum(1 for i in out if i.background is not None)
    summary = [f"{len(out)} images ({flat} put on {', '.join(color_name(c) for c in colors)})"]
    return StageOutput(items=out, summary=summary, problems=list(ctx.problems))


def run_prepare(ctx: StageContext, chain: Chain) -> StageOutput:
    preparer, options = chain[0]

    def transform(image: Any, item: ImageItem, key: str) -> list[ImageItem]:
        prepared = preparer.prepare(ctx, options, image, item)
        if prepared.mode != "RGB":
            prepared = images.composite(prepared.convert("RGBA"), item.background or (255, 255, 255))
        return [_write_png(ctx, prepared, item, item.id, key)]

    out = _per_image(ctx, chain, transform)
    sizes = sorted({(i.width, i.height) for i in out})
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (" ..." if len(sizes) > 4 else "")
    summary = [f"{len(out)} prepared images ({shown}) in {ctx.record_path(ctx.stage_dir)}/"]
    return StageOutput(items=out, summary=summary, problems=list(ctx.problems))


def merge_tags(existing: list[str], new: Iterable[str]) -> list[str]:
    """Append the tags of ``new`` that are not already in ``existing`` (order kept)."""
    seen = set(existing)
    out = list(existing)
    for tag in new:
        tag = tag.strip()
        if tag and tag not in seen:
            out.append(tag)
            seen.add(tag)
    return out


def tag_items(ctx: StageContext, chain: Chain, items: list[ImageItem]) -> list[ImageItem | None]:
    """Run a tagger chain over items; None where a tagger rejected the item."""
    tags: list[list[str] | None] = [[] for _ in items]
    for tagger, options in chain:
        todo = [i for i, t in enumerate(tags) if t is not None]
        size = max(1, tagger.batch_size(ctx, options))
        with ctx.progress(len(todo), tagger.name) as bar:
            for start in range(0, len(todo), size):
                idx = todo[start : start + size]
                batch = [items[i] for i in idx]
                pixels = None
                if tagger.needs_pixels:
                    loaded = [_load_rgb_or_rgba(ctx, item) for item in batch]
                    for i, img in zip(idx, loaded, strict=True):
                        if img is None:
                            tags[i] = None
                    keep = [k for k, img in enumerate(loaded) if img is not None]
                    idx = [idx[k] for k in keep]
                    batch = [batch[k] for k in keep]
                    pixels = [loaded[k] for k in keep]
                if not batch:
                    bar.advance(size)
                    continue
                so_far = [list(tags[i] or []) for i in idx]
                result = tagger.tag(ctx, options, batch, pixels, so_far)
                if len(result) != len(batch):
                    raise CharfwError(
                        f"tagger '{tagger.name}' returned {len(result)} results for {len(batch)} images"
                    )
                for i, new in zip(idx, result, strict=True):
                    tags[i] = None if new is None else merge_tags(tags[i] or [], new)
                bar.advance(len(batch))
    return [
        None if t is None else item.model_copy(update={"tags": t})
        for item, t in zip(items, tags, strict=True)
    ]


def caption_text(tags: list[str]) -> str:
    return ", ".join(tags)


def run_tag(ctx: StageContext, chain: Chain) -> StageOutput:
    memo = ItemMemo(ctx)
    items = ctx.input_items()
    keys = [memo.key(item) for item in items]
    results: dict[int, ImageItem | None] = {}
    todo = []
    for n, key in enumerate(keys):
        cached = memo.get(key)
        if cached is not None:
            results[n] = cached[0]
        else:
            todo.append(n)
    if todo:
        tagged = tag_items(ctx, chain, [items[n] for n in todo])
        for n, item in zip(todo, tagged, strict=True):
            results[n] = item
            if item is not None:
                memo.put(keys[n], [item])
    out = [results[n] for n in range(len(items)) if results[n] is not None]
    # readable captions, one file per image, for people who want to look at them
    folder = ctx.stage_dir / "captions"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for item in out:
        wanted[f"{safe_file_stem(item.id)}.txt"] = caption_text(item.tags)
    for name, text in wanted.items():
        dest = folder / name
        if not dest.is_file() or dest.read_text("utf-8") != text:
            atomic.write_text(dest, text)
    for entry in folder.iterdir():
        if entry.name not in wanted:
            entry.unlink()
    if memo.dir.is_dir():
        for entry in memo.dir.iterdir():
            if entry.stem not in memo.used:
                entry.unlink()
    summary = [f"{len(out)} captions in {ctx.record_path(folder)}/"]
    return StageOutput(items=out, summary=summary, problems=list(ctx.problems))


def dataset_parts(part: PartInfo) -> list[PartInfo]:
    """The parts whose images a part's dataset holds: itself; a body's face first; a
    group's members with their faces (each face once), then the group's own pictures."""
    if part.kind == "face":
        return [part]
    if part.kind == "body":
        return [*part.members, part]
    out: list[PartInfo] = []
    for member in part.members:
        for p in dataset_parts(member):
            if p not in out:
                out.append(p)
    if part.images_dir is not None:
        out.append(part)
    return out


def stage_applies(spec: StageSpec, part: PartInfo) -> bool:
    """Whether a part goes through a stage: its kind's stages, and for a group with its
    own pictures (``images``) the image stages as well."""
    return part.kind in spec.parts or (spec.parts == IMAGE_PARTS and part.images_dir is not None)


def folder_name(part: PartInfo, key: str) -> str:
    """``<class tokens>[, tags]_<flip|noflip>_<part>[-<key>]`` (GenerateCharTag's convention)."""
    tags = [part.class_tokens, *part.tags]
    head = ", ".join(t for t in tags)
    if "_" in head:
        head = part.class_tokens.replace("_", " ")
    flip = "flip" if part.symmetric else "noflip"
    suffix = part.name + (f"-{key}" if key else "")
    return safe_file_stem(f"{head}_{flip}_{suffix}")


def run_dataset(ctx: StageContext, chain: Chain) -> StageOutput:
    writer, options = chain[0]
    build_root = ctx.stage_dir.parents[2]  # build/<target>/<part>/<stage>
    images_dir = ctx.stage_dir / "images"
    subsets: list[SubsetSpec] = []
    total = 0
    with atomic.atomic_dir(images_dir) as tmp:
        for part in dataset_parts(ctx.part):
            items = ctx.input(part.label).items or []
            groups: dict[str, list[ImageItem]] = {}
            for item in items:
                groups.setdefault(writer.subset_key(ctx, options, item.width, item.height), []).append(item)
            for key in sorted(groups):
                rel = Path(f"{part.repeats}_{safe_file_stem(part.keyword)}") / folder_name(part, key)
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                for item in groups[key]:
                    src = ctx.path(item.path)
                    stem = safe_file_stem(item.id)
                    dest = tmp / rel / f"{stem}.png" if src.suffix.lower() == ".png" else tmp / rel / f"{stem}{src.suffix.lower()}"
                    if _inside(src, build_root):
                        atomic.link_or_copy(src, dest)
                    else:
                        atomic.copy_file(src, dest)  # never link a source image into the build
                    atomic.write_text(dest.with_suffix(".txt"), caption_text(item.tags))
                total += len(groups[key])
                subsets.append(
                    SubsetSpec(
                        image_dir=images_dir / rel,
                        sizes=[(i.width, i.height) for i in groups[key]],
                        class_tokens=part.class_tokens,
                        num_repeats=part.repeats,
                        flip_aug=part.symmetric,
                        label=f"{part.label} {key}".strip(),
                    )
                )
    if not subsets:
        raise CharfwError(f"{ctx.part.label}: no images left for the dataset", hint="check the skipped files above")
    spec = DatasetSpec(subsets=subsets, note=f"{ctx.part.label}: {ctx.part.kind} dataset")
    text = writer.render(ctx, options, spec)
    config = ctx.stage_dir / writer.filename
    atomic.write_text(config, text)
    return StageOutput(
        files={"config": ctx.record_path(config)},
        folders={"images": ctx.record_path(images_dir)},
        data={"subsets": [{"label": s.label, "images": len(s.sizes), "dir": ctx.record_path(s.image_dir)} for s in subsets]},
        summary=[f"{total} images and captions in {len(subsets)} subsets in {ctx.record_path(images_dir)}/",
                 f"dataset config {ctx.record_path(config)}"],
    )


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def run_model_stage(ctx: StageContext, chain: Chain) -> StageOutput:
    component, options = chain[0]
    output = component.run(ctx, options)
    if not isinstance(output, StageOutput):
        raise CharfwError(f"{component.kind} '{component.name}' returned {type(output).__name__}, not a StageOutput")
    return output


FINDINGS_NAME = "findings.json"


def run_lint(ctx: StageContext, chain: Chain) -> StageOutput:
    """Every linter of the chain; the findings go to ``findings.json`` (a JSON list of
    ``{check, severity, message, file, code}``) and the summary. A ``--strict`` build stops
    here, before training, on any finding, one line each."""
    findings: list[Finding] = []
    for linter, options in chain:
        found = linter.lint(ctx, options)
        if not isinstance(found, list) or not all(isinstance(f, Finding) for f in found):
            raise CharfwError(f"linter '{linter.name}' returned {type(found).__name__}, not a list of Findings")
        findings.extend(f for f in found if f not in findings)
    path = ctx.stage_dir / FINDINGS_NAME
    atomic.write_text(path, json.dumps([f.to_json() for f in findings], indent=1, ensure_ascii=False))
    errors = sum(1 for f in findings if f.severity == "error")
    if ctx.strict and findings:
        lines = "\n".join(f"  {f.line()}" for f in findings)
        raise CharfwError(f"{ctx.part.label}: lint found {len(findings)} problem(s); --strict stops before "
                          f"training:\n{lines}", hint="fix them (charfw lint shows them), or build without --strict")
    summary = [f"{errors} error(s), {len(findings) - errors} warning(s) in {ctx.record_path(path)}"
               if findings else "no findings"]
    summary += [f.line() for f in findings[:LINT_SUMMARY_LINES]]
    if len(findings) > LINT_SUMMARY_LINES:
        summary.append(f"... and {len(findings) - LINT_SUMMARY_LINES} more (charfw lint {ctx.part.target})")
    return StageOutput(files={"findings": ctx.record_path(path)}, data={"findings": [f.to_json() for f in findings]},
                       summary=summary)


#: findings shown in the build summary per part (all of them are in findings.json)
LINT_SUMMARY_LINES = 8

IMAGE_PARTS = frozenset({"face", "body"})
ALL_PARTS = frozenset({"face", "body", "group"})
IDENTITY = ("kind", "keyword", "class_tokens", "tags", "template")
TRAINING = (*IDENTITY, "repeats", "symmetric", "model", "members", "name")

STAGES: tuple[StageSpec, ...] = (
    # a side branch: it reads the finished LoRAs of the parts it builds on (a body: its
    # face; a group: its members' bodies), and nothing reads it; `charfw adopt` moves
    # chosen drafts into the sources
    StageSpec("draft", "drafter", None, ALL_PARTS, run_model_stage, (*TRAINING, "angles"), side_branch=True),
    StageSpec("ingest", "source", "folder", IMAGE_PARTS, run_ingest,
              ("images_dir", "template", "angles", "symmetric"), can_disable=False),
    StageSpec("filter", "image_filter", None, IMAGE_PARTS, run_filter, chainable=True),
    StageSpec("background", "background", "flat", IMAGE_PARTS, run_background),
    StageSpec("prepare", "preparer", "square", IMAGE_PARTS, run_prepare),
    StageSpec("tag", "tagger", "angle-rules", IMAGE_PARTS, run_tag, IDENTITY, chainable=True),
    StageSpec("dataset", "dataset_writer", "kohya-toml", ALL_PARTS, run_dataset, TRAINING,
              can_disable=False, absolute_paths=True),
    # checks of the part's images, captions and training settings; train reads the dataset
    StageSpec("lint", "linter", "method", ALL_PARTS, run_lint, (*TRAINING, "angles"), chainable=True, gate=True),
    StageSpec("train", "trainer", "lora", ALL_PARTS, run_model_stage, TRAINING, can_disable=False),
    StageSpec("merge", "block_merger", "block-weights", ALL_PARTS, run_model_stage, ("kind", "name")),
    StageSpec("compress", "compressor", "svd", ALL_PARTS, run_model_stage, ("kind", "name")),
    StageSpec("sample", "sampler", None, ALL_PARTS, run_model_stage, TRAINING),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
STAGE_BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def jobs_default() -> int:
    return max(1, min(8, os.cpu_count() or 1))
