"""charfw.generation.lora_patch on the tiny SD 1.5 UNet and text encoder.

Every expected weight is computed here, independently of charfw's ΔW code: the modules'
ΔW come from :func:`lora_support.reference_delta` (the factors run as layers, in float64)
and module → block from the diffusers path, not from :mod:`charfw.lora.block_weights`.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kohya_names import Target, text_encoder_targets, unet_targets
from lora_support import (
    loha,
    lora_conv,
    lora_linear,
    one_torch_thread,
    reference_delta,
    save,
)

from charfw.errors import CharfwError
from charfw.generation.lora_patch import LoraPatcher, LoraSpec, bake_lora, patched

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

Models = tuple[Any, Any]
#: (model, parameter name) → tensor
State = dict[tuple[str, str], torch.Tensor]
#: kohya module name → (its layer, its tensors by suffix)
Modules = dict[str, tuple[Target, dict[str, torch.Tensor]]]

REPO = Path(__file__).resolve().parents[2]


# --- the model and its files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_models(tiny_sd15: Path) -> Models:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd15 / "text_encoder").eval()
    return unet, text_encoder


@pytest.fixture
def models(base_models: Models) -> Models:
    """Fresh copies for each test: a failing test cannot leave weights changed for the next."""
    return copy.deepcopy(base_models[0]), copy.deepcopy(base_models[1])


def all_targets(models: Models, *, conv: bool = True) -> list[Target]:
    return unet_targets(models[0], conv=conv) + text_encoder_targets(models[1])


def make_modules(targets: list[Target], kind: str, *, seed: int = 0, rank: int = 4) -> Modules:
    """A module of ``kind`` (lora, locon, loha) for every target, each with its own seed."""
    out: Modules = {}
    for i, t in enumerate(targets):
        s = seed * 1000 + i
        alpha = float(1 + i % 3)  # per-module alphas: 1, 2, 3
        if kind == "loha":
            cols = math.prod(t.shape[1:])
            out[t.name] = (t, loha(t.shape[0], cols, rank, alpha=alpha, seed=s))
        elif t.is_conv:
            out[t.name] = (t, lora_conv(t.shape[0], t.shape[1], rank, k=t.shape[2], alpha=alpha, seed=s))
        else:
            out[t.name] = (t, lora_linear(t.shape[0], t.shape[1], rank, alpha=alpha, seed=s))
    return out


def write(path: Path, modules: Modules) -> Path:
    return save(path, {name: parts for name, (_, parts) in modules.items()})


@pytest.fixture(scope="module")
def files(base_models: Models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Modules]]:
    """LoRA (attention only), LoCon (conv 3x3 too), LoHa, a resized file with mixed ranks (one
    alpha, so mixed scales), and a second LoCon: each file with the tensors it holds."""
    from charfw.lora.file import read_lora
    from charfw.lora.svd import RankRule, resize_lora

    root = tmp_path_factory.mktemp("loras")
    out: dict[str, tuple[Path, Modules]] = {}
    attention = all_targets(base_models, conv=False)
    everything = all_targets(base_models)
    for name, targets, kind, seed in (("lora", attention, "lora", 1), ("locon", everything, "locon", 2),
                                      ("loha", everything, "loha", 3), ("locon2", everything, "locon", 4)):
        modules = make_modules(targets, kind, seed=seed)
        out[name] = (write(root / f"{name}.safetensors", modules), modules)
    wide = make_modules(everything, "locon", seed=5, rank=8)
    resized, _ = resize_lora(read_lora(write(root / "wide.safetensors", wide)), RankRule("sv_ratio", 2.5))
    path = resized.save(root / "resized.safetensors", precision="fp32").path
    by_name = {t.name: t for t in everything}
    small = read_lora(path)
    out["resized"] = (path, {n: (by_name[n], {k: v.clone() for k, v in m.tensors.items()})
                             for n, m in small.modules.items()})
    return out


# --- expected weights, computed here -------------------------------------------------------------


def snapshot(models: Models) -> State:
    state: State = {}
    for label, model in zip(("unet", "text_encoder"), models, strict=True):
        for name, param in model.named_parameters():
            state[(label, name)] = param.detach().clone()
    return state


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(a: State, b: State) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(bits(a[key]), bits(b[key])), key


def deltas(modules: Modules, coefficient: Callable[[Target], float]) -> dict[tuple[str, str], torch.Tensor]:
    """(model, weight name) → coefficient × reference ΔW (float64), for non-zero coefficients."""
    out = {}
    for target, parts in modules.values():
        c = coefficient(target)
        if c:
            out[(target.model, f"{target.path}.weight")] = c * reference_delta(parts, target.shape)
    return out


def add(*terms: dict[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    total: dict[tuple[str, str], torch.Tensor] = {}
    for term in terms:
        for key, d in term.items():
            total[key] = total[key] + d if key in total else d
    return total


def assert_patched(before: State, models: Models, expected: dict[tuple[str, str], torch.Tensor]) -> None:
    """Weights with a ΔW are the originals + ΔW (float32 rounding); all others are untouched."""
    assert expected
    after = snapshot(models)
    largest = 0.0
    for key, value in after.items():
        if key in expected:
            want = before[key].double() + expected[key].reshape(value.shape)
            torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=2e-6, msg=str(key))
            largest = max(largest, float(expected[key].abs().max()))
        else:
            assert torch.equal(bits(value), bits(before[key])), key
    assert largest > 0.05  # the LoRA changes the weights visibly: the comparison proves something


def block_of_path(target: Target) -> str | None:
    """The LBW block of a layer from its diffusers path (SD 1.x), written out for the test."""
    if target.model == "text_encoder":
        return "BASE"
    p = target.path
    if m := re.match(r"down_blocks\.(\d)\.(?:attentions|resnets)\.(\d)\.", p):
        return f"IN{1 + 3 * int(m[1]) + int(m[2]):02d}"
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.", p):
        return f"IN{3 + 3 * int(m[1]):02d}"
    if p.startswith("mid_block."):
        return "M00"
    if m := re.match(r"up_blocks\.(\d)\.(?:attentions|resnets)\.(\d)\.", p):
        return f"OUT{3 * int(m[1]) + int(m[2]):02d}"
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.", p):
        return f"OUT{3 * int(m[1]) + 2:02d}"
    return None


BLOCK_NAMES = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))


# --- weight 0 and restoring ---------------------------------------------------------------------


def test_weight_zero_is_no_lora(files: dict, models: Models) -> None:
    before = snapshot(models)
    path = files["locon"][0]
    with patched(models[0], [models[1]], [LoraSpec(path, 0.0)]) as patcher:
        assert_bit_identical(snapshot(models), before)
        assert patcher.touched == 0
        (applied,) = patcher.applied
        assert applied.modules == 0 and applied.skipped == len(files["locon"][1])
    # the text encoder weight alone: the UNet is changed, the text encoder is not
    with patched(models[0], [models[1]], [LoraSpec(path, 1.0, te_weight=0.0)]):
        after = snapshot(models)
        assert all(torch.equal(bits(after[k]), bits(before[k])) for k in before if k[0] == "text_encoder")
        assert any(not torch.equal(after[k], before[k]) for k in before if k[0] == "unet")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weights_are_bit_identical_after_the_block(files: dict, models: Models, dtype: torch.dtype) -> None:
    unet, text_encoder = models[0].to(dtype), models[1].to(dtype)
    before = snapshot(models)
    specs = [LoraSpec(files["locon"][0], 0.8), LoraSpec(files["loha"][0], -1.3, blocks="FACE")]
    with patched(unet, [text_encoder], specs) as patcher:
        assert patcher.touched > 200
        assert any(not torch.equal(v, before[k]) for k, v in snapshot(models).items())
    assert_bit_identical(snapshot(models), before)
    with pytest.raises(RuntimeError, match="inside"), patched(unet, [text_encoder], specs):
        raise RuntimeError("inside the block")
    assert_bit_identical(snapshot(models), before)


# --- exact ΔW --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "resized"])
def test_a_lora_at_weight_w_adds_w_times_its_reference_delta(files: dict, models: Models, kind: str) -> None:
    path, modules = files[kind]
    if kind == "resized":  # a dynamic resize: each module has its own rank, so its own alpha / rank
        ranks = {parts["lora_down.weight"].shape[0] for _, parts in modules.values()}
        scales = {float(parts["alpha"]) / parts["lora_down.weight"].shape[0] for _, parts in modules.values()}
        assert len(ranks) > 2 and len(scales) > 2
    if kind in ("locon", "loha"):
        assert any(t.is_3x3 for t, _ in modules.values())
    before = snapshot(models)
    with patched(models[0], [models[1]], [LoraSpec(path, 0.7)]):
        assert_patched(before, models, deltas(modules, lambda t: 0.7))
    assert_bit_identical(snapshot(models), before)


def test_the_text_encoder_has_its_own_weight(files: dict, models: Models) -> None:
    path, modules = files["locon"]
    before = snapshot(models)
    with patched(models[0], [models[1]], [LoraSpec(path, 0.8, te_weight=-0.5)]):
        assert_patched(before, models, deltas(modules, lambda t: -0.5 if t.model == "text_encoder" else 0.8))


def test_two_loras_add_up_in_any_order(files: dict, models: Models, base_models: Models) -> None:
    (a, mod_a), (b, mod_b) = files["locon"], files["loha"]
    before = snapshot(models)
    specs = [LoraSpec(a, 0.6), LoraSpec(b, -0.4, te_weight=0.3)]
    with patched(models[0], [models[1]], specs):
        assert_patched(before, models, add(deltas(mod_a, lambda t: 0.6),
                                           deltas(mod_b, lambda t: 0.3 if t.model == "text_encoder" else -0.4)))
        forward = snapshot(models)
        other = copy.deepcopy(base_models[0]), copy.deepcopy(base_models[1])
        with patched(other[0], [other[1]], specs[::-1]):  # the same bits, whatever the order
            assert_bit_identical(snapshot(other), forward)


def test_block_weights_patch_only_their_blocks(files: dict, models: Models) -> None:
    path, modules = files["locon"]
    ratios = {"BASE": 1.0, "IN01": 1.0, "IN03": 1.0, "IN05": 0.5, "M00": 1.0, "OUT05": 1.0, "OUT11": -1.0}
    vector = [ratios.get(b, 0.0) for b in BLOCK_NAMES]
    blocks_of = {block_of_path(t) for t, _ in modules.values()}
    assert set(ratios) <= blocks_of and None not in blocks_of  # every weighted block has modules
    before = snapshot(models)
    with patched(models[0], [models[1]], [LoraSpec(path, 0.9, blocks=vector)]) as patcher:
        assert_patched(before, models, deltas(modules, lambda t: 0.9 * ratios.get(block_of_path(t) or "", 0.0)))
        (applied,) = patcher.applied
        assert applied.weights is not None and applied.weights.values == tuple(vector)
        assert applied.skipped == sum(1 for t, _ in modules.values() if block_of_path(t) not in ratios)


def test_a_preset_is_its_vector(files: dict, models: Models, base_models: Models) -> None:
    face = "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1,1,1,0,1,1,1,0,0,1"  # templates/block-weights/presets.yaml
    path = files["loha"][0]
    with patched(models[0], [models[1]], [LoraSpec(path, 1.2, blocks="face")]):
        by_name = snapshot(models)
    other = copy.deepcopy(base_models[0]), copy.deepcopy(base_models[1])
    with patched(other[0], [other[1]], [LoraSpec(path, 1.2, blocks=face)]):
        assert_bit_identical(snapshot(other), by_name)
    assert_bit_identical(snapshot(models), snapshot(base_models))


def test_mixed_precision_rounds_once(files: dict, models: Models) -> None:
    """fp16 weights: ΔW of both LoRAs summed in float32, added to W in float32, cast once."""
    unet, text_encoder = models[0].half(), models[1].half()
    before = snapshot(models)
    (a, mod_a), (b, mod_b) = files["locon"], files["resized"]
    expected = add(deltas(mod_a, lambda t: 0.7), deltas(mod_b, lambda t: 0.6))
    with patched(unet, [text_encoder], [LoraSpec(a, 0.7), LoraSpec(b, 0.6)]):
        after = snapshot(models)
    for key, d in expected.items():
        exact = before[key].double() + d.reshape(before[key].shape)
        rounded_once = exact.half().double()  # the best fp16 can do
        error = (after[key].double() - exact).abs()
        assert bool((error <= (rounded_once - exact).abs() + 1e-6).all()), key
    assert_bit_identical(snapshot(models), before)


def test_a_full_module_changes_weight_and_bias(models: Models, tmp_path: Path) -> None:
    (target,) = [t for t in text_encoder_targets(models[1]) if t.path.endswith("layers.0.mlp.fc1")]
    g = torch.Generator().manual_seed(7)
    diff, diff_b = torch.randn(*target.shape, generator=g), torch.randn(target.shape[0], generator=g)
    path = save(tmp_path / "full.safetensors", {target.name: {"diff": diff, "diff_b": diff_b}})
    before = snapshot(models)
    with patched(models[0], [models[1]], [LoraSpec(path, 0.5)]):
        after = snapshot(models)
        for suffix, change in (("weight", diff), ("bias", diff_b)):
            key = ("text_encoder", f"{target.path}.{suffix}")
            torch.testing.assert_close(after[key], before[key] + 0.5 * change)
    assert_bit_identical(snapshot(models), before)


# --- the patcher: once per set ----------------------------------------------------------------


@pytest.fixture
def delta_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts every ΔW charfw computes."""
    import charfw.lora.delta as delta

    calls: list[int] = []
    real = delta.module_delta

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(delta, "module_delta", counting)
    yield calls


