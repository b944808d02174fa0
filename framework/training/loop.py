"""The training loop: a kohya dataset config and a base model in, a kohya-format LoRA out.

It reads top to bottom, like diffusers' ``train_text_to_image_lora.py``: set up the
accelerator, load the frozen base model, read the data and cache what does not change,
attach the network, build the optimizer and schedule, resume if asked, then step through
the epochs (noise, predict, loss, step), saving, sampling and logging on the way, and
write the final file. Everything reusable lives in the modules it calls (``dataset``,
``batch_inputs``, ``networks``, ``optimizers``, ``train_state``, ``lora_output``,
``sample_prompts``); the loop only orders them.

Run it with :func:`train`. Under ``accelerate launch`` each process trains on its share
of every epoch's batches and gradients are averaged across processes; only the main
process writes files.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charfw.build.hashing import HashCache
from charfw.errors import MissingDependency
from charfw.training import lora_output, optimizers, train_state
from charfw.training.caches import LatentCache, TextCache
from charfw.training.dataset import TrainingData
from charfw.training.families import get_family
from charfw.training.interrupts import StopAtStepBoundary
from charfw.training.model_sources import check_available, resolve_source, source_identity
from charfw.training.networks import create_network, detect_file_type, network_type
from charfw.training.networks.targets import select_text_encoders
from charfw.training.sample_prompts import generate_samples, read_prompts

from .. import console
from ..errors import CharfwError
from .settings import TrainJob


class TrainingStopped(CharfwError):
    """The run stopped on a problem with its input (NaN loss, unusable images)."""

@dataclass
class TrainResult:
    lora: Path
    name: str
    steps: int
    epochs: int
    #: the step a resumed run continued from
    resumed_from: int | None = None
    intermediate: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    #: images left out, one "path: reason" line each
    skipped: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: mean wall time of an optimizer step after the first two (None for very short runs)
    seconds_per_step: float | None = None
    #: ``time.perf_counter()`` at the end of each optimizer step of this run (benchmarks)
    step_times: list[float] = field(default_factory=list)
    #: False in the other processes of a multi-GPU run (they write nothing)
    main_process: bool = True
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class _Interruption:
    """What a run stopped by Ctrl-C leaves to resume from, for the line that says so."""

    log: Callable[[str], None]
    state_root: Path
    fingerprint: str
    #: optimizer steps done when it stopped (counting those of the state it resumed from)
    step: int = 0
    resumed_from: int | None = None
    #: a second Ctrl-C stopped it at once
    forced: bool = False
    #: the loop stopped at a step boundary and said what it saved
    said: bool = False

    def report(self) -> None:
        if self.said:
            return

        found = train_state.find_state(self.state_root, self.fingerprint)
        if self.step <= (self.resumed_from or 0):
            head = "interrupted before the first step" + (" of this run" if self.resumed_from else "")
        else:  # between two step boundaries: the state in memory is half a step, and not saved
            head = f"{'stopped at once' if self.forced else 'interrupted'} after step {self.step}, without saving"
        tail = f"resuming continues from {found.name}" if found is not None else \
            "nothing to resume, the next run starts over"
        self.log(f"{head}; {tail}")


def _state_root(job: TrainJob) -> Path:
    return job.state_dir or job.output_dir / f"{job.name}-state"


def train(job: TrainJob) -> TrainResult:
    """Train the LoRA ``job`` describes; returns where it is and what happened.

    Ctrl-C stops the run after the step it is in, saving a state a resumed run continues
    from as if it never stopped (:mod:`.interrupts`); pressed again, or before the first
    step, it stops at once and says which state, if any, is left to resume from."""
    notes = _Interruption(job.log or console.info, _state_root(job), job.fingerprint)
    try:
        return _train(job, notes)
    except KeyboardInterrupt:
        notes.report()
        raise


def _train(job: TrainJob, notes: _Interruption) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object

    from .batch_inputs import BatchInputs

    s = job.settings
    log = job.log or console.info
    started = time.perf_counter()
    output_dir = job.output_dir
    name = job.name
    state_root = _state_root(job)
    hash_cache = None
    if job.sha256 is None:
        hash_cache = HashCache(job.cache_dir / "hash-cache.json")
    sha256 = job.sha256 or hash_cache.sha256  # type: ignore[union-attr]
    progress = job.progress or (lambda total, what: console.progress(total, f"{job.label} {what}", unit="it"))

    # --- the accelerator: devices, processes, mixed precision, trackers ------------------
    # fp16/bf16 autocast is for GPUs; a CPU run in fp16 would be slower and less exact,
    # so it trains in float32 there (and says so).
    import accelerate

    on_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    mixed = s.mixed_precision if on_gpu else "no"
    trackers = _trackers(s.log_with)
    logging_dir = job.logging_dir or output_dir / "logs"
    train_te_lr = s.resolved_text_encoder_lr()
    family = get_family(job.family)
    family.configure(s)  # the family's own settings (SD 3.5: T5, weighting); refuses networks it cannot train
    ddp = DistributedDataParallelKwargs(find_unused_parameters=train_te_lr > 0 and family.text_layers_unused(job.clip_skip))
    accelerator = Accelerator(
        mixed_precision=mixed, log_with=trackers or None, kwargs_handlers=[ddp], dynamo_backend="inductor" if s.torch_compile else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )
    device = accelerator.device
    main = accelerator.is_main_process
    if not main:  # one voice: the other processes train silently
        log, progress = (lambda message: None), (lambda total, what: console.progress(None, "", unit="it"))
        warn = report = log
    else:
        warn, report = console.warn, job.report_problem or console.warn
    notes.log = log
    if mixed != s.mixed_precision and console.once(f"no {s.mixed_precision} here"):  # once, not per part
        log(f"mixed precision {s.mixed_precision} needs a GPU; training in float32 on this machine")
    optimizers.check_available(s, device)  # before minutes of loading and caching
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 leftovers (the VAE) on tensor cores

    # --- seeds ---------------------------------------------------------------------------
    # Noise and timesteps come from one generator whose state is saved with the run;
    # data order and augmentation are derived from (seed, epoch, position) in the dataset.
    accelerate.utils.set_seed(s.seed)
    generator = torch.Generator(device=device).manual_seed(s.seed + accelerator.process_index)

    # --- the base model, frozen ----------------------------------------------------------
    source = resolve_source(job.base_model, cache_dir=job.cache_dir)
    vae_source = resolve_source(job.vae, cache_dir=job.cache_dir, what="VAE") if job.vae else None
    for src, what in ((source, "base model"), (vae_source, "VAE")):
        if src is not None:  # an uncached Hugging Face id without network fails now, not after retries
            check_available(src, workspace_root=Path.cwd(), what=what)
    log(f"loading {source.ref}" + (f" with VAE {vae_source.ref}" if vae_source else ""))
    model = family.load(source, vae_source, cache_dir=job.cache_dir)
    if not family.uses_clip_skip and job.clip_skip != 1:
        log(f"clip skip {job.clip_skip} is ignored: {family.name} conditions on fixed text-encoder layers")
    for part in (model.unet, model.vae, *model.text_encoders):
        part.requires_grad_(False)
    # the VAE stays in float32: half-precision VAEs give NaN latents on some images
    model.vae.to(device, torch.float32).eval()
    model.unet.to(device, weight_dtype)
    for te in model.text_encoders:
        te.to(device, weight_dtype)
    # noise, timesteps, targets and loss weighting: the family's (DDPM for SD 1.x and SDXL)
    objective = family.objective(model, s, device)

    # --- the data: images, captions, buckets; unusable images found before training -------
    data = TrainingData.load(job.dataset_config, resolution=s.resolution, default_resolution=family.default_resolution,
                             relative_to=job.relative_to)
    data.prior_loss_weight = s.prior_loss_weight
    for line in data.warnings:
        warn(line)
    vae_identity = str(source_identity(vae_source or source, sha256)) + ("/vae" if vae_source else "/base")
    latent_cache = LatentCache(s.cache_latents, job.cache_dir, vae_identity)
    text_frozen = train_te_lr == 0 or s.train_unet_only or s.text_encoders == []
    text_cache = TextCache() if (s.cache_text_encoder_outputs and text_frozen and data.fixed_captions) else None
    inputs = BatchInputs(model, latent_cache=latent_cache, text_cache=text_cache, device=device, sha256=sha256,
                         clip_skip=job.clip_skip, max_token_length=s.max_token_length, vae_batch_size=s.vae_batch_size)
    bad = dict(data.bad)
    bad.update(inputs.prepare(data, progress))
    if bad and s.bad_images == "stop":
        lines = "; ".join(f"{p}: {why}" for p, why in sorted(bad.items()))
        raise TrainingStopped(f"{len(bad)} unusable image(s), training not started: {lines}",
                              hint="fix or remove them, or set bad_images: skip to leave them out")
    data.drop(bad)
    skipped = [f"{p}: {why}" for p, why in sorted(bad.items())]
    for line in skipped:
        report(f"{line} (left out of training)")
    data.finalize()
    if text_cache is not None:
        inputs.cache_text(data, progress)
    log(data.summary())
    uncached = sorted({str(e.subset.image_dir.name) for e in data.entries if not e.subset.cacheable_latents})
    if latent_cache.enabled and uncached:
        hint = f" (set them to false {job.dataset_options_at} to cache latents)" if console.once("uncached") else ""
        log(f"latents of {len(uncached)} subset(s) are encoded every step: color_aug or random_crop is on{hint}")

    # --- the network, attached to the UNet and the text encoder --------------------------
    kind = network_type(s.network)
    roots = select_text_encoders(family.network_roots(model), [] if s.train_unet_only else s.text_encoders)
    ranks = None
    continue_state = None
    if s.continue_from:
        from ..lora.safetensors_io import read_safetensors, to_torch
        from .networks.network import kohya_state, ranks_from_state

        tensors, _, _ = read_safetensors(Path(s.continue_from))
        continue_state = kohya_state({k: to_torch(v).clone() for k, v in tensors.items()})
        file_kind = detect_file_type(continue_state)
        if file_kind.module_factory is not kind.module_factory:
            raise CharfwError(f"the file is a {file_kind.name} network; continue it with network: {file_kind.name}",
                              path=s.continue_from)
        ranks = ranks_from_state(continue_state, kind)
    network = create_network(kind, s.network_config(), roots, ranks=ranks)
    if continue_state is not None:
        loaded = network.load_kohya_state_dict(continue_state, source=str(s.continue_from))
        log(f"continuing from {s.continue_from} ({len(loaded.loaded)} modules"
            + (f", {len(loaded.missing)} new" if loaded.missing else "") + ")")
    network.to(device)
    if s.channels_last:
        model.unet.to(memory_format=torch.channels_last)
        network.to(memory_format=torch.channels_last)
    network.apply()
    lrs = {"unet": s.learning_rate, "text_encoder": train_te_lr}
    trained_roots = network.trainable_roots(lrs)
    if not trained_roots:
        raise CharfwError("nothing to train: every learning rate is 0")
    if s.gradient_checkpointing:
        # activations of the UNet are recomputed in the backward pass (the text encoder's
        # 77 tokens cost little memory, so it runs without)
        model.unet.enable_gradient_checkpointing()
    model.unet.train()
    for te in model.text_encoders:
        te.train("text_encoder" in trained_roots and any(p.requires_grad for p in te.parameters()))

    # --- optimizer, schedule, and how long the run is ------------------------------------
    groups = network.parameter_groups(lrs)
    group_names = ["textencoder" if g["name"] == "text_encoder" else g["name"] for g in groups]
    optimizer = optimizers.make_optimizer(s, groups, device)
    batches_per_epoch = math.ceil(data.batches_per_epoch() / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / s.gradient_accumulation_steps))
    total_steps = s.max_train_epochs * steps_per_epoch if s.max_train_epochs else s.max_train_steps
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = optimizers.make_scheduler(s, optimizer, total_steps)
    unet = accelerator.prepare(model.unet)
    # a text encoder with adapters (its own parameters are frozen) trains when the text
    # encoders' rate is above 0; only those are wrapped for distributed training
    trained_tes = [("text_encoder" in trained_roots and any(p.requires_grad for p in te.parameters()))
                   for te in model.text_encoders]
    text_encoders = [accelerator.prepare(te) if trained else te
                     for te, trained in zip(model.text_encoders, trained_tes, strict=True)]
    optimizer = accelerator.prepare(optimizer)
    trained_models = [unet, *(te for te, trained in zip(text_encoders, trained_tes, strict=True) if trained)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = accelerator.scaler

    # --- resume: step, optimizer, schedule, random generators ----------------------------
    global_step, epoch, skip_batches, resumed_from = 0, 1, 0, None
    if job.resume:
        folder = train_state.find_state(state_root, job.fingerprint) if job.resume == "auto" else Path(job.resume)
        if folder is not None:
            info = train_state.read_info(folder)
            if info.fingerprint != job.fingerprint:
                raise CharfwError("this state was saved by a run with other data, model or settings", path=folder,
                                  hint="resume with the settings it was saved with, or start without --resume")
            train_state.load_state(folder, network=network, optimizer=optimizer, scheduler=scheduler,
                                   generator=generator, scaler=scaler, rank=accelerator.process_index)
            global_step, epoch, skip_batches, resumed_from = info.step, info.epoch, info.batch, info.step
            notes.step = notes.resumed_from = global_step
            log(f"resumed from {folder.name} (step {global_step} of {total_steps})")
        elif job.resume != "auto":
            raise CharfwError("no training state here", path=Path(job.resume))

    # --- the file header, samples, trackers ----------------------------------------------
    optimizer_name = optimizers.optimizer_description(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, s)
    metadata = lora_output.training_metadata(
        job, data=data, model=model, network=network, optimizer_name=optimizer_name, mixed_precision=mixed,
        # true only when no image was encoded every step (as kohya, which refuses color_aug with a cache)
        cache_latents=latent_cache.enabled and not uncached, total_steps=total_steps, total_epochs=total_epochs,
        batches_per_epoch=batches_per_epoch, text_encoder_lr=train_te_lr, started_at=lora_output.clock(),
        warmup=optimizers.warmup_steps(s, total_steps))
    prompts = read_prompts(Path(s.sample_prompts)) if s.sample_prompts else []
    sample_dir = job.sample_dir or output_dir / "sample"
    if trackers and main:
        init_kwargs = {"wandb": {"name": s.wandb_run_name}} if s.wandb_run_name and "wandb" in trackers else {}
        accelerator.init_trackers((s.log_prefix or "") + name, init_kwargs=init_kwargs)
    result = TrainResult(output_dir / f"{name}.safetensors", name, total_steps, total_epochs, resumed_from,
                         skipped=skipped)

    def autocast() -> Any:
        return accelerator.autocast()

    def sample(step: int) -> None:
        if prompts and main:
            result.samples += generate_samples(
                model, prompts, out_dir=sample_dir, name=name, step=step, default_seed=s.seed,
                default_sampler=s.sample_sampler, clip_skip=job.clip_skip, device=device, dtype=weight_dtype,
                autocast=autocast, model_hash=(metadata.get("ss_new_sd_model_hash") or "")[:10] or None,
                vae_hash=(metadata.get("ss_new_vae_hash") or "")[:10] or None)

    #: the step of the newest state on disk (saved by this run, or resumed from)
    saved_step = resumed_from

    def save_state(step: int, epoch_: int, batch: int) -> None:
        nonlocal saved_step
        # every process's generators, so that each resumes its own noise
        rng = gather_object([train_state.rng_state(generator)]) if accelerator.num_processes > 1 else \
            [train_state.rng_state(generator)]
        if main:
            train_state.save_state(state_root, train_state.StateInfo(step, epoch_, batch, job.fingerprint, name),
                                   network=network, optimizer=optimizer, scheduler=scheduler, rng=rng,
                                   scaler=scaler, keep=s.save_last_n_states)
        accelerator.wait_for_everyone()
        saved_step = step

    def save_intermediate(stem: str, step: int, epoch_: int) -> None:
        if main:
            path = output_dir / f"{stem}.safetensors"
            lora_output.save_lora(path, network, precision=s.save_precision, metadata=metadata, step=step, epoch=epoch_)
            result.intermediate.append(path)
            lora_output.prune_intermediate(output_dir, name, s.save_last_n)
        accelerator.wait_for_everyone()

    # --- the loop ------------------------------------------------------------------------
    # The loss of a step is read one step later: reading it at once would make the CPU
    # wait for the GPU every step. A NaN or infinite loss stops the run naming the step and
    # the images of every batch of its accumulation group (a NaN in any of them reaches the
    # weights); files are only written after the pending loss was checked.
    pending: tuple[Any, list[Any], int] | None = None
    #: the step's accumulation group so far: the sum of its losses (NaN and Inf carry through) and its batches
    group_loss: Any = None
    group_batches: list[Any] = []
    accumulate = s.gradient_accumulation_steps
    #: where the next batch is: a state saved now resumes there
    position = (epoch, skip_batches)
    losses: deque[float] = deque(maxlen=50)
    step_times: list[float] = []
    last_state = time.monotonic()

    def check_pending() -> None:
        nonlocal pending
        if pending is None:
            return
        loss_value, batches, step = pending
        value = float(loss_value)
        pending = None
        if not math.isfinite(value):
            paths = list(dict.fromkeys(str(p) for b in batches for p in b.paths))
            raise TrainingStopped(
                f"the loss became {'NaN' if value != value else 'infinite'} at step {step}; the batch's images: "
                + ", ".join(paths),
                hint="check those images; train with mixed_precision bf16 or no, or a lower learning rate")
        losses.append(value)
        rates = scheduler.get_last_lr()
        accelerator.log({"loss/current": value, "loss/average": sum(losses) / len(losses),
                         **{f"lr/{n}": float(r or 0.0) for n, r in zip(group_names, rates, strict=False)}}, step=step)

    # Ctrl-C: the loop finishes its step and stops at the boundary (see .interrupts)
    stop = StopAtStepBoundary(enabled=accelerator.num_processes == 1, notice=log)

    def stop_here() -> None:
        """Act on a Ctrl-C at a step boundary: weights, optimizer, schedule, generators and
        ``position`` all belong to ``global_step`` here, so a state saved now resumes into
        the run that stopped. The step's pending loss is checked first (no state with a NaN
        loss); a state the step already saved (a periodic one) is not written twice."""
        check_pending()
        if saved_step != global_step:
            save_state(global_step, *position)
        notes.said = True
        log(f"interrupted at step {global_step}; state saved, resume to continue")
        raise KeyboardInterrupt

    if s.sample_at_first and global_step == 0:
        sample(0)
    log(f"training {name}: {total_steps} steps, {total_epochs} epoch(s) of {steps_per_epoch} step(s), "
        f"{s.network} dim {network.config.dim}" + (f" conv {network.config.conv_dim}" if network.config.conv_dim else "")
        + f", {s.optimizer}, {mixed if mixed != 'no' else 'float32'} on {device.type}")
    try:
        with progress(total_steps, "steps") as bar, stop:
            bar.advance(global_step)
            while global_step < total_steps and epoch <= total_epochs:
                batches = _shard(data.epoch_batches(epoch, s.seed), accelerator.process_index, accelerator.num_processes)
                for index in range(skip_batches, len(batches)):
                    batch = batches[index]
                    if index + 1 < len(batches):
                        inputs.prefetch(batches[index + 1], index + 1)
                    # gradients add up over gradient_accumulation_steps batches (the last group
                    # of an epoch may be shorter); processes synchronise them once per group
                    group_start = index - index % accumulate
                    group_size = min(accumulate, len(batches) - group_start)
                    sync = index + 1 == group_start + group_size
                    with contextlib.ExitStack() as no_sync:
                        if not sync:
                            for trained in trained_models:
                                no_sync.enter_context(accelerator.no_sync(trained))
                        # latents and conditioning: cached, or encoded now
                        latents = inputs.latents(batch, index)
                        conditioning = inputs.conditioning(batch, text_encoders, grad="text_encoder" in trained_roots)
                        extra_inputs = inputs.sample_inputs(batch)
                        # forward diffusion: the family's objective draws noise and timesteps
                        # (DDPM: plus kohya's noise offset) and says what to predict
                        noised = objective.noise(latents, generator)
                        noisy = noised.noisy
                        if s.channels_last:
                            noisy = noisy.contiguous(memory_format=torch.channels_last)
                        with autocast():
                            prediction = family.predict(unet, noisy, noised.timesteps, conditioning.to(weight_dtype),
                                                        extra_inputs)
                        # per-sample weights (regularisation images) and the objective's own
                        # weighting (min-SNR)
                        weights = torch.tensor([x.weight for x in batch.samples], device=device)
                        loss = objective.loss(prediction, noised, weights)
                        accelerator.backward(loss / group_size)
                    group_loss = loss.detach() if group_loss is None else group_loss + loss.detach()
                    group_batches.append(batch)
                    if not sync:
                        continue
                    # the optimizer step
                    if s.max_grad_norm:
                        accelerator.clip_grad_norm_(params, s.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    global_step += 1
                    position = (epoch, index + 1)
                    check_pending()
                    pending = (group_loss / group_size, group_batches, global_step)
                    group_loss, group_batches = None, []
                    bar.advance()
                    step_times.append(time.perf_counter())
                    if losses:
                        bar.update(postfix=f"loss {losses[-1]:.4f}  avg {sum(losses) / len(losses):.4f}  epoch {epoch}")
                    # saves and samples, every N steps
                    at_end = global_step >= total_steps
                    if s.save_every_n_steps and global_step % s.save_every_n_steps == 0 and not at_end:
                        check_pending()
                        save_intermediate(lora_output.intermediate_name(name, step=global_step), global_step, epoch)
                        if s.save_state:
                            save_state(global_step, *position)
                    if s.save_state_every_minutes and time.monotonic() - last_state > s.save_state_every_minutes * 60:
                        check_pending()
                        save_state(global_step, *position)
                        last_state = time.monotonic()
                    if s.sample_every_n_steps and global_step % s.sample_every_n_steps == 0 and not at_end:
                        check_pending()
                        sample(global_step)
                    if stop.requested:
                        stop_here()
                    if at_end:
                        break
                skip_batches = 0
                # end of an epoch: saves and samples every N epochs
                if global_step < total_steps:
                    if s.save_every_n_epochs and epoch % s.save_every_n_epochs == 0:
                        check_pending()
                        save_intermediate(lora_output.intermediate_name(name, epoch=epoch), global_step, epoch)
                        if s.save_state:
                            save_state(global_step, epoch + 1, 0)
                    if s.sample_every_n_epochs and epoch % s.sample_every_n_epochs == 0:
                        check_pending()
                        sample(global_step)
                    epoch += 1
                    position = (epoch, 0)
                    if stop.requested:
                        stop_here()
            check_pending()
            if stop.requested:  # pressed after the last step's check
                stop_here()
    except KeyboardInterrupt:
        # Stopped at a step boundary, stop_here() saved the state and said so. Stopped
        # anywhere else (Ctrl-C twice, or a run without the handler: several processes, not
        # the main thread), the state in memory may be half a step: nothing is saved, and
        # train() says which state is left to resume from.
        notes.step, notes.forced = global_step, stop.forced
        raise
    finally:
        inputs.close()
        if hash_cache is not None:
            hash_cache.save()

    # --- the LoRA file -------------------------------------------------------------------
    notes.step = global_step
    final_epoch = min(epoch, total_epochs)
    # Ctrl-C while the file is written and the last samples made: they are finished, then
    # the run stops with its final state saved (the next run only writes and samples again)
    with stop:
        if main:
            saved = lora_output.save_lora(result.lora, network, precision=s.save_precision, metadata=metadata,
                                          step=global_step, epoch=final_epoch)
            result.metadata = saved.metadata
        if s.save_state:
            save_state(global_step, *position)
        accelerator.wait_for_everyone()
        if prompts and (s.sample_every_n_steps or s.sample_every_n_epochs):
            sample(global_step)
        if stop.requested:
            stop_here()
    if job.after_training is not None:
        job.after_training(model, network)
    network.remove()
    # closes the trackers and, under accelerate launch, the process group: every process, last
    accelerator.end_training()
    result.seconds = time.perf_counter() - started
    result.step_times = step_times
    result.main_process = main
    if len(step_times) > 3:
        result.seconds_per_step = (step_times[-1] - step_times[1]) / (len(step_times) - 2)
    result.summary = [f"{name}.safetensors: {global_step} steps, {s.network} dim {s.dim}"
                      + (f" (resumed at step {resumed_from})" if resumed_from else "")]
    if skipped:
        result.summary.append(f"{len(skipped)} image(s) left out of training")
    return result


def _trackers(log_with: str) -> list[str]:
    """accelerate's trackers for ``log_with``, with an install hint when one is missing."""
    import importlib.util


    trackers = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"],
                "none": []}[log_with]
    for name in trackers:
        if importlib.util.find_spec(name) is None:
            hint = "pip install 'charfw[train]'" if name == "tensorboard" else "pip install wandb (then: wandb login)"
            raise MissingDependency(f"log_with {log_with} needs the Python package '{name}', which is not installed",
                                    hint=f"install it with: {hint}, or set log_with: none")
    return trackers


def _shard(batches: list[Any], rank: int, world: int) -> list[Any]:
    """This process's share of an epoch; every process gets as many batches (the last
    ones wrap around) so that they all step together."""
    if world == 1:
        return batches
    per = math.ceil(len(batches) / world)
    padded = batches + batches[: per * world - len(batches)]
    return padded[rank::world]

