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
    text = group.read_text("utf-8")
    # the group's stages block (if it has one) is the end of the file
    group.write_text(text + ("" if "\nstages:\n" in text else "stages:\n") + quick, "utf-8")


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
    shutil.copytree(Path(__file__).resolve().parents[2] / "characters", ws / "characters",
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


def _five_steps(ws: Path) -> None:
    manifest = ws / "characters" / "tyank.yaml"
    manifest.write_text(manifest.read_text("utf-8").replace("max_train_steps: 2", "max_train_steps: 5"), "utf-8")


#: header keys that change with the time a run starts and ends: the times, the session id
#: made from it, and the legacy hash (of bytes past a header whose length varies with them)
TIMES = {"ss_training_started_at", "ss_training_finished_at", "modelspec.date", "ss_session_id", "sshs_legacy_hash"}


def test_an_interrupted_build_resumes_its_training(built: Path, workspace: Path, run_cli,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (a real SIGINT) in the UNet's forward pass of step 3: the build stops after
    that step with its state saved; the next build continues from it and writes the LoRAs
    an uninterrupted build writes, every tensor equal."""
    import torch
    from safetensors.torch import load_file
    from train_support import ctrl_c_in_unet_forward

    # the uninterrupted build, in a fresh copy of the workspace
    _quick(workspace)
    _five_steps(workspace)
    code, _, err = run_cli("-C", workspace, "build", "tyank", "--until", "train")
    assert code == 0, err
    expected = sorted(workspace.glob("build/tyank/*/train/*.safetensors"))
    assert [p.name for p in expected] == ["tyank-Lora3x3A50p-AdamW-8-100-5.safetensors",
                                          "tyankps-Lora3x3A50p-AdamW-8-100-5.safetensors"]

    _five_steps(built)
    with monkeypatch.context() as m:
        ctrl_c_in_unet_forward(m, at=3)
        code, _, interrupted = run_cli("-C", built, "build", "tyank", "--until", "train")
    assert code == 130, interrupted
    states = [p.name for p in (built / "build/tyank/face/train/state").glob("step-*")]
    code, out, err = run_cli("-C", built, "build", "tyank", "--until", "train")
    assert code == 0, err
    for reference in expected:
        path = built / reference.relative_to(workspace)
        final, wanted = load_file(str(path)), load_file(str(reference))
        assert final.keys() == wanted.keys()
        differ = [key for key, value in wanted.items() if not torch.equal(final[key], value)]
        assert not differ, f"{path.name}: {len(differ)} of {len(wanted)} tensors differ from an uninterrupted build"
        header, wanted_header = read_lora(path).metadata, read_lora(reference).metadata
        assert {k: v for k, v in header.items() if k not in TIMES} == \
            {k: v for k, v in wanted_header.items() if k not in TIMES}
    assert "interrupted at step 3; state saved, resume to continue" in interrupted
    assert states == ["step-00000003"]
    assert "resumed from step-00000003" in err and "resumed at step 3" in out
    assert not (built / "build/tyank/face/train/state").exists()