def test_the_patcher_applies_a_set_once(files: dict, models: Models, base_models: Models,
                                        delta_calls: list[int], tmp_path: Path) -> None:
    before = snapshot(models)
    (a, mod_a), (b, mod_b) = files["locon"], files["lora"]
    n = len(mod_a) + len(mod_b)

    def fresh(specs: list[LoraSpec]) -> State:
        other = copy.deepcopy(base_models[0]), copy.deepcopy(base_models[1])
        with patched(other[0], [other[1]], specs):
            return snapshot(other)

    with LoraPatcher(models[0], [models[1]]) as patcher:
        assert patcher.apply([LoraSpec(a, 0.7), LoraSpec(b, 1.0)])
        assert len(delta_calls) == n and patcher.applications == 1
        first = snapshot(models)
        for _ in range(3):  # the next prompts name the same LoRAs, in another order
            assert not patcher.apply([LoraSpec(b), LoraSpec(str(a), 0.7)])
        assert len(delta_calls) == n and patcher.applications == 1
        assert_bit_identical(snapshot(models), first)

        changed = [LoraSpec(a, 0.5), LoraSpec(b, 1.0)]
        assert patcher.apply(changed)
        assert len(delta_calls) == 2 * n and patcher.applications == 2
        assert_bit_identical(snapshot(models), fresh(changed))

        only_b = [LoraSpec(b, 1.0)]  # a's extra modules (the conv layers) go back to the original
        assert patcher.apply(only_b)
        assert_bit_identical(snapshot(models), fresh(only_b))

        copy_of_a = tmp_path / "a.safetensors"  # a file rewritten on disk is applied again
        copy_of_a.write_bytes(a.read_bytes())
        assert patcher.apply([LoraSpec(copy_of_a, 0.4)])
        calls = len(delta_calls)
        write(copy_of_a, make_modules(all_targets(models), "locon", seed=9))
        assert patcher.apply([LoraSpec(copy_of_a, 0.4)]) and len(delta_calls) == calls + len(mod_a)

        assert patcher.apply([])
        assert_bit_identical(snapshot(models), before)
        assert not patcher.apply([])
        patcher.apply([LoraSpec(a, 0.3)])
    assert_bit_identical(snapshot(models), before)  # leaving the block restores


