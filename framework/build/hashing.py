"""Content hashes and fingerprints, with a stat cache so that unchanged files are not re-read.

A stage is skipped when the fingerprint of everything it depends on (its inputs' content
hashes, its plugin, version and options) equals the one in its record. Hashing every source
image on every build would make a no-op rebuild slow, so :class:`HashCache` remembers each
file's hash under its (size, mtime, inode) and only re-reads files whose stat changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from charfw.build import atomic


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted(_canonical(v) for v in obj)
    if isinstance(obj, Path):
        return obj.as_posix()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    return obj


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-like data (key order does not matter)."""
    text = json.dumps(_canonical(list(parts)), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HashCache:
    """sha256 of files, remembered under their stat signature and saved between runs."""

    VERSION = 1

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text("utf-8"))
                if data.get("version") == self.VERSION:
                    self._entries = data.get("entries", {})
            except (OSError, ValueError):
                self._entries = {}

    @staticmethod
    def _signature(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def sha256(self, path: str | os.PathLike[str]) -> str:
        key = os.path.abspath(path)
        st = os.stat(key)
        sig = self._signature(st)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and hit[:3] == sig:
            return hit[3]
        digest = sha256_file(key)
        with self._lock:
            self._entries[key] = [*sig, digest]
            self._dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        with self._lock:
            # forget files that no longer exist so the cache does not grow forever
            live = {k: v for k, v in self._entries.items() if os.path.exists(k)}
            atomic.write_json(self.path, {"version": self.VERSION, "entries": live})
            self._dirty = False
