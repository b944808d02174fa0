"""The WD14 tagger: real loading and preprocessing code against stand-ins with the real signatures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_prep_models import official_prepare

from charfw.errors import CharfwError
from charfw.folders.tag_text import escape_a1111, tag_key
from charfw.prep.wd14 import (
    Thresholds,
    WD14Model,
    mcut_threshold,
    preprocess_batch,
    read_tag_table,
    select_tags,
)

CPU = ["CPUExecutionProvider"]


def red(w: int = 200, h: int = 100) -> Image.Image:
    return Image.new("RGB", (w, h), (255, 0, 0))


def names(tags) -> list[str]:
    return [t.name for t in tags]


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_loads_real_signature_and_tags_a_red_image(standins: Path, version: str) -> None:
    model = WD14Model(standins / f"wd14-{version}", providers=CPU)
    assert model.size == 448
    assert model.input_name == ("input_1:0" if version == "v2" else "input")
    assert model.fixed_batch == (1 if version == "v2" else None)
    # three images in one call: the v2 model (batch fixed at 1) is run image by image
    tags = model.tag([red(), red(100, 100), Image.new("RGB", (50, 80), (0, 0, 255))], Thresholds())
    first = names(tags[0])
    assert "red_hair" in first and "blue_hair" not in first
    assert "white_background" in first  # the 2:1 image was padded with white
    assert "white_background" not in names(tags[1])  # a square red image has no padding
    assert "blue_hair" in names(tags[2]) and "red_hair" not in names(tags[2])
    assert "hakurei_reimu" in first and "kirisame_marisa" not in first  # 1.0 vs 0.5 < 0.85


def test_preprocessing_matches_the_official_app(standins: Path) -> None:
    rgba = Image.new("RGBA", (90, 130), (0, 0, 0, 0))
    rgba.paste((10, 200, 30, 255), (20, 20, 70, 110))
    half = Image.new("RGBA", (64, 64), (200, 10, 10, 128))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 500, 3), dtype=np.uint8))
    cases = [red(), red(448, 448), red(1000, 300), rgba, half, noisy, Image.new("RGB", (1, 1), (3, 4, 5))]
    batch = preprocess_batch(cases, 448, workers=2)
    assert batch.dtype == np.float32 and batch.shape == (len(cases), 448, 448, 3)
    model = WD14Model(standins / "wd14-v3", providers=CPU)
    for i, image in enumerate(cases):
        official = official_prepare(image, 448)
        diff = np.abs(batch[i] - official)
        # resized before padding: only where the picture meets the padding may it differ
        assert diff.mean() < 1.0 and (diff > 8).mean() < 0.01, (i, diff.mean(), (diff > 8).mean())
        if image.size[0] == image.size[1]:  # no padding: nothing to differ
            assert diff.max() <= 2, i
        ours, theirs = model.scores(batch[i : i + 1]), model.scores(official[None])
        np.testing.assert_allclose(ours, theirs, atol=5e-3)  # scores move only marginally


# Each mistake a tagger implementation can make, applied to the preprocessing: the
# stand-in must turn every one of them into wrong tags (so the tests above would fail).
def _swap_channels(arr):
    return arr[..., ::-1]


def _zero_one(arr):
    return arr / 255.0


MISTAKES = {
    "rgb instead of bgr": ("preprocess", _swap_channels),
    "0-1 input": ("preprocess", _zero_one),
    "black padding": ("pad", (0, 0, 0)),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_stand_in_catches_preprocessing_mistakes(standins: Path, mistake: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import charfw.prep.wd14 as wd14

    model = WD14Model(standins / "wd14-v3", providers=CPU)
    good = names(model.tag([red()], Thresholds())[0])
    kind, how = MISTAKES[mistake]
    if kind == "preprocess":
        real = wd14.preprocess_batch
        monkeypatch.setattr(wd14, "preprocess_batch", lambda imgs, size, **kw: how(real(imgs, size, **kw)))
    else:
        def black_pad(image, size):
            side = max(image.size)
            canvas = Image.new("RGB", (side, side), how)
            canvas.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
            return canvas.resize((size, size), Image.Resampling.BICUBIC)

        monkeypatch.setattr(wd14, "prepare_image", black_pad)
    bad = names(model.tag([red()], Thresholds())[0])
    expected = {"red_hair", "white_background"}
    assert expected <= set(good)
    assert not expected <= set(bad), f"{mistake} was not caught: {bad}"


def test_thresholds_are_strict_and_mcut_works(standins: Path) -> None:
    table = read_tag_table(standins / "wd14-v3" / "selected_tags.csv")
    assert table.names[:4] == ("general", "sensitive", "questionable", "explicit")
    scores = np.zeros(len(table.names), np.float32)
    idx = {n: i for i, n in enumerate(table.names)}
    scores[idx["solo"]], scores[idx["1girl"]], scores[idx["red_hair"]] = 0.36, 0.35, 0.9
    scores[idx["general"]], scores[idx["sensitive"]] = 0.7, 0.3
    scores[idx["hakurei_reimu"]], scores[idx["kirisame_marisa"]] = 0.86, 0.5
    got = names(select_tags(scores, table, Thresholds()))
    assert got == ["hakurei_reimu", "red_hair", "solo"]  # characters first, by score; 0.35 fails
    assert names(select_tags(scores, table, Thresholds(ratings="top")))[0] == "general"
    assert "hakurei_reimu" not in names(select_tags(scores, table, Thresholds(characters=False)))
    # MCut: general scores 0.9, 0.36, 0.35, 0... → largest gap between 0.9 and 0.36
    assert mcut_threshold(np.array([0.9, 0.36, 0.35, 0.0])) == pytest.approx(0.63)
    mcut = names(select_tags(scores, table, Thresholds(general_mcut=True, character_mcut=True)))
    assert "red_hair" in mcut and "solo" not in mcut
    assert "kirisame_marisa" not in mcut and "hakurei_reimu" in mcut


def run_wd14(run_cli, *args):
    return run_cli("wd14", *[str(a) for a in args])


def test_command_writes_captions_with_caption_conventions(tmp_path: Path, standins: Path, run_cli) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    red().save(folder / "a.png")
    code, out, err = run_wd14(run_cli, folder, "-m", standins / "wd14-v3")
    assert code == 0, err
    caption = (folder / "a.txt").read_text("utf-8")
    tags = caption.split(", ")
    assert "red hair" in tags and "white background" in tags
    assert "^_^" in tags  # kaomoji keep their underscores
    assert "star (symbol)" in tags and "\\m/" in tags  # not escaped for kohya captions
    assert "1girl" not in tags and "solo" in tags  # 0.34 below, 0.36 above 0.35
    # again: nothing changes; with --a1111 the caption differs and is kept unless asked
    code, out, _ = run_wd14(run_cli, folder, "-m", standins / "wd14-v3")
    assert "0 caption(s)" in out and "1 unchanged" in out
    code, out, _ = run_wd14(run_cli, folder, "-m", standins / "wd14-v3", "--a1111")
    assert "kept 1" in out and (folder / "a.txt").read_text("utf-8") == caption
    run_wd14(run_cli, folder, "-m", standins / "wd14-v3", "--a1111", "--overwrite", "--rating")
    escaped = (folder / "a.txt").read_text("utf-8").split(", ")
    assert escaped[0] == "general"
    assert "star \\(symbol\\)" in escaped and "\\\\m/" in escaped
    assert escape_a1111("\\m/ (x)") == "\\\\m/ \\(x\\)"


def test_bad_images_are_skipped_not_fatal(tmp_path: Path, standins: Path, run_cli, bad_inputs) -> None:
    folder = tmp_path / "mixed"
    files = bad_inputs(folder)
    code, out, err = run_wd14(run_cli, folder, "-m", standins / "wd14-v2")
    assert code == 0, err
    assert "broken.png: not an image" in err and "skipped 1 file(s)" in out
    for key in ("16bit", "cmyk", "tiny"):
        assert files[key].with_suffix(".txt").is_file(), key
    assert not files["gif"].with_suffix(".txt").exists()  # kohya reads no .gif: not captioned
    from charfw.build.images import load, to_rgb_or_rgba

    first_frame = to_rgb_or_rgba(load(files["gif"]))
    assert WD14Model(standins / "wd14-v3", providers=CPU).tag([first_frame], Thresholds())[0]
    assert "red hair" in files["cmyk"].with_suffix(".txt").read_text("utf-8")
    assert "red hair" in files["tiny"].with_suffix(".txt").read_text("utf-8")
    for p in folder.glob("*.txt"):
        p.unlink()
    code, out, err = run_wd14(run_cli, folder, "-m", standins / "wd14-v2", "--strict")
    assert code == 3 and "broken.png" in err
    assert not list(folder.glob("*.txt"))  # strict: nothing written


def test_model_file_problems_are_one_line(tmp_path: Path, standins: Path, run_cli) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    red().save(folder / "a.png")
    no_csv = tmp_path / "no-csv"
    no_csv.mkdir()
    shutil.copy(standins / "wd14-v3" / "model.onnx", no_csv / "model.onnx")
    code, _, err = run_wd14(run_cli, folder, "-m", no_csv)
    assert code == 3 and "selected_tags.csv missing" in err and "Traceback" not in err

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(standins / "u2net.onnx", wrong / "model.onnx")  # a segmentation model
    shutil.copy(standins / "wd14-v3" / "selected_tags.csv", wrong)
    code, _, err = run_wd14(run_cli, folder, "-m", wrong)
    assert code == 3 and "not a WD14 tagger" in err and "input.1[1,3,320,320]" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model at all")
    shutil.copy(standins / "wd14-v3" / "selected_tags.csv", broken)
    code, _, err = run_wd14(run_cli, folder, "-m", broken)
    assert code == 3 and "cannot load the ONNX model" in err

    code, _, err = run_wd14(run_cli, folder, "-m", "SmilingWolf/not-cached-here")
    assert code == 3 and "not in the Hugging Face cache (offline)" in err
    assert "huggingface.co/SmilingWolf/not-cached-here" in err
    assert not list(folder.glob("*.txt"))


def test_csv_that_does_not_match_the_model(tmp_path: Path, standins: Path) -> None:
    from tiny_prep_models import WD14_TAGS, write_selected_tags

    folder = tmp_path / "m"
    shutil.copytree(standins / "wd14-v3", folder)
    write_selected_tags(folder / "selected_tags.csv", WD14_TAGS[:-3])
    with pytest.raises(CharfwError, match="different models"):
        WD14Model(folder, providers=CPU)
    (folder / "selected_tags.csv").write_text("id,tag\n1,x\n", encoding="utf-8")
    with pytest.raises(CharfwError, match="header must start tag_id,name,category"):
        read_tag_table(folder / "selected_tags.csv")


def test_provider_fallback_warns_instead_of_failing(standins: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    from charfw.prep.onnx_runtime import choose_providers, open_session

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert choose_providers("cuda", purpose="WD14 tagger") == CPU  # not in this build: warn, CPU
    assert "CUDAExecutionProvider is not in this onnxruntime build" in capsys.readouterr().err
    assert choose_providers("auto") == CPU
    everything = ["CoreMLExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: everything)
    assert choose_providers("auto", auto_order=("cuda", "coreml", "cpu")) == [
        "CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # rembg: no CoreML

    real = ort.InferenceSession

    def picky(path, sess_options=None, providers=None):
        if providers and providers[0] != "CPUExecutionProvider":
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : libcudnn.so.9: cannot open shared object file")
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", picky)
    session = open_session(standins / "wd14-v3" / "model.onnx",
                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"], purpose="WD14 tagger")
    assert session.get_providers() == CPU
    err = capsys.readouterr().err
    assert "could not start on CUDAExecutionProvider (libcudnn.so.9" in err and "running on the CPU" in err


WD14_CHAIN = """
  tag:
    - angle-rules
    - plugin: wd14
      model: {model}
      own_tags: [cat ears]
