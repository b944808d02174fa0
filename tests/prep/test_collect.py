"""charfw collect against a local HTTP server that imitates Bing's result pages and the images."""

from __future__ import annotations

import html
import io
import json
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from charfw.prep.bing import parse_results, search_url

QUERY = "猫 かわいい イラスト"


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (100, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


class FakeBing:
    """Result pages at /images/async, images at /img/<name>; counts every request."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.results: list[str] = []  # image paths, in result order
        self.hits: Counter[str] = Counter()
        self.searches: list[dict[str, str]] = []
        for i in range(30):
            fmt = ("PNG", "JPEG", "WEBP")[i % 3]
            self.files[f"/img/{i}.{fmt.lower()}"] = (image_bytes((i * 8, 100, 200 - i * 5), fmt), f"image/{fmt.lower()}")
        self.files["/img/copy-of-0.png"] = self.files["/img/0.png"]  # same content, another URL
        self.files["/img/page.jpg"] = (b"<html>not found</html>", "text/html")  # an error page
        self.files["/img/tiny.png"] = (image_bytes((1, 2, 3), size=(10, 10)), "image/png")
        self.files["/img/4.jpg.png"] = (image_bytes((9, 9, 9)), "image/png")  # .jpg inside the URL
        order = ["/img/0.png", "/img/copy-of-0.png", "/img/page.jpg", "/img/missing.png", "/img/tiny.png",
                 "/img/4.jpg.png", "/img/1.jpeg", "/img/1.jpeg"]
        order += [p for p in self.files if p not in order]
        self.results = order

    def page(self, base: str, first: int, count: int) -> str:
        rows = []
        for path in self.results[first : first + count]:
            meta = json.dumps({"murl": base + path, "purl": base + "/page" + path, "t": f"title {path}",
                               "turl": base + "/thumb"})
            rows.append(f'<div class="imgpt"><a class="iusc" style="height:200px" m="{html.escape(meta)}" '
                        f'href="/images/search?view=detailV2">x</a></div>')
        return "<html><body><ul>" + "".join(f"<li>{r}</li>" for r in rows) + "</ul></body></html>"


@pytest.fixture
def bing():
    fake = FakeBing()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            parsed = urllib.parse.urlparse(self.path)
            fake.hits[parsed.path] += 1
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            if parsed.path == "/images/async":
                params = dict(urllib.parse.parse_qsl(parsed.query))
                fake.searches.append(params)
                body = fake.page(base, int(params["first"]), int(params["count"])).encode()
                ctype = "text/html; charset=utf-8"
            elif parsed.path in fake.files:
                body, ctype = fake.files[parsed.path]
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.endpoint = f"http://127.0.0.1:{server.server_address[1]}/images/async"
    yield fake
    server.shutdown()
    server.server_close()


def collect(run_cli, bing, out: Path, n: int, *extra: str):
    return run_cli("collect", "--query", QUERY, "--type", "illustration", "--color", "color", "--max-num", str(n),
                   "--out", out, "--delay", "0", "--endpoint", bing.endpoint, *extra)


def test_collects_with_the_seed_options_and_resumes(tmp_path: Path, run_cli, bing) -> None:
    out = tmp_path / "cats"
    code, stdout, err = collect(run_cli, bing, out, 5)
    assert code == 0, err
    assert bing.searches[0]["q"] == QUERY
    assert bing.searches[0]["qft"] == "+filterui:photo-clipart+filterui:color2-color"
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert files == ["000001.png", "000002.png", "000003.jpg", "000004.webp", "000005.png"]
    assert "saved 5 new image(s)" in stdout and "1 duplicate(s) by content" in stdout
    record = json.loads((out / ".charfw-collect.json").read_text("utf-8"))
    assert record["urls"][bing.endpoint.replace("/images/async", "/img/4.jpg.png")]["file"] == "000002.png"
    statuses = Counter(r["status"] for r in record["urls"].values())
    assert statuses == {"saved": 5, "duplicate": 1, "rejected": 2, "failed": 1}
    # again, asking for more: nothing is fetched twice, and the count goes on
    first_hits = dict(bing.hits)
    code, stdout, err = collect(run_cli, bing, out, 12, "--max_num", "12")
    assert code == 0, err
    assert "saved 7 new image(s)" in stdout and "(12 of 12 for this query)" in stdout
    for path, n in first_hits.items():
        if path.startswith("/img/") and path != "/img/missing.png":  # only the network failure is retried
            assert bing.hits[path] == n, path
    contents = [p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")]
    assert len(contents) == 12 and len(set(contents)) == 12
    # a third run with the same goal does nothing
    code, stdout, _ = collect(run_cli, bing, out, 12)
    assert "saved 0 new image(s)" in stdout


def test_runs_out_of_results_and_unreachable_search(tmp_path: Path, run_cli, bing) -> None:
    code, stdout, err = collect(run_cli, bing, tmp_path / "all", 200)
    assert code == 0, err
    assert "(31 of 200 for this query)" in stdout and "no more results" in stdout
    code, _, err = run_cli("collect", "-q", "x", "-n", "3", "-o", tmp_path / "none", "--delay", "0",
                           "--endpoint", "http://127.0.0.1:9/images/async")
    assert code == 3 and "cannot reach the image search" in err and "Traceback" not in err


def test_result_page_parsing_and_urls() -> None:
    meta = html.escape(json.dumps({"murl": "https://example.org/a%20b.png?x=1&y=2", "purl": "https://p", "t": "猫"}))
    page = (f'<a class="iusc" m="{meta}">1</a><a class="other" m="{meta}">2</a>'
            '<a class="iusc" m="not json">3</a><a class="iusc" m="{&quot;murl&quot;:&quot;data:x&quot;}">4</a>')
    results = parse_results(page)
    assert [(r.url, r.title) for r in results] == [("https://example.org/a%20b.png?x=1&y=2", "猫")]
    url = search_url("https://www.bing.com/images/async", "a&b #c", 35, image_type="photo", color="mono")
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(url).query))
    assert params == {"q": "a&b #c", "first": "35", "count": "35", "mmasync": "1",
                      "qft": "+filterui:photo-photo+filterui:color2-bw"}
