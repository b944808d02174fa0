"""Sample images during training, from prompts in kohya's sample-prompt syntax.

A ``.txt`` file holds one prompt per line; options follow the prompt, each introduced by
`` --``::
    krnk, 1girl, school uniform --n lowres, bad hands --w 512 --h 768 --d 42 --s 28 --l 7 --ss euler_a

``--n`` negative prompt, ``--w`` / ``--h`` size, ``--d`` seed, ``--s`` steps, ``--l`` CFG
scale, ``--ss`` sampler (kohya's names or A1111's, :mod:`charfw.generation.samplers`);
empty lines and lines starting with ``#`` are skipped. A ``.toml``
file has a ``[prompt]`` table of defaults and ``[[prompt.subset]]`` entries; a ``.json``
file is a list of objects. Both use kohya's keys (``prompt``, ``negative_prompt``,
``width``, ``height``, ``seed``, ``sample_steps``, ``scale``, ``sample_sampler``).

Samples are rendered by :class:`charfw.generation.pipeline.Generator` (the code of
``charfw generate`` and the ``sample`` stage) on the loaded parts with the network applied,
so they show what the LoRA does at that step, and each PNG carries A1111's infotext. The
prompt is read as A1111 reads it: ``(word:1.3)``/``(word)``/``[word]`` weights, ``BREAK`` and
75-token chunks for long prompts, with the training's clip skip; the training's
``max_token_length`` does not truncate sample prompts (kohya's sample images parse the same
weights for SD). A prompt without ``--d`` uses the run's seed, so samples of successive
steps are comparable.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError
from ..generation.samplers import resolve_sampler

if TYPE_CHECKING:
    from .families import LoadedModel


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 30
    scale: float = 7.5
    sampler: str | None = None


_OPTION = re.compile(r"^(n|w|h|d|s|l|ss|cn|ctr|rcfg|fs|g|am)\s+(.*)$", re.DOTALL)


def parse_line(line: str, *, where: str = "") -> SamplePrompt:
    """One line of a ``.txt`` prompt file."""
    return SamplePrompt(**parse_options(line, where=where))


def parse_options(line: str, *, where: str = "") -> dict[str, Any]:
    """The prompt and the options one line gives, by :class:`SamplePrompt`'s field names;
    options the line does not give are absent (``charfw generate`` fills them from its own
    defaults). The values are checked as :func:`parse_line` checks them."""
    parts = line.split(" --")
    fields: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        match = _OPTION.match(part.strip())
        if not match:
            raise CharfwError(f"{where}unknown sample option '--{part.strip()[:20]}'",
                              hint="use --n --w --h --d --s --l --ss")
        key, value = match.group(1), match.group(2).strip()
        try:
            if key == "n":
                fields["negative"] = value
            elif key == "w":
                fields["width"] = int(value)
            elif key == "h":
                fields["height"] = int(value)
            elif key == "d":
                fields["seed"] = int(value)
            elif key == "s":
                fields["steps"] = max(1, min(1000, int(value)))
            elif key == "l":
                fields["scale"] = float(value)
            elif key == "ss":
                fields["sampler"] = _sampler(value, where)
            # --cn --ctr --rcfg --fs --g --am belong to other architectures: ignored, as kohya does for SD 1.x
        except ValueError:
            raise CharfwError(f"{where}--{key} expects a number, got '{value}'") from None
    _checked(SamplePrompt(**fields), where)
    return fields


def _sampler(value: str, where: str) -> str:
    """kohya's sampler names, and A1111's (one table: :mod:`charfw.generation.samplers`)."""
    name = value.strip().lower()
    try:
        resolve_sampler(name)
    except CharfwError as exc:
        raise CharfwError(f"{where}{exc.message}", hint=exc.hint) from None
    return name


def _checked(p: SamplePrompt, where: str) -> SamplePrompt:
    if p.width % 8 or p.height % 8 or p.width < 64 or p.height < 64:
        raise CharfwError(f"{where}sample size {p.width}x{p.height}: sides must be multiples of 8, at least 64")
    return p


def _from_mapping(data: dict[str, Any], where: str) -> SamplePrompt:
    keys = {"prompt": "prompt", "negative_prompt": "negative", "width": "width", "height": "height",
            "seed": "seed", "sample_steps": "steps", "scale": "scale", "sample_sampler": "sampler"}
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key not in keys:
            continue  # kohya ignores what SD 1.x does not use (controlnet images, guidance ...)
        fields[keys[key]] = _sampler(value, where) if key == "sample_sampler" else value
    if "prompt" not in fields:
        raise CharfwError(f"{where}an entry has no 'prompt'")
    return _checked(SamplePrompt(**fields), where)


def read_prompts(path: Path) -> list[SamplePrompt]:
    """The prompts of a ``.txt``, ``.toml`` or ``.json`` file."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise CharfwError(f"cannot read the sample prompts ({exc.strerror or exc})", path=path) from None
    where = f"{path.name}: "
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data = tomllib.loads(text).get("prompt", {})
        base = {k: v for k, v in data.items() if k != "subset"}
        return [_from_mapping({**base, **sub}, where) for sub in data.get("subset", [])]
    if suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise CharfwError("a JSON prompt file is a list of objects", path=path)
        return [_from_mapping(d, where) for d in data]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(parse_line(line, where=f"{path.name}:{n}: "))
    return out


