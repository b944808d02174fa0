"""``angle-grid``: the sample stage. The finished LoRA draws every angle code of its part.

After ``compress``, each angle code of the part's template gets one image, prompted with
the caption the ``angle-rules`` tagger writes for an image of that code (keyword, the
part's tags, the rule tags, in order: the prompt the LoRA was trained to answer), then
the ``prompt`` option (quality tags, say). All images share one seed, so the cells differ
by angle only. A last row renders the front code (``f00``/``b00``, else the first code)
at each of ``weights`` (default 0, 0.5, 1), so the LoRA's effect is visible against the
base model. A group has no angle template: it renders its members' keywords (plus
``prompt``) at the weights row only.

Written to ``build/<char>/<part>/sample/``: ``<code>.png`` per code, ``weight-<w>.png``
per weight, each with A1111's ``parameters`` infotext, and ``grid.png``: rows level /
from above / from below, columns front → behind (and 225°–315° for asymmetric parts),
an empty cell for a code without an image, then the weights row. Cells smaller than
128 px are enlarged (nearest neighbour) in the grid only.

The engine re-runs the stage when the LoRA, the options, the part, the base model or the
rules file change (the last two through :meth:`AngleGrid.cache_key`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

import charfw
from charfw import CharfwError, Sampler, StageContext, StageOutput
from charfw.build import atomic
from charfw.build.angles import VERTICAL_NAMES, parse_code
from charfw.build.hashing import sha256_file
from charfw.build.images import save_png as write_png
from charfw.build.stages import merge_tags
from charfw.default_plugins.taggers.angle_rules import load_rules, rule_tags, rules_path
from charfw.generation.options import GenerationOptions, check_part_codes, code_angle

#: column labels by horizontal digit (45° steps counter-clockwise)
COLUMN_LABELS = {0: "front", 1: "45°", 2: "side", 3: "135°", 4: "behind", 5: "225°", 6: "270°", 7: "315°"}
#: the grid is made of cells at least this large (smaller images are enlarged, NEAREST)
MIN_CELL = 128
WEIGHTS_LABEL = "LoRA weight"


class AngleGridOptions(GenerationOptions):
    """Prompt, negative, steps, CFG, sampler, size, codes and rules as every generation
    stage takes them; ``prompt`` is added after each code's caption, and ``seed`` is one
    seed for every image, so that the cells differ by angle only."""

    #: the LoRA weights of the last row (front code)
    weights: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=1, max_length=16)
    #: images per generator call
    batch_size: int = Field(1, ge=1, le=64)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        for w in v:
            if not math.isfinite(w) or abs(w) > 10:
                raise ValueError(f"weight {w} is not a number between -10 and 10")
        if len(set(v)) != len(v):
            raise ValueError("a weight is given twice")
        return v


# --- what to draw -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One image of the sample: an angle code's cell, or a weight of the weights row."""

    #: the file stem: ``f00``, ``weight-0.5``
    name: str
    prompt: str
    weight: float
    code: str | None = None


def weight_text(weight: float) -> str:
    return f"{weight:g}"


def escape_tag(tag: str) -> str:
    """A caption tag as A1111 prompt text: brackets and backslashes are literal."""
    for ch in "\\()[]":
        tag = tag.replace(ch, "\\" + ch)
    return tag


def join_prompt(tags: list[str], extra: str) -> str:
    text = ", ".join(escape_tag(t) for t in tags)
    extra = extra.strip()
    return f"{text}, {extra}" if text and extra else (text or extra)


def part_codes(ctx: StageContext, options: AngleGridOptions) -> list[str]:
    """The codes to draw, checked against the part's template (one-line errors)."""
    part = ctx.part
    if part.template is None:
        if options.codes:
            raise CharfwError(f"{part.label} sample.codes: a {part.kind} has no angle template; "
                              "leave codes out (it renders the weights row only)")
        return []
    if options.codes is None:
        return list(part.angles)
    return check_part_codes(ctx, options.codes, "sample")


def code_prompt(ctx: StageContext, options: AngleGridOptions, code: str, rules=None) -> str:
    """The prompt for one angle code: the angle-rules caption of an image of that code,
    then the ``prompt`` option."""
    part = ctx.part
    angle, angle_set = code_angle(ctx, code, "sample")
    if rules is None:
        rules = load_rules(rules_path(ctx, options.rules))
    tags = merge_tags([], [part.keyword, *part.tags, *rule_tags(rules, angle_set, angle)])
    return join_prompt(tags, options.prompt)


def group_prompt(ctx: StageContext, options: AngleGridOptions) -> str:
    """A group's prompt: its members' keywords (what its captions start with), then ``prompt``."""
    keywords = merge_tags([], [m.keyword for m in ctx.part.members] or [ctx.part.keyword])
    return join_prompt(keywords, options.prompt)


