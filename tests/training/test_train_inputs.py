"""When the trainer makes the next batch's latents ahead, on a worker thread."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from charfw.training.batch_inputs import BatchInputs
from charfw.training.caches import LatentCache


def _inputs(tmp_path: Path, device: str) -> BatchInputs:
    model = SimpleNamespace(family=None)
    return BatchInputs(model, latent_cache=LatentCache("off", tmp_path, "vae"), text_cache=None,  # type: ignore[arg-type]
                       device=torch.device(device), sha256=lambda p: "", clip_skip=1, max_token_length=None,
                       vae_batch_size=1)


def _batch() -> SimpleNamespace:
    entry = SimpleNamespace(subset=SimpleNamespace(cacheable_latents=True), path=Path("a.png"))
    return SimpleNamespace(samples=(SimpleNamespace(entry=entry),))


@pytest.mark.parametrize(("device", "threads", "cores", "ahead"), [
    ("cpu", 2, 2, False),  # every core runs the step: a second thread would only compete
    ("cpu", 1, 2, True),  # an idle core makes the next batch
    ("cuda", 16, 16, True),  # decoding on the CPU while the GPU steps
])
def test_next_batch_is_made_ahead_only_where_it_does_not_compete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  device: str, threads: int, cores: int,
                                                                  ahead: bool) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    made = []

    def make(self, batch, missing, encode):
        made.append((threading.current_thread() is threading.main_thread(), encode))
        return True, {0: torch.zeros(4, 8, 8)}

    monkeypatch.setattr(BatchInputs, "_make_latents", make)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no CUDA needed to stack
    inputs = _inputs(tmp_path, device)
    try:
        inputs.prefetch(_batch(), 1)  # type: ignore[arg-type]
        latents = inputs.latents(_batch(), 1)  # type: ignore[arg-type]
    finally:
        inputs.close()
    assert latents.shape == (1, 4, 8, 8)
    on_main, encoded_there = made[0]
    assert on_main is not ahead and len(made) == 1
    assert encoded_there is ((device == "cpu") or not ahead)  # a worker encodes only on an idle CPU core
