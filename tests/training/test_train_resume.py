"""Runs that stop: a hard kill and --resume, a NaN loss, unreadable images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import (  # noqa: F401
    ctrl_c_in_unet_forward,
    ctrl_c_on_call,
    kill_when_a_state_is_saved,
    make_job,
    one_torch_thread,
    write_dataset,
)

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
    kill_when_a_state_is_saved(proc, out)
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


# --- Ctrl-C: a real SIGINT in the middle of a step, then a resumed run -------------------

CTRL_C_STEPS = 6  # 4 batches an epoch: the resumed runs cross an epoch boundary


def _ctrl_c_job(tiny: Path, dataset: Path, out: Path, cache: Path, lines: list[str], **settings: Any) -> Any:
    options: dict[str, Any] = {"max_train_steps": CTRL_C_STEPS, "lr_scheduler": "cosine_with_restarts",
                               "save_precision": "float", "resume": "auto", "fingerprint": "ctrl-c"}
    return make_job(tiny, dataset, out, cache, log=lines.append, **{**options, **settings})


@pytest.fixture(scope="module")
def straight_run(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The dataset, and the LoRA of the run the interrupted ones must end as, bit for bit."""
    root = tmp_path_factory.mktemp("ctrl-c")
    dataset = write_dataset(root / "data", count=4)
    result = train(_ctrl_c_job(tiny_sd15, dataset, root / "straight", root / "cache", []))
    return dataset, _tensors(result.lora)


def _assert_identical(path: Path, expected: dict[str, torch.Tensor]) -> None:
    final = _tensors(path)
    assert final.keys() == expected.keys()
    differ = [key for key, value in expected.items() if not torch.equal(final[key], value)]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ from the uninterrupted run: {differ[:3]}"


def _states(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*-state/step-*"))


@pytest.mark.parametrize("where", ["unet forward", "optimizer step"])
def test_ctrl_c_mid_step_resumes_to_identical_weights(straight_run, tiny_sd15: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Ctrl-C in step 3 (in the UNet's forward, once the step's noise is drawn; or inside
    optimizer.step, once the weights are updated and the step is not yet counted): the run
    finishes step 3, saves its state there and stops; the resumed run ends with every
    tensor equal to an uninterrupted run's."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    dataset, expected = straight_run
    out, cache = tmp_path / "out", tmp_path / "cache"
    lines: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    hook = None
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        if where == "unet forward":
            ctrl_c_in_unet_forward(m, at=3)
        else:
            press = ctrl_c_on_call(at=3)
            hook = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: press())
        try:
            train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
        finally:
            if hook is not None:
                hook.remove()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    interrupted, states = list(lines), _states(out)

    lines.clear()
    result = train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
    _assert_identical(result.lora, expected)
    assert "stopping after this step" in " ".join(interrupted)
    assert interrupted[-1] == "interrupted at step 3; state saved, resume to continue"
    assert states == ["step-00000003"]
    assert f"resumed from step-00000003 (step 3 of {CTRL_C_STEPS})" in lines


def test_ctrl_c_before_the_first_step_saves_nothing_and_says_so(straight_run, tiny_sd15: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the latents are cached: the run stops at once, says that the next run
    starts over, and that run is an uninterrupted one."""
    from charfw.training import caches

    dataset, expected = straight_run
    out, cache = tmp_path / "out", tmp_path / "cache"
    real, press = caches.LatentCache.put, ctrl_c_on_call(at=2)

    def put(self, *args, **kwargs):
        press()
        return real(self, *args, **kwargs)

    lines: list[str] = []
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(caches.LatentCache, "put", put)
        train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
    assert lines[-1] == "interrupted before the first step; nothing to resume, the next run starts over"
    assert _states(out) == []

    lines.clear()
    result = train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
    assert not [line for line in lines if "resumed" in line]
    _assert_identical(result.lora, expected)


def test_a_second_ctrl_c_stops_at_once_and_saves_nothing(straight_run, tiny_sd15: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C twice in step 5: the run stops inside the step without saving it; the state
    of step 4 (saved every 2 steps) is what the next run continues from, to the same end."""
    dataset, expected = straight_run
    out, cache = tmp_path / "out", tmp_path / "cache"
    lines: list[str] = []
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        ctrl_c_in_unet_forward(m, at=5, times=2)
        train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines, save_state=True, save_every_n_steps=2))
    assert lines[-1] == "stopped at once after step 4, without saving; resuming continues from step-00000004"
    assert _states(out) == ["step-00000004"]

    lines.clear()
    result = train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
    assert f"resumed from step-00000004 (step 4 of {CTRL_C_STEPS})" in lines
    _assert_identical(result.lora, expected)