def front_code(codes: list[str]) -> str:
    for code in codes:
        angle = parse_code(code)
        if angle and angle.vertical == 0 and angle.horizontal == 0:
            return code
    return codes[0]


def plan_shots(ctx: StageContext, options: AngleGridOptions) -> tuple[list[Shot], list[Shot]]:
    """The angle cells and the weights row."""
    codes = part_codes(ctx, options)
    if codes:
        rules = load_rules(rules_path(ctx, options.rules))
        cells = [Shot(code, code_prompt(ctx, options, code, rules), 1.0, code) for code in codes]
        front = front_code(codes)
        weight_prompt = next(c.prompt for c in cells if c.code == front)
    else:
        cells, front, weight_prompt = [], None, group_prompt(ctx, options)
    row = [Shot(f"weight-{weight_text(w)}", weight_prompt, float(w), front) for w in options.weights]
    return cells, row


# --- the grid ---------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class GridLayout:
    """Where things are in a grid image (for tests and for people reading the code)."""

    size: tuple[int, int]
    cell: int
    #: (left, top, right, bottom) of each cell's picture area, by shot name; empty cells by code
    cells: dict[str, tuple[int, int, int, int]]
    #: the centre of each column label and each row label, by text
    column_labels: dict[str, tuple[int, int]]
    row_labels: dict[str, tuple[int, int]]
    #: the codes whose cell is empty (no image)
    empty: list[str]


def grid_shape(template_codes: list[str]) -> tuple[list[int], list[int]]:
    """The rows (vertical digits) and columns (horizontal digits) of a template's codes."""
    angles = [a for a in (parse_code(c) for c in template_codes) if a is not None]
    return sorted({a.vertical for a in angles}), sorted({a.horizontal for a in angles})


