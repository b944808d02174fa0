"""Two processes, as ``accelerate launch`` / ``torchrun`` start them (gloo on the CPU).

Each process trains on its share of every epoch; DistributedDataParallel averages the
gradients of the adapters (registered inside the UNet and the text encoder), so both end
with the same weights; only the main process writes files and each resumable state holds
every process's random generators. Two processes with a batch of one each give the weights
one process gets with the same two images in one batch: the gradients are averaged, not
summed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import comparable_steps, make_job, write_dataset

SCRIPT = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from train_support import comparable_steps, make_job
from charfw.training import train

rank = int(os.environ["RANK"])

def keep(model, network):
    torch.save(network.kohya_state_dict(), Path({out!r}) / f"rank{{rank}}.pt")

result = train(make_job({tiny!r}, Path({dataset!r}), Path({out!r}) / "run", Path({out!r}) / "cache",
                        network="lora3x3", max_train_steps=3, save_every_n_steps=2, save_state=True,
                        after_training=keep))
sys.stdout.write(f"steps-per-epoch {{result.epochs}} {{result.main_process}}\\n")  # one write: the processes share the pipe

# the same two images, one per process (batch size 1), every sample the same noise; in
# the same two processes (the first run ended their process group: accelerate starts anew)
from accelerate.state import AcceleratorState
AcceleratorState._reset_state(reset_partial_state=True)
os.environ.update(MASTER_PORT={port2!r}, TORCHELASTIC_USE_AGENT_STORE="False")  # a new rendezvous
first = comparable_steps(setattr)

def keep_same(model, network):
    torch.save({{"weights": network.kohya_state_dict(), "grads": first[0]}}, Path({out!r}) / f"same-rank{{rank}}.pt")

train(make_job({tiny!r}, Path({same!r}), Path({out!r}) / "same", Path({out!r}) / "cache-same", max_train_steps=2,
               after_training=keep_same))
"""


def free_port() -> int:
    """A free port for the processes' rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One ``torchrun`` of two processes for this module's tests: (its folder, its stdout)."""
    tmp_path = tmp_path_factory.mktemp("two-processes")
    dataset = write_dataset(tmp_path / "data", count=4, repeats=2)
    same = write_dataset(tmp_path / "same-data", count=2, repeats=1, batch_size=1, flip=False)
    script = tmp_path / "run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CHARFW_PLUGINS": "",
           "HF_HUB_OFFLINE": "1", "CHARFW_QUIET": "1"}
    port, port2 = free_port(), free_port()
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), out=str(tmp_path), tiny=str(tiny_sd15),
                                    dataset=str(dataset), same=str(same), port2=str(port2)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(script)], env=env, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path, done.stdout


def test_two_processes_train_one_network(two_processes: tuple[Path, str]) -> None:
    tmp_path, stdout = two_processes
    # 8 samples in batches of 2: 4 batches, 2 per process per epoch, so 3 steps take 2 epochs
    assert stdout.count("steps-per-epoch 2") == 2
    first, second = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert max(v.abs().max() for k, v in first.items() if "lora_up" in k) > 0  # it did train
    runs = tmp_path / "run"
    assert sorted(p.name for p in runs.glob("*.safetensors")) == [
        "krnk-Lora3x3A50p-AdamW-4-10000-3-step00000002.safetensors", "krnk-Lora3x3A50p-AdamW-4-10000-3.safetensors"]
    (state,) = runs.glob("*-state/step-00000003")
    rng = torch.load(state / "rng.pt", weights_only=True)
    assert len(rng) == 2 and not torch.equal(rng[0]["generator"], rng[1]["generator"])


def test_two_processes_average_their_gradients_as_one_process_with_both_batches(
        two_processes: tuple[Path, str], tiny_sd15: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same two images: one per process, or both in one process's batch of two (every
    sample gets the same noise, so only the grouping differs). The first step's gradients
    and the weights after two steps agree: the processes average their gradients (a sum
    would double them). Agree to about 1 %, as one process's batch of two and two
    accumulated batches of one do (float32 sums in another order and size)."""
    out, _ = two_processes
    ranks = [torch.load(out / f"same-rank{r}.pt") for r in (0, 1)]
    first = comparable_steps(monkeypatch.setattr)
    kept: dict[str, torch.Tensor] = {}
    one = write_dataset(tmp_path / "data", count=2, repeats=1, batch_size=2, flip=False)
    job = make_job(tiny_sd15, one, tmp_path / "out", tmp_path / "cache", max_train_steps=2,
                   after_training=lambda model, network: kept.update(network.kohya_state_dict()))
    from charfw.training import train

    train(job)
    grads, weights = first[0], kept
    got = ranks[0]
    assert len(got["grads"]) == len(grads) and got["weights"].keys() == weights.keys()
    total = torch.cat([g.flatten() for g in grads])
    both = torch.cat([g.flatten() for g in got["grads"]])
    assert float(total.norm()) > 0
    assert float((both - total).norm() / total.norm()) < 0.05  # summed: 1.0
    assert float((both.norm() / total.norm() - 1).abs()) < 0.02  # summed: 2x
    one = torch.cat([w.float().flatten() for w in weights.values()])
    two = torch.cat([got["weights"][k].float().flatten() for k in weights])
    assert float((two - one).norm() / one.norm()) < 0.05
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in weights)
