"""Training throughput of charfw's trainer, and the same work as a plain diffusers + peft loop.

    python benchmarks/train_throughput.py                      # GPU: SD 1.5 at 512 px; CPU: the tiny model
    python benchmarks/train_throughput.py --model sd15 --batch-sizes 1,4,8 --steps 40
    python benchmarks/train_throughput.py --model tiny --device cpu --resolution 128 --threads 1

What is trained: a LoRA with conv layers (charfw's ``lora3x3``: attention, projections and
the resnet/sampler convolutions, dim 32 = conv_dim 32 for SD 1.5, 8 for the tiny model) on
the UNet, text encoder frozen, AdamW, flip augmentation, no gradient checkpointing. The
model has SD 1.5's real architecture with random weights (built from the configs charfw
ships: nothing is downloaded), or charfw's tiny SD 1.5 for CPUs.

Rows, per batch size, all in the same run:

* ``diffusers+peft``: the loop of diffusers' ``train_text_to_image_lora.py``, reduced to
  its work: peft's LoRA on the same layers, images decoded and encoded by the VAE every
  step, captions through the text encoder every step, the loss read every step;
* ``charfw``: :func:`charfw.training.train` with caches off: the same work per step;
* ``charfw cached``: the same with latents and text-encoder outputs cached (the normal case:
  the caching is done before the first step, once, and then shared between runs).

Columns: seconds per step (median and best of ``--repeat`` runs, after ``--warmup``
steps), images per second (from the median), peak accelerator memory, and on a GPU the model FLOP utilisation:
images/s × 1.73 TFLOP (the SD 1.5 UNet's forward and backward at 512 px with frozen base
weights; ``../shared/reference/landscape.md`` §3b) ÷ the GPU's dense bf16 peak (H100 SXM and
H200: 989 TFLOP/s; ``--peak-tflops`` for others). The FLOP figure holds for SD 1.5 at 512 px
only: other models or resolutions report no MFU.

The machine may be shared: runs take turns so that all configurations see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SD15_TFLOP_PER_IMAGE = 1.73
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


# --- models and data -------------------------------------------------------------------------


def build_random_sd15(dest: Path, dtype: Any) -> Path:
    """SD 1.5's architecture with random weights as a diffusers folder (no download)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from charfw.training.clip_tokenizer import clip_tokenizer_files
    from charfw.training.single_file import shipped_configs

    if (dest / "model_index.json").is_file():
        return dest
    configs = shipped_configs()["sd15"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))
    files = clip_tokenizer_files(dest.parent)
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)
    scheduler = PNDMScheduler.from_config(json.loads((configs / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def write_images(folder: Path, count: int, size: int) -> list[tuple[Path, str]]:
    """Smooth random pictures with captions (PNG, as training folders hold them)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        low = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"img{i:03d}.png"
        image.save(path)
        caption = f"krnk, 1girl, white background, tag{i % 7}, from front"
        path.with_suffix(".txt").write_text(caption)
        out.append((path, caption))
    return out


def write_toml(path: Path, images: Path, batch: int, size: int) -> Path:
    path.write_text(f'''[general]
caption_extension = ".txt"
enable_bucket = true
bucket_no_upscale = true
color_aug = false

[[datasets]]
resolution = {size}
batch_size = {batch}

  [[datasets.subsets]]
  image_dir = "{images.as_posix()}"
  class_tokens = "krnk girl"
  num_repeats = 10
  flip_aug = true
''')
    return path


def target_paths(unet: Any) -> list[str]:
    """The UNet layers charfw's lora3x3 wraps, as module paths (for peft)."""
    from charfw.training.networks.targets import UNET_CONV_TARGETS, find_targets

    ids = {id(m): name for name, m in unet.named_modules()}
    targets = find_targets(unet, prefix="lora_unet", root="unet", classes=UNET_CONV_TARGETS, conv3x3=True)
    return [ids[id(t.layer)] for t in targets]


# --- the two trainers --------------------------------------------------------------------------


def run_charfw(model: Path, toml: Path, work: Path, *, steps: int, warmup: int, dim: int, cached: bool,
               mixed: str, device: Any, compile_unet: bool = False, channels_last: bool = False) -> dict[str, Any]:
    import torch

    from charfw.training import TrainJob, TrainSettings, train

    settings = TrainSettings(
        network="lora3x3", dim=dim, alpha=dim / 2, optimizer="AdamW", learning_rate=1e-4, train_unet_only=True,
        max_train_steps=warmup + steps, mixed_precision=mixed, gradient_checkpointing=False,
        cache_latents="memory" if cached else "off", cache_text_encoder_outputs=cached, log_with="none",
        lr_scheduler="constant", torch_compile=compile_unet, channels_last=channels_last,
    )
    job = TrainJob(settings=settings, dataset_config=toml, base_model=str(model), output_dir=work / "out",
                   cache_dir=work / "cache", keyword="bench", log=lambda m: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(job)
    times = result.step_times
    seconds = (times[-1] - times[warmup - 1]) / (len(times) - warmup)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds_per_step": seconds, "peak_bytes": peak}


def run_baseline(model: Path, images: list[tuple[Path, str]], *, batch: int, size: int, steps: int, warmup: int,
                 dim: int, mixed: str, device: Any) -> dict[str, Any]:
    """diffusers' train_text_to_image_lora.py, reduced to the work of one step."""
    import random

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for part in (unet, vae, text_encoder):
        part.requires_grad_(False)
    unet.to(device, weight_dtype)
    vae.to(device, torch.float32)
    text_encoder.to(device, weight_dtype)
    unet.add_adapter(LoraConfig(r=dim, lora_alpha=dim / 2, init_lora_weights="gaussian",
                                target_modules=target_paths(unet)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    rng = random.Random(0)
    generator = torch.Generator(device=device).manual_seed(0)

    def load(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)

    times = []
    unet.train()
    for _ in range(warmup + steps):
        chosen = rng.sample(images, batch)
        pixels = torch.stack([load(p) for p, _ in chosen]).to(device)
        ids = tokenizer([c for _, c in chosen], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            states = text_encoder.final_layer_norm(hidden)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = unet(noisy, timesteps, states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the example logs the loss every step
        times.append(time.perf_counter())
    seconds = (times[-1] - times[warmup - 1]) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del unet, vae, text_encoder, optimizer
    return {"seconds_per_step": seconds, "peak_bytes": peak}


# --- the run -----------------------------------------------------------------------------------


def peak_tflops(device: Any, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16_TFLOPS[key]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--model", choices=["sd15", "tiny"], default=None, help="default: sd15 on a GPU, tiny on a CPU")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 for sd15, 128 for tiny")
    parser.add_argument("--batch-sizes", default=None, help="default: 1,4,8 on a GPU, 4 on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 40 on a GPU, 12 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 10 / 3)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per configuration (default 1 / 5)")
    parser.add_argument("--dim", type=int, default=None, help="LoRA dim = conv_dim (default 32 for sd15, 8 tiny)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: bf16 on a GPU, no on a CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--no-baseline", action="store_true", help="skip the diffusers + peft loop")
    parser.add_argument("--channels-last", action="store_true", help="charfw rows with channels_last")
    parser.add_argument("--compile", action="store_true",
                        help="add a 'charfw cached compiled' row (torch.compile; minutes of compiling first)")
    parser.add_argument("--work", type=Path, default=None, help="where models and images go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    model_name = args.model or ("sd15" if gpu else "tiny")
    size = args.resolution or (512 if model_name == "sd15" else 128)
    batches = [int(b) for b in (args.batch_sizes or ("1,4,8" if gpu else "4")).split(",")]
    steps, warmup = args.steps or (40 if gpu else 12), args.warmup or (10 if gpu else 3)
    repeat = args.repeat or (1 if gpu else 5)
    dim = args.dim or (32 if model_name == "sd15" else 8)
    mixed = args.mixed_precision or ("bf16" if gpu else "no")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    work = args.work or Path(tempfile.mkdtemp(prefix="charfw-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if model_name == "sd15":
        model = build_random_sd15(work / "sd15-random", torch.float16)
    else:
        from charfw.training.tiny_sd import build_tiny_sd15

        model = work / "tiny-sd15"
        if not (model / "model_index.json").is_file():
            build_tiny_sd15(model)
    images = write_images(work / "images" / "10_bench", 32, size)
    peak = peak_tflops(device, args.peak_tflops)
    flops = SD15_TFLOP_PER_IMAGE if model_name == "sd15" and size == 512 else None
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{model_name} at {size} px, lora3x3 dim {dim}, {mixed}, {name}; {warmup} warm-up + {steps} timed steps, "
          f"{repeat} run(s) each" + (", channels_last" if args.channels_last else ""), flush=True)

    rows = []
    for batch in batches:
        toml = write_toml(work / f"data-b{batch}.toml", images[0][0].parent, batch, size)
        runs: dict[str, list[dict[str, Any]]] = {"diffusers+peft": [], "charfw": [], "charfw cached": [],
                                                 "charfw cached compiled": []}
        for _ in range(repeat):  # configurations take turns: all see the same machine load
            if not args.no_baseline:
                runs["diffusers+peft"].append(run_baseline(model, images, batch=batch, size=size, steps=steps,
                                                           warmup=warmup, dim=dim, mixed=mixed, device=device))
            variants = [("charfw", False, False), ("charfw cached", True, False)]
            if args.compile:
                variants.append(("charfw cached compiled", True, True))
            for label, cached, compiled in variants:
                runs[label].append(run_charfw(model, toml, work / f"run-b{batch}-{label.replace(' ', '-')}",
                                              steps=steps, warmup=warmup, dim=dim, cached=cached, mixed=mixed,
                                              device=device, compile_unet=compiled, channels_last=args.channels_last))
            if gpu:
                torch.cuda.empty_cache()
        for label, results in runs.items():
            if not results:
                continue
            seconds = statistics.median(r["seconds_per_step"] for r in results)
            best = min(r["seconds_per_step"] for r in results)
            ips = batch / seconds
            peak_bytes = max((r["peak_bytes"] or 0) for r in results) or None
            mfu = ips * flops / peak if flops and peak else None
            row = {"trainer": label, "batch": batch, "seconds_per_step": seconds, "best_seconds_per_step": best,
                   "images_per_second": ips,
                   "peak_memory_gib": peak_bytes / 2**30 if peak_bytes else None, "mfu": mfu,
                   "all_seconds_per_step": [r["seconds_per_step"] for r in results]}
            rows.append(row)
            print(f"  batch {batch:>2}  {label:<22} {seconds * 1000:8.1f} ms/step (best {best * 1000:.1f})  {ips:7.2f} img/s"
                  + (f"  peak {row['peak_memory_gib']:.2f} GiB" if peak_bytes else "")
                  + (f"  MFU {mfu * 100:.1f} %" if mfu else ""), flush=True)

    print("\n| trainer | batch | s/step (median) | s/step (best) | images/s | peak memory | MFU |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else "-"
        mfu = f"{r['mfu'] * 100:.1f} %" if r["mfu"] else "-"
        print(f"| {r['trainer']} | {r['batch']} | {r['seconds_per_step']:.3f} | {r['best_seconds_per_step']:.3f} | "
              f"{r['images_per_second']:.2f} | {memory} | {mfu} |")
    for batch in batches:
        by = {r["trainer"]: r["seconds_per_step"] for r in rows if r["batch"] == batch}
        if "diffusers+peft" in by:
            print(f"batch {batch} (medians): charfw {by['diffusers+peft'] / by['charfw']:.2f}x and charfw cached "
                  f"{by['diffusers+peft'] / by['charfw cached']:.2f}x the speed of diffusers+peft")
    if args.json:
        args.json.write_text(json.dumps({"model": model_name, "resolution": size, "device": name, "dim": dim,
                                         "mixed_precision": mixed, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
