"""``charfw generate PROMPTS.txt --base-model M -n N --seed S -o OUT``.

Each line of the prompt file (``positive|||negative`` and/or kohya's ``--n --w --h --d --s
--l --ss`` options; ``#`` comments) gives ``-n`` images. Image ``k`` of the run (counted
over all lines) gets the seed ``--seed + k``; a line with ``--d D`` gives its own images
``D, D+1, …``. Files: ``OUT/<index:05d>-<seed>.png`` with A1111's infotext,
``OUT/index.jsonl`` (one object per image), and with ``--grid`` ``OUT/grid.png`` (one row
per prompt line). torch and diffusers load inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

import charfw
from charfw import CharfwError, console
from charfw.errors import display_path


def parse_lora_option(text: str) -> Any:
    """``FILE[:WEIGHT[:BLOCKS]]`` → a :class:`~charfw.generation.lora_patch.LoraSpec`."""
    from charfw.default_plugins.lora.commands import parse_source
    from charfw.generation.lora_patch import LoraSpec

    path, weight, blocks = parse_source(text)
    return LoraSpec(path, weight, blocks)


def parse_controlnet_option(text: str) -> tuple[str, float, float, float]:
    """``MODEL[:WEIGHT[:START:END]]`` → (model, weight, start, end); the model may itself
    hold colons (numbers are only taken from the end)."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(numbers) == 2:
        raise CharfwError(f"--controlnet {text}: give MODEL, MODEL:WEIGHT or MODEL:WEIGHT:START:END")
    weight = numbers[0] if numbers else 1.0
    start, end = (numbers[1], numbers[2]) if len(numbers) == 3 else (0.0, 1.0)
    return ":".join(parts), weight, start, end


def load_controls(images: tuple[Path, ...], models: tuple[str, ...]) -> list[tuple[Any, str, float, float, float]]:
    """The ``--control`` images paired in order with the ``--controlnet`` models."""
    from PIL import Image

    if len(images) != len(models):
        raise CharfwError(f"{len(images)} --control image(s) for {len(models)} --controlnet model(s)",
                          hint="give one --control IMAGE for each --controlnet MODEL, in the same order")
    out = []
    for path, spec in zip(images, models, strict=True):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as exc:
            raise CharfwError(f"cannot read the control image ({exc})", path=path) from None
        out.append((image, *parse_controlnet_option(spec)))
    return out


def build_requests(lines: list[Any], *, count: int, seed: int, defaults: dict[str, Any],
                   loras: tuple[Any, ...], controls: list[tuple[Any, str, float, float, float]] = ()
                   ) -> list[tuple[int, Any]]:
    """(line position, request) for every image of the run, in global-index order. Control
    images are resized (Lanczos) to each request's size, once per size."""
    from PIL import Image

    from charfw.generation.pipeline import ControlRequest, ImageRequest

    sized: dict[tuple[int, int], tuple[Any, ...]] = {}

    def controls_at(width: int, height: int) -> tuple[Any, ...]:
        if (width, height) not in sized:
            sized[(width, height)] = tuple(
                ControlRequest(image.resize((width, height), Image.Resampling.LANCZOS), model, weight, start, end)
                for image, model, weight, start, end in controls)
        return sized[(width, height)]

    out = []
    for position, line in enumerate(lines):
        for k in range(count):
            index = len(out)
            out.append((position, ImageRequest(
                prompt=line.prompt, negative=line.negative,
                seed=(line.seed + k) if line.seed is not None else seed + index,
                width=line.width or defaults["width"], height=line.height or defaults["height"],
                steps=line.steps or defaults["steps"],
                cfg_scale=line.scale if line.scale is not None else defaults["cfg"],
                sampler=line.sampler or defaults["sampler"], clip_skip=defaults["clip_skip"], loras=loras,
                grayscale=defaults["grayscale"],
                controls=controls_at(line.width or defaults["width"], line.height or defaults["height"]))))
    return out


def index_record(file: str, made: Any) -> dict[str, Any]:
    r, p = made.request, made.params
    return {"file": file, "index": made.index, "prompt": r.prompt, "negative": r.negative, "seed": r.seed,
            "size": [r.width, r.height], "steps": r.steps, "cfg": r.cfg_scale, "sampler": p.sampler,
            "clip_skip": r.clip_skip,
            "loras": [{"name": s.path.stem, "weight": s.weight, "te_weight": s.text_encoder_weight,
                       "blocks": s.blocks if s.blocks is None or isinstance(s.blocks, str) else list(s.blocks),
                       "hash": h} for s, h in made.loras],
            "model": p.model_name, "model_hash": p.model_hash, "grayscale": r.grayscale,
            "controls": [{"model": c.model, "weight": c.weight, "start": c.start, "end": c.end} for c in r.controls]}


