"""``charfw generate`` under a multi-process launch: each process makes a contiguous share,
file names come from the global index, and the folder equals a one-process run's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def test_two_processes_make_the_same_folder_as_one(tiny_sd15: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a girl|||lowres\na boy --d 77\na cat\n")
    args = ["generate", str(prompts), "--base-model", str(tiny_sd15), "-n", "2", "--seed", "5", "-W", "32",
            "-H", "32", "--steps", "2", "--grid", "--cache-dir", str(tmp_path / "cache")]
    # both runs in processes with one torch thread each: the CPU kernels then sum in the
    # same order, so the comparison is about the split, not about thread counts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CHARFW_PLUGINS": "",
           "HF_HUB_OFFLINE": "1", "CHARFW_QUIET": "1"}
    single = subprocess.run([sys.executable, "-m", "charfw", *args, "-o", str(tmp_path / "one"), "--device", "cpu"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "charfw", *args,
                           "-o", str(tmp_path / "two"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two").iterdir())  # no per-process leftovers
    assert len([n for n in one if n.endswith(".png") and n != "grid.png"]) == 6
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
