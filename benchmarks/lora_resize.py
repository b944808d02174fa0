"""Speed of `charfw lora resize` (SVD compression) and `charfw lora blocks` on a real-size file.

    python benchmarks/lora_resize.py [--repeat 3] [--full-dense] [--file PATH]

The input is generated here (and kept in the temp folder for later runs): an SD 1.5
``Lora3x3`` file as kohya writes it with ``network_dim 128, conv_dim 128`` (alpha 64): 350
modules, 1,050 tensors, fp16, about 311 MB, with random factors whose product has a decaying
spectrum σ_k = max(k^-p, 0.02) (p from 0.45 to 1.65 per module), so that ``sv_ratio 16``
chooses ranks from a few to the cap, as on a trained file.

Timed, each in a fresh process, best and median of ``--repeat`` runs:

* charfw's resize, ``sv_ratio 16`` (load, resize, save: the whole job) — target under 5 s
  and under 1.5 GB peak memory on the 2-core CPU; and the same through the ``charfw`` command
  (interpreter start and imports included);
* the dense path kohya's ``resize_lora.py`` takes (ΔW formed, full SVD), on a sample of
  modules by default (every kind and the largest; extrapolated by parameter count), on
  the whole file with ``--full-dense``; its ranks and results are compared with charfw's;
* the block merge (``FACE``) next to a plain copy of the file;
* the commands end to end, each a fresh ``charfw`` process (interpreter start, imports,
  plugin loading included) next to the copy: ``lora blocks`` (target: within 2× the copy),
  ``lora resize`` (target: under 2.5 s) and ``lora info`` (target: under 1 s). Set
  ``OMP_NUM_THREADS`` as a user would; the commands use one BLAS/torch thread per worker.

The machine is shared: repeat, and read the best figure as the machine's and the median
as typical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # kohya's names, listed independently for the tests
CHARFW = str(Path(sys.executable).with_name("charfw"))
DEFAULT_FILE = Path(tempfile.gettempdir()) / "charfw-bench" / "sd15-Lora3x3-128-conv128.safetensors"


def generate(dest: Path, *, dim: int = 128, conv_dim: int = 128, alpha: float = 64, seed: int = 0) -> None:
    """Write the benchmark file (fp16, kohya names and metadata)."""
    import torch
    from kohya_names import sd15_targets

    from charfw.lora.safetensors_io import write_safetensors

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = sd15_targets(conv=True)
    for i, t in enumerate(targets):
        r = conv_dim if t.is_3x3 else dim
        out, cols = t.shape[0], math.prod(t.shape[1:])
        p = 0.45 + 1.2 * ((i * 0.6180339887) % 1.0)
        sigma = torch.clamp(torch.arange(1, r + 1, dtype=torch.float32) ** -p, min=0.02)
        half = sigma.sqrt() * 0.05
        up = torch.randn(out, r, generator=gen) / math.sqrt(out) * half
        down = (torch.randn(r, cols, generator=gen) / math.sqrt(cols)) * half[:, None]
        if t.is_conv:
            up = up.reshape(out, r, 1, 1)
            down = down.reshape(r, *t.shape[1:])
        tensors[f"{t.name}.lora_up.weight"] = up.half()
        tensors[f"{t.name}.lora_down.weight"] = down.half()
        tensors[f"{t.name}.alpha"] = torch.tensor(alpha).half()
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(alpha)}),
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": dest.stem,
        "ss_training_comment": "charfw benchmark file (random factors)",
    }
    write_safetensors(dest, tensors, metadata, dtype=torch.float16)


# --- children (each job in a fresh process) ----------------------------------------------


def child_resize(src: str, dest: str, threads: str) -> dict:
    t0 = time.perf_counter()
    from charfw.lora.file import read_lora
    from charfw.lora.svd import RankRule, resize_lora

    t_import = time.perf_counter()
    lora = read_lora(src)  # NaN/Inf are caught by the reading (one pass over the bits)
    t_load = time.perf_counter()
    new, report = resize_lora(lora, RankRule("sv_ratio", 16), threads=int(threads))
    t_resize = time.perf_counter()
    saved = new.save(dest)
    t_save = time.perf_counter()
    return {"import": t_import - t0, "load": t_load - t_import, "resize": t_resize - t_load,
            "save": t_save - t_resize, "job": t_save - t_import, "size": saved.size,
            "ranks": {m.name: m.new_rank for m in report.modules}, "fro_mean": report.fro_mean}


def child_blocks(src: str, dest: str, spec: str = "FACE", strength: str = "1") -> dict:
    from charfw.lora.block_weights import apply_block_weights, load_presets, resolve_weights
    from charfw.lora.file import read_lora

    t0 = time.perf_counter()
    lora = read_lora(src)
    weights = resolve_weights(spec, lora.family, load_presets())
    merged, _ = apply_block_weights(lora, weights, strength=float(strength))
    saved = merged.save(dest)
    return {"job": time.perf_counter() - t0, "size": saved.size}


def child_copy(src: str, dest: str) -> dict:
    t0 = time.perf_counter()
    shutil.copyfile(src, dest)
    with open(dest, "rb+") as fh:
        os.fsync(fh.fileno())
    return {"job": time.perf_counter() - t0}


def child_dense(src: str, names_json: str) -> dict:
    """kohya's route for each module (dense ΔW, full-matrices SVD, its sv_ratio rule), next
    to charfw's result for the same module computed in fp32: time, ranks, difference."""
    import torch

    from charfw.lora.file import read_lora
    from charfw.lora.svd import RankRule, resize_lora

    lora = read_lora(src)
    names = json.loads(names_json)
    mine, _ = resize_lora(lora.with_modules([lora.modules[n] for n in names]), RankRule("sv_ratio", 16),
                          precision=torch.float32)
    out = {}
    for name in names:
        m = lora.modules[name]
        t0 = time.perf_counter()
        up = m.tensors["lora_up.weight"].float()
        down = m.tensors["lora_down.weight"].float()
        W = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        U, S, Vh = torch.linalg.svd(W)
        count = int(torch.gt(S, S[0] / 16).sum())
        k = min(max(1, min(count, len(S) - 1)) + 1, down.shape[0])
        approx = (U[:, :k] * S[:k]) @ Vh[:k] * m.scale
        seconds = time.perf_counter() - t0
        got = mine.modules[name]
        err = float((got.delta().reshape(approx.shape) - approx).norm() / approx.norm())
        out[name] = {"seconds": seconds, "rank": k, "charfw_rank": got.rank, "error": err}
        del U, S, Vh, W, approx
    return out


