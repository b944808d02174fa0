"""Training throughput of charfw's trainer, and the same work as a plain diffusers + peft loop.

    python benchmarks/train_throughput.py                      # GPU: SD 1.5 at 512 px; CPU: the tiny model
    python benchmarks/train_throughput.py --family sdxl        # GPU: SDXL at 1024 px, batch 1, 2, 4
    python benchmarks/train_throughput.py --family sd35 --variant large
    python benchmarks/train_throughput.py --model sd15 --batch-sizes 1,4,8 --steps 40
    python benchmarks/train_throughput.py --family sdxl --model tiny --device cpu --resolution 128 --threads 1

What is trained: a LoRA on the denoiser (UNet or MMDiT), text encoders frozen, AdamW, flip
augmentation, no gradient checkpointing. SD 1.x and SDXL: charfw's ``lora3x3`` (attention,
projections and the resnet/sampler convolutions, dim = conv_dim 32, 8 for the tiny models);
SD 3.5: ``lora`` on the joint blocks' attention and feed-forward layers (what diffusers'
SD3 trainer targets), dim 32. ``--family`` picks the model family (sd1, sdxl, sd35;
``--variant large`` for SD 3.5 Large), ``--model real`` its real architecture with random
weights at its native size (built from the configs charfw ships: nothing is downloaded; SD
3.5 without T5, charfw's default, whose place in the prompt is 77 zero tokens), ``--model
tiny`` charfw's tiny model of the family (``charfw:tiny-sd15``, ``charfw:tiny-sdxl``,
``charfw:tiny-sd35``) for CPUs.

Rows, per batch size, all in the same run:

* ``diffusers+peft``: the loop of diffusers' ``train_text_to_image_lora.py`` (SDXL:
  ``train_text_to_image_lora_sdxl.py``, SD 3.5: ``train_dreambooth_lora_sd3.py``), reduced
  to its work: peft's LoRA on the same layers, images decoded and encoded by the VAE every
  step, captions through the text encoder(s) every step, the loss read every step;
* ``charfw``: :func:`charfw.training.train` with caches off: the same work per step;
* ``charfw cached``: the same with latents and text-encoder outputs cached (the normal case:
  the caching is done before the first step, once, and then shared between runs).

Columns: seconds per step (median and best of ``--repeat`` runs, after ``--warmup``
steps), images per second (from the median), peak accelerator memory, and on a GPU the
model FLOP utilisation: images/s × the FLOPs of one image-step ÷ the GPU's dense bf16 peak
(H100 SXM and H200: 989 TFLOP/s; ``--peak-tflops`` for others). The FLOPs of an image-step
are counted by :func:`flops_per_image_step` as the SD 1.5 figure (1.73 TFLOP at 512 px,
``../shared/reference/landscape.md`` §3b) was: the denoiser built on the meta device, batch
1, 77 text tokens (SD 3.5: 77 CLIP + 77 T5 positions), one forward and one backward with
every base weight frozen (activation gradients only), under
``torch.utils.flop_counter.FlopCounterMode``. At the native sizes: SD 1.5 1.73 TFLOP, SDXL
14.2, SD 3.5 Medium 25.6, SD 3.5 Large 65.9 (``--flops-only`` prints them; the LoRA's own
matmuls, the text encoders and the VAE are not counted).

The machine may be shared: runs take turns so that all configurations see the same load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}



@dataclass(frozen=True)
class FamilySpec:
    label: str
    #: the config folder charfw ships (``charfw/training/model_configs/<configs>``)
    configs: str
    #: native training size
    size: int
    tiny: str
    network: str
    gpu_batches: str


FAMILIES: dict[str, FamilySpec] = {
    "sd1": FamilySpec("SD 1.5", "sd15", 512, "charfw:tiny-sd15", "lora3x3", "1,4,8"),
    "sdxl": FamilySpec("SDXL", "sdxl", 1024, "charfw:tiny-sdxl", "lora3x3", "1,2,4"),
    "sd35": FamilySpec("SD 3.5 Medium", "sd35-medium", 1024, "charfw:tiny-sd35", "lora", "1,2,4"),
}
#: the T5 positions of an SD 3.5 prompt without T5 (charfw's default t5_max_length)
SD35_T5_TOKENS = 77


def family_spec(family: str, variant: str | None) -> FamilySpec:
    spec = FAMILIES[family]
    if family == "sd35" and variant == "large":
        return dataclasses.replace(spec, label="SD 3.5 Large", configs="sd35-large")
    return spec


def config_dir(spec: FamilySpec) -> Path:
    from charfw.training import model_sources

    return Path(model_sources.__file__).parent / "model_configs" / spec.configs


# --- models and data -------------------------------------------------------------------------


def build_random(spec: FamilySpec, dest: Path, dtype: Any, device: Any) -> Path:
    """A family's real architecture with random weights as a diffusers folder (no download),
    from the configs charfw ships; SD 3.5's T5 is left out (charfw trains without it by
    default). Weights are drawn on ``device`` (fast on a GPU), saved in ``dtype``."""
    import shutil

    import diffusers
    import torch
    import transformers

    from charfw.training.clip_tokenizer import clip_tokenizer_files

    if (dest / "model_index.json").is_file():
        return dest
    configs = config_dir(spec)
    index = json.loads((configs / "model_index.json").read_text())
    files = clip_tokenizer_files(dest.parent)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(0)
    for sub, entry in list(index.items()):
        if sub.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if sub in ("text_encoder_3", "tokenizer_3"):  # T5: off by default in charfw
            index[sub] = [None, None]
            continue
        library, cls = entry
        if sub.startswith("tokenizer"):
            extra = {"pad_token": "!"} if sub == "tokenizer_2" else {}
            tokenizer = transformers.CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"),
                                                   model_max_length=77, **extra)
            tokenizer.save_pretrained(tmp / sub)
        elif sub == "scheduler":
            shutil.copytree(configs / sub, tmp / sub)
        elif library == "diffusers":
            config = json.loads((configs / sub / "config.json").read_text())
            with torch.device(device):
                model = getattr(diffusers, cls).from_config(config)
            model.to(dtype=dtype).save_pretrained(tmp / sub, safe_serialization=True)
        else:
            model_cls = getattr(transformers, cls)
            with torch.device(device):
                model = model_cls(model_cls.config_class.from_pretrained(str(configs / sub)))
            model.to(dtype=dtype).save_pretrained(tmp / sub, safe_serialization=True)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    tmp.rename(dest)
    return dest


def flops_per_image_step(spec: FamilySpec, size: int) -> float:
    """FLOPs of one LoRA training step of one image at ``size`` px: the denoiser's forward
    and backward with every base weight frozen, counted on the meta device (no memory, no
    time) with ``torch.utils.flop_counter``; 77 text tokens (SD 3.5: 77 CLIP + 77 T5)."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    configs = config_dir(spec)
    sub = "transformer" if (configs / "transformer").is_dir() else "unet"
    config = json.loads((configs / sub / "config.json").read_text())
    latent = size // 8
    with torch.device("meta"):
        if sub == "unet":
            model = diffusers.UNet2DConditionModel.from_config(config)
            x = torch.randn(1, config["in_channels"], latent, latent)
            kwargs: dict[str, Any] = {"timestep": torch.tensor([500]),
                                      "encoder_hidden_states": torch.randn(1, 77, config["cross_attention_dim"])}
            if config.get("addition_embed_type") == "text_time":
                pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}
        else:
            model = diffusers.SD3Transformer2DModel.from_config(config)
            x = torch.randn(1, config["in_channels"], latent, latent)
            kwargs = {"timestep": torch.tensor([500.0]), "pooled_projections": torch.randn(1, config["pooled_projection_dim"]),
                      "encoder_hidden_states": torch.randn(1, 77 + SD35_T5_TOKENS, config["joint_attention_dim"])}
        model.requires_grad_(False)
        x.requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            out = model(x, **kwargs, return_dict=False)[0]
            out.sum().backward()
    return float(counter.get_total_flops())


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


