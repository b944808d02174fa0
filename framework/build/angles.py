"""Angle codes (``f00`` … ``b27``) and the angle sets that say which codes a part needs.

A training image's file name starts with a letter and two digits. The letter picks the
angle set (``f`` face, ``b`` body, or a user's own set); the first digit is the vertical
view (0 level, 1 from above, 2 from below); the second the horizontal turn in 45° steps
counter-clockwise (0 front, 1 front three-quarter, 2 side, 3 rear three-quarter,
4 behind; 5, 6, 7 mirror 3, 2, 1 for asymmetric characters). Anything after the three
characters is free text: ``f00-smile2.png`` is another ``f00`` image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

CODE_RE = re.compile(r"^([A-Za-z])([0-2])([0-7])")
#: asymmetric horizontal codes and the symmetric code each mirrors
MIRRORS = {5: 3, 6: 2, 7: 1}
VERTICAL_NAMES = {0: "level", 1: "from above", 2: "from below"}
HORIZONTAL_NAMES = {
    0: "front",
    1: "front three-quarter",
    2: "side",
    3: "rear three-quarter",
    4: "behind",
    5: "rear three-quarter (mirrored)",
    6: "side (mirrored)",
    7: "front three-quarter (mirrored)",
}


@dataclass(frozen=True, order=True)
class AngleCode:
    prefix: str
    vertical: int
    horizontal: int

    @property
    def code(self) -> str:
        return f"{self.prefix}{self.vertical}{self.horizontal}"

    @property
    def is_mirror(self) -> bool:
        return self.horizontal in MIRRORS

    def mirrored(self) -> AngleCode:
        """The symmetric code whose rules this code follows (``f16`` → ``f12``)."""
        if not self.is_mirror:
            return self
        return AngleCode(self.prefix, self.vertical, MIRRORS[self.horizontal])

    def describe(self) -> str:
        return f"{VERTICAL_NAMES[self.vertical]}, {HORIZONTAL_NAMES[self.horizontal]}"

    def __str__(self) -> str:
        return self.code


def parse_code(name: str) -> AngleCode | None:
    """The angle code at the start of a file name or stem, or None. Case-insensitive."""
    m = CODE_RE.match(name)
    if not m:
        return None
    return AngleCode(m.group(1).lower(), int(m.group(2)), int(m.group(3)))


_LOOSE_CODE = re.compile(r"^([A-Za-z])(\d)(\d)")


def why_not_a_code(stem: str) -> str:
    """Why a file name gives no angle code, as a user can act on it: a letter and two
    digits whose digits are out of range (``f99``) is told apart from no code at all."""
    m = _LOOSE_CODE.match(stem)
    if m is None:
        return "the name does not start with an angle code (a letter and two digits, like f00)"
    vertical, horizontal = int(m.group(2)), int(m.group(3))
    wrong = []
    if vertical > 2:
        wrong.append(f"its first digit, the vertical view, must be 0 (level), 1 (from above) or 2 (from below), "
                     f"not {vertical}")
    if horizontal > 7:
        wrong.append(f"its second digit, the turn, must be 0 (front) to 4 (behind), or 5-7 (mirrored), "
                     f"not {horizontal}")
    return f"'{m.group(0)}' is not an angle code: " + "; ".join(wrong)


class HorizontalSets(BaseModel):
    model_config = ConfigDict(extra="forbid")
    symmetric: list[int] = Field(default=[0, 1, 2, 3, 4])
    full: list[int] = Field(default=[0, 1, 2, 3, 4, 5, 6, 7])


class AngleSet(BaseModel):
    """One angle template, read from ``templates/angles/<name>.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    prefix: str = Field(min_length=1, max_length=1)
    #: the framing tag the tag rules use for this set ("upper body", "full body")
    framing: str
    description: str = ""
    vertical: list[int] = Field(default=[0, 1, 2])
    horizontal: HorizontalSets = Field(default_factory=HorizontalSets)

    @field_validator("prefix")
    @classmethod
    def _lower(cls, v: str) -> str:
        if not v.isalpha():
            raise ValueError("prefix must be one letter")
        return v.lower()

    def codes(self, symmetric: bool = True) -> list[str]:
        hs = self.horizontal.symmetric if symmetric else self.horizontal.full
        return [f"{self.prefix}{v}{h}" for v in self.vertical for h in hs]
