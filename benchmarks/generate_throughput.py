"""Throughput of charfw's Generator against a plain diffusers loop, same 16 images.

4 prompts × 4 images with one LoRA: charfw (LoRA patched once, prompts encoded once,
batched) and a plain loop that builds the pipeline once (the LoRA baked into it once by
charfw's own patcher, so only the generation loop differs) and calls it once per prompt
with ``num_images_per_prompt=4`` and a generator per image.

    python benchmarks/generate_throughput.py                  # tiny SD 1.5, CPU, 64 px, 8 steps
    python benchmarks/generate_throughput.py --real-sd15      # GPU: SD 1.5 architecture, random weights,
                                                              # 512 px, 20 steps, fp16, batch 1/4/8
    python benchmarks/generate_throughput.py --real-sd15 --device cpu --size 128 --steps 1 --repeats 1
                                                              # the same on a CPU, as a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = ["a girl, red hair, school uniform", "a boy, black hair, from above",
           "a girl, blue eyes, smile, full body", "a cat on a sofa, window"]
PER_PROMPT = 4


def make_lora(unet, text_encoder, path: Path) -> Path:
    """A rank-4 LoRA on every attention Linear of the UNet and text encoder (random)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, model in (("lora_unet", unet), ("lora_te", text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ("attn" in name or "self_attn" in name):
                if prefix == "lora_te":
                    name = "text_model." + name.removeprefix("text_model.")
                key = f"{prefix}_{name.replace('.', '_')}"
                out, inn = module.weight.shape
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, inn, generator=g) * 0.05
                tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.05
                tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata={"ss_network_dim": "4"})
    return path


def real_sd15(folder: Path) -> Path:
    """The SD 1.5 architecture (diffusers' configs) with random weights, as a diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source

    torch.manual_seed(0)
    tiny = get_family("sd1").load(resolve_source("charfw:tiny-sd15", cache_dir=folder / "cache"), None,
                                  cache_dir=folder / "cache")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77,
                                      vocab_size=len(tiny.tokenizers[0]), hidden_act="quick_gelu"))
    scheduler = PNDMScheduler.from_config(tiny.scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tiny.tokenizers[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd15-random")
    return folder / "sd15-random"


def plain_loop(base: str, lora: Path, *, size: int, steps: int, device: str, dtype, cache: Path):
    """Build the pipeline once, then one call per prompt (4 images each)."""
    import torch

    from charfw.generation.lora_patch import bake_lora
    from charfw.generation.samplers import make_scheduler
    from charfw.training.families import get_family
    from charfw.training.model_sources import resolve_source

    model = get_family("sd1").load(resolve_source(base, cache_dir=cache), None, cache_dir=cache)
    bake_lora(model.unet, model.text_encoders, lora)
    pipe = model.family.pipeline(model, make_scheduler("Euler a", model.scheduler_config))
    pipe.to(device, dtype)

    def run() -> None:
        for i, prompt in enumerate(PROMPTS):
            gens = [torch.Generator("cpu").manual_seed(1000 + i * PER_PROMPT + k) for k in range(PER_PROMPT)]
            pipe(prompt, negative_prompt="lowres", num_images_per_prompt=PER_PROMPT, width=size, height=size,
                 num_inference_steps=steps, guidance_scale=7.0, generator=gens)
    return run


def charfw_run(base: str, lora: Path, *, size: int, steps: int, device: str, dtype: str, batch: int, cache: Path):
    from charfw.generation.pipeline import Generator, ImageRequest

    gen = Generator(base, cache_dir=cache, lora_dirs=[lora.parent], device=device, dtype=dtype)
    requests = [ImageRequest(f"{p} <lora:{lora.stem}:1>", "lowres", seed=1000 + i * PER_PROMPT + k, width=size,
                             height=size, steps=steps) for i, p in enumerate(PROMPTS) for k in range(PER_PROMPT)]

    def run() -> None:
        for _ in gen.generate(requests, batch_size=batch):
            pass
    return run


def timed(run, repeats: int, sync) -> tuple[float, float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-sd15", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="override the mode's device (e.g. cpu: a smoke run of --real-sd15)")
    parser.add_argument("--size", type=int, help="override the image size")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    args = parser.parse_args()
    import torch

    n = len(PROMPTS) * PER_PROMPT
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        if args.real_sd15:
            base, size, steps, device, dtype_name, batches = str(real_sd15(root)), 512, 20, "cuda", "fp16", (1, 4, 8)
        else:
            torch.set_num_threads(max(1, torch.get_num_threads()))
            base, size, steps, device, dtype_name, batches = "charfw:tiny-sd15", 64, 8, "cpu", "fp32", (1, 4, 8)
        if args.device and args.device != device:
            device, dtype_name = args.device, "fp16" if args.device.startswith("cuda") else "fp32"
        size, steps = args.size or size, args.steps or steps
        dtype = torch.float16 if dtype_name == "fp16" else torch.float32
        from charfw.training.families import get_family
        from charfw.training.model_sources import resolve_source

        m = get_family("sd1").load(resolve_source(base, cache_dir=cache), None, cache_dir=cache)
        lora = make_lora(m.unet, m.text_encoders[0], root / "bench.safetensors")
        del m
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        print(f"{n} images ({len(PROMPTS)} prompts x {PER_PROMPT}, one LoRA), {size} px, {steps} steps, "
              f"Euler a, {device} {dtype_name}, best/median of {args.repeats}")
        rows = [("plain diffusers loop (per prompt, 4 images/call)",
                 timed(plain_loop(base, lora, size=size, steps=steps, device=device, dtype=dtype, cache=cache),
                       args.repeats, sync))]
        for b in batches:
            rows.append((f"charfw Generator, batch {b}",
                         timed(charfw_run(base, lora, size=size, steps=steps, device=device, dtype=dtype_name,
                                          batch=b, cache=cache), args.repeats, sync)))
        print(f"{'':52} {'best s':>8} {'median s':>9} {'img/s':>7}")
        for name, (best, median) in rows:
            print(f"{name:52} {best:8.3f} {median:9.3f} {n / best:7.2f}")


if __name__ == "__main__":
    main()
