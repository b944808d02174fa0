"""``charfw lora info|blocks|resize|merge|presets`` through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_support import NAMES, lora_conv, lora_linear, reference_delta, relative_error, save

from charfw.lora.file import read_lora


@pytest.fixture
def lora_file(tmp_path: Path) -> Path:
    modules = {NAMES["BASE"]: lora_linear(12, 12, 4, seed=1), NAMES["IN01"]: lora_linear(24, 16, 4, seed=2),
               NAMES["IN05"]: lora_conv(8, 6, 4, seed=3), NAMES["OUT05"]: lora_conv(8, 8, 4, seed=4),
               NAMES["none"]: lora_linear(16, 8, 4, seed=5)}
    return save(tmp_path / "krnk-Lora3x3.safetensors", modules,
                {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_output_name": "krnk"})


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_info_shows_type_blocks_and_metadata(lora_file: Path, run_cli) -> None:
    code, out, err = run_cli("lora", "info", lora_file)
    assert code == 0, err
    assert "type     LoCon for SD 1.x" in out and "modules  5 (1 text encoder, 4 UNet, 2 conv 3x3)" in out
    assert "sshs_model_hash missing" in out and "ss_output_name = krnk" in out
    rows = {line.split()[0] for line in out.splitlines() if line[:4] in ("BASE", "IN01", "IN05", "OUT0", "(non")}
    assert rows == {"BASE", "IN01", "IN05", "OUT05", "(none)"}
    code, out, _ = run_cli("lora", "info", lora_file, "--json")
    data = json.loads(out)
    assert data["type"] == "LoCon" and data["family"] == "sd1" and data["ranks"] == {"4": 5}
    assert abs(sum(b["share"] for b in data["blocks"]) - 1) < 1e-9


def test_blocks_writes_next_to_the_input_with_the_preset_in_the_name(lora_file: Path, run_cli) -> None:
    code, out, err = run_cli("lora", "blocks", lora_file, "--weights", "BODY", "--strength", "0.5")
    assert code == 0, err
    out_file = lora_file.with_name("krnk-Lora3x3-BODYx0.5.safetensors")
    merged = read_lora(out_file)
    # BODY: BASE 0, IN01 1, IN05 0, OUT05 1; out-of-block modules: 1 (then x0.5)
    assert set(merged.modules) == {NAMES["IN01"], NAMES["OUT05"], NAMES["none"]}
    src = read_lora(lora_file)
    for name in merged.modules:
        assert relative_error(merged.modules[name].delta(), 0.5 * src.modules[name].delta()) < 1e-6
    assert "2 dropped (ratio 0)" in out and f"wrote {out_file.name}" in out.replace(str(out_file.parent) + os.sep, "")
    assert merged.metadata["sshs_model_hash"]


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "FCAE"], "unknown block-weight preset 'FCAE'; did you mean 'FACE'?"),
    (["--weights", "1,0,1"], "3 values is not a block layout"),
    (["--weights", "FACE", "-o", "{input}"], "the output would replace the input"),
])
def test_blocks_errors_are_one_line_and_write_nothing(lora_file: Path, run_cli, args: list[str], message: str) -> None:
    before = files(lora_file.parent)
    code, _, err = run_cli("lora", "blocks", lora_file, *[a.replace("{input}", str(lora_file)) for a in args])
    assert code == 3 and message in err and len(err.strip().splitlines()) == 1, err
    assert files(lora_file.parent) == before


def test_a_truncated_or_damaged_file_fails_cleanly(lora_file: Path, run_cli) -> None:
    lora_file.write_bytes(lora_file.read_bytes()[:-64])
    before = files(lora_file.parent)
    for command in (["blocks", lora_file, "-w", "FACE"], ["resize", lora_file], ["info", lora_file]):
        code, _, err = run_cli("lora", *command)
        assert code == 3 and "truncated" in err and "Traceback" not in err
    assert files(lora_file.parent) == before


def test_resize_default_is_sv_ratio_16_with_kohyas_verbose_lines(lora_file: Path, run_cli) -> None:
    code, out, err = run_cli("lora", "resize", lora_file, "--verbose")
    assert code == 0, err
    resized = read_lora(lora_file.with_name("krnk-Lora3x3-sv16.safetensors"))
    assert set(resized.modules) == set(read_lora(lora_file).modules)
    assert f"{NAMES['IN01']:75} | sum(S) retained: " in out and "Frobenius norm retained: average" in out
    code, out, err = run_cli("lora", "resize", lora_file, "--rank", "2", "--conv-rank", "1", "--precision", "bf16",
                             "-o", lora_file.parent / "small.safetensors")
    small = read_lora(lora_file.parent / "small.safetensors")
    assert code == 0 and small.modules[NAMES["IN01"]].rank == 2 and small.modules[NAMES["IN05"]].rank == 1
    assert small.float_dtype == torch.bfloat16
    code, _, err = run_cli("lora", "resize", lora_file, "--sv-ratio", "8", "--sv-fro", "0.9")
    assert code == 2 and "only one of" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_every_command_on_a_file_with_nan_or_inf_names_file_and_module_and_writes_nothing(
        tmp_path: Path, run_cli, bad: float) -> None:
    broken = lora_linear(24, 16, 4)
    broken["lora_up.weight"][0, 0] = bad
    path = save(tmp_path / "bad.safetensors", {NAMES["IN01"]: lora_linear(8, 6, 2), NAMES["OUT11"]: broken})
    good = save(tmp_path / "good.safetensors", {NAMES["OUT11"]: lora_linear(24, 16, 4)})
    word = "NaN" if bad != bad else "Inf"
    for args in (["resize", path], ["info", path], ["blocks", path, "-w", "ALL"],
                 ["merge", good, f"{path}:0.5", "--rank", "4", "-o", tmp_path / "m.safetensors"]):
        code, _, err = run_cli("lora", *args)
        # was: merge ended in torch's _LinAlgError traceback (exit 1)
        assert code == 3, (args, err)
        assert err.strip().count("\n") == 0 and "Traceback" not in err
        assert f"bad.safetensors: module {NAMES['OUT11']}: lora_up.weight holds {word} values" in err
    assert files(tmp_path) == {"bad.safetensors", "good.safetensors"}


@pytest.mark.parametrize("content", ["checkpoint", "empty"])
def test_a_file_that_is_not_a_lora_is_refused(tmp_path: Path, run_cli, content: str) -> None:
    from charfw.lora.safetensors_io import write_safetensors

    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.bias": torch.zeros(4)} if content == "checkpoint" else {}
    path = write_safetensors(tmp_path / "model.safetensors", tensors).path
    for command in ("resize", "info", "blocks"):
        code, _, err = run_cli("lora", command, path, *(["-w", "ALL"] if command == "blocks" else []))
        assert code == 3 and "model.safetensors: not a LoRA" in err, (command, code, err)  # was: exit 0, a copy
    assert files(tmp_path) == {"model.safetensors"}


def test_resize_checks_the_method_values_as_a_manifest_does(lora_file: Path, run_cli) -> None:
    from pydantic import ValidationError

    from charfw.default_plugins.lora.svd import SvdOptions

    for option, value, message in (("--sv-ratio", "0.5", "sv_ratio must be above 1"),
                                   ("--sv-ratio", "1", "sv_ratio must be above 1"),
                                   ("--sv-ratio", "1e9", "sv_ratio must be above 1 and at most 10000"),
                                   ("--sv-fro", "1.5", "sv_fro keeps a fraction"),
                                   ("--sv-cumulative", "0", "sv_cumulative keeps a fraction")):
        code, _, err = run_cli("lora", "resize", lora_file, option, value)
        assert code == 2 and message in err, (option, value, err)  # was: accepted (exit 0)
        with pytest.raises(ValidationError, match=message):
            SvdOptions.model_validate({option[2:].replace("-", "_"): float(value)})
    assert files(lora_file.parent) == {lora_file.name}
    code, _, err = run_cli("lora", "resize", lora_file, "--sv-ratio", "10000")
    code2, _, err2 = run_cli("lora", "resize", lora_file, "--sv-fro", "0.00001")
    assert code == code2 == 0, err + err2
    assert files(lora_file.parent) == {lora_file.name, "krnk-Lora3x3-sv10000.safetensors",
                                       "krnk-Lora3x3-fro0.00001.safetensors"}  # no "-sv1e+09"


def test_merge_sums_the_sources_exactly(tmp_path: Path, run_cli) -> None:
    a = {NAMES["IN01"]: lora_linear(24, 16, 4, seed=1), NAMES["IN05"]: lora_conv(8, 6, 2, seed=2)}
    b = {NAMES["IN01"]: lora_linear(24, 16, 2, seed=3)}
    pa, pb = save(tmp_path / "a.safetensors", a), save(tmp_path / "b.safetensors", b)
    out = tmp_path / "ab.safetensors"
    code, stdout, err = run_cli("lora", "merge", f"{pa}:0.7:FACE", f"{pb}:-0.4", "--rank", "8", "-o", out)
    assert code == 0, err
    merged = read_lora(out)
    # FACE keeps IN01 (1) and drops IN05 (0)
    assert set(merged.modules) == {NAMES["IN01"]}
    want = 0.7 * reference_delta(a[NAMES["IN01"]], (24, 16)) - 0.4 * reference_delta(b[NAMES["IN01"]], (24, 16))
    assert relative_error(merged.modules[NAMES["IN01"]].delta(), want) < 1e-5
    assert "merged 2 files" in stdout
    code, _, err = run_cli("lora", "merge", f"{pa}:0.7", tmp_path / "missing.safetensors", "--rank", "8", "-o", out)
    assert code == 3 and "missing.safetensors': no such file" in err
    code, _, err = run_cli("lora", "merge", pa, pb, "-o", out)
    assert code == 2 and "give --rank N" in err


def test_presets_are_listed(run_cli) -> None:
    code, out, _ = run_cli("lora", "presets")
    assert code == 0
    lines = {line.split()[0] + " " + line.split()[1] for line in out.splitlines()}
    assert {"FACE SD1", "BODY SD1", "ALL SD1", "ALL SDXL", "OUTALL SD1"} <= lines


def test_lora_commands_start_without_torch(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "charfw", "lora", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "CHARFW_PLUGINS": ""})
    assert result.returncode == 0 and "charfw lora blocks" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported


@pytest.mark.parametrize("command", ["info", "blocks"])
def test_info_and_blocks_do_not_import_torch(lora_file: Path, command: str) -> None:
    """Reading, checking, block-weighting and writing a LoRA/LoCon file needs numpy only
    (torch's import alone is about a second of the command's start)."""
    args = ["info", lora_file] if command == "info" else ["blocks", lora_file, "-w", "ALL0.5"]
    code = ("import sys; from charfw.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    result = subprocess.run([sys.executable, "-c", code, "lora", *map(str, args)], cwd=lora_file.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("NO TORCH")
    if command == "blocks":
        assert read_lora(lora_file.with_name("krnk-Lora3x3-ALL0.5.safetensors")).modules
