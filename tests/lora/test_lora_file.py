"""The LoRA file model: every module type's ΔW, reading, writing, kohya's hashes, bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
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
from safetensors import safe_open
from safetensors.torch import save as st_save

from charfw.errors import CharfwError
from charfw.lora.file import read_lora
from charfw.lora.names import detect_family
from charfw.lora.safetensors_io import (
    cast,
    scaled,
    sshs_hashes,
    to_numpy,
    to_torch,
    write_safetensors,
)

# name, tensors, the layer's weight shape, the type charfw should report
MODULES = [
    ("lora linear", NAMES["IN01"], lora_linear(24, 16, 4), (24, 16), "LoRA"),
    ("lora 1x1 conv", NAMES["IN04"], lora_conv(16, 12, 4, k=1), (16, 12, 1, 1), "LoRA"),
    ("locon 3x3", NAMES["IN05"], lora_conv(16, 8, 4), (16, 8, 3, 3), "LoCon"),
    ("locon tucker", NAMES["IN10"], locon_tucker(12, 8, 4), (12, 8, 3, 3), "LoCon"),
    ("loha linear", NAMES["OUT11"], loha(20, 12, 3), (20, 12), "LoHa"),
    ("loha conv (flat)", NAMES["OUT05"], loha(8, 6 * 9, 3), (8, 6, 3, 3), "LoHa"),
    ("loha tucker", NAMES["IN03"], loha_tucker(8, 6, 3), (8, 6, 3, 3), "LoHa"),
    ("lokr full", NAMES["M00"], lokr_full(4, 2, 5, 6), (20, 12), "LoKr"),
    ("lokr full conv", NAMES["IN05"], lokr_full(2, 2, 4, 3, k=3), (8, 6, 3, 3), "LoKr"),
    ("lokr factored", NAMES["BASE"], lokr_factored(4, 3, 6, 5, 2), (24, 15), "LoKr"),
    ("lokr tucker", NAMES["OUT05"], lokr_tucker(2, 3, 4, 2, 2), (8, 6, 3, 3), "LoKr"),
    ("lokr factored conv (flat)", NAMES["IN05"], lokr_factored(2, 2, 4, 3 * 9, 2), (8, 6, 3, 3), "LoKr"),
]


@pytest.mark.parametrize(("label", "name", "tensors", "shape", "kind"), MODULES, ids=[m[0] for m in MODULES])
def test_delta_of_every_module_type_matches_an_independent_reconstruction(
        tmp_path: Path, label: str, name: str, tensors: dict, shape: tuple, kind: str) -> None:
    lora = read_lora(save(tmp_path / "m.safetensors", {name: tensors}))
    module = lora.modules[name]
    assert module.shape == shape and module.label == kind
    assert relative_error(module.delta(), reference_delta(tensors, shape)) < 1e-6


def test_lokr_with_two_full_factors_ignores_alpha_and_missing_alpha_means_scale_one(tmp_path: Path) -> None:
    full = lokr_full(3, 2, 4, 5)  # alpha 3 in the file, ignored
    plain = lora_linear(6, 5, 2)
    del plain["alpha"]
    lora = read_lora(save(tmp_path / "m.safetensors", {NAMES["M00"]: full, NAMES["IN01"]: plain}))
    assert lora.modules[NAMES["M00"]].scale == 1.0 and lora.modules[NAMES["IN01"]].scale == 1.0
    w1, w2 = full["lokr_w1"].double(), full["lokr_w2"].double()
    assert relative_error(lora.modules[NAMES["M00"]].delta(), torch.kron(w1, w2)) < 1e-6


def test_dora_scale_and_unknown_keys_are_kept_and_reported(tmp_path: Path) -> None:
    dora = lora_linear(8, 6, 2)
    dora["dora_scale"] = torch.rand(8, 1)
    ia3 = {"weight": torch.rand(8), "on_input": torch.tensor(False)}
    path = save(tmp_path / "m.safetensors", {NAMES["IN01"]: dora, NAMES["OUT11"]: ia3},
                extra={"emb_params": torch.rand(2, 4)})
    lora = read_lora(path)
    assert lora.dora == 1 and lora.modules[NAMES["IN01"]].dora
    assert sorted(lora.unknown) == sorted([f"{NAMES['OUT11']}.weight", f"{NAMES['OUT11']}.on_input", "emb_params"])
    out = lora.save(tmp_path / "out.safetensors")
    again = read_lora(out.path)
    assert torch.equal(again.modules[NAMES["IN01"]].tensors["dora_scale"], dora["dora_scale"])
    assert np.array_equal(again.unknown["emb_params"], lora.unknown["emb_params"])
    assert again.unknown[f"{NAMES['OUT11']}.on_input"].dtype == np.bool_


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_round_trip_keeps_tensors_metadata_and_casts_only_floats(tmp_path: Path, precision: str) -> None:
    modules = {NAMES["IN01"]: lora_linear(8, 6, 2), NAMES["IN05"]: lora_conv(6, 4, 2)}
    meta = {"ss_network_dim": "2", "ss_training_comment": "ünïcode\nline", "modelspec.title": "x"}
    lora = read_lora(save(tmp_path / "in.safetensors", modules, meta, extra={"step": torch.tensor(7)}))
    saved = lora.save(tmp_path / "out.safetensors", precision=precision)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    with safe_open(saved.path, "pt") as f:
        stored = f.metadata()
        keys = list(f.keys())
        for key in keys:
            t = f.get_tensor(key)
            assert t.dtype == (torch.int64 if key == "step" else dtype)
            assert torch.equal(t, lora.tensors()[key].to(t.dtype))
    assert {k: stored[k] for k in meta} == meta
    assert stored["sshs_model_hash"] == saved.model_hash


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's precalculate_safetensors_hashes, as library/train_util.py does it: serialise with
    only the ss_* metadata, sha256 of what follows the header, and of 64 KiB at 1 MiB."""
    data = st_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("header_size", ["small", "over 1 MiB"])
