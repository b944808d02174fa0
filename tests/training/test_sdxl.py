"""SDXL on the tiny SDXL (real topology, tiny widths): train, file format, loaders, finishing.

The issue's proof for the family: a few steps lower the loss on a fixed batch; the file's
keys are exactly sd-scripts' SDXL names derived independently from the real module tree
(:func:`kohya_names.sdxl_names`); diffusers' ``load_lora_weights`` changes the UNet and
both text encoders exactly as the file's ΔW applied by hand; a run killed with SIGKILL
resumes to the same weights; ``charfw lora blocks`` (20/12 values) and ``lora resize`` are
exact on the trained file; the SGM single file ``charfw export-model`` writes loads through
the users' path to the same model; ``charfw generate`` makes PNGs with infotext.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from kohya_names import sdxl_names
from train_support import kill_when_a_state_is_saved, make_job, one_torch_thread, write_dataset  # noqa: F401

from charfw.training import train
from charfw.training.families import get_family
from charfw.training.model_sources import resolve_source

STEPS = 4


def _job(tiny: Path, dataset: Path, out: Path, cache: Path, **settings: Any) -> Any:
    options: dict[str, Any] = {"network": "lora3x3", "max_train_steps": STEPS, "save_every_n_steps": 2,
                               "save_state": True, "save_precision": "float", "lr_scheduler": "cosine_with_restarts",
                               "family": "sdxl", "fingerprint": "sdxl-test"}
    return make_job(tiny, dataset, out, cache, **{**options, **settings})


@pytest.fixture(scope="module")
def run(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short lora3x3 run on both text encoders, with a sample image at the end."""
    root = tmp_path_factory.mktemp("sdxl")
    dataset = write_dataset(root / "data", count=4)
    prompts = root / "prompts.txt"
    prompts.write_text("krnk, (white:1.2) background --n lowres --w 64 --h 64 --d 5 --s 2 --l 5\n", "utf-8")
    lines: list[str] = []
    result = train(_job(tiny_sdxl, dataset, root / "out", root / "cache", log=lines.append,
                        sample_prompts=str(prompts), sample_every_n_steps=STEPS))
    return {"root": root, "dataset": dataset, "result": result, "lines": lines}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def base_pipe(tiny_sdxl: Path) -> Any:
    """diffusers' own SDXL pipeline on the tiny folder (tests change copies of it only)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_sdxl: Path, tmp_path: Path) -> None:
    from charfw.training.dataset import TrainingData
    from charfw.training.networks import create_network, network_type
    from charfw.training.settings import TrainSettings

    family = get_family("sdxl")
    model = family.load(resolve_source(str(tiny_sdxl), cache_dir=tmp_path), None, cache_dir=tmp_path)
    for part in (model.unet, *model.text_encoders):
        part.requires_grad_(False)
    settings = TrainSettings(network="lora", dim=4, alpha=4)
    network = create_network(network_type("lora"), settings.network_config(), family.network_roots(model))
    network.apply()
    data = TrainingData.load(write_dataset(tmp_path / "data", count=2), default_resolution=family.default_resolution)
    data.finalize()
    batch = data.epoch_batches(1, 0)[0]
    latents = torch.randn((len(batch.samples), 4, 8, 8), generator=torch.Generator().manual_seed(1))
    inputs = family.sample_inputs(batch, torch.device("cpu"))
    assert inputs["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * len(batch.samples)
    objective = family.objective(model, settings, torch.device("cpu"))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    weights = torch.ones(len(batch.samples))
    losses = []
    for _ in range(4):
        ids = family.tokenize(model, [s.caption for s in batch.samples], None)
        conditioning = family.encode_text(model, ids, clip_skip=2)
        noised = objective.noise(latents, torch.Generator().manual_seed(0))  # the same noise every step
        loss = objective.loss(family.predict(model.unet, noised.noisy, noised.timesteps, conditioning, inputs),
                              noised, weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


def test_size_and_crop_ids_are_sd_scripts(tiny_sdxl: Path) -> None:
    """sd-scripts' numbers (``get_crop_ltrb``, flip rule), worked out by hand: a 200x300 image
    in a 192x256 bucket fits inside it at 170.67x256, so its crop starts at left
    (192 - 170.67) // 2 = 10; flipped, at int(192 - (10 + 170.67)) = 11."""
    from types import SimpleNamespace

    from charfw.training.dataset import Batch, Sample

    tall = SimpleNamespace(size=(200, 300), bucket=(192, 256))
    wide = SimpleNamespace(size=(300, 200), bucket=(256, 192))
    samples = [Sample(tall, False, "", 0, 1.0), Sample(tall, True, "", 0, 1.0), Sample(wide, True, "", 0, 1.0)]
    assert [s.crop_left_top for s in samples] == [(10, 0), (11, 0), (0, 10)]
    ids = get_family("sdxl").sample_inputs(Batch(0, (192, 256), tuple(samples[:2])), torch.device("cpu"))
    assert ids["time_ids"].tolist() == [[300, 200, 0, 10, 256, 192], [300, 200, 0, 11, 256, 192]]