# --- errors ---------------------------------------------------------------------------------


def _bad_file(tmp_path: Path, models: Models, problem: str) -> Path:
    targets = all_targets(models)
    modules = make_modules(targets[:3] + targets[-3:], "locon", seed=11)
    parts = next(iter(modules.values()))[1]
    if problem == "names":
        modules["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"] = (targets[0], {k: v.clone() for k, v in parts.items()})
    elif problem == "nan":
        parts["lora_up.weight"][0, 0] = float("nan")
    elif problem == "inf":
        parts["lora_down.weight"][0, 0] = float("inf")
    elif problem == "shape":
        t = next(t for t in targets if not t.is_conv)
        modules[t.name] = (t, lora_linear(t.shape[0] + 8, t.shape[1], 4))
    elif problem == "dora":
        parts["dora_scale"] = torch.ones(4)
    elif problem == "unknown":
        parts["ia3_w"] = torch.ones(4)
    return write(tmp_path / f"bad-{problem}.safetensors", modules)


ERRORS = {
    "names": ("1 module(s) of the file are not in this model", "another model family"),
    "nan": ("holds NaN values", None),
    "inf": ("holds Inf values", None),
    "shape": ("changes a layer of shape", "another model family"),
    "dora": ("DoRA", None),
    "unknown": ("tensors charfw cannot apply", None),
    "preset": ("unknown block-weight preset 'FACES'", "did you mean 'FACE'"),
    "length": ("24 values is not a block layout", None),
    "sdxl": ("20 block weights is a SDXL layout", None),
    "missing": ("no such file", None),
}


