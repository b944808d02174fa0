"""``controlnet``: the draft stage. Candidate training images for every angle code, made with
ControlNet from the code's control image, as the method makes its training images
(METHOD.md, "Generating the training images").

For each angle code of the part (or the ``codes`` option), ``candidates`` images with seeds
``seed``, ``seed + 1`` … are made from the code's control image
(:func:`charfw.generation.controls.control_image`: ``openpose`` drawn by charfw, the
workspace's ``file`` under ``templates/controls/``, or ``canny`` edges of
``templates/pictures/``) through the ControlNet ``controlnet`` at ``weight``, guidance
``guidance_start`` → ``guidance_end`` (the method: 0.4–0.6, 0 → 0.3), CFG ``cfg_scale``
(8–14) and optionally a hires-fix pass (``hires: {scale: 1.5, denoise: 0.7}``; the method:
denoising 0.6–0.8).

The prompt of a code, in this order (A1111 syntax; tags joined with ``, ``):

1. the background: ``(black background:1.3), simple background`` (``white`` with
   ``background: white``, for light hair);
2. the framing: ``upper body`` for a face; ``full body, standing, straight standing`` for a body;
3. a face only: ``(nude, completely nude, naked:1.4)`` (nudity until it holds);
4. the tags the ``angle-rules`` file gives the code (the captions' rules, so the drafts are
   prompted as they will be tagged), without their background and framing tags (items 1–2
   say those) and without ``from horizontal`` (not a tag the base model knows);
   ``from above``, ``from below`` and ``from behind`` get the method's emphasis,
   ``(from above:1.3)``; ``from side`` and ``looking away`` (every code but ``?x0``) come
   from the rules as they are;
5. a body only: its face's keyword (the finished face LoRA is applied at ``lora_weight``, so
   the face it learned answers its keyword); the part's own keyword and class tokens are
   left out, since no model knows them before this part is trained;
6. the part's tags (a body's outfit: ``school uniform, serafuku`` …); for a group, each
   member body's keyword followed by its tags (every member's finished body LoRA is
   applied at ``lora_weight``, so each keyword calls up its character in its outfit);
7. the ``prompt`` option: the character's own description (``1girl, short hair, cat ears,
   black choker`` …), written by the user; for a group, the count (``2girls``) and how
   they stand (``side-by-side``).

A group drafts the body codes of its members' angle set (all members share it) with every
member in the picture: the control image holds one figure per member side by side, each
turned as the code says, so a group draft is best made wider than high (``size: [768,
512]``). Group drafts are pictures of the characters together; they are adopted into the
group's own ``images`` folder (see ``charfw adopt``).

``negative`` is the negative prompt. Each candidate is ``<stage dir>/<code>-<k>.png`` with its
infotext (prompt, the face LoRA, the ControlNet unit, the hires fix), and
``contact-sheet.png`` shows one row per code, the candidates side by side, each labelled with
the name ``charfw adopt`` takes (``f00-2``). Candidates of earlier runs are removed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

import charfw
from charfw import CharfwError, StageContext, StageOutput
from charfw.build import atomic
from charfw.build.angles import parse_code
from charfw.build.hashing import sha256_file
from charfw.build.images import save_png as write_png
from charfw.build.manifest import looks_local
from charfw.components import Drafter
from charfw.default_plugins.taggers.angle_rules import load_rules, rule_tags, rules_path
from charfw.generation.options import GenerationOptions, check_part_codes, code_angle

#: the method's emphasis on the view tags
EMPHASIS = {"from above": 1.3, "from below": 1.3, "from behind": 1.3}
#: rule tags the prompt says itself (items 1-2 of the prompt rule) or the base model does not know
DROPPED = {"upper body", "full body", "cowboy shot", "portrait", "standing", "straight standing", "from horizontal",
           "nude", "completely nude"}
NUDE = "(nude, completely nude, naked:1.4)"
#: contact-sheet cells are at least this large (smaller images enlarged, nearest neighbour)
MIN_CELL = 128


class HiresOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: float = Field(1.5, ge=1, le=4)
    denoise: float = Field(0.7, gt=0, le=1)
    steps: int | None = Field(None, ge=1, le=150)


class ControlNetDraftOptions(GenerationOptions):
    """Prompt (the character's own description, after the method's tags), negative,
    steps, CFG, sampler, size, seed (candidate k gets seed + k), codes (a part takes those
    of its own angle set, so one list can name face and body codes) and rules as every
    generation stage takes them, and the ControlNet settings."""

    #: the ControlNet model: a diffusers folder, a .safetensors file, a Hugging Face id
    controlnet: str
    #: where each code's control image comes from: openpose (drawn), file, canny
    control: Literal["openpose", "file", "canny"] = "openpose"
    weight: float = Field(0.5, ge=0, le=2)
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(0.3, gt=0, le=1)
    #: images per code (seeds seed, seed + 1, ...)
    candidates: int = Field(4, ge=1, le=64)
    #: the method's CFG scale is 8-14
    cfg_scale: float = Field(10.0, ge=0, le=30)
    #: a hires-fix pass ({scale: 1.5, denoise: 0.7}); off when not given
    hires: HiresOptions | None = None
    #: black for dark hair, white for light hair
    background: Literal["black", "white"] = "black"
    #: the weight of the LoRAs a draft builds on: a body's face LoRA, a group's member bodies'
    lora_weight: float = Field(1.0, ge=0, le=2)

    @model_validator(mode="after")
    def _range(self) -> ControlNetDraftOptions:
        if self.guidance_start >= self.guidance_end:
            raise ValueError(f"guidance_start {self.guidance_start:g} must be before guidance_end "
                             f"{self.guidance_end:g}")
        return self


# --- prompts ----------------------------------------------------------------------------


def emphasise(tag: str) -> str:
    weight = EMPHASIS.get(tag)
    escaped = tag
    for ch in "\\()[]":
        escaped = escaped.replace(ch, "\\" + ch)
    return f"({escaped}:{weight:g})" if weight else escaped


def draft_template(ctx: StageContext) -> str:
    """The angle set a part drafts: its own, or for a group its member bodies' (one for all)."""
    part = ctx.part
    if part.kind != "group":
        if part.template is None:
            raise CharfwError(f"{part.label} draft: a {part.kind} has no angle template to draft")
        return part.template
    names = sorted({m.template for m in part.members if m.template is not None})
    if len(names) != 1:
        raise CharfwError(f"{part.label} draft: the members' bodies follow different angle templates "
                          f"({', '.join(names) or 'none'}); a group draft turns every member the same way",
                          hint="give the members' bodies one template, or draft them separately")
    return names[0]