def write_grid(images: list[list[Any]], dest: Path) -> Path:
    """One row per prompt line; cells as large as the largest image, top-left aligned."""
    from PIL import Image

    from charfw.build.images import save_png as write_png

    cells = [im for row in images for im in row]
    w = max(im.width for im in cells)
    h = max(im.height for im in cells)
    mode = "L" if all(im.mode == "L" for im in cells) else "RGB"
    grid = Image.new(mode, (w * max(len(r) for r in images), h * len(images)), 0)
    for y, row in enumerate(images):
        for x, im in enumerate(row):
            grid.paste(im.convert(mode), (x * w, y * h))
    write_png(grid, dest)
    return dest


@charfw.hookimpl
def register_commands(cli):
    @cli.command("generate")
    @click.argument("prompts", type=click.Path(path_type=Path))
    @click.option("--base-model", required=True,
                  help="A .safetensors checkpoint, a diffusers folder, a Hugging Face id or charfw:tiny-sd15.")
    @click.option("--vae", help="A VAE file, folder or id instead of the model's own.")
    @click.option("-n", "--count", type=click.IntRange(1), default=1, show_default=True,
                  help="Images per prompt line.")
    @click.option("--seed", type=int, default=0, show_default=True,
                  help="Seed of the run's first image; image k gets seed + k (a line's --d wins).")
    @click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="Folder for the images, index.jsonl and grid.png.")
    @click.option("--lora", "loras", multiple=True, metavar="FILE[:WEIGHT[:BLOCKS]]",
                  help="A LoRA for every image (repeatable); BLOCKS: a preset (FACE) or ratios.")
    @click.option("--lora-dir", "lora_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
                  help="Where <lora:name:w> tags are looked up as name.safetensors (repeatable).")
    @click.option("--control", "control_images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="A control image (repeatable; paired in order with --controlnet).")
    @click.option("--controlnet", "controlnets", multiple=True, metavar="MODEL[:WEIGHT[:START:END]]",
                  help="A ControlNet (folder, .safetensors or id) for the --control image of the same "
                       "position, with its weight and guidance range (e.g. hed:0.5:0:0.3).")
    @click.option("--sampler", default="Euler a", show_default=True, help="A1111 or kohya sampler name.")
    @click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
    @click.option("--cfg", type=float, default=7.0, show_default=True, help="CFG scale.")
    @click.option("-W", "--width", type=int, default=512, show_default=True)
    @click.option("-H", "--height", type=int, default=512, show_default=True)
    @click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True,
                  help="Images per pipeline call (same size, steps, CFG, sampler and LoRAs).")
    @click.option("--clip-skip", type=click.IntRange(1, 12), default=1, show_default=True,
                  help="A1111 numbering: 1 = last layer, 2 = penultimate.")
    @click.option("--t5", "t5_max_length", type=click.IntRange(1, 512), is_flag=False, flag_value=256,
                  default=None, metavar="[TOKENS]",
                  help="SD 3.5: load T5-XXL and encode the prompt with it too (256 tokens unless given; "
                       "off: zeros, as diffusers without T5).")
    @click.option("--grayscale", is_flag=True, help="Save single-channel (mode L) images.")
    @click.option("--grid", is_flag=True, help="Also write grid.png, one row per prompt line.")
    @click.option("--device", help="cuda, cuda:1, cpu (default: cuda when there is one).")
    @click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]),
                  help="Default: fp16 on a GPU, fp32 on the CPU.")
    @click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Built-in models (default: $CHARFW_CACHE or ~/.cache/charfw).")
    @click.pass_context
    def generate_command(ctx: click.Context, prompts: Path, base_model: str, vae: str | None, count: int, seed: int, output: Path,
                         loras: tuple[str, ...], lora_dirs: tuple[Path, ...], control_images: tuple[Path, ...],
                         controlnets: tuple[str, ...], sampler: str, steps: int, cfg: float,
                         width: int, height: int, batch_size: int, clip_skip: int, t5_max_length: int | None,
                         grayscale: bool, grid: bool, device: str | None, dtype: str | None,
                         cache_dir: Path | None) -> None:
        """Generate COUNT images per line of a prompt file, with A1111 infotext in each PNG.

        A line is `positive|||negative`, optionally followed by kohya's options
        (--n NEG --w W --h H --d SEED --s STEPS --l CFG --ss SAMPLER); `#` starts a comment.
        Prompts use A1111's syntax: (word:1.2), [word], BREAK, <lora:name:0.8>,
        <lora:name:1:lbw=FACE>.

        \b
        Examples:
          charfw generate prompts.txt --base-model model.safetensors -n 4 --seed 1000 -o out/
          charfw generate prompts.txt --base-model model.safetensors --lora-dir loras/ --grid -o out/
          charfw generate xray.txt --base-model model.safetensors --grayscale --sampler "DPM++ 2M Karras" -o out/
        """
        from charfw.default_plugins.train.cli import default_cache_dir
        from charfw.generation.infotext import save_png
        from charfw.generation.pipeline import Generator
        from charfw.generation.prompt_files import read_prompt_file
        from charfw.generation.samplers import resolve_sampler

        if not prompts.is_file():
            raise CharfwError("prompt file not found", path=prompts)
        lines = read_prompt_file(prompts)
        if not lines:
            raise CharfwError("the prompt file has no prompts", path=prompts)
        resolve_sampler(sampler)
        if width % 8 or height % 8 or min(width, height) < 8:
            raise CharfwError(f"size {width}x{height}: sides must be multiples of 8")
        specs = tuple(parse_lora_option(text) for text in loras)
        defaults = {"width": width, "height": height, "steps": steps, "cfg": cfg, "sampler": sampler,
                    "clip_skip": clip_skip, "grayscale": grayscale}
        planned = build_requests(lines, count=count, seed=seed, defaults=defaults, loras=specs,
                                 controls=load_controls(control_images, controlnets))
        # under `accelerate launch` / torchrun every process makes one contiguous share; file
        # names come from the global index, so the folder is the same as one process makes
        world = Processes.detect()
        start, stop = world.share(len(planned))
        generator = Generator(base_model, vae=vae, cache_dir=cache_dir or default_cache_dir(),
                              lora_dirs=list(lora_dirs), device=device or world.device, dtype=dtype,
                              named_loras=_build_loras(ctx), t5_max_length=t5_max_length)
        output.mkdir(parents=True, exist_ok=True)
        records: dict[int, dict[str, Any]] = {}
        try:
            with console.progress(stop - start, "generating") as bar:
                for made in generator.generate([r for _, r in planned[start:stop]], batch_size=batch_size,
                                               progress=bar.advance, first_index=start):
                    name = f"{made.index:05d}-{made.request.seed}.png"
                    save_png(made.image, output / name, made.params)
                    records[made.index] = index_record(name, made)
        finally:
            generator.close()
        from charfw.build import atomic

        if world.size > 1:
            atomic.write_text(output / f".index-{world.rank}.jsonl",
                              "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in sorted(records)))
            world.wait()
            if not world.main:
                world.close()
                return
            records = {}
            for rank in range(world.size):
                part = output / f".index-{rank}.jsonl"
                for line in part.read_text("utf-8").splitlines():
                    record = json.loads(line)
                    records[record["index"]] = record
                part.unlink()
        atomic.write_text(output / "index.jsonl",
                          "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in sorted(records)))
        if grid:
            from PIL import Image

            rows: list[list[Any]] = [[None] * count for _ in lines]
            for i, record in records.items():
                with Image.open(output / record["file"]) as im:
                    rows[planned[i][0]][i % count] = im.copy()
            write_grid(rows, output / "grid.png")
        world.close()
        console.out.print(f"wrote {len(records)} images to {display_path(output)}", markup=False)


def _build_loras(ctx: click.Context) -> dict[str, Path]:
    """The workspace's finished LoRAs by name (``<lora:krnk:0.8>`` is krnk's face LoRA,
    ``<lora:krnksf:1>`` its body's), when the command runs in a built workspace."""
    from charfw.build.records import finished_loras
    from charfw.cli import workspace_from

    try:
        ws = workspace_from(ctx)
    except CharfwError:
        return {}
    return finished_loras(ws.build_dir, ws.root) if ws.build_dir.is_dir() else {}


class Processes:
    """This process's place among the processes of a multi-process launch (accelerate
    launch, torchrun: ``WORLD_SIZE`` > 1); one process otherwise."""

    def __init__(self, size: int = 1, rank: int = 0, device: str | None = None) -> None:
        self.size, self.rank, self.device = size, rank, device
        self._state: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls) -> Processes:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState()
        world = cls(state.num_processes, state.process_index, str(state.device))
        world._state = state
        return world

    def share(self, total: int) -> tuple[int, int]:
        """The contiguous range of the run's images this process makes."""
        per = -(-total // self.size)
        return min(total, self.rank * per), min(total, (self.rank + 1) * per)

    def wait(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def close(self) -> None:
        if self._state is not None:
            import torch.distributed as dist

            self._state.wait_for_everyone()
            if dist.is_initialized():
                dist.destroy_process_group()
            self._state = None
