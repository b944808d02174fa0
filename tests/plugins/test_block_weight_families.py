"""FACE/BODY are the seed's SD 1.x vectors: an SDXL part keeps every block (ALL) and the
build says so; an SD 1.x vector given for an SDXL LoRA is a one-line error naming the
manifest line (build) or the file (``charfw lora blocks``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from family_headers import sdxl_shapes, write_header
from lora_support import lora_linear, save

from charfw.errors import CharfwError
from charfw.lora.block_weights import load_presets, read_presets_file
from charfw.lora.file import read_lora

# a trainer double that writes an SDXL LoRA (sd-scripts' SGM names) with one module in BASE,
# IN04, M00 and OUT05
FAKE_SDXL_TRAINER = '''
import torch
import charfw
from charfw.components import Trainer
from charfw.lora.safetensors_io import write_safetensors
from charfw.stage_context import StageOutput

MODULES = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
           "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
           "lora_unet_output_blocks_5_1_proj_out"]


class FakeXL(Trainer):
    name = "fake-xl"

    def run(self, ctx, options):
        g = torch.Generator().manual_seed(len(ctx.part.label))
        tensors = {}
        for name in MODULES:
            tensors.update({f"{name}.lora_up.weight": torch.randn(8, 4, generator=g),
                            f"{name}.lora_down.weight": torch.randn(4, 8, generator=g),
                            f"{name}.alpha": torch.tensor(2.0)})
        out = ctx.stage_dir / f"{ctx.part.keyword}-xl.safetensors"
        write_safetensors(out, tensors, {"ss_network_dim": "4", "ss_base_model_version": "sdxl_base_v1-0"},
                          dtype="fp32")
        return StageOutput(files={"lora": ctx.record_path(out)}, summary=[ctx.record_path(out)])


@charfw.hookimpl
def register_trainers(register):
    register(FakeXL())
'''

TWENTY_SIX = ",".join(["0", *["1"] * 25])


@pytest.fixture
def xl_ws(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (workspace / "plugins").mkdir()
    (workspace / "plugins" / "fake_xl.py").write_text(FAKE_SDXL_TRAINER)
    monkeypatch.setenv("CHARFW_PLUGINS", "fake_xl")
    write_header(workspace / "illustrious.safetensors", sdxl_shapes())
    path = workspace / "characters" / "krnk.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["model"]["base"] = "../illustrious.safetensors"
    manifest["stages"]["train"] = "fake-xl"
    for stage in ("sample", "compress", "lint"):
        manifest["stages"][stage] = "off"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return workspace


def test_sdxl_parts_keep_every_block_and_the_build_says_so(xl_ws: Path, run_cli) -> None:
    code, out, err = run_cli("build", "krnk", "--until", "merge", cwd=xl_ws)
    assert code == 0, out + err
    assert "model family sdxl" in out
    # said before anything runs (the merge stage's check) and in the stage's summary
    for part, preset in (("krnk/face", "FACE"), ("krnk/krnksf", "BODY")):
        note = f"{preset} is the seed's SD 1.x vector and has no SDXL one: every block is kept (ALL)"
        assert f"{part} merge: {note}" in err
        assert note in out
    for part, keyword in (("face", "krnk"), ("krnksf", "krnksf")):
        trained = read_lora(xl_ws / f"build/krnk/{part}/train/{keyword}-xl.safetensors")
        merged = read_lora(xl_ws / f"build/krnk/{part}/merge/{keyword}-xl-ALL.safetensors")
        assert merged.family == "sdxl" and set(merged.modules) == set(trained.modules)
        for name, module in trained.modules.items():
            assert torch.allclose(merged.modules[name].delta(), module.delta())


def test_an_sd1_vector_for_an_sdxl_part_names_the_manifest_line(xl_ws: Path, run_cli) -> None:
    path = xl_ws / "characters" / "krnk.yaml"
    text = path.read_text()
    path.write_text(text + f"  merge: {{weights: '{TWENTY_SIX}'}}\n")
    line = len(path.read_text().splitlines())
    code, _out, err = run_cli("build", "krnk", "--dry-run", cwd=xl_ws)
    assert code == 3 and "Traceback" not in err
    (error,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert error.startswith(f"error: characters/krnk.yaml:{line} stages.merge.weights: 26 block weights is a "
                            "SD 1.x/2.x layout, but this LoRA is for SDXL; give 20 or 12 values")
    # a vector of SDXL's length is used as given, without the note
    path.write_text(text + f"  merge: {{weights: '{','.join(['1'] * 20)}'}}\n")
    code, out, err = run_cli("build", "krnk", "--dry-run", cwd=xl_ws)
    assert code == 0, out + err
    assert "seed's SD 1.x vector" not in err


def test_lora_blocks_names_the_file(tmp_path: Path, run_cli) -> None:
    xl = save(tmp_path / "xl-lora.safetensors",
              {"lora_te1_text_model_encoder_layers_0_mlp_fc1": lora_linear(8, 6, 2),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": lora_linear(8, 8, 2, seed=1)})
    code, _out, err = run_cli("lora", "blocks", xl, "--weights", TWENTY_SIX, cwd=tmp_path)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "xl-lora.safetensors: 26 block weights is a SD 1.x/2.x layout, but this LoRA is for SDXL" in err


def test_part_weights_rules(tmp_path: Path) -> None:
    from charfw.default_plugins.lora.block_weights import BlockWeightOptions, part_weights

    presets = load_presets()
    default = BlockWeightOptions()
    face, note = part_weights(default, "face", "sd1", presets)
    assert (face.name, note) == ("FACE", None)
    body, note = part_weights(default, "group", "sdxl", presets)
    assert body.name == "ALL" and set(body.ratios.values()) == {1.0} and "BODY is the seed's" in note
    # a presets file that gives FACE an SDXL vector: that vector, no note
    own = tmp_path / "presets.yaml"
    own.write_text("presets:\n  FACE: {sd1: '" + TWENTY_SIX + "', sdxl: '" + ",".join(["0.5"] * 20) + "'}\n")
    face, note = part_weights(default, "face", "sdxl", {**presets, **read_presets_file(own)})
    assert note is None and face.ratio("M00") == 0.5
    # what the manifest names is used as given: FACE itself has no SDXL vector
    with pytest.raises(CharfwError, match="preset FACE has no SDXL vector"):
        part_weights(BlockWeightOptions(weights="FACE"), "face", "sdxl", presets)
