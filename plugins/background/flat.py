"""``flat``: put images that have transparency on plain colours; others pass through.

The method wants every training image on a plain black or white background. Images
exported with a transparent background (the seed keeps them that way for editing) are
composited onto each colour in ``colors``; with two colours each image becomes two
training images. Images without transparency are used as they are.
"""

from __future__ import annotations

import charfw
from charfw import BackgroundRemover


class FlatBackground(BackgroundRemover):
    name = "flat"
    description = "composite transparent images onto plain colours (black and/or white)"

    def cutout(self, ctx, options, image, item):
        # the engine hands over RGBA only when the image really has transparency
        return image if image.mode == "RGBA" else None


@charfw.hookimpl
def register_background_removers(register):
    register(FlatBackground())
