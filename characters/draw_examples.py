"""Draw the small stand-in source images of the example characters.

The repository ships these images so that ``charfw build krnk`` works out of the box;
this script is how they were made (run it again to re-create them)::

    python characters/draw_examples.py

They are simple drawings, not art: a head with cat ears turned to the angle of the code
(eyes only where the face is visible), a torso, and for bodies an outfit. What matters
for the examples is that they are real images of the right kinds: krnk's have a
transparent background (the background stage puts them on black), tyank's are opaque
on white (they pass through), sizes fall into the 512 and 768 resolution classes, and
the files are small (palette PNGs).
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SKIN = (250, 222, 205)


def _head(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, hair: tuple[int, int, int],
          h: int, eye: tuple[int, int, int]) -> None:
    # horizontal turn: 0 front ... 4 behind; 5-7 mirror 3-1 (turned the other way)
    turn = h if h <= 4 else 8 - h
    sign = -1 if h > 4 else 1
    shift = sign * math.sin(math.radians(45 * turn)) * r * 0.35
    for ex in (-0.55, 0.55):  # cat ears
        ex_c = cx + ex * r + shift * 0.3
        draw.polygon([(ex_c - 0.35 * r, cy - 0.6 * r), (ex_c + 0.35 * r, cy - 0.6 * r), (ex_c, cy - 1.45 * r)], fill=hair)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=SKIN if turn < 4 else hair)
    if turn < 4:  # hair over the back of the head grows as the head turns away
        draw.pieslice([cx - r, cy - r, cx + r, cy + r], 180 - 40 * turn * sign, 360 + 40 * turn * sign, fill=hair)
        draw.rectangle([cx - r, cy - r * 0.5, cx + r, cy - r * 0.25], fill=hair)  # fringe
    if turn <= 2:  # eyes where the face is visible
        eyes = (-0.38, 0.38) if turn < 2 else (0.38 * sign,)
        for ex in eyes:
            x = cx + ex * r + shift
            draw.ellipse([x - 0.13 * r, cy - 0.05 * r, x + 0.13 * r, cy + 0.25 * r], fill=eye)
        draw.arc([cx - 0.25 * r + shift, cy + 0.3 * r, cx + 0.25 * r + shift, cy + 0.6 * r], 20, 160, fill=(180, 60, 70), width=3)


def face(size: int, v: int, h: int, hair, eye, bg) -> Image.Image:
    im = Image.new("RGBA", (size, size), bg)
    d = ImageDraw.Draw(im)
    s = size / 512
    head_r = (95 if v == 0 else 110 if v == 1 else 85) * s
    head_y = (200 if v == 0 else 215 if v == 1 else 180) * s
    turn = h if h <= 4 else 8 - h
    width = (170 - 25 * min(turn, 2)) * s
    d.polygon([(256 * s - width, 512 * s), (256 * s + width, 512 * s), (256 * s + 60 * s, 300 * s),
               (256 * s - 60 * s, 300 * s)], fill=SKIN)
    _head(d, 256 * s, head_y, head_r, hair, h, eye)
    return im


def body(w: int, h_px: int, v: int, h: int, hair, eye, outfit: dict, bg) -> Image.Image:
    im = Image.new("RGBA", (w, h_px), bg)
    d = ImageDraw.Draw(im)
    cx = w / 2
    top = 110 if v != 2 else 130
    _head(d, cx, top, 58 if v != 1 else 66, hair, h, eye)
    d.polygon([(cx - 70, 190), (cx + 70, 190), (cx + 85, 420), (cx - 85, 420)], fill=outfit["top"])
    d.polygon([(cx - 25, 190), (cx + 25, 190), (cx, 250)], fill=outfit["accent"])
    d.polygon([(cx - 85, 410), (cx + 85, 410), (cx + 120, 540), (cx - 120, 540)], fill=outfit["bottom"])
    for lx in (-40, 40):
        d.rectangle([cx + lx - 18, 540, cx + lx + 18, 730], fill=outfit["legs"])
        d.rectangle([cx + lx - 22, 720, cx + lx + 26, 748], fill=outfit["shoes"])
    return im


def _save(im: Image.Image, path: Path, transparent: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if transparent:
        im.quantize(colors=24, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    else:
        im.convert("RGB").quantize(colors=24).save(path, optimize=True)


def codes(prefix: str, horizontal: list[int], vertical=(0, 1, 2)) -> list[tuple[str, int, int]]:
    return [(f"{prefix}{v}{h}", v, h) for v in vertical for h in horizontal]


def main() -> None:
    clear = (0, 0, 0, 0)
    white = (255, 255, 255, 255)
    krnk = {"hair": (34, 32, 40), "eye": (40, 40, 60)}
    tyank = {"hair": (160, 104, 62), "eye": (90, 150, 60)}
    uniform = {"top": (245, 245, 250), "accent": (200, 30, 40), "bottom": (30, 40, 90),
               "legs": (25, 25, 30), "shoes": (60, 40, 30)}
    plugsuit = {"top": (235, 235, 235), "accent": (220, 60, 40), "bottom": (220, 60, 40),
                "legs": (235, 235, 235), "shoes": (220, 60, 40)}

    for code, v, h in codes("f", [0, 1, 2, 3, 4]):
        size = 640 if code == "f00" else 512  # one larger image: the 768 resolution class
        _save(face(size, v, h, krnk["hair"], krnk["eye"], clear), HERE / "krnk/face" / f"{code}.png", True)
    for code, v, h in [c for c in codes("b", [0, 1, 2, 3, 4]) if c[0] in
                       ("b00", "b01", "b02", "b03", "b04", "b10", "b11", "b20", "b21")]:
        _save(body(384, 768, v, h, krnk["hair"], krnk["eye"], uniform, clear), HERE / "krnk/krnksf" / f"{code}.png", True)
    for code, v, h in codes("f", [0, 1, 2, 3]):
        _save(face(512, v, h, tyank["hair"], tyank["eye"], white), HERE / "tyank/face" / f"{code}.png", False)
    for code, v, h in codes("b", [0, 1, 2, 3]):
        _save(body(384, 768, v, h, tyank["hair"], tyank["eye"], plugsuit, white), HERE / "tyank/tyankps" / f"{code}.png", False)


if __name__ == "__main__":
    main()