def test_shipped_tiny_configs_are_what_the_builder_writes(tiny_sdxl: Path) -> None:
    import json

    from charfw.training import single_file

    shipped = single_file.shipped_configs("StableDiffusionXLPipeline")
    assert set(shipped) == {"sdxl", "tiny-sdxl"}
    drop = {"_diffusers_version", "transformers_version", "_name_or_path", "dtype"}
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json"),
                       ("tokenizer_2", "tokenizer_config.json")):
        built = json.loads((tiny_sdxl / part / name).read_text())
        ours = json.loads((shipped["tiny-sdxl"] / part / name).read_text())
        assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in built.items() if k not in drop}


def test_the_file_has_sd_scripts_sdxl_names_and_metadata(run: dict[str, Any], base_pipe: Any) -> None:
    from safetensors import safe_open

    pipe = base_pipe
    expected = sdxl_names(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], conv=True)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in expected
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in expected
    assert "lora_unet_output_blocks_2_2_conv" in expected and "lora_unet_input_blocks_3_0_op" in expected
    with safe_open(str(run["result"].lora), "pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
    assert keys == {f"{n}.{s}" for n in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {n.split("_")[1] for n in expected} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["ss_clip_skip"] == "None" and "modelspec.encoder_layer" not in meta
    assert meta["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "2"}'
    assert [line for line in run["lines"] if "clip skip" in line] == [
        "clip skip 2 is ignored: sdxl conditions on fixed text-encoder layers"]
    (sample,) = run["result"].samples
    from PIL import Image

    with Image.open(sample) as image:
        assert image.size == (64, 64) and "Steps: 2" in image.text["parameters"]
        assert "Clip skip" not in image.text["parameters"]


def _hand_patched(base: Any, lora: Path) -> Any:
    """A copy of the pipeline with every module's ΔW = alpha/rank · up @ down added by hand."""
    pipe = copy.deepcopy(base)
    models = {"unet": pipe.unet, "text_encoder1": pipe.text_encoder, "text_encoder2": pipe.text_encoder_2}
    names = sdxl_names(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], conv=True)
    state = _tensors(lora)
    with torch.no_grad():
        for name, (model, path) in names.items():
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            scale = float(state[f"{name}.alpha"]) / down.shape[0]
            weight = models[model].get_submodule(path).weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            weight += scale * delta
    return pipe


def _outputs(pipe: Any) -> list[torch.Tensor]:
    """Both encoders' states and pooled vector, and one UNet prediction with size ids."""
    ids = [t(["krnk, white background"], padding="max_length", max_length=77, truncation=True,
             return_tensors="pt").input_ids for t in (pipe.tokenizer, pipe.tokenizer_2)]
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn((1, 4, 32, 32), generator=generator)
    with torch.no_grad():
        first = pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        context = torch.cat([first, second.hidden_states[-2]], dim=-1)
        added = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[96.0, 80.0, 8.0, 0.0, 256.0, 256.0]])}
        prediction = pipe.unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample
    return [context, second.text_embeds, prediction]


