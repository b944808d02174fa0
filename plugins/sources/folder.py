"""``folder``: a part's source images from the folder its manifest names.

Reads every image file directly in the folder (any case of .png .jpg .jpeg .webp .bmp
.gif .tif .tiff .avif), checks each one by decoding it, and reports what cannot be used:
empty, truncated or non-image files, decompression bombs, names without an angle code,
codes of another angle set, and two files that would share a caption (``f00.png`` and
``f00.jpg``). Source files are only read, never written.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pydantic import Field

import charfw
from charfw import CharfwError, ImageError, ImageItem, Options, Source
from charfw.build.angles import parse_code
from charfw.build.images import DEFAULT_MAX_PIXELS, SOURCE_IMAGE_SUFFIXES, load
from charfw.build.items import list_images, safe_file_stem


class FolderOptions(Options):
    #: larger images are refused as possible decompression bombs
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    #: images whose name does not start with an angle code are problems (the tag rules need it)
    require_codes: bool = True


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
        expected_prefix = ctx.templates.angle_sets[ctx.part.template].prefix if ctx.part.template else None
        candidates = []
        seen: dict[str, str] = {}
        for path in files:
            code = parse_code(path.stem)
            if code is None and options.require_codes:
                ctx.problem(path, "the name does not start with an angle code",
                            hint=f"rename it like {expected_prefix or 'f'}00.png or {expected_prefix or 'f'}12-smile.png")
                continue
            if code is not None and expected_prefix and code.prefix != expected_prefix:
                ctx.problem(path, f"angle code {code} belongs to another template than "
                            f"'{ctx.part.template}' (codes start with '{expected_prefix}')",
                            hint="move it to the right part's folder")
                continue
            stem = safe_file_stem(path.stem)
            clash = seen.get(stem.casefold())
            if clash is not None:
                ctx.problem(path, f"has the same name as {clash}; both would get the same caption file",
                            hint="rename one of them")
                continue
            seen[stem.casefold()] = path.name
            candidates.append((path, stem, code))

        def check_one(entry):
            path, stem, code = entry
            try:
                image = load(path, max_pixels=options.max_pixels)
            except ImageError as exc:
                return exc
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