def generate_samples(model: LoadedModel, prompts: list[SamplePrompt], *, out_dir: Path, name: str, step: int,
                     default_seed: int, default_sampler: str, clip_skip: int, device: Any, dtype: Any,
                     autocast: Any, model_hash: str | None = None, vae_hash: str | None = None) -> list[Path]:
    """Generate one image per prompt and write ``<name>_<step>_<index>_<seed>.png`` with its
    infotext, through :meth:`Generator.from_loaded <charfw.generation.pipeline.Generator.from_loaded>`
    (A1111 prompt weighting and 75-token chunks; no ``max_token_length`` truncation).

    ``dtype`` is the UNet's; ``autocast`` the training's autocast context (the VAE stays in
    float32 under mixed precision). The training's random generators are left untouched
    (each image has its own seeded generator) and the parts get their train/eval modes back."""
    import torch

    from ..generation.infotext import save_png
    from ..generation.pipeline import Generator, ImageRequest

    if str(model.scheduler_config.get("_class_name", "")).startswith("FlowMatch"):
        from ..generation.samplers import FLOW_SAMPLERS, resolve_sampler

        # a flow-matching model (SD 3.5) samples with Euler unless a prompt names a flow
        # sampler, as kohya's SD3 sampling (one sampler, whatever --sample_sampler says)
        if resolve_sampler(default_sampler).sampler_name not in FLOW_SAMPLERS:
            default_sampler = "Euler"
    requests = [ImageRequest(prompt=p.prompt, negative=p.negative, seed=default_seed if p.seed is None else p.seed,
                             width=p.width, height=p.height, steps=p.steps, cfg_scale=p.scale,
                             sampler=p.sampler or default_sampler, clip_skip=clip_skip) for p in prompts]
    written: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    parts = [model.unet, *model.text_encoders, model.vae]
    modes = [m.training for m in parts]
    for m in parts:
        m.eval()
    generator = Generator.from_loaded(model, device=device, dtype=dtype, model_hash=model_hash, vae_hash=vae_hash)
    try:
        with torch.no_grad(), autocast():
            images = sorted(generator.generate(requests), key=lambda g: g.index)
        for i, made in enumerate(images):
            dest = out_dir / f"{name}_{step:06d}_{i:02d}_{made.request.seed}.png"
            written.append(save_png(made.image, dest, made.params))
    finally:
        generator.close()
        for m, mode in zip(parts, modes, strict=True):
            m.train(mode)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return written
