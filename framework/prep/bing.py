"""Collecting images from Bing image search (the seed's crawl_images.py), resumable and de-duplicated.

Why not icrawler's ``BingImageCrawler`` (0.6.10): its parser keeps only result URLs
ending in ``.jpg`` (PNG and WebP illustrations, the common case for anime art, are
dropped and URLs with ``.jpg`` inside are cut short), the query is pasted into the URL
unencoded, the host is fixed (it cannot be tested without the internet), files are
numbered by download order, so a second run fetches everything again, and it never
compares content. This small client does what the seed asks and those four things:

* the query and Bing's filters (``qft=+filterui:photo-clipart+filterui:color2-color``)
  are URL-encoded; result pages are read for the ``m`` attribute of each result (JSON
  with ``murl``, the image's own URL, ``purl``, the page it is on, and ``t``, its title);
* every URL ever tried and every image's sha256 are kept in ``.charfw-collect.json`` in
  the output folder, so an interrupted or repeated run continues where it stopped,
  never downloads a URL twice and never keeps two files with the same content (files
  already in the folder count too);
* a download is kept only if it decodes as an image (not an HTML error page) of at
  least ``min_side`` pixels; its extension comes from its format, not from the URL;
* results are polite: one result page at a time, a pause between pages, a few parallel
  image downloads, timeouts and a size limit.

Only the standard library is used for HTTP.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from charfw.build import atomic
from charfw.errors import CharfwError

BING_ENDPOINT = "https://www.bing.com/images/async"
USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/126.0 Safari/537.36 charfw-collect")
STATE_FILE = ".charfw-collect.json"
PAGE_SIZE = 35
MAX_BYTES = 40 * 1024 * 1024

#: --type → Bing's filter; "illustration" is what Bing calls clip art
TYPE_FILTERS = {
    "photo": "+filterui:photo-photo",
    "illustration": "+filterui:photo-clipart",
    "clipart": "+filterui:photo-clipart",
    "linedrawing": "+filterui:photo-linedrawing",
    "transparent": "+filterui:photo-transparent",
    "animated": "+filterui:photo-animatedgif",
}
_COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "white", "gray", "black", "brown")
#: --color → Bing's filter
COLOR_FILTERS = {
    "color": "+filterui:color2-color",
    "mono": "+filterui:color2-bw",
    "blackandwhite": "+filterui:color2-bw",
    **{c: f"+filterui:color2-FGcls_{c.upper()}" for c in _COLOURS},
}
FORMAT_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
                   "AVIF": ".avif"}


def search_url(endpoint: str, query: str, first: int, *, image_type: str | None = None,
               color: str | None = None, count: int = PAGE_SIZE) -> str:
    """The URL of one result page (``first`` is the 0-based offset of its first result)."""
    filters = (TYPE_FILTERS[image_type] if image_type else "") + (COLOR_FILTERS[color] if color else "")
    params = {"q": query, "first": str(first), "count": str(count), "mmasync": "1"}
    if filters:
        params["qft"] = filters
    return f"{endpoint}?{urllib.parse.urlencode(params)}"


@dataclass(frozen=True)
class SearchResult:
    url: str
    page: str = ""
    title: str = ""


class _ResultParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[SearchResult] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        meta = values.get("m")
        if tag != "a" or not meta or "iusc" not in (values.get("class") or "").split():
            return
        try:
            data = json.loads(meta)  # attribute values arrive unescaped
        except ValueError:
            return
        url = data.get("murl") if isinstance(data, dict) else None
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            self.found.append(SearchResult(url, str(data.get("purl") or ""), str(data.get("t") or "")))


def parse_results(html: str) -> list[SearchResult]:
    """The image results of a Bing result page, in order."""
    parser = _ResultParser()
    parser.feed(html)
    parser.close()
    return parser.found


# --- state -------------------------------------------------------------------------------


@dataclass
class CollectState:
    """What earlier runs did in this folder (``.charfw-collect.json``)."""

    path: Path
    urls: dict[str, dict[str, Any]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> CollectState:
        path = folder / STATE_FILE
        state = cls(path)
        if path.is_file():
            try:
                data = json.loads(path.read_text("utf-8"))
                state.urls = dict(data.get("urls", {}))
                state.hashes = dict(data.get("hashes", {}))
            except (OSError, ValueError, AttributeError):
                raise CharfwError("the collection record is damaged", path=path,
                                  hint="delete it to start the record afresh (the images stay)") from None
        # files put in the folder by other means count for content de-duplication too
        known = set(state.hashes.values())
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.is_file() and p.suffix.lower() in FORMAT_SUFFIXES.values() and p.name not in known:
                state.hashes[hashlib.sha256(p.read_bytes()).hexdigest()] = p.name
        return state

    def saved(self, query: str | None = None) -> int:
        return sum(1 for r in self.urls.values() if r.get("status") == "saved" and (query is None or r.get("query") == query))

    def save(self) -> None:
        atomic.write_json(self.path, {"version": 1, "urls": self.urls, "hashes": self.hashes})


def _next_index(folder: Path) -> int:
    numbers = [int(p.stem) for p in folder.iterdir() if p.stem.isdigit()] if folder.is_dir() else []
    return max(numbers, default=0) + 1


# --- downloading -------------------------------------------------------------------------


def fetch(url: str, *, timeout: float, max_bytes: int = MAX_BYTES, accept: str = "*/*") -> bytes:
    """GET a URL; ``OSError`` (including ``urllib.error.URLError``) on any failure."""
    if not url.startswith(("http://", "https://")):
        raise OSError(f"not an http(s) URL: {url[:60]}")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": accept,
                                                   "Accept-Language": "ja,en;q=0.8"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"larger than {max_bytes // (1024 * 1024)} MB")
    return data


def identify(data: bytes, min_side: int) -> tuple[str, int, int]:
    """(suffix, width, height) of image bytes; ``ValueError`` saying why they are not usable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            fmt, (w, h) = im.format or "", im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError("not an image") from None
    if fmt not in FORMAT_SUFFIXES:
        raise ValueError(f"unsupported format {fmt or '?'}")
    if min(w, h) < min_side:
        raise ValueError(f"too small ({w}x{h})")
    return FORMAT_SUFFIXES[fmt], w, h


