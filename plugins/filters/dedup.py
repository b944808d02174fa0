"""``dedup``: drop near-duplicate images (pHash), as the ``filter`` stage and as ``charfw dedup``.

In a build (``filter: {plugin: dedup, threshold: 6}``) each group of near-duplicates
keeps its best copy (largest, then PNG over JPEG) and the others do not go on; images
with different angle codes are never duplicates of each other unless
``across_codes: true`` (a front and a three-quarter view of a small chibi can hash
alike, and the method needs both). The report is ``build/<char>/<part>/filter/dedup-report.json``.

``charfw dedup DIR... --out CLEAN`` writes the filtered dataset (kept images and their
captions) to another folder and the report beside it. Sources are never deleted,
moved or changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from pydantic import Field

import charfw
from charfw import CharfwError, ImageFilter, Options, console
from charfw.build import atomic
from charfw.build.images import load, to_rgb_or_rgba
from charfw.errors import display_path

#: thresholds from the research notes: ≤ 6 bits "the same image", ≤ 10 "probably"
DEFAULT_THRESHOLD = 6
CACHE_NAME = "phash-v1.json"


class DedupOptions(Options):
    #: images whose hashes differ in at most this many of 64 bits are duplicates
    threshold: int = Field(DEFAULT_THRESHOLD, ge=0, le=32)
    #: also find mirrored copies (never for the method's angle images: f01 mirrors f07)
    mirrors: bool = False
    #: compare images with different angle codes too
    across_codes: bool = False
    #: imagehash's pHash exactly (slower) instead of the box-reduced variant
    exact: bool = False


def _hash_items(ctx: Any, options: DedupOptions, items: list[Any]) -> dict[str, tuple[int, int | None]]:
    """pHash (and mirror hash) per item id, cached by content hash across builds."""
    from charfw.prep.dedup import flipped, phashes

    cache_path = ctx.cache_dir / CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text("utf-8"))
    except (OSError, ValueError):
        cache = {}
    mode = "exact" if options.exact else "fast"
    out: dict[str, tuple[int, int | None]] = {}
    todo = []
    for item in items:
        hit = cache.get(f"{mode}:{item.sha256}")
        if hit is not None and (hit[1] is not None or not options.mirrors):
            out[item.id] = (int(hit[0], 16), int(hit[1], 16) if hit[1] else None)
        else:
            todo.append(item)
    with ctx.progress(len(todo), "hashing") as bar:
        for start in range(0, len(todo), 64):
            batch, pixels = [], []
            for item in todo[start : start + 64]:
                try:
                    pixels.append(to_rgb_or_rgba(load(ctx.path(item.path), max_pixels=None)))
                    batch.append(item)
                except CharfwError as exc:
                    ctx.error_problem(exc)
            hashes = phashes(pixels, exact=options.exact)
            mirrors = flipped(pixels, exact=options.exact) if options.mirrors else [None] * len(batch)
            for item, h, m in zip(batch, hashes, mirrors, strict=True):
                out[item.id] = (int(h), None if m is None else int(m))
                cache[f"{mode}:{item.sha256}"] = [f"{int(h):016x}", None if m is None else f"{int(m):016x}"]
            bar.advance(len(todo[start : start + 64]))
    if todo:
        atomic.write_json(cache_path, cache)
    return out


class DedupFilter(ImageFilter):
    name = "dedup"
    version = "1"
    description = "drop near-duplicates by pHash (keeps the largest copy, PNG over JPEG)"
    Options = DedupOptions

    def select(self, ctx, options, items):
        from charfw.prep.dedup import Candidate, find_groups, report_data

        hashes = _hash_items(ctx, options, items)
        candidates = [
            Candidate(key=item.id, path=ctx.path(item.path), width=item.width, height=item.height,
                      hash=hashes[item.id][0], mirror=hashes[item.id][1],
                      partition="" if options.across_codes else (item.code or ""))
            for item in items if item.id in hashes
        ]
        groups = find_groups(candidates, options.threshold, mirrors=options.mirrors)
        dropped = {c.key for g in groups for c, _ in g.dropped}
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        data = report_data(groups, len(candidates), options.threshold, root=ctx.workspace_root)
        atomic.write_json(ctx.stage_dir / "dedup-report.json", data)
        for g in groups:
            ctx.log(f"kept {g.kept.key}, dropped " + ", ".join(f"{c.key} ({d} bits)" for c, d in g.dropped))
        return [item for item in items if item.id in hashes and item.id not in dropped]


@charfw.hookimpl
def register_image_filters(register):
    register(DedupFilter())


@charfw.hookimpl
def register_commands(cli):
    @cli.command("dedup")
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
                  help="Copy the kept images (and their .txt captions) here. Without it, only report.")
    @click.option("-t", "--threshold", type=click.IntRange(0, 32), default=DEFAULT_THRESHOLD, show_default=True,
                  help="Hamming distance (of 64 bits) up to which images are duplicates.")
    @click.option("--mirrors", is_flag=True, help="Also treat mirrored copies as duplicates.")
    @click.option("--exact", is_flag=True, help="imagehash's pHash exactly (slower).")
    @click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
                  help="Where to write the JSON report (default: <out>/dedup-report.json).")
    @click.option("-r", "--recursive", is_flag=True, help="Also look in sub-folders.")
    @click.option("--strict", is_flag=True, help="Stop at the first unusable image.")
    @click.pass_context
    def dedup_command(ctx, inputs, out, threshold, mirrors, exact, report, recursive, strict):
        """Find near-duplicate images and keep the best copy of each.

        Nothing is deleted or moved: with --out, the kept images are copied there (with
        their caption files); the report lists every group and distance."""
        from charfw.prep.dedup import Candidate, find_groups, flipped, phashes, report_data
        from charfw.prep.image_batches import (
            Problems,
            check_output_folder,
            find_images,
            iter_batches,
        )

        files = find_images(list(inputs), recursive=recursive)
        if out is not None:
            check_output_folder(out, inputs)
        problems = Problems(strict=strict)
        candidates: list[Candidate] = []
        with console.progress(len(files), "hashing", unit="img") as bar:
            for batch in iter_batches(files, 64, problems):
                images = [im for _, im in batch]
                hashes = phashes(images, exact=exact)
                mirror = flipped(images, exact=exact) if mirrors else [None] * len(batch)
                for (path, im), h, m in zip(batch, hashes, mirror, strict=True):
                    candidates.append(Candidate(key=str(path), path=path, width=im.width, height=im.height,
                                                hash=int(h), mirror=None if m is None else int(m)))
                bar.advance(len(batch))
        groups = find_groups(candidates, threshold, mirrors=mirrors)
        dropped = {c.key for g in groups for c, _ in g.dropped}
        data = report_data(groups, len(candidates), threshold)
        kept = [c for c in candidates if c.key not in dropped]
        if out is not None:
            used: set[str] = set()
            for c in kept:
                name = c.path.name
                stem, n = c.path.stem, 1
                while name.casefold() in used:  # same name from two folders
                    n += 1
                    name = f"{stem}-{n}{c.path.suffix}"
                used.add(name.casefold())
                atomic.copy_file(c.path, out / name)
                caption = c.path.with_suffix(".txt")
                if caption.is_file():
                    atomic.copy_file(caption, (out / name).with_suffix(".txt"))
        report_path = report or (out / "dedup-report.json" if out is not None else None)
        if report_path is not None:
            atomic.write_json(report_path, data)
        for g in groups:
            console.out.print(f"keep {display_path(g.kept.path)}  ({g.kept.width}x{g.kept.height})", markup=False)
            for c, d in g.dropped:
                console.out.print(f"  drop {display_path(c.path)}  ({c.width}x{c.height}, {d} bits)", markup=False)
        msg = f"{len(candidates)} image(s), {len(groups)} group(s) of near-duplicates: kept {len(kept)}, " \
              f"dropped {len(dropped)}"
        if out is not None:
            msg += f"; copied the kept images to {display_path(out)}/"
        if report_path is not None:
            msg += f"; report {display_path(report_path)}"
        if problems.lines:
            msg += f"; skipped {len(problems.lines)} file(s)"
        console.out.print(msg, markup=False)