@pytest.mark.parametrize("every", ["2 steps", "epoch"])
def test_ctrl_c_during_a_periodic_save_stops_after_it(straight_run, tiny_sd15: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, every: str) -> None:
    """Ctrl-C while a periodic state is written (every 2 steps, or at the end of epoch 1):
    the save completes, the run stops right after it without writing the state twice, and
    the resumed run ends as the uninterrupted one."""
    from charfw.training import train_state

    dataset, expected = straight_run
    out, cache = tmp_path / "out", tmp_path / "cache"
    real, press = train_state.save_state, ctrl_c_on_call(at=1)
    saves: list[int] = []

    def save_state(root, info, **kwargs):
        saves.append(info.step)
        press()
        return real(root, info, **kwargs)

    lines: list[str] = []
    periodic = {"save_every_n_steps": 2} if every == "2 steps" else {"save_every_n_epochs": 1}
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(train_state, "save_state", save_state)
        train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines, save_state=True, **periodic))
    stopped_at = 2 if every == "2 steps" else 4
    assert lines[-1] == f"interrupted at step {stopped_at}; state saved, resume to continue"
    assert saves == [stopped_at]
    assert _states(out) == [f"step-{stopped_at:08d}"]

    lines.clear()
    result = train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
    assert f"resumed from step-{stopped_at:08d} (step {stopped_at} of {CTRL_C_STEPS})" in lines
    _assert_identical(result.lora, expected)


