"""The report's own files: ``build/<target>/.report/`` (thumbnails, charts, cached facts).

Everything the page shows that costs time to make is kept here under a name derived from
its inputs: a thumbnail is named by the sha256 of the image it shows, a chart or a set of
facts (loss curves read from TensorBoard events, ‖ΔW‖ per block) by the fingerprint of
the records and files it was made from. A rebuild that changed nothing finds them all
and makes none again; files no longer used by the page are removed when it is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from charfw import __version__, console
from charfw.build import atomic
from charfw.build.hashing import fingerprint

#: bump when the facts or charts the report derives change (charfw's version is part of every key too)
REPORT_VERSION = "1"
FOLDER = ".report"
THUMB_PX = 256
FACTS_NAME = "facts.json"


class ReportStore:
    """The ``.report`` folder of one target: thumbnails, charts and a facts cache."""

    def __init__(self, target_dir: Path, jobs: int = 1) -> None:
        self.target_dir = target_dir
        self.dir = target_dir / FOLDER
        self.jobs = max(1, jobs)
        self.used: set[Path] = set()
        #: thumbnails to make: destination → (source, longest side)
        self._thumbs: dict[Path, tuple[Path, int]] = {}
        try:
            self._facts: dict[str, Any] = json.loads((self.dir / FACTS_NAME).read_text("utf-8"))
        except (OSError, ValueError):
            self._facts = {}
        self._new_facts: dict[str, Any] = {}

    def href(self, path: Path) -> str:
        """``path`` relative to the page (which sits in the target's folder)."""
        import os

        return Path(os.path.relpath(path, self.target_dir)).as_posix()

    # --- thumbnails ----------------------------------------------------------------------

    def thumbnail(self, source: Path, sha256: str, size: int = THUMB_PX) -> str | None:
        """The page's link to a JPEG thumbnail of ``source`` (made by :meth:`make_thumbnails`
        unless one for the same content and size exists); None when the file is gone."""
        if not source.is_file():
            return None
        dest = self.dir / "thumbs" / f"{sha256[:24]}-{size}.jpg"
        self.used.add(dest)
        if not dest.is_file():
            self._thumbs[dest] = (source, size)
        return self.href(dest)

    def make_thumbnails(self) -> None:
        todo = list(self._thumbs.items())
        self._thumbs.clear()
        if not todo:
            return
        (self.dir / "thumbs").mkdir(parents=True, exist_ok=True)
        if self.jobs <= 1 or len(todo) < 4:
            for dest, (source, size) in todo:
                _thumbnail(source, dest, size)
            return
        with ThreadPoolExecutor(min(self.jobs, len(todo))) as pool:
            list(pool.map(lambda job: _thumbnail(job[1][0], job[0], job[1][1]), todo))

    # --- facts and charts ----------------------------------------------------------------

    def facts(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``'s JSON result, reused while ``key`` (with the report's version) is
        the same as when it was stored."""
        fp = fingerprint(REPORT_VERSION, __version__, key)
        old = self._facts.get(name)
        if isinstance(old, dict) and old.get("key") == fp:
            value = old["value"]
        else:
            value = compute()
        self._new_facts[name] = {"key": fp, "value": value}
        return value

    def chart(self, name: str, key: Any, draw: Callable[[Path], None]) -> str:
        """The page's link to chart ``name`` (an SVG), drawn by ``draw(dest)`` unless the one
        for the same ``key`` exists."""
        fp = fingerprint(REPORT_VERSION, __version__, key)[:16]
        dest = self.dir / "charts" / f"{name}-{fp}.svg"
        self.used.add(dest)
        if not dest.is_file():
            with atomic.atomic_path(dest) as tmp:
                draw(tmp)
        return self.href(dest)

    def finish(self) -> None:
        """Write the facts cache; remove thumbnails and charts the page no longer uses."""
        self.make_thumbnails()
        if self._new_facts != self._facts:
            atomic.write_text(self.dir / FACTS_NAME, json.dumps(self._new_facts, ensure_ascii=False))
        for sub in ("thumbs", "charts"):
            folder = self.dir / sub
            if folder.is_dir():
                for f in folder.iterdir():
                    if f.is_file() and f not in self.used:
                        f.unlink()


def _thumbnail(source: Path, dest: Path, size: int) -> None:
    """A JPEG of at most ``size`` pixels a side; an unreadable image gets none (the page
    then shows its alt text)."""
    from PIL import Image

    try:
        _write_thumbnail(Image, source, dest, size)
    except OSError as exc:  # PIL's "cannot identify image file" is an OSError too
        console.warn(f"no thumbnail for {source}: {exc}")


def _write_thumbnail(Image: Any, source: Path, dest: Path, size: int) -> None:
    with Image.open(source) as im:
        im.draft("RGB", (size, size))  # JPEG sources decode at a fraction of their size
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        else:
            im = im.convert("RGB")
        # a box reduction first, then bilinear: as sharp as bicubic at this size, twice as fast
        im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        with atomic.atomic_path(dest) as tmp:
            im.save(tmp, "JPEG", quality=85)
