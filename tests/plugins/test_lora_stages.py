"""The merge and compress stages in a real build: FACE for the face, BODY for a body,
``weights:`` from the manifest, outputs named after the trained file, incremental re-runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from charfw.lora.file import read_lora

# A trainer double: writes a kohya LoRA3x3 with one module in each block that matters here.
FAKE_TRAINER = '''
import torch
import charfw
from charfw.components import Trainer
from charfw.lora.safetensors_io import write_safetensors
from charfw.stage_context import StageOutput

MODULES = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),      # BASE: 0 in FACE and BODY
    "lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8, 1, 1),        # IN01: 1 in both
    "lora_unet_down_blocks_0_downsamplers_0_conv": (8, 8, 3, 3),         # IN03: FACE 1, BODY 0
    "lora_unet_up_blocks_1_attentions_2_proj_out": (8, 8, 1, 1),         # OUT05: FACE 0, BODY 1
    "lora_unet_down_blocks_1_resnets_1_conv1": (8, 4, 3, 3),             # IN05: 0 in both
}


class FakeLora(Trainer):
    name = "fake-lora"

    def run(self, ctx, options):
        g = torch.Generator().manual_seed(len(ctx.part.label))
        tensors = {}
        for name, shape in MODULES.items():
            cols = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            up = torch.randn(shape[0], 4, generator=g)
            down = torch.randn(4, cols, generator=g)
            if len(shape) == 4:
                up, down = up.reshape(shape[0], 4, 1, 1), down.reshape(4, *shape[1:])
            tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                            f"{name}.alpha": torch.tensor(2.0)})
        out = ctx.stage_dir / f"{ctx.part.keyword}-Lora3x3A50p.safetensors"
        write_safetensors(out, tensors, {"ss_network_dim": "4", "ss_base_model_version": "sd_v1"}, dtype="fp16")
        return StageOutput(files={"lora": ctx.record_path(out)}, summary=[ctx.record_path(out)])


@charfw.hookimpl
def register_trainers(register):
    register(FakeLora())
'''

IN03 = "lora_unet_down_blocks_0_downsamplers_0_conv"
OUT05 = "lora_unet_up_blocks_1_attentions_2_proj_out"
IN01 = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.fixture
def ws(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (workspace / "plugins").mkdir()
    (workspace / "plugins" / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("CHARFW_PLUGINS", "fake_trainer")
    path = workspace / "characters" / "krnk.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["stages"]["train"] = "fake-lora"
    manifest["stages"]["sample"] = "off"  # the fake LoRA fits no real model
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return workspace


def test_face_gets_face_body_gets_body_then_sv16(ws: Path, run_cli) -> None:
    code, out, err = run_cli("build", "krnk", cwd=ws)
    assert code == 0, out + err
    face = read_lora(ws / "build/krnk/face/merge/krnk-Lora3x3A50p-FACE.safetensors")
    body = read_lora(ws / "build/krnk/krnksf/merge/krnksf-Lora3x3A50p-BODY.safetensors")
    assert set(face.modules) == {IN01, IN03}
    assert set(body.modules) == {IN01, OUT05}
    small = read_lora(ws / "build/krnk/krnksf/compress/krnksf-Lora3x3A50p-BODY-sv16.safetensors")
    assert set(small.modules) == {IN01, OUT05} and (ws / "build/krnk/krnksf/compress/resize-report.txt").is_file()
    assert "FACE (26 values: 0,1,1,1,1,1,0," in out and "BODY (26 values" in out and "sv_ratio 16: 2 modules" in out
    code, out, _ = run_cli("build", "krnk", cwd=ws)
    assert code == 0 and "Nothing to do" in out


def test_manifest_weights_and_options_override_the_defaults(ws: Path, run_cli) -> None:
    path = ws / "characters" / "krnk.yaml"
    manifest = yaml.safe_load(path.read_text())
    vector = ",".join(["1"] * 26)
    manifest["bodies"]["krnksf"]["stages"] = {"merge": {"plugin": "block-weights", "weights": vector, "strength": 0.5},
                                              "compress": {"plugin": "svd", "rank": 2}}
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    code, out, err = run_cli("build", "krnk", "--until", "compress", cwd=ws)
    assert code == 0, out + err
    merged = next((ws / "build/krnk/krnksf/merge").glob("*.safetensors"))
    assert merged.name.startswith("krnksf-Lora3x3A50p-lbw") and merged.name.endswith("x0.5.safetensors")
    assert len(read_lora(merged).modules) == 5
    small = read_lora(ws / f"build/krnk/krnksf/compress/{merged.stem}-r2.safetensors")
    assert {m.rank for m in small.modules.values()} == {2}
    # an unknown preset is caught before anything runs
    manifest["bodies"]["krnksf"]["stages"]["merge"]["weights"] = "BDOY"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    code, out, err = run_cli("build", "krnk", cwd=ws)
    assert code == 3 and "unknown block-weight preset 'BDOY'" in err
    manifest["bodies"]["krnksf"]["stages"]["merge"]["weights"] = "1,0,1"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    code, out, err = run_cli("build", "krnk", cwd=ws)
    assert code == 3 and "3 values is not a block layout" in err


def test_an_unknown_preset_names_the_manifest_line_and_the_closest_preset(ws: Path, run_cli) -> None:
    path = ws / "characters" / "krnk.yaml"
    path.write_text(path.read_text() + "  merge: {weights: FACEE}\n")
    line = len(path.read_text().splitlines())
    code, _out, err = run_cli("build", "krnk", "--dry-run", cwd=ws)
    assert code == 3 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: characters/krnk.yaml:{line} stages.merge.weights: unknown block-weight preset "
                          "'FACEE'; did you mean 'FACE'? presets: FACE, BODY,")


@pytest.mark.parametrize(("kind", "preset"), [("face", "FACE"), ("body", "BODY"), ("group", "BODY")])
def test_default_weights_by_part_kind(kind: str, preset: str) -> None:
    from charfw.default_plugins.lora.block_weights import BlockWeightOptions, weights_spec

    assert weights_spec(BlockWeightOptions(), kind) == preset
    assert weights_spec(BlockWeightOptions(weights="OUTD"), kind) == "OUTD"
    with pytest.raises(ValueError, match="24 values is not a block layout"):
        BlockWeightOptions(weights=[1.0] * 24)