@dataclass
class CollectReport:
    saved: list[str] = field(default_factory=list)
    duplicates: int = 0
    failed: int = 0
    skipped_known: int = 0
    pages: int = 0
    #: saved by earlier runs for the same query
    before: int = 0


def collect(query: str, out: Path, *, max_num: int, image_type: str | None = None, color: str | None = None,
            endpoint: str = BING_ENDPOINT, min_side: int = 64, delay: float = 1.0, workers: int = 4,
            timeout: float = 15.0, max_pages: int | None = None,
            on_saved: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None) -> CollectReport:
    """Download up to ``max_num`` images for ``query`` into ``out`` (counting earlier runs)."""
    if not query.strip():
        raise CharfwError("the query is empty")
    out.mkdir(parents=True, exist_ok=True)
    state = CollectState.load(out)
    report = CollectReport(before=state.saved(query))
    index = [_next_index(out)]
    pages_limit = max_pages if max_pages is not None else max(3, (max_num * 3) // PAGE_SIZE + 3)

    def remaining() -> int:
        return max_num - state.saved(query)

    def download(result: SearchResult) -> tuple[bytes, str, int, int] | Exception:
        try:
            data = fetch(result.url, timeout=timeout, accept="image/*")
            return (data, *identify(data, min_side))
        except (OSError, ValueError) as exc:
            return exc

    def keep(result: SearchResult, got: tuple[bytes, str, int, int] | Exception) -> None:
        """Record one download; saved files are numbered in result order."""
        if isinstance(got, Exception):
            # a network failure is tried again by a later run; unusable content is not
            status = "failed" if isinstance(got, OSError) else "rejected"
            reason = getattr(got, "reason", None) or got
            state.urls[result.url] = {"status": status, "reason": str(reason)[:120], "query": query}
            report.failed += 1
            return
        data, suffix, w, h = got
        digest = hashlib.sha256(data).hexdigest()
        if digest in state.hashes:
            state.urls[result.url] = {"status": "duplicate", "of": state.hashes[digest], "query": query}
            report.duplicates += 1
            return
        name = f"{index[0]:06d}{suffix}"
        index[0] += 1
        atomic.write_bytes(out / name, data)
        state.hashes[digest] = name
        state.urls[result.url] = {"status": "saved", "file": name, "sha256": digest, "size": [w, h],
                                  "page": result.page, "title": result.title, "query": query}
        report.saved.append(name)
        state.save()
        if on_saved is not None:
            on_saved(1)

    first = 0
    empty_pages = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while remaining() > 0 and report.pages < pages_limit:
            if report.pages and delay > 0:
                time.sleep(delay)
            url = search_url(endpoint, query, first, image_type=image_type, color=color)
            try:
                html = fetch(url, timeout=timeout, accept="text/html").decode("utf-8", "replace")
            except OSError as exc:
                reason = getattr(exc, "reason", None) or exc
                if report.pages == 0 and not report.saved:
                    raise CharfwError(f"cannot reach the image search ({reason})",
                                      hint="check the network connection and try again; the run resumes") from None
                if log:
                    log(f"result page {first // PAGE_SIZE + 1} failed ({reason}); stopping here")
                break
            report.pages += 1
            results = parse_results(html)
            unique = list({r.url: r for r in results}.values())
            new = [r for r in unique if state.urls.get(r.url, {}).get("status", "failed") == "failed"]
            report.skipped_known += len(results) - len(new)
            empty_pages = empty_pages + 1 if not new else 0
            if not results or empty_pages >= 2:
                break  # the end of the results, or only what earlier pages gave
            for start in range(0, len(new), max(1, workers)):
                window = new[start : start + min(max(1, workers), remaining())]
                if not window:
                    break
                for result, got in zip(window, pool.map(download, window), strict=True):
                    if remaining() > 0:
                        keep(result, got)
            first += len(results)
    state.save()
    return report
