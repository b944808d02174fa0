"""The build report: build/<target>/report.html and build/index.html after every build.

The page is checked twice: its HTML after a quick build (the angle sheet's cells, the
index, what is reused), and in a real browser (Debian's Chromium driven by playwright)
after a build that trains: no console errors, every image loads, one cell per template
code with the missing ones marked, the charts drawn.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

UNTIL = ("--until", "dataset")
CELL = re.compile(r'<td class="cell (\w+)" data-code="(\w+)">')



@pytest.fixture(autouse=True)
def report_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests build with the report on (the suite's environment turns it off)."""
    monkeypatch.setenv("CHARFW_REPORT", "1")


def cells(html: str, template: str) -> dict[str, str]:
    """code → state of the angle sheet of one template (the part's table)."""
    start = html.index(f'data-template="{template}"')
    table = html[start:html.index("</table>", start)]
    return {code: state for state, code in CELL.findall(table)}


def edit_face(ws: Path) -> None:
    """f12 missing, a second f00 (a duplicate), f05 (outside the symmetric template)."""
    face = ws / "characters/krnk/face"
    (face / "f12.png").unlink()
    shutil.copy(face / "f00.png", face / "f00-smile2.png")
    shutil.copy(face / "f03.png", face / "f05.png")


def test_build_writes_the_report_and_the_index(workspace: Path, run_cli) -> None:
    edit_face(workspace)
    manifest = workspace / "characters/krnk.yaml"
    manifest.write_text(manifest.read_text("utf-8").replace("colors: [black]", "colors: [black, white]"))
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0, out + err
    assert "report: build/krnk/report.html" in out  # the summary names the page
    html = (workspace / "build/krnk/report.html").read_text("utf-8")
    face = cells(html, "face")
    # one cell per code of the symmetric face template, f12 marked missing
    assert list(face) == [f"f{v}{h}" for v in range(3) for h in range(5)]
    assert face["f12"] == "missing" and sum(s == "ok" for s in face.values()) == 14
    # both backgrounds of an image, side by side, named
    f01 = html[html.index('data-code="f01"'):]
    f01 = f01[:f01.index("</td>")]
    assert f01.count("<img ") == 2 and "<figcaption>black</figcaption>" in f01 and "<figcaption>white</figcaption>" in f01
    body = cells(html, "body")
    assert len(body) == 15 and {c for c, s in body.items() if s == "excluded"} == {"b12", "b13", "b14", "b22", "b23", "b24"}
    assert "<code>f00</code>: f00-smile2.png, f00.png" in html  # the duplicate
    outside = html[html.index('class="thumbs outside"'):]
    assert "<code>f05</code> f05.png" in outside[:outside.index("</div>")]
    # captions: the tags every image shares once, each image's own under it
    assert "In every caption: krnk, white background" in html
    assert "from horizontal, from front" in html
    # the dataset: images × repeats, steps per epoch, the TOML
    assert "<b>32</b><span>images</span>" in html and "<b>128</b><span>images × repeats per epoch</span>" in html
    assert "steps per epoch" in html and "[[datasets.subsets]]" in html
    assert "The train stage has not run for this part." in html
    # thumbnails beside the page, one per prepared image
    thumbs = re.findall(r'src="(\.report/thumbs/[^"]+)"', html)
    assert len(thumbs) == 2 * (16 + 9) and all((workspace / "build/krnk" / t).is_file() for t in thumbs)
    # the index links the report and lists the characters not built yet
    index = (workspace / "build/index.html").read_text("utf-8")
    assert 'href="krnk/report.html"' in index
    assert 'data-name="tyank"' in index and "charfw build tyank" in index
    assert 'data-name="krnksf_tyankps"' in index