def test_sshs_hashes_equal_kohyas(tmp_path: Path, header_size: str) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(8, 40000, generator=g).half(),
               "lora_unet_a.lora_up.weight": torch.randn(320, 8, generator=g).half(),
               "lora_unet_a.alpha": torch.tensor(4.0).half(), "z.int": torch.arange(3),
               "b.bf16": torch.randn(5, generator=g).bfloat16(), "c.fp32": torch.randn(7, generator=g)}
    meta = {"ss_network_dim": "8", "ss_tag_frequency": json.dumps({"x": {"tag": 1}}), "modelspec.title": "t"}
    if header_size != "small":
        meta["ss_tag_frequency"] = "t" * 1_200_000
    expected = kohya_hashes(tensors, meta)
    assert sshs_hashes(tensors, meta) == expected
    saved = write_safetensors(tmp_path / "x.safetensors", tensors, meta)
    assert (saved.model_hash, saved.legacy_hash) == expected
    with safe_open(saved.path, "pt") as f:
        assert (f.metadata()["sshs_model_hash"], f.metadata()["sshs_legacy_hash"]) == expected


def test_written_bytes_are_what_safetensors_writes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {"b": torch.randn(3, 5, generator=g).half(), "a": torch.randn(4, generator=g),
               "c": torch.arange(6).reshape(2, 3), "d": torch.tensor(True)}
    meta = {"ss_output_name": "x"}
    path = write_safetensors(tmp_path / "x.safetensors", tensors, meta, hashes=False).path
    assert path.read_bytes() == st_save(tensors, meta)


