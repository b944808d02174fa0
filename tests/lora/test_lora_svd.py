"""SVD resizing and merging: kohya's ranks, the QR route against dense SVD, exact merges."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lora_support import (
    NAMES,
    locon_tucker,
    loha,
    lokr_factored,
    lokr_full,
    lora_conv,
    lora_linear,
    reference_delta,
    relative_error,
    save,
    spectrum_factors,
)

from charfw.errors import CharfwError
from charfw.lora.block_weights import BLOCKS26, load_presets, resolve_weights
from charfw.lora.file import read_lora
from charfw.lora.merge import MergeSource, merge_loras
from charfw.lora.safetensors_io import data_sha256
from charfw.lora.svd import RankRule, resize_lora

FP32 = torch.float32


def kohya_rank(W: torch.Tensor, method: str | None, param: float | None, new_rank: int, new_conv_rank: int,
               is_4d: bool) -> int:
    """resize_lora.py's rank_resize, re-implemented on a dense float64 full SVD."""
    S = torch.linalg.svdvals(W.double().reshape(W.shape[0], -1))
    cap = new_conv_rank if is_4d else new_rank
    n = len(S)
    if method == "sv_ratio":
        index = int(torch.gt(S, S[0] / param).sum())
        rank = max(1, min(index, n - 1)) + 1
    elif method == "sv_cumulative":
        cums = torch.cumsum(S, 0) / S.sum()
        rank = max(1, min(int(torch.searchsorted(cums, torch.tensor([param], dtype=cums.dtype))[0]) + 1, n - 1)) + 1
    elif method == "sv_fro":
        cums = torch.cumsum(S**2, 0) / (S**2).sum()
        rank = max(1, min(int(torch.searchsorted(cums, torch.tensor([param**2], dtype=cums.dtype))[0]) + 1, n - 1)) + 1
    else:
        rank = cap
    if S[0] <= 1e-6:
        return 1
    return min(rank, cap)


def truncated(W: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double().reshape(W.shape[0], -1), full_matrices=False)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).reshape(W.shape)


def make_file(tmp_path: Path, name: str = "in.safetensors") -> tuple[Path, dict]:
    """Modules with designed spectra: linear, 1x1 conv, 3x3 conv, Tucker, and a zero one."""
    modules = {}
    specs = {
        NAMES["IN01"]: ((40, 30), [1.0 * k**-0.7 for k in range(1, 13)]),
        NAMES["M00"]: ((36, 50), [2.0 * k**-1.9 for k in range(1, 11)]),
        NAMES["IN04"]: ((24, 20, 1, 1), [0.5 * k**-0.4 for k in range(1, 9)]),
        NAMES["IN05"]: ((16, 6, 3, 3), [1.0 * k**-1.2 for k in range(1, 13)]),
    }
    for i, (module, (shape, sigmas)) in enumerate(specs.items()):
        up, down = spectrum_factors(shape[0], math.prod(shape[1:]), sigmas, seed=i)
        if len(shape) == 4:
            up, down = up.reshape(shape[0], -1, 1, 1), down.reshape(-1, *shape[1:])
        modules[module] = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}
    modules[NAMES["IN10"]] = locon_tucker(12, 8, 4, seed=9)
    modules[NAMES["OUT11"]] = {"lora_up.weight": torch.zeros(8, 4), "lora_down.weight": torch.randn(4, 6),
                               "alpha": torch.tensor(4.0)}
    meta = {"ss_network_dim": "12", "ss_network_alpha": "3.0", "ss_training_comment": "trained",
            "ss_network_args": json.dumps({"conv_dim": "12", "conv_alpha": "3"})}
    return save(tmp_path / name, modules, meta), modules


RULES = [
    ("sv_ratio", 16.0, 64, 64), ("sv_ratio", 4.0, 64, 64), ("sv_ratio", 16.0, 5, 64), ("sv_ratio", 16.0, 64, 3),
    ("sv_fro", 0.9, 64, 64), ("sv_fro", 0.99, 64, 64), ("sv_cumulative", 0.5, 64, 64), ("sv_cumulative", 0.85, 64, 64),
    (None, None, 5, 5), (None, None, 6, 2), (None, None, 20, 20),
]


