"""Image files for the folder commands (rembg, dedup): finding them and decoding them in batches.

The build's stages get their images from the engine; the standalone commands work on
any folder a user points them at. They share what the engine does for each file: an
unreadable file is reported in one line and skipped (or stops the command with
``--strict`` before anything is written), and whatever Pillow opened (16-bit, CMYK,
palette, the first frame of an animation) becomes 8-bit RGB or RGBA. Decoding runs in a
few threads, since Pillow releases the GIL while it decodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from charfw import console
from charfw.build.images import SOURCE_IMAGE_SUFFIXES, is_image_name, load, to_rgb_or_rgba
from charfw.build.items import natural_key
from charfw.errors import CharfwError, ImageError

if TYPE_CHECKING:
    from PIL import Image


def for_each_index(fn: Callable[[int], None], n: int, workers: int | None = None) -> None:
    """``fn(0) … fn(n - 1)`` on up to ``workers`` threads (default: up to 4, one per core).

    For the per-image pre- and post-processing of a batch (resizing, padding, hashing),
    which is numpy and Pillow work that releases the GIL; each call writes its own slot
    of a preallocated array, so the order does not matter."""
    workers = max(1, min(n, workers if workers is not None else min(4, os.cpu_count() or 1)))
    if workers == 1:
        for i in range(n):
            fn(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fn, range(n)))


def find_images(paths: Sequence[Path], *, recursive: bool = False,
                suffixes: frozenset[str] = SOURCE_IMAGE_SUFFIXES) -> list[Path]:
    """Image files given directly or found in the given folders, in natural order, once each."""
    found: list[Path] = []
    for p in paths:
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            pattern = p.rglob("*") if recursive else p.glob("*")
            found += sorted((f for f in pattern if f.is_file() and is_image_name(f.name, suffixes)
                             and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                            key=lambda f: natural_key(str(f.relative_to(p))))
        else:
            raise CharfwError("no such file or folder", path=p)
    if not found:
        nested = not recursive and any(
            f.is_file() and is_image_name(f.name, suffixes) for p in paths if p.is_dir() for f in p.rglob("*"))
        where = ", ".join(str(p) for p in paths)
        raise CharfwError(f"no images in {where}",
                          hint="add -r to look in sub-folders" if nested else
                          f"give image files or folders that hold them ({', '.join(sorted(suffixes))})")
    seen: set[Path] = set()
    out = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


@dataclass
class Problems:
    """Files that could not be used, one line each."""

    strict: bool = False
    lines: list[str] = field(default_factory=list)

    def add(self, exc: CharfwError) -> None:
        if self.strict:
            raise exc
        self.lines.append(str(exc))
        console.warn(f"{exc} (skipped)")


def load_image(path: Path) -> Image.Image:
    """Upright 8-bit RGB or RGBA, or an :class:`ImageError`."""
    return to_rgb_or_rgba(load(path, max_pixels=None))


def iter_batches(paths: Sequence[Path], batch_size: int, problems: Problems, *,
                 workers: int = 2) -> Iterator[list[tuple[Path, Image.Image]]]:
    """Decoded images in batches of ``batch_size``, in order, unreadable ones reported."""

    def one(path: Path) -> Image.Image | ImageError:
        try:
            return load_image(path)
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            batch = []
            for path, result in zip(chunk, pool.map(one, chunk), strict=True):
                if isinstance(result, ImageError):
                    problems.add(result)
                else:
                    batch.append((path, result))
            if batch:
                yield batch


def check_output_folder(out: Path, sources: Sequence[Path]) -> None:
    """Refuse to write into a folder the images come from: sources are never touched."""
    target = out.resolve()
    for s in sources:
        folder = (s if s.is_dir() else s.parent).resolve()
        if target == folder:
            raise CharfwError("the output folder is a source folder", path=out,
                              hint="give another --out; source images are never overwritten")
