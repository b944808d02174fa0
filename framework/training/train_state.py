"""Resumable training state: everything needed to continue a run as if it never stopped.

A state folder ``step-00000120/`` holds the network's weights in float32, the optimizer's
and the schedule's state, the random generators of every process (the noise generator,
torch's global ones, Python's), the gradient scaler's (fp16) and ``state.json`` (step, epoch, batch position,
the run's fingerprint). It is written under a temporary name and renamed, so a run killed
while saving leaves the previous state intact; only the newest ``keep`` states are kept.

A state is resumed only by a run with the same fingerprint (same data, model and
training settings): a resumed run then ends at the same step with the same schedule and
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw.build import atomic

from ..errors import CharfwError

if TYPE_CHECKING:  # torch loads with the first state saved or read: finding states needs none
    import torch

STATE_PREFIX = "step-"
FORMAT = 1


@dataclass
class StateInfo:
    #: optimizer steps done
    step: int
    #: the epoch (1-based) the next batch belongs to
    epoch: int
    #: batches of that epoch already consumed (by this process)
    batch: int
    fingerprint: str
    name: str
    format: int = FORMAT


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    import torch

    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(root: Path, info: StateInfo, *, network: torch.nn.Module, optimizer: Any, scheduler: Any,
               rng: list[dict[str, Any]], scaler: Any = None, keep: int = 1) -> Path:
    """Write a state folder atomically and drop older ones beyond ``keep``. ``rng`` holds
    every process's random generators (:func:`rng_state`), in rank order."""
    import torch
    from safetensors.torch import save_file

    dest = root / f"{STATE_PREFIX}{info.step:08d}"
    root.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_dir(dest) as tmp:
        weights = {k: v.detach().float().cpu().contiguous() for k, v in network.kohya_state_dict().items()}  # type: ignore[operator]
        save_file(weights, str(tmp / "network.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(info), indent=1), "utf-8")
    prune(root, keep)
    return dest


def prune(root: Path, keep: int) -> None:
    for old in list_states(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_states(root: Path) -> list[Path]:
    """Complete state folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def read_info(folder: Path) -> StateInfo:
    try:
        data = json.loads((folder / "state.json").read_text("utf-8"))
        return StateInfo(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise CharfwError(f"not a charfw training state ({exc})", path=folder) from None


def find_state(root: Path, fingerprint: str) -> Path | None:
    """The newest state in ``root`` saved by a run with this fingerprint."""
    for folder in reversed(list_states(root)):
        try:
            if read_info(folder).fingerprint == fingerprint:
                return folder
        except CharfwError:
            continue
    return None


def load_state(folder: Path, *, network: torch.nn.Module, optimizer: Any, scheduler: Any,
               generator: torch.Generator, scaler: Any = None, rank: int = 0) -> StateInfo:
    import torch
    from safetensors.torch import load_file

    info = read_info(folder)
    network.load_kohya_state_dict(load_file(str(folder / "network.safetensors")), source=str(folder))  # type: ignore[operator]
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    states = torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)
    restore_rng(states[rank] if rank < len(states) else states[0], generator)
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
    return info
