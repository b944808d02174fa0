"""``lora``: the built-in trainer of the ``train`` stage (charfw's own, see :mod:`charfw.training`).

It trains on the dataset TOML the ``dataset`` stage wrote, with the manifest's base model,
VAE and clip skip, and writes ``build/<target>/<part>/train/<name>.safetensors`` named as
the method names LoRAs (``krnk-Lora3x3A50p-AdamW8-128-100-1200``). The manifest's
``train:`` block takes every :class:`~charfw.training.settings.TrainSettings` option;
paths in it (``continue_from``, ``sample_prompts``) are relative to the workspace. On the
built-in tiny model, options the block leaves out take the tiny model's defaults (dim 8,
AdamW, 128 px, 24 steps) instead of the method's.

An interrupted build resumes: resumable state is saved under ``train/state/`` every
``save_state_every_minutes`` (10 by default in a build) and on Ctrl-C (once the step in
progress is done; a second Ctrl-C stops at once without saving), tagged with the stage's
fingerprint, and the next ``charfw build`` continues from it if nothing changed, to the
same weights an uninterrupted build gives.
The state is removed once the LoRA is written. ``--strict`` builds stop before training
when an image cannot be read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

import charfw
from charfw import CharfwError, Options, StageOutput, Trainer, console
from charfw.errors import check_module
from charfw.training.settings import TrainSettings


class LoraTrainerOptions(TrainSettings, Options):
    save_state_every_minutes: float = Field(10, ge=0, description="save resumable state this often (0: never); "
                                            "an interrupted build continues from it")


class LoraTrainer(Trainer):
    name = "lora"
    version = "1"
    description = "charfw's trainer: lora / lora3x3 / loha in kohya format, from the kohya dataset TOML"
    Options = LoraTrainerOptions

    # --- before the stage runs -----------------------------------------------------------

    def _paths(self, options: LoraTrainerOptions, ctx: Any) -> dict[str, Path]:
        out = {}
        for key in ("continue_from", "sample_prompts"):
            value = getattr(options, key)
            if value:
                path = Path(value).expanduser()
                out[key] = path if path.is_absolute() else ctx.workspace_root / path
        return out

    def check(self, ctx: Any, options: LoraTrainerOptions) -> None:
        check_module("torch", extra="train", purpose="training")
        check_module("diffusers", extra="train", purpose="training")
        from charfw.training.model_sources import check_model_refs

        model = ctx.part.model
        check_model_refs(model, cache_dir=ctx.cache_dir, workspace_root=ctx.workspace_root, label=ctx.part.label,
                         purpose="train on")
        for key, path in self._paths(options, ctx).items():
            if not path.is_file():
                raise CharfwError(f"train.{key}: file not found", path=path)
        if "sample_prompts" in self._paths(options, ctx):
            from charfw.training.sample_prompts import read_prompts

            read_prompts(self._paths(options, ctx)["sample_prompts"])
        if options.for_model(model.base).optimizer == "AdamW8bit":
            import torch

            if not torch.cuda.is_available():
                raise CharfwError(
                    f"{ctx.part.label}: optimizer AdamW8bit needs bitsandbytes on an NVIDIA GPU, and this "
                    "machine has none", option="optimizer",
                    hint="set optimizer: AdamW in the manifest's train block, e.g. train: {plugin: lora, optimizer: AdamW}")
            try:
                check_module("bitsandbytes", extra="cuda", purpose="optimizer AdamW8bit")
            except CharfwError as exc:
                exc.option = "optimizer"
                raise

    def cache_key(self, ctx: Any, options: LoraTrainerOptions) -> Any:
        """What the engine cannot see: the base model's and VAE's content, the files the
        options name. As [name, hash] pairs, so a rebuild says which one changed."""
        from charfw.training.model_sources import model_key_pairs

        pairs = model_key_pairs(ctx.part.model, cache_dir=ctx.cache_dir, sha256=ctx.sha256)
        for key, path in self._paths(options, ctx).items():
            pairs.append([f"{key} {path.name}", ctx.sha256(path)])
        return pairs

    # --- the stage -----------------------------------------------------------------------

    def run(self, ctx: Any, options: LoraTrainerOptions) -> Any:
        from charfw.training import TrainJob, train

        model = ctx.part.model
        paths = self._paths(options, ctx)
        settings = options.for_model(model.base, family=model.family).model_copy(update={
            **{k: str(v) for k, v in paths.items()},
            "bad_images": "stop" if ctx.strict else options.bad_images,
        })
        problems: list[str] = []

        def problem(line: str) -> None:
            problems.append(line)
            console.warn(line)

        job = TrainJob(
            settings=TrainSettings.model_validate(settings.model_dump()),
            dataset_config=ctx.input_file("config"),
            base_model=model.base,
            vae=model.vae,
            clip_skip=model.clip_skip,
            family=model.family,
            output_dir=ctx.stage_dir,
            cache_dir=ctx.cache_dir,
            keyword=ctx.part.lora_name,
            state_dir=ctx.stage_dir / "state",
            logging_dir=ctx.stage_dir / "logs",
            sample_dir=ctx.stage_dir / "samples",
            resume="auto",
            fingerprint=ctx.fingerprint,
            sha256=ctx.sha256,
            report_problem=problem,
            log=ctx.log,
            label=f"{ctx.part.label} train",
            dataset_options_at="in the manifest's dataset stage, e.g. dataset: {plugin: kohya-toml, color_aug: false}",
            progress=lambda total, what: ctx.progress(total, what, unit="it"),
            extra_metadata={"ss_charfw_part": ctx.part.label},
        )
        result = train(job)
        # the stage is complete: its record replaces the resumable state, and files of
        # earlier runs under other names go
        shutil.rmtree(ctx.stage_dir / "state", ignore_errors=True)
        for old in ctx.stage_dir.glob("*.safetensors"):
            if old.stem != result.name and not old.stem.startswith(result.name + "-"):
                old.unlink()
        summary = [f"{ctx.record_path(result.lora)} ({result.steps} steps, {result.seconds:.0f} s"
                   + (f", resumed at step {result.resumed_from}" if result.resumed_from else "") + ")"]
        if result.intermediate:
            summary.append(f"{len(result.intermediate)} intermediate file(s) beside it")
        if result.samples:
            summary.append(f"{len(result.samples)} sample image(s) in {ctx.record_path(ctx.stage_dir / 'samples')}/")
        return StageOutput(
            files={"lora": ctx.record_path(result.lora)},
            data={"name": result.name, "steps": result.steps, "epochs": result.epochs,
                  "sshs_model_hash": result.metadata.get("sshs_model_hash", "")},
            summary=summary,
            problems=problems,
        )


@charfw.hookimpl
def register_trainers(register):
    register(LoraTrainer())
