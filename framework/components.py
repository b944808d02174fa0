"""The base classes of everything a manifest picks by name.

A plugin registers *components* through the ``register_*`` hooks of
:mod:`charfw.hookspecs`. Each component has a ``name`` (what a manifest writes), a
``version`` (bump it when the same input would now give a different output, so that
builds re-run), an ``Options`` model (the manifest's options block for the stage is
validated by it; unknown keys are errors) and one small method the engine calls.

The engine does the rest: iterating images with progress bars and worker threads,
per-image caching, atomic writes, records and skipping. So a tagger only says which tags
an image gets, a preparer only transforms one image, and so on.

Every method takes the same two arguments first, ``(ctx, options)``: the
:class:`~charfw.stage_context.StageContext` of the stage run and the validated options;
what the method works on comes after them.

==========  ===========================  ===================================================
stage       base class                   method to implement
==========  ===========================  ===================================================
draft       :class:`Drafter`             ``run(ctx, options)``
ingest      :class:`Source`              ``collect(ctx, options)``
filter      :class:`ImageFilter`         ``select(ctx, options, items)``
background  :class:`BackgroundRemover`   ``cutout(ctx, options, image, item)``
prepare     :class:`ImagePreparer`       ``prepare(ctx, options, image, item)``
tag         :class:`Tagger`              ``tag(ctx, options, items, images, tags_so_far)``
                                         (and ``batch_size(ctx, options)``)
dataset     :class:`DatasetWriter`       ``render(ctx, options, spec)``
                                         (and ``subset_key(ctx, options, width, height)``)
train       :class:`Trainer`             ``run(ctx, options)``
merge       :class:`BlockMerger`         ``run(ctx, options)``
compress    :class:`Compressor`          ``run(ctx, options)``
sample      :class:`Sampler`             ``run(ctx, options)``
lint        :class:`Linter`              ``lint(ctx, options)`` → :class:`Finding` list
any         :class:`Component`           ``check(ctx, options)``, ``cache_key(ctx, options)``
==========  ===========================  ===================================================

Outside a build, the commands that run a component (``charfw tag``, ``charfw wd14``,
``charfw caption``, ``charfw toml``) give it a real context too, for the folder they work
on (:func:`charfw.folders.convention.folder_context`): its ``part`` describes that folder,
its ``templates`` are the workspace's, and its ``models`` last for the command.

Model-backed components load their models with ``ctx.models.get(key, load)``: one load
per key for the whole build (or command), released when it ends; they keep no models of
their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from PIL import Image

    from charfw.build.items import ImageItem

    from .stage_context import StageContext, StageOutput


class Options(BaseModel):
    """Base of every component's options model: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class Component:
    """Something a manifest can pick by name for one stage."""

    #: the registry this component belongs to (set by each base class below)
    kind: ClassVar[str] = ""
    #: the name a manifest uses to pick it; unique within its kind
    name: str = ""
    #: bump when the same input and options would now give a different output
    version: str = "1"
    #: one line for ``charfw plugins``
    description: str = ""
    #: the options a manifest may give it (validated, unknown keys rejected)
    Options: ClassVar[type[Options]] = Options

    def cache_key(self, ctx: StageContext, options: Any) -> Any:
        """Extra JSON-like data whose change must re-run the stage (a rules file's hash, a
        model file's size and date). Called once per stage run; keep it cheap."""
        return None

    def check(self, ctx: StageContext, options: Any) -> None:
        """Raise a :class:`~charfw.errors.CharfwError` if the stage cannot run (a model file
        or an optional library is missing). Called before the stage runs and by ``--dry-run``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.name!r} v{self.version}>"


# --- image stages ------------------------------------------------------------------------


class Source(Component, ABC):
    """Ingest: find a part's source images and check them. Must never modify them."""

    kind = "source"

    @abstractmethod
    def collect(self, ctx: StageContext, options: Any) -> list[ImageItem]:
        """Return one item per usable image; report unusable files with ``ctx.problem()``."""


class ImageFilter(Component, ABC):
    """Filter: choose which of a part's images go on (near-duplicate removal, quality
    checks). Several filters can be chained."""

    kind = "image_filter"

    @abstractmethod
    def select(self, ctx: StageContext, options: Any, items: list[ImageItem]) -> list[ImageItem]:
        """Return the items to keep, in their order. Report why others were left out in a
        file under ``ctx.stage_dir`` and with ``ctx.log()``; never touch source files."""


