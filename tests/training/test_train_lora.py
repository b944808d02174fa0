"""Train lora, lora3x3 and loha on the tiny model; load the files as UIs and diffusers do.

The proof the issue asks for: a LoRA trained by charfw, loaded with diffusers'
``load_lora_weights`` into the tiny pipeline, reproduces the trainer's own UNet and
text-encoder outputs (to 1e-4); the same for lora3x3; LoHa (which diffusers cannot read)
through charfw's loader, which bakes ΔW into the weights. The file itself is checked
against kohya's format: names, tensor shapes and dtypes, 0-dim alphas, ss_* metadata and
the sshs hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import make_job, one_torch_thread, write_dataset  # noqa: F401 (fixture)

from charfw.training import train

PROMPT = "krnk, white background, tag1"


def _pipeline(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _outputs(unet: Any, text_encoder: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Text conditioning with clip skip 2 (as the trainer uses it) and one UNet prediction."""
    ids = tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(7)
    # 32x32 latents: at 8x8 the last level is 1x1 and its GroupNorm (2 values per group)
    # turns float rounding into 1e-3 differences
    latents = torch.randn((1, 4, 32, 32), generator=generator)
    with torch.no_grad():
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        states = text_encoder.final_layer_norm(hidden)
        prediction = unet(latents, torch.tensor([500]), states).sample
    return states, prediction


@pytest.fixture(scope="module")
def trained(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short run per network type, with the trainer's own outputs captured at the end."""
    root = tmp_path_factory.mktemp("train-lora")
    dataset = write_dataset(root / "data", count=4)
    prompts = root / "prompts.txt"
    prompts.write_text("# a sample\nkrnk, white background --n lowres --w 64 --h 64 --d 5 --s 2 --l 5\n", "utf-8")
    runs: dict[str, Any] = {}
    for network in ("lora", "lora3x3", "loha"):
        captured: dict[str, Any] = {}

        def capture(model: Any, net: Any, captured: dict[str, Any] = captured, out: Path = root / network) -> None:
            captured["own"] = _outputs(model.unet, model.text_encoders[0], model.tokenizers[0])
            captured["deltas"] = net.delta_weights()
            last = sorted(out.rglob("*_000003_00_5.png"))
            if last:  # the last sample, made again from its infotext by generate's code
                captured["regenerated"] = _regenerate(model, last[0])

        extra: dict[str, Any] = {}
        if network == "lora3x3":  # also: sampling during training and TensorBoard logs
            extra = {"sample_prompts": str(prompts), "sample_every_n_steps": 2, "log_with": "tensorboard"}
        job = make_job(tiny_sd15, dataset, root / network, root / "cache", network=network, save_precision="float",
                       after_training=capture, **extra)
        runs[network] = {"result": train(job), **captured, "root": root / network}
    return runs


def _regenerate(model: Any, sample: Path) -> Any:
    """The image :meth:`Generator.from_loaded` makes on the trainer's parts (the network
    still attached) for the request a sample PNG's infotext describes."""
    from charfw.generation.infotext import parse_infotext, read_png_infotext
    from charfw.generation.pipeline import Generator, ImageRequest

    params = parse_infotext(read_png_infotext(sample) or "")
    request = ImageRequest(prompt=params.prompt, negative=params.negative, seed=params.seed, width=params.width,
                           height=params.height, steps=params.steps, cfg_scale=params.cfg_scale,
                           sampler=params.sampler, clip_skip=params.clip_skip or 1)
    for part in (model.unet, *model.text_encoders):
        part.eval()
    with Generator.from_loaded(model, device="cpu", dtype=torch.float32) as generator:
        (made,) = generator.generate([request])
    return made.image


@pytest.mark.parametrize("network", ["lora", "lora3x3"])
def test_diffusers_load_lora_weights_reproduces_the_trainer(trained: dict[str, Any], tiny_sd15: Path,
                                                            network: str) -> None:
    run = trained[network]
    base = _pipeline(tiny_sd15)
    base_states, base_prediction = _outputs(base.unet, base.text_encoder, base.tokenizer)
    own_states, own_prediction = run["own"]
    # the LoRA changed both models (otherwise the comparison below proves nothing)
    assert (own_states - base_states).abs().max() > 1e-3
    assert (own_prediction - base_prediction).abs().max() > 1e-3
    pipe = _pipeline(tiny_sd15)
    pipe.load_lora_weights(str(run["result"].lora))
    states, prediction = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    torch.testing.assert_close(states, own_states, atol=1e-4, rtol=0)
    torch.testing.assert_close(prediction, own_prediction, atol=1e-4, rtol=0)


@pytest.mark.parametrize("network", ["lora", "lora3x3", "loha"])
def test_charfws_loader_reproduces_the_trainer(trained: dict[str, Any], tiny_sd15: Path, network: str) -> None:
    from charfw.generation.lora_patch import bake_into_pipeline

    run = trained[network]
    pipe = _pipeline(tiny_sd15)
    applied = bake_into_pipeline(pipe, run["result"].lora)
    assert set(applied) == set(run["deltas"])
    states, prediction = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    own_states, own_prediction = run["own"]
    assert (own_prediction - _outputs(*_parts(_pipeline(tiny_sd15)))[1]).abs().max() > 1e-3
    torch.testing.assert_close(states, own_states, atol=1e-4, rtol=0)
    torch.testing.assert_close(prediction, own_prediction, atol=1e-4, rtol=0)


def _parts(pipe: Any) -> tuple[Any, Any, Any]:
    return pipe.unet, pipe.text_encoder, pipe.tokenizer


def test_file_keys_tensors_and_metadata_are_kohyas(trained: dict[str, Any], tiny_sd15: Path) -> None:
    from safetensors import safe_open

    from charfw.training.families import get_family
    from charfw.training.networks.targets import enumerate_targets

    pipe = _pipeline(tiny_sd15)
    roots = get_family("sd1").roots_for(pipe.unet, [pipe.text_encoder])
    for network, suffixes in (("lora", ("lora_down.weight", "lora_up.weight", "alpha")),
                              ("lora3x3", ("lora_down.weight", "lora_up.weight", "alpha")),
                              ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"))):
        path = trained[network]["result"].lora
        with safe_open(str(path), "pt") as fh:
            keys = set(fh.keys())
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in keys}
        layers = {t.name: t.layer for t in enumerate_targets(roots, conv3x3=network != "lora")}
        assert {k.split(".")[0] for k in keys} == set(layers)
        assert keys == {f"{name}.{s}" for name in layers for s in suffixes}
        for name, layer in layers.items():
            assert tensors[f"{name}.alpha"].ndim == 0
            if network != "loha":
                down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
                assert up.shape[0] == layer.weight.shape[0] and down.shape[1] == layer.weight.shape[1]
                assert down.shape[2:] == layer.weight.shape[2:]
        assert meta["ss_network_module"] == ("lycoris.kohya" if network == "loha" else "networks.lora")
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
        assert meta["ss_steps"] == "3" and meta["ss_max_train_steps"] == "3" and meta["ss_clip_skip"] == "2"
        assert meta["ss_output_name"] == path.stem == f"krnk-{ {'lora': 'Lora1x1', 'lora3x3': 'Lora3x3', 'loha': 'Loha'}[network]}A50p-AdamW-4-10000-3"
        assert json.loads(meta["ss_tag_frequency"]) == {
            "krnk girl_flip_face": {"krnk": 4, "white background": 4, "tag0": 1, "tag1": 1, "tag2": 1, "tag3": 1}}
        assert json.loads(meta["ss_dataset_dirs"]) == {"krnk girl_flip_face": {"n_repeats": 2, "img_count": 4}}
        assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["class_tokens"] == "krnk girl"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["ss_cache_latents"] == "True"  # no color_aug: every latent came from the cache
        if network == "lora3x3":
            assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
        # sshs_model_hash is the sha256 of the data section (A1111's "addnet" hash)
        data = path.read_bytes()
        header = int.from_bytes(data[:8], "little")
        assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header :]).hexdigest()
        assert len(meta["sshs_legacy_hash"]) == 8


