"""Aspect-ratio buckets: which training size each image gets, as kohya sd-scripts decides it.

With ``enable_bucket`` an image trains at a size (its *bucket*) whose sides are multiples of
``bucket_reso_steps`` and whose area is at most ``resolution²``; images in one batch share
a bucket. Two ways to choose it:

* ``bucket_no_upscale = true`` (the method's setting): every image gets its own bucket from
  its size: scaled down (never up) to fit the area, then each side rounded down to the
  step. At resolution 512 a 384x768 image trains at 320x704 (scaled to 362x724, then
  rounded down): no upscaling, little cropping.
* otherwise: a fixed list of buckets (the square plus widths from ``min_bucket_reso`` to
  ``max_bucket_reso`` with the largest height that fits the area, and their transposes);
  each image takes the bucket with the closest aspect ratio.

Without buckets every image trains at the resolution itself. In every case the image is
resized to cover its bucket and the overhang is cropped (centred, or at random with
``random_crop``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketSettings:
    resolution: Size
    enable_bucket: bool = False
    no_upscale: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


def predefined_buckets(settings: BucketSettings) -> list[Size]:
    """The fixed bucket list (kohya's ``make_bucket_resolutions``)."""
    step = settings.step
    area = settings.max_area
    side = int(math.sqrt(area)) // step * step
    found = {(side, side)}
    low = min(settings.min_reso, side)
    width = low
    while width <= settings.max_reso:
        height = min(settings.max_reso, area // width // step * step)
        if height >= step:
            found.add((width, height))
            found.add((height, width))
        width += step
    return sorted(found)


def choose_bucket(size: Size, settings: BucketSettings, buckets: list[Size] | None = None) -> Size:
    """The training size of an image of ``size``."""
    width, height = size
    if not settings.enable_bucket:
        return settings.resolution
    step = settings.step
    if settings.no_upscale:
        scale = min(1.0, math.sqrt(settings.max_area / (width * height)))
        w, h = width * scale, height * scale
        return (max(step, int(w + 1e-6) // step * step), max(step, int(h + 1e-6) // step * step))
    candidates = buckets if buckets is not None else predefined_buckets(settings)
    ratio = width / height
    return min(candidates, key=lambda b: abs(b[0] / b[1] - ratio))


def resize_for_bucket(size: Size, bucket: Size) -> Size:
    """The size an image is resized to before cropping: it covers the bucket, aspect kept."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    return (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
