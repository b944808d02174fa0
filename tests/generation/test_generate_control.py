"""``charfw generate --control IMAGE --controlnet MODEL[:WEIGHT[:START:END]]``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from controlnet_support import make_tiny_controlnet
from PIL import Image, ImageDraw

from charfw.default_plugins.generate.cli import parse_controlnet_option
from charfw.errors import CharfwError
from charfw.generation.infotext import parse_infotext, read_png_infotext


@pytest.fixture(scope="module")
def controlnet(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet")
    return make_tiny_controlnet(unet, tmp_path_factory.mktemp("cn") / "cn", 3)


def test_the_option_spelling() -> None:
    assert parse_controlnet_option("lllyasviel/sd-controlnet-hed") == ("lllyasviel/sd-controlnet-hed", 1.0, 0.0, 1.0)
    assert parse_controlnet_option("cn.safetensors:0.5") == ("cn.safetensors", 0.5, 0.0, 1.0)
    assert parse_controlnet_option("C:/models/cn:0.5:0:0.3") == ("C:/models/cn", 0.5, 0.0, 0.3)
    with pytest.raises(CharfwError, match="MODEL:WEIGHT:START:END"):
        parse_controlnet_option("cn:0.5:0")


def test_generate_with_a_controlnet(run_cli, tiny_sd15: Path, controlnet: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a girl\na girl --w 64 --h 64\n")
    control = tmp_path / "pose.png"
    image = Image.new("RGB", (96, 96))
    ImageDraw.Draw(image).rectangle((30, 10, 66, 90), fill=(255, 255, 255))
    image.save(control)
    base = ["generate", prompts, "--base-model", tiny_sd15, "-W", 32, "-H", 32, "--steps", 3,
            "--cache-dir", tmp_path / "cache"]
    code, _, err = run_cli(*base, "-o", tmp_path / "plain")
    assert code == 0, err
    code, _, err = run_cli(*base, "--control", control, "--controlnet", f"{controlnet}:0.8:0:0.7",
                           "-o", tmp_path / "cn")
    assert code == 0, err
    params = parse_infotext(read_png_infotext(tmp_path / "cn" / "00000-0.png") or "")
    assert "Weight: 0.8" in params.extra["ControlNet 0"] and "Guidance End: 0.7" in params.extra["ControlNet 0"]
    plain = np.asarray(Image.open(tmp_path / "plain" / "00000-0.png"), dtype=np.int16)
    guided = np.asarray(Image.open(tmp_path / "cn" / "00000-0.png"), dtype=np.int16)
    assert np.abs(plain - guided).max() > 0  # the control image reaches the image
    with Image.open(tmp_path / "cn" / "00001-1.png") as second:
        assert second.size == (64, 64)  # the control image follows each line's size
    record = json.loads((tmp_path / "cn" / "index.jsonl").read_text().splitlines()[0])
    assert record["controls"] == [{"model": str(controlnet), "weight": 0.8, "start": 0.0, "end": 0.7}]


def test_control_errors_are_one_line(run_cli, tiny_sd15: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a girl\n")
    base = ["generate", prompts, "--base-model", tiny_sd15, "-o", tmp_path / "out"]
    code, _, err = run_cli(*base, "--controlnet", "x")
    assert code == 3 and "0 --control image(s) for 1 --controlnet model(s)" in err
    code, _, err = run_cli(*base, "--control", tmp_path / "missing.png", "--controlnet", "x")
    assert code == 3 and "missing.png" in err and "cannot read the control image" in err