def target_paths(family: str, denoiser: Any, text_encoders: list[Any], *, conv3x3: bool) -> list[str]:
    """The denoiser layers charfw's network wraps for this family, as module paths (for peft)."""
    from charfw.training.families import get_family
    from charfw.training.networks.targets import enumerate_targets

    fam = get_family(family)
    model = SimpleNamespace(family=fam, unet=denoiser, text_encoders=text_encoders)
    roots = [r for r in fam.network_roots(model) if r.root == "unet"]  # type: ignore[arg-type]
    ids = {id(m): name for name, m in denoiser.named_modules()}
    return [ids[id(t.layer)] for t in enumerate_targets(roots, conv3x3=conv3x3)]


# --- the two trainers --------------------------------------------------------------------------


def run_charfw(model: Path, toml: Path, work: Path, *, family: str, network: str, steps: int, warmup: int, dim: int,
               cached: bool, mixed: str, device: Any, compile_unet: bool = False,
               channels_last: bool = False) -> dict[str, Any]:
    import torch

    from charfw.training import TrainJob, TrainSettings, train

    settings = TrainSettings(
        network=network, dim=dim, alpha=dim / 2, optimizer="AdamW", learning_rate=1e-4, train_unet_only=True,
        max_train_steps=warmup + steps, mixed_precision=mixed, gradient_checkpointing=False,
        cache_latents="memory" if cached else "off", cache_text_encoder_outputs=cached, log_with="none",
        lr_scheduler="constant", torch_compile=compile_unet, channels_last=channels_last,
    )
    job = TrainJob(settings=settings, dataset_config=toml, base_model=str(model), output_dir=work / "out",
                   cache_dir=work / "cache", keyword="bench", log=lambda m: None, family=family)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(job)
    times = result.step_times
    seconds = (times[-1] - times[warmup - 1]) / (len(times) - warmup)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"seconds_per_step": seconds, "peak_bytes": peak}


