"""Base models: single-file checkpoints without the network, separate VAEs, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_support import one_torch_thread  # noqa: F401 (fixture)

from charfw.errors import CharfwError
from charfw.training import single_file
from charfw.training.families import get_family
from charfw.training.model_sources import resolve_source


@pytest.fixture(scope="module")
def checkpoint(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as the single file A1111 users hold (via charfw export-model)."""
    from charfw.cli import main

    dest = tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["export-model", str(tiny_sd15), str(dest), "--precision", "fp32"])
    assert exit_info.value.code == 0
    return dest


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def test_single_file_loads_without_network_as_the_diffusers_folder(checkpoint: Path, tiny_sd15: Path,
                                                                   tmp_path: Path) -> None:
    shapes = single_file.tensor_shapes(checkpoint)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in shapes
    assert "first_stage_model.decoder.up.3.block.2.conv2.weight" in shapes
    assert "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc2.weight" in shapes
    family = get_family("sd1")
    from_file = family.load(resolve_source(str(checkpoint), cache_dir=tmp_path), None, cache_dir=tmp_path)
    from_folder = family.load(resolve_source(str(tiny_sd15), cache_dir=tmp_path), None, cache_dir=tmp_path)
    for a, b in ((from_file.unet, from_folder.unet), (from_file.vae, from_folder.vae),
                 (from_file.text_encoders[0], from_folder.text_encoders[0])):
        sa, sb = _state(a), _state(b)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = family.tokenize(from_file, ["krnk, 1girl"], None)
    assert torch.equal(ids, family.tokenize(from_folder, ["krnk, 1girl"], None))
    assert from_file.scheduler_config["beta_schedule"] == "scaled_linear"


def test_the_family_of_the_exported_file_and_of_the_folder(checkpoint: Path, tiny_sd15: Path, tmp_path: Path) -> None:
    """What real files (not only headers written by hand) are recognised as."""
    from charfw.training.families.detect import detect_family

    from_file = detect_family(resolve_source(str(checkpoint), cache_dir=tmp_path))
    from_folder = detect_family(resolve_source(str(tiny_sd15), cache_dir=tmp_path))
    assert from_file.name == from_folder.name == "sd1"
    assert "LDM layout" in from_file.evidence and "StableDiffusionPipeline" in from_folder.evidence


def test_separate_vae_file_replaces_the_models(checkpoint: Path, tiny_sd15: Path, tmp_path: Path) -> None:
    """A VAE-only file (kl-f8-anime2 style: autoencoder keys without a prefix)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint))
    vae_only = {k[len(single_file.VAE_PREFIX):]: v * 1.5 if k.endswith("conv_out.bias") else v
                for k, v in state.items() if k.startswith(single_file.VAE_PREFIX)}
    vae_file = tmp_path / "my-vae.safetensors"
    save_file(vae_only, str(vae_file))
    family = get_family("sd1")
    model = family.load(resolve_source(str(tiny_sd15), cache_dir=tmp_path),
                        resolve_source(str(vae_file), cache_dir=tmp_path, what="VAE"), cache_dir=tmp_path)
    assert torch.equal(model.vae.decoder.conv_out.bias, vae_only["decoder.conv_out.bias"])


def test_shipped_tiny_configs_are_what_the_builder_writes(tiny_sd15: Path) -> None:
    shipped = single_file.shipped_configs()["tiny-sd15"]
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        built = json.loads((tiny_sd15 / part / name).read_text())
        ours = json.loads((shipped / part / name).read_text())
        drop = {"_diffusers_version", "transformers_version", "_name_or_path"}
        assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in built.items() if k not in drop}


def test_sd15_tokenizer_is_clips(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from charfw.training.clip_tokenizer import clip_tokenizer_files

    folder = clip_tokenizer_files(tmp_path)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    assert len(tokenizer) == 49408
    # SD 1.5's well-known ids for this prompt
    assert tokenizer("a photo of an astronaut riding a horse").input_ids == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_real_sd15_layout_is_recognised_and_others_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    sd15 = {single_file.UNET_PREFIX + "input_blocks.0.0.weight": [320, 4, 3, 3]}
    assert single_file.detect_layout(sd15, path=path).config == "sd15"
    with pytest.raises(CharfwError, match="SDXL"):
        single_file.detect_layout({**sd15, "conditioner.embedders.0.transformer.x": [1]}, path=path)
    with pytest.raises(CharfwError, match="SD 2"):
        single_file.detect_layout({**sd15, "cond_stage_model.model.ln_final.weight": [1024]}, path=path)
    with pytest.raises(CharfwError, match="not a Stable Diffusion checkpoint"):
        single_file.detect_layout({"lora_unet_x.alpha": []}, path=path)


def test_model_references(tmp_path: Path) -> None:
    assert resolve_source("charfw:tiny-sd15", cache_dir=tmp_path).kind == "builtin"
    assert resolve_source("stable-diffusion-v1-5/stable-diffusion-v1-5", cache_dir=tmp_path).kind == "hub"
    with pytest.raises(CharfwError, match="not found"):
        resolve_source("models/missing.safetensors", cache_dir=tmp_path)
    with pytest.raises(CharfwError, match="unknown built-in"):
        resolve_source("charfw:huge", cache_dir=tmp_path)


def test_charfw_train_stops_at_once_on_a_hub_id_it_cannot_load(tmp_path: Path, run_cli,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline and not in the cache: one line saying where to put the file, before any loading."""
    from huggingface_hub import constants
    from train_support import write_dataset

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    dataset = write_dataset(tmp_path / "data", count=1)
    code, _out, err = run_cli("train", dataset, "--base-model", "someorg/some-model", "--family", "sd1",
                              "--optimizer", "AdamW", cwd=tmp_path)
    assert code == 3 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: base model 'someorg/some-model' is not in the Hugging Face cache and cannot be downloaded: "
        "HF_HUB_OFFLINE is set; put its .safetensors file at models/some-model.safetensors and give that path "
        "(in a manifest relative to it: ../models/some-model.safetensors), download it where there is network "
        "(`hf download someorg/some-model`), or try charfw with charfw:tiny-sd15")


def test_a_hugging_face_id_trains_from_the_hub_cache(tiny_sd15: Path, tmp_path: Path) -> None:
    """``--base-model org/name`` goes through diffusers' and transformers' hub loading: here
    from a Hugging Face cache laid out as a download leaves it, offline (no test reaches
    the network); the file records the id as kohya does."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from safetensors import safe_open
    from train_support import write_dataset

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--charfw-test--tiny-sd15"
    shutil.copytree(tiny_sd15, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    dataset = write_dataset(tmp_path / "data", count=2)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "CHARFW_QUIET": "1",
           "CHARFW_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "charfw", "train", str(dataset), "--base-model", "charfw-test/tiny-sd15",
            "--network", "lora", "--dim", "4", "--optimizer", "AdamW", "--max-train-steps", "1",
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--log-with", "none"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (lora,) = (tmp_path / "out").glob("*.safetensors")
    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_sd_model_name"] == "charfw-test/tiny-sd15" and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_tag_frequency"])
    # an id that is not in the cache, offline: one line that says what to do
    args[args.index("charfw-test/tiny-sd15")] = "charfw-test/missing"
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "cannot load the base model 'charfw-test/missing'" in result.stderr
    assert "check the id and your network" in result.stderr
