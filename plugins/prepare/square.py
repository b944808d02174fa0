"""``square``: upright, 8-bit RGB, sized for training, on a square canvas or cropped.

* ``mode: pad`` (default) fits the image in a square and fills the rest with the
  background colour (the colour the background stage used, else the colour of the image's
  border), like the seed's resize-and-centre script.
* ``mode: crop`` cuts the centre square.
* ``mode: keep`` keeps the aspect ratio (kohya's buckets handle it) and only downscales.

``size: auto`` keeps each image at its own size, capped at ``max_size``, so that images
larger than 512 train at 768 or 1024 as the dataset rules expect; a number makes every
image that size. Images are never upscaled unless ``upscale: true`` (then ``auto`` rounds
up to the next of ``sizes``). Resampling is LANCZOS by default.
"""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image
from pydantic import Field, field_validator

import charfw
from charfw import ImagePreparer, Options, parse_color
from charfw.build.images import border_color, composite

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


class SquareOptions(Options):
    mode: Literal["pad", "crop", "keep"] = "pad"
    #: "auto" or a side length in pixels
    size: Literal["auto"] | int = "auto"
    #: the training resolution classes (auto with upscale rounds up to one of these)
    sizes: list[int] = Field(default_factory=lambda: [512, 768, 1024])
    #: larger images are scaled down to this
    max_size: int = Field(1024, ge=64)
    upscale: bool = False
    #: "auto" (the background stage's colour, else the image border's) or a colour
    pad_color: Any = "auto"
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = "lanczos"

    @field_validator("size")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 64:
            raise ValueError("size must be at least 64 pixels")
        return v

    @field_validator("pad_color")
    @classmethod
    def _pad(cls, v: Any) -> Any:
        if v != "auto":
            parse_color(v)
        return v


def _side(long_side: int, options: SquareOptions) -> int:
    """The square side for an image whose longest side is ``long_side``."""
    if options.size != "auto":
        return int(options.size)
    side = min(long_side, options.max_size)
    if options.upscale:
        bigger = [s for s in sorted(options.sizes) if long_side <= s <= options.max_size]
        side = bigger[0] if bigger else min(max(options.sizes), options.max_size)
    return side


def _scale(long_side: int, side: int, options: SquareOptions) -> float:
    scale = side / long_side
    return scale if (scale <= 1 or options.upscale) else 1.0


class SquarePreparer(ImagePreparer):
    name = "square"
    version = "1"
    description = "fit-and-pad on the background colour, centre crop, or keep aspect; LANCZOS"
    Options = SquareOptions

    def prepare(self, ctx, options, image, item):
        if options.pad_color == "auto":
            color = item.background or (border_color(image) if image.mode == "RGB" else (255, 255, 255))
        else:
            color = parse_color(options.pad_color)
        image = composite(image, color)  # RGBA (no background stage) goes on the pad colour
        resample = RESAMPLE[options.resample]
        w, h = image.size
        if options.mode == "crop":
            short = min(w, h)
            left, top = (w - short) // 2, (h - short) // 2
            image = image.crop((left, top, left + short, top + short))
            target = round(short * _scale(short, _side(short, options), options))
            return image if target == short else image.resize((target, target), resample)
        long_side = max(w, h)
        side = _side(long_side, options)
        scale = _scale(long_side, side, options)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample)
        if options.mode == "keep" or nw == nh == side:
            return image
        canvas = Image.new("RGB", (side, side), color)
        canvas.paste(image, ((side - nw) // 2, (side - nh) // 2))
        return canvas


@charfw.hookimpl
def register_image_preparers(register):
    register(SquarePreparer())