@pytest.mark.parametrize("problem", list(ERRORS))
def test_errors_are_one_line_and_change_nothing(files: dict, models: Models, tmp_path: Path, problem: str) -> None:
    good = files["lora"][0]
    if problem in ("preset", "length", "sdxl"):
        spec = LoraSpec(good, blocks={"preset": "FACES", "length": [1.0] * 24, "sdxl": [1.0] * 20}[problem])
    elif problem == "missing":
        spec = LoraSpec(tmp_path / "missing.safetensors")
    else:
        spec = LoraSpec(_bad_file(tmp_path, models, problem))
    with LoraPatcher(models[0], [models[1]]) as patcher:
        patcher.apply([LoraSpec(good, 0.5)])
        applied, state = patcher.applied, snapshot(models)
        with pytest.raises(CharfwError) as info:
            patcher.apply([LoraSpec(good, 0.5), spec])
        message = str(info.value)
        assert "\n" not in message and spec.path.name in message
        text, hint = ERRORS[problem]
        assert text in message and (hint is None or hint in message), message
        assert patcher.applied == applied  # nothing was written: the set before stays applied
        assert_bit_identical(snapshot(models), state)


def test_a_bad_vector_is_refused_when_the_spec_is_made(files: dict) -> None:
    with pytest.raises(CharfwError, match=r"value 2 \('x'\) is not a number") as info:
        LoraSpec(files["lora"][0], blocks="1,x,1")
    assert files["lora"][0].name in str(info.value)
    with pytest.raises(CharfwError, match="weight: nan is not a finite number"):
        LoraSpec(files["lora"][0], float("nan"))


# --- baking, and the import -----------------------------------------------------------------


def test_bake_lora_is_the_patch_made_permanent(files: dict, models: Models, base_models: Models) -> None:
    path, modules = files["loha"]
    other = copy.deepcopy(base_models[0]), copy.deepcopy(base_models[1])
    with patched(other[0], [other[1]], [LoraSpec(path, 0.7)]):
        want = snapshot(other)
    assert bake_lora(models[0], [models[1]], path, multiplier=0.7) == sorted(modules)
    assert_bit_identical(snapshot(models), want)


def test_importing_the_module_loads_no_torch() -> None:
    code = "import sys, charfw.generation.lora_patch; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