Color = tuple[int, int, int]

NAMED_COLORS: dict[str, Color] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}


def parse_color(value: Any) -> Color:
    """``black``, ``white``, ``gray``, ``#rrggbb`` or ``[r, g, b]``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NAMED_COLORS:
            return NAMED_COLORS[text]
        if text.startswith("#") and len(text) == 7:
            try:
                return (int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16))
            except ValueError:
                pass
        raise ValueError(f"unknown colour {value!r}; use black, white, gray, #rrggbb or [r, g, b]")
    if isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        return (value[0], value[1], value[2])
    raise ValueError(f"unknown colour {value!r}; use black, white, gray, #rrggbb or [r, g, b]")


def color_name(color: Color) -> str:
    for name, rgb in NAMED_COLORS.items():
        if rgb == color:
            return name
    return "#{:02x}{:02x}{:02x}".format(*color)


class BackgroundOptions(Options):
    """Options every background remover understands."""

    #: the plain colour(s) to put the character on; two colours make two images of each
    #: source (the method uses black for dark hair, white for light hair, or both)
    colors: list[Any] = Field(default_factory=lambda: ["white"], min_length=1)

    @field_validator("colors")
    @classmethod
    def _colors(cls, value: list[Any]) -> list[Any]:
        seen = []
        for c in value:
            rgb = parse_color(c)
            if rgb in seen:
                raise ValueError(f"colour {c!r} is listed twice")
            seen.append(rgb)
        return value

    def rgb_colors(self) -> list[Color]:
        return [parse_color(c) for c in self.colors]


class BackgroundRemover(Component, ABC):
    """Background: make the background transparent; the engine composites onto colours."""

    kind = "background"
    Options: ClassVar[type[Options]] = BackgroundOptions

    @abstractmethod
    def cutout(self, ctx: StageContext, options: Any, image: Image.Image, item: ImageItem) -> Image.Image | None:
        """Return an RGBA image whose background is transparent, or None to keep the image
        as it is (it has no background to remove). Called from worker threads."""


class ImagePreparer(Component, ABC):
    """Prepare: orientation, colour, size. Receives an upright 8-bit RGB or RGBA image."""

    kind = "preparer"

    @abstractmethod
    def prepare(self, ctx: StageContext, options: Any, image: Image.Image, item: ImageItem) -> Image.Image:
        """Return the prepared image (RGB). Called from worker threads."""


class Tagger(Component, ABC):
    """Tag: the caption tags of each image. Several taggers can be chained in a manifest."""

    kind = "tagger"
    #: False when tags come from names alone (no image is decoded for this tagger)
    needs_pixels: ClassVar[bool] = True

    def batch_size(self, ctx: StageContext, options: Any) -> int:
        """How many images one ``tag()`` call may receive."""
        return 1

    @abstractmethod
    def tag(
        self,
        ctx: StageContext,
        options: Any,
        items: list[ImageItem],
        images: list[Image.Image] | None,
        tags_so_far: list[list[str]],
    ) -> list[list[str]]:
        """Tags for each item, in order. ``images`` is None when ``needs_pixels`` is False.
        ``tags_so_far`` holds what the earlier taggers of the chain gave each item; the
        engine appends the tags returned here that are not already present."""


# --- dataset configuration ---------------------------------------------------------------


@dataclass
class SubsetSpec:
    """One folder of training images and how to train on it."""

    image_dir: Path
    #: (width, height) of each image in the folder
    sizes: list[tuple[int, int]]
    class_tokens: str | None = None
    num_repeats: int = 1
    flip_aug: bool | None = None
    is_reg: bool = False
    keep_tokens: int | None = None
    #: a short label for messages ("krnk/face 512")
    label: str = ""


@dataclass
class DatasetSpec:
    """Everything a dataset-config writer needs."""

    subsets: list[SubsetSpec]
    #: a comment for the top of the file
    note: str = ""
    #: write image_dir relative to this folder (None: absolute paths)
    relative_to: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DatasetWriter(Component, ABC):
    """Dataset: write the training config for a set of image folders."""

    kind = "dataset_writer"
    #: the file name the build writes the config to
    filename: ClassVar[str] = "dataset.toml"

    def subset_key(self, ctx: StageContext, options: Any, width: int, height: int) -> str:
        """Images with different keys go into different subset folders (for example one
        folder per resolution class). The default keeps a part's images together."""
        return ""

    @abstractmethod
    def render(self, ctx: StageContext, options: Any, spec: DatasetSpec) -> str:
        """The text of the config file (``ctx.templates`` finds jinja2 templates and tables)."""


