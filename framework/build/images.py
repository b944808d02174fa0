"""Reading images safely: header probes, full decodes with clear errors, colour normalisation.

Two ways in:

* :func:`probe` reads only the header (size, mode, format). It is what ``charfw toml`` and
  the planners use, so sizes of thousands of images are known without decoding them.
* :func:`load` decodes the whole image, applies the EXIF orientation and raises an
  :class:`~charfw.errors.ImageError` with a readable reason for empty, truncated,
  non-image and decompression-bomb files.

:func:`to_rgb_or_rgba` turns whatever Pillow opened (grayscale, palette, 16-bit, CMYK,
float) into 8-bit RGB, or RGBA when the image carries transparency.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from charfw.errors import ImageError
from charfw.build.atomic import atomic_path

#: what kohya sd-scripts reads from a DreamBooth folder (either case)
KOHYA_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
#: what charfw accepts as source images (it always writes PNG)
SOURCE_IMAGE_SUFFIXES = KOHYA_IMAGE_SUFFIXES | {".gif", ".tif", ".tiff", ".avif"}

#: default ceiling against decompression bombs: 64 megapixels (8192 x 8192)
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# charfw checks the pixel count itself, from the header, before anything is decoded
# (probe); Pillow's own global check would warn from worker threads and cannot be set per
# call, so it is switched off here.
Image.MAX_IMAGE_PIXELS = None


def is_image_name(path: str | os.PathLike[str], suffixes: frozenset[str] = SOURCE_IMAGE_SUFFIXES) -> bool:
    base = os.path.basename(os.fspath(path))
    dot = base.rfind(".")
    return dot > 0 and base[dot:].lower() in suffixes


@dataclass(frozen=True)
class ImageInfo:
    """What an image header says."""

    width: int
    height: int
    mode: str
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _reason(exc: BaseException) -> str:
    text = str(exc)
    low = text.lower()
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    if any(s in low for s in ("truncated", "broken data stream", "buffer is not large enough", "premature end")):
        return "truncated or corrupt image data"
    return f"cannot read image ({text or type(exc).__name__})"


def probe(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read the header of an image file; raise :class:`ImageError` when it is unusable."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot open ({exc.strerror or exc})", path=path) from None
    if size == 0:
        raise ImageError("empty file (0 bytes)", path=path, hint="remove it or export it again")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode == "P" and "transparency" in im.info:
                mode = "P-transparent"
            info = ImageInfo(im.width, im.height, mode, im.format or "?")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(_reason(exc), path=path, hint="remove it or export it again") from None
    if info.width < 1 or info.height < 1:
        raise ImageError(f"image has no pixels ({info.width}x{info.height})", path=path)
    if max_pixels is not None and info.pixels > max_pixels:
        raise ImageError(
            f"image is {info.width}x{info.height} ({info.pixels / 1e6:.0f} megapixels), more than "
            f"the {max_pixels / 1e6:.0f} MP limit against decompression bombs",
            path=path,
            hint="downscale it, or raise max_pixels in the ingest options",
        )
    return info


def load(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully, upright (EXIF orientation applied); the first frame of animations."""
    probe(path, max_pixels=max_pixels)
    try:
        with Image.open(path) as im:
            im.seek(0)  # the first frame of an animation
            im.load()
            upright = ImageOps.exif_transpose(im)
            image = im.copy() if upright is None or upright is im else upright
            image.info = dict(im.info)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(_reason(exc), path=path, hint="remove it or export it again") from None
    return image


def has_transparency(image: Image.Image) -> bool:
    """True when the image has an alpha channel that is not fully opaque."""
    if image.mode == "P":
        if "transparency" not in image.info:
            return False
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "RGBa"):
        return False
    lo, _hi = image.getchannel("A").getextrema()
    return lo < 255


def _from_high_bit_depth(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to 8-bit 'L' by scaling, not clipping."""
    import numpy as np

    arr = np.asarray(image)
    if image.mode == "F":
        top = float(arr.max()) if arr.size else 1.0
        scale = 255.0 if top <= 1.0 else (255.0 / 65535.0 if top > 255.0 else 1.0)
        out = np.clip(arr * scale, 0, 255)
    else:
        arr = arr.astype(np.int64)
        top = int(arr.max()) if arr.size else 0
        out = arr / 257.0 if top > 255 else arr
        out = np.clip(out, 0, 255)
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")


def _to_srgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        out_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, src, dst, outputMode=out_mode)
        return converted if converted is not None else image
    except Exception:  # a broken profile must not stop the build; fall back to Pillow's default
        return image


def to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """8-bit RGB, or RGBA when the image has real transparency; colour managed to sRGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _from_high_bit_depth(image)
    image = _to_srgb(image)
    if has_transparency(image):
        return image if image.mode == "RGBA" else image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def composite(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Put an RGBA image on an opaque background colour; RGB images come back unchanged."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    canvas = Image.new("RGBA", image.size, (*color, 255))
    canvas.alpha_composite(image)
    return canvas.convert("RGB")


def border_color(image: Image.Image) -> tuple[int, int, int]:
    """The median colour of the outermost pixels: the background of a plain-background image."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"))
    edge = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    med = np.median(edge, axis=0)
    return (int(med[0]), int(med[1]), int(med[2]))


def save_png(image: Image.Image, dest: Path) -> None:
    """Write a PNG atomically (compress level 6: a good size/speed balance for datasets)."""

    with atomic_path(dest) as tmp:
        image.save(tmp, format="PNG", compress_level=6)
