"""``blip``: a BLIP sentence caption for each image, and ``charfw caption``.

In a build it is usually chained after the angle rules (``tag: [angle-rules, blip]``):
the caption sentence ("a girl with cat ears holding a cup") is appended as one entry
(commas removed, so that it stays one). On its own, ``charfw caption DIR`` writes the
seed's caption files, one ``.txt`` per image. The model is a folder or a Hugging Face id
(default Salesforce/blip-image-captioning-base, or ``$CHARFW_BLIP_MODEL``), never
downloaded silently; it is loaded once into the build's ``ctx.models`` (``charfw
caption``: the command's) and released when the build ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click
from pydantic import Field

import charfw
from charfw import CharfwError, Options, Tagger
from charfw.errors import check_module
from charfw.folders.caption_command import caption_command


def _default_model() -> str:
    from charfw.prep.blip import default_model

    return default_model()


class BlipOptions(Options):
    #: a folder with a saved BlipForConditionalGeneration + BlipProcessor, or a Hugging Face id
    model: str = Field(default_factory=_default_model)
    #: start of a conditional caption ("a picture of"); BLIP repeats it in the caption
    prompt: str | None = None
    max_new_tokens: int = Field(30, ge=1, le=200)
    num_beams: int = Field(3, ge=1, le=16)
    batch_size: int = Field(8, ge=1, le=256)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: fetch a Hugging Face model that is not in the local cache (with a message)
    download: bool = True


class BlipTagger(Tagger):
    name = "blip"
    version = "1"
    description = "a BLIP caption sentence per image (BlipForConditionalGeneration, batched)"
    Options = BlipOptions
    needs_pixels = True

    def batch_size(self, ctx: Any, options: BlipOptions) -> int:
        return options.batch_size

    def _folder(self, ctx: Any, options: BlipOptions, *, download: bool) -> Path:
        from charfw.prep.blip import DOWNLOAD_PATTERNS
        from charfw.prep.model_files import resolve_model_dir

        return resolve_model_dir(options.model, files=["config.json"], what="BLIP captioner",
                                 bases=[ctx.workspace_root, Path.cwd()], download=download,
                                 patterns=DOWNLOAD_PATTERNS)

    def check(self, ctx: Any, options: BlipOptions) -> None:
        from charfw.prep.model_files import HF_ID, local_path, offline

        check_module("transformers", extra="prep", purpose="BLIP captions")
        try:
            self._folder(ctx, options, download=False)
        except CharfwError:
            downloadable = (options.download and not offline() and HF_ID.match(options.model)
                            and local_path(options.model, [ctx.workspace_root, Path.cwd()]) is None)
            if not downloadable:
                raise

    def cache_key(self, ctx: Any, options: BlipOptions) -> Any:
        try:
            folder = self._folder(ctx, options, download=False)
        except CharfwError:
            return [options.model, "not downloaded yet"]
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        return [ctx.sha256(p) for p in [folder / "config.json", *weights]]

    def captioner(self, ctx: Any, options: BlipOptions) -> Any:
        """The loaded captioner, from ``ctx.models`` (shared by every stage of the build)."""
        from charfw.prep.blip import BlipCaptioner

        folder = self._folder(ctx, options, download=options.download)
        return ctx.models.get(("blip", str(folder), options.device), lambda: BlipCaptioner(folder, device=options.device))

    def tag(self, ctx, options, items, images, tags_so_far):
        from charfw.prep.blip import caption_as_tag

        captions = self.captioner(ctx, options).caption(
            images, prompt=options.prompt, max_new_tokens=options.max_new_tokens, num_beams=options.num_beams)
        return [[caption_as_tag(c)] if c.strip() else [] for c in captions]


@charfw.hookimpl
def register_taggers(register):
    register(BlipTagger())


@charfw.hookimpl
def register_commands(cli):
    caption_command(
        cli, "caption", "blip",
        help="""Caption images with BLIP: one .txt per image, beside it.

        Images are never touched. A caption that differs from the new one is kept unless
        --overwrite or --append is given.""",
        model_help="Folder of a BLIP captioning model, or a Hugging Face id "
                   "(default: $CHARFW_BLIP_MODEL or Salesforce/blip-image-captioning-base).",
        append_help="Add the caption to existing captions.",
        options=[
            click.option("--prompt", help="Start of a conditional caption, e.g. 'a drawing of'."),
            click.option("-b", "--batch-size", type=click.IntRange(1, 256), default=8, show_default=True),
            click.option("--max-new-tokens", type=click.IntRange(1, 200), default=30, show_default=True),
            click.option("--num-beams", type=click.IntRange(1, 16), default=3, show_default=True),
            click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        ],
        tagger_options=lambda p: {"prompt": p["prompt"], "batch_size": p["batch_size"],
                                  "max_new_tokens": p["max_new_tokens"], "num_beams": p["num_beams"],
                                  "device": p["device"]},
    )
