"""SD 3.5 on the tiny model (``charfw:tiny-sd35``, SD 3.5 Medium's topology): train, save,
load in diffusers, resume after a kill, single-file checkpoints, bad networks.

The proofs of issue 11 for SD 3.5: a few steps lower the flow-matching loss on a fixed
batch; the file's keys are exactly diffusers' peft names of the layers a test enumerates
itself from the module tree; ``StableDiffusion3Pipeline.load_lora_weights`` on the file
changes the transformer's and the CLIP encoders' outputs exactly as W + B·A predicts; a
run killed with SIGKILL and resumed ends at the uninterrupted run's weights; an exported
single-file checkpoint in SD3's own layout gives the diffusers folder's outputs bit for bit.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import one_torch_thread, write_dataset  # noqa: F401 (fixture)

STEPS = 4
PROMPT = "krnk, white background, tag1"


def _cli_args(tiny: Path, dataset: Path, out: Path, cache: Path) -> list[str]:
    return ["train", str(dataset), "--base-model", str(tiny), "--network", "lora", "--dim", "4", "--alpha", "2",
            "--optimizer", "AdamW", "--learning-rate", "1e-2", "--max-train-steps", str(STEPS),
            "--save-every-n-steps", "2", "--save-state", "--save-precision", "float", "--output-dir", str(out),
            "--cache-dir", str(cache), "--log-with", "none", "--no-gradient-checkpointing"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def trained(tiny_sd35: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run through ``charfw train`` (CLIP encoders trained too)."""
    from charfw.cli import main

    root = tmp_path_factory.mktemp("sd35")
    dataset = write_dataset(root / "data", count=4)
    prompts = root / "prompts.txt"
    prompts.write_text("krnk, white background --n lowres --w 64 --h 64 --d 5 --s 2 --l 4\n", "utf-8")
    args = [*_cli_args(tiny_sd35, dataset, root / "straight", root / "cache"), "--sample-prompts", str(prompts),
            "--sample-every-n-steps", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert not exit_info.value.code
    (lora,) = (root / "straight").glob(f"krnk-*-{STEPS}.safetensors")
    return {"root": root, "dataset": dataset, "lora": lora}


def _pipeline(tiny: Path) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _outputs(pipe: Any) -> dict[str, torch.Tensor]:
    """CLIP states and one transformer prediction, computed as diffusers does."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 16, 8, 8), generator=generator)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                  max_sequence_length=77)
        prediction = pipe.transformer(hidden_states=latents, timestep=torch.tensor([500.0]),
                                      encoder_hidden_states=embeds, pooled_projections=pooled).sample
    return {"embeds": embeds, "pooled": pooled, "prediction": prediction}


def _expected_keys(pipe: Any) -> set[str]:
    """diffusers' peft keys of the layers charfw trains, enumerated here independently:
    every Linear in a joint block's attention (attn, attn2) and feed-forwards (ff,
    ff_context), and the CLIP encoders' q/k/v/out projections (diffusers' SD3 trainer's
    text-encoder targets)."""
    keys = set()
    parts = {"transformer": (pipe.transformer, r"^transformer_blocks\.\d+\.(attn|attn2|ff|ff_context)\."),
             "text_encoder": (pipe.text_encoder, r"\.self_attn\.(q|k|v|out)_proj$"),
             "text_encoder_2": (pipe.text_encoder_2, r"\.self_attn\.(q|k|v|out)_proj$")}
    for part, (model, pattern) in parts.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and re.search(pattern, name):
                keys |= {f"{part}.{name}.lora_A.weight", f"{part}.{name}.lora_B.weight"}
    return keys


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_sd35: Path, tmp_path: Path) -> None:
    """The family's conditioning, flow-matching objective and LoRA network, stepped on one
    batch with the same noise and timesteps each step."""
    from charfw.training import TrainSettings
    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source
    from charfw.training.networks import create_network, network_type

    family = get_family("sd35")
    settings = TrainSettings(network="lora", dim=4, optimizer="AdamW")
    family.configure(settings)
    model = family.load(resolve_source(str(tiny_sd35), cache_dir=tmp_path), None, cache_dir=tmp_path)
    for part in (model.unet, *model.text_encoders):
        part.requires_grad_(False)
    kind = network_type("lora")
    network = create_network(kind, kind.config(dim=4, alpha=4), family.network_roots(model))
    network.apply()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    objective = family.objective(model, settings, torch.device("cpu"))
    latents = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conditioning = family.encode_text(model, family.tokenize(model, [PROMPT, "krnk"], None), clip_skip=1)
    losses = []
    for _ in range(4):
        noised = objective.noise(latents, torch.Generator().manual_seed(1))
        prediction = family.predict(model.unet, noised.noisy, noised.timesteps, conditioning, {})
        loss = objective.loss(prediction, noised, torch.ones(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    network.remove()
    assert losses[-1] < 0.9 * losses[0], losses


def test_file_keys_are_diffusers_names_and_metadata_the_settings(trained: dict[str, Any], tiny_sd35: Path) -> None:
    from safetensors import safe_open

    pipe = _pipeline(tiny_sd35)
    with safe_open(str(trained["lora"]), "pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in keys}
    assert keys == _expected_keys(pipe)
    assert any(k.startswith("transformer.transformer_blocks.0.attn2.") for k in keys)  # 3.5 Medium's dual attention
    assert not any(".to_add_out." in k and k.startswith("transformer.transformer_blocks.23.") for k in keys)
    assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 32)
    assert tensors["transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight"].shape == (128, 4)
    assert meta["format"] == "pt"
    assert meta["ss_base_model_version"] == "sd3_5_medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_weighting_scheme"] == "logit_normal" and meta["ss_logit_std"] == "1.0"
    assert meta["ss_use_t5xxl"] == "False" and meta["ss_flow_shift"] == "3.0"
    assert meta["ss_steps"] == str(STEPS)
    assert json.loads(meta["ss_dataset_dirs"]) == {"krnk girl_flip_face": {"n_repeats": 2, "img_count": 4}}


def test_training_samples_use_the_flow_sampler(trained: dict[str, Any]) -> None:
    from charfw.generation.infotext import parse_infotext, read_png_infotext

    samples = sorted((trained["root"] / "straight" / "sample").glob("*.png"))
    assert [p.name.split("_")[-3] for p in samples] == ["000002", f"{STEPS:06d}"]
    params = parse_infotext(read_png_infotext(samples[-1]) or "")
    assert params.sampler == "Euler" and params.steps == 2 and params.negative == "lowres"  # kohya's ddim default


def test_diffusers_loads_it_and_the_outputs_change_as_delta_w_predicts(trained: dict[str, Any],
                                                                        tiny_sd35: Path) -> None:
    import copy

    base = _pipeline(tiny_sd35)
    before = _outputs(base)
    # the prediction: W + B·A (alpha is folded into B: the format has no alpha), by hand
    tensors = _tensors(trained["lora"])
    expected = copy.deepcopy(base)
    roots = {"transformer": expected.transformer, "text_encoder": expected.text_encoder,
             "text_encoder_2": expected.text_encoder_2}
    with torch.no_grad():
        for key, down in tensors.items():
            if key.endswith(".lora_A.weight"):
                part, _, path = key.removesuffix(".lora_A.weight").partition(".")
                layer = roots[part].get_submodule(path)
                layer.weight += tensors[key.replace("lora_A", "lora_B")] @ down
    predicted = _outputs(expected)
    loaded = base
    loaded.load_lora_weights(str(trained["lora"]))
    after = _outputs(loaded)
    for name in ("embeds", "pooled", "prediction"):
        assert (predicted[name] - before[name]).abs().max() > 1e-4, name  # the LoRA changes it
        torch.testing.assert_close(after[name], predicted[name], atol=1e-5, rtol=1e-5, msg=name)


def _quiet_cli(args: list[str]) -> None:
    from charfw.cli import main

    os.environ["CHARFW_QUIET"] = "1"
    main(args)


def test_resume_after_kill_ends_at_the_same_weights(trained: dict[str, Any], tiny_sd35: Path, run_cli) -> None:
    root = trained["root"]
    out = root / "killed"
    args = _cli_args(tiny_sd35, trained["dataset"], out, root / "cache")
    # the same run in a forked process (its imports already done), killed with SIGKILL as
    # soon as it saved its first state
    proc = multiprocessing.get_context("fork").Process(target=_quiet_cli, args=(args,))
    proc.start()
    deadline = time.monotonic() + 120
    states: list[Path] = []
    while time.monotonic() < deadline and proc.exitcode is None:
        states = [p for p in out.glob("*-state/step-*") if (p / "state.json").is_file()]
        if states:
            break
        time.sleep(0.01)
    assert states, f"no state saved in time (exit code {proc.exitcode})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not (out / trained["lora"].name).exists()
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("*-state/step-*") if (p / "state.json").is_file())
    assert 2 <= killed_at < STEPS
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert f"resumed from step-{killed_at:08d}" in err
    final, expected = _tensors(out / trained["lora"].name), _tensors(trained["lora"])
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_continue_from_a_diffusers_format_file(trained: dict[str, Any], tiny_sd35: Path, tmp_path: Path) -> None:
    """A peft-format file is read back under the network's names (scale 1): continuing from
    it starts from exactly its ΔW."""
    from charfw.lora.file import read_lora
    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source
    from charfw.training.networks import create_network, network_type
    from charfw.training.networks.network import kohya_state

    family = get_family("sd35")
    model = family.load(resolve_source(str(tiny_sd35), cache_dir=tmp_path), None, cache_dir=tmp_path)
    kind = network_type("lora")
    network = create_network(kind, kind.config(dim=4, alpha=2), family.network_roots(model))
    report = network.load_kohya_state_dict(kohya_state(_tensors(trained["lora"])))
    assert not report.missing
    lora = read_lora(trained["lora"])
    assert lora.family == "sd35"
    deltas = network.delta_weights()
    assert set(deltas) == set(lora.modules)
    for name, module in lora.modules.items():
        torch.testing.assert_close(deltas[name], module.delta(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("network", ["lora3x3", "loha"])
def test_conv_networks_on_sd35_are_a_one_line_error(trained: dict[str, Any], tiny_sd35: Path, run_cli,
                                                    network: str) -> None:
    args = _cli_args(tiny_sd35, trained["dataset"], trained["root"] / network, trained["root"] / "cache")
    args[args.index("--network") + 1] = network
    code, _, err = run_cli(*args)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "SD 3.5" in lines[0] and "network: lora" in lines[0], err
    assert "Traceback" not in err


def test_tiny_configs_are_what_the_builder_writes(tiny_sd35: Path) -> None:
    from charfw.training.single_file_sd3 import shipped_configs

    shipped = shipped_configs()["tiny-sd35"]
    files = sorted(p.relative_to(shipped) for p in shipped.rglob("*.json"))
    assert files == sorted(p.relative_to(tiny_sd35) for p in tiny_sd35.rglob("*.json"))
    for rel in files:
        built = json.loads((tiny_sd35 / rel).read_text("utf-8"))
        ours = json.loads((shipped / rel).read_text("utf-8"))
        for data in (built, ours):
            data.pop("_diffusers_version", None)
            data.pop("transformers_version", None)
        assert ours == built, rel


@pytest.fixture(scope="module")
def checkpoint(tiny_sd35: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported by ``charfw export-model`` as an SD3 single file (fp32)."""
    from charfw.cli import main

    root = tmp_path_factory.mktemp("sd35-ckpt")
    dest = root / "tiny-sd35.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["export-model", str(tiny_sd35), str(dest), "--precision", "fp32", "--cache-dir", str(root)])
    assert not exit_info.value.code
    return dest


