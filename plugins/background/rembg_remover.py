"""``rembg``: cut the character out with a segmentation model, and ``charfw cutout``.

The default model is ``isnet-anime`` (SkyTNT's anime segmentation, trained on
illustrations); ``u2net``, ``isnet-general-use``, ``birefnet-*`` and a custom ONNX file
(``model: path/to/model.onnx`` with ``model_type: u2net`` or ``isnet``) work too. The
engine puts each cut-out on the manifest's colour(s), like the ``flat`` remover.

Images that already have transparency keep it (``keep_transparency``): an illustrator
who exported a clean alpha channel knows better than a model. One session per model
serves every part of a build (it lives in the build's ``ctx.models``, released when the
build ends; ``charfw cutout`` keeps its own for the command). Model files are
never downloaded silently (see :mod:`charfw.prep.rembg`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click
from pydantic import Field

import charfw
from charfw import (
    BackgroundOptions,
    BackgroundRemover,
    CharfwError,
    ModelCache,
    color_name,
    console,
    parse_color,
)
from charfw.build.atomic import write_json
from charfw.build.images import composite, has_transparency, save_png
from charfw.build.items import safe_file_stem
from charfw.errors import check_module, display_path


class RembgOptions(BackgroundOptions):
    #: a rembg model name (isnet-anime, u2net, isnet-general-use, birefnet-general, ...)
    #: or a path to a .onnx file inside rembg's models folder
    model: str = "isnet-anime"
    #: for a custom .onnx file: u2net (320 px input) or isnet (1024 px input)
    model_type: Literal["u2net", "isnet"] = "isnet"
    #: images with their own transparency are used as they are
    keep_transparency: bool = True
    #: rembg's morphological smoothing of the mask edge
    post_process_mask: bool = False
    #: pymatting alpha matting on the mask edge (slow, finer hair)
    alpha_matting: bool = False
    providers: Literal["auto", "cpu", "cuda"] = "auto"
    #: fetch a missing model file (with a message); false: say where to put it
    download: bool = True
    #: images per model run (models with a fixed batch run one at a time anyway)
    batch_size: int = Field(1, ge=1, le=64)


def segmenter(models: ModelCache, options: RembgOptions, bases: list[Path]) -> Any:
    """The session for these options from ``models`` (the build's or the command's), so
    that it is loaded once for the length of the build or command."""
    from charfw.prep.onnx_runtime import choose_providers
    from charfw.prep.rembg import Segmenter

    providers = choose_providers(options.providers, auto_order=("cuda", "cpu"), purpose="rembg")
    key = ("rembg", options.model, options.model_type, tuple(providers), tuple(str(b) for b in bases))
    return models.get(key, lambda: Segmenter(options.model, providers=providers, model_type=options.model_type,
                                            download=options.download, bases=bases))


class RembgRemover(BackgroundRemover):
    name = "rembg"
    version = "1"
    description = "cut out with a rembg model (isnet-anime by default), then onto plain colours"
    Options = RembgOptions

    def check(self, ctx: Any, options: RembgOptions) -> None:
        # without importing: rembg's import is slow, and a rebuild whose background stage
        # is up to date must not pay it (the stage's run imports it, with a clear error)
        check_module("onnxruntime", extra="prep", purpose="background removal with rembg")
        check_module("rembg", extra="prep", purpose="background removal")

    def cache_key(self, ctx: Any, options: RembgOptions) -> Any:
        from charfw.prep.rembg import custom_model_path, model_locations, session_classes

        try:
            path = custom_model_path(options.model, [ctx.workspace_root, Path.cwd()])
        except CharfwError:
            path = None
        if path is None:
            path = self._remembered_model_path(options.model, ctx.cache_dir)
        if path is None:
            cls = session_classes().get(options.model)
            found = [p for p in model_locations(cls) if p.is_file()] if cls is not None else []
            path = found[0] if found else None
            if path is not None:
                self._remember_model_path(options.model, path, ctx.cache_dir)
        return ctx.sha256(path) if path is not None else "not downloaded yet"

    # Where rembg keeps a built-in model's file is known only after importing rembg (about
    # 2 s). The path found last time is kept under build/.cache, keyed by the environment
    # variables rembg reads, so a rebuild whose background stage is up to date stays fast.

    @staticmethod
    def _memo_key(model: str) -> str:
        import os

        env = [os.environ.get(k, "") for k in ("U2NET_HOME", "XDG_DATA_HOME", "HOME")]
        return "\0".join([model, *env])

    def _remembered_model_path(self, model: str, cache_dir: Path) -> Path | None:
        import json

        try:
            memo = json.loads((cache_dir / "rembg-models.json").read_text(encoding="utf-8"))
            path = Path(memo[self._memo_key(model)])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return path if path.is_file() else None

    def _remember_model_path(self, model: str, path: Path, cache_dir: Path) -> None:
        import contextlib
        import json


        file = cache_dir / "rembg-models.json"
        try:
            memo = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}
        if not isinstance(memo, dict):
            memo = {}
        memo[self._memo_key(model)] = str(path)
        with contextlib.suppress(OSError):  # only a speed-up
            write_json(file, memo)

    def cutout(self, ctx, options, image, item):
        if options.keep_transparency and image.mode == "RGBA":
            return image
        seg = segmenter(ctx.models, options, [ctx.workspace_root, Path.cwd()])
        return seg.cutouts([image], post_process_mask=options.post_process_mask,
                           alpha_matting=options.alpha_matting, workers=1)[0]


@charfw.hookimpl
def register_background_removers(register):
    register(RembgRemover())


@charfw.hookimpl
def register_commands(cli):
    @cli.command("cutout")
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                  help="Folder for the results (never a source folder).")
    @click.option("-m", "--model", default="isnet-anime", show_default=True,
                  help="rembg model name, or a .onnx file in rembg's models folder.")
    @click.option("--model-type", type=click.Choice(["u2net", "isnet"]), default="isnet", show_default=True,
                  help="Input layout of a custom .onnx file.")
    @click.option("-c", "--color", "colors", multiple=True, metavar="COLOR",
                  help="Put the cut-out on this colour (white, black, #rrggbb; repeat for several). "
                       "Default: keep the transparency.")
    @click.option("--post-process-mask", is_flag=True, help="Smooth the mask edge.")
    @click.option("--alpha-matting", is_flag=True, help="Refine the edge with alpha matting (slow).")
    @click.option("-b", "--batch-size", type=click.IntRange(1, 64), default=4, show_default=True)
    @click.option("--provider", "providers", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                  show_default=True)
    @click.option("--no-download", is_flag=True, help="Never download a model file.")
    @click.option("-r", "--recursive", is_flag=True, help="Also look in sub-folders.")
    @click.option("--overwrite", is_flag=True, help="Redo images whose result exists.")
    @click.option("--strict", is_flag=True, help="Stop at the first unusable image.")
    @click.pass_context
    def cutout_command(ctx, inputs, out, model, model_type, colors, post_process_mask, alpha_matting,
                      batch_size, providers, no_download, recursive, overwrite, strict):
        """Cut characters out of their backgrounds: PNGs with transparency, or on plain colours.

        Sources are only read. Results that exist are skipped, so an interrupted run
        resumes; --overwrite redoes them."""
        from charfw.prep.image_batches import (
            Problems,
            check_output_folder,
            find_images,
            iter_batches,
        )

        try:
            rgbs = [parse_color(c) for c in colors]
        except ValueError as exc:
            raise CharfwError(f"--color: {exc}") from None
        options = RembgOptions(model=model, model_type=model_type, post_process_mask=post_process_mask,
                               alpha_matting=alpha_matting, providers=providers, download=not no_download,
                               batch_size=batch_size)
        check_output_folder(out, inputs)
        files = find_images(list(inputs), recursive=recursive)

        def targets(path: Path) -> list[Path]:
            stem = safe_file_stem(path.stem)
            if len(rgbs) <= 1:
                return [out / f"{stem}.png"]
            return [out / f"{stem}-{color_name(c).lstrip('#')}.png" for c in rgbs]

        todo = [f for f in files if overwrite or not all(t.is_file() for t in targets(f))]
        done_before = len(files) - len(todo)
        problems = Problems(strict=strict)
        written = kept = 0
        out.mkdir(parents=True, exist_ok=True)
        models = ModelCache()  # the command's: released when it ends
        try:
            seg = segmenter(models, options, [Path.cwd()]) if todo else None
            with console.progress(len(todo), "cutout", unit="img") as bar:
                for batch in iter_batches(todo, batch_size, problems):
                    cut = seg.cutouts([im for _, im in batch], post_process_mask=post_process_mask,
                                      alpha_matting=alpha_matting)
                    for (path, image), result in zip(batch, cut, strict=True):
                        if result is None or not has_transparency(result):
                            kept += 1  # nothing separated: the image as it is
                            result = image.convert("RGBA")
                        for dest, color in zip(targets(path), rgbs or [None], strict=True):
                            save_png(result if color is None else composite(result, color), dest)
                        written += 1
                    bar.advance(len(batch))
        finally:
            models.clear()
        msg = f"wrote {written} image(s) to {display_path(out)}/"
        if done_before:
            msg += f"; {done_before} already done"
        if kept:
            msg += f"; {kept} had nothing to separate (kept whole)"
        if problems.lines:
            msg += f"; skipped {len(problems.lines)} file(s)"
        console.out.print(msg, markup=False)