def draft_codes(ctx: StageContext, options: ControlNetDraftOptions) -> list[str]:
    part = ctx.part
    template = draft_template(ctx)
    angle_set = ctx.templates.angle_sets[template]
    known = angle_set.codes(part.symmetric)
    if options.codes is None:
        return list(part.angles) if part.kind != "group" else known
    # one list serves the face and the bodies: codes of another angle set are not this part's
    mine = [c for c in options.codes if ctx.templates.angle_set_for_prefix(parse_code(c).prefix) is angle_set]
    if not mine:
        raise CharfwError(f"{part.label} draft.codes: none of {', '.join(options.codes)} is a code of the "
                          f"'{template}' template ({known[0]} … {known[-1]})")
    return check_part_codes(ctx, mine, "draft", template)


def draft_prompt(ctx: StageContext, options: ControlNetDraftOptions, code: str, rules=None) -> str:
    """The generation prompt of one code (the rule in the module docstring)."""
    part = ctx.part
    angle, angle_set = code_angle(ctx, code, "draft")
    if rules is None:
        rules = load_rules(rules_path(ctx, options.rules))
    body = part.kind in ("body", "group")
    items = [f"({options.background} background:1.3)", "simple background"]
    items += ["full body", "standing", "straight standing"] if body else ["upper body", NUDE]
    seen = {"simple background", *DROPPED}
    for tag in rule_tags(rules, angle_set, angle):
        if tag in seen or tag.endswith(" background"):
            continue
        seen.add(tag)
        items.append(emphasise(tag))
    tags = list(part.tags)
    if part.kind == "group":
        tags = [t for m in part.members for t in (m.keyword, *m.tags)] + tags
    elif body:
        face = next((m for m in part.members if m.kind == "face"), None)
        if face is not None:
            tags.insert(0, face.keyword)
    for tag in tags:
        if tag not in seen:
            seen.add(tag)
            items.append(emphasise(tag))
    if options.prompt.strip():
        items.append(options.prompt.strip())
    return ", ".join(items)


