"""Two processes, as ``accelerate launch`` / ``torchrun`` start them (gloo on the CPU).

Each process trains on its share of every epoch; DistributedDataParallel averages the
gradients of the adapters (registered inside the UNet and the text encoder), so both end
with the same weights; only the main process writes files and each resumable state holds
every process's random generators.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from train_support import write_dataset

SCRIPT = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from train_support import make_job
from charfw.training import train

rank = int(os.environ["RANK"])

def keep(model, network):
    torch.save(network.kohya_state_dict(), Path({out!r}) / f"rank{{rank}}.pt")

result = train(make_job({tiny!r}, Path({dataset!r}), Path({out!r}) / "run", Path({out!r}) / "cache",
                        network="lora3x3", max_train_steps=3, save_every_n_steps=2, save_state=True,
                        after_training=keep))
print("steps-per-epoch", result.epochs, result.main_process)
"""


def test_two_processes_train_one_network(tiny_sd15: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data", count=4, repeats=2)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), out=str(tmp_path), tiny=str(tiny_sd15),
                                    dataset=str(dataset)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CHARFW_PLUGINS": "",
           "HF_HUB_OFFLINE": "1", "CHARFW_QUIET": "1"}
    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # 8 samples in batches of 2: 4 batches, 2 per process per epoch, so 3 steps take 2 epochs
    assert done.stdout.count("steps-per-epoch 2") == 2
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
