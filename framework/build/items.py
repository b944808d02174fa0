"""The images that flow between the image stages, and how stages record them.

Each image stage (ingest, background, prepare, tag) turns a list of :class:`ImageItem`
into a new list. An item knows the file that currently holds its pixels, the source file
it came from, its angle code and size, the background colour it sits on, and the tags
given to it so far. Paths are stored relative to the workspace, so a workspace can be
moved or shared without invalidating its build records.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from charfw.build.angles import AngleCode, parse_code
from charfw.build.images import is_image_name


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: unique within a part; the file stem (``f00-smile2``), plus a variant suffix
    #: (``f00-black``) when a stage makes several images from one
    id: str
    #: the file that holds this item's pixels now (workspace-relative where possible)
    path: str
    #: sha256 of that file
    sha256: str
    #: the source image this item came from (for messages and the summary)
    source: str
    code: str | None = None
    width: int
    height: int
    #: the plain background colour the character stands on, when known
    background: tuple[int, int, int] | None = None
    tags: list[str] = []
    #: free room for plugins (scores, masks, model names); must be JSON-serialisable
    meta: dict[str, Any] = {}

    @property
    def angle(self) -> AngleCode | None:
        return parse_code(self.code) if self.code else None


_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
_NOT_ASCII_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_stem(text: str, *, charset: Literal["unicode", "ascii", "folded"] = "unicode",
                   fallback: str = "image") -> str:
    """A stem that is a valid file name everywhere (Windows included).

    ``charset`` says which characters stay:

    * ``unicode`` (images, dataset folders): all but those Windows forbids, which become ``_``
      one by one; spaces and dots are stripped from the ends.
    * ``ascii`` (what the LoRA tools write): ASCII letters, digits, ``.``, ``_`` and ``-``;
      any other run of characters becomes one ``_``; dots and ``_`` are stripped from the ends.
    * ``folded`` (trained LoRA files, which A1111 must find): as ``ascii`` after folding
      accents (``é`` → ``e``), ``-`` also stripped; a text that was not ASCII gets a short
      hash of itself, so two Japanese names stay different.

    A stem with nothing left is ``fallback`` (``folded``: when no letter or digit is left,
    ``fallback`` and the hash).
    """
    if charset == "unicode":
        return _UNSAFE.sub("_", text).strip(" .") or fallback
    if charset == "ascii":
        return _NOT_ASCII_NAME.sub("_", text).strip("._") or fallback
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    safe = _NOT_ASCII_NAME.sub("_", folded).strip("._-")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if not re.search(r"[A-Za-z0-9]", safe):
        return f"{fallback}-{digest[:8]}"
    if not text.isascii():  # two Japanese names must not fold to the same file
        return f"{safe}-{digest[:6]}"
    return safe


def to_record_path(path: Path, root: Path) -> str:
    """Workspace-relative POSIX path when ``path`` is inside ``root``, else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def from_record_path(text: str, root: Path) -> Path:
    p = Path(text)
    return p if p.is_absolute() else root / p


def natural_key(name: str) -> list[Any]:
    """Sort ``f2`` before ``f10``; case-insensitive."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """Image files directly in ``folder`` (not recursive), in natural order."""

    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and is_image_name(e.name, suffixes)]
    return [folder / n for n in sorted(names, key=natural_key)]
