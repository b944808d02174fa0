"""BLIP captions: a tiny BlipForConditionalGeneration built offline runs the real captioner."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_prep_models import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


def test_captions_are_batched_and_written_beside_images(tmp_path: Path, tiny_blip: Path, run_cli,
                                                         monkeypatch: pytest.MonkeyPatch, bad_inputs) -> None:
    from transformers import BlipForConditionalGeneration

    folder = tmp_path / "pics"
    bad_inputs(folder)
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (200, 10 * i, 10)).save(folder / f"p{i}.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(folder / "clear.png")
    calls = []
    real = BlipForConditionalGeneration.generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs["pixel_values"].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", counting)
    code, out, err = run_cli("caption", folder, "-m", tiny_blip, "-b", "4", "--num-beams", "1")
    assert code == 0, err
    assert "broken.png" in err and "skipped 1 file(s)" in out
    # 10 readable kohya images (gif is not one), in batches of at most 4
    assert sum(calls) == 9 and max(calls) == 4, calls
    for i in range(5):
        caption = (folder / f"p{i}.txt").read_text("utf-8")
        assert caption.startswith("girl") and "," not in caption
    code, out, _ = run_cli("caption", folder, "-m", tiny_blip, "--prompt", "a", "--overwrite", "--num-beams", "1")
    assert code == 0 and (folder / "p0.txt").read_text("utf-8").startswith("a girl")


def test_chained_after_the_angle_rules(tmp_path: Path, tiny_blip: Path, run_cli) -> None:
    folder = tmp_path / "krnk girl, choker_f512"
    folder.mkdir()
    Image.new("RGB", (64, 64), (20, 20, 20)).save(folder / "f00.png")
    code, _, err = run_cli("tag", folder, "--tagger", "angle-rules")
    assert code == 0, err
    rules = (folder / "f00.txt").read_text("utf-8")
    code, _, err = run_cli("caption", folder, "-m", tiny_blip, "--append", "--num-beams", "1")
    assert code == 0, err
    text = (folder / "f00.txt").read_text("utf-8")
    assert text.startswith(rules + ", girl")


def test_missing_model_is_one_line(tmp_path: Path, run_cli) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    code, _, err = run_cli("caption", folder)
    assert code == 3 and "BLIP captioner 'Salesforce/blip-image-captioning-base' is not in the Hugging Face cache" in err
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}", "utf-8")
    code, _, err = run_cli("caption", folder, "-m", empty)
    assert code == 3 and "cannot load a BLIP captioning model" in err and "Traceback" not in err
