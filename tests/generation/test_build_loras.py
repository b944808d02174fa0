"""``<lora:krnk:…>`` in a built workspace: the build's finished LoRAs by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from test_pipeline import generator, lora_file  # noqa: F401 (fixtures)

from charfw.build.records import finished_loras
from charfw.generation.infotext import parse_infotext, read_png_infotext


def fake_record(stage_dir: Path, lora: str) -> None:
    """The part of a stage record finished_loras reads (the engine writes the rest)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    record = {"engine": "2", "charfw": "0.1.0", "stage": stage_dir.name, "part": "x", "fingerprint": "0", "key": {},
              "plugins": [], "output": {"files": {"lora": lora}}, "output_fingerprint": "0",
              "started": "2026-12-01T00:00:00+00:00", "seconds": 0.0}
    (stage_dir / "record.json").write_text(json.dumps(record))


def test_finished_loras_take_the_last_lora_stage_of_each_part(tmp_path: Path) -> None:
    build = tmp_path / "build"
    for rel in ("krnk/face/train/a.safetensors", "krnk/face/compress/c.safetensors",
                "krnk/krnksf/merge/m.safetensors", "g/group/compress/g.safetensors"):
        (build / rel).parent.mkdir(parents=True, exist_ok=True)
        (build / rel).write_bytes(b"x")
    fake_record(build / "krnk/face/train", "build/krnk/face/train/a.safetensors")
    fake_record(build / "krnk/face/compress", "build/krnk/face/compress/c.safetensors")
    fake_record(build / "krnk/krnksf/merge", "build/krnk/krnksf/merge/m.safetensors")
    fake_record(build / "g/group/compress", "build/g/group/compress/g.safetensors")
    fake_record(build / "tyank/face/train", "build/tyank/face/train/gone.safetensors")  # file removed
    found = finished_loras(build, tmp_path)
    assert found == {
        "krnk/face": build / "krnk/face/compress/c.safetensors", "krnk": build / "krnk/face/compress/c.safetensors",
        "krnk/krnksf": build / "krnk/krnksf/merge/m.safetensors", "krnksf": build / "krnk/krnksf/merge/m.safetensors",
        "g/group": build / "g/group/compress/g.safetensors", "g": build / "g/group/compress/g.safetensors",
    }


def test_generate_finds_the_builds_loras_by_name(run_cli, tiny_sd15: Path, lora_file, tmp_path: Path) -> None:  # noqa: F811
    ws = tmp_path / "ws"
    (ws / "characters").mkdir(parents=True)
    dest = ws / "build/krnk/krnksf/compress/krnksf-sv16.safetensors"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(lora_file[0], dest)
    fake_record(dest.parent, "build/krnk/krnksf/compress/krnksf-sv16.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a girl <lora:krnksf:0.7>\n")
    code, _, err = run_cli("generate", prompts, "--base-model", tiny_sd15, "-W", 32, "-H", 32, "--steps", 2,
                           "--cache-dir", tmp_path / "cache", "-o", tmp_path / "out", cwd=ws)
    assert code == 0, err
    params = parse_infotext(read_png_infotext(tmp_path / "out" / "00000-0.png") or "")
    assert params.lora_hashes and params.lora_hashes[0][0] == "krnksf-sv16"  # A1111: the file name
    prompts.write_text("a girl <lora:nobody:0.7>\n")
    code, _, err = run_cli("generate", prompts, "--base-model", tiny_sd15, "-o", tmp_path / "out2", cwd=ws)
    assert code == 3 and "searched: the build's finished LoRAs" in err
