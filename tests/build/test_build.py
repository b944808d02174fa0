"""charfw build on the example workspace: outputs, incremental rebuilds, bad input, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from charfw.folders import kohya_config

UNTIL = ("--until", "dataset")


def sources(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((ws / "characters").rglob("*")) if p.is_file()}


def stage_status(out: str, part: str, stage: str) -> str:
    """The status column of one stage in the build summary."""
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = line.strip()
        elif current == part and line.strip().startswith(stage + " "):
            rest = line.strip()[len(stage):].strip()
            for status in ("up to date", "not selected", "would run", "ran", "blocked", "off"):
                if rest.startswith(status):
                    return status
    raise AssertionError(f"{part} {stage} not in:\n{out}")


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def built(workspace: Path, run_cli) -> Path:
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0, out + err
    return workspace


def test_build_makes_datasets_and_reports_them(workspace: Path, run_cli) -> None:
    before = sources(workspace)
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0, out + err
    assert sources(workspace) == before  # source folders are never written to
    # the summary names what was made, per part, and where
    assert "15 prepared images (512x512, 640x640) in build/krnk/face/prepare/" in out
    assert "15 captions in build/krnk/face/tag/captions/" in out
    assert "dataset config build/krnk/face/dataset/dataset.toml" in out
    assert "dataset config build/krnk/krnksf/dataset/dataset.toml" in out
    face = workspace / "build/krnk/face/dataset"
    pngs = sorted(face.glob("images/*/*/*.png"))
    assert len(pngs) == 15 and all(p.with_suffix(".txt").is_file() for p in pngs)
    f00 = next(p for p in pngs if p.stem == "f00")
    assert f00.with_suffix(".txt").read_text().startswith("krnk, white background, black background")
    with Image.open(f00) as im:
        assert im.mode == "RGB" and im.size == (640, 640) and im.getpixel((0, 0)) == (0, 0, 0)  # on black
    config = kohya_config.load(face / "dataset.toml")
    assert {(d.resolution, d.batch_size) for d in config.datasets} == {((512, 512), 2), ((768, 768), 1)}
    # the body dataset trains the face images and the body images as separate subsets
    body = tomllib.loads((workspace / "build/krnk/krnksf/dataset/dataset.toml").read_text())
    subsets = [s for d in body["datasets"] for s in d["subsets"]]
    assert sorted(s["class_tokens"] for s in subsets) == ["krnk girl", "krnk girl", "krnksf girl"]
    body_dir = next(Path(s["image_dir"]) for s in subsets if s["class_tokens"] == "krnksf girl")
    assert body_dir.is_dir() and len(list(body_dir.glob("*.png"))) == 9
    assert (body_dir / "b00.txt").read_text().startswith(
        "krnksf, school uniform, serafuku, red neckerchief, pleated skirt, white background")


def test_a_second_build_does_nothing(built: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    records = {p: p.stat().st_mtime_ns for p in built.glob("build/**/record.json")}
    import charfw.build.hashing

    reads = []
    real = charfw.build.hashing.sha256_file
    monkeypatch.setattr(charfw.build.hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    code, out, _ = run_cli("build", "krnk", *UNTIL, cwd=built)
    assert code == 0
    assert "Nothing to do: all 10 stages are up to date" in out
    assert {p: p.stat().st_mtime_ns for p in records} == records
    assert reads == []  # unchanged sources are not even re-read (stat cache)


def test_changing_one_image_redoes_only_what_depends_on_it(built: Path, run_cli) -> None:
    face_bg = built / "build/krnk/face/background"
    before = mtimes(face_bg)
    src = built / "characters/krnk/face/f03.png"
    im = Image.open(src).convert("RGBA")
    ImageDraw.Draw(im).rectangle([10, 10, 60, 60], fill=(255, 0, 0, 255))
    im.save(src)
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=built)
    assert code == 0
    assert "krnk/face: ingest (folder): inputs changed (f03.png)" in err
    for stage in ("ingest", "background", "prepare", "tag", "dataset"):
        assert stage_status(out, "krnk/face", stage) == "ran"
    for stage in ("ingest", "background", "prepare", "tag"):
        assert stage_status(out, "krnk/krnksf", stage) == "up to date"
    assert stage_status(out, "krnk/krnksf", "dataset") == "ran"  # it holds the face images
    after = mtimes(face_bg)
    changed = {n for n in after if before.get(n) != after[n]}
    assert {n.split(".")[0] for n in changed if n.endswith(".png")} == {"f03"}  # one image redone


def test_changing_an_option_reruns_from_that_stage(built: Path, run_cli) -> None:
    manifest = built / "characters/krnk.yaml"
    manifest.write_text(manifest.read_text().replace("colors: [black]", "colors: [black, white]"))
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=built)
    assert code == 0
    assert stage_status(out, "krnk/face", "ingest") == "up to date"
    assert stage_status(out, "krnk/face", "background") == "ran"
    assert "krnk/face: background (flat): options changed" in err
    assert "30 images (30 put on black, white)" in out
    names = {p.stem for p in (built / "build/krnk/face/dataset").glob("images/*/*/*.png")}
    assert {"f00-black", "f00-white"} <= names and len(names) == 30


def test_dry_run_explains_and_writes_nothing(built: Path, run_cli) -> None:
    manifest = built / "characters/krnk.yaml"
    manifest.write_text(manifest.read_text().replace("class_tokens: krnksf girl", "class_tokens: krnksf woman"))
    records = {p: p.stat().st_mtime_ns for p in built.glob("build/**/record.json")}
    code, out, _ = run_cli("build", "krnk", "--dry-run", *UNTIL, cwd=built)
    assert code == 0
    assert "manifest changed (class_tokens)" in out
    assert stage_status(out, "krnk/krnksf", "tag") == "would run"
    assert stage_status(out, "krnk/face", "tag") == "up to date"
    assert "dry run: 2 stage(s) would run" in out
    assert {p: p.stat().st_mtime_ns for p in records} == records


def test_force_only_and_until(built: Path, run_cli) -> None:
    code, out, _ = run_cli("build", "krnk", "--force", *UNTIL, cwd=built)
    assert code == 0 and "10 stage(s) ran" in out
    code, out, _ = run_cli("build", "krnk", "--only", "tag", "--force", cwd=built)
    assert code == 0
    assert stage_status(out, "krnk/face", "tag") == "ran"
    assert stage_status(out, "krnk/face", "prepare") == "not selected"
    assert stage_status(out, "krnk/face", "dataset") == "not selected"


def test_only_needs_earlier_stages(workspace: Path, run_cli) -> None:
    code, _, err = run_cli("build", "krnk", "--only", "dataset", cwd=workspace)
    assert code == 3
    assert "krnk/face: 'dataset' needs the output of 'tag' for krnk/face, which has not been built" in err


def test_one_part_of_a_character_builds_with_what_it_reads(workspace: Path, run_cli) -> None:
    code, out, err = run_cli("build", "krnk/krnksf", "--dry-run", cwd=workspace)
    assert code == 0, out + err
    assert "not asked for: its ingest, background, prepare, tag stage(s) run or are reused because " \
           "krnk/krnksf reads them" in out
    assert out.index("krnk/face") < out.index("krnk/krnksf")  # each part's stages together
    assert stage_status(out, "krnk/krnksf", "train") == "would run"
    with pytest.raises(AssertionError):
        stage_status(out, "krnk/face", "train")  # the face's LoRA is not built for it
    code, out, err = run_cli("build", "krnk/face", "--until", "ingest", cwd=workspace)
    assert code == 0, out + err
    assert "krnk/krnksf" not in out and stage_status(out, "krnk/face", "ingest") == "ran"
    code, _out, err = run_cli("build", "krnk/krnksff", cwd=workspace)
    assert code == 3 and "character 'krnk' has no part 'krnksff'; did you mean 'krnk/krnksf'? its parts: face, " \
        "krnksf" in err
    code, _out, err = run_cli("build", "krnksf_tyankps/face", cwd=workspace)
    assert code == 3 and "'krnksf_tyankps' is a group: it has one part, not 'face'" in err


def test_group_builds_member_images_and_one_dataset(workspace: Path, run_cli) -> None:
    code, out, err = run_cli("build", "krnksf_tyankps", *UNTIL, cwd=workspace)
    assert code == 0, out + err
    data = tomllib.loads((workspace / "build/krnksf_tyankps/group/dataset/dataset.toml").read_text())
    tokens = sorted(s["class_tokens"] for d in data["datasets"] for s in d["subsets"])
    assert tokens == ["krnk girl", "krnk girl", "krnksf girl", "tyank girl", "tyankps girl"]
    # the members' image stages were built, not their own datasets
    assert (workspace / "build/krnk/krnksf/tag/record.json").is_file()
    assert not (workspace / "build/krnk/krnksf/dataset").exists()
    # tyank's images are opaque on white: they pass through the background stage
    assert "12 images (0 put on white)" in out


def test_a_missing_plugin_stops_the_build_and_keeps_the_rest(workspace: Path, run_cli) -> None:
    manifest = workspace / "characters/krnk.yaml"
    manifest.write_text(manifest.read_text() + "  filter: {plugin: no-such-filter}\n")
    code, out, _err = run_cli("build", "krnk", cwd=workspace)
    assert code == 4
    line = next(i for i, t in enumerate(manifest.read_text().splitlines(), 1) if "no-such-filter" in t)
    assert (f"characters/krnk.yaml:{line} stages.filter.plugin: the image filter 'no-such-filter' is not "
            "installed: stopped krnk/face at 'filter', krnk/krnksf at 'filter' there") in out
    assert (workspace / "build/krnk/face/ingest/record.json").is_file()  # the work before it is kept
    assert stage_status(out, "krnk/face", "background") == "blocked"
    assert stage_status(out, "krnk/krnksf", "dataset") == "blocked"


def test_bad_source_files_are_skipped_and_listed(workspace: Path, run_cli) -> None:
    face = workspace / "characters/krnk/face"
    good = (face / "f10.png").read_bytes()
    (face / "f10-empty.png").write_bytes(b"")
    (face / "f11-cut.png").write_bytes(good[: len(good) // 2])
    (face / "f12-text.png").write_text("not an image")
    (face / "portrait.png").write_bytes(good)
    (face / "b00.png").write_bytes(good)
    shutil.copy(face / "f00.png", face / "f00.jpg")
    (face / "f13.png").rename(face / "F13-UPPER.PNG")
    (face / "f14.png").rename(face / "f14 笑顔 1.png")
    Image.new("L", (3000, 3000)).save(face / "f20-huge.png")
    manifest = workspace / "characters/krnk.yaml"
    manifest.write_text(manifest.read_text() + "  ingest: {plugin: folder, max_pixels: 4000000}\n")
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0, out + err
    assert "skipped 7 file(s):" in out
    for reason in (
        "f10-empty.png: empty file (0 bytes)",
        "f11-cut.png: truncated or corrupt image data",
        "f12-text.png: not an image, or a format Pillow cannot read",
        "portrait.png: the name does not start with an angle code",
        "b00.png: b00 is a code of the 'body' template, and krnk/face follows 'face'",
        "f00.jpg: has the same name as f00.png, and both would get the same caption file; f00.png is used",
        "f20-huge.png: image is 3000x3000 (9 megapixels), more than the 4 MP limit",
    ):
        assert reason in out, reason
    names = {p.name for p in (workspace / "build/krnk/face/dataset").glob("images/*/*/*")}
    assert {"F13-UPPER.png", "F13-UPPER.txt", "f14 笑顔 1.png", "f14 笑顔 1.txt"} <= names
    # the skipped files stay listed on a no-op rebuild
    code, out, _ = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert "Nothing to do" in out and "skipped 7 file(s):" in out


def test_ingest_says_what_is_wrong_with_each_odd_file_and_what_to_do(workspace: Path, run_cli) -> None:
    face = workspace / "characters/krnk/face"
    frames = [Image.new("RGB", (128, 128), c) for c in ("red", "blue", "green")]
    frames[0].save(face / "f21-anim.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.new("RGB", (1, 1)).save(face / "f22-dot.png")
    for name in ("f99.png", "x00.png", "b01.png", "f05.png"):
        shutil.copy(face / "f00.png", face / name)
    transparent = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    transparent.save(face / "f10.png")
    transparent.convert("RGB").save(face / "f10.jpg")
    code, out, err = run_cli("build", "krnk/face", "--until", "ingest", cwd=workspace)
    assert code == 0, out + err
    warnings = {line.split(": ", 2)[1].removeprefix("characters/krnk/face/"): line.split(": ", 2)[2]
                for line in err.splitlines() if line.startswith("warning: characters/")}
    assert warnings["f21-anim.gif"] == ("animated (3 frames): only its first frame is used; export the frame you "
                                        "want as a PNG to pick another")
    assert warnings["f22-dot.png"].startswith("is 1x1 pixels, too small to train on (it would be upscaled to the "
                                              "training resolution) (skipped); use an image at least 512 px")
    assert warnings["f99.png"].startswith("'f99' is not an angle code: its first digit, the vertical view, must be "
                                          "0 (level), 1 (from above) or 2 (from below), not 9;")
    assert warnings["x00.png"] == ("'x' starts no template's angle codes (known: b body, f face) (skipped); "
                                   "rename it like f00.png")
    assert warnings["b01.png"] == ("b01 is a code of the 'body' template, and krnk/face follows 'face' (codes "
                                   "f00 …) (skipped); move it to the images folder of a part with template 'body'")
    assert warnings["f05.png"].startswith("f05 (level, rear three-quarter (mirrored)) is a mirrored angle, and krnk "
                                          "is symmetric: flip augmentation already makes it from f03; it is used")
    assert warnings["f10.jpg"] == ("has the same name as f10.png, and both would get the same caption file; "
                                   "f10.png is used (PNG is preferred: lossless, it keeps transparency) (skipped); "
                                   "rename it (e.g. f10-2.jpg) to use both, or remove it")
    assert "skipped 5 file(s):" in out


def test_strict_stops_before_anything_is_written(workspace: Path, run_cli) -> None:
    (workspace / "characters/krnk/face/f10-empty.png").write_bytes(b"")
    code, _out, err = run_cli("build", "krnk", "--strict", cwd=workspace)
    assert code == 3
    assert err.strip().splitlines()[-1] == ("error: characters/krnk/face/f10-empty.png: empty file (0 bytes); "
                                            "remove it or export it again")
    assert not (workspace / "build/krnk").exists()


def test_strict_stops_on_files_an_earlier_build_skipped(workspace: Path, run_cli) -> None:
    """The stage that skipped them is up to date, so it does not run again: its record's
    problems stop the strict build all the same, before anything after it runs."""
    (workspace / "characters/krnk/face/f10-empty.png").write_bytes(b"")
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0 and "f10-empty.png" in out + err
    records = sorted((workspace / "build/krnk").glob("*/*/record.json"))
    before = {p: p.read_bytes() for p in records}
    code, _out, err = run_cli("build", "krnk", "--strict", cwd=workspace)
    assert code == 3
    assert err.strip().splitlines()[-1] == ("error: characters/krnk/face/f10-empty.png: empty file (0 bytes) "
                                            "(skipped by an earlier build); fix or remove it, or build without "
                                            "--strict")
    assert {p: p.read_bytes() for p in records} == before
    assert not (workspace / "build/krnk/face/train").exists()


def test_missing_angles_are_reported(workspace: Path, run_cli) -> None:
    (workspace / "characters/krnk/face/f04.png").unlink()
    (workspace / "characters/krnk/face/f24.png").unlink()
    code, out, _err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0 and "no image for angle(s) f04, f24" in out


def test_missing_images_folder(workspace: Path, run_cli) -> None:
    shutil.rmtree(workspace / "characters/krnk/krnksf")
    code, _, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 3
    assert err.strip() == ("error: characters/krnk/krnksf: the images folder of krnk/krnksf does not exist; "
                           "create it and put the images named by angle code (f00.png, ...) in it")
    assert not (workspace / "build/krnk").exists()  # checked before any stage ran


def test_an_interrupted_build_resumes_where_it_stopped(workspace: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from charfw.default_plugins.prepare.square import SquarePreparer

    real = SquarePreparer.prepare
    calls: list[str] = []

    def interrupt_after_five(self, ctx, options, image, item):
        calls.append(item.id)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(self, ctx, options, image, item)

    monkeypatch.setattr(SquarePreparer, "prepare", interrupt_after_five)
    code, _, err = run_cli("build", "krnk", "-j", "1", *UNTIL, cwd=workspace)
    assert code == 130 and "interrupted; run the same command again to resume" in err
    assert not (workspace / "build/krnk/face/prepare/record.json").exists()
    calls.clear()
    monkeypatch.setattr(SquarePreparer, "prepare", lambda self, *a: calls.append(a[3].id) or real(self, *a))
    code, _out, _ = run_cli("build", "krnk", "-j", "1", *UNTIL, cwd=workspace)
    assert code == 0
    assert len([c for c in calls if c.startswith("f")]) == 10  # the 5 finished images were kept


def test_one_build_at_a_time(workspace: Path, run_cli) -> None:
    lock = workspace / "build/.charfw/build.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getppid()))  # a live process holds it
    code, _, err = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 3 and f"another charfw build is running in this workspace (pid {os.getppid()})" in err
    lock.write_text("999999999")  # a dead process: the lock is taken over
    code, _, _ = run_cli("build", "krnk", *UNTIL, cwd=workspace)
    assert code == 0 and not lock.exists()


def test_records_say_what_a_stage_depended_on(built: Path) -> None:
    record = json.loads((built / "build/krnk/face/ingest/record.json").read_text())
    assert record["stage"] == "ingest" and record["part"] == "krnk/face"
    chain = record["key"]["chain"][0]
    assert chain["component"] == "folder" and chain["options"]["require_codes"] is True
    hashes = dict(chain["cache_key"])
    assert hashes["f00.png"] == hashlib.sha256((built / "characters/krnk/face/f00.png").read_bytes()).hexdigest()
    assert record["plugins"][0]["plugin"] == "charfw.sources.folder" and record["seconds"] >= 0
    assert record["key"]["part"]["images_dir"] == "characters/krnk/face"


def test_moving_the_workspace_rewrites_only_dataset_paths(built: Path, run_cli, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.move(built, moved)
    code, out, err = run_cli("build", "krnk", *UNTIL, cwd=moved)
    assert code == 0
    assert stage_status(out, "krnk/face", "prepare") == "up to date"
    assert stage_status(out, "krnk/face", "dataset") == "ran" and "the workspace moved" in err
    text = (moved / "build/krnk/face/dataset/dataset.toml").read_text()
    assert str(moved) in text and str(built) not in text


def test_lifecycle_order_in_a_real_subprocess(built: Path) -> None:
    import subprocess

    from conftest import charfw_exe

    result = subprocess.run([charfw_exe(), "build", "krnk", *UNTIL], cwd=built, capture_output=True, text=True,
                            env={**os.environ, "CHARFW_PLUGINS": ""})
    assert result.returncode == 0 and "Nothing to do" in result.stdout and not result.stderr.strip()


def test_building_everything_orders_groups_after_their_members(workspace: Path, run_cli) -> None:
    code, out, err = run_cli("build", "--until", "dataset", cwd=workspace)
    assert code == 0, out + err
    parts = [line.strip() for line in out.splitlines() if line and not line.startswith(" ")]
    assert parts[:5] == ["krnk/face", "krnk/krnksf", "tyank/face", "tyank/tyankps", "krnksf_tyankps/group"]