#: the modules kohya-formats.md measured kohya on, one of each kind (the largest is added)
SAMPLE = [
    "lora_te_text_model_encoder_layers_0_mlp_fc1",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_up_blocks_1_resnets_0_conv1",
]


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would survive exec and report
    the parent's peak when the parent was bigger)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, *args: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import lora_resize as b; "
            f"r = b.child_{kind}(*{list(args)!r}); "
            "r['peak_mb'] = b.peak_mb(); "
            "print('RESULT' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(proc.stderr)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[6:])


def timed_cli(*args: str) -> tuple[float, float]:
    """Wall time and peak memory of one ``charfw`` process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([CHARFW, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        sys.exit(proc.stderr.read().decode() if proc.stderr else f"charfw failed ({status})")
    return wall, usage.ru_maxrss / 1024


def cpu_pressure() -> str:
    try:
        some = Path("/proc/pressure/cpu").read_text().split()[1:4]
    except OSError:
        return "CPU pressure unknown"
    return "CPU pressure " + " ".join(some)


def fmt(values: list[float], unit: str = "s") -> str:
    return f"best {min(values):.2f} {unit}, median {statistics.median(values):.2f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="benchmark input (generated if missing)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="worker threads (0: one per core)")
    parser.add_argument("--full-dense", action="store_true", help="run the dense path on every module (slow: minutes)")
    args = parser.parse_args()

    src = args.file
    if not src.exists():
        print(f"generating {src} ...", flush=True)
        t0 = time.perf_counter()
        generate(src)
        print(f"  {src.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="charfw-bench-"))
    threads = str(args.threads or (os.cpu_count() or 1))
    print(f"input: {src} ({src.stat().st_size / 1e6:.1f} MB), {os.cpu_count()} CPUs, {cpu_pressure()}\n")

    # warm the page cache so every variant reads from memory
    with open(src, "rb") as fh:
        while fh.read(1 << 24):
            pass

    print("resize, sv_ratio 16 (load + resize + save), fresh process per run:")
    runs = [run_child("resize", str(src), str(work / "out.safetensors"), threads) for _ in range(args.repeat)]
    for r in runs:
        print(f"  job {r['job']:.2f} s (load {r['load']:.2f}, resize {r['resize']:.2f}, "
              f"save {r['save']:.2f}; imports {r['import']:.2f}), peak {r['peak_mb']:.0f} MB, "
              f"output {r['size'] / 1e6:.1f} MB")
    print(f"  charfw resize job: {fmt([r['job'] for r in runs])}; peak memory {fmt([r['peak_mb'] for r in runs], 'MB')}")
    ranks = runs[0]["ranks"]
    values = sorted(ranks.values())
    print(f"  ranks {values[0]}..{values[-1]} (median {values[len(values) // 2]}, mean {sum(values) / len(values):.1f}, "
          f"{sum(v == 128 for v in values)} at the cap); Frobenius retained {runs[0]['fro_mean']:.2%} on average")

    walls, peaks = [], []
    for _ in range(args.repeat):
        wall, peak = timed_cli("lora", "resize", str(src), "--sv-ratio", "16", "-o", str(work / "cli.safetensors"))
        walls.append(wall)
        peaks.append(peak)
    print(f"  `charfw lora resize FILE --sv-ratio 16 -o OUT` (process start, imports included): {fmt(walls)}, "
          f"peak {max(peaks):.0f} MB")

    print("\nblock merge (load + check + merge + save) vs plain copy (+ fsync), fresh process per run:")
    for label, spec, strength in (("FACE (drops 182 of 350 modules)", "FACE", "1"),
                                  ("ALL26 x0.5 (scales all 350)", "ALL26", "0.5")):
        blocks = [run_child("blocks", str(src), str(work / "blocks.safetensors"), spec, strength)
                  for _ in range(args.repeat)]
        print(f"  charfw lora blocks {label}: {fmt([b['job'] for b in blocks])}, "
              f"peak {max(b['peak_mb'] for b in blocks):.0f} MB, output {blocks[0]['size'] / 1e6:.0f} MB")
    copies = [run_child("copy", str(src), str(work / "copy.safetensors")) for _ in range(args.repeat)]
    print(f"  plain file copy ({src.stat().st_size / 1e6:.0f} MB): {fmt([c['job'] for c in copies])}")

    copy_best = min(c["job"] for c in copies)
    print("\ncommands end to end (a fresh `charfw` process each, start-up included), next to the copy:")
    for label, cli_args, target in (
            ("lora blocks FILE -w FACE", ["lora", "blocks", str(src), "-w", "FACE", "-o", str(work / "b.safetensors")],
             f"target within 2x the copy: {2 * copy_best:.2f} s"),
            ("lora blocks FILE -w ALL26 --strength 0.5", ["lora", "blocks", str(src), "-w", "ALL26", "--strength", "0.5",
                                                           "-o", str(work / "b.safetensors")], "scales every module"),
            ("lora resize FILE --sv-ratio 16", ["lora", "resize", str(src), "--sv-ratio", "16",
                                                "-o", str(work / "cli.safetensors")], "target under 2.5 s"),
            ("lora info FILE", ["lora", "info", str(src)], "target under 1 s")):
        walls = [timed_cli(*cli_args)[0] for _ in range(args.repeat)]
        print(f"  charfw {label:42} {fmt(walls)}  ({target})")

    # the dense route, kohya's

    from charfw.lora.file import read_lora

    lora = read_lora(src)
    names = list(lora.modules)
    if not args.full_dense:
        largest = max(names, key=lambda n: math.prod(lora.modules[n].shape))
        names = [n for n in SAMPLE if n in lora.modules] + ([largest] if largest not in SAMPLE else [])
    print(f"\ndense full SVD (kohya's route) on {len(names)} of {len(lora.modules)} modules:")
    dense = run_child("dense", str(src), json.dumps(names))
    dense.pop("peak_mb")
    worst = max(d["error"] for d in dense.values())
    same = sum(d["rank"] == d["charfw_rank"] for d in dense.values())
    for name, d in dense.items():
        print(f"  {name:70} {d['seconds']:6.2f} s  rank {d['rank']:>3} (charfw {d['charfw_rank']})")
    spent = sum(d["seconds"] for d in dense.values())
    if args.full_dense:
        print(f"  whole file: {spent:.0f} s ({spent / 60:.1f} min), measured")
    else:
        # full-matrices SVD of an m×n matrix costs about m·n·min(m, n) + max(m, n)³ (the square factor)
        def model(name: str) -> float:
            m, n = lora.modules[name].shape[0], math.prod(lora.modules[name].shape[1:])
            return m * n * min(m, n) + max(m, n) ** 3

        estimate = spent / sum(model(n) for n in dense) * sum(model(n) for n in lora.modules)
        print(f"  {spent:.1f} s for these; whole file ≈ {estimate:.0f} s ({estimate / 60:.1f} min), "
              "extrapolated by each module's SVD cost (--full-dense measures it)")
    print(f"  ranks equal to charfw's: {same}/{len(dense)}; largest relative difference of the kept ΔW "
          f"(both in fp32): {worst:.1e}")

    print(f"\n{cpu_pressure()} (other processes' demand for the CPUs; figures above scale with it)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
