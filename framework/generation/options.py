"""The options every image-making stage takes (the ``sample`` and ``draft`` stages'
plugins subclass :class:`GenerationOptions`): prompt, negative prompt, steps, CFG scale,
sampler, size, seed, which angle codes, and the rules file their prompts come from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from charfw.build.angles import parse_code
from charfw.components import Options
from charfw.errors import CharfwError

if TYPE_CHECKING:
    from charfw.build.angles import AngleCode, AngleSet


class GenerationOptions(Options):
    #: added to each image's prompt (A1111 syntax: quality tags, emphasis)
    prompt: str = ""
    negative: str = ""
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    #: an A1111 or kohya sampler name (``Euler a``, ``DPM++ 2M Karras``, ``euler_a`` …)
    sampler: str = "Euler a"
    #: image size: one number (square) or [width, height], multiples of 8
    size: int | list[int] = 512
    seed: int = Field(0, ge=0, le=2**32 - 1)
    #: the angle codes to draw (default: the part's angle codes)
    codes: list[str] | None = None
    #: the angle-rules file the prompts' angle tags come from (as the tagger's ``rules``)
    rules: str = "tags/angle-rules.yaml"

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        from charfw.generation.samplers import resolve_sampler

        try:
            resolve_sampler(v)
        except CharfwError as exc:
            suggestion = f"; {exc.hint.split('?')[0]}?" if exc.hint and "?" in exc.hint else ""
            raise ValueError(exc.message + suggestion) from None
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | list[int]) -> int | list[int]:
        values = [v] if isinstance(v, int) else v
        if len(values) not in (1, 2):
            raise ValueError("give one size or [width, height]")
        for n in values:
            if n < 32 or n > 4096 or n % 8:
                raise ValueError(f"{n} is not a multiple of 8 between 32 and 4096")
        return v

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = []
        for code in v:
            angle = parse_code(code)
            if angle is None or len(code) != 3:
                raise ValueError(f"'{code}' is not an angle code like f00")
            out.append(angle.code)
        if not out:
            raise ValueError("give at least one code, or leave codes out")
        return out

    @property
    def width_height(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else (self.size[0], self.size[-1])


def check_part_codes(ctx: Any, codes: list[str], stage: str, template: str | None = None) -> list[str]:
    """``codes`` if each is a code of the part's template (or ``template``; symmetric or
    not), else a one-line error naming the first that is not."""
    part = ctx.part
    angle_set = ctx.templates.angle_sets[template or part.template]
    known = angle_set.codes(part.symmetric)
    for code in codes:
        if code not in known:
            raise CharfwError(f"{part.label} {stage}.codes: '{code}' is not a code of the '{angle_set.name}' template "
                              f"({'symmetric' if part.symmetric else 'asymmetric'}: {known[0]} … {known[-1]})")
    return list(codes)


def code_angle(ctx: Any, code: str, stage: str) -> tuple[AngleCode, AngleSet]:
    """An angle code and the angle set it belongs to, or a one-line error."""
    angle = parse_code(code)
    angle_set = ctx.templates.angle_set_for_prefix(angle.prefix) if angle else None
    if angle is None or angle_set is None:
        raise CharfwError(f"{ctx.part.label} {stage}: '{code}' belongs to no angle set")
    return angle, angle_set
