"""Helpers for the trainer tests: a small kohya dataset on disk, and jobs on the tiny model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's operations are too small to gain from threads, and on a busy 2-core
    machine two OpenMP threads waiting for each other make steps 10x slower at random.
    Import this fixture into a test module to use it there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_images(folder: Path, count: int, size: int = 64, *, keyword: str = "krnk", start: int = 0) -> list[Path]:
    """``f00.png`` ... with captions: distinct shapes and colours, deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        image = Image.new("RGB", (size, size), (20 + 37 * i % 200, 200 - 23 * i % 180, 90 + 51 * i % 150))
        draw = ImageDraw.Draw(image)
        draw.ellipse([size // 8 + i, size // 6, size - size // 5, size - size // 8 - i], fill=(250, 230, 210))
        draw.rectangle([size // 3, size // 3 + i, size // 2 + i, size // 2], fill=(30 * i % 255, 40, 60))
        path = folder / f"f{i:02d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"{keyword}, white background, tag{i}", "utf-8")
        paths.append(path)
    return paths


def write_dataset(root: Path, *, count: int = 4, size: int = 64, color_aug: bool = False, repeats: int = 2,
                  batch_size: int = 2, reg: bool = False, general: str = "", flip: bool = True) -> Path:
    """A kohya dataset TOML in ``root`` over ``count`` images (and a regularisation folder)."""
    images = root / f"{repeats}_krnk" / "krnk girl_flip_face"
    write_images(images, count, size)
    reg_block = ""
    if reg:
        reg_dir = root / "reg" / "girl"
        write_images(reg_dir, 2, size, keyword="girl", start=10)
        reg_block = f'''
  [[datasets.subsets]]
  image_dir = "{reg_dir.as_posix()}"
  class_tokens = "girl"
  is_reg = true
'''
    toml = root / "dataset.toml"
    toml.write_text(f'''[general]
caption_extension = ".txt"
enable_bucket = true
bucket_no_upscale = true
color_aug = {str(color_aug).lower()}
{general}
[[datasets]]
resolution = {size}
batch_size = {batch_size}

  [[datasets.subsets]]
  image_dir = "{images.as_posix()}"
  class_tokens = "krnk girl"
  num_repeats = {repeats}
  flip_aug = {str(flip).lower()}
{reg_block}''', "utf-8")
    return toml


def comparable_steps(setattr: Callable[[Any, str, Any], None]) -> list[list[Any]]:
    """Make runs comparable whatever process or batch a sample is in: every sample gets
    the same noise and timestep (instead of draws from the process's generator), and the
    gradients of the first optimizer step (as the processes averaged them) are kept in the
    returned list. ``setattr``: ``monkeypatch.setattr``, or plain ``setattr`` in a child."""
    import torch

    from charfw.training import objectives

    def noise(self: Any, latents: torch.Tensor, generator: torch.Generator) -> Any:
        n = latents[0].numel()
        pattern = torch.sin(torch.arange(n, dtype=torch.float32, device=latents.device) * 0.37).reshape(latents.shape[1:])
        noise = pattern.expand_as(latents).contiguous()
        timesteps = torch.full((latents.shape[0],), 500, dtype=torch.long, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return objectives.NoisedBatch(noisy, timesteps, noise)

    first: list[list[Any]] = []
    real_step = torch.optim.AdamW.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not first:
            first.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return real_step(self, *args, **kwargs)

    setattr(objectives.DDPMObjective, "noise", noise)
    setattr(torch.optim.AdamW, "step", step)
    return first


def make_job(base: Path | str, dataset: Path, out: Path, cache: Path, **settings: Any) -> Any:
    """A quiet job on the tiny model: AdamW, no logging, few steps unless told."""
    from charfw.training import TrainJob, TrainSettings

    options: dict[str, Any] = {"network": "lora", "dim": 4, "optimizer": "AdamW", "max_train_steps": 3,
                               "learning_rate": 1e-2, "log_with": "none", "gradient_checkpointing": False}
    options.update(settings)
    job_fields = {k: options.pop(k) for k in list(options) if k in {"resume", "fingerprint", "after_training",
                                                                    "state_dir", "keyword", "report_problem", "log", "family"}}
    job_fields.setdefault("keyword", "krnk")
    job_fields.setdefault("log", lambda message: None)
    return TrainJob(settings=TrainSettings(**options), dataset_config=dataset, base_model=str(base), output_dir=out,
                    cache_dir=cache, **job_fields)


# --- Ctrl-C ------------------------------------------------------------------------------


def press_ctrl_c(times: int = 1) -> None:
    """What pressing Ctrl-C does: SIGINT, here to this (the main) thread, so that Python
    runs its handler as soon as the call returns."""
    import signal

    for _ in range(times):
        signal.raise_signal(signal.SIGINT)


def ctrl_c_on_call(at: int, times: int = 1) -> Callable[[], None]:
    """A function that presses Ctrl-C (``times`` times) on its ``at``-th call."""
    calls = 0

    def maybe_press() -> None:
        nonlocal calls
        calls += 1
        if calls == at:
            press_ctrl_c(times)

    return maybe_press


def ctrl_c_in_unet_forward(monkeypatch: pytest.MonkeyPatch, at: int, times: int = 1) -> None:
    """Ctrl-C inside the UNet's forward pass of the ``at``-th step (of one process, counted
    over every run while patched): that step's noise and timesteps are already drawn from
    the run's generator, its weights not yet updated."""
    from charfw.training.families.sd1 import SD1Family

    real, press = SD1Family.predict, ctrl_c_on_call(at, times)

    def predict(self: Any, *args: Any, **kwargs: Any) -> Any:
        press()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SD1Family, "predict", predict)


def kill_when_a_state_is_saved(proc: Any, out: Path, *, timeout: float = 120) -> None:
    """Wait until the training process ``proc`` saved its first resumable state under
    ``out``, then kill it with SIGKILL (the hard stop: no handler runs)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    states: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        states = [p for p in out.glob("*-state/step-*") if (p / "state.json").is_file()]
        if states:
            break
        time.sleep(0.05)
    assert states, proc.stderr.read().decode() if proc.poll() is not None else "no state saved in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