def draw_grid(template_codes: list[str], images: dict[str, Any], weight_row: list[tuple[str, Any]]) -> tuple[Any, GridLayout]:
    """The sample grid: a header of column labels, one row per vertical digit of
    ``template_codes`` (a cell per code, empty when ``images`` has none for it), then the
    weights row (``(label, image)`` pairs). Returns the image and its layout."""
    from PIL import Image, ImageDraw

    rows, cols = grid_shape(template_codes)
    prefix = parse_code(template_codes[0]).prefix if template_codes else ""
    pictures = [im for im in images.values()] + [im for _, im in weight_row]
    side = max([max(im.size) for im in pictures] or [MIN_CELL])
    scale = max(1, math.ceil(MIN_CELL / side))
    cell = side * scale
    pad, caption = 6, 18
    font, small = _font(14), _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(text: str, f) -> int:
        box = probe.textbbox((0, 0), text, font=f)
        return box[2] - box[0]

    row_names = [VERTICAL_NAMES.get(v, f"v{v}") for v in rows] + [WEIGHTS_LABEL]
    label_w = max(text_w(t, font) for t in row_names) + 2 * pad
    header = 24 if rows else 0
    ncols = max(len(cols), len(weight_row))
    pitch_x, pitch_y = cell + pad, cell + caption + pad
    nrows = len(rows) + 1
    width = label_w + ncols * pitch_x + pad
    height = header + nrows * pitch_y + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    layout = GridLayout((width, height), cell, {}, {}, {}, [])

    def put(image, x: int, y: int) -> None:
        image = image.convert("RGB")
        if image.size != (cell, cell):
            fit = min(cell / image.width, cell / image.height)
            image = image.resize((max(1, round(image.width * fit)), max(1, round(image.height * fit))),
                                 Image.Resampling.NEAREST)
        canvas.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))

    def centred(text: str, cx: int, cy: int, f, fill=(0, 0, 0)) -> None:
        draw.text((cx, cy), text, font=f, fill=fill, anchor="mm")

    for j, h in enumerate(cols):
        cx, cy = label_w + j * pitch_x + cell // 2, header // 2
        label = COLUMN_LABELS.get(h, str(h))
        centred(label, cx, cy, font)
        layout.column_labels[label] = (cx, cy)
    for i, v in enumerate([*rows, None]):
        top = header + i * pitch_y
        label = WEIGHTS_LABEL if v is None else row_names[i]
        ly = top + cell // 2
        draw.text((pad, ly), label, font=font, fill=(0, 0, 0), anchor="lm")
        layout.row_labels[label] = (pad + text_w(label, font) // 2, ly)
        if v is None:
            for j, (label_text, im) in enumerate(weight_row):
                x = label_w + j * pitch_x
                put(im, x, top)
                layout.cells[f"weight {label_text}"] = (x, top, x + cell, top + cell)
                centred(f"weight {label_text}", x + cell // 2, top + cell + caption // 2, small)
            continue
        for j, h in enumerate(cols):
            code = f"{prefix}{v}{h}"
            if code not in template_codes:
                continue
            x = label_w + j * pitch_x
            layout.cells[code] = (x, top, x + cell, top + cell)
            if code in images:
                put(images[code], x, top)
                centred(code, x + cell // 2, top + cell + caption // 2, small)
            else:
                draw.rectangle((x, top, x + cell - 1, top + cell - 1), fill=(232, 232, 232), outline=(200, 200, 200))
                centred(f"{code}: no image", x + cell // 2, top + cell // 2, small, fill=(140, 140, 140))
                layout.empty.append(code)
    return canvas, layout


# --- the component ----------------------------------------------------------------------


class AngleGrid(Sampler):
    name = "angle-grid"
    version = "1"
    description = ("the finished LoRA draws every angle code with its angle-rules caption, as the template grid, "
                   "plus a row of LoRA weights (0, 0.5, 1)")
    Options = AngleGridOptions

    def check(self, ctx: StageContext, options: AngleGridOptions) -> None:
        from charfw.training.model_sources import check_model_refs

        check_model_refs(ctx.part.model, cache_dir=ctx.cache_dir, workspace_root=ctx.workspace_root,
                         label=ctx.part.label, purpose="sample with")
        part_codes(ctx, options)
        if ctx.part.template is not None:
            load_rules(rules_path(ctx, options.rules))

    def cache_key(self, ctx: StageContext, options: AngleGridOptions) -> Any:
        """The base model's and VAE's content, the rules file and the angle sets."""
        from charfw.training.model_sources import model_key_pairs

        pairs: list[Any] = model_key_pairs(ctx.part.model, cache_dir=ctx.cache_dir, sha256=ctx.sha256)
        if ctx.part.template is not None:
            pairs.append(["rules", sha256_file(rules_path(ctx, options.rules))])
            pairs.append(["angle set", ctx.templates.angle_sets[ctx.part.template].model_dump()])
        return pairs

    def generator(self, ctx: StageContext):
        """The build's generator for the part's base model (one load per build)."""
        from charfw.generation.pipeline import part_generator

        return part_generator(ctx)

    def run(self, ctx: StageContext, options: AngleGridOptions) -> StageOutput:
        from charfw.generation.infotext import save_png
        from charfw.generation.lora_patch import LoraSpec
        from charfw.generation.pipeline import ImageRequest

        lora = ctx.input_file("lora")
        cells, row = plan_shots(ctx, options)
        width, height = options.width_height

        def request(shot: Shot) -> ImageRequest:
            return ImageRequest(prompt=shot.prompt, negative=options.negative, seed=options.seed, width=width,
                                height=height, steps=options.steps, cfg_scale=options.cfg_scale,
                                sampler=options.sampler, clip_skip=ctx.part.model.clip_skip,
                                loras=(LoraSpec(lora, shot.weight),))

        # the front cell and the weight-1 image are the same request: made once
        shots = cells + row
        unique: dict[tuple[str, float], int] = {}
        todo: list[Shot] = []
        for shot in shots:
            if (shot.prompt, shot.weight) not in unique:
                unique[(shot.prompt, shot.weight)] = len(todo)
                todo.append(shot)
        gen = self.generator(ctx)
        made: dict[int, Any] = {}
        with ctx.progress(len(todo), "images") as bar:
            for out in gen.generate([request(s) for s in todo], batch_size=options.batch_size):
                made[out.index] = out
                bar.advance(1)
        written: dict[str, Path] = {}
        for shot in shots:
            out = made[unique[(shot.prompt, shot.weight)]]
            path = ctx.stage_dir / f"{shot.name}.png"
            save_png(out.image, path, out.params)
            written[shot.name] = path
        images = {s.code: made[unique[(s.prompt, s.weight)]].image for s in cells}
        template_codes = (ctx.templates.angle_sets[ctx.part.template].codes(ctx.part.symmetric)
                          if ctx.part.template else [])
        grid, layout = draw_grid(template_codes, images,
                                 [(weight_text(s.weight), made[unique[(s.prompt, s.weight)]].image) for s in row])
        grid_path = ctx.stage_dir / "grid.png"
        write_png(grid, grid_path)
        atomic.remove_others(ctx.stage_dir, [*written.values(), grid_path], "*.png")
        return StageOutput(
            files={"grid": ctx.record_path(grid_path)},
            data={"images": {name: ctx.record_path(p) for name, p in written.items()},
                  "prompts": {s.name: s.prompt for s in shots}, "empty": layout.empty},
            summary=[f"{ctx.record_path(grid_path)}: {len(cells)} angles and {len(row)} LoRA weights "
                     f"({len(todo)} images at {width}x{height}, {options.steps} steps)"],
        )


@charfw.hookimpl
def register_samplers(register):
    register(AngleGrid())
