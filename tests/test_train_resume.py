"""Runs that stop: a hard kill and --resume, a NaN loss, unreadable images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_support import make_job, one_torch_thread, write_dataset  # noqa: F401 (fixture)

from charfw.training import train
from charfw.training.loop import TrainingStopped

STEPS = 10


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _cli_args(tiny: Path, dataset: Path, out: Path, cache: Path) -> list[str]:
    # kohya spellings on purpose: a switching user's command line
    return ["train", str(dataset), "--pretrained_model_name_or_path", str(tiny), "--network_module", "networks.lora",
            "--network_dim", "4", "--optimizer_type", "AdamW", "--learning_rate", "1e-2",
            "--lr_scheduler", "cosine_with_restarts", "--max_train_steps", str(STEPS), "--save_every_n_steps", "2",
            "--save_state", "--save_precision", "float", "--output_dir", str(out), "--cache-dir", str(cache),
            "--log-with", "none", "--no-gradient-checkpointing"]


def test_resume_after_kill_ends_like_an_uninterrupted_run(tiny_sd15: Path, tmp_path: Path, run_cli) -> None:
    dataset = write_dataset(tmp_path / "data", count=4)
    cache = tmp_path / "cache"
    # the uninterrupted run
    code, _, err = run_cli(*_cli_args(tiny_sd15, dataset, tmp_path / "straight", cache))
    assert code == 0, err
    (reference,) = (tmp_path / "straight").glob("krnk-*-10.safetensors")

    # the same run in a process that is killed with SIGKILL once it saved its first state
    out = tmp_path / "killed"
    env = {**os.environ, "CHARFW_PLUGINS": "", "HF_HUB_OFFLINE": "1", "CHARFW_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "charfw", *_cli_args(tiny_sd15, dataset, out, cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
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
    assert not (out / reference.name).exists()  # it really was stopped before the end
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("*-state/step-*") if (p / "state.json").is_file())
    assert 2 <= killed_at < STEPS

    code, _, err = run_cli(*_cli_args(tiny_sd15, dataset, out, cache), "--resume")
    assert code == 0, err
    assert f"resumed from step-{killed_at:08d}" in err
    final = _tensors(out / reference.name)
    expected = _tensors(reference)
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=1e-6, rtol=1e-5, msg=key)
    from safetensors import safe_open

    with safe_open(str(out / reference.name), "pt") as fh:
        assert fh.metadata()["ss_steps"] == str(STEPS)
    # only the newest state is kept (save_last_n_states = 1)
    assert [p.name for p in out.glob("*-state/step-*")] == [f"step-{STEPS:08d}"]


def test_resume_refuses_a_state_of_other_settings(tiny_sd15: Path, tmp_path: Path, run_cli) -> None:
    dataset = write_dataset(tmp_path / "data", count=2)
    args = _cli_args(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache")
    args[args.index("--max_train_steps") + 1] = "2"
    assert run_cli(*args)[0] == 0
    (state,) = (tmp_path / "out").glob("*-state/step-00000002")
    args[args.index("--learning_rate") + 1] = "5e-3"
    code, _, err = run_cli(*args, "--resume", str(state))
    assert code == 3 and "other data, model or settings" in err


def test_nan_loss_stops_and_names_the_batch(tiny_sd15: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image whose pixels come out NaN (simulated at the pixel stage) poisons the loss of
    its batch; the run stops at that step and names the batch's files."""
    from charfw.training import batch_inputs

    real = batch_inputs.pixels

    def poisoned(image, entry, **kw):
        out = real(image, entry, **kw)
        return out * float("nan") if entry.path.name == "f02.png" else out

    monkeypatch.setattr(batch_inputs, "pixels", poisoned)
    dataset = write_dataset(tmp_path / "data", count=4, repeats=1)
    job = make_job(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache", cache_latents="off", max_train_steps=4)
    with pytest.raises(TrainingStopped) as info:
        train(job)
    message = str(info.value)
    assert "the loss became NaN at step" in message and "f02.png" in message
    assert not list((tmp_path / "out").glob("*.safetensors"))
    # with latents cached, the same image is caught before training: left out, or a stop
    job = make_job(tiny_sd15, dataset, tmp_path / "out2", tmp_path / "cache", max_train_steps=1)
    result = train(job)
    assert result.skipped == [f"{dataset.parent / '1_krnk' / 'krnk girl_flip_face' / 'f02.png'}: "
                              "the VAE gives NaN or infinite latents for this image"]


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_unreadable_image_is_skipped_or_stops_before_training(tiny_sd15: Path, tmp_path: Path, damage: str) -> None:
    dataset = write_dataset(tmp_path / "data", count=3, repeats=1, color_aug=damage == "truncated")
    bad = next(dataset.parent.glob("*/*/f01.png"))
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    else:
        bad.write_bytes(b"this is not a png")
    result = train(make_job(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache", max_train_steps=1))
    assert len(result.skipped) == 1 and result.skipped[0].startswith(f"{bad}: ")
    assert ("truncated" if damage == "truncated" else "not an image") in result.skipped[0]
    from safetensors import safe_open

    with safe_open(str(result.lora), "pt") as fh:
        assert fh.metadata()["ss_num_train_images"] == "2"

    started = []
    job = make_job(tiny_sd15, dataset, tmp_path / "stop", tmp_path / "cache", max_train_steps=1, bad_images="stop")
    job.progress = lambda total, what: started.append(what) or _silent()
    with pytest.raises(TrainingStopped, match=r"1 unusable image\(s\), training not started: .*f01\.png"):
        train(job)
    assert "steps" not in started and not (tmp_path / "stop").exists()


def _silent():
    from charfw import console

    return console.progress(None, "", unit="it")
