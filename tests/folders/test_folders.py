"""charfw tag and charfw toml on folders named by the seed's convention."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from charfw.errors import CharfwError
from charfw.folders import kohya_config
from charfw.folders.convention import expand_folders, parse_folder


def img(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (200, 100, 50) if mode == "RGB" else 128).save(path)
    return path


@pytest.fixture
def seed_tree(tmp_path: Path) -> Path:
    """The seed's LoRAInput layout: 4_krnk/<tags>_<suffix>/ folders of coded images."""
    root = tmp_path / "4_krnk"
    for code in ("f00", "f01", "f12"):
        img(root / "krnk girl_f0512" / f"{code}.png", (512, 512))
    img(root / "krnk girl, choker, ahoge_noflip_f0768" / "f00-close.png", (768, 768))
    img(root / "krnk girl, choker, ahoge_noflip_f0768" / "f21.jpg", (700, 500))
    img(root / "krnk girl_f1024" / "b00.png", (600, 1024))
    (root / "krnk girl_f0512" / "notes.md").write_text("not an image")
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_parse_folder_names() -> None:
    info = parse_folder(Path("x/4_krnk/kuronekomimi girl, shorthair, choker, ahoge_f0768"))
    assert info.keyword == "kuronekomimi" and info.class_tokens == "kuronekomimi girl"
    assert info.caption_tags == ["kuronekomimi", "shorthair", "choker", "ahoge"]
    assert info.repeats == 4 and info.flip is None
    kohya = parse_folder(Path("10_sks woman"))
    assert (kohya.repeats, kohya.keyword, kohya.class_tokens) == (10, "sks", "sks woman")
    assert parse_folder(Path("a_noflip_x")).flip is False and parse_folder(Path("a_x_flip")).flip is True
    with pytest.raises(CharfwError, match="gives no keyword"):
        parse_folder(Path("_f0512"))


def test_folder_repeats_are_bounded(tmp_path: Path) -> None:
    with pytest.raises(CharfwError, match="repeats must be 1 to 1000, not 1000000000000"):
        parse_folder(tmp_path / "1000000000000_krnk" / "krnk girl_f0512")


def test_expand_folders_takes_parents_and_rejects_empty(seed_tree: Path, tmp_path: Path) -> None:
    assert [p.name for p in expand_folders([seed_tree])] == [
        "krnk girl, choker, ahoge_noflip_f0768", "krnk girl_f0512", "krnk girl_f1024"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CharfwError, match="no images here or in its sub-folders"):
        expand_folders([tmp_path / "empty"])


def test_tag_writes_captions_beside_images_and_never_touches_them(seed_tree: Path, run_cli) -> None:
    images = sorted(p for p in seed_tree.rglob("*") if p.suffix in (".png", ".jpg"))
    before = {p: sha(p) for p in images}
    code, out, err = run_cli("tag", seed_tree)
    assert code == 0, err
    assert "wrote 6 caption(s) in 3 folder(s)" in out
    assert {p: sha(p) for p in images} == before
    f00 = (seed_tree / "krnk girl_f0512" / "f00.txt").read_text()
    assert f00.startswith("krnk, white background, black background, simple background, from horizontal, from front, upper body")
    close = (seed_tree / "krnk girl, choker, ahoge_noflip_f0768" / "f00-close.txt").read_text()
    assert close.startswith("krnk, choker, ahoge, white background")
    assert (seed_tree / "krnk girl_f1024" / "b00.txt").read_text().split(", ")[6] == "full body"
    # running again changes nothing
    code, out, _ = run_cli("tag", seed_tree)
    assert "wrote 0 caption(s) in 3 folder(s); 6 unchanged" in out


def test_tag_keeps_edited_captions_unless_overwrite(seed_tree: Path, run_cli) -> None:
    folder = seed_tree / "krnk girl_f0512"
    run_cli("tag", folder)
    (folder / "f01.txt").write_text("my own caption")
    code, out, _ = run_cli("tag", folder)
    assert "kept 1 that differ (use --overwrite to replace them)" in out
    assert (folder / "f01.txt").read_text() == "my own caption"
    code, out, _ = run_cli("tag", folder, "--overwrite")
    assert code == 0 and (folder / "f01.txt").read_text().startswith("krnk, white background")


