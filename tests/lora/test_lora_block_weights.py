"""Block weights: layouts, presets, the module → block map, and exact r·ΔW for every type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_support import (
    NAMES,
    locon_tucker,
    loha,
    loha_tucker,
    lokr_factored,
    lokr_full,
    lokr_tucker,
    lora_conv,
    lora_linear,
    reference_delta,
    relative_error,
    save,
)

from charfw.build.template_library import TemplateLibrary
from charfw.errors import CharfwError
from charfw.lora.block_weights import (
    BLOCKS17,
    BLOCKS26,
    apply_block_weights,
    block_of,
    load_presets,
    read_presets_file,
    resolve_weights,
)
from charfw.lora.file import read_lora

PRESETS = load_presets()


def vector(**ratios: float) -> str:
    """A 26-value vector: 1 everywhere except the blocks given."""
    return ",".join(str(ratios.get(b, 1.0)) for b in BLOCKS26)


# --- the map ---------------------------------------------------------------------------------

#: SD 1.5 modules and their blocks, from the LDM ↔ diffusers table (reference §2)
SD1_TABLE = {
    "lora_unet_conv_in": "IN00",
    "lora_unet_down_blocks_0_resnets_0_conv1": "IN01",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": "IN02",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "IN04",
    "lora_unet_down_blocks_1_downsamplers_0_conv": "IN06",
    "lora_unet_down_blocks_2_attentions_1_proj_out": "IN08",
    "lora_unet_down_blocks_2_downsamplers_0_conv": "IN09",
    "lora_unet_down_blocks_3_resnets_0_conv1": "IN10",
    "lora_unet_down_blocks_3_resnets_1_time_emb_proj": "IN11",
    "lora_unet_mid_block_resnets_1_conv2": "M00",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": "M00",
    "lora_unet_up_blocks_0_resnets_0_conv1": "OUT00",
    "lora_unet_up_blocks_0_resnets_2_conv2": "OUT02",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
    "lora_unet_up_blocks_1_attentions_2_proj_in": "OUT05",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "OUT05",
    "lora_unet_up_blocks_2_upsamplers_0_conv": "OUT08",
    "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_attn1_to_v": "OUT09",
    "lora_unet_up_blocks_3_resnets_2_conv_shortcut": "OUT11",
    "lora_te_text_model_encoder_layers_11_mlp_fc2": "BASE",
    "lora_unet_time_embedding_linear_1": None,
    "lora_unet_conv_out": None,
    "lora_unet_conv_norm_out": None,
}

SDXL_TABLE = {
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": "BASE",
    "lora_te2_text_model_encoder_layers_31_self_attn_out_proj": "BASE",
    "lora_unet_input_blocks_0_0": "IN00",
    "lora_unet_input_blocks_3_0_op": "IN03",
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": "IN04",
    "lora_unet_input_blocks_8_0_emb_layers_1": "IN08",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": "M00",
    "lora_unet_output_blocks_2_2_conv": "OUT02",
    "lora_unet_output_blocks_8_0_skip_connection": "OUT08",
    "lora_unet_label_emb_0_0": None,
    "lora_unet_time_embed_2": None,
    "lora_unet_out_2": None,
}


@pytest.mark.parametrize(("name", "block"), [*SD1_TABLE.items(), *SDXL_TABLE.items()])
def test_module_to_block(name: str, block: str | None) -> None:
    assert block_of(name) == block


def test_the_sd15_inventory_fills_the_blocks_as_lbw_expects() -> None:
    from kohya_names import sd15_targets

    counts: dict[str | None, int] = {}
    for t in sd15_targets(conv=True):
        counts[block_of(t.name)] = counts.get(block_of(t.name), 0) + 1
    assert counts["BASE"] == 72 and None not in counts and "IN00" not in counts  # conv_in is no kohya target
    # the 17 blocks are exactly those holding attention; the 9 others only resnets/samplers
    attention = {block_of(t.name) for t in sd15_targets(conv=False)}
    assert attention == set(BLOCKS17)
    assert set(counts) == set(BLOCKS26) - {"IN00"}


# --- vectors and presets -------------------------------------------------------------------


def test_method_vectors_and_lbw_presets() -> None:
    face = resolve_weights("FACE", "sd1", PRESETS)
    assert face.values == (0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1)
    body = resolve_weights("body", "sd1", PRESETS)  # names are case-insensitive
    differ = [b for b in BLOCKS26 if face.ratio(b) != body.ratio(b)]
    assert differ == ["IN03", "OUT00", "OUT05"]  # reference §1: they differ only there
    outd = resolve_weights("OUTD", "sd1", PRESETS)
    assert [b for b in BLOCKS26 if outd.ratio(b)] == ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]
    # a 17-value vector places by name: the conv-only blocks get 0 (LBW's to26)
    every = resolve_weights("ALL", "sd1", PRESETS)
    assert {b for b in BLOCKS26 if every.ratio(b) == 0} == set(BLOCKS26) - set(BLOCKS17)
    assert resolve_weights("ALL", "sdxl", PRESETS).values == (1.0,) * 12


def test_any_real_value_and_sdxl_layouts() -> None:
    w = resolve_weights(vector(IN01=-0.7, OUT11=2.5), "sd1", PRESETS)
    assert w.ratio("IN01") == -0.7 and w.ratio("OUT11") == 2.5 and w.name == "custom"
    xl = resolve_weights([0.5] * 20, "sdxl", PRESETS)
    assert xl.ratio("OUT08") == 0.5 and "OUT09" not in xl.ratios
    xl12 = resolve_weights(",".join(["1"] * 12), "sdxl", PRESETS)
    assert xl12.ratio("IN00") == 0 and xl12.ratio("IN04") == 1


def test_sd35_layouts_one_value_per_joint_block() -> None:
    medium = resolve_weights([0.25, *range(24)], "sd35", PRESETS)
    assert medium.layout[0] == "BASE" and medium.layout[-1] == "J23" and len(medium.full) == 39
    assert medium.ratio("BASE") == 0.25 and medium.ratio("J07") == 7 and medium.ratio("J30") == 0
    large = resolve_weights(",".join(["1"] * 39), "sd35", PRESETS)
    assert large.ratio("J37") == 1
    assert block_of("lora_transformer_transformer_blocks_7_attn2_to_q") == "J07"
    assert block_of("lora_unet_joint_blocks_31_context_block_mlp_fc1") == "J31"  # kohya's SD3 names
    assert block_of("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") == "BASE"
    assert block_of("lora_transformer_context_embedder") is None


@pytest.mark.parametrize(("spec", "family", "message"), [
    ("FCAE", "sd1", "unknown block-weight preset 'FCAE'; did you mean 'FACE'?"),
    ("1,0,1", "sd1", "3 values is not a block layout"),
    (",".join(["1"] * 24), "sd1", "24 values is not a block layout; use 26 or 17"),
    (",".join(["1"] * 25), "sd1", "25 block weights is a SD 3.5 layout, but this LoRA is for SD 1.x/2.x"),
    (vector(), "sd35", "26 block weights is a SD 1.x/2.x layout, but this LoRA is for SD 3.5; give 25 or 39 values"),
    ("FACE", "sd35", "preset FACE has no SD 3.5 vector"),
    (vector(), "sdxl", "26 block weights is a SD 1.x/2.x layout, but this LoRA is for SDXL; give 20 or 12 values"),
    ("1,x," + ",".join(["1"] * 24), "sd1", "value 2 \\('x'\\) is not a number"),
    ("FACE", "sdxl", "preset FACE has no SDXL vector"),
    ("FACE", "unknown", "cannot tell which base model"),
])
def test_bad_vectors_are_one_line_errors(spec: str, family: str, message: str) -> None:
    with pytest.raises(CharfwError, match=message) as info:
        resolve_weights(spec, family, PRESETS)
    assert "\n" not in str(info.value)


def test_workspace_and_lbw_preset_files(tmp_path: Path) -> None:
    folder = tmp_path / "templates" / "block-weights"
    folder.mkdir(parents=True)
    (folder / "presets.yaml").write_text(
        "presets:\n  FACE: " + vector(IN01=0.5) + "\n  MINE: {sdxl: '" + ",".join(["0.25"] * 12) + "'}\n")
    presets = load_presets(TemplateLibrary(tmp_path / "templates"))
    assert presets["FACE"].vectors["sd1"][2] == 0.5  # the workspace's wins
    assert presets["BODY"].vectors["sd1"] == PRESETS["BODY"].vectors["sd1"]  # the rest is still there
    assert resolve_weights("MINE", "sdxl", presets).ratio("M00") == 0.25
    lbw = tmp_path / "lbwpresets.txt"
    lbw.write_text("# comment: ignored\nCHARA:1,1,1,1,1,0,0,0,1,1,1,1,1,1,1,0,0\nBAD # 1,2\n")
    assert list(read_presets_file(lbw)) == ["CHARA"]
    (folder / "presets.yaml").write_text("presets:\n  X: 1,2,3\n")
    with pytest.raises(CharfwError, match=r"presets.yaml: preset X: 3 values is not a block layout"):
        load_presets(TemplateLibrary(tmp_path / "templates"))


# --- exact r·ΔW ----------------------------------------------------------------------------

TYPES = {
    "lora": (NAMES["IN01"], lora_linear(24, 16, 4), (24, 16)),
    "locon 3x3": (NAMES["IN05"], lora_conv(16, 8, 4, seed=1), (16, 8, 3, 3)),
    "locon tucker": (NAMES["IN10"], locon_tucker(12, 8, 4, seed=2), (12, 8, 3, 3)),
    "loha": (NAMES["OUT11"], loha(20, 12, 3, seed=3), (20, 12)),
    "loha conv": (NAMES["OUT05"], loha(8, 6 * 9, 3, seed=4), (8, 6, 3, 3)),
    "loha tucker": (NAMES["IN03"], loha_tucker(8, 6, 3, seed=5), (8, 6, 3, 3)),
    "lokr": (NAMES["M00"], lokr_full(4, 2, 5, 6, seed=6), (20, 12)),
    "lokr factored": (NAMES["BASE"], lokr_factored(4, 3, 6, 5, 2, seed=7), (24, 15)),
    "lokr tucker": (NAMES["OUT05"], lokr_tucker(2, 3, 4, 2, 2, seed=8), (8, 6, 3, 3)),
}


@pytest.mark.parametrize("ratio", [0.3, -0.7])
@pytest.mark.parametrize("kind", list(TYPES))
def test_a_ratio_scales_delta_exactly_for_every_type(tmp_path: Path, kind: str, ratio: float) -> None:
    name, tensors, shape = TYPES[kind]
    other = NAMES["OUT00"] if name != NAMES["OUT00"] else NAMES["IN04"]
    lora = read_lora(save(tmp_path / "in.safetensors", {name: tensors, other: lora_conv(6, 4, 2, k=1)}))
    block = block_of(name)
    weights = resolve_weights(vector(**{block: ratio}), "sd1", PRESETS)
    merged, report = apply_block_weights(lora, weights)
    out = read_lora(merged.save(tmp_path / "out.safetensors").path)
    assert relative_error(out.modules[name].delta(), ratio * reference_delta(tensors, shape)) < 1e-6
    assert torch.equal(out.modules[other].tensors["lora_up.weight"], lora.modules[other].tensors["lora_up.weight"])
    assert report.scaled == 1 and report.kept == 1
    # exactly one tensor changed, alpha untouched
    changed = [k for k, t in out.modules[name].tensors.items() if not torch.equal(t, lora.modules[name].tensors[k])]
    assert len(changed) == 1 and changed[0] != "alpha"


def test_ratio_zero_drops_the_module_and_strength_multiplies(tmp_path: Path) -> None:
    modules = {NAMES["IN01"]: lora_linear(8, 6, 2), NAMES["IN05"]: lora_conv(6, 4, 2), NAMES["BASE"]: lora_linear(6, 6, 2)}
    lora = read_lora(save(tmp_path / "in.safetensors", modules))
    merged, report = apply_block_weights(lora, resolve_weights("FACE", "sd1", PRESETS), strength=0.5)
    # FACE: BASE 0, IN01 1, IN05 0
    assert set(merged.modules) == {NAMES["IN01"]} and report.dropped == 2
    assert relative_error(merged.modules[NAMES["IN01"]].delta(), 0.5 * reference_delta(modules[NAMES["IN01"]], (8, 6))) < 1e-6
    assert "block weights FACE" in merged.metadata["ss_training_comment"]
    with pytest.raises(CharfwError, match="every module has ratio 0"):
        apply_block_weights(lora, resolve_weights("NONE", "sd1", PRESETS))


def test_modules_in_no_block_follow_other_and_base_is_the_text_encoder_only(tmp_path: Path) -> None:
    modules = {NAMES["none"]: lora_linear(8, 6, 2), NAMES["BASE"]: lora_linear(6, 6, 2, seed=1),
               NAMES["IN01"]: lora_linear(8, 6, 2, seed=2)}
    lora = read_lora(save(tmp_path / "in.safetensors", modules))
    w = resolve_weights(vector(BASE=0.25, IN01=0.5), "sd1", PRESETS)

    def ratio_of(merged, name: str) -> float:
        return float(merged.modules[name].delta().norm() / lora.modules[name].delta().norm())

    merged, report = apply_block_weights(lora, w)  # default: LBW's runtime rule, 1
    assert ratio_of(merged, NAMES["none"]) == pytest.approx(1.0)
    assert ratio_of(merged, NAMES["BASE"]) == pytest.approx(0.25) and ratio_of(merged, NAMES["IN01"]) == pytest.approx(0.5)
    assert report.outside == {NAMES["none"]: 1.0} and "1 modules in no block" in " ".join(report.lines())
    merged, _ = apply_block_weights(lora, w, other="BASE")  # SuperMerger's rule
    assert ratio_of(merged, NAMES["none"]) == pytest.approx(0.25)
    merged, _ = apply_block_weights(lora, w, other=0)
    assert NAMES["none"] not in merged.modules


def test_a_short_vector_reports_the_blocks_it_zeroes(tmp_path: Path) -> None:
    lora = read_lora(save(tmp_path / "in.safetensors", {NAMES["IN03"]: lora_conv(6, 4, 2), NAMES["IN01"]: lora_linear(8, 6, 2)}))
    merged, report = apply_block_weights(lora, resolve_weights("ALL", "sd1", PRESETS))
    assert report.unnamed == ["IN03"] and set(merged.modules) == {NAMES["IN01"]}
    assert "blocks IN03 are not in it and got 0; give 26 values" in " ".join(report.lines())


def test_unknown_types_are_kept_at_one_dropped_at_zero_refused_otherwise(tmp_path: Path) -> None:
    ia3 = {"weight": torch.rand(8), "on_input": torch.tensor(False)}
    lora = read_lora(save(tmp_path / "in.safetensors", {NAMES["IN01"]: lora_linear(8, 6, 2), NAMES["OUT11"]: ia3}))
    kept, _ = apply_block_weights(lora, resolve_weights(vector(), "sd1", PRESETS))
    assert len(kept.unknown) == 2
    dropped, _ = apply_block_weights(lora, resolve_weights(vector(OUT11=0), "sd1", PRESETS))
    assert not dropped.unknown
    with pytest.raises(CharfwError, match=f"module {NAMES['OUT11']} .*cannot scale exactly.*ratio 0.5"):
        apply_block_weights(lora, resolve_weights(vector(OUT11=0.5), "sd1", PRESETS))


def test_dora_modules_are_scaled_and_counted(tmp_path: Path) -> None:
    dora = lora_linear(8, 6, 2)
    dora["dora_scale"] = torch.rand(8, 1)
    lora = read_lora(save(tmp_path / "in.safetensors", {NAMES["IN01"]: dora}))
    merged, report = apply_block_weights(lora, resolve_weights(vector(IN01=0.3), "sd1", PRESETS))
    assert report.dora_scaled == 1
    assert torch.equal(merged.modules[NAMES["IN01"]].tensors["dora_scale"], dora["dora_scale"])


def test_an_sdxl_file_takes_sdxl_layouts(tmp_path: Path) -> None:
    modules = {"lora_te1_text_model_encoder_layers_0_mlp_fc1": lora_linear(8, 6, 2),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1": lora_linear(8, 6, 2, seed=1),
               "lora_unet_input_blocks_1_0_in_layers_2": lora_conv(6, 4, 2, seed=2),      # IN01: conv only
               "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": lora_linear(8, 8, 2, seed=3),
               "lora_unet_middle_block_1_proj_in": lora_linear(8, 8, 2, seed=4),
               "lora_unet_output_blocks_8_0_skip_connection": lora_conv(6, 8, 2, k=1, seed=5)}  # OUT08
    lora = read_lora(save(tmp_path / "xl.safetensors", modules))
    assert lora.family == "sdxl"
    twelve = ",".join(["0.5"] + ["1"] * 11)  # BASE 0.5: both text encoders
    merged, report = apply_block_weights(lora, resolve_weights(twelve, "sdxl", PRESETS))
    assert report.unnamed == ["IN01", "OUT08"] and len(merged.modules) == 4
    for name in ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        assert relative_error(merged.modules[name].delta(), 0.5 * reference_delta(modules[name], (8, 6))) < 1e-6
    merged, report = apply_block_weights(lora, resolve_weights(",".join(["1"] * 20), "sdxl", PRESETS))
    assert len(merged.modules) == 6 and not report.unnamed
    with pytest.raises(CharfwError, match="preset FACE has no SDXL vector"):
        resolve_weights("FACE", lora.family, PRESETS)