@pytest.mark.parametrize(("method", "param", "rank", "conv_rank"), RULES)
def test_ranks_are_kohyas_and_the_qr_route_matches_dense_svd(tmp_path: Path, method: str | None, param: float | None,
                                                            rank: int, conv_rank: int) -> None:
    path, modules = make_file(tmp_path)
    lora = read_lora(path)
    rule = RankRule(method or "rank", param, rank, conv_rank)
    new, report = resize_lora(lora, rule, precision=FP32)
    out = read_lora(new.save(tmp_path / "out.safetensors").path)
    for name, tensors in modules.items():
        old = lora.modules[name]
        dense = reference_delta(tensors, old.shape)
        is_4d = tensors["lora_down.weight"].dim() == 4
        k = kohya_rank(dense / old.scale, method, param, rank, conv_rank, is_4d)
        got = out.modules[name]
        assert got.rank == k, name
        if float(dense.norm()) == 0:
            assert float(got.delta().norm()) == 0
            continue
        assert relative_error(got.delta(), truncated(dense, k)) < 1e-4, name
    assert {m.name: m.new_rank for m in report.modules} == {n: out.modules[n].rank for n in modules}
    # one alpha for the file (diffusers reads only one for attention modules): kohya's most common
    kohya_alphas = Counter(round(lora.modules[n].scale * out.modules[n].rank, 5) for n in modules)
    assert len(out.alphas()) == 1
    assert next(iter(out.alphas())) == pytest.approx(max(kohya_alphas, key=lambda a: (kohya_alphas[a], a)))


def test_kohya_pads_a_fixed_rank_above_the_modules_rank_and_tight_does_not(tmp_path: Path) -> None:
    path, modules = make_file(tmp_path)
    lora = read_lora(path)
    padded, _ = resize_lora(lora, RankRule("rank", None, 20, 20), precision=FP32)
    assert padded.modules[NAMES["M00"]].rank == 20
    assert relative_error(padded.modules[NAMES["M00"]].delta(), reference_delta(modules[NAMES["M00"]], (36, 50))) < 1e-5
    tight, _ = resize_lora(lora, RankRule("rank", None, 20, 20, tight=True), precision=FP32)
    assert tight.modules[NAMES["M00"]].rank == 10
    ratio, _ = resize_lora(lora, RankRule("sv_ratio", 4.0, tight=True), precision=FP32)
    S = torch.linalg.svdvals(reference_delta(modules[NAMES["IN01"]], (40, 30)))
    assert ratio.modules[NAMES["IN01"]].rank == int(torch.gt(S, S[0] / 4).sum())  # no kohya "+1"


def test_default_cap_is_each_modules_own_rank(tmp_path: Path) -> None:
    path, _ = make_file(tmp_path)
    lora = read_lora(path)
    new, _ = resize_lora(lora, RankRule("sv_ratio", 1000.0), precision=FP32)
    for name, module in lora.modules.items():
        assert new.modules[name].rank <= module.rank


def test_loha_lokr_and_tucker_become_lora_with_kohyas_ranks(tmp_path: Path) -> None:
    modules = {NAMES["OUT11"]: loha(20, 12, 3), NAMES["OUT05"]: loha(8, 6 * 9, 2, seed=1),
               NAMES["M00"]: lokr_full(4, 2, 5, 6, seed=2), NAMES["BASE"]: lokr_factored(4, 3, 6, 5, 2, seed=3),
               NAMES["IN10"]: locon_tucker(12, 8, 4, seed=4)}
    lora = read_lora(save(tmp_path / "in.safetensors", modules))
    new, _ = resize_lora(lora, RankRule("sv_ratio", 8.0, 64, 64), precision=FP32)
    out = read_lora(new.save(tmp_path / "out.safetensors").path)
    assert out.network_type == "LoCon" and all(m.kind == "lora" for m in out.modules.values())
    for name, tensors in modules.items():
        shape = lora.modules[name].shape
        dense = reference_delta(tensors, shape)
        k = kohya_rank(dense, "sv_ratio", 8.0, 64, 64, len(shape) == 4)
        assert out.modules[name].rank == k and out.modules[name].shape == shape
        assert relative_error(out.modules[name].delta(), truncated(dense, k)) < 1e-4, name


