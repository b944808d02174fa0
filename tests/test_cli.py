"""The command line through its real entry point: start-up cost, exit codes, init."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import charfw_exe

HEAVY = ("torch", "diffusers", "transformers", "onnxruntime", "rembg", "accelerate", "peft", "scipy")


def test_help_starts_without_heavy_libraries(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "charfw", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "CHARFW_PLUGINS": ""})
    assert result.returncode == 0 and "Usage: charfw" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), f"charfw --help imports {sorted(imported & set(HEAVY))}"


def test_version_and_usage_errors(run_cli) -> None:
    code, out, _ = run_cli("--version")
    assert code == 0 and out.startswith("charfw, version ")
    code, _, err = run_cli("nosuchcommand")
    assert code == 2 and "No such command 'nosuchcommand'" in err
    code, _, err = run_cli("build", "--until", "trian")
    assert code == 2 and "unknown stage 'trian'" in err


def test_unknown_manifest_suggests(workspace: Path, run_cli) -> None:
    code, _, err = run_cli("build", "krk", cwd=workspace)
    assert code == 3 and err.strip() == "error: no manifest 'krk' in characters/; did you mean 'krnk'?"


def test_manifest_errors_are_one_line_each_without_traceback(workspace: Path) -> None:
    path = workspace / "characters/krnk.yaml"
    path.write_text(path.read_text().replace("template: face", "template: fcae").replace("repeats: 4", "repeats: x"))
    result = subprocess.run([charfw_exe(), "build", "krnk"], cwd=workspace, capture_output=True, text=True,
                            env={**os.environ, "CHARFW_PLUGINS": ""})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    lines = path.read_text().splitlines()
    repeats = next(i for i, line in enumerate(lines, 1) if line.startswith("repeats:"))
    template = next(i for i, line in enumerate(lines, 1) if "template: fcae" in line)
    assert result.stderr.splitlines() == [
        f"error: characters/krnk.yaml:{repeats} repeats: expected a whole number, got 'x'",
        f"error: characters/krnk.yaml:{template} face.template: unknown template 'fcae' (did you mean 'face'?); known: body, face",
    ]


def test_init_writes_a_valid_manifest_and_folders(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("init", "mia", "--body", "casual", "--body", "swim", cwd=tmp_path)
    assert code == 0, err
    data = yaml.safe_load((tmp_path / "characters/mia.yaml").read_text())
    assert data["keyword"] == "mia" and data["class_tokens"] == "mia girl"
    assert sorted(data["bodies"]) == ["casual", "swim"]
    assert (tmp_path / "characters/mia/face").is_dir() and (tmp_path / "characters/mia/swim").is_dir()
    assert "Next: put f00.png … f24.png in characters/mia/face/" in out
    code, _, err = run_cli("init", "mia", cwd=tmp_path)
    assert code == 3 and "characters/mia.yaml: already exists; edit it, or pick another name" in err
    code, _, err = run_cli("init", "mia chan", cwd=tmp_path)
    assert code == 3 and "'mia chan' is not a valid name" in err
    # the new manifest builds once images are there
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "characters/mia/face/f00.png")
    Image.new("RGB", (64, 128), (255, 255, 255)).save(tmp_path / "characters/mia/casual/b00.png")
    Image.new("RGB", (64, 128), (255, 255, 255)).save(tmp_path / "characters/mia/swim/b01.png")
    code, out, err = run_cli("build", "mia", "--until", "dataset", cwd=tmp_path)
    assert code == 0, out + err
    assert "no image for angle(s) f01, f02" in out


def test_init_writes_a_manifest_that_builds_on_this_machine(tmp_path: Path, run_cli,
                                                             monkeypatch) -> None:
    """No GPU and no SD 1.5 in the Hugging Face cache: the tiny model and AdamW, with the
    comments that say how to switch; a GPU with bitsandbytes and SD 1.5 cached: the method's
    defaults. Bodies get keywords no other character can share."""
    import importlib.util

    import torch
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _out, err = run_cli("init", "mia", "--body", "casual", cwd=tmp_path)
    assert code == 0, err
    text = (tmp_path / "characters/mia.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["model"]["base"] == "charfw:tiny-sd15"
    assert data["stages"]["train"] == {"plugin": "lora", "optimizer": "AdamW"}
    assert "Not on this machine:\n  # an NVIDIA GPU, stable-diffusion-v1-5/stable-diffusion-v1-5 in the" in text
    assert "switch to your checkpoint: base: ../models/my-model.safetensors" in text
    assert "delete this line to use it" in text
    assert data["bodies"]["casual"]["keyword"] == "miacasual"
    assert data["bodies"]["casual"]["class_tokens"] == "miacasual girl"
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "characters/mia/face/f00.png")
    Image.new("RGB", (64, 128), (255, 255, 255)).save(tmp_path / "characters/mia/casual/b00.png")
    code, out, err = run_cli("build", "mia", "--dry-run", cwd=tmp_path)
    assert code == 0, out + err

    snapshot = tmp_path / "hub/models--stable-diffusion-v1-5--stable-diffusion-v1-5/snapshots/c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs/main").write_text("c0ffee")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "bitsandbytes" else find_spec(name, *args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, _out, err = run_cli("init", "zoe", cwd=tmp_path)
    assert code == 0, err
    data = yaml.safe_load((tmp_path / "characters/zoe.yaml").read_text())
    assert data["model"]["base"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and "train" not in data["stages"]


def test_asymmetric_init(tmp_path: Path, run_cli) -> None:
    code, out, _ = run_cli("init", "ren", "--asymmetric", cwd=tmp_path)
    assert code == 0 and "f00.png … f27.png" in out
    assert yaml.safe_load((tmp_path / "characters/ren.yaml").read_text())["symmetric"] is False


def test_known_harmless_library_notices_are_silenced_and_nothing_else(run_cli, tmp_path: Path) -> None:
    import logging

    run_cli("--version", cwd=tmp_path)  # the entry point installs the filters
    logger = logging.getLogger("transformers.utils.import_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # a loaded model sets transformers' verbosity to errors
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                       "`CLIPImageProcessorPil` for backward compatibility.")
        logger.warning("something else entirely")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["something else entirely"]
