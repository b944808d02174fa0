"""Prompt files for ``charfw generate``: one prompt per line; blank lines and lines
starting with ``#`` are skipped; ``positive|||negative`` (the seeds' format), optionally
followed by kohya's line options `` --n NEG --w W --h H --d SEED --s STEPS --l CFG --ss
SAMPLER`` (parsed by the trainer's sample-prompt parser, the one implementation of that
syntax). The prompts themselves are A1111 syntax (:mod:`charfw.generation.prompts`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charfw.errors import CharfwError, read_text

NEGATIVE_SEPARATOR = "|||"


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a prompt file. ``prompt`` is as written, ``<lora:…>`` tags included
    (the infotext keeps them; :func:`extract_loras` removes them for encoding). An option
    the line does not give is ``None``: the command's own setting applies."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    scale: float | None = None
    sampler: str | None = None
    #: the line's number in its file (1-based; 0 when not from a file)
    line: int = 0

    def options(self) -> dict[str, Any]:
        """The options the line gives (width, height, seed, steps, scale, sampler)."""
        names = ("width", "height", "seed", "steps", "scale", "sampler")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def parse_prompt_line(text: str, *, line: int = 0) -> PromptLine:
    """One line: ``positive|||negative`` and/or kohya's `` --n --w --h --d --s --l --ss``
    options, which come last (``a, b|||lowres --w 512 --d 7``)."""
    from charfw.training.sample_prompts import parse_options

    fields = parse_options(text)
    prompt = fields.pop("prompt")
    if NEGATIVE_SEPARATOR in prompt:
        prompt, negative = prompt.split(NEGATIVE_SEPARATOR, 1)
        if NEGATIVE_SEPARATOR in negative:
            raise CharfwError(f"'{NEGATIVE_SEPARATOR}' appears more than once",
                              hint="write positive|||negative, once per line")
        if "negative" in fields:
            raise CharfwError(f"the negative prompt is given twice ('{NEGATIVE_SEPARATOR}' and --n)",
                              hint="use one of them")
        fields["negative"] = negative.strip()
        prompt = prompt.strip()
    return PromptLine(prompt, **fields, line=line)


def read_prompt_file(path: str | Path) -> list[PromptLine]:
    """The prompts of a prompt file (see the module docstring). A bad line is an error that
    names ``file:line``."""
    path = Path(path)
    text = read_text(path, what="the prompt file", hint="save the prompt file as UTF-8")
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            out.append(parse_prompt_line(stripped, line=number))
        except CharfwError as exc:
            raise CharfwError(exc.message, path=path, line=number, hint=exc.hint) from None
    return out