def test_a_rebuild_reuses_thumbnails_and_redoes_what_changed(workspace: Path, run_cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0, out + err
    folder = workspace / "build/krnk/.report/thumbs"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    code, out, _ = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert "Nothing to do" in out and "report: build/krnk/report.html" in out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    html = (workspace / "build/krnk/report.html").read_text("utf-8")
    assert "reused" in html and "not built" not in html.split('class="card stages-card"')[1][:200]
    # a changed source image: its thumbnail is made again, the old one goes
    source = workspace / "characters/krnk/face/f01.png"
    with Image.open(source) as im:
        im.rotate(90).save(source)
    code, out, _ = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(after) == len(before) and len(set(after) - set(before)) == 1
    assert all(after[n] == t for n, t in before.items() if n in after)
    # charfw report writes it again from build/, keeping what the last build did, and opens it
    (workspace / "build/krnk/report.html").unlink()
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    code, out, _ = run_cli("report", "krnk", "--open", cwd=workspace)
    assert code == 0 and "wrote build/krnk/report.html" in out
    assert "ran" in (workspace / "build/krnk/report.html").read_text("utf-8")
    assert opened == [(workspace / "build/krnk/report.html").resolve().as_uri()]


def test_a_group_report_shows_its_members(workspace: Path, run_cli) -> None:
    code, out, err = run_cli("build", "krnksf_tyankps", *UNTIL, cwd=workspace)
    assert code == 0, out + err
    assert "report: build/krnksf_tyankps/report.html" in out
    html = (workspace / "build/krnksf_tyankps/report.html").read_text("utf-8")
    members = html[html.index('class="thumbs members"'):]
    members = members[:members.index("</div>")]
    assert members.count("<figure>") == 2 and "krnk/krnksf" in members and "tyank/tyankps" in members
    assert 'data-template=' not in html  # a group has no angle template
    assert "<b>48</b><span>images</span>" in html  # both members' faces and bodies
    index = (workspace / "build/index.html").read_text("utf-8")
    card = index[index.index('data-name="krnksf_tyankps"'):]
    assert 'src="krnksf_tyankps/.report/thumbs/' in card[:card.index("</h2>")]
    # a broken template of the workspace's own: the build warns, charfw report is one line
    own = workspace / "templates/report/report.html.j2"
    own.parent.mkdir(parents=True)
    own.write_text("<html>\n{% if page.name %}\n</html>\n")
    code, out, err = run_cli("build", "krnksf_tyankps", *UNTIL, cwd=workspace)
    assert code == 0 and "the build report was not written" in err and "report.html.j2:3" in err
    code, out, err = run_cli("report", "krnksf_tyankps", cwd=workspace)
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail("the report's browser test needs Chromium: apt-get install chromium (CI installs it)")


def test_the_report_of_a_trained_build_in_a_browser(workspace: Path, run_cli) -> None:
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    edit_face(workspace)
    manifest = workspace / "characters/krnk.yaml"
    # samples during training: one prompt at steps 2 and 4
    (workspace / "prompts.txt").write_text("krnk, smile --w 64 --h 64 --s 4 --d 1\n")
    manifest.write_text(manifest.read_text("utf-8") + "  train: {plugin: lora, max_train_steps: 4, resolution: 64, "
                        "sample_prompts: prompts.txt, sample_every_n_steps: 2}\n")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads on a busy machine
    try:
        code, out, err = run_cli("build", "krnk", cwd=workspace)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, out + err
    page_path = workspace / "build/krnk/report.html"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth])")
            sheets = page.evaluate("""[...document.querySelectorAll('table.sheet')].map(t => ({
                template: t.dataset.template, cells: +t.dataset.cells,
                codes: [...t.querySelectorAll('td.cell')].map(c => c.dataset.code),
                missing: [...t.querySelectorAll('td.cell.missing')].map(c => c.dataset.code)}))""")
            charts = page.evaluate("[...document.querySelectorAll('img.chart')].map(i => [i.getAttribute('src'), i.naturalWidth])")
            samples = page.evaluate("[...document.querySelectorAll('.training-card figcaption')].map(f => f.textContent)")
            page.screenshot(path=str(workspace / "build/krnk/report.png"), full_page=True)
            page.goto((workspace / "build/index.html").as_uri(), wait_until="load")
            index_images = page.evaluate("[...document.images].map(i => i.naturalWidth)")
        finally:
            browser.close()
    assert errors == []
    assert images and all(width > 0 for _, width in images), [src for src, w in images if not w]
    face, body = sheets
    assert face["template"] == "face" and face["codes"] == [f"f{v}{h}" for v in range(3) for h in range(5)]
    assert face["cells"] == 15 and face["missing"] == ["f12"]
    assert body["template"] == "body" and len(body["codes"]) == 15 and body["missing"] == []
    # per part: the training curves, ‖ΔW‖ per block with the merge vector, ranks after compression
    names = [Path(src).name.rsplit("-", 1)[0] for src, _ in charts]
    assert names == ["face-training", "face-lora", "krnksf-training", "krnksf-lora"]
    assert all(width > 0 for _, width in charts)
    training = (page_path.parent / charts[0][0]).read_text("utf-8")
    assert all(word in training for word in ("Loss", "smoothed", "Learning rate", "unet", "textencoder"))
    lora = (page_path.parent / charts[1][0]).read_text("utf-8")
    assert all(word in lora for word in ("merge vector", "IN01", "OUT11", "block-merged", "compressed",
                                         "median rank", "kept"))
    assert index_images and all(w > 0 for w in index_images)
    assert [s.split(" · ")[0] for s in samples] == ["step 2", "step 4"] * 2  # face, then body
    with Image.open(workspace / "build/krnk/report.png") as shot:
        assert shot.width == 1280 and shot.height > 3000
    # a no-op rebuild draws no chart again
    folder = workspace / "build/krnk/.report/charts"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    code, out, _ = run_cli("build", "krnk", cwd=workspace)
    assert "Nothing to do" in out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_charfw_report_0_builds_without_the_page_and_charfw_report_writes_it(workspace: Path, run_cli,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARFW_REPORT", "0")
    code, out, err = run_cli("build", "krnk", "--until", "tag", cwd=workspace)
    assert code == 0, out + err
    assert not (workspace / "build/krnk/report.html").exists() and "report:" not in out + err
    code, out, err = run_cli("report", "krnk", cwd=workspace)
    assert code == 0, out + err
    assert (workspace / "build/krnk/report.html").is_file()