@pytest.mark.parametrize(("names", "metadata", "family"), [
    ([NAMES["BASE"], NAMES["IN01"]], {}, "sd1"),
    ([NAMES["IN01"]], {"ss_v2": "True"}, "sd2"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_4_1_proj_in"], {}, "sdxl"),
    (["lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q"], {}, "sdxl"),
    (["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"], {}, "sd1"),
    (["lora_unet_down_blocks_0_resnets_0_conv1"], {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    (["transformer_blocks_0_attn"], {}, "unknown"),
])
def test_base_model_family_from_names(names: list[str], metadata: dict[str, str], family: str) -> None:
    assert detect_family(names, metadata) == family


def test_network_type_of_a_whole_file(tmp_path: Path) -> None:
    lora = read_lora(save(tmp_path / "a.safetensors", {NAMES["IN01"]: lora_linear(8, 6, 2),
                                                          NAMES["IN05"]: lora_conv(6, 4, 2)}))
    assert lora.network_type == "LoCon" and lora.family == "sd1" and not lora.tucker
    lora = read_lora(save(tmp_path / "b.safetensors", {NAMES["IN01"]: lora_linear(8, 6, 2)}))
    assert lora.network_type == "LoRA"
    lora = read_lora(save(tmp_path / "c.safetensors", {NAMES["IN01"]: loha(8, 6, 2), NAMES["M00"]: lokr_full(2, 2, 3, 3)}))
    assert lora.network_type == "LoHa + LoKr"


# --- bad input -----------------------------------------------------------------------------


def test_a_truncated_file_is_one_clear_error(tmp_path: Path) -> None:
    path = save(tmp_path / "t.safetensors", {NAMES["IN01"]: lora_linear(64, 64, 8)})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CharfwError, match="truncated: the header describes") as info:
        read_lora(path)
    assert "\n" not in str(info.value) and "incomplete" in str(info.value)
    path.write_bytes(data[:20])
    with pytest.raises(CharfwError, match="truncated"):
        read_lora(path)
    path.write_bytes(b"\x01\x00")
    with pytest.raises(CharfwError, match="truncated or empty"):
        read_lora(path)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_reading_a_file_with_nan_or_inf_names_the_module_and_tensor(tmp_path: Path, bad: float, dtype: str) -> None:
    tensors = lora_linear(8, 6, 2)
    tensors["lora_up.weight"][3, 1] = bad
    path = tmp_path / "n.safetensors"
    write_safetensors(path, {**{f"{NAMES['IN01']}.{k}": v for k, v in lora_linear(4, 4, 1).items()},
                             **{f"{NAMES['OUT11']}.{k}": v for k, v in tensors.items()}}, dtype=dtype)
    word = "NaN" if bad != bad else "Inf"
    with pytest.raises(CharfwError, match=f"n.safetensors: module {NAMES['OUT11']}: lora_up.weight holds {word} values"):
        read_lora(path)
    torch.save({k: torch.full((2, 2), bad) if k.endswith("lora_up.weight") else v
                for k, v in safetensors.torch.load_file(path).items() if k.startswith(NAMES["IN01"])},
               tmp_path / "n.pt")
    with pytest.raises(CharfwError, match=f"module {NAMES['IN01']}: lora_up.weight holds {word} values"):
        read_lora(tmp_path / "n.pt", allow_pickle=True)  # a pickle checkpoint is checked the same way


@pytest.mark.parametrize(("tensors", "message"), [
    ({"lora_down.weight": torch.zeros(4, 6), "lora_up.weight": torch.zeros(8, 3)}, "different ranks \\(3 and 4\\)"),
    ({"lora_down.weight": torch.zeros(4, 6)}, "lora_up.weight missing"),
    ({"lora_down.weight": torch.zeros(4, 6, 1, 1), "lora_mid.weight": torch.zeros(3, 3, 3, 3),
      "lora_up.weight": torch.zeros(8, 4, 1, 1)}, "do not chain"),
    ({"hada_w1_a": torch.zeros(8, 2), "hada_w1_b": torch.zeros(2, 6), "hada_w2_a": torch.zeros(8, 2),
      "hada_w2_b": torch.zeros(2, 5)}, "different shapes"),
    ({"lokr_w1": torch.zeros(2, 2), "lokr_w2_a": torch.zeros(3, 2), "lokr_w2_b": torch.zeros(3, 4)}, "different ranks"),
    ({"lora_down.weight": torch.zeros(4, 6), "lora_up.weight": torch.zeros(8, 4), "alpha": torch.zeros(2)},
     "alpha has shape"),
])
def test_mismatched_shapes_name_the_module(tmp_path: Path, tensors: dict, message: str) -> None:
    path = save(tmp_path / "s.safetensors", {NAMES["M00"]: tensors})
    with pytest.raises(CharfwError, match=f"module {NAMES['M00']}: .*{message}"):
        read_lora(path)


class Payload:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("pickle code ran",))


def test_pickles_need_a_flag_and_load_only_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.pt"
    torch.save({f"{NAMES['IN01']}.{k}": v for k, v in lora_linear(8, 6, 2).items()}, good)
    with pytest.raises(CharfwError, match="pickle checkpoint"):
        read_lora(good)
    assert set(read_lora(good, allow_pickle=True).modules) == {NAMES["IN01"]}
    evil = tmp_path / "evil.safetensors"  # the extension does not make it safetensors
    torch.save({"x": Payload()}, evil)
    with pytest.raises(CharfwError, match="pickle checkpoint"):
        read_lora(evil)
    with pytest.raises(CharfwError, match="cannot load this checkpoint safely"):
        read_lora(evil, allow_pickle=True)
    assert "pickle code ran" not in capsys.readouterr().out


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    class Boom(dict):
        def items(self):
            yield "a", torch.zeros(2)
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "x.safetensors", Boom())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_numpy_casts_and_scaling_round_as_torch(dtype: torch.dtype) -> None:
    """Files are scaled and cast without torch; the bits must be torch's, subnormals,
    signed zeros, overflow and ties included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40_000, generator=gen) * 10.0 ** float(e) for e in range(-9, 6)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 65504.0, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25,
                                    2.0**-14 - 2.0**-25, float("inf"), float("-inf"), float("nan")])])
    stored = x.to(dtype)
    for ratio in (0.37, -1.5, 3.0, 1e-3):
        got, want = to_torch(scaled(to_numpy(stored), ratio)), (stored.float() * ratio).to(dtype)
        assert torch.equal(got[:-1], want[:-1]) and bool(got[-1].isnan())
    for name, target in (("F16", torch.float16), ("BF16", torch.bfloat16), ("F32", torch.float32)):
        got, want = to_torch(cast(to_numpy(stored), name)).float(), stored.to(target).float()
        assert torch.equal(got[:-1], want[:-1]) and bool(got[-1].isnan())
    bits = to_torch(cast(to_numpy(x), "F16")).view(torch.int16)
    assert torch.equal(bits[:-1], x.half().view(torch.int16)[:-1]) and bool(bits.view(torch.float16)[-1].isnan())
