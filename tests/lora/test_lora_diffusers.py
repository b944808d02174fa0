"""charfw's files in diffusers: a block-merged and a resized LoRA load with
``load_lora_weights`` into a tiny SD 1.5 pipeline and change its outputs exactly as their
ΔW predicts (the ΔW of the original modules × the block ratios, computed independently)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from kohya_names import text_encoder_targets, unet_targets
from lora_support import one_torch_thread, reference_delta

from charfw.lora.block_weights import (
    BLOCKS26,
    apply_block_weights,
    block_of,
    load_presets,
    resolve_weights,
)
from charfw.lora.file import read_lora
from charfw.lora.safetensors_io import write_safetensors
from charfw.lora.svd import RankRule, resize_lora

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

RATIOS = {"BASE": 0.5, "IN01": 0.3, "IN02": -0.5, "IN03": 0.0, "M00": 1.5, "OUT03": 0.0, "OUT05": 0.7}


@pytest.fixture(scope="module")
def pipeline(tiny_sd15: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd15)


def kohya_file(pipe, path: Path) -> dict:
    """A kohya LoRA3x3 (LoRA + conv 3x3) for every target of the pipeline, rank 4, alpha 2."""
    g = torch.Generator().manual_seed(0)
    modules = {}
    tensors = {}
    for t in unet_targets(pipe.unet, conv=True) + text_encoder_targets(pipe.text_encoder):
        cols = t.shape[1] * (t.shape[2] * t.shape[3] if t.is_conv else 1)
        up = torch.randn(t.shape[0], 4, generator=g) * 0.1
        down = torch.randn(4, cols, generator=g) * 0.1
        if t.is_conv:
            up, down = up.reshape(t.shape[0], 4, 1, 1), down.reshape(4, *t.shape[1:])
        parts = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}
        modules[t.name] = (t, parts)
        tensors.update({f"{t.name}.{k}": v for k, v in parts.items()})
    write_safetensors(path, tensors, {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_base_model_version": "sd_v1"})
    return modules


def outputs(pipe, unet=None, text_encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 300, (1, 77), generator=g)
    with torch.no_grad():
        return (unet or pipe.unet)(latents, 10, context).sample, (text_encoder or pipe.text_encoder)(ids)[0]


def patched_outputs(pipe, deltas: dict[str, tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's outputs with ``W += ΔW`` written into copies of its weights."""
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        for target, delta in deltas.values():
            weight = (unet if target.model == "unet" else te).get_submodule(target.path).weight
            weight += delta.reshape(weight.shape).to(weight.dtype)
    return outputs(pipe, unet, te)


def loaded_outputs(pipe, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    pipe.load_lora_weights(str(path), adapter_name="charfw")
    try:
        return outputs(pipe)
    finally:
        pipe.delete_adapters("charfw")


def change_error(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    """How far the change diffusers made is from the predicted change."""
    return float((got - want).norm() / (want - base).norm())


def test_a_block_merged_and_a_resized_file_change_diffusers_exactly_as_predicted(pipeline, tmp_path: Path) -> None:
    source = tmp_path / "krnk.safetensors"
    modules = kohya_file(pipeline, source)
    base_unet, base_te = outputs(pipeline)

    vector = ",".join(str(RATIOS.get(b, 1.0)) for b in BLOCKS26)
    lora = read_lora(source)
    merged, report = apply_block_weights(lora, resolve_weights(vector, lora.family, load_presets()))
    merged_path = merged.save(tmp_path / "krnk-blocks.safetensors").path
    assert report.dropped and report.scaled

    predicted = {}
    for name, (target, parts) in modules.items():
        ratio = RATIOS.get(block_of(name), 1.0)
        if ratio:
            predicted[name] = (target, ratio * reference_delta(parts, target.shape))
    want_unet, want_te = patched_outputs(pipeline, predicted)
    got_unet, got_te = loaded_outputs(pipeline, merged_path)
    assert float((want_unet - base_unet).norm() / base_unet.norm()) > 0.05  # the LoRA does change things
    assert change_error(got_unet, want_unet, base_unet) < 1e-4
    assert change_error(got_te, want_te, base_te) < 1e-4

    # a dynamic resize, loaded the same way: every module has its own rank (kohya would give
    # each its own alpha, and diffusers 0.42 reads the UNet attention q/k/v/out alphas under
    # key names it does not match, so those got the file's most common alpha); charfw
    # writes one alpha for the file with each module's factor in lora_up
    resized, _ = resize_lora(read_lora(merged_path), RankRule("sv_ratio", 1.5, tight=True))
    resized_path = resized.save(tmp_path / "krnk-blocks-sv1.5.safetensors").path
    small = read_lora(resized_path)
    attention = {m.rank for n, m in small.modules.items() if "_attn" in n and n.startswith("lora_unet_")}
    assert len(attention) > 1 and len(small.alphas()) == 1
    want_unet, want_te = patched_outputs(
        pipeline, {n: (modules[n][0], m.delta()) for n, m in small.modules.items()})
    got_unet, got_te = loaded_outputs(pipeline, resized_path)
    assert change_error(got_unet, want_unet, base_unet) < 1e-4
    assert change_error(got_te, want_te, base_te) < 1e-4