def test_single_file_checkpoint_loads_like_the_folder(tiny_sd35: Path, checkpoint: Path, tmp_path: Path) -> None:
    """``charfw export-model`` writes SD3's own layout; loading it goes through the code a
    user's checkpoint takes and gives the folder's outputs bit for bit (T5 included)."""
    from safetensors import safe_open

    from charfw.training import TrainSettings
    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source

    dest = checkpoint
    with safe_open(str(dest), "pt") as fh:
        keys = set(fh.keys())
    assert {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "model.diffusion_model.joint_blocks.0.context_block.mlp.fc1.weight",
            "model.diffusion_model.joint_blocks.12.x_block.attn2.qkv.weight",
            "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight",
            "model.diffusion_model.final_layer.adaLN_modulation.1.weight", "model.diffusion_model.pos_embed",
            "first_stage_model.encoder.conv_in.weight",
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_encoders.clip_g.transformer.text_projection.weight",
            "text_encoders.t5xxl.transformer.shared.weight"} <= keys
    assert not any(k.startswith("model.diffusion_model.transformer_blocks") for k in keys)
    assert not any("joint_blocks.23.context_block.attn.proj" in k for k in keys)  # context_pre_only
    outputs = []
    for where in (tiny_sd35, dest):
        family = get_family("sd35")
        family.configure(TrainSettings(network="lora", t5=True))
        model = family.load(resolve_source(str(where), cache_dir=tmp_path), None, cache_dir=tmp_path)
        with torch.no_grad():
            cond = family.encode_text(model, family.tokenize(model, [PROMPT], None), clip_skip=1)
            latents = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(5))
            prediction = family.predict(model.unet, latents, torch.tensor([300.0]), cond, {})
            image = model.vae.decode(latents / model.vae_scaling_factor + model.vae_shift_factor).sample
        outputs.append((cond["encoder_hidden_states"], cond["pooled_projections"], prediction, image))
    assert outputs[0][0][:, 77:].abs().max() > 0  # T5's states are there, not zeros
    for folder_out, file_out in zip(*outputs, strict=True):
        assert torch.equal(folder_out, file_out), (folder_out - file_out).abs().max()
    # the checkpoint as model.vae: its first_stage_model.* read with the SD3 VAE config
    family = get_family("sd35")
    with_vae = family.load(resolve_source(str(tiny_sd35), cache_dir=tmp_path),
                           resolve_source(str(dest), cache_dir=tmp_path, what="VAE"), cache_dir=tmp_path)
    expected = model.vae.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in with_vae.vae.state_dict().items())