class _PlainModel:
    """A family's parts loaded with diffusers and transformers alone, and its per-step maths
    as diffusers' training examples write it."""

    def __init__(self, family: str, model: Path, device: Any, weight_dtype: Any) -> None:
        import diffusers
        import torch
        import transformers

        self.family = family
        denoiser_cls = diffusers.SD3Transformer2DModel if family == "sd35" else diffusers.UNet2DConditionModel
        self.denoiser = denoiser_cls.from_pretrained(model, subfolder="transformer" if family == "sd35" else "unet")
        self.vae = diffusers.AutoencoderKL.from_pretrained(model, subfolder="vae")
        encoders = {"sd1": ["CLIPTextModel"], "sdxl": ["CLIPTextModel", "CLIPTextModelWithProjection"],
                    "sd35": ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection"]}[family]
        subs = ["text_encoder", "text_encoder_2"][: len(encoders)]
        self.text_encoders = [getattr(transformers, cls).from_pretrained(model, subfolder=sub)
                              for cls, sub in zip(encoders, subs, strict=True)]
        self.tokenizers = [transformers.CLIPTokenizer.from_pretrained(model, subfolder=sub.replace("text_encoder", "tokenizer"))
                           for sub in subs]
        scheduler_cls = diffusers.FlowMatchEulerDiscreteScheduler if family == "sd35" else diffusers.DDPMScheduler
        self.scheduler = scheduler_cls.from_pretrained(model, subfolder="scheduler")
        for part in (self.denoiser, self.vae, *self.text_encoders):
            part.requires_grad_(False)
        self.denoiser.to(device, weight_dtype)
        self.vae.to(device, torch.float32)
        for encoder in self.text_encoders:
            encoder.to(device, weight_dtype)
        self.device = device

    def latents(self, pixels: Any) -> Any:
        config = self.vae.config
        latents = self.vae.encode(pixels).latent_dist.sample()
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def text(self, captions: list[str], size: int) -> dict[str, Any]:
        """The denoiser's text inputs (clip skip 2 for SD 1.x, as charfw's default)."""
        import torch

        outs = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            outs.append(encoder(ids, output_hidden_states=True))
        if self.family == "sd1":
            encoder = self.text_encoders[0]
            norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else encoder.final_layer_norm
            return {"encoder_hidden_states": norm(outs[0].hidden_states[-2])}
        states = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        if self.family == "sdxl":
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(captions), device=self.device,
                                    dtype=states.dtype)
            return {"encoder_hidden_states": states,
                    "added_cond_kwargs": {"text_embeds": outs[1].text_embeds, "time_ids": time_ids}}
        width = int(self.denoiser.config.joint_attention_dim)
        states = torch.nn.functional.pad(states, (0, width - states.shape[-1]))
        t5 = states.new_zeros(states.shape[0], SD35_T5_TOKENS, width)  # no T5: zeros in its place
        return {"encoder_hidden_states": torch.cat([states, t5], dim=-2),
                "pooled_projections": torch.cat([o.text_embeds for o in outs], dim=-1)}

    def noised(self, latents: Any, generator: Any) -> tuple[Any, Any, Any]:
        """(noisy input, timesteps, target): DDPM noise prediction, or SD3's flow matching
        with logit-normal timesteps on the shifted schedule (train_dreambooth_lora_sd3.py)."""
        import torch

        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if self.family != "sd35":
            timesteps = torch.randint(0, 1000, (batch,), generator=generator, device=latents.device)
            return self.scheduler.add_noise(latents, noise, timesteps), timesteps, noise
        u = torch.sigmoid(torch.randn(batch, generator=generator, device=latents.device))
        index = (u * self.scheduler.config.num_train_timesteps).long().cpu()
        timesteps = self.scheduler.timesteps[index].to(latents.device)
        sigmas = self.scheduler.sigmas[index].to(latents.device).view(-1, 1, 1, 1)
        return (1 - sigmas) * latents + sigmas * noise, timesteps, noise - latents

    def predict(self, noisy: Any, timesteps: Any, text: dict[str, Any]) -> Any:
        if self.family == "sd35":
            return self.denoiser(hidden_states=noisy, timestep=timesteps, **text, return_dict=False)[0]
        return self.denoiser(noisy, timesteps, **text, return_dict=False)[0]