def test_alpha_rounding_in_fp16_is_folded_into_up(tmp_path: Path) -> None:
    up, down = spectrum_factors(64, 48, [k**-0.5 for k in range(1, 8)], seed=5)
    modules = {NAMES["IN01"]: {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}}
    lora = read_lora(save(tmp_path / "in.safetensors", modules))
    new, _ = resize_lora(lora, RankRule("rank", None, 5, 5), precision=torch.float16)
    module = read_lora(new.save(tmp_path / "out.safetensors").path).modules[NAMES["IN01"]]
    assert module.alpha != 3 / 7 * 5 and module.alpha == pytest.approx(3 / 7 * 5, rel=1e-3)  # rounded in fp16
    ref = truncated(reference_delta(modules[NAMES["IN01"]], (64, 48)), 5)
    got = module.delta().double()
    assert float((got * ref).sum() / (ref * ref).sum()) == pytest.approx(1.0, abs=5e-5)  # no systematic bias


def test_metadata_says_what_was_done_and_hashes_are_fresh(tmp_path: Path) -> None:
    path, _ = make_file(tmp_path)
    lora = read_lora(path)
    new, report = resize_lora(lora, RankRule("sv_ratio", 16.0))
    saved = new.save(tmp_path / "out.safetensors")
    meta = read_lora(saved.path).metadata
    assert meta["ss_training_comment"] == "Dynamic resize with sv_ratio: 16 from 12; trained"
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == f"{report.modules[0].alpha:g}"
    assert {m.alpha for m in report.modules} == set(read_lora(saved.path).alphas())
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "Dynamic"
    assert meta["sshs_model_hash"] == data_sha256(saved.path) != lora.metadata.get("sshs_model_hash")
    fixed, _ = resize_lora(lora, RankRule("rank", None, 4, 2))
    assert fixed.metadata["ss_network_dim"] == "4" and json.loads(fixed.metadata["ss_network_args"])["conv_dim"] == "2"
    assert fixed.metadata["ss_training_comment"].startswith("dimension is resized from 12 to 4 (conv: 2); ")
    assert 0.9 < report.fro_mean <= 1 and any("Frobenius" in line for line in report.lines())
    line = report.modules[0].line(True)
    assert "| sum(S) retained: " in line and ", fro retained: " in line and ", dynamic | dim: " in line


def test_nan_in_a_computed_factor_names_the_module(tmp_path: Path) -> None:
    """Files are checked when read; a module computed in memory is checked by the SVD."""
    lora = read_lora(save(tmp_path / "in.safetensors", {NAMES["IN01"]: lora_linear(8, 6, 2), NAMES["IN05"]: lora_conv(6, 4, 2)}))
    module = lora.modules[NAMES["IN05"]]
    down = module.tensors["lora_down.weight"].clone()
    down[1, 2, 0, 0] = float("nan")
    bad = replace(module, arrays={**module.arrays, "lora_down.weight": down})
    with pytest.raises(CharfwError, match=f"module {NAMES['IN05']}: lora_down.weight holds NaN"):
        resize_lora(lora.with_modules([lora.modules[NAMES["IN01"]], bad]), RankRule("sv_ratio", 16.0), threads=2)


# --- merging -------------------------------------------------------------------------------


def merge_inputs(tmp_path: Path) -> tuple[dict, dict]:
    a = {NAMES["IN01"]: lora_linear(24, 16, 4, seed=1), NAMES["IN05"]: lora_conv(8, 6, 3, seed=2),
         NAMES["BASE"]: lora_linear(12, 12, 2, seed=3)}
    b = {NAMES["IN01"]: lora_linear(24, 16, 6, alpha=6, seed=4), NAMES["IN05"]: locon_tucker(8, 6, 2, seed=5)}
    return a, b


def test_merge_is_the_exact_sum_at_full_rank(tmp_path: Path) -> None:
    a, b = merge_inputs(tmp_path)
    la, lb = read_lora(save(tmp_path / "a.safetensors", a)), read_lora(save(tmp_path / "b.safetensors", b))
    merged, report = merge_loras([MergeSource(la, 0.7), MergeSource(lb, -0.4)], RankRule("rank", None, 10, 10),
                                 precision=FP32)
    out = read_lora(merged.save(tmp_path / "ab.safetensors").path)
    for name in a:
        shape = la.modules[name].shape
        want = 0.7 * reference_delta(a[name], shape) + (-0.4 * reference_delta(b[name], shape) if name in b else 0)
        assert relative_error(out.modules[name].delta(), want) < 1e-5, name
        assert out.modules[name].alpha == Counter(m.rank for m in out.modules.values()).most_common(1)[0][0]
    assert out.metadata["ss_network_dim"] == "10" and "a.safetensors x0.7" in out.metadata["ss_training_comment"]
    assert out.metadata["modelspec.merged_from"] == "a, b" and len(report.modules) == 3