def test_ctrl_c_while_the_lora_is_written_finishes_it_then_stops(straight_run, tiny_sd15: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the last step, while the file is written: the file is finished, the
    final state saved, and the run stops; the next run only writes the file again."""
    from charfw.training import lora_output

    dataset, expected = straight_run
    out, cache = tmp_path / "out", tmp_path / "cache"
    real, press = lora_output.save_lora, ctrl_c_on_call(at=1)

    def save_lora(*args, **kwargs):
        press()
        return real(*args, **kwargs)

    lines: list[str] = []
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(lora_output, "save_lora", save_lora)
        train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
    assert lines[-1] == f"interrupted at step {CTRL_C_STEPS}; state saved, resume to continue"
    assert _states(out) == [f"step-{CTRL_C_STEPS:08d}"]
    (written,) = out.glob("*.safetensors")
    _assert_identical(written, expected)

    lines.clear()
    result = train(_ctrl_c_job(tiny_sd15, dataset, out, cache, lines))
    assert f"resumed from step-{CTRL_C_STEPS:08d} (step {CTRL_C_STEPS} of {CTRL_C_STEPS})" in lines
    _assert_identical(result.lora, expected)


def test_the_ctrl_c_handler_is_put_back_and_only_taken_where_it_works() -> None:
    import threading

    from train_support import press_ctrl_c

    from charfw.training.interrupts import StopAtStepBoundary

    before = signal.getsignal(signal.SIGINT)
    notices: list[str] = []
    with pytest.raises(RuntimeError), StopAtStepBoundary(notice=notices.append) as stop:
        assert stop.installed
        press_ctrl_c()
        assert stop.requested and not stop.forced and "Ctrl-C again to stop at once" in notices[0]
        with pytest.raises(KeyboardInterrupt):  # the second one interrupts at once
            press_ctrl_c()
        assert stop.forced
        raise RuntimeError  # put back on errors too
    assert signal.getsignal(signal.SIGINT) is before
    # not taken off the main thread (no signal arrives there), by a run of several
    # processes, nor where SIGINT is ignored (a background job)
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(StopAtStepBoundary().__enter__().installed))
    thread.start()
    thread.join()
    assert seen == [False]
    with StopAtStepBoundary(enabled=False) as stop:
        assert not stop.installed
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopAtStepBoundary() as stop:
            assert not stop.installed and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_in_charfw_train_then_resume(tiny_sd15: Path, tmp_path: Path, run_cli,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``charfw train`` without --save-state: Ctrl-C still saves where it stopped, and
    ``--resume`` continues from there (the state carries the run's fingerprint) to the
    weights of an uninterrupted run."""
    dataset = write_dataset(tmp_path / "data", count=4)
    cache = tmp_path / "cache"
    args = _cli_args(tiny_sd15, dataset, tmp_path / "straight", cache)
    del args[args.index("--save_state")]
    del args[args.index("--save_every_n_steps") : args.index("--save_every_n_steps") + 2]
    code, _, err = run_cli(*args)
    assert code == 0, err
    (reference,) = (tmp_path / "straight").glob("krnk-*-10.safetensors")

    out = tmp_path / "out"
    args[args.index("--output_dir") + 1] = str(out)
    with monkeypatch.context() as m:
        ctrl_c_in_unet_forward(m, at=4)
        code, _, err = run_cli(*args)
    assert code == 130 and "interrupted at step 4; state saved, resume to continue" in err, err
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert "resumed from step-00000004" in err
    _assert_identical(out / reference.name, _tensors(reference))


def test_resume_refuses_a_state_of_other_settings(tiny_sd15: Path, tmp_path: Path, run_cli) -> None:
    dataset = write_dataset(tmp_path / "data", count=2)
    args = _cli_args(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache")
    args[args.index("--max_train_steps") + 1] = "2"
    assert run_cli(*args)[0] == 0
    (state,) = (tmp_path / "out").glob("*-state/step-00000002")
    args[args.index("--learning_rate") + 1] = "5e-3"
    code, _, err = run_cli(*args, "--resume", str(state))
    assert code == 3 and "other data, model or settings" in err


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_nan_or_inf_loss_stops_at_its_step_naming_every_image_of_the_step(
        tiny_sd15: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    """Two batches per step (gradient accumulation): the loss of the step's *first* batch
    goes bad. The run stops at that step, says NaN or infinite, and names the images of
    both batches (was: only the last batch's loss was checked, so the stop came a step
    later, as NaN, naming other images)."""
    from charfw.training import loop, objectives

    shards: list[list[Any]] = []
    real_shard = loop._shard

    def shard(batches: list[Any], rank: int, world: int) -> list[Any]:
        shards.append(real_shard(batches, rank, world))
        return shards[-1]

    real_loss = objectives.DDPMObjective.loss
    calls = []

    def loss(self, *args: Any) -> torch.Tensor:
        calls.append(1)
        out = real_loss(self, *args)
        return out * float(bad) if len(calls) == 3 else out  # the first batch of step 2

    monkeypatch.setattr(loop, "_shard", shard)
    monkeypatch.setattr(objectives.DDPMObjective, "loss", loss)
    dataset = write_dataset(tmp_path / "data", count=8, repeats=1)  # 4 batches of 2 per epoch
    job = make_job(tiny_sd15, dataset, tmp_path / "out", tmp_path / "cache", gradient_accumulation_steps=2,
                   max_train_steps=4)
    with pytest.raises(TrainingStopped) as info:
        train(job)
    message = str(info.value)
    assert f"the loss became {'NaN' if bad == 'nan' else 'infinite'} at step 2;" in message
    named = set(message.split("the batch's images: ", 1)[1].split("; ", 1)[0].split(", "))
    first, second = ({str(p) for p in batch.paths} for batch in shards[0][2:4])
    assert first - second and named == first | second
    assert not list((tmp_path / "out").glob("*.safetensors"))


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
