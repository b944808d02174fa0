"""The checks that look at files and pixels: angle coverage, backgrounds, sizes."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from charfw.build.angles import MIRRORS, parse_code
from charfw.components import NAMED_COLORS, Color, Finding, color_name
from charfw.lint import LintConfig, LintInput, finding

BLACK_WHITE: tuple[Color, ...] = ((0, 0, 0), (255, 255, 255))
#: the outermost pixels that make up an image's border
BORDER = 2


# --- angle coverage ----------------------------------------------------------------------


def angles(inp: LintInput, config: LintConfig) -> Iterator[Finding]:
    part = inp.part
    if not inp.sources:
        return
    by_code: dict[str, list[str]] = {}
    for src in inp.sources:
        if src.code is None:
            yield finding("angle-unknown", "the name does not start with an angle code (f00, b12, ...)", file=src.file)
        else:
            by_code.setdefault(src.code, []).append(src.file)
    for code in part.angles:
        if code not in by_code:
            yield finding("angle-missing", f"no image for {code} ({_describe(code)})", code=code)
    for code, files in by_code.items():
        files.sort(key=lambda f: (Path(f).stem.lower() != code, f))  # f00.png first, then f00-smile.png
        for extra in files[1:]:
            names = ", ".join(Path(f).name for f in files)
            yield finding("angle-duplicate", f"{len(files)} images for {code} ({names}): this angle weighs "
                          f"{len(files)}x in training; keep one, or mean it", file=extra, code=code)
        if code in part.angles:
            continue
        angle = parse_code(code)
        if part.symmetric and angle is not None and angle.horizontal in MIRRORS and code in inp.template_codes:
            yield finding("angle-mirror", f"{code} is a mirrored angle, but the character is symmetric: flip "
                          f"augmentation already makes it from {angle.mirrored()}; remove it or set "
                          "symmetric: false", file=files[0], code=code)
        elif code in inp.template_codes:
            yield finding("angle-unknown", f"{code} is not in the part's angle list (exclude/angles in the "
                          "manifest); it trains anyway", file=files[0], code=code)
        else:
            where = f"the '{part.template}' template" if part.template else "any angle template of the part"
            yield finding("angle-unknown", f"{code} is not a code of {where}", file=files[0], code=code)


def _describe(code: str) -> str:
    angle = parse_code(code)
    return angle.describe() if angle is not None else code


# --- backgrounds -------------------------------------------------------------------------


def _pixels(path: Path) -> Any | None:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgba = im.convert("RGBA") if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info else None
            return np.asarray(rgba if rgba is not None else im.convert("RGB"))
    except (OSError, ValueError):
        return None  # the stages that read it already reported it


def border(arr: Any, tolerance: int) -> tuple[Color, float]:
    """The median colour of the top and side edges and the share of their pixels within
    ``tolerance`` of it. The bottom edge is left out: an upper body leaves the frame there."""
    import numpy as np

    rgb = arr[..., :3].astype(np.int16)
    b = BORDER
    edge = np.concatenate([rgb[:b].reshape(-1, 3), rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    med = np.median(edge, axis=0).astype(np.int16)
    close = (np.abs(edge - med).max(axis=1) <= tolerance).mean()
    return (int(med[0]), int(med[1]), int(med[2])), float(close)


def _near(a: Color, b: Color, tolerance: int) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tolerance


def _colour_word(color: Color, tolerance: int) -> str:
    for name, rgb in NAMED_COLORS.items():
        if _near(color, rgb, tolerance):
            return "gray" if name == "grey" else name
    return color_name(color)


#: colour words a "<colour> background" tag may use
COLOR_WORDS = frozenset({"black", "white", "gray", "grey", "red", "blue", "green", "yellow", "pink",
                         "purple", "orange", "brown"})


def claimed_colors(caption: list[str]) -> set[str]:
    """The background colours a caption claims (``white background`` → white)."""
    out = set()
    for tag in caption:
        words = tag.strip().lower().split()
        if len(words) == 2 and words[1] == "background" and words[0] in COLOR_WORDS:
            out.add("gray" if words[0] == "grey" else words[0])
    return out


def backgrounds(inp: LintInput, config: LintConfig) -> Iterator[Finding]:
    import numpy as np

    for src in inp.sources:
        arr = _pixels(src.path)
        if arr is None or arr.shape[-1] != 4:
            continue
        alpha = arr[..., 3]
        semi = float(((alpha >= 16) & (alpha <= 239)).mean())
        if semi > config.semi_transparent_max:
            yield finding("background-semi-transparent", f"{semi:.0%} of the pixels are half transparent (more "
                          f"than {config.semi_transparent_max:.0%}): the background stage blends them into the "
                          "background colour; clean the cut-out's alpha", file=src.file, code=src.code)
    allowed = [*BLACK_WHITE, *inp.background_colors]
    for image in inp.images:
        arr = _pixels(image.path)
        if arr is None:
            continue
        if arr.shape[-1] == 4 and bool((arr[..., 3] < 255).any()):
            arr = arr[..., :3]  # a left-over alpha channel: the trainer drops it too
        color, flat = border(np.asarray(arr), config.color_tolerance)
        if flat < config.border_flat:
            yield finding("background-border", f"the border is not a flat background ({1 - flat:.0%} of its pixels "
                          f"differ from {color_name(color)}): the background stage left a background; cut "
                          "the image out or use a background remover", file=image.file, code=image.code)
            continue
        if not any(_near(color, c, config.color_tolerance) for c in allowed):
            yield finding("background-border", f"the border is a flat {color_name(color)}, not black or white "
                          "(nor a colour of the background stage)", file=image.file, code=image.code)
        claims = claimed_colors(image.caption or [])
        word = _colour_word(color, config.color_tolerance)
        if claims and word not in claims:
            said = " or ".join(sorted(claims))
            yield finding("background-caption", f"the caption says {said} background, but the image's background "
                          f"is {word}", file=image.caption_file or image.file, code=image.code)


# --- sizes -------------------------------------------------------------------------------


def sizes(inp: LintInput, config: LintConfig) -> Iterator[Finding]:
    for image in inp.images:
        res = image.resolution
        longer = max(image.width, image.height)
        if res and longer < res * config.min_size_ratio:
            yield finding("size-upscaled", f"{image.width}x{image.height} is small for its resolution class {res}: "
                          f"it would be upscaled {res / longer:.1f}x (or, with bucket_no_upscale, train at its "
                          "own size); use a larger image", file=image.file, code=image.code)
    ratios = [img.width / max(1, img.height) for img in inp.images]
    if len(ratios) < 2:
        return
    median = statistics.median(ratios)
    for image, ratio in zip(inp.images, ratios, strict=True):
        if max(ratio / median, median / ratio) > config.aspect_factor:
            yield finding("size-aspect", f"aspect ratio {ratio:.2f} ({image.width}x{image.height}) is far from the "
                          f"part's usual {median:.2f}: it trains in a bucket of its own; crop or pad it like the "
                          "others", file=image.file, code=image.code)
