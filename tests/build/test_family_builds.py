"""Issue 11's first promise: point ``model.base`` of an unchanged example manifest at an
SDXL or SD 3.5 checkpoint (a single file in the layout real ones use) and ``charfw build``
runs every stage: the plan names the family it found in the file, the trainer writes the
family's LoRA format, the merge keeps every block (FACE is an SD 1.x vector), and the
sample stage draws the grid with the finished LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from train_support import one_torch_thread  # noqa: F401 (fixture)

QUICK = "  train: {plugin: lora, max_train_steps: 2, resolution: 64, optimizer: AdamW, dim: 4, gradient_checkpointing: false}\n"
#: family → (ss_base_model_version prefix, a key every LoRA of the family has)
FORMATS = {"sdxl": ("sdxl_base_v1-0", "lora_te1_"), "sd35": ("sd3_5", "transformer.")}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("family", ["sdxl", "sd35"])
def test_the_example_builds_on_a_single_file_checkpoint_of_the_family(family: str, workspace: Path, run_cli,
                                                                      request: pytest.FixtureRequest) -> None:
    from safetensors import safe_open

    folder = request.getfixturevalue(f"tiny_{family}")
    checkpoint = workspace / "models" / f"tiny-{family}.safetensors"
    code, out, err = run_cli("export-model", str(folder), str(checkpoint), "--precision", "fp32",
                             "--cache-dir", str(workspace / "cache"))
    assert code == 0, out + err
    manifest = workspace / "characters/krnk.yaml"
    text = manifest.read_text("utf-8")
    assert "base: charfw:tiny-sd15" in text
    manifest.write_text(text.replace("base: charfw:tiny-sd15", f"base: ../models/{checkpoint.name}") + QUICK, "utf-8")
    code, out, err = run_cli("build", "krnk/face", cwd=workspace)
    assert code == 0, out + err
    assert f"model family {family}" in out + err
    assert "FACE" in out + err and "ALL" in out + err  # the SD 1.x preset is not used, and the build says so
    (lora,) = (workspace / "build/krnk/face/compress").glob("*.safetensors")
    with safe_open(str(lora), "numpy") as f:
        meta = f.metadata()
        keys = list(f.keys())
    version, key = FORMATS[family]
    assert meta["ss_base_model_version"].startswith(version)
    assert any(k.startswith(key) for k in keys)
    record = json.loads((workspace / "build/krnk/face/sample/record.json").read_text("utf-8"))
    assert record["output"]["files"]
    with Image.open(workspace / "build/krnk/face/sample/grid.png") as grid:
        assert grid.width > 64 and grid.height > 64
