"""``folder``: a part's source images from the folder its manifest names.

Reads every image file directly in the folder (any case of .png .jpg .jpeg .webp .bmp
.gif .tif .tiff .avif), checks each one by decoding it, and reports what cannot be used:
empty, truncated or non-image files, decompression bombs, images too small to train on,
names without an angle code (or with digits out of range, ``f99``), codes of another
angle set, and two files that would share a caption (``f00.png`` and ``f00.jpg``: the
PNG is used). It warns about animations (only the first frame is used) and mirrored
codes (5-7) in a symmetric character's folder. Source files are only read, never written.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import Field

import charfw
from charfw import CharfwError, ImageError, ImageItem, Options, Source, console
from charfw.build.angles import parse_code, why_not_a_code
from charfw.build.images import DEFAULT_MAX_PIXELS, SOURCE_IMAGE_SUFFIXES, load
from charfw.build.items import list_images, safe_file_stem
from charfw.errors import display_path

#: which of two files with the same name (``f00.png``, ``f00.jpg``) is used: lossless
#: formats that keep transparency first, JPEG last
SUFFIX_PREFERENCE = (".png", ".webp", ".tif", ".tiff", ".bmp", ".avif", ".gif", ".jpg", ".jpeg")


class FolderOptions(Options):
    #: larger images are refused as possible decompression bombs
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    #: images smaller than this on a side are problems (a 1x1 export would be trained upscaled)
    min_size: int = Field(32, ge=1)
    #: images whose name does not start with an angle code are problems (the tag rules need it)
    require_codes: bool = True


def _preference(suffix: str) -> int:
    suffix = suffix.lower()
    return SUFFIX_PREFERENCE.index(suffix) if suffix in SUFFIX_PREFERENCE else len(SUFFIX_PREFERENCE)


def _frames(path) -> int:
    """How many frames an image file holds (GIF, WebP, APNG, TIFF pages); 1 when unsure."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1)) if getattr(im, "is_animated", False) else 1
    except (OSError, ValueError, SyntaxError):
        return 1


class FolderSource(Source):
    name = "folder"
    description = "source images from the folder the manifest names, checked and never modified"
    Options = FolderOptions

    def _folder(self, ctx):
        folder = ctx.part.images_dir
        if folder is None or not folder.is_dir():
            raise CharfwError(
                f"the images folder of {ctx.part.label} does not exist",
                path=folder,
                hint="create it and put the images named by angle code (f00.png, ...) in it",
            )
        return folder

    def check(self, ctx, options):
        self._folder(ctx)

    def cache_key(self, ctx, options):
        # the content hash of every candidate file (stat-cached, so cheap when unchanged)
        files = list_images(self._folder(ctx), SOURCE_IMAGE_SUFFIXES)
        return [[p.name, ctx.sha256(p)] for p in files]

    def collect(self, ctx, options):
        folder = self._folder(ctx)
        files = list_images(folder, SOURCE_IMAGE_SUFFIXES)
        sets = ctx.templates.angle_sets
        expected_prefix = sets[ctx.part.template].prefix if ctx.part.template else None
        prefixes = {a.prefix: name for name, a in sets.items()}
        # of files sharing a name, the one the caption goes with: PNG before JPEG
        chosen: dict[str, Path] = {}
        for path in sorted(files, key=lambda p: _preference(p.suffix)):
            chosen.setdefault(safe_file_stem(path.stem).casefold(), path)
        candidates = []
        for path in files:
            code = parse_code(path.stem)
            if code is None and options.require_codes:
                ctx.problem(path, why_not_a_code(path.stem),
                            hint=f"rename it like {expected_prefix or 'f'}00.png or {expected_prefix or 'f'}12-smile.png")
                continue
            if code is not None and expected_prefix and code.prefix != expected_prefix:
                other = prefixes.get(code.prefix)
                if other is not None:
                    ctx.problem(path, f"{code} is a code of the '{other}' template, and {ctx.part.label} follows "
                                f"'{ctx.part.template}' (codes {expected_prefix}00 …)",
                                hint=f"move it to the images folder of a part with template '{other}'")
                else:
                    ctx.problem(path, f"'{code.prefix}' starts no template's angle codes (known: "
                                + ", ".join(f"{k} {n}" for k, n in sorted(prefixes.items())) + ")",
                                hint=f"rename it like {expected_prefix}00.png")
                continue
            stem = safe_file_stem(path.stem)
            kept = chosen[stem.casefold()]
            if kept != path:
                why = (f" ({kept.suffix[1:].upper()} is preferred: lossless, it keeps transparency)"
                       if _preference(kept.suffix) < _preference(path.suffix) else "")
                ctx.problem(path, f"has the same name as {kept.name}, and both would get the same caption file; "
                            f"{kept.name} is used{why}",
                            hint=f"rename it (e.g. {stem}-2{path.suffix}) to use both, or remove it")
                continue
            if (code is not None and code.is_mirror and ctx.part.symmetric and ctx.part.angles
                    and code.code not in ctx.part.angles):
                console.warn(f"{display_path(path)}: {code} ({code.describe()}) is a mirrored angle, and "
                             f"{ctx.part.target} is symmetric: flip augmentation already makes it from "
                             f"{code.mirrored()}; it is used, but set symmetric: false in the manifest if the "
                             "two sides differ, or remove it")
            candidates.append((path, stem, code))

        def check_one(entry):
            path, stem, code = entry
            try:
                image = load(path, max_pixels=options.max_pixels)
            except ImageError as exc:
                return exc
            if min(image.size) < options.min_size:
                return ImageError(f"is {image.width}x{image.height} pixels, too small to train on (it would be "
                                  f"upscaled to the training resolution)", path=path,
                                  hint=f"use an image at least 512 px on a side, or remove it (min_size: "
                                       f"{options.min_size} in the ingest options)")
            frames = _frames(path)
            if frames > 1:
                console.warn(f"{display_path(path)}: animated ({frames} frames): only its first frame is used; "
                             "export the frame you want as a PNG to pick another")
            return ImageItem(
                id=stem,
                path=ctx.record_path(path),
                sha256=ctx.sha256(path),
                source=ctx.record_path(path),
                code=code.code if code else None,
                width=image.width,
                height=image.height,
            )

        items = []
        with ctx.progress(len(candidates), "checking") as bar, ThreadPoolExecutor(max(1, ctx.jobs)) as pool:
            for result in pool.map(check_one, candidates):
                if isinstance(result, ImageError):
                    ctx.error_problem(result)
                else:
                    items.append(result)
                bar.advance()

        return items


@charfw.hookimpl
def register_sources(register):
    register(FolderSource())
