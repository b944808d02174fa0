"""``charfw train`` (any kohya dataset TOML, as ``train_network.py`` would) and
``charfw export-model`` (a base model as a single-file checkpoint or a diffusers folder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

import charfw
from charfw import CharfwError, console
from charfw.build.atomic import atomic_dir
from charfw.build.hashing import HashCache
from charfw.errors import display_path
from charfw.training.command_line import settings_options


class KohyaCommand(click.Command):
    """Reads kohya's ``train_network.py`` spellings too (see :mod:`charfw.training.command_line`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from charfw.training.command_line import translate_kohya_argv

        args, notes = translate_kohya_argv(list(args))
        ctx.meta["charfw_kohya_notes"] = notes
        return super().parse_args(ctx, args)


def default_cache_dir() -> Path:
    root = os.environ.get("CHARFW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "charfw")
    return Path(root)


@charfw.hookimpl
def register_commands(cli):
    @cli.command("train", cls=KohyaCommand)
    @click.argument("dataset", required=False, type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--dataset-config", "--dataset_config", "dataset_option", type=click.Path(dir_okay=False, path_type=Path),
                  help="The kohya dataset TOML (or give it as the argument).")
    @click.option("--base-model", "--pretrained-model-name-or-path", "--pretrained_model_name_or_path", "base_model",
                  required=True, help="A .safetensors checkpoint, a diffusers folder, a Hugging Face id or charfw:tiny-sd15.")
    @click.option("--family", type=click.Choice(["sd1", "sdxl", "sd35"]),
                  help="The model family (default: told from the base model's files; needed only for a "
                       "Hugging Face id that is not downloaded yet).")
    @click.option("--vae", help="A VAE file (.safetensors/.ckpt), folder or id to use instead of the model's.")
    @click.option("--clip-skip", "--clip_skip", type=click.IntRange(1, 12), default=2, show_default=True,
                  help="1 = the text encoder's last layer, 2 = the penultimate.")
    @click.option("--output-dir", "--output_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("output"),
                  show_default=True, help="Where the LoRA, intermediate files, logs and samples go.")
    @click.option("--keyword", help="First part of the default output name (default: the first class token).")
    @click.option("--resume", is_flag=False, flag_value="auto", default=None, metavar="[STATE]",
                  help="Continue an interrupted run: from its newest saved state, or from the state folder given.")
    @click.option("--logging-dir", "--logging_dir", type=click.Path(file_okay=False, path_type=Path),
                  help="TensorBoard logs (default: OUTPUT_DIR/logs).")
    @click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Resumable states (default: OUTPUT_DIR/<name>-state).")
    @click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Latent cache and built-in models (default: $CHARFW_CACHE or ~/.cache/charfw).")
    @settings_options
    @click.pass_context
    def train_command(ctx: click.Context, dataset: Path | None, dataset_option: Path | None, base_model: str,
                      family: str | None, vae: str | None, clip_skip: int, output_dir: Path, keyword: str | None, resume: str | None,
                      logging_dir: Path | None, state_dir: Path | None, cache_dir: Path | None, **values: Any) -> None:
        """Train a LoRA on a kohya dataset config (TOML), like sd-scripts' train_network.py.

        Every option has a dashed and a kohya spelling (--max-train-steps, --max_train_steps;
        --network_dim, --network_alpha, --optimizer_type, --network_args "conv_dim=..",
        --pretrained_model_name_or_path), so a train_network.py command line mostly runs as it
        is. The defaults are the method's (lora3x3, dim 128, A50p, AdamW8bit, 100e-6,
        cosine_with_restarts, 1200 steps, clip skip 2, fp16, seed 31337), not kohya's.

        \b
        Examples:
          charfw train 4_krnk/4_krnk.toml --base-model Defmix-v2.0.safetensors --vae kl-f8-anime2.ckpt
          charfw train data.toml --base-model model.safetensors --network loha --dim 32 --optimizer AdamW
          charfw train data.toml --base-model model.safetensors --resume      # after an interruption
          accelerate launch -m charfw train data.toml --base-model ...         # several GPUs
        """
        from charfw.training import TrainJob, train
        from charfw.training.command_line import (
            default_keyword,
            run_fingerprint,
            settings_from_options,
        )

        for note in ctx.meta.get("charfw_kohya_notes", []):
            console.info(note)
        config = dataset_option or dataset
        if config is None:
            raise click.UsageError("give the dataset config: charfw train DATASET.toml --base-model ...")
        if dataset and dataset_option and dataset != dataset_option:
            raise click.UsageError("two dataset configs given")
        if not config.is_file():
            raise CharfwError("dataset config not found", path=config)
        settings = settings_from_options(values).for_model(base_model)
        cache = cache_dir or default_cache_dir()
        # every run is tagged, not only those that save state: Ctrl-C saves one in any run,
        # and --resume only continues a state of the same fingerprint (the model hashes are
        # stat-cached, and the run hashes its model for the latent cache anyway)
        from charfw.training.families.detect import detect_family
        from charfw.training.model_sources import resolve_source, source_identity

        source = resolve_source(base_model, cache_dir=cache)
        found = detect_family(source, declared=family).require_trained(
            path=source.path if source.kind in ("single_file", "diffusers") else None)
        console.info(f"model family {found.describe()}")
        settings = settings.for_model(base_model, family=found.name)  # the family's defaults (SD 3.5: lora)
        hashes = HashCache(cache / "hash-cache.json")
        identities = [source_identity(source, hashes.sha256)]
        if vae:
            identities.append(source_identity(resolve_source(vae, cache_dir=cache, what="VAE"), hashes.sha256))
        hashes.save()
        fingerprint = run_fingerprint(settings, config, identities, clip_skip)
        job = TrainJob(settings=settings, dataset_config=config.resolve(), base_model=base_model, vae=vae,
                       clip_skip=clip_skip, family=found.name, output_dir=output_dir.resolve(), cache_dir=cache,
                       keyword=keyword or default_keyword(config), state_dir=state_dir, logging_dir=logging_dir,
                       resume=resume, fingerprint=fingerprint)
        result = train(job)
        if not result.main_process:
            return
        for line in result.summary:
            console.out.print(line, markup=False)
        console.out.print(f"wrote {display_path(result.lora)}", markup=False)

    @cli.command("export-model")
    @click.argument("source")
    @click.argument("dest", type=click.Path(path_type=Path))
    @click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True)
    @click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Where built-in models are built (default: $CHARFW_CACHE or ~/.cache/charfw).")
    def export_model(source: str, dest: Path, precision: str, cache_dir: Path | None) -> None:
        """Write a base model as one .safetensors checkpoint (A1111 layout) or a diffusers folder.

        SOURCE is anything --base-model accepts, e.g. charfw:tiny-sd15 or charfw:tiny-sd35 (the
        tiny test models; an SD 3.5 file is written in SD3's own layout, T5 included):

        \b
          charfw export-model charfw:tiny-sd15 tiny-sd15.safetensors
          charfw export-model charfw:tiny-sd35 tiny-sd35.safetensors
          charfw export-model charfw:tiny-sdxl tiny-sdxl.safetensors
          charfw export-model model.safetensors model-diffusers/
        """
        import torch

        from charfw.training.families import get_family
        from charfw.training.families.detect import detect_family
        from charfw.training.model_sources import resolve_source

        cache = cache_dir or default_cache_dir()
        resolved = resolve_source(source, cache_dir=cache)
        family = get_family(detect_family(resolved).require_trained(path=resolved.path).name)
        if family.name == "sd35":
            family.t5 = True  # type: ignore[attr-defined]  # the whole model, T5 included
        model = family.load(resolved, None, cache_dir=cache)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        if dest.suffix.lower() == ".safetensors":  # SD 1.x: LDM layout; SDXL: SGM (open_clip TE2); SD3: MMDiT
            family.save_single_file(model, dest, dtype=dtype)
        else:
            from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

            scheduler_class = FlowMatchEulerDiscreteScheduler if family.name == "sd35" else DDPMScheduler
            pipe = model.family.pipeline(model, scheduler_class.from_config(model.scheduler_config))
            pipe.to(dtype=dtype)
            with atomic_dir(dest) as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
        console.out.print(f"wrote {display_path(dest)}", markup=False)
