"""Near-duplicate removal: pHash as imagehash computes it, vectorised all-pairs search, the copy kept."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from charfw.prep.dedup import close_pairs, group_labels, phashes, to_hex


def picture(seed: int, w: int = 400, h: int = 300) -> Image.Image:
    """A random but smooth picture (blobs), different for each seed."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(20, 90))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


def test_phash_is_imagehash_phash() -> None:
    images = [picture(s, *size) for s, size in enumerate([(400, 300), (1024, 1536), (90, 60), (33, 33)])]
    exact = phashes(images, exact=True)
    fast = phashes(images)
    for im, e, f in zip(images, exact, fast, strict=True):
        ref = str(imagehash.phash(im))
        assert to_hex(e) == ref
        assert imagehash.hex_to_hash(to_hex(f)) - imagehash.hex_to_hash(ref) <= 4  # box-reduced first
        if max(im.size) <= 96:
            assert to_hex(f) == ref  # nothing to reduce: identical
    # transparency: what shows, not the colour stored under alpha 0
    rgba = picture(7).convert("RGBA")
    arr = np.array(rgba)
    arr[:100, :, 3] = 0
    arr[:100, :, :3] = np.random.default_rng(1).integers(0, 255, (100, 400, 3))
    on_white = Image.new("RGB", rgba.size, "white")
    on_white.paste(rgba.convert("RGB"), mask=Image.fromarray(arr).getchannel("A"))
    assert phashes([Image.fromarray(arr)], exact=True)[0] == phashes([on_white], exact=True)[0]


def many_hashes(n: int = 10_000) -> np.ndarray:
    """``n`` random 64-bit hashes with ten copies of hash 0 three bits away (at 5000..5009)."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    hashes[5000:5010] = hashes[0] ^ np.uint64(0b111)
    return hashes


def test_all_pairs_of_10000_hashes_group_the_near_copies() -> None:
    """Correctness only: the time (under a second) is benchmarks/prep_throughput.py's."""
    hashes = many_hashes()
    labels = group_labels(hashes, 8)
    assert (labels[5000:5010] == labels[0]).all()
    assert len(np.unique(labels)) == 10_000 - 10


def test_close_pairs_agree_with_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = rng.integers(0, 64, (300, 5))
    hashes = np.array([base[i % 40] ^ np.uint64(sum(1 << int(b) for b in flips[i][: i % 6])) for i in range(300)],
                      dtype=np.uint64)
    i, j, d = close_pairs(hashes, 6, chunk=37)
    got = {(int(a), int(b)): int(c) for a, b, c in zip(i, j, d, strict=True)}
    want = {}
    for a in range(300):
        for b in range(a + 1, 300):
            dist = bin(int(hashes[a]) ^ int(hashes[b])).count("1")
            if dist <= 6:
                want[(a, b)] = dist
    assert got == want


@pytest.fixture
def collected(tmp_path: Path, bad_inputs) -> Path:
    """A downloads folder: an original, three copies of it, a mirror, others, bad files."""
    src = tmp_path / "downloads"
    bad_inputs(src)
    original = picture(1, 800, 600)
    original.save(src / "b-original.png")
    (src / "b-original.txt").write_text("1girl, cat", "utf-8")
    original.resize((400, 300)).save(src / "a-small.jpg", quality=90)
    original.save(src / "c-same-size.jpg", quality=60)
    original.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "d-mirror.png")
    picture(2).save(src / "e-other.png")
    picture(3).save(src / "f-third.webp")
    return src


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_command_keeps_the_best_copy_and_never_touches_sources(collected: Path, tmp_path: Path, run_cli) -> None:
    before = _digests(collected)
    out = tmp_path / "clean"
    code, stdout, err = run_cli("dedup", collected, "--out", out)
    assert code == 0, err
    assert "broken.png" in err and "skipped 1 file(s)" in stdout
    assert _digests(collected) == before
    kept = sorted(p.name for p in out.iterdir())
    assert "b-original.png" in kept and "b-original.txt" in kept  # largest, PNG; caption comes along
    assert "a-small.jpg" not in kept and "c-same-size.jpg" not in kept
    assert "d-mirror.png" in kept and "e-other.png" in kept and "f-third.webp" in kept
    report = json.loads((out / "dedup-report.json").read_text("utf-8"))
    group = next(g for g in report["groups"] if g["kept"].endswith("b-original.png"))
    assert sorted(Path(d["path"]).name for d in group["duplicates"]) == ["a-small.jpg", "c-same-size.jpg"]
    assert all(d["distance"] <= 6 for d in group["duplicates"])
    code, stdout, _ = run_cli("dedup", collected, "--mirrors", "--report", tmp_path / "r.json")
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text("utf-8"))
    group = next(g for g in report["groups"] if "original" in g["kept"] or "mirror" in g["kept"])
    names = {Path(group["kept"]).name, *(Path(d["path"]).name for d in group["duplicates"])}
    assert names == {"b-original.png", "d-mirror.png", "a-small.jpg", "c-same-size.jpg"}
    code, _, err = run_cli("dedup", collected, "--out", collected)
    assert code == 3 and "source folder" in err


def test_no_images_is_an_error_that_suggests_sub_folders(tmp_path: Path, run_cli) -> None:
    nested = tmp_path / "4_krnk" / "krnk girl_f512"
    nested.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(nested / "f00.png")
    code, _, err = run_cli("dedup", tmp_path / "4_krnk")
    assert code == 3 and err.strip() == f"error: no images in {tmp_path / '4_krnk'}; add -r to look in sub-folders"
    code, out, _ = run_cli("dedup", tmp_path / "4_krnk", "-r")
    assert code == 0 and "1 image(s)" in out
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("cutout", tmp_path / "empty", "-o", tmp_path / "out")
    assert code == 3 and "no images in" in err and ".png" in err and "Traceback" not in err


def test_filter_stage_in_a_build(workspace: Path, run_cli) -> None:
    face = workspace / "characters" / "krnk" / "face"
    shutil.copy(face / "f00.png", face / "f00-copy.png")  # the same picture twice
    small = Image.open(face / "f01.png")
    small.resize((small.width // 2, small.height // 2)).save(face / "f01-small.png")
    manifest = workspace / "characters" / "krnk.yaml"
    text = manifest.read_text("utf-8").replace("stages:\n", "stages:\n  filter: {plugin: dedup, threshold: 6}\n")
    manifest.write_text(text, "utf-8")
    code, _, err = run_cli("-C", workspace, "build", "krnk", "--until", "filter")
    assert code == 0, err
    stage = workspace / "build" / "krnk" / "face" / "filter"
    record = json.loads((stage / "record.json").read_text("utf-8"))
    ids = [i["id"] for i in record["output"]["items"]]
    assert len(ids) == 15 and "f01" in ids and "f01-small" not in ids
    assert ("f00" in ids) != ("f00-copy" in ids)
    report = json.loads((stage / "dedup-report.json").read_text("utf-8"))
    assert report["dropped"] == 2