# --- the contact sheet ------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def contact_sheet(rows: list[tuple[str, list[tuple[str, Any]]]]) -> Any:
    """One row per code (``(code, [(name, image), ...])``), candidates side by side, each
    labelled with its name under it and the code at the row's left."""
    from PIL import Image, ImageDraw

    side = max([max(im.size) for _, row in rows for _, im in row] or [MIN_CELL])
    cell = side * max(1, -(-MIN_CELL // side))
    pad, caption, label_w = 6, 18, 48
    ncols = max(len(row) for _, row in rows) if rows else 0
    canvas = Image.new("RGB", (label_w + ncols * (cell + pad) + pad, len(rows) * (cell + caption + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for i, (code, row) in enumerate(rows):
        top = pad + i * (cell + caption + pad)
        draw.text((pad, top + cell // 2), code, font=font, fill=(0, 0, 0), anchor="lm")
        for j, (name, image) in enumerate(row):
            left = label_w + j * (cell + pad)
            fit = min(cell / image.width, cell / image.height)
            shown = image.convert("RGB").resize((max(1, round(image.width * fit)), max(1, round(image.height * fit))),
                                                Image.Resampling.NEAREST)
            canvas.paste(shown, (left + (cell - shown.width) // 2, top + (cell - shown.height) // 2))
            draw.text((left + cell // 2, top + cell + caption // 2), name, font=font, fill=(0, 0, 0), anchor="mm")
    return canvas


# --- the component ----------------------------------------------------------------------


class ControlNetDrafter(Drafter):
    name = "controlnet"
    version = "1"
    description = ("candidate training images per angle code, made with ControlNet from the code's control image "
                   "and the method's prompt rules, with a contact sheet for `charfw adopt`")
    Options = ControlNetDraftOptions

    def _angle_set(self, ctx: StageContext):
        return ctx.templates.angle_sets[draft_template(ctx)]

    def check(self, ctx: StageContext, options: ControlNetDraftOptions) -> None:
        from charfw.training.model_sources import check_model_refs

        check_model_refs(ctx.part.model, cache_dir=ctx.cache_dir, workspace_root=ctx.workspace_root,
                         label=ctx.part.label, purpose="draft with")
        codes = draft_codes(ctx, options)
        load_rules(rules_path(ctx, options.rules))
        path = Path(options.controlnet).expanduser()
        if looks_local(options.controlnet) and not path.exists():
            raise CharfwError(f"{ctx.part.label} draft: ControlNet model not found", path=path)
        if options.control != "openpose":
            self._controls(ctx, options, codes[:1])  # a missing file fails before any work

    def _controls(self, ctx: StageContext, options: ControlNetDraftOptions, codes: list[str]) -> dict[str, Any]:
        from charfw.generation.controls import control_image

        figures = len(ctx.part.members) if ctx.part.kind == "group" else 1
        return {code: control_image(ctx.templates, self._angle_set(ctx), code, options.control, options.width_height,
                                    figures=figures)
                for code in codes}

    def cache_key(self, ctx: StageContext, options: ControlNetDraftOptions) -> Any:
        """The base model and VAE, the ControlNet's files, the rules and every control image's
        pixels."""
        from charfw.training.model_sources import model_key_pairs

        pairs: list[Any] = model_key_pairs(ctx.part.model, cache_dir=ctx.cache_dir, sha256=ctx.sha256)
        path = Path(options.controlnet).expanduser()
        if path.is_file():
            pairs.append(["controlnet", sha256_file(path)])
        elif path.is_dir():
            pairs.append(["controlnet", [[p.relative_to(path).as_posix(), sha256_file(p)]
                                         for p in sorted(path.rglob("*")) if p.is_file()]])
        pairs.append(["rules", sha256_file(rules_path(ctx, options.rules))])
        controls = self._controls(ctx, options, draft_codes(ctx, options))
        pairs.append(["controls", {c: hashlib.sha256(im.tobytes()).hexdigest() for c, im in controls.items()}])
        return pairs

    def generator(self, ctx: StageContext):
        """The build's generator for the part's base model (one load per build)."""
        from charfw.generation.pipeline import part_generator

        return part_generator(ctx)

    def run(self, ctx: StageContext, options: ControlNetDraftOptions) -> StageOutput:
        from charfw.generation.infotext import save_png
        from charfw.generation.lora_patch import LoraSpec
        from charfw.generation.pipeline import ControlRequest, HiresFix, ImageRequest

        codes = draft_codes(ctx, options)
        rules = load_rules(rules_path(ctx, options.rules))
        controls = self._controls(ctx, options, codes)
        # the finished LoRAs this part builds on, in the members' order (none for a face)
        loras = tuple(LoraSpec(ctx.path(out.files["lora"]), options.lora_weight)
                      for out in ctx.inputs.values() if "lora" in out.files)
        hires = (HiresFix(options.hires.scale, options.hires.denoise, options.hires.steps)
                 if options.hires is not None else None)
        width, height = options.width_height
        prompts = {code: draft_prompt(ctx, options, code, rules) for code in codes}
        names, requests = [], []
        for code in codes:
            prompt = prompts[code]
            control = ControlRequest(controls[code], options.controlnet, options.weight, options.guidance_start,
                                     options.guidance_end)
            for k in range(options.candidates):
                names.append(f"{code}-{k}")
                requests.append(ImageRequest(
                    prompt=prompt, negative=options.negative, seed=options.seed + k, width=width, height=height,
                    steps=options.steps, cfg_scale=options.cfg_scale, sampler=options.sampler,
                    clip_skip=ctx.part.model.clip_skip, loras=loras, controls=(control,), hires=hires))
        gen = self.generator(ctx)
        written: dict[str, Path] = {}
        images: dict[str, Any] = {}
        with ctx.progress(len(requests), "candidates") as bar:
            for out in gen.generate(requests):
                name = names[out.index]
                path = ctx.stage_dir / f"{name}.png"
                save_png(out.image, path, out.params)
                written[name] = path
                images[name] = out.image
                bar.advance(1)
        sheet = contact_sheet([(code, [(f"{code}-{k}", images[f"{code}-{k}"]) for k in range(options.candidates)])
                               for code in codes])
        sheet_path = ctx.stage_dir / "contact-sheet.png"
        write_png(sheet, sheet_path)
        atomic.remove_others(ctx.stage_dir, [*written.values(), sheet_path], "*.png")
        first = " ".join(f"{code}-0" for code in codes[:3]) + (" …" if len(codes) > 3 else "")
        return StageOutput(
            files={"contact_sheet": ctx.record_path(sheet_path)},
            data={"candidates": {name: ctx.record_path(p) for name, p in written.items()},
                  "prompts": prompts},
            summary=[f"{len(written)} candidates for {len(codes)} codes in {ctx.record_path(ctx.stage_dir)}/ "
                     f"(contact sheet: {sheet_path.name}); adopt with charfw adopt {ctx.part.target} "
                     f"{ctx.part.name} {first}"],
        )


@charfw.hookimpl
def register_drafters(register):
    register(ControlNetDrafter())
