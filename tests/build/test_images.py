"""Reading images safely, colour normalisation, and the square preparer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from charfw.build import images
from charfw.errors import ImageError


def save(path: Path, image: Image.Image, **kw) -> Path:
    image.save(path, **kw)
    return path


def test_probe_reads_headers_only(tmp_path: Path) -> None:
    p = save(tmp_path / "a.png", Image.new("RGB", (300, 200)))
    info = images.probe(p)
    assert (info.width, info.height, info.format) == (300, 200, "PNG")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file (0 bytes); remove it or export it again"),
        (b"this is not an image at all", "not an image, or a format Pillow cannot read; remove it or export it again"),
    ],
)
def test_unusable_files_have_clear_reasons(tmp_path: Path, content: bytes, reason: str) -> None:
    p = tmp_path / "f00.png"
    p.write_bytes(content)
    with pytest.raises(ImageError) as info:
        images.load(p)
    assert str(info.value).endswith(reason) and "f00.png" in str(info.value)


def test_truncated_image(tmp_path: Path) -> None:
    good = save(tmp_path / "g.png", Image.effect_noise((256, 256), 64).convert("RGB"))
    bad = tmp_path / "f00.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated or corrupt image data"):
        images.load(bad)


def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path) -> None:
    p = save(tmp_path / "big.png", Image.new("L", (4000, 3000)))
    with pytest.raises(ImageError, match="12 megapixels\\), more than the 1 MP limit"):
        images.probe(p, max_pixels=1_000_000)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    p = save(tmp_path / "g16.png", Image.fromarray(arr))
    out = images.to_rgb_or_rgba(images.load(p))
    got = np.asarray(out)
    assert out.mode == "RGB" and got.max() == 255 and got.min() == 0
    assert abs(int(got[32, 32, 0]) - round(arr[32, 32] / 257)) <= 1  # mid-grey stays mid-grey


def test_palette_with_transparency_becomes_rgba(tmp_path: Path) -> None:
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (8, 8, 24, 24))
    p = save(tmp_path / "p.png", im.quantize(colors=4, method=Image.Quantize.FASTOCTREE))
    assert Image.open(p).mode == "P"
    out = images.to_rgb_or_rgba(images.load(p))
    assert out.mode == "RGBA" and out.getpixel((0, 0))[3] == 0 and out.getpixel((16, 16)) == (255, 0, 0, 255)


def test_opaque_alpha_is_dropped_and_cmyk_converted(tmp_path: Path) -> None:
    opaque = save(tmp_path / "o.png", Image.new("RGBA", (8, 8), (10, 20, 30, 255)))
    assert images.to_rgb_or_rgba(images.load(opaque)).mode == "RGB"
    cmyk = save(tmp_path / "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    out = images.to_rgb_or_rgba(images.load(cmyk))
    assert out.mode == "RGB" and out.getpixel((4, 4))[0] > 200 and out.getpixel((4, 4))[1] < 50
    la = save(tmp_path / "la.png", Image.new("LA", (8, 8), (100, 0)))
    assert images.to_rgb_or_rgba(images.load(la)).mode == "RGBA"


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    p = tmp_path / "r.jpg"
    im.save(p, exif=exif.tobytes())
    assert images.load(p).size == (20, 40)


def test_first_frame_of_an_animation(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert images.to_rgb_or_rgba(images.load(p)).getpixel((0, 0))[0] > 200


def test_composite_and_border_colour() -> None:
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (3, 3, 7, 7))
    flat = images.composite(im, (255, 255, 255))
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255) and flat.getpixel((5, 5)) == (0, 0, 255)
    assert images.border_color(flat) == (255, 255, 255)


# --- the square preparer ------------------------------------------------------------------


def prepare(image: Image.Image, background=None, **options) -> Image.Image:
    from charfw.build.items import ImageItem
    from charfw.plugins import load_plugins

    prep = load_plugins(None).registry.get("preparer", "square")
    item = ImageItem(id="f00", path="f00.png", sha256="", source="f00.png", width=image.width,
                     height=image.height, background=background)
    return prep.prepare(None, prep.Options(**options), image, item)


def test_pad_keeps_size_classes_and_never_upscales() -> None:
    assert prepare(Image.new("RGB", (300, 200))).size == (300, 300)
    assert prepare(Image.new("RGB", (700, 500))).size == (700, 700)
    assert prepare(Image.new("RGB", (2000, 1000))).size == (1024, 1024)
    assert prepare(Image.new("RGB", (300, 200)), size=512).size == (512, 512)
    big = prepare(Image.new("RGB", (300, 200), (255, 0, 0)), size=512)
    assert big.getpixel((256, 256)) == (255, 0, 0) and big.getpixel((0, 0)) == (255, 0, 0)  # border colour pad
    assert prepare(Image.new("RGB", (300, 200)), upscale=True).size == (512, 512)
    assert prepare(Image.new("RGB", (600, 200)), upscale=True).size == (768, 768)


def test_pad_colour_is_the_background_stage_colour() -> None:
    im = Image.new("RGB", (100, 50), (0, 0, 0))
    out = prepare(im, background=(255, 255, 255))
    assert out.getpixel((50, 0)) == (255, 255, 255) and out.getpixel((50, 50)) == (0, 0, 0)
    assert prepare(im, pad_color="#ff0000").getpixel((50, 0)) == (255, 0, 0)


def test_crop_and_keep_modes() -> None:
    im = Image.new("RGB", (900, 600))
    assert prepare(im, mode="crop").size == (600, 600)
    assert prepare(im, mode="crop", size=512).size == (512, 512)
    assert prepare(im, mode="keep").size == (900, 600)
    assert prepare(Image.new("RGB", (2048, 1024)), mode="keep").size == (1024, 512)


def test_transparent_input_is_put_on_the_pad_colour() -> None:
    im = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    out = prepare(im, pad_color="black")
    assert out.mode == "RGB" and out.getpixel((10, 5)) == (0, 0, 0)


def test_png_bytes_are_deterministic() -> None:
    a, b = io.BytesIO(), io.BytesIO()
    im = Image.new("RGB", (16, 16), (1, 2, 3))
    im.save(a, format="PNG", compress_level=6)
    im.save(b, format="PNG", compress_level=6)
    assert a.getvalue() == b.getvalue()
