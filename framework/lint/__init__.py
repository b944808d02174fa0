"""Checks of a part's training material before it trains: the ``lint`` stage and ``charfw lint``.

The checks work on a :class:`LintInput`: the part, its source images (as the background
stage read them), its finished images with the captions that train (read from the
dataset folder), the captions the tag rules give each angle code, the dataset config and
the trainer's settings, and every character part of the workspace. The built-in
``method`` linter (:mod:`charfw.default_plugins.lint.method`) gathers it from the stage
context; a plugin's linter can reuse :func:`run_checks` on its own input.

Every check has a name, a severity and one finding per thing it is about (an image, an
angle code, a tag), so the report can show each beside its file:

=========================  ========  ===================================================
check                      severity  finds
=========================  ========  ===================================================
angle-missing              warning   a code of the part's angle list without an image
angle-duplicate            warning   several source images with one code
angle-unknown              warning   a code outside the template or the part's list
angle-mirror               warning   codes 5-7 on a symmetric character
background-border          warning   a border that is not flat black or white
background-semi-transparent warning  half-transparent pixels blended into the background
background-caption         warning   a background colour the captions do not claim
caption-rules              warning   a caption that no longer matches the tag rules
caption-inconsistent       warning   a tag the rules put in all captions, in only some
keyword-foreign            error     another character's keyword in a caption
keyword-collision          error     two characters' or parts' keywords are the same
size-upscaled              warning   an image smaller than its resolution class
size-aspect                warning   an aspect ratio far from the part's others
train-steps                warning   steps per image far from the method's
train-color-aug            warning   color_aug while the trainer caches latents
=========================  ========  ===================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from charfw.components import Color, Finding
from charfw.stage_context import PartInfo

#: check name → (severity, what it finds)
CHECKS: dict[str, tuple[str, str]] = {
    "angle-missing": ("warning", "a code of the part's angle list without an image"),
    "angle-duplicate": ("warning", "several source images with one angle code"),
    "angle-unknown": ("warning", "a code outside the template or the part's angle list"),
    "angle-mirror": ("warning", "codes 5-7 on a symmetric character"),
    "background-border": ("warning", "a border that is not flat black or white"),
    "background-semi-transparent": ("warning", "half-transparent pixels blended into the background"),
    "background-caption": ("warning", "a background colour the captions do not claim"),
    "caption-rules": ("warning", "a caption that no longer matches the tag rules"),
    "caption-inconsistent": ("warning", "a tag the rules put in every caption, in only some"),
    "keyword-foreign": ("error", "another character's keyword in a caption"),
    "keyword-collision": ("error", "two characters or parts with one keyword"),
    "size-upscaled": ("warning", "an image smaller than its resolution class"),
    "size-aspect": ("warning", "an aspect ratio far from the part's other images"),
    "train-steps": ("warning", "steps per image far from the method's"),
    "train-color-aug": ("warning", "color_aug while the trainer caches latents"),
}


def finding(check: str, message: str, *, file: str | None = None, code: str | None = None) -> Finding:
    return Finding(check, CHECKS[check][0], message, file, code)  # type: ignore[arg-type]


class LintConfig(BaseModel):
    """The thresholds of the checks (the ``method`` linter's options)."""

    #: checks to skip, by name
    ignore: list[str] = Field(default_factory=list)
    #: the method's steps per image: the seed's 1200 steps on 12-15 images
    steps_per_image: tuple[float, float] = (80.0, 100.0)
    #: how far outside that range is "far" (a factor: 2 allows 40-200)
    steps_factor: float = Field(2.0, ge=1)
    #: the share of the top and side edges' pixels that must be one colour for a flat
    #: background (the bottom edge is where an upper body leaves the frame)
    border_flat: float = Field(0.9, gt=0, le=1)
    #: largest difference per channel (0-255) that still counts as the same colour
    color_tolerance: int = Field(12, ge=0, le=255)
    #: the largest share of half-transparent pixels (alpha 16-239) in a source image
    semi_transparent_max: float = Field(0.02, ge=0, le=1)
    #: an image whose longer side is below this share of its resolution class is too small
    min_size_ratio: float = Field(0.75, gt=0, le=1)
    #: an aspect ratio more than this factor from the part's median is very different
    aspect_factor: float = Field(1.5, ge=1)

    @field_validator("ignore")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in CHECKS:
                raise ValueError(f"unknown check '{name}'; checks: {', '.join(CHECKS)}")
        return value

    @field_validator("steps_per_image")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("give [low, high] steps per image with 0 < low <= high")
        return value


@dataclass
class SourceImage:
    """An image as the background stage read it."""

    id: str
    code: str | None
    path: Path
    #: how findings name it (workspace-relative)
    file: str


@dataclass
class PartImage:
    """One of the part's finished images and the caption it trains with."""

    id: str
    code: str | None
    path: Path
    #: the source image it came from (how findings name it)
    file: str
    width: int
    height: int
    #: the caption file in the dataset folder and its tags (None: not in the dataset)
    caption_file: str | None = None
    caption: list[str] | None = None
    #: the resolution of its dataset in the config
    resolution: int | None = None


@dataclass
class TrainInfo:
    """What the trainer's settings say about the run's length and latents."""

    steps: int | None = None
    epochs: int | None = None
    latents_cached: bool = False
    #: False when the length is a built-in test model's quick default, not the user's choice
    length_chosen: bool = True


@dataclass
class DatasetInfo:
    """The dataset config as the trainer reads it."""

    file: str
    #: images in all subsets (each counted once, not repeated)
    images: int = 0
    steps_per_epoch: int = 0
    #: subsets whose images get color_aug
    color_aug_subsets: int = 0
    #: resolution of each image file of the config
    resolution_of: dict[Path, int] = field(default_factory=dict)


@dataclass
class LintInput:
    part: PartInfo
    #: every code of the part's angle template (0-7), empty when it has none
    template_codes: tuple[str, ...] = ()
    sources: list[SourceImage] = field(default_factory=list)
    images: list[PartImage] = field(default_factory=list)
    #: the tags the rules give each angle code (keyword and part tags first)
    rule_captions: dict[str, list[str]] = field(default_factory=dict)
    #: the tag stage uses the rules (alone: captions must equal them; in a chain: contain them)
    rules_tagged: bool = False
    rules_alone: bool = False
    #: colours the background stage puts images on (black and white are always fine)
    background_colors: list[Color] = field(default_factory=list)
    dataset: DatasetInfo | None = None
    train: TrainInfo | None = None
    workspace_parts: tuple[PartInfo, ...] = ()


def run_checks(inp: LintInput, config: LintConfig | None = None) -> list[Finding]:
    """Every check on ``inp``, in the order of :data:`CHECKS`' groups, without the ignored ones."""
    from charfw.lint import captions, pictures, training

    config = config or LintConfig()
    found: list[Finding] = []
    for check in (pictures.angles, pictures.backgrounds, captions.captions, captions.keywords,
                  pictures.sizes, training.training):
        found.extend(check(inp, config))
    return [f for f in found if f.check not in config.ignore]