def test_default_precision_is_fp16(tiny_sd15: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    dataset = write_dataset(tmp_path / "data", count=2)
    result = train(make_job(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache", max_train_steps=1))
    with safe_open(str(result.lora), "pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
        assert fh.metadata()["ss_mixed_precision"] == "no"  # a CPU trains in float32
    assert dtypes == {torch.float16}


def test_latents_encoded_every_step_are_said_truthfully(tiny_sd15: Path, tmp_path: Path) -> None:
    """color_aug makes the trainer encode those images every step: the log says where to
    switch it off and the file's metadata does not claim cached latents."""
    from safetensors import safe_open

    from charfw import console

    console.reset_once()
    lines: list[str] = []
    dataset = write_dataset(tmp_path / "data", count=2, color_aug=True)
    result = train(make_job(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache", max_train_steps=1,
                            mixed_precision="fp16", log=lines.append))
    assert any("are encoded every step: color_aug or random_crop is on (set them to false in the dataset "
               "config to cache latents)" in line for line in lines)
    with safe_open(str(result.lora), "pt") as fh:
        assert fh.metadata()["ss_cache_latents"] == "False"
    # a second run (another part of a build): notices that are the same for every part are not repeated
    if not torch.cuda.is_available():
        assert "mixed precision fp16 needs a GPU; training in float32 on this machine" in lines
    again: list[str] = []
    train(make_job(tiny_sd15, dataset, tmp_path / "out2", tmp_path / "cache", max_train_steps=1,
                   mixed_precision="fp16", log=again.append))
    assert any("are encoded every step: color_aug or random_crop is on" in line for line in again)
    assert not [line for line in again if "mixed precision" in line or "set them to false" in line]


def test_samples_and_tensorboard_logs(trained: dict[str, Any]) -> None:
    result = trained["lora3x3"]["result"]
    names = sorted(p.name for p in result.samples)
    # every 2 steps (step 2) and at the end (step 3), one prompt with seed 5
    assert names == [f"{result.name}_000002_00_5.png", f"{result.name}_000003_00_5.png"]
    from PIL import Image

    assert Image.open(result.samples[0]).size == (64, 64)
    events = list((trained["lora3x3"]["root"] / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_samples_carry_infotext_and_are_generates_images(trained: dict[str, Any]) -> None:
    """A training sample is made by the generation package: its PNG carries A1111's
    infotext, and the same request through ``Generator.from_loaded`` on the trainer's parts
    gives the same pixels."""
    import numpy as np
    from PIL import Image

    from charfw.generation.infotext import parse_infotext, read_png_infotext

    run = trained["lora3x3"]
    last = run["result"].samples[-1]
    params = parse_infotext(read_png_infotext(last) or "")
    assert (params.prompt, params.negative, params.seed, params.steps) == ("krnk, white background", "lowres", 5, 2)
    assert (params.width, params.height, params.cfg_scale) == (64, 64, 5.0)
    assert params.model_name == "tiny-sd15"
    with Image.open(last) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert np.array_equal(pixels, np.asarray(run["regenerated"].convert("RGB")))
    # the step-2 sample was made by another state of the LoRA: the comparison can fail
    with Image.open(run["result"].samples[0]) as earlier:
        assert not np.array_equal(pixels, np.asarray(earlier.convert("RGB")))


def test_continue_from_an_existing_lora(trained: dict[str, Any], tiny_sd15: Path, tmp_path: Path) -> None:
    """The seed's "continue" argument: training starts from the file's weights (dims and
    alphas from the file); a file of another network type is refused with a reason."""
    from safetensors.torch import load_file

    from charfw.errors import CharfwError

    start = trained["lora"]["result"].lora
    dataset = write_dataset(tmp_path / "data", count=2)
    # a learning rate so small that one step leaves the weights where they started
    result = train(make_job(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache", continue_from=str(start),
                            learning_rate=1e-12, max_train_steps=1, save_precision="float"))
    before, after = load_file(str(start)), load_file(str(result.lora))
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0, msg=key)
    with pytest.raises(CharfwError, match="the file is a loha network; continue it with network: loha"):
        train(make_job(tiny_sd15, dataset, tmp_path / "x", tmp_path / "cache", network="lora",
                       continue_from=str(trained["loha"]["result"].lora), max_train_steps=1))


@pytest.mark.parametrize("options", [
    {"optimizer": "Adafactor", "gradient_checkpointing": True, "min_snr_gamma": 5.0, "noise_offset": 0.05},
    {"optimizer": "Prodigy", "learning_rate": 1.0, "lr_scheduler": "cosine", "lr_warmup_steps": 0.5,
     "max_token_length": 150},
    {"optimizer": "AdamW", "lr_scheduler": "polynomial", "gradient_accumulation_steps": 2, "max_train_epochs": 2,
     "save_every_n_epochs": 1, "save_last_n": 1, "images": 3},
], ids=["adafactor-ckpt-minsnr-offset", "prodigy-cosine-warmup-longprompt", "adamw-accumulate-epochs"])
def test_optimizers_schedules_and_options_run(tiny_sd15: Path, tmp_path: Path, options: dict[str, Any]) -> None:
    from safetensors import safe_open

    options = dict(options)
    dataset = write_dataset(tmp_path / "data", count=options.pop("images", 2), repeats=2)
    job = make_job(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache", **{"max_train_steps": 2, **options})
    result = train(job)
    with safe_open(str(result.lora), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert meta["ss_optimizer"].split(".")[-1].split("(")[0] == {"Adafactor": "Adafactor", "Prodigy": "Prodigy",
                                                                  "AdamW": "AdamW"}[options["optimizer"]]
    if "max_train_epochs" in options:
        # 6 samples in batches of 2, two batches per step: steps of 2 and 1 batches, so two
        # steps per epoch, four in two epochs
        assert (result.steps, result.epochs, meta["ss_epoch"], meta["ss_steps"]) == (4, 2, "2", "4")
        # the epoch-1 file was saved, and kept as the last one (the end writes the final file)
        assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == [
            f"{result.name}-000001.safetensors", f"{result.name}.safetensors"]
    if options.get("max_token_length") == 150:
        assert meta["ss_max_token_length"] == "150"
