"""The trainer's rules without a model: the method's names and rates, kohya's command line,
sample prompts, buckets, captions, epochs and dataset configs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from train_support import write_dataset

from charfw.errors import CharfwError
from charfw.training.buckets import (
    BucketSettings,
    choose_bucket,
    predefined_buckets,
    resize_for_bucket,
)
from charfw.training.dataset import TrainingData, make_caption
from charfw.training.sample_prompts import SamplePrompt, parse_line, read_prompts
from charfw.training.settings import (
    TrainSettings,
    ascii_file_name,
    parse_alpha,
    text_encoder_lr_for,
)

# --- the method ---------------------------------------------------------------------------


def test_defaults_give_the_methods_name_and_rates() -> None:
    s = TrainSettings()
    assert s.method_name("krnk") == "krnk-Lora3x3A50p-AdamW8-128-100-1200"
    assert s.resolved_text_encoder_lr() == pytest.approx(44e-6)  # 44 % of 100e-6
    config = s.network_config()
    assert (config.dim, config.alpha, config.conv_dim, config.conv_alpha) == (128, 64.0, 128, 64.0)
    assert TrainSettings(network="loha", dim=32, alpha="A1", optimizer="Adafactor").method_name("tyank") == \
        "tyank-LohaA1-AdaFactor-32-100-1200"


@pytest.mark.parametrize(("lr", "te"), [(100e-6, 44e-6), (150e-6, 66e-6), (7e-6, 3e-6), (2e-6, 0.88e-6)])
def test_text_encoder_rate_is_44_percent_rounded_down(lr: float, te: float) -> None:
    assert text_encoder_lr_for(lr) == pytest.approx(te)


def test_alpha_spellings() -> None:
    assert parse_alpha("A1", 128) == 1.0 and parse_alpha("A50p", 128) == 64.0 and parse_alpha("64", 128) == 64.0
    assert parse_alpha(None, 8) is None
    with pytest.raises(ValueError, match="A50p"):
        TrainSettings(alpha="half")
    with pytest.raises(ValueError, match="lora3x3"):
        TrainSettings(network="lora", conv_dim=8)


def test_output_names_are_ascii() -> None:
    assert ascii_file_name("krnk-Lora3x3A50p-AdamW8-128-100-1200") == "krnk-Lora3x3A50p-AdamW8-128-100-1200"
    assert ascii_file_name("Café krnk") .startswith("Cafe_krnk-")
    japanese = ascii_file_name("黒猫-Lora3x3A50p")
    assert japanese.isascii() and japanese.startswith("Lora3x3A50p-") and japanese != ascii_file_name("茶猫-Lora3x3A50p")
    assert ascii_file_name("黒猫").startswith("lora-")


# --- kohya's command line ------------------------------------------------------------------

SEED_LORA_BAT = (
    '--network_module=networks.lora --network_args "conv_dim=128" "conv_alpha=64" --optimizer_type=AdamW8bit '
    "--learning_rate=100e-6 --text_encoder_lr=44e-6 --lr_scheduler=cosine_with_restarts --network_dim=128 "
    "--network_alpha=64 --dataset_config=4_krnk.toml --max_train_steps=1200 --output_dir=out "
    "--output_name=krnk-Lora3x3A50p-AdamW8-128-100-1200 --pretrained_model_name_or_path=Defmix-v2.0.safetensors "
    "--vae=kl-f8-anime2.ckpt --clip_skip=2 --logging_dir=logs --log_prefix=krnk --xformers "
    "--save_model_as=safetensors --mixed_precision=fp16 --save_precision=fp16 --gradient_checkpointing "
    "--persistent_data_loader_workers --seed=31337"
)


def _parse_train(args: list[str]) -> tuple[dict[str, Any], TrainSettings]:
    import click

    from charfw.cli import cli
    from charfw.training.command_line import settings_from_options

    with click.Context(cli) as root:
        command = cli.get_command(root, "train")
        ctx = command.make_context("train", args, parent=root)
    return ctx.params, settings_from_options(ctx.params)


def test_the_seeds_train_network_line_runs_as_charfw_train() -> None:
    import shlex

    params, s = _parse_train(shlex.split(SEED_LORA_BAT))
    assert params["base_model"] == "Defmix-v2.0.safetensors" and params["vae"] == "kl-f8-anime2.ckpt"
    assert params["dataset_option"] == Path("4_krnk.toml") and params["clip_skip"] == 2
    assert (s.network, s.dim, s.alpha, s.conv_dim, s.conv_alpha) == ("lora3x3", 128, "64", 128, "64")
    assert (s.optimizer, s.learning_rate, s.text_encoder_lr, s.max_train_steps) == ("AdamW8bit", 1e-4, 44e-6, 1200)
    assert (s.mixed_precision, s.save_precision, s.gradient_checkpointing, s.seed) == ("fp16", "fp16", True, 31337)
    assert s.output_name == s.method_name("krnk") == "krnk-Lora3x3A50p-AdamW8-128-100-1200"


def test_kohya_lycoris_and_charfw_spellings() -> None:
    _, s = _parse_train(["--network_module", "lycoris.kohya", "--network_args", "algo=loha", "conv_dim=8",
                         "--network_dim", "16", "--optimizer_args", "weight_decay=0.05", "betas=(0.9,0.99)",
                         "--cache_latents_to_disk", "--base-model", "m.safetensors", "d.toml"])
    assert (s.network, s.dim, s.conv_dim, s.cache_latents) == ("loha", 16, 8, "disk")
    assert s.optimizer_args == {"weight_decay": 0.05, "betas": (0.9, 0.99)}
    _, s = _parse_train(["d.toml", "--base-model", "m", "--network", "lora", "--max-train-epochs", "3",
                         "--no-gradient-checkpointing", "--cache_latents"])
    assert (s.network, s.max_train_epochs, s.gradient_checkpointing, s.cache_latents) == ("lora", 3, False, "memory")
    with pytest.raises(CharfwError, match="block_dims"):
        _parse_train(["--network_args", "conv_dim=8", "block_dims=1,2", "--base-model", "m", "d.toml"])
    with pytest.raises(CharfwError, match="safetensors only"):
        _parse_train(["--save_model_as", "ckpt", "--base-model", "m", "d.toml"])


def test_train_help_starts_without_torch(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "charfw", "train", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "CHARFW_PLUGINS": ""})
    assert result.returncode == 0 and "--network_dim" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "diffusers", "transformers", "accelerate"}


# --- sample prompts ------------------------------------------------------------------------


def test_kohya_sample_prompt_syntax(tmp_path: Path) -> None:
    p = parse_line("krnk, 1girl, smile --n lowres, bad hands --w 512 --h 768 --d 42 --s 28 --l 6.5 --ss euler_a")
    assert p == SamplePrompt("krnk, 1girl, smile", "lowres, bad hands", 512, 768, 42, 28, 6.5, "euler_a")
    assert parse_line("just a prompt") == SamplePrompt("just a prompt")
    with pytest.raises(CharfwError, match="multiples of 8"):
        parse_line("x --w 500")
    with pytest.raises(CharfwError, match="unknown sampler"):
        parse_line("x --ss turbo")
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 64\nsample_steps = 3\n\n[[prompt.subset]]\nprompt = "a"\n'
                    '\n[[prompt.subset]]\nprompt = "b"\nnegative_prompt = "c"\nseed = 1\n')
    assert read_prompts(toml) == [SamplePrompt("a", width=64, height=64, steps=3),
                                  SamplePrompt("b", "c", 64, 64, 1, 3)]
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\nkrnk --d 3\n")
    assert read_prompts(txt) == [SamplePrompt("krnk", seed=3)]


# --- buckets -------------------------------------------------------------------------------


def test_buckets_as_kohya_chooses_them() -> None:
    no_upscale = BucketSettings((512, 512), enable_bucket=True, no_upscale=True)
    assert choose_bucket((384, 768), no_upscale) == (320, 704)  # scaled to 362x724, rounded down to 64
    assert choose_bucket((640, 640), no_upscale) == (512, 512)
    assert choose_bucket((300, 200), no_upscale) == (256, 192)  # never upscaled
    fixed = BucketSettings((512, 512), enable_bucket=True)
    buckets = predefined_buckets(fixed)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert choose_bucket((400, 800), fixed) == (320, 704)  # the closest aspect ratio in the list
    assert choose_bucket((777, 333), BucketSettings((512, 512))) == (512, 512)  # buckets off
    assert resize_for_bucket((384, 768), (320, 704)) == (352, 704)


# --- the dataset config --------------------------------------------------------------------


def test_captions_shuffle_after_the_kept_tokens(tmp_path: Path) -> None:
    toml = write_dataset(tmp_path, count=1, general="shuffle_caption = true\nkeep_tokens = 1")
    data = TrainingData.load(toml)
    entry = data.entries[0]
    assert entry.caption == "krnk, white background, tag0"
    seen = {make_caption(entry, random.Random(seed), 1) for seed in range(40)}
    assert seen == {"krnk, white background, tag0", "krnk, tag0, white background"}
    assert not data.fixed_captions


def test_regularisation_images_are_cycled_to_the_training_count(tmp_path: Path) -> None:
    toml = write_dataset(tmp_path, count=3, repeats=2, reg=True)
    data = TrainingData.load(toml)
    data.finalize()
    assert (data.num_train_images, data.num_reg_images) == (6, 6)
    reg = [e for e in data.entries if e.subset.is_reg]
    assert sorted(e.repeats for e in reg) == [3, 3]
    data.prior_loss_weight = 0.5
    weights = {s.weight for b in data.epoch_batches(1, 1) for s in b.samples if s.entry.subset.is_reg}
    assert weights == {0.5}


def test_epochs_are_deterministic_and_differ(tmp_path: Path) -> None:
    toml = write_dataset(tmp_path, count=4, repeats=3, batch_size=2)
    data = TrainingData.load(toml)
    data.finalize()
    first = data.epoch_batches(1, 31337)
    assert len(first) == data.batches_per_epoch() == 6
    assert sorted(p.name for b in first for p in b.paths) == sorted(["f00.png", "f01.png", "f02.png", "f03.png"] * 3)
    again = data.epoch_batches(1, 31337)
    assert [(b.paths, [s.flip for s in b.samples]) for b in first] == \
        [(b.paths, [s.flip for s in b.samples]) for b in again]
    assert [b.paths for b in data.epoch_batches(2, 31337)] != [b.paths for b in first]


def test_repeats_beyond_the_bound_stop_before_an_epoch_is_listed(tmp_path: Path) -> None:
    toml = write_dataset(tmp_path, count=1, repeats=1000000000000)
    with pytest.raises(CharfwError, match="num_repeats must be 1 to 1000, not 1000000000000"):
        TrainingData.load(toml)


def test_unsupported_dataset_settings_stop_with_a_reason(tmp_path: Path) -> None:
    toml = write_dataset(tmp_path, count=1, general="face_crop_aug_range = [2.0, 4.0]")
    with pytest.raises(CharfwError, match="face crop augmentation"):
        TrainingData.load(toml)
    toml.write_text(toml.read_text().replace("face_crop_aug_range = [2.0, 4.0]", "no_such_key = 1"))
    with pytest.raises(CharfwError, match="sd-scripts rejects it"):
        TrainingData.load(toml)


def test_adamw8bit_without_a_gpu_is_a_clear_error(workspace: Path, tiny_sd15: Path, run_cli) -> None:
    """On a model that is not built in, the method's AdamW8bit applies: on a CPU the build
    stops before any stage runs, saying what to write instead."""
    manifest = workspace / "characters" / "krnk.yaml"
    manifest.write_text(manifest.read_text().replace("base: charfw:tiny-sd15", f"base: {tiny_sd15}"))
    code, _, err = run_cli("build", "krnk", "--dry-run", cwd=workspace)
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        assert code in (0, 3)
    else:
        assert code == 3 and "AdamW8bit needs bitsandbytes on an NVIDIA GPU" in err and "optimizer: AdamW" in err
        # the manifest file and the key it goes in (not written: its block's line, or the file's)
        stages = manifest.read_text().splitlines().index("stages:") + 1
        assert err.startswith(f"error: characters/krnk.yaml:{stages} stages.train.optimizer: krnk/face: optimizer "
                              "AdamW8bit needs bitsandbytes")
        manifest.write_text(manifest.read_text() + "  train: {plugin: lora, optimizer: AdamW8bit}\n")
        line = len(manifest.read_text().splitlines())
        code, _, err = run_cli("build", "krnk", "--dry-run", cwd=workspace)
        assert code == 3 and err.startswith(f"error: characters/krnk.yaml:{line} stages.train.optimizer: ")
        manifest.write_text(manifest.read_text().replace("  train: {plugin: lora, optimizer: AdamW8bit}\n", ""))
    # on the built-in tiny model the tiny defaults apply (AdamW): the plan is fine
    manifest.write_text(manifest.read_text().replace(f"base: {tiny_sd15}", "base: charfw:tiny-sd15"))
    assert run_cli("build", "krnk", "--dry-run", cwd=workspace)[0] == 0


def test_a_build_tells_the_trainer_where_color_aug_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's hint about latents encoded every step names the manifest's dataset
    stage in a build (the dataset config is a generated file there)."""
    from types import SimpleNamespace

    import charfw.training
    from charfw.default_plugins.train.lora import LoraTrainer, LoraTrainerOptions
    from charfw.stage_context import PartInfo

    seen = {}

    def stop(job):
        seen["at"], seen["keyword"] = job.dataset_options_at, job.keyword
        raise CharfwError("stopped by the test")

    monkeypatch.setattr(charfw.training, "train", stop)
    ctx = SimpleNamespace(
        part=PartInfo(target="mia", name="casual", kind="body", keyword="casual", class_tokens="casual girl"),
        strict=False, stage_dir=tmp_path, cache_dir=tmp_path, fingerprint="", sha256=None, log=print,
        workspace_root=tmp_path, progress=None, input_file=lambda name: tmp_path / "dataset.toml")
    with pytest.raises(CharfwError, match="stopped by the test"):
        LoraTrainer().run(ctx, LoraTrainerOptions())
    assert seen == {"at": "in the manifest's dataset stage, e.g. dataset: {plugin: kohya-toml, color_aug: false}",
                    "keyword": "mia-casual"}  # the file name carries the character