def run_baseline(model: Path, images: list[tuple[Path, str]], *, family: str, network: str, batch: int, size: int,
                 steps: int, warmup: int, dim: int, mixed: str, device: Any) -> dict[str, Any]:
    """diffusers' LoRA training example for the family, reduced to the work of one step."""
    import random

    import numpy as np
    import torch
    from peft import LoraConfig
    from PIL import Image

    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    plain = _PlainModel(family, model, device, weight_dtype)
    denoiser = plain.denoiser
    denoiser.add_adapter(LoraConfig(r=dim, lora_alpha=dim / 2, init_lora_weights="gaussian",
                                    target_modules=target_paths(family, denoiser, plain.text_encoders,
                                                                conv3x3=network == "lora3x3")))
    params = [p for p in denoiser.parameters() if p.requires_grad]
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
    denoiser.train()
    for _ in range(warmup + steps):
        chosen = rng.sample(images, batch)
        pixels = torch.stack([load(p) for p, _ in chosen]).to(device)
        with torch.no_grad():
            latents = plain.latents(pixels)
            text = plain.text([c for _, c in chosen], size)
        noisy, timesteps, target = plain.noised(latents, generator)
        with autocast:
            prediction = plain.predict(noisy, timesteps, text)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the examples log the loss every step
        times.append(time.perf_counter())
    seconds = (times[-1] - times[warmup - 1]) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del plain, denoiser, optimizer
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
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd1", help="the model family (default sd1)")
    parser.add_argument("--variant", choices=["medium", "large"], default="medium", help="SD 3.5's size")
    parser.add_argument("--model", choices=["real", "sd15", "tiny"], default=None,
                        help="real: the family's architecture with random weights (sd15: the same for sd1); "
                             "tiny: charfw's tiny model of the family (default: real on a GPU, tiny on a CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the family's native size, 128 for tiny")
    parser.add_argument("--batch-sizes", default=None, help="default on a GPU: 1,4,8 (sd1) or 1,2,4; on a CPU: 4")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 40 on a GPU, 12 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 10 / 3)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per configuration (default 1 / 5)")
    parser.add_argument("--dim", type=int, default=None, help="LoRA dim (= conv_dim for lora3x3; default 32, 8 tiny)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: bf16 on a GPU, no on a CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--no-baseline", action="store_true", help="skip the diffusers + peft loop")
    parser.add_argument("--channels-last", action="store_true", help="charfw rows with channels_last")
    parser.add_argument("--compile", action="store_true",
                        help="add a 'charfw cached compiled' row (torch.compile; minutes of compiling first)")
    parser.add_argument("--flops-only", action="store_true",
                        help="print the FLOPs of one image-step of every family at its native size and stop")
    parser.add_argument("--work", type=Path, default=None, help="where models and images go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # the plain loop's .to() notices
    transformers.utils.logging.disable_progress_bar()  # and its loading bars
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flops_only:
        for family in FAMILIES:
            for variant in (["medium", "large"] if family == "sd35" else [None]):
                spec = family_spec(family, variant)
                print(f"{spec.label} at {spec.size} px: {flops_per_image_step(spec, spec.size) / 1e12:.2f} TFLOP "
                      "per image-step (forward + backward, frozen base)", flush=True)
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    spec = family_spec(args.family, args.variant)
    real = (args.model or ("real" if gpu else "tiny")) in ("real", "sd15")
    if args.model == "sd15" and args.family != "sd1":
        parser.error("--model sd15 is the sd1 family's real model; use --model real")
    size = args.resolution or (spec.size if real else 128)
    batches = [int(b) for b in (args.batch_sizes or (spec.gpu_batches if gpu else "4")).split(",")]
    steps, warmup = args.steps or (40 if gpu else 12), args.warmup or (10 if gpu else 3)
    repeat = args.repeat or (1 if gpu else 5)
    dim = args.dim or (32 if real else 8)
    mixed = args.mixed_precision or ("bf16" if gpu else "no")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    work = args.work or Path(tempfile.mkdtemp(prefix="charfw-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if real:
        model = build_random(spec, work / f"{spec.configs}-random", torch.bfloat16 if gpu else torch.float32, device)
        name_of_model = spec.label
    else:
        from charfw.training.model_sources import ensure_builtin, resolve_source

        model = ensure_builtin(resolve_source(spec.tiny, cache_dir=work))
        name_of_model = spec.tiny
    images = write_images(work / "images" / "10_bench", 32, size)
    peak = peak_tflops(device, args.peak_tflops)
    flops = flops_per_image_step(spec, size) if real and peak else None
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name_of_model} at {size} px, {spec.network} dim {dim}, {mixed}, {name}; {warmup} warm-up + {steps} "
          f"timed steps, {repeat} run(s) each" + (", channels_last" if args.channels_last else "")
          + (f"; {flops / 1e12:.2f} TFLOP per image-step" if flops else ""), flush=True)

    rows = []
    for batch in batches:
        toml = write_toml(work / f"data-b{batch}.toml", images[0][0].parent, batch, size)
        runs: dict[str, list[dict[str, Any]]] = {"diffusers+peft": [], "charfw": [], "charfw cached": [],
                                                 "charfw cached compiled": []}
        for _ in range(repeat):  # configurations take turns: all see the same machine load
            if not args.no_baseline:
                runs["diffusers+peft"].append(run_baseline(model, images, family=args.family, network=spec.network,
                                                           batch=batch, size=size, steps=steps, warmup=warmup,
                                                           dim=dim, mixed=mixed, device=device))
            variants = [("charfw", False, False), ("charfw cached", True, False)]
            if args.compile:
                variants.append(("charfw cached compiled", True, True))
            for label, cached, compiled in variants:
                runs[label].append(run_charfw(model, toml, work / f"run-b{batch}-{label.replace(' ', '-')}",
                                              family=args.family, network=spec.network, steps=steps, warmup=warmup,
                                              dim=dim, cached=cached, mixed=mixed, device=device,
                                              compile_unet=compiled, channels_last=args.channels_last))
            if gpu:
                torch.cuda.empty_cache()
        for label, results in runs.items():
            if not results:
                continue
            seconds = statistics.median(r["seconds_per_step"] for r in results)
            best = min(r["seconds_per_step"] for r in results)
            ips = batch / seconds
            peak_bytes = max((r["peak_bytes"] or 0) for r in results) or None
            mfu = ips * flops / (peak * 1e12) if flops and peak else None
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
        args.json.write_text(json.dumps({"family": args.family, "model": name_of_model, "resolution": size,
                                         "device": name, "dim": dim, "network": spec.network,
                                         "mixed_precision": mixed, "tflop_per_image_step": flops / 1e12 if flops else None,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