def test_tag_dry_run_writes_nothing(seed_tree: Path, run_cli) -> None:
    code, out, _ = run_cli("tag", seed_tree, "--dry-run")
    assert code == 0 and "would write 6 caption(s)" in out
    assert "new       " in out and not list(seed_tree.rglob("*.txt"))


def test_tag_reports_bad_names_and_clashing_captions(seed_tree: Path, run_cli) -> None:
    folder = seed_tree / "krnk girl_f0512"
    img(folder / "portrait.png", (64, 64))
    img(folder / "f00.jpg", (64, 64))
    code, out, err = run_cli("tag", folder)
    assert code == 0
    assert "portrait.png: the name does not start with an angle code, so it cannot be tagged (skipped)" in err
    assert "f00.png: has the same name as f00.jpg, so both would share f00.txt (skipped)" in err
    assert "skipped 2 file(s)" in out


def test_tag_warns_about_unusable_images_as_toml_does(seed_tree: Path, run_cli) -> None:
    folder = seed_tree / "krnk girl_f0512"
    (folder / "f14.png").write_bytes(b"")
    (folder / "f23.png").write_text("not an image")
    code, out, err = run_cli("tag", folder)
    assert code == 0
    assert "f14.png: empty file (0 bytes) (skipped)" in err
    assert "f23.png: not an image, or a format Pillow cannot read (skipped)" in err
    assert "skipped 2 file(s)" in out
    assert not (folder / "f14.txt").exists() and not (folder / "f23.txt").exists()
    assert (folder / "f00.txt").is_file()
    _code, _out, toml_err = run_cli("toml", folder, "--dry-run")
    assert "f14.png: empty file" in toml_err and "f23.png: not an image" in toml_err


