"""The options every image-making stage takes (the ``sample`` and ``draft`` stages'
plugins subclass :class:`GenerationOptions`): prompt, negative prompt, steps, CFG scale,
sampler, size, seed, which angle codes, and the rules file their prompts come from."""

from __future__ import annotations

from pydantic import Field, field_validator

from charfw.build.angles import parse_code
from charfw.components import Options
from charfw.errors import CharfwError


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