def test_conditioning_is_diffusers_encode_prompt(tiny_sd35: Path, tmp_path: Path) -> None:
    """The trainer's text conditioning equals ``StableDiffusion3Pipeline.encode_prompt``'s
    (77 T5 tokens: zeros without T5, T5's states with it)."""
    from diffusers import StableDiffusion3Pipeline

    from charfw.training import TrainSettings
    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source

    for t5 in (False, True):
        family = get_family("sd35")
        family.configure(TrainSettings(network="lora", t5=t5))
        model = family.load(resolve_source(str(tiny_sd35), cache_dir=tmp_path), None, cache_dir=tmp_path)
        pipe = StableDiffusion3Pipeline(**{k: v for k, v in family.pipeline(model, None).components.items()})
        with torch.no_grad():
            ours = family.encode_text(model, family.tokenize(model, [PROMPT], None), clip_skip=2)
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                      max_sequence_length=77)
        assert torch.equal(ours["encoder_hidden_states"], embeds)
        assert torch.equal(ours["pooled_projections"], pooled)


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW = B·A per module of a peft-format file, computed here (the format has no alpha)."""
    tensors = _tensors(path)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors), sorted(tensors)[:3]
    return {k.removesuffix(".lora_A.weight"): tensors[k.replace("lora_A", "lora_B")].double() @ v.double()
            for k, v in tensors.items() if k.endswith(".lora_A.weight")}


def test_lora_blocks_resize_and_merge_are_exact_on_sd35_files(trained: dict[str, Any], tmp_path: Path,
                                                              run_cli) -> None:
    """``charfw lora`` on the trained file: one ratio per joint block (plus BASE), an SVD
    resize at the file's rank and a merge are exact, and stay in diffusers' format."""
    source = _deltas(trained["lora"])
    values = [0.5, *((i % 3) / 2 for i in range(24))]  # BASE, J00 … J23
    blocked, resized, merged = (tmp_path / f"{n}.safetensors" for n in ("blocked", "resized", "merged"))
    code, _, err = run_cli("lora", "blocks", trained["lora"], "--weights", ",".join(map(str, values)), "-o", blocked)
    assert code == 0, err

    def ratio(module: str) -> float:
        if module.startswith("text_encoder"):
            return values[0]
        return values[1 + int(module.split(".")[2])]  # transformer.transformer_blocks.N.…

    after = _deltas(blocked)
    assert set(after) == {m for m in source if ratio(m) != 0}
    for module, delta in after.items():
        torch.testing.assert_close(delta, source[module] * ratio(module), atol=1e-7, rtol=1e-5)
    code, _, err = run_cli("lora", "resize", trained["lora"], "--rank", "4", "-o", resized)
    assert code == 0, err
    for module, delta in _deltas(resized).items():
        torch.testing.assert_close(delta, source[module], atol=1e-6, rtol=1e-4)
    code, _, err = run_cli("lora", "merge", f"{trained['lora']}:0.7", f"{blocked}:0.4", "--rank", "8", "-o", merged)
    assert code == 0, err
    for module, delta in _deltas(merged).items():
        expected = source[module] * (0.7 + 0.4 * ratio(module))
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-4)
    assert set(_deltas(merged)) == set(source)
    code, out, err = run_cli("lora", "info", trained["lora"])
    assert code == 0, err
    assert "for SD 3.5" in out and "24 text encoder, " in out and "\nJ23 " in out and "\nBASE " in out


def test_sd35_trains_plain_lora_unless_told_otherwise() -> None:
    """The method's default network (lora3x3) has nothing to attach to on an MMDiT: an SD 3.5
    run that does not choose one trains lora; one that chooses lora3x3 gets the error above."""
    from charfw.training import TrainSettings

    assert TrainSettings().network == "lora3x3"
    assert TrainSettings().for_model("models/sd3.5_medium.safetensors", family="sd35").network == "lora"
    assert TrainSettings().for_model("models/sd15.safetensors", family="sd1").network == "lora3x3"
    assert TrainSettings(network="lora3x3").for_model("m.safetensors", family="sd35").network == "lora3x3"


@pytest.mark.parametrize("variant", ["sd35-medium", "sd35-large"])
def test_real_configs_give_the_native_layout_they_are_detected_from(variant: str, tmp_path: Path) -> None:
    """The shipped Medium/Large configs, built at full size on the meta device (no memory),
    written in SD3's native names, have the shapes of the real checkpoints' tensors and
    are told apart by them."""
    from diffusers import SD3Transformer2DModel

    from charfw.training import single_file_sd3

    folder = single_file_sd3.shipped_configs()[variant]
    config = SD3Transformer2DModel.load_config(str(folder), subfolder="transformer")
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    native = single_file_sd3.transformer_to_native(model.state_dict(), config["num_layers"])
    shapes = {single_file_sd3.MMDIT_PREFIX + k: list(v.shape) for k, v in native.items()}
    width, depth = 64 * config["num_layers"], config["num_layers"]
    p = single_file_sd3.MMDIT_PREFIX
    assert shapes[p + "joint_blocks.0.x_block.attn.qkv.weight"] == [3 * width, width]
    assert shapes[p + "joint_blocks.0.context_block.adaLN_modulation.1.weight"] == [6 * width, width]
    assert shapes[p + f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.weight"] == [2 * width, width]
    assert shapes[p + "context_embedder.weight"] == [width, 4096] and shapes[p + "y_embedder.mlp.0.weight"][1] == 2048
    assert shapes[p + "pos_embed"] == [1, (384 if variant == "sd35-medium" else 192) ** 2, width]
    assert (p + "joint_blocks.12.x_block.attn2.qkv.weight" in shapes) == (variant == "sd35-medium")
    assert single_file_sd3.detect_config(shapes, path=tmp_path / "x.safetensors") == folder
    # SD3 Medium (no qk-norm, 192² positions) is not one charfw ships
    shapes.pop(p + "joint_blocks.12.x_block.attn2.qkv.weight", None)
    shapes[p + "pos_embed"] = [1, 1, width]
    from charfw.errors import CharfwError

    with pytest.raises(CharfwError, match="unknown SD3 layout"):
        single_file_sd3.detect_config(shapes, path=tmp_path / "x.safetensors")


def test_t5_without_a_tokenizer_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from charfw.errors import CharfwError
    from charfw.training import single_file_sd3
    from charfw.training.families import get_family

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family = get_family("sd35")
    with pytest.raises(CharfwError, match="t5 is on, but the T5 tokenizer") as info:
        family._t5_tokenizer(single_file_sd3.shipped_configs()["sd35-medium"], tmp_path / "sd3.5_medium.safetensors")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"])
def test_flow_matching_objective_per_weighting_scheme(scheme: str) -> None:
    """x_t = (1 - σ) x₀ + σ ε on the shift-3 table, timesteps = 1000 σ, the target, the
    loss weighting and the preconditioned loss, all from the run's generator."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from charfw.training import TrainSettings
    from charfw.training.families.sd35 import FlowMatchingObjective

    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    settings = TrainSettings(network="lora", weighting_scheme=scheme)
    objective = FlowMatchingObjective(config, settings, torch.device("cpu"))
    latents = torch.randn((4, 16, 4, 4), generator=torch.Generator().manual_seed(0))
    noised = objective.noise(latents, torch.Generator().manual_seed(1))
    again = objective.noise(latents, torch.Generator().manual_seed(1))
    assert torch.equal(noised.noisy, again.noisy) and torch.equal(noised.timesteps, again.timesteps)
    sigmas = noised.extra["sigmas"]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))  # drawn first
    torch.testing.assert_close(noised.noisy, (1 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(noised.timesteps, sigmas.flatten() * 1000)
    unshifted = sigmas / (3 - 2 * sigmas) * 1000  # σ = 3s / (1 + 2s): s on the 1/1000 grid
    torch.testing.assert_close(unshifted, unshifted.round(), atol=2e-3, rtol=0)
    expected = {"sigma_sqrt": sigmas**-2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))}
    torch.testing.assert_close(noised.weights, expected.get(scheme, torch.ones_like(sigmas)))
    assert torch.equal(noised.target, latents)  # precondition_outputs: the prediction becomes x₀
    flow = noise - latents  # a perfect flow prediction has zero loss
    assert float(objective.loss(flow, noised, torch.ones(4))) < 1e-10