def test_tag_that_cannot_write_a_caption_says_which_in_one_line(seed_tree: Path, run_cli) -> None:
    blocked = seed_tree / "krnk girl_f1024" / "b00.txt"
    blocked.mkdir()  # a folder where the caption goes
    code, _out, err = run_cli("tag", seed_tree, "--overwrite")
    assert code == 3 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "b00.txt: Is a directory" in err
    assert (seed_tree / "krnk girl_f0512" / "f00.txt").is_file()  # the other folders were written
    assert not [p for p in blocked.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_tag_strict_stops_before_writing_anything(seed_tree: Path, run_cli) -> None:
    img(seed_tree / "krnk girl_f1024" / "portrait.png", (64, 64))
    code, _out, err = run_cli("tag", seed_tree, "--strict")
    assert code == 3
    assert err.strip().startswith("error: ") and "portrait.png" in err and "Traceback" not in err
    assert not list(seed_tree.rglob("*.txt"))


def test_toml_follows_the_seed_rules(seed_tree: Path, run_cli) -> None:
    code, out, err = run_cli("toml", seed_tree)
    assert code == 0, err
    path = seed_tree / "4_krnk.toml"
    assert f"wrote {path}" in out or "wrote" in out
    data = tomllib.loads(path.read_text())
    kohya_config.validate(data)  # sd-scripts' schema: keys at the right level, right types
    assert data["general"] == {
        "caption_extension": ".txt", "color_aug": True, "enable_bucket": True,
        "bucket_no_upscale": True, "shuffle_caption": False, "num_repeats": 4,
    }
    got = [(d["resolution"], d["batch_size"], [(Path(s["image_dir"]).name, s["class_tokens"], s["flip_aug"]) for s in d["subsets"]])
           for d in data["datasets"]]
    assert got == [
        ([512, 512], 2, [("krnk girl_f0512", "krnk girl", True)]),
        ([768, 768], 1, [("krnk girl, choker, ahoge_noflip_f0768", "krnk girl", False)]),
        ([1024, 1024], 1, [("krnk girl_f1024", "krnk girl", True)]),
    ]
    assert Path(data["datasets"][0]["subsets"][0]["image_dir"]).is_absolute()


def test_toml_12gb_table_dry_run_and_output(seed_tree: Path, run_cli, tmp_path: Path) -> None:
    code, out, _ = run_cli("toml", seed_tree / "krnk girl_f0512", seed_tree / "krnk girl, choker, ahoge_noflip_f0768",
                           "--batch-sizes", "12gb", "--dry-run")
    assert code == 0 and not (seed_tree / "4_krnk.toml").exists()
    data = tomllib.loads(out)
    assert [(d["resolution"][0], d["batch_size"]) for d in data["datasets"]] == [(512, 4), (768, 2)]
    code, out, _ = run_cli("toml", seed_tree, "-o", tmp_path / "x.toml", "--relative", cwd=seed_tree)
    subs = tomllib.loads((tmp_path / "x.toml").read_text())["datasets"][0]["subsets"]
    assert subs[0]["image_dir"] == "krnk girl_f0512"


def test_toml_reads_sizes_from_headers_and_reports_bad_files(seed_tree: Path, run_cli) -> None:
    folder = seed_tree / "krnk girl_f0512"
    (folder / "f02.png").write_bytes(b"")
    (folder / "f03.png").write_bytes((folder / "f00.png").read_bytes()[:20])
    code, _out, err = run_cli("toml", folder, "--dry-run")
    assert code == 0
    assert "f02.png: empty file (0 bytes)" in err
    assert "f03.png: truncated or corrupt image data" in err


def test_toml_reads_large_sets_in_worker_processes_with_the_same_result(seed_tree: Path, run_cli,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Above PARALLEL_SIZES_FROM images the headers are read by forked processes in chunks;
    the config and the reported problems are those of the sequential reading, in order."""
    from charfw.folders import convention as folders

    folder = seed_tree / "krnk girl_f0512"
    (folder / "f02.png").write_bytes(b"")
    (folder / "f03.png").write_bytes((folder / "f00.png").read_bytes()[:20])
    code, sequential, err_seq = run_cli("toml", seed_tree, "--dry-run")
    import concurrent.futures

    pools = []

    class CountingPool(concurrent.futures.ProcessPoolExecutor):
        def map(self, fn, *iterables, **kwargs):
            chunks = list(iterables[0])
            pools.append([len(c) for c in chunks])
            return super().map(fn, chunks, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountingPool)
    monkeypatch.setattr(folders, "PARALLEL_SIZES_FROM", 0)
    monkeypatch.setattr(folders, "CHUNK", 2)
    monkeypatch.setattr("charfw.build.stages.jobs_default", lambda: 2)
    code_par, parallel, err_par = run_cli("toml", seed_tree, "--dry-run")
    assert code == code_par == 0
    assert parallel == sequential and "resolution = [1024, 1024]" in parallel
    assert err_par == err_seq and "f02.png: empty file (0 bytes)" in err_par
    assert pools == [[2, 2, 2, 2]]  # 8 images (6 readable), in chunks of 2, in worker processes


def test_toml_unknown_batch_table(seed_tree: Path, run_cli) -> None:
    code, _, err = run_cli("toml", seed_tree, "--batch-sizes", "16gb", "--dry-run")
    assert code == 3 and "unknown batch-size table '16gb'; known: 12gb, default" in err


def test_kohya_schema_rejects_misplaced_keys() -> None:
    with pytest.raises(CharfwError, match=r"datasets\[0\].subsets\[0\].resolution: key not allowed here"):
        kohya_config.validate({"datasets": [{"subsets": [{"image_dir": "a", "resolution": 512}]}]})
    with pytest.raises(CharfwError, match=r"general\.is_reg: key not allowed here"):
        kohya_config.validate({"general": {"is_reg": True}})
    with pytest.raises(CharfwError, match="num_repeats"):
        kohya_config.validate({"general": {"num_repeats": "4"}})
    config = kohya_config.validate({"general": {"num_repeats": 3, "caption_extension": ".txt"},
                                    "datasets": [{"resolution": 512, "subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": 1}]}]})
    a, b = kohya_config.resolve_subsets(config)
    assert (a["num_repeats"], b["num_repeats"], a["caption_extension"], a["batch_size"]) == (3, 1, ".txt", 1)
