"""Caption tools: a common tag (idempotent), Japanese copies from the dictionary, tag counts."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from charfw.folders.tag_text import (
    danbooru_to_caption,
    escape_a1111,
    split_caption,
    tag_key,
    unescape_a1111,
)


def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "4_krnk" / "krnk girl_flip_face"
    folder.mkdir(parents=True)
    captions = {
        "f00": "krnk, white background, from front, smile, cat ears",
        "f01": "krnk, white background, from side, blush",
        "f02": "krnk, style x, white background, long_hair, unknown thing",
    }
    for stem, text in captions.items():
        Image.new("RGB", (8, 8)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(text, "utf-8")
    return folder


def test_add_is_idempotent_and_never_touches_images(tmp_path: Path, run_cli) -> None:
    folder = dataset(tmp_path)
    image = (folder / "f00.png").read_bytes()
    code, out, err = run_cli("tags", "add", tmp_path / "4_krnk", "--tag", "style x")
    assert code == 0, err
    assert "changed 2 caption(s); 1 already had style x" in out
    assert (folder / "f00.txt").read_text("utf-8") == "style x, krnk, white background, from front, smile, cat ears"
    assert (folder / "f02.txt").read_text("utf-8").startswith("krnk, style x,")  # already there: not moved
    code, out, _ = run_cli("tags", "add", tmp_path / "4_krnk", "--tag", "Style_X", "--tag", "extra", "--last")
    assert "changed 3 caption(s)" in out
    assert (folder / "f00.txt").read_text("utf-8").endswith("cat ears, extra")
    assert (folder / "f00.txt").read_text("utf-8").count("style x") == 1
    code, out, _ = run_cli("tags", "add", tmp_path / "4_krnk", "--tag", "extra")
    assert "changed 0 caption(s)" in out
    assert (folder / "f00.png").read_bytes() == image
    code, _, err = run_cli("tags", "add", folder, "--tag", "a, b")
    assert code == 3 and "is not one tag" in err


def test_add_refuses_manifest_source_folders(workspace: Path, run_cli) -> None:
    code, _, err = run_cli("-C", workspace, "tags", "add", workspace / "characters" / "krnk" / "face", "-t", "x")
    assert code == 3 and "the build makes those captions" in err and "common-tag" in err


def test_common_tag_tagger_in_a_build(workspace: Path, run_cli) -> None:
    manifest = workspace / "characters" / "krnk.yaml"
    chain = "  tag: [angle-rules, {plugin: common-tag, tags: [style x]}]\n"
    manifest.write_text(manifest.read_text("utf-8").replace("  tag: angle-rules\n", chain), "utf-8")
    code, _, err = run_cli("-C", workspace, "build", "krnk", "--until", "tag")
    assert code == 0, err
    caption = (workspace / "build" / "krnk" / "face" / "tag" / "captions" / "f00.txt").read_text("utf-8")
    assert caption.startswith("krnk, ") and caption.endswith(", blush, style x")
    source = sorted((workspace / "characters" / "krnk" / "face").iterdir())
    assert all(p.suffix == ".png" for p in source)  # nothing written into the sources


def test_common_tag_without_tags_is_one_line(tmp_path: Path, run_cli) -> None:
    folder = dataset(tmp_path)
    code, _, err = run_cli("tag", folder, "--tagger", "common-tag")
    assert code == 3 and "common-tag needs the tags to add" in err and "Traceback" not in err


def test_translate_with_a_workspace_dictionary(tmp_path: Path, run_cli) -> None:
    folder = dataset(tmp_path)
    (tmp_path / "templates" / "tags").mkdir(parents=True)
    (tmp_path / "templates" / "tags" / "ja.yaml").write_text("tags:\n  unknown thing: 謎の物\n  krnk: くろねこみみ\n", "utf-8")
    code, out, err = run_cli("-C", tmp_path, "tags", "translate", folder)
    assert code == 0, err
    assert (folder / "f00_jp.txt").read_text("utf-8") == "くろねこみみ, 白背景, 正面から, 笑顔, 猫耳"
    assert (folder / "f02_jp.txt").read_text("utf-8") == "くろねこみみ, style x, 白背景, 長い髪, 謎の物"
    assert "style x (1)" in out
    code, out, _ = run_cli("-C", tmp_path, "tags", "translate", folder)
    assert "wrote 0 Japanese caption(s) for 3" in out  # *_jp.txt are not captions themselves
    extra = tmp_path / "more.yaml"
    extra.write_text("tags:\n  style x: スタイルX\n", "utf-8")
    run_cli("-C", tmp_path, "tags", "translate", folder, "-d", extra)
    assert "スタイルX" in (folder / "f02_jp.txt").read_text("utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just a list\n", "utf-8")
    code, _, err = run_cli("-C", tmp_path, "tags", "translate", folder, "-d", bad)
    assert code == 3 and "expected a mapping 'tags:'" in err


def test_report_counts_each_tag_once_per_caption(tmp_path: Path, run_cli) -> None:
    folder = dataset(tmp_path)
    (folder / "f01.txt").write_text("krnk, white background, white_background, from side", "utf-8")
    code, out, _ = run_cli("tags", "report", folder)
    assert code == 0
    assert out.splitlines()[0] == "3 caption(s), 9 distinct tag(s)"
    assert "3  100.0%  krnk" in out and "3  100.0%  white background" in out
    code, out, _ = run_cli("tags", "report", folder, "--format", "json", "--top", "2")
    data = json.loads(out)
    assert data["captions"] == 3 and [t["tag"] for t in data["tags"]] == ["krnk", "white background"]
    code, out, _ = run_cli("tags", "report", folder, "--format", "csv", "-o", tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text("utf-8").startswith("tag,count,share\nkrnk,3,1.0000\n")


def test_tag_text_conventions() -> None:
    assert danbooru_to_caption("long_hair") == "long hair" and danbooru_to_caption("^_^") == "^_^"
    assert escape_a1111("star (symbol)") == "star \\(symbol\\)" and escape_a1111("\\m/") == "\\\\m/"
    assert unescape_a1111(escape_a1111("a\\(b) \\m/")) == "a\\(b) \\m/"
    assert tag_key(" Star \\(Symbol\\) ") == tag_key("star_(symbol)") == "star (symbol)"
    assert split_caption("a, b,,\n c ,") == ["a", "b", "c"]