# --- model stages ------------------------------------------------------------------------


class _ModelStage(Component, ABC):
    @abstractmethod
    def run(self, ctx: StageContext, options: Any) -> StageOutput:
        """Do the stage's work, writing only under ``ctx.stage_dir``; return its outputs.

        The LoRA file to pass on is ``files["lora"]`` (workspace-relative, see
        ``ctx.record_path``); the upstream one is ``ctx.input_file("lora")``."""


class Drafter(_ModelStage):
    """Draft: candidate training images generated for the part's angle codes (before
    ``ingest``; a person adopts the good ones into the source folder). A body's drafter
    gets its character's finished face LoRA as ``ctx.input_file("lora")``."""

    kind = "drafter"


class Trainer(_ModelStage):
    """Train: a LoRA from the dataset config the dataset stage wrote (``ctx.input_file("config")``)."""

    kind = "trainer"


class BlockMerger(_ModelStage):
    """Merge: per-block weights applied to the trained LoRA."""

    kind = "block_merger"


class Compressor(_ModelStage):
    """Compress: SVD rank reduction of the merged LoRA."""

    kind = "compressor"


class Sampler(_ModelStage):
    """Sample: images made with the finished LoRA."""

    kind = "sampler"


# --- checks before training ---------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing a linter found. ``findings.json`` holds these as JSON objects."""

    #: the check's name ("angle-missing", "train-steps")
    check: str
    severity: Literal["warning", "error"]
    message: str
    #: the file it is about (workspace-relative where possible), if any
    file: str | None = None
    #: the angle code it is about, if any
    code: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in ("warning", "error"):
            raise ValueError(f"severity must be 'warning' or 'error', not {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "severity": self.severity, "message": self.message,
                "file": self.file, "code": self.code}

    def line(self) -> str:
        """``warning angle-missing: f14: no image for this angle`` (file first when known)."""
        where = self.file or self.code
        return f"{self.severity} {self.check}: " + (f"{where}: " if where else "") + self.message


class Linter(Component, ABC):
    """Lint: checks of a part's training material before it trains (the ``lint`` stage,
    between ``dataset`` and ``train``). Several linters can be chained; their findings
    are written to ``lint/findings.json`` and shown in the summary; ``--strict`` stops
    the build on any. A linter reads the upstream outputs ``ctx.input("dataset")``,
    ``ctx.inputs.get("images")`` (the part's finished images) and ``ctx.inputs.get("source")``
    (the images the background stage read), the plugin chains of the part's stages up to
    ``train`` (``ctx.part_chains``) and every character part of the workspace (``ctx.workspace_parts``)."""

    kind = "linter"

    @abstractmethod
    def lint(self, ctx: StageContext, options: Any) -> list[Finding]:
        """The findings, in a stable order (no findings: an empty list)."""


#: kind → (base class, the hook that registers it, the noun used in messages)
KINDS: dict[str, tuple[type[Component], str, str]] = {
    "drafter": (Drafter, "register_drafters", "drafter"),
    "source": (Source, "register_sources", "image source"),
    "image_filter": (ImageFilter, "register_image_filters", "image filter"),
    "background": (BackgroundRemover, "register_background_removers", "background remover"),
    "preparer": (ImagePreparer, "register_image_preparers", "image preparer"),
    "tagger": (Tagger, "register_taggers", "tagger"),
    "dataset_writer": (DatasetWriter, "register_dataset_writers", "dataset-config writer"),
    "linter": (Linter, "register_linters", "linter"),
    "trainer": (Trainer, "register_trainers", "trainer"),
    "block_merger": (BlockMerger, "register_block_mergers", "block-weight merger"),
    "compressor": (Compressor, "register_compressors", "compressor"),
    "sampler": (Sampler, "register_samplers", "sampler"),
}
