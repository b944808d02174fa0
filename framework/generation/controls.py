"""Control images for ControlNet, one per angle code.

The method generates each angle's training image with ControlNet from a control image
for that code. charfw finds or makes it in one of three ways (``kind``):

``openpose``
    drawn by charfw (:mod:`charfw.generation.openpose`): a standing figure turned and
    tilted as the code says, framed as the angle set's framing. No template images needed.
``file``
    the workspace's own ``templates/controls/<set>/<code>.png`` (the user's hed, openpose,
    canny or depth images, as the seed's ``FaceControlNet/`` folder holds them), used as
    they are (resized to the requested size).
``canny``
    OpenCV's Canny edges of a template picture, ``templates/pictures/<set>/<code>.png``:
    white edges on black, three channels, as canny ControlNets were trained on.

Files are looked up in the workspace's ``templates/`` first, then in charfw's own (see
:class:`charfw.build.template_library.TemplateLibrary`). A missing file is a one-line
error naming the path to create. OpenCV and Pillow are imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from charfw.errors import CharfwError, check_module

if TYPE_CHECKING:
    from PIL import Image

    from charfw.build.angles import AngleSet
    from charfw.build.template_library import TemplateLibrary

ControlKind = Literal["openpose", "file", "canny"]
KINDS: tuple[str, ...] = ("openpose", "file", "canny")
#: OpenCV Canny thresholds A1111's ControlNet extension starts with
CANNY_LOW, CANNY_HIGH = 100, 200


def canny_edges(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """Canny edges of ``image`` (any mode; transparency counts as black) as an RGB image:
    255 on edges, 0 elsewhere, the same in all three channels."""
    check_module("cv2", extra="generate", purpose="canny control images")
    import cv2
    import numpy as np
    from PIL import Image as PILImage

    if not 0 <= low <= high:
        raise CharfwError(f"canny thresholds must satisfy 0 <= low <= high (got {low}, {high})")
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        flat = PILImage.new("RGB", rgba.size, (0, 0, 0))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, low, high)
    return PILImage.fromarray(np.stack([edges] * 3, axis=-1))


def _template_file(templates: TemplateLibrary, folder: str, angle_set: AngleSet, code: str) -> Image.Image:
    from PIL import Image as PILImage

    relpath = f"{folder}/{angle_set.name}/{code}.png"
    try:
        path = templates.find(relpath)
    except CharfwError:
        raise CharfwError(
            f"no {folder[:-1]} image for angle {code}: templates/{relpath} is missing",
            hint=f"put the image at templates/{relpath} in the workspace, or use the openpose control",
        ) from None
    try:
        with PILImage.open(path) as image:
            image.load()
            return image.copy()
    except OSError as exc:
        raise CharfwError(f"cannot read the image ({exc})", path=path, hint="replace it with a PNG") from None


def control_image(
    templates: TemplateLibrary,
    angle_set: AngleSet,
    code: str,
    kind: str,
    size: int | tuple[int, int],
    *,
    low: int = CANNY_LOW,
    high: int = CANNY_HIGH,
    figures: int = 1,
) -> Image.Image:
    """The RGB control image of ``kind`` for one angle ``code`` of ``angle_set``, at ``size``
    (one side, or width and height). ``figures`` > 1 puts that many copies side by side
    (a group's members, each turned as the code says), each in an equal slot of the width,
    centred on black."""
    width, height = (size, size) if isinstance(size, int) else size
    if figures > 1:
        from PIL import Image as PILImage

        slot = width // figures
        if slot < 8:
            raise CharfwError(f"a {width} px wide image has no room for {figures} figures side by side",
                              hint="make the image wider (size: [width, height])")
        one = control_image(templates, angle_set, code, kind, (slot, height), low=low, high=high)
        canvas = PILImage.new("RGB", (width, height))
        margin = (width - slot * figures) // 2
        for i in range(figures):
            canvas.paste(one, (margin + i * slot, 0))
        return canvas
    if kind == "openpose":
        check_module("cv2", extra="generate", purpose="drawing OpenPose control images")
        from charfw.generation.openpose import draw_set

        return draw_set([code], (width, height), angle_set.framing)[code].convert("RGB")
    if kind == "file":
        image = _template_file(templates, "controls", angle_set, code).convert("RGB")
    elif kind == "canny":
        image = canny_edges(_template_file(templates, "pictures", angle_set, code), low, high)
    else:
        raise CharfwError(f"unknown control image kind '{kind}'; kinds: {', '.join(KINDS)}")
    if image.size != (width, height):
        from PIL import Image as PILImage

        # edges and skeletons must stay crisp: no smoothing filter
        image = image.resize((width, height), PILImage.Resampling.NEAREST if kind == "canny"
                             else PILImage.Resampling.LANCZOS)
    return image