"""


def test_build_chain_adds_only_what_the_rules_do_not_say(workspace: Path, standins: Path, run_cli) -> None:
    manifest = workspace / "characters" / "krnk.yaml"
    text = manifest.read_text("utf-8").replace("  tag: angle-rules\n", WD14_CHAIN.format(model=standins / "wd14-v3"))
    manifest.write_text(text, "utf-8")
    code, out, err = run_cli("-C", workspace, "build", "krnk", "--until", "tag")
    assert code == 0, err
    captions = sorted((workspace / "build" / "krnk" / "face" / "tag" / "captions").glob("*.txt"))
    assert len(captions) == 15
    for path in captions:
        tags = path.read_text("utf-8").split(", ")
        keys = [tag_key(t) for t in tags]
        assert len(keys) == len(set(keys)), path
        assert tags[0] == "krnk"
        assert "star (symbol)" in tags and "^_^" in tags  # new information is added ...
        # ... after every rule tag, and nothing the rules own, the keyword absorbs or the manifest lists
        assert tags.index("star (symbol)") > tags.index("blush")
        for absent in ("large breasts", "cat ears", "hakurei reimu", "white background"):
            assert tags.count(absent) <= (1 if absent == "white background" else 0), (path, absent)
        if path.stem[2] not in "2":  # f?2 is from the side by the rules; WD14's from_side is dropped
            assert "from side" not in tags, path
    # a second build reuses everything
    code, out, _ = run_cli("-C", workspace, "build", "krnk", "--until", "tag")
    assert code == 0 and "Nothing to do" in out
