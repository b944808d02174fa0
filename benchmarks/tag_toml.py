"""Speed of `charfw tag` + `charfw toml` on 10,000 images, and of a no-op rebuild.

    python benchmarks/tag_toml.py [--images 10000] [--folders 20]

Targets (issue 2, 2-core machine): tag + toml over 10,000 images in 20 folders under 5 s;
a no-op rebuild of the example under 1.5 s, interpreter start included. Both are timed as
real `charfw` processes. Next to them, in the same run, a naive baseline does the same
work the way a quick script would: decode every image to learn its size.

The image tree is made fresh for every run: on ext4 mounted with `discard` (this VM),
creating files right after deleting thousands is several times slower than creating them
in fresh folders, which would measure the disk rather than charfw. Even so, creating a
file costs this VM's kernel 0.2-0.6 ms (a laptop SSD: ~0.02 ms), so `charfw tag` is
bounded by the file system here; the run prints that floor (a plain loop that only creates
the same number of small files) beside charfw's figure.

    python benchmarks/tag_toml.py --dir build/bench   # the tree on the workspace's disk
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CHARFW = str(Path(sys.executable).with_name("charfw"))


def make_tree(root: Path, n_images: int, n_folders: int) -> None:
    """<root>/4_bench/<tags>_<suffix>/f<v><h>-<n>.png, 512 and 768 px images with content
    (copies of 40 distinct drawings, so decoding costs what real images cost)."""
    pool = []
    for i in range(40):
        size = 768 if i % 5 == 0 else 512
        im = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(im)
        for k in range(30):
            x, y = (i * 37 + k * 53) % size, (i * 91 + k * 29) % size
            d.ellipse([x, y, x + 60 + k, y + 40 + k], fill=((k * 40) % 255, (i * 7) % 255, (k * i) % 255))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pool.append(buf.getvalue())
    per_folder = n_images // n_folders
    for f in range(n_folders):
        folder = root / "4_bench" / f"bench{f} girl, choker_f{f:04d}"
        folder.mkdir(parents=True)
        for n in range(per_folder):
            code = f"f{n % 3}{n % 5}"
            (folder / f"{code}-{n:05d}.png").write_bytes(pool[(f * per_folder + n) % len(pool)])


def run(*args: str, cwd: Path | None = None) -> float:
    return run_timed(*args, cwd=cwd)[0]


def run_timed(*args: str, cwd: Path | None = None) -> tuple[float, float, float]:
    """One `charfw` process: (wall, user CPU, kernel CPU) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    result = subprocess.run([CHARFW, *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "CHARFW_QUIET": "1"})
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 4):
        raise SystemExit(f"charfw {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def naive(root: Path) -> float:
    """Decode every image for its size, write captions, write a TOML by hand."""
    t = time.perf_counter()
    lines = []
    for folder in sorted((root / "4_bench").iterdir()):
        widest = 0
        for path in sorted(folder.glob("*.png")):
            with Image.open(path) as im:
                im.load()
                widest = max(widest, *im.size)
            path.with_suffix(".caption").write_text(f"{folder.name.split(',')[0]}, {path.stem[:3]}")
        res = 512 if widest <= 512 else 768
        lines.append(f"[[datasets]]\nresolution = {res}\n[[datasets.subsets]]\nimage_dir = '{folder}'\n")
    (root / "naive.toml").write_text("\n".join(lines))
    return time.perf_counter() - t


def disk_floor(root: Path) -> float:
    """Only create one small file beside every image (plain loop, one thread): what the
    file system alone costs for the captions `charfw tag` writes. Run on a second tree made
    the same way, so both start from the same state of the disk."""
    t = time.perf_counter()
    for folder in sorted((root / "4_bench").iterdir()):
        if folder.is_dir():
            for path in folder.glob("*.png"):
                with open(path.with_suffix(".floor"), "w", encoding="utf-8") as fh:
                    fh.write("bench girl, choker, looking at viewer")
    return time.perf_counter() - t


def noop_costs(ws: Path, target: str, *, until: str | None = None) -> dict[str, float]:
    """Where a no-op rebuild's time goes, measured in-process on a built workspace: seconds
    per stage name (summed over the parts; an up-to-date stage costs its fingerprint and
    record check), "plan" (manifests and plugin choices), "run" (the whole run: stages,
    hash cache and the build hooks) and "report" (the report the build_finished hook writes)."""
    import charfw.report
    from charfw import plugins
    from charfw.build.plan import make_plan
    from charfw.build.run import BuildOptions, BuildRun
    from charfw.build.workspace import Workspace

    os.environ["CHARFW_QUIET"] = "1"
    plugins.reset()
    workspace = Workspace(ws)
    workspace.plugins  # noqa: B018 (loaded before the clock starts, as at start-up)
    costs: dict[str, float] = {}
    real_stage = BuildRun.stage

    def timed(self: BuildRun, ps):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real_stage(self, ps)
        finally:
            costs[ps.spec.name] = costs.get(ps.spec.name, 0.0) + time.perf_counter() - t

    real_report = charfw.report.write_reports

    def timed_report(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real_report(*args, **kwargs)
        finally:
            costs["report"] = costs.get("report", 0.0) + time.perf_counter() - t

    BuildRun.stage = timed  # type: ignore[method-assign]
    charfw.report.write_reports = timed_report  # the report plugin imports it when the hook runs
    try:
        t = time.perf_counter()
        plan = make_plan(workspace, [target])
        costs["plan"] = time.perf_counter() - t
        t = time.perf_counter()
        BuildRun(plan, BuildOptions(until=until)).run()
        costs["run"] = time.perf_counter() - t
    finally:
        BuildRun.stage = real_stage  # type: ignore[method-assign]
        charfw.report.write_reports = real_report
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--folders", type=int, default=20)
    ap.add_argument("--dir", type=Path, help="make the image tree under this folder (default: the temp folder)")
    args = ap.parse_args()

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="charfw-bench-", dir=args.dir))
    t = time.perf_counter()
    make_tree(root, args.images, args.folders)
    make_tree(root / "twin", args.images, args.folders)
    os.sync()
    print(f"made {args.images} images in {args.folders} folders in {time.perf_counter() - t:.1f} s")
    bench = root / "4_bench"

    print(f"\n== charfw tag + toml, {args.images} images, {args.folders} folders (2 processes) ==")
    floor = disk_floor(root / "twin")
    tag_first, tag_user, tag_sys = run_timed("tag", str(bench))
    toml, toml_user, toml_sys = run_timed("toml", str(bench))
    tag_again = run("tag", str(bench))
    print(f"charfw tag (writes {args.images} captions)   {tag_first:6.2f} s   "
          f"(CPU: {tag_user:.2f} s charfw, {tag_sys:.2f} s kernel)")
    print(f"charfw toml (sizes from headers)         {toml:6.2f} s   "
          f"(CPU: {toml_user:.2f} s charfw, {toml_sys:.2f} s kernel)")
    print(f"  tag + toml                             {tag_first + toml:6.2f} s   (target < 5 s)")
    print(f"charfw tag again (all unchanged)         {tag_again:6.2f} s")
    print(f"disk alone: create {args.images} files      {floor:6.2f} s   "
          "(a plain 1-thread loop on a twin tree; charfw tag writes with a thread per core)")
    base = naive(root)
    print(f"naive script (decodes every image)       {base:6.2f} s   ({base / (tag_first + toml):.1f}x slower)")

    print("\n== no-op rebuild of the example ==")
    ws = Path(tempfile.mkdtemp(prefix="charfw-ws-"))
    shutil.copytree(REPO / "characters", ws / "characters")
    first = run("build", "krnk", cwd=ws)
    noop = min(run("build", "krnk", cwd=ws) for _ in range(3))
    redo = run("build", "krnk", "--force", "--until", "dataset", cwd=ws)
    start = min(run("--version") for _ in range(3))
    print(f"first build of krnk                      {first:6.2f} s")
    print(f"no-op rebuild (best of 3)                {noop:6.2f} s   (target < 1.5 s)")
    print(f"  of which interpreter + imports         {start:6.2f} s   (charfw --version)")
    costs = min((noop_costs(ws, "krnk") for _ in range(3)), key=lambda c: c["run"])
    print(f"  of which the lint stage (in-process)   {costs.get('lint', 0.0):6.3f} s   (target: well under 1 s; "
          f"the whole no-op run {costs['run']:.3f} s, planning {costs['plan']:.3f} s)")
    print(f"  of which the report (in-process)       {costs.get('report', 0.0):6.3f} s   (report.html and index.html; "
          f"report + lint {costs.get('report', 0.0) + costs.get('lint', 0.0):.3f} s, target < 1 s)")
    print(f"redo the image and dataset stages        {redo:6.2f} s   (--force --until dataset)")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
