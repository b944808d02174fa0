"""Atomic file output: everything charfw writes appears complete or not at all.

Files are written to a hidden temporary name in the destination folder and renamed over
the destination (``os.replace`` is atomic on POSIX and Windows). A crash leaves at most a
``.<name>.tmp-<token><suffix>`` file, which :func:`remove_stale_temps` clears and which
kohya's and charfw's image globs never match (hidden, and the real suffix is kept so
libraries that pick a format from the extension still work).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"


def temp_sibling(dest: Path) -> Path:
    """A fresh hidden temporary path next to ``dest`` that keeps its suffix."""
    token = f"{os.getpid()}{secrets.token_hex(3)}"
    return dest.with_name(f".{dest.stem}{TEMP_MARK}{token}{dest.suffix}")


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path; when the block succeeds it is renamed to ``dest``.

    Use it with libraries that write to a path themselves (``PIL.Image.save``,
    ``safetensors.torch.save_file``). On an exception the temporary file is removed and
    ``dest`` is left as it was. ``fsync=True`` flushes the data before the rename, for
    outputs that are expensive to make again (model files).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes(dest: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to a temporary file beside ``dest``, then rename it over ``dest``."""
    if fsync:
        with atomic_path(dest, fsync=True) as tmp:
            tmp.write_bytes(data)
        return Path(dest)
    # the common small-file case (captions, records) without pathlib overhead
    path = os.fspath(dest)
    folder, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}{TEMP_MARK}{os.getpid()}{secrets.token_hex(3)}{suffix}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        os.makedirs(folder or ".", exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(dest)


def write_text(dest: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    return write_bytes(dest, text.encode("utf-8"), fsync=fsync)


def write_json(dest: str | os.PathLike[str], obj: Any, *, fsync: bool = False) -> Path:
    text = json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n"
    return write_text(dest, text, fsync=fsync)


def link_or_copy(src: Path, dest: Path) -> None:
    """Make ``dest`` a hard link to ``src`` (a build output), or a copy where links fail.

    Only use this for files charfw itself wrote: they are never modified in place (every
    write is a rename of a new file), so sharing an inode is safe. Source images are
    always copied (:func:`copy_file`) so that nothing a user edits in the build can reach
    them.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        copy_file(src, dest)


def copy_file(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a whole folder under a temporary name, then swap it in for ``dest``.

    The old folder (if any) is renamed aside and removed only after the new one is in
    place, so an interrupted run leaves either the old or the new folder, never a mix.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if dest.exists():
            old = temp_sibling(dest)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_others(folder: Path, keep: Iterable[Path], pattern: str = "*") -> None:
    """Delete the files in ``folder`` matching ``pattern`` that are not in ``keep``: what an
    earlier run of a stage wrote and the current one did not (it would pass for current)."""
    kept = {Path(p).resolve() for p in keep}
    for entry in folder.glob(pattern):
        if entry.is_file() and entry.resolve() not in kept:
            entry.unlink()


def remove_stale_temps(folder: Path) -> int:
    """Remove temporary files or folders an interrupted write left in ``folder``."""
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if entry.name.startswith(".") and TEMP_MARK in entry.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed += 1
    return removed