def test_t5_in_float16_keeps_its_output_projections_in_float32(tiny_sd35: Path, tmp_path: Path) -> None:
    from charfw.training import TrainSettings
    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source

    family = get_family("sd35")
    family.configure(TrainSettings(network="lora", t5=True))
    model = family.load(resolve_source(str(tiny_sd35), cache_dir=tmp_path), None, cache_dir=tmp_path)
    with torch.no_grad():
        reference = family.encode_text(model, family.tokenize(model, [PROMPT], None), clip_skip=1)
        model.text_encoders[2].half()
        half = family.encode_text(model, family.tokenize(model, [PROMPT], None), clip_skip=1)
    t5 = model.text_encoders[2]
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert t5.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16
    torch.testing.assert_close(half["encoder_hidden_states"], reference["encoder_hidden_states"], atol=2e-2, rtol=0)


def test_checkpoint_without_text_encoders_finds_stabilitys_files_beside_it(tiny_sd35: Path, checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    """Stability ships SD 3.5 as the MMDiT + VAE file and text_encoders/clip_l, clip_g and
    t5xxl files (transformers' key names): charfw finds them beside the checkpoint (or in
    ComfyUI's models/clip), and says where it looked when they are not there."""
    from safetensors.torch import load_file, save_file

    from charfw.errors import CharfwError
    from charfw.training import TrainSettings
    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source

    state = load_file(str(checkpoint))
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    bare = checkpoints / "sd3.5_tiny.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("text_encoders.")}, str(bare))
    family = get_family("sd35")
    family.configure(TrainSettings(network="lora", t5=True))
    with pytest.raises(CharfwError, match="no CLIP-L text encoder") as info:
        family.load(resolve_source(str(bare), cache_dir=tmp_path), None, cache_dir=tmp_path)
    assert "\n" not in str(info.value) and "clip_l" in str(info.value)
    (tmp_path / "models" / "clip").mkdir()
    folder = family.load(resolve_source(str(tiny_sd35), cache_dir=tmp_path), None, cache_dir=tmp_path)
    for name, encoder in zip(("clip_l", "clip_g", "t5xxl_fp16"), folder.text_encoders, strict=True):
        save_file({k: v.clone() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"},
                  str(tmp_path / "models" / "clip" / f"{name}.safetensors"))  # T5's embedding is tied to shared
    split = family.load(resolve_source(str(bare), cache_dir=tmp_path), None, cache_dir=tmp_path)
    for a, b in zip(folder.text_encoders, split.text_encoders, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
