"""Generation on SD 3.5 (``charfw:tiny-sd35``): prompts as diffusers encodes them, exact LoRA
patching of diffusers-format files with per-block weights, ``charfw generate`` with a
ControlNet (diffusers' ``SD3ControlNetModel``), the hires fix (SD3 img2img), and the
flow-matching samplers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

PROMPT = "krnk, white background, red eyes"


@pytest.fixture(scope="module")
def generator(tiny_sd35: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from charfw.generation.pipeline import Generator

    return Generator(str(tiny_sd35), cache_dir=tmp_path_factory.mktemp("cache"), family="sd35", device="cpu")


@pytest.fixture(scope="module")
def lora_file(generator: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random rank-2 LoRA on every layer the trainer targets, in diffusers' format (alpha 1:
    its scale 0.5 is folded into lora_B when written)."""
    from charfw.lora.safetensors_io import write_safetensors
    from charfw.training.networks import create_network, network_type

    model = generator.model
    kind = network_type("lora")
    network = create_network(kind, kind.config(dim=2, alpha=1.0), model.family.network_roots(model))
    generator_ = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in network.adapters.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator_) * 0.05)
    path = tmp_path_factory.mktemp("loras") / "rnd.safetensors"
    write_safetensors(path, network.file_state_dict(), {"format": "pt"}, dtype="fp32")
    return path


def test_prompt_encoding_is_diffusers_for_plain_prompts(generator: Any) -> None:
    """Without emphasis and under 75 tokens, charfw's A1111 encoding is diffusers' own."""
    model = generator.model
    embeds = model.family.encode_prompts(model, PROMPT, "lowres", clip_skip=1, device="cpu")
    with torch.no_grad():
        expected = generator.pipe.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt="lowres",
                                                negative_prompt_2="lowres", negative_prompt_3="lowres",
                                                do_classifier_free_guidance=True, max_sequence_length=77)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, value in zip(names, expected, strict=True):
        torch.testing.assert_close(embeds[name], value, atol=1e-6, rtol=0, msg=name)
    weighted = model.family.encode_prompts(model, "krnk, (white background:1.4), red eyes", "", clip_skip=1,
                                           device="cpu")
    assert not torch.equal(weighted["prompt_embeds"], embeds["prompt_embeds"])