def test_diffusers_load_lora_weights_changes_the_output_as_the_delta_predicts(run: dict[str, Any],
                                                                              base_pipe: Any) -> None:
    base = _outputs(base_pipe)
    expected = _outputs(_hand_patched(base_pipe, run["result"].lora))
    for b, e in zip(base, expected, strict=True):
        assert (e - b).abs().max() > 1e-3  # the LoRA changed every part (else this proves nothing)
    pipe = copy.deepcopy(base_pipe)
    pipe.load_lora_weights(str(run["result"].lora))
    for got, e in zip(_outputs(pipe), expected, strict=True):
        torch.testing.assert_close(got, e, atol=1e-4, rtol=0)
    # charfw's own patcher (generation's lora_patch) gives the same model
    from charfw.generation.lora_patch import bake_lora

    ours = copy.deepcopy(base_pipe)
    applied = bake_lora(ours.unet, [ours.text_encoder, ours.text_encoder_2], run["result"].lora, family="sdxl")
    assert len(applied) == len(sdxl_names(ours.unet, [ours.text_encoder, ours.text_encoder_2], conv=True))
    for got, e in zip(_outputs(ours), expected, strict=True):
        torch.testing.assert_close(got, e, atol=1e-5, rtol=0)


_RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from test_sdxl import _job
from charfw.training import train
train(_job(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), resume="auto"))
"""


def test_resume_after_kill_ends_at_the_same_weights(run: dict[str, Any], tiny_sdxl: Path, tmp_path: Path) -> None:
    out, cache = tmp_path / "killed", run["root"] / "cache"
    here = str(Path(__file__).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, str(Path(here).parent)])}
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, here, str(tiny_sdxl), str(run["dataset"]), str(out),
                             str(cache)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when_a_state_is_saved(proc, out)
    final = out / run["result"].lora.name
    assert not final.exists()
    lines: list[str] = []
    train(_job(tiny_sdxl, run["dataset"], out, cache, resume="auto", log=lines.append))
    assert any(line.startswith("resumed from step-00000002") for line in lines), lines
    got, expected = _tensors(final), _tensors(run["result"].lora)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=key)


def _block(name: str) -> str:
    """The LBW block of an sd-scripts SDXL name, read off the name (independently of charfw)."""
    if name.startswith(("lora_te1_", "lora_te2_")):
        return "BASE"
    found = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)", name)
    assert found, name
    kind, n = found[1], int(found[2])
    return {"input_blocks": f"IN{n:02d}", "middle_block": "M00", "output_blocks": f"OUT{n:02d}"}[kind]


@pytest.mark.parametrize("layout", [20, 12])
def test_lora_blocks_is_exact_on_the_trained_file(run: dict[str, Any], tmp_path: Path, run_cli, layout: int) -> None:
    from charfw.lora.file import read_lora

    blocks20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
    blocks12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))]
    names = blocks20 if layout == 20 else blocks12
    values = [round(0.1 + 0.05 * i, 2) for i in range(layout)]
    ratio = dict(zip(names, values, strict=True))
    dest = tmp_path / "blocks.safetensors"
    code, _, err = run_cli("lora", "blocks", run["result"].lora, "--weights", ",".join(map(str, values)), "-o", dest)
    assert code == 0, err
    source, merged = read_lora(run["result"].lora), read_lora(dest)
    expected = {n for n in source.modules if ratio.get(_block(n), 0) != 0}
    assert set(merged.modules) == expected
    assert len(expected) < len(source.modules) if layout == 12 else len(expected) == len(source.modules)
    for name in expected:
        torch.testing.assert_close(merged.modules[name].delta(), ratio[_block(name)] * source.modules[name].delta(),
                                   atol=1e-7, rtol=1e-5)


def test_lora_resize_is_exact_on_the_trained_file(run: dict[str, Any], tmp_path: Path, run_cli) -> None:
    from charfw.lora.file import read_lora

    dest = tmp_path / "resized.safetensors"
    code, _, err = run_cli("lora", "resize", run["result"].lora, "--rank", "4", "--conv-rank", "4", "--tight",
                           "-o", dest)
    assert code == 0, err
    source, resized = read_lora(run["result"].lora), read_lora(dest)
    assert set(resized.modules) == set(source.modules)
    for name, module in source.modules.items():
        torch.testing.assert_close(resized.modules[name].delta(), module.delta(), atol=1e-6, rtol=1e-4)


def test_the_sgm_single_file_loads_as_the_diffusers_folder(tiny_sdxl: Path, tmp_path: Path, run_cli) -> None:
    from charfw.training import single_file

    dest = tmp_path / "tiny-sdxl.safetensors"
    code, _, err = run_cli("export-model", tiny_sdxl, dest, "--precision", "fp32")
    assert code == 0, err
    shapes = single_file.tensor_shapes(dest)
    for key in ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                "model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.up.3.block.2.conv2.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.weight",
                "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding"):
        assert key in shapes, key
    assert not any(".q_proj." in k for k in shapes if k.startswith("conditioner.embedders.1."))
    from safetensors.torch import load_file, save_file

    from charfw.errors import CharfwError

    broken = load_file(str(dest))
    del broken["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CharfwError, match=r"the OpenCLIP-G text encoder is incomplete \(3 tensors missing") as info:
        get_family("sdxl").load(resolve_source(str(tmp_path / "broken.safetensors"), cache_dir=tmp_path), None,
                                cache_dir=tmp_path)
    assert info.value.path == tmp_path / "broken.safetensors"
    family = get_family("sdxl")
    from_file = family.load(resolve_source(str(dest), cache_dir=tmp_path), None, cache_dir=tmp_path)
    from_folder = family.load(resolve_source(str(tiny_sdxl), cache_dir=tmp_path), None, cache_dir=tmp_path)
    for a, b in ((from_file.unet, from_folder.unet), (from_file.vae, from_folder.vae),
                 *zip(from_file.text_encoders, from_folder.text_encoders, strict=True)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    outputs = []
    for model in (from_file, from_folder):
        ids = family.tokenize(model, ["krnk, 1girl"], None)
        with torch.no_grad():
            conditioning = family.encode_text(model, ids, clip_skip=2)
            noisy = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))
            time_ids = {"time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])}
            outputs.append([*conditioning.values(), family.predict(model.unet, noisy, torch.tensor([400]),
                                                                    conditioning, time_ids)])
    # the same weights bit for bit (above); the outputs agree to float rounding only: on the
    # CPU the matmul kernels sum in an order that depends on the weights' memory alignment,
    # which differs between the two files' loaders (copies of the weights agree exactly)
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # generation reads a plain prompt as the trainer reads the caption (A1111's chunks per
    # encoder; the pooled vector at the end token)
    embeds = family.encode_prompts(from_folder, "krnk, 1girl", "", clip_skip=1, device=None)
    torch.testing.assert_close(embeds["prompt_embeds"], outputs[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], outputs[1][1], atol=1e-6, rtol=0)
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape


def test_charfw_generate_writes_pngs_with_infotext(run: dict[str, Any], tiny_sdxl: Path, tmp_path: Path,
                                                   run_cli) -> None:
    """A prompt with A1111 weighting and the trained LoRA as a tag; then the same with an
    SDXL ControlNet (made from the tiny UNet, its zero convolutions random), which changes
    the image and is named in the infotext."""
    import numpy as np
    from controlnet_support import make_tiny_controlnet
    from diffusers import UNet2DConditionModel
    from PIL import Image

    lora = run["result"].lora
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"krnk, (smile:1.3) <lora:{lora.stem}:0.8> --w 64 --h 64 --d 3 --s 2\n", "utf-8")
    control = tmp_path / "control.png"
    Image.new("RGB", (64, 64), (250, 250, 250)).save(control)
    net = make_tiny_controlnet(UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"), tmp_path / "cn", 1)
    common = [prompts, "--base-model", tiny_sdxl, "--lora-dir", lora.parent, "--cache-dir", run["root"] / "cache"]
    made = []
    for name, extra in (("plain", []), ("control", ["--control", control, "--controlnet", f"{net}:0.8"])):
        code, _, err = run_cli("generate", *common, "-o", tmp_path / name, *extra)
        assert code == 0, err
        (image,) = sorted((tmp_path / name).glob("*.png"))
        with Image.open(image) as im:
            made.append((np.asarray(im.convert("RGB"), dtype=np.int16), im.text["parameters"], im.size))
    (plain, text, size), (controlled, control_text, _) = made
    assert size == (64, 64) and text.startswith("krnk, (smile:1.3)") and "Steps: 2" in text
    assert f"{lora.stem}: " in text and "Clip skip" not in text
    assert "ControlNet 0" in control_text and "Model: cn, Weight: 0.8" in control_text
    assert np.abs(plain - controlled).max() > 0
