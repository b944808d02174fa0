"""How many directions a resize keeps: the :class:`RankRule` of ``charfw lora resize``,
``charfw lora merge`` and the ``svd`` compress stage, checked in one place.

kohya's ``resize_lora.py`` chooses each module's rank by a method and its value:
``sv_ratio`` X keeps the singular values above the largest / X (X > 1; at most
:data:`SV_RATIO_MAX`, past which every direction an fp16 file can hold is kept),
``sv_fro`` and ``sv_cumulative`` keep a fraction (0, 1] of the Frobenius norm or of the
sum of singular values; ``rank`` alone is a fixed rank, and with a method the largest one.
A manifest's options and the command line build the same rule, so they accept and refuse
the same values with the same words.

This module imports no torch: manifests are checked with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import CharfwError

METHODS = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")
Method = Literal["rank", "sv_ratio", "sv_fro", "sv_cumulative"]
#: past this, sv_ratio keeps what fp16's 11-bit precision cannot tell from zero anyway
SV_RATIO_MAX = 10_000.0


def check_method_value(method: str, value: float) -> float:
    """The value of a dynamic method, or a :class:`CharfwError` saying what is allowed."""
    if method == "sv_ratio":
        if not 1 < value <= SV_RATIO_MAX:  # NaN fails too
            raise CharfwError(f"sv_ratio must be above 1 and at most {SV_RATIO_MAX:g} (it keeps singular values "
                              f"above the largest / sv_ratio), got {value:g}")
    elif method in ("sv_fro", "sv_cumulative"):
        if not 0 < value <= 1:
            raise CharfwError(f"{method} keeps a fraction: give a value in (0, 1], got {value:g}")
    else:
        raise CharfwError(f"unknown resize method '{method}'; use {', '.join(METHODS)}")
    return value


def check_rank(value: int | None, what: str = "rank") -> int | None:
    if value is not None and value < 1:
        raise CharfwError(f"{what} must be at least 1, got {value}")
    return value


def plain_number(value: float) -> str:
    """A number as a file name shows it: ``16``, ``0.95``, ``0.00001`` (no exponent)."""
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class RankRule:
    """How many directions each module keeps (``resize_lora.py``'s options)."""

    #: "rank" (fixed), "sv_ratio", "sv_fro" or "sv_cumulative"
    method: Method = "sv_ratio"
    #: X of the dynamic methods (ratio to the largest singular value, or kept fraction)
    param: float | None = 16.0
    #: the cap for 2-D factors (kohya ``--new_rank``); None: each module's own rank
    rank: int | None = None
    #: the cap for 4-D factors (kohya ``--new_conv_rank``); None: as ``rank``
    conv_rank: int | None = None
    #: no +1 past the threshold and no padding past a module's real rank (not kohya)
    tight: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CharfwError(f"unknown resize method '{self.method}'; use {', '.join(METHODS)}")
        if self.method == "rank":
            if self.rank is None:
                raise CharfwError("a fixed-rank resize needs a rank")
        elif self.param is None:
            raise CharfwError(f"{self.method} needs a value")
        else:
            check_method_value(self.method, self.param)
        check_rank(self.rank)
        check_rank(self.conv_rank, "conv_rank")

    @classmethod
    def from_options(cls, *, sv_ratio: float | None = None, sv_fro: float | None = None,
                     sv_cumulative: float | None = None, rank: int | None = None, conv_rank: int | None = None,
                     tight: bool = False, default: bool = True) -> RankRule | None:
        """The rule of the ``svd`` stage's and ``charfw lora``'s options: the method given a
        value (they allow one), else a fixed ``rank``, else kohya's ``sv_ratio 16``; None
        instead of that default when ``default`` is false."""
        given = [(m, v) for m, v in (("sv_ratio", sv_ratio), ("sv_fro", sv_fro), ("sv_cumulative", sv_cumulative))
                 if v is not None]
        if len(given) > 1:
            raise CharfwError(f"give one of sv_ratio, sv_fro, sv_cumulative, not {' and '.join(m for m, _ in given)}")
        if given:
            return cls(given[0][0], given[0][1], rank, conv_rank, tight)  # type: ignore[arg-type]
        if rank is not None:
            return cls("rank", None, rank, conv_rank, tight)
        return cls("sv_ratio", 16.0, None, conv_rank, tight) if default else None

    def cap(self, is_4d: bool, own_rank: int | None) -> int:
        cap = (self.conv_rank or self.rank) if is_4d else self.rank
        if cap is None:
            cap = own_rank or 1 << 30
        return cap

    def describe(self) -> str:
        if self.method == "rank":
            conv = f" (conv {self.conv_rank})" if self.conv_rank and self.conv_rank != self.rank else ""
            return f"rank {self.rank}{conv}"
        cap = f", at most {self.rank}" if self.rank else ""
        return f"{self.method} {self.param:g}{cap}" + (" (tight)" if self.tight else "")
