"""The files the LoRA stages (merge, compress) and ``charfw lora`` commands write.

An output keeps its input's name, made ASCII (A1111's and ComfyUI's lists, Windows code
pages), and adds what was done to it: ``-FACE``, ``-BODY`` or ``-lbw<hash>`` for block
weights, ``-sv16``, ``-fro0.95``, ``-cum0.9`` or ``-r32`` for a resize. A stage folder keeps
only the output of its latest settings.

This module imports no torch: the command line imports it when it starts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .rank_rule import plain_number

if TYPE_CHECKING:
    from .rank_rule import RankRule


def output_stem(stem: str) -> str:
    """An input's stem as its outputs' stem: ASCII letters, digits, ``.``, ``_``, ``-``."""
    from ..build.items import safe_file_stem  # pydantic: not needed by `charfw lora info`

    return safe_file_stem(stem, charset="ascii", fallback="lora")


def block_weights_suffix(spec: str | Sequence[float], strength: float) -> str:
    """``-FACE``, ``-BODY``, or ``-lbw<hash>`` for a vector; ``x<strength>`` unless 1; ASCII only."""
    if isinstance(spec, str) and re.fullmatch(r"[A-Za-z0-9._-]+", spec.strip()):
        suffix = f"-{spec.strip()}"
    else:
        text = spec if isinstance(spec, str) else ",".join(f"{v:g}" for v in spec)
        suffix = f"-lbw{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    if strength != 1:
        suffix += f"x{strength:g}"
    return suffix


def rank_rule_suffix(rule: RankRule) -> str:
    """``-sv16``, ``-fro0.95``, ``-cum0.9``, ``-r32`` (``c16`` for another conv rank)."""
    if rule.method == "rank":
        suffix = f"-r{rule.rank}"
        if rule.conv_rank and rule.conv_rank != rule.rank:
            suffix += f"c{rule.conv_rank}"
        return suffix
    short = {"sv_ratio": "sv", "sv_fro": "fro", "sv_cumulative": "cum"}[rule.method]
    return f"-{short}{plain_number(rule.param or 0)}" + (f"-max{rule.rank}" if rule.rank else "")


def remove_other_outputs(folder: Path, keep: Path) -> None:
    """Delete the ``*.safetensors`` in ``folder`` but ``keep``: outputs of earlier runs with
    other settings would be mistaken for the current one."""
    from ..build.atomic import remove_others

    remove_others(folder, [keep], "*.safetensors")


def human_size(n: float) -> str:
    """A file size for a report: ``12.3 MB``, or ``45.6 kB`` below 100 kB."""
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
