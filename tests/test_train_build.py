"""``charfw build`` on the example manifests: face, body and group LoRAs on the tiny model.

The examples train on ``charfw:tiny-sd15`` (built into build/.cache on first use) with the
tiny model's training defaults; here the steps and the resolution are cut further so the
whole build stays quick. Once merge and compress
plugins are installed the build goes through them; until then it stops at ``merge`` with
the engine's message, after writing every LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_support import one_torch_thread  # noqa: F401 (fixture)

from charfw.lora.file import read_lora


def _quick(workspace: Path, steps: int = 2) -> None:
    """Fewer steps at 64 px (the examples' train blocks are the tiny model's defaults)."""
    quick = f"  train: {{plugin: lora, max_train_steps: {steps}, resolution: 64}}\n"
    for name in ("krnk", "tyank"):
        manifest = workspace / "characters" / f"{name}.yaml"
        manifest.write_text(manifest.read_text("utf-8") + quick, "utf-8")
    group = workspace / "characters" / "krnksf_tyankps.yaml"
    group.write_text(group.read_text("utf-8") + "stages:\n" + quick, "utf-8")


def _merge_plugins_installed() -> bool:
    from charfw.plugins import load_plugins

    registry = load_plugins(None).registry
    return registry.find("block_merger", "block-weights") is not None and registry.find("compressor", "svd") is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example workspace built once (module scope; the build takes seconds)."""
    import shutil

    from charfw.cli import main

    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(Path(__file__).resolve().parents[1] / "characters", ws / "characters",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    _quick(ws)
    try:
        main(["-C", str(ws), "build"])
    except SystemExit as exc:
        (ws / "exit-code").write_text(str(exc.code or 0))
    return ws


def test_build_trains_face_body_and_group_loras(built: Path) -> None:
    expected = {
        "krnk/face": "krnk-Lora3x3A50p-AdamW-8-100-2",
        "krnk/krnksf": "krnksf-Lora3x3A50p-AdamW-8-100-2",
        "tyank/face": "tyank-Lora3x3A50p-AdamW-8-100-2",
        "tyank/tyankps": "tyankps-Lora3x3A50p-AdamW-8-100-2",
        "krnksf_tyankps/group": "krnksf_tyankps-Lora3x3A50p-AdamW-8-100-2",
    }
    for part, name in expected.items():
        path = built / "build" / part / "train" / f"{name}.safetensors"
        lora = read_lora(path)
        assert lora.family == "sd1" and lora.network_type == "LoCon"
        assert lora.metadata["ss_output_name"] == name and lora.metadata["ss_steps"] == "2"
        assert lora.metadata["ss_charfw_part"] == part
        assert not (path.parent / "state").exists()  # the state goes once the LoRA is written
    # the group's dataset holds both members and their faces
    group = read_lora(built / "build/krnksf_tyankps/group/train" / f"{expected['krnksf_tyankps/group']}.safetensors")
    assert set(json.loads(group.metadata["ss_tag_frequency"])) == {
        "krnk girl_flip_face-512x512", "krnk girl_flip_face-768x768",
        "krnksf girl, school uniform, serafuku, red neckerchief, pleated skirt_flip_krnksf-768x768",
        "tyank girl, ahoge_flip_face-512x512",
        "tyankps girl, plugsuit, bodysuit_flip_tyankps-768x768",
    }


def test_build_summary_lists_every_lora(built: Path, run_cli) -> None:
    code, out, _ = run_cli("-C", built, "build")  # again: everything is up to date
    assert code == (0 if _merge_plugins_installed() else 4)
    assert int((built / "exit-code").read_text()) == code
    for part in ("krnk/face", "krnk/krnksf", "tyank/face", "tyank/tyankps", "krnksf_tyankps/group"):
        assert f"build/{part}/train/" in out
    if _merge_plugins_installed():
        assert out.count("compress") >= 5
    else:
        assert "is not installed" in out and "stopped" in out


def test_a_no_op_rebuild_imports_no_model_library(built: Path) -> None:
    """Up-to-date train, merge and compress stages are checked without torch or diffusers
    (their import alone takes seconds; the no-op rebuild has 1.5 s in all)."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "charfw", "-C", str(built), "build"],
                            capture_output=True, text=True, env={**os.environ, "CHARFW_QUIET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Nothing to do" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    heavy = {"torch", "diffusers", "transformers", "onnxruntime", "rembg", "accelerate", "peft", "safetensors"}
    assert not imported & heavy, f"a no-op rebuild imports {sorted(imported & heavy)}"


def test_an_interrupted_build_resumes_its_training(built: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during training saves resumable state; the next build continues from it."""
    from charfw.training import batch_inputs

    manifest = built / "characters" / "tyank.yaml"
    manifest.write_text(manifest.read_text("utf-8").replace("max_train_steps: 2", "max_train_steps: 5"), "utf-8")
    calls = {"n": 0}
    real = batch_inputs.BatchInputs.latents

    def interrupt_at_the_fourth_batch(self, batch, key):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, batch, key)

    monkeypatch.setattr(batch_inputs.BatchInputs, "latents", interrupt_at_the_fourth_batch)
    code, _, err = run_cli("-C", built, "build", "tyank", "--until", "train")
    assert code == 130 and "interrupted at step 3" in err
    assert list((built / "build/tyank/face/train/state").glob("step-00000003"))
    monkeypatch.setattr(batch_inputs.BatchInputs, "latents", real)
    code, out, err = run_cli("-C", built, "build", "tyank", "--until", "train")
    assert code == 0, err
    assert "resumed from step-00000003" in err and "resumed at step 3" in out
    assert read_lora(built / "build/tyank/face/train/tyank-Lora3x3A50p-AdamW-8-100-5.safetensors").metadata[
        "ss_steps"] == "5"
