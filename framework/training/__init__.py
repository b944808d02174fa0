"""charfw's LoRA trainer: kohya dataset configs in, kohya-format LoRA files out.

=========================  ===========================================================
module                     what it holds
=========================  ===========================================================
:mod:`.settings`           :class:`TrainSettings` (the options, the method's defaults and
                           naming rules) and :class:`TrainJob` (one run: settings + paths)
:mod:`.loop`               :func:`train`, the training loop
:mod:`.families`           model families (SD 1.x, SDXL, SD 3.5): loading, conditioning,
                           per-sample inputs, the objective hook, file metadata, pipelines
:mod:`.objectives`         the DDPM objective (noise or v prediction, min-SNR)
:mod:`.model_sources`      base-model references: built-in, diffusers folder, single file,
                           Hugging Face id; content identities for caches and fingerprints
:mod:`.single_file`        the LDM single-file layout (A1111 checkpoints), read and write
:mod:`.single_file_sdxl`   SDXL's SGM single-file layout (open_clip OpenCLIP-G), read and write
:mod:`.tiny_sdxl`          ``charfw:tiny-sdxl`` (``tiny_sd``: ``charfw:tiny-sd15``): real
                           topology, tiny widths
:mod:`.networks`           lora / lora3x3 / loha modules with kohya's names
:mod:`.dataset`            the kohya TOML's images, captions and per-epoch batches
:mod:`.buckets`            aspect-ratio buckets
:mod:`.caches`             latent and text-encoder caches
:mod:`.batch_inputs`       a batch's latents and conditioning, image checks before training
:mod:`.optimizers`         optimizers and learning-rate schedules by kohya's names
:mod:`.train_state`        resumable state (step, optimizer, schedule, random generators)
:mod:`.interrupts`         Ctrl-C acted on at the next step boundary, where state is consistent
:mod:`.sample_prompts`     kohya's sample-prompt syntax and sampling during training
:mod:`.lora_output`        the file's ``ss_*`` metadata and saving
:mod:`.text_states`        the text encoder's states with clip skip (shared with generation),
                           SDXL's penultimate states and pooled vector
=========================  ===========================================================

Applying a trained file to a diffusers pipeline (baked ΔW) is
:func:`charfw.generation.lora_patch.bake_lora`, next to generation's LoRA patching.

Importing this package is cheap; torch and diffusers load when training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import TrainJob, TrainSettings

if TYPE_CHECKING:
    from .loop import TrainResult

__all__ = ["TrainJob", "TrainSettings", "train"]


def train(job: TrainJob) -> TrainResult:
    """Run one training job (see :mod:`charfw.training.loop`)."""
    from .loop import train as run

    return run(job)
