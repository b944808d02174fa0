"""The images that flow between the image stages, and how stages record them.

Each image stage (ingest, background, prepare, tag) turns a list of :class:`ImageItem`
into a new list. An item knows the file that currently holds its pixels, the source file
it came from, its angle code and size, the background colour it sits on, and the tags
given to it so far. Paths are stored relative to the workspace, so a workspace can be
moved or shared without invalidating its build records.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from charfw.build.angles import AngleCode, parse_code


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


def safe_file_stem(text: str) -> str:
    """A stem that is a valid file name everywhere (Windows included); keeps Unicode."""
    cleaned = _UNSAFE.sub("_", text).strip(" .")
    return cleaned or "image"


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
    from charfw.build.images import is_image_name

    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and is_image_name(e.name, suffixes)]
    return [folder / n for n in sorted(names, key=natural_key)]