def test_lora_patching_is_exact_with_block_weights_and_restores(generator: Any, lora_file: Path) -> None:
    from safetensors.torch import load_file

    from charfw.generation.lora_patch import LoraSpec

    model = generator.model
    layers = {"transformer": model.unet, "text_encoder": model.text_encoders[0],
              "text_encoder_2": model.text_encoders[1]}
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    vector = [0.5, *(float(i % 4) for i in range(24))]
    generator.patcher.apply([LoraSpec(lora_file, 0.7, vector, 0.3)])
    tensors = load_file(str(lora_file))
    checked = 0
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        part, _, path = key.removesuffix(".lora_A.weight").partition(".")
        layer = layers[part].get_submodule(path)
        ratio = 0.3 * 0.5 if part != "transformer" else 0.7 * vector[1 + int(path.split(".")[1])]
        original = before[f"{path}.weight"] if part == "transformer" else None
        if original is None:
            continue
        expected = original + ratio * (tensors[key.replace("lora_A", "lora_B")] @ down)
        torch.testing.assert_close(layer.weight, expected, atol=1e-7, rtol=1e-6)
        checked += 1
    assert checked > 300
    generator.patcher.restore()
    after = model.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``SD3ControlNetModel`` folder for the tiny model (2 joint blocks)."""
    from diffusers import SD3ControlNetModel

    from charfw.training.tiny_sd35 import transformer_config

    config = {k: v for k, v in transformer_config().items() if k not in ("dual_attention_layers", "qk_norm")}
    torch.manual_seed(0)
    net = SD3ControlNetModel(**{**config, "num_layers": 2})
    with torch.no_grad():  # its output and control-input projections start at zero: make them act
        for module in (*net.controlnet_blocks, net.pos_embed_input.proj):
            module.weight.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("controlnet") / "cn"
    net.save_pretrained(folder)
    return folder


def test_generate_command_with_lora_and_controlnet(tiny_sd35: Path, lora_file: Path, controlnet: Path,
                                                   tmp_path: Path, run_cli) -> None:
    from PIL import Image

    from charfw.generation.infotext import read_png_infotext
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "pose.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} <lora:rnd:0.8>|||lowres\n", "utf-8")
    common = ["generate", prompts, "--base-model", tiny_sd35, "--lora-dir", lora_file.parent, "-W", "64", "-H", "64",
              "--steps", "3", "--sampler", "Euler", "--t5", "--cache-dir", tmp_path / "cache", "--seed", "5"]
    code, _, err = run_cli(*common, "-o", tmp_path / "plain")
    assert code == 0, err
    code, _, err = run_cli(*common, "-o", tmp_path / "again")
    assert code == 0, err
    (plain,) = (tmp_path / "plain").glob("*.png")
    (again,) = (tmp_path / "again").glob("*.png")
    assert Image.open(plain).tobytes() == Image.open(again).tobytes()  # same seed, same pixels
    info = read_png_infotext(plain) or ""
    assert "Sampler: Euler" in info and "Lora hashes" in info
    code, _, err = run_cli(*common, "-o", tmp_path / "control", "--control", tmp_path / "pose.png",
                           "--controlnet", f"{controlnet}:0.8")
    assert code == 0, err
    (controlled,) = (tmp_path / "control").glob("*.png")
    assert Image.open(controlled).tobytes() != Image.open(plain).tobytes()
    assert "ControlNet 0" in (read_png_infotext(controlled) or "")
    rows = [json.loads(line) for line in (tmp_path / "control" / "index.jsonl").read_text("utf-8").splitlines()]
    assert rows and rows[0].get("controls")


def test_flow_models_refuse_noise_prediction_samplers(generator: Any) -> None:
    from charfw.errors import CharfwError
    from charfw.generation.infotext import format_infotext
    from charfw.generation.pipeline import ImageRequest

    with pytest.raises(CharfwError, match="flow-matching"):
        list(generator.generate([ImageRequest(PROMPT, width=64, height=64, steps=2, sampler="DPM++ 2M Karras")]))
    (image,) = generator.generate([ImageRequest(PROMPT, width=64, height=64, steps=2, sampler="Euler a",
                                                clip_skip=2)])
    assert image.image.size == (64, 64) and image.params.sampler == "Euler a"
    # SD 3.5 always conditions on the penultimate CLIP states: the infotext claims no clip skip
    assert image.params.clip_skip == 1 and "Clip skip" not in format_infotext(image.params)


def test_hires_fix_runs_sd3_img2img(generator: Any, controlnet: Path) -> None:
    from PIL import Image

    from charfw.errors import CharfwError
    from charfw.generation.pipeline import ControlRequest, HiresFix, ImageRequest

    (made,) = generator.generate([ImageRequest(PROMPT, width=64, height=64, steps=2, sampler="Euler",
                                               hires=HiresFix(scale=1.5, denoise=0.5))])
    assert made.image.size == (96, 96) and made.params.denoising_strength == 0.5
    # diffusers has no SD3 ControlNet img2img pipeline: said in one line
    control = ControlRequest(Image.new("RGB", (64, 64)), str(controlnet))
    with pytest.raises(CharfwError, match="no ControlNet image-to-image pipeline") as info:
        list(generator.generate([ImageRequest(PROMPT, width=64, height=64, steps=2, sampler="Euler",
                                              controls=(control,), hires=HiresFix(scale=1.5))]))
    assert "\n" not in str(info.value)


def test_t5_encodes_the_prompt_as_diffusers_with_256_tokens(tiny_sd35: Path, tmp_path: Path) -> None:
    from charfw.generation.pipeline import Generator

    with Generator(str(tiny_sd35), cache_dir=tmp_path, device="cpu", t5_max_length=256) as generator:
        model = generator.model
        assert len(model.text_encoders) == 3 and generator.pipe.text_encoder_3 is not None
        embeds = model.family.encode_prompts(model, PROMPT, "", clip_skip=1, device="cpu")
        with torch.no_grad():
            expected, negative, _, _ = generator.pipe.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt="",
                                                                    do_classifier_free_guidance=True)
    assert embeds["prompt_embeds"].shape == (1, 77 + 256, 128)
    torch.testing.assert_close(embeds["prompt_embeds"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds["negative_prompt_embeds"], negative, atol=1e-6, rtol=0)


#: diffusers → kohya's SD3 names (reference generation-sdxl-sd3.md §2.2), q/k/v fused
_FUSED = {("attn.to_q", "attn.to_k", "attn.to_v"): "x_block_attn_qkv",
          ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "context_block_attn_qkv",
          ("attn2.to_q", "attn2.to_k", "attn2.to_v"): "x_block_attn2_qkv"}
_RENAMED = {"attn.to_out.0": "x_block_attn_proj", "attn.to_add_out": "context_block_attn_proj",
            "attn2.to_out.0": "x_block_attn2_proj", "ff.net.0.proj": "x_block_mlp_fc1", "ff.net.2": "x_block_mlp_fc2",
            "ff_context.net.0.proj": "context_block_mlp_fc1", "ff_context.net.2": "context_block_mlp_fc2"}


def test_kohya_sd3_files_apply_exactly_on_diffusers_layers(generator: Any, lora_file: Path, tmp_path: Path) -> None:
    """A kohya/ComfyUI-format SD3 LoRA (``lora_unet_joint_blocks_N_…``, fused qkv as
    sd-scripts writes it: downs stacked, ups block-diagonal, alpha = 3r) changes the
    weights exactly as the same LoRA in diffusers' format; the last block's context adaLN
    gets SD3's shift/scale halves swapped into diffusers' order."""
    from safetensors.torch import load_file, save_file

    from charfw.generation.lora_patch import LoraSpec

    peft = load_file(str(lora_file))
    kohya: dict[str, torch.Tensor] = {}
    for i in range(24):
        block = f"transformer.transformer_blocks.{i}."
        for parts, native in _FUSED.items():
            keys = [f"{block}{p}" for p in parts]
            if f"{keys[0]}.lora_A.weight" not in peft:
                continue
            downs = [peft[f"{k}.lora_A.weight"] for k in keys]
            ups = [peft[f"{k}.lora_B.weight"] for k in keys]
            kohya[f"lora_unet_joint_blocks_{i}_{native}.lora_down.weight"] = torch.cat(downs)
            kohya[f"lora_unet_joint_blocks_{i}_{native}.lora_up.weight"] = torch.block_diag(*ups)
            kohya[f"lora_unet_joint_blocks_{i}_{native}.alpha"] = torch.tensor(float(3 * downs[0].shape[0]))
        for part, native in _RENAMED.items():
            if f"{block}{part}.lora_A.weight" in peft:
                kohya[f"lora_unet_joint_blocks_{i}_{native}.lora_down.weight"] = peft[f"{block}{part}.lora_A.weight"]
                kohya[f"lora_unet_joint_blocks_{i}_{native}.lora_up.weight"] = peft[f"{block}{part}.lora_B.weight"]
    ada_down = torch.randn((2, 32), generator=torch.Generator().manual_seed(9)) * 0.1
    ada_up = torch.randn((64, 2), generator=torch.Generator().manual_seed(10)) * 0.1  # (shift, scale) rows
    kohya["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1.lora_down.weight"] = ada_down
    kohya["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1.lora_up.weight"] = ada_up
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(kohya, str(kohya_file))
    transformer = generator.model.unet
    ada = transformer.transformer_blocks[23].norm1_context.linear
    ada_before = ada.weight.detach().clone()
    vector = [1.0, *(float(i % 3) / 2 for i in range(24))]
    with torch.no_grad():
        generator.patcher.apply([LoraSpec(lora_file, 0.6, vector, 0.0)])
        expected = {k: v.clone() for k, v in transformer.state_dict().items()}
        generator.patcher.apply([LoraSpec(kohya_file, 0.6, vector, 0.0)])
        got = {k: v.clone() for k, v in transformer.state_dict().items()}
        ada_after = ada.weight.detach().clone()
    generator.patcher.restore()
    for key, value in expected.items():
        if not key.startswith("transformer_blocks.23.norm1_context"):
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-6, msg=key)
    swapped = torch.cat([ada_up[32:], ada_up[:32]]) @ ada_down  # diffusers' (scale, shift)
    torch.testing.assert_close(ada_after, ada_before + 0.6 * vector[24] * swapped, atol=1e-6, rtol=1e-6)
