"""charfw.generation.pipeline and ``charfw generate`` on the tiny SD 1.5 (64 px, 3 steps).

The LoRA reference is computed here: ΔW from :func:`lora_support.reference_delta` (the
factors run as layers, float64), added to the weights by the test itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kohya_names import text_encoder_targets, unet_targets
from lora_support import lora_conv, lora_linear, one_torch_thread, reference_delta, save

from charfw.errors import CharfwError
from charfw.generation.infotext import parse_infotext, read_png_infotext, save_png
from charfw.generation.lora_patch import LoraSpec
from charfw.generation.pipeline import Generator, ImageRequest

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)

SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def generator(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generator]:
    root = tmp_path_factory.mktemp("gen")
    gen = Generator(str(tiny_sd15), cache_dir=root / "cache", lora_dirs=[root / "loras"], device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def lora_file(generator: Generator) -> tuple[Path, dict[str, Any]]:
    """A LoRA on every attention layer of the UNet and text encoder, per-module alphas."""
    folder = generator.lora_dirs[0]
    folder.mkdir(parents=True, exist_ok=True)
    targets = unet_targets(generator.model.unet, conv=False) + text_encoder_targets(generator.model.text_encoders[0])
    modules = {}
    for i, t in enumerate(targets):
        alpha = float(1 + i % 3)
        parts = (lora_conv(t.shape[0], t.shape[1], 4, k=t.shape[2], alpha=alpha, seed=i) if t.is_conv
                 else lora_linear(t.shape[0], t.shape[1], 4, alpha=alpha, seed=i))
        modules[t.name] = (t, parts)
    path = save(folder / "krnk.safetensors", {name: parts for name, (_, parts) in modules.items()})
    return path, modules


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def run(gen: Generator, requests: list[ImageRequest], batch_size: int = 1) -> list[np.ndarray]:
    made = sorted(gen.generate(requests, batch_size=batch_size), key=lambda m: m.index)
    assert [m.index for m in made] == list(range(len(requests)))
    return [pixels(m.image) for m in made]


def test_same_seed_gives_the_same_pixels_batched_or_not(generator: Generator) -> None:
    requests = [ImageRequest("a girl, red hair", "lowres", seed=s, **SMALL) for s in (1, 2, 1)]
    single = run(generator, requests)
    again = run(generator, requests)
    assert all(np.array_equal(a, b) for a, b in zip(single, again, strict=True))
    assert np.array_equal(single[0], single[2]) and not np.array_equal(single[0], single[1])
    batched = run(generator, requests, batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(batched, run(generator, requests, batch_size=2), strict=True))
    # batched kernels sum in another order: equal up to one 8-bit level (see Generator.generate)
    for a, b in zip(single, batched, strict=True):
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def test_lora_weight_zero_is_no_lora(generator: Generator, lora_file: tuple[Path, Any]) -> None:
    plain = run(generator, [ImageRequest("a girl", seed=3, **SMALL)])
    zero = run(generator, [ImageRequest("a girl <lora:krnk:0>", seed=3, **SMALL)])
    assert np.array_equal(plain[0], zero[0])


def test_a_lora_at_weight_w_is_the_model_patched_with_w_delta(generator: Generator,
                                                             lora_file: tuple[Path, Any]) -> None:
    path, modules = lora_file
    w = 0.7
    request = ImageRequest("a girl", "lowres", seed=4, **SMALL)
    tagged = run(generator, [ImageRequest("a girl <lora:krnk:0.7>", "lowres", seed=4, **SMALL)])[0]
    by_option = run(generator, [ImageRequest("a girl", "lowres", seed=4, loras=(LoraSpec(path, w),), **SMALL)])[0]
    plain = run(generator, [request])[0]
    models = {"unet": generator.model.unet, "text_encoder": generator.model.text_encoders[0]}
    originals = {}
    with torch.no_grad():
        for target, parts in modules.values():
            layer = models[target.model].get_submodule(target.path)
            originals[target.path, target.model] = layer.weight.detach().clone()
            delta = w * reference_delta(parts, target.shape)
            layer.weight.copy_((layer.weight.double() + delta.reshape(layer.weight.shape)).float())
    try:
        reference = run(generator, [request])[0]
    finally:
        with torch.no_grad():
            for target, _ in modules.values():
                models[target.model].get_submodule(target.path).weight.copy_(originals[target.path, target.model])
    assert np.abs(tagged - plain).max() > 20  # the LoRA changes the image visibly
    assert np.abs(tagged - reference).max() <= 2
    assert np.array_equal(tagged, by_option)
    assert np.array_equal(run(generator, [request])[0], plain)  # restored after generate


def test_infotext_is_written_and_parsed_back(generator: Generator, lora_file: tuple[Path, Any],
                                             tmp_path: Path) -> None:
    request = ImageRequest("a girl <lora:krnk:0.5>", "lowres, bad hands", seed=42, sampler="dpm++ 2m karras",
                           clip_skip=2, grayscale=True, **SMALL)
    made = next(iter(generator.generate([request])))
    assert made.image.mode == "L"
    dest = save_png(made.image, tmp_path / "a.png", made.params)
    params = parse_infotext(read_png_infotext(dest) or "")
    assert params == made.params
    assert (params.prompt, params.negative, params.seed, params.steps, params.sampler, params.clip_skip) == (
        "a girl <lora:krnk:0.5>", "lowres, bad hands", 42, 3, "DPM++ 2M Karras", 2)
    assert params.size == (64, 64) and params.model_name == "tiny-sd15"
    assert params.lora_hashes == [("krnk", made.loras[0][1])] and len(made.loras[0][1]) == 12


@pytest.mark.parametrize(("request_", "message"), [
    (ImageRequest("a girl <lora:nobody:1>", **SMALL), "LoRA 'nobody' of the prompt 'a girl <lora:nobody:1>' not found"),
    (ImageRequest("a girl", sampler="eulr a", **SMALL), "unknown sampler 'eulr a'"),
    (ImageRequest("a girl", width=60, height=64, steps=3), "sides must be multiples of 8"),
])
def test_bad_requests_are_one_line_errors(generator: Generator, request_: ImageRequest, message: str) -> None:
    with pytest.raises(CharfwError) as err:
        list(generator.generate([ImageRequest("fine", **SMALL), request_]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_generate_command_end_to_end(run_cli, tiny_sd15: Path, lora_file: tuple[Path, Any], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two lines\na girl <lora:krnk:0.8>|||lowres\na boy --d 77 --s 2 --ss ddim\n")
    args = ["generate", prompts, "--base-model", tiny_sd15, "-n", 2, "--seed", 1000, "-W", 64, "-H", 64,
            "--steps", 3, "--lora-dir", lora_file[0].parent, "--batch-size", 2, "--grid",
            "--cache-dir", tmp_path / "cache"]
    code, _, err = run_cli(*args, "-o", tmp_path / "a")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["00000-1000.png", "00001-1001.png", "00002-77.png", "00003-78.png", "grid.png", "index.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "index.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [1000, 1001, 77, 78]
    assert rows[0]["loras"][0]["name"] == "krnk" and rows[0]["loras"][0]["weight"] == 0.8
    assert rows[2]["steps"] == 2 and rows[2]["sampler"] == "DDIM" and rows[2]["negative"] == ""
    from PIL import Image

    with Image.open(tmp_path / "a" / "grid.png") as grid:
        assert grid.size == (128, 128)
    params = parse_infotext(read_png_infotext(tmp_path / "a" / "00000-1000.png") or "")
    assert params.seed == 1000 and params.lora_hashes[0][0] == "krnk"
    assert run_cli(*args, "-o", tmp_path / "b")[0] == 0
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize(("line", "extra", "message"), [
    ("a girl --w abc", [], "prompts.txt:1 --w expects a number"),
    ("a girl", ["--sampler", "eulr"], "unknown sampler 'eulr'"),
    ("a girl <lora:nobody:1>", [], "LoRA 'nobody' of the prompt"),
    ("a girl", ["--lora", "missing.safetensors"], "missing.safetensors"),
])
def test_command_errors_are_one_line(run_cli, tiny_sd15: Path, tmp_path: Path, line: str, extra: list[str],
                                     message: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(line + "\n")
    code, _, err = run_cli("generate", prompts, "--base-model", tiny_sd15, "-o", tmp_path / "out",
                           "--cache-dir", tmp_path / "cache", *extra)
    assert code == 3 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_prompt_file_and_model_are_one_line(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("generate", tmp_path / "nope.txt", "--base-model", "charfw:tiny-sd15", "-o", tmp_path)
    assert code == 3 and "prompt file not found" in err and len(err.strip().splitlines()) == 1
    prompts = tmp_path / "p.txt"
    prompts.write_text("a girl\n")
    code, _, err = run_cli("generate", prompts, "--base-model", tmp_path / "none.safetensors", "-o", tmp_path)
    assert code == 3 and "not found" in err and len(err.strip().splitlines()) == 1