def test_tiny_model_defaults_fill_only_unset_options() -> None:
    from charfw.default_plugins.train.lora import LoraTrainerOptions

    tiny = LoraTrainerOptions.model_validate({"max_train_steps": 5}).for_model("charfw:tiny-sd15")
    assert (tiny.dim, tiny.optimizer, tiny.max_train_steps, tiny.resolution) == (8, "AdamW", 5, 128)
    assert tiny.save_state_every_minutes == 10 and isinstance(tiny, LoraTrainerOptions)
    real = LoraTrainerOptions().for_model("models/Defmix-v2.0.safetensors")
    assert (real.dim, real.optimizer, real.max_train_steps, real.resolution) == (128, "AdamW8bit", 1200, None)


def test_readme_training_examples_are_valid() -> None:
    """The manifest block and the commands of README's "Training" section."""
    import re
    import shlex

    import yaml

    from charfw.default_plugins.train.lora import LoraTrainerOptions

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    section = readme[readme.index("## Training"):readme.index("## Plugins")]
    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))
    options = {k: v for k, v in block["stages"]["train"].items() if k != "plugin"}
    settings = LoraTrainerOptions.model_validate(options)
    assert settings.method_name("krnk") == "krnk-Lora3x3A50p-AdamW8-128-100-1200"
    commands = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    for line in commands.splitlines():
        if line.startswith("charfw train"):
            params, _ = _parse_train(shlex.split(line)[2:])
            assert params["base_model"] == "Defmix-v2.0.safetensors"