def test_merge_to_a_lower_rank_is_the_truncated_sum_with_block_weights(tmp_path: Path) -> None:
    a, b = merge_inputs(tmp_path)
    la, lb = read_lora(save(tmp_path / "a.safetensors", a)), read_lora(save(tmp_path / "b.safetensors", b))
    presets = load_presets()
    face = resolve_weights("FACE", "sd1", presets)  # BASE 0, IN01 1, IN05 0
    half = resolve_weights(",".join("0.5" if blk == "IN05" else "1" for blk in BLOCKS26), "sd1", presets)
    merged, _ = merge_loras([MergeSource(la, 1.0, face), MergeSource(lb, 0.5, half)], RankRule("rank", None, 3, 3),
                            precision=FP32)
    assert NAMES["BASE"] not in merged.modules  # every source's ratio is 0 there
    shape = la.modules[NAMES["IN05"]].shape
    want = 0.25 * reference_delta(b[NAMES["IN05"]], shape)  # a's IN05 is dropped by FACE
    assert relative_error(merged.modules[NAMES["IN05"]].delta(), truncated(want, 2)) < 1e-4  # b's rank is 2
    shape = la.modules[NAMES["IN01"]].shape
    want = reference_delta(a[NAMES["IN01"]], shape) + 0.5 * reference_delta(b[NAMES["IN01"]], shape)
    assert relative_error(merged.modules[NAMES["IN01"]].delta(), truncated(want, 3)) < 1e-4


def test_merge_through_dense_for_loha_and_the_clamp_only_when_asked(tmp_path: Path) -> None:
    a = {NAMES["OUT11"]: loha(10, 8, 2, seed=1)}
    b = {NAMES["OUT11"]: lora_linear(10, 8, 3, seed=2)}
    la, lb = read_lora(save(tmp_path / "a.safetensors", a)), read_lora(save(tmp_path / "b.safetensors", b))
    want = 0.6 * reference_delta(a[NAMES["OUT11"]], (10, 8)) + 0.3 * reference_delta(b[NAMES["OUT11"]], (10, 8))
    sources = [MergeSource(la, 0.6), MergeSource(lb, 0.3)]
    exact, _ = merge_loras(sources, RankRule("rank", None, 8, 8), precision=FP32)
    assert relative_error(exact.modules[NAMES["OUT11"]].delta(), want) < 1e-5
    clamped, report = merge_loras(sources, RankRule("rank", None, 8, 8), precision=FP32, clamp_quantile=0.9)
    assert relative_error(clamped.modules[NAMES["OUT11"]].delta(), want) > 1e-3
    assert "clamped" in " ".join(report.lines())


def test_merge_refuses_what_cannot_be_summed(tmp_path: Path) -> None:
    a = read_lora(save(tmp_path / "a.safetensors", {NAMES["IN01"]: lora_linear(8, 6, 2)}))
    other_shape = read_lora(save(tmp_path / "b.safetensors", {NAMES["IN01"]: lora_linear(8, 5, 2)}))
    with pytest.raises(CharfwError, match=f"module {NAMES['IN01']} changes layers of different shapes"):
        merge_loras([MergeSource(a), MergeSource(other_shape)], RankRule("rank", None, 4))
    xl = read_lora(save(tmp_path / "xl.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1": lora_linear(8, 6, 2)}))
    with pytest.raises(CharfwError, match="different base models"):
        merge_loras([MergeSource(a), MergeSource(xl)], RankRule("rank", None, 4))
    dora = lora_linear(8, 6, 2)
    dora["dora_scale"] = torch.ones(8, 1)
    d = read_lora(save(tmp_path / "d.safetensors", {NAMES["IN01"]: dora}))
    with pytest.raises(CharfwError, match="DoRA"):
        merge_loras([MergeSource(a), MergeSource(d)], RankRule("rank", None, 4))
