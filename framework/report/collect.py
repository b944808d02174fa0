"""What the report shows of one part, read from the build's records and files.

Each section is read from what the stages left in ``build/<target>/<part>/``: the image
stages' records (the angle sheet), ``lint/findings.json``, the dataset config, the
trainer's TensorBoard events and sample images, the LoRA files of ``train``, ``merge``
and ``compress``, the ``sample`` stage's grid, and every stage's record (timings). A
section whose stage has not run is None; one that cannot be read becomes a line in
``errors`` instead of stopping the report. Slow facts (events, ‖ΔW‖ per block, the
trainer's view of the dataset) go through :class:`~charfw.report.store.ReportStore`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from charfw.build.angles import VERTICAL_NAMES
from charfw.build.hashing import fingerprint
from charfw.build.items import ImageItem, from_record_path
from charfw.build.plan import PlannedStage
from charfw.build.records import StageRecord, read_record
from charfw.components import color_name
from charfw.errors import CharfwError
from charfw.report import charts
from charfw.report.store import ReportStore
from charfw.stage_context import PartInfo

IMAGE_STAGES = ("tag", "prepare", "background", "filter", "ingest")
LORA_STAGES = ("train", "merge", "compress")
LORA_LABELS = {"train": "trained", "merge": "block-merged", "compress": "compressed"}
SEVERITIES = ("error", "warning", "info")
SHORT_TURNS = {0: "front", 1: "front ¾", 2: "side", 3: "rear ¾", 4: "behind", 5: "rear ¾ (other side)",
               6: "side (other side)", 7: "front ¾ (other side)"}
SAMPLE_NAME = re.compile(r"_(\d+)_(\d+)_(\d+)$")


class PartReport:
    """The sections of one part's report."""

    def __init__(self, part: PartInfo, stages: list[PlannedStage], store: ReportStore, root: Path,
                 statuses: dict[str, dict[str, Any]], angle_sets: dict[str, Any]) -> None:
        self.part = part
        self.stages = {ps.spec.name: ps for ps in stages}
        self.store = store
        self.root = root
        self.statuses = statuses
        self.angle_sets = angle_sets
        self.records: dict[str, StageRecord] = {}
        for name, ps in self.stages.items():
            if not ps.off and (record := read_record(ps.dir)) is not None:
                self.records[name] = record
        self.errors: list[str] = []
        self.part_dir = store.target_dir / part.name
        #: lint findings by angle code, for the angle sheet's cells
        self.flags: dict[str, list[str]] = {}

    def path(self, text: str) -> Path:
        return from_record_path(text, self.root)

    def section(self, name: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except (CharfwError, OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            self.errors.append(f"{name}: {exc}")
            return None

    def data(self) -> dict[str, Any]:
        part = self.part
        lint = self.section("lint findings", self.lint)  # first: the angle sheet flags its codes
        out = {
            "label": part.label, "name": part.name, "kind": part.kind, "keyword": part.keyword,
            "class_tokens": part.class_tokens, "anchor": f"part-{part.name}",
            "members": self.section("members", self.members) if part.kind == "group" else [],
            "angles": self.section("angle sheet", self.angle_sheet),
            "lint": lint,
            "dataset": self.section("dataset", self.dataset),
            "training": self.section("training", self.training),
            "lora": self.section("LoRA", self.lora),
            "samples": self.section("samples", self.samples),
            "stages": self.stage_table(),
        }
        out["errors"] = self.errors
        return out

    # --- the angle sheet -------------------------------------------------------------------

    def image_record(self) -> StageRecord | None:
        for name in IMAGE_STAGES:
            record = self.records.get(name)
            if record is not None and record.output.items is not None:
                return record
        return None

    def angle_sheet(self) -> dict[str, Any] | None:
        part = self.part
        record = self.image_record()
        if part.template is None or record is None:
            return None
        angle_set = self.angle_sets[part.template]
        items = record.output.items or []
        common = [t for t in items[0].tags if all(t in i.tags for i in items)] if items else []
        by_code: dict[str, list[ImageItem]] = {}
        for item in items:
            by_code.setdefault(item.code or "", []).append(item)
        template_codes = angle_set.codes(part.symmetric)
        columns = angle_set.horizontal.symmetric if part.symmetric else angle_set.horizontal.full
        rows = []
        for v in angle_set.vertical:
            cells = []
            for h in columns:
                code = f"{angle_set.prefix}{v}{h}"
                found = by_code.get(code, [])
                state = "ok" if found else ("missing" if code in part.angles else "excluded")
                cells.append({"code": code, "state": state, "images": [self.image(i, common) for i in found],
                              "flags": self.flags.get(code, [])})
            rows.append({"label": VERTICAL_NAMES[v], "cells": cells})
        outside = [self.image(i, common) for code, found in by_code.items() if code not in template_codes
                   for i in found]
        duplicates = []
        for code in template_codes:
            sources = sorted({Path(i.source).name for i in by_code.get(code, [])})
            if len(sources) > 1:
                duplicates.append({"code": code, "sources": sources})
        present = sum(1 for r in rows for c in r["cells"] if c["state"] == "ok")
        return {
            "template": angle_set.name, "stage": record.stage, "symmetric": part.symmetric,
            "columns": [SHORT_TURNS[h] for h in columns], "rows": rows, "common_tags": common,
            "outside": outside, "duplicates": duplicates, "images": len(items),
            "present": present, "expected": len(part.angles), "cells": len(template_codes),
            "missing": [c["code"] for r in rows for c in r["cells"] if c["state"] == "missing"],
            "excluded": [c["code"] for r in rows for c in r["cells"] if c["state"] == "excluded"],
        }

    def image(self, item: ImageItem, common: list[str]) -> dict[str, Any]:
        return {
            "id": item.id, "code": item.code or "-", "source": Path(item.source).name,
            "thumb": self.store.thumbnail(self.path(item.path), item.sha256),
            "href": self.store.href(self.path(item.path)),
            "size": f"{item.width}×{item.height}",
            "background": color_name(item.background) if item.background else None,
            "caption": ", ".join(item.tags),
            "own_tags": [t for t in item.tags if t not in common],
        }

    def members(self) -> list[dict[str, Any]]:
        """A group's members, each with its front image (or its first) and image count."""
        out = []
        for member in self.part.members:
            member_dir = self.store.target_dir.parent / member.target / member.name
            items = next((r.output.items for name in IMAGE_STAGES
                          if (r := read_record(member_dir / name)) is not None and r.output.items), [])
            front = next((i for i in items if i.code and i.code.endswith("00")), items[0] if items else None)
            out.append({"label": member.label, "target": member.target, "name": member.name,
                        "images": len(items), "keyword": member.keyword,
                        "thumb": self.store.thumbnail(self.path(front.path), front.sha256) if front else None})
        return out

    # --- lint --------------------------------------------------------------------------

    def lint(self) -> dict[str, Any] | None:
        path = self.part_dir / "lint" / "findings.json"
        if not path.is_file():
            return None
        findings = json.loads(path.read_text("utf-8"))
        if not isinstance(findings, list):
            raise ValueError(f"{path.name} is not a list of findings")
        rows = []
        for f in findings:
            if not isinstance(f, dict):
                continue
            severity = str(f.get("severity") or "info").lower()
            rows.append({"check": f.get("check") or "", "severity": severity, "message": f.get("message") or "",
                         "file": f.get("file") or "", "code": f.get("code") or ""})
        rank = {s: i for i, s in enumerate(SEVERITIES)}
        rows.sort(key=lambda r: (rank.get(r["severity"], len(SEVERITIES)), r["check"], r["code"], r["file"]))
        counts = {s: sum(1 for r in rows if r["severity"] == s) for s in SEVERITIES}
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            group = groups.setdefault((r["severity"], r["check"]), {
                "severity": r["severity"], "check": r["check"], "findings": [], "codes": []})
            group["findings"].append(r)
            if r["code"] and r["code"] not in group["codes"]:
                group["codes"].append(r["code"])
        for r in rows:
            if r["code"]:
                self.flags.setdefault(r["code"], []).append(f"{r['severity']}: {r['check']}: {r['message']}")
        return {"findings": rows, "groups": list(groups.values()), "counts": counts, "path": self.store.href(path)}

    # --- the dataset -------------------------------------------------------------------

    def dataset(self) -> dict[str, Any] | None:
        record = self.records.get("dataset")
        if record is None or "config" not in record.output.files:
            return None
        config = self.path(record.output.files["config"])
        facts = self.store.facts(f"{self.part.name}/dataset", record.output_fingerprint, lambda: _dataset_facts(config))
        accumulation = int(self.train_option("gradient_accumulation_steps") or 1)
        batches = facts["batches_per_epoch"]
        train = self.records.get("train")
        return {
            **facts,
            "toml": config.read_text("utf-8"),
            "config": self.store.href(config),
            "accumulation": accumulation,
            "steps_per_epoch": max(1, math.ceil(batches / accumulation)) if batches else 0,
            "epochs": train.output.data.get("epochs") if train else None,
            "total_steps": train.output.data.get("steps") if train else None,
        }

    def train_option(self, name: str) -> Any:
        record = self.records.get("train")
        for link in (record.key.get("chain", []) if record else []):
            if name in link.get("options", {}):
                return link["options"][name]
        return None

    # --- training ----------------------------------------------------------------------

    def training(self) -> dict[str, Any] | None:
        record = self.records.get("train")
        if record is None:
            return None
        stage_dir = self.stages["train"].dir
        name = record.output.data.get("name")
        logs = stage_dir / "logs"
        run_dir = logs / name if name and (logs / name).is_dir() else logs
        events = sorted(run_dir.rglob("events.out.tfevents.*")) if run_dir.is_dir() else []
        out: dict[str, Any] = {"steps": record.output.data.get("steps"), "seconds": record.seconds,
                               "name": name, "chart": None, "step_seconds": None, "final_loss": None,
                               "samples": self.training_samples(stage_dir / "samples")}
        if not events:
            return out
        stats = [(f.relative_to(run_dir).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in events]
        key = [record.fingerprint, stats]
        facts = self.store.facts(f"{self.part.name}/events", key, lambda: _read_events(run_dir))
        if facts["loss"]:
            out["chart"] = self.store.chart(f"{self.part.name}-training", key, lambda dest: charts.training_chart(
                dest, facts["loss"], {k: v for k, v in facts["lrs"].items() if v}))
            out["final_loss"] = charts.smooth([v for _, v in facts["loss"]])[-1]
        out["step_seconds"] = facts["step_seconds"]
        out["loss_tag"] = facts["loss_tag"]
        return out

    def training_samples(self, folder: Path) -> list[dict[str, Any]]:
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.png")):
            m = SAMPLE_NAME.search(path.stem)
            st = path.stat()
            out.append({"thumb": self.store.thumbnail(path, fingerprint(path.name, st.st_size, st.st_mtime_ns)),
                        "href": self.store.href(path),
                        "step": int(m[1]) if m else None, "index": int(m[2]) if m else None,
                        "seed": int(m[3]) if m else None, "name": path.name})
        out.sort(key=lambda s: (s["step"] or 0, s["index"] or 0, s["name"]))
        return out

    # --- the LoRA files ----------------------------------------------------------------

    def lora(self) -> dict[str, Any] | None:
        files = []
        for stage in LORA_STAGES:
            record = self.records.get(stage)
            if record is None or "lora" not in record.output.files:
                continue
            path = self.path(record.output.files["lora"])
            if not path.is_file():
                continue
            facts = self.store.facts(f"{self.part.name}/{stage}-blocks", record.output_fingerprint,
                                     lambda path=path: _block_facts(path))
            files.append({"stage": stage, "label": LORA_LABELS[stage], "path": path, "name": path.name,
                          "href": self.store.href(path), "bytes": path.stat().st_size, "facts": facts})
        if not files:
            return None
        from charfw.lora.block_weights import BLOCKS20, BLOCKS26, LAYOUTS, layout_family
        from charfw.lora.outputs import human_size

        family = files[0]["facts"]["family"]
        vector: dict[str, float] | None = None
        merge = self.records.get("merge")
        preset = None
        if merge is not None and "weights" in merge.output.data:
            weights = merge.output.data["weights"]
            names = LAYOUTS[layout_family(merge.output.data.get("family", family))][len(weights)]
            vector = dict(zip(names, weights, strict=True))
            preset = merge.output.data.get("preset")
        order = [*(BLOCKS20 if family == "sdxl" else BLOCKS26), "(none)"]
        used = set(vector or {}) | {b for f in files for b in f["facts"]["norms"]}
        blocks = [b for b in order if b in used]
        norms = {f["label"]: [f["facts"]["norms"].get(b) for b in blocks] for f in files}
        key = [[f["stage"], f["facts"]] for f in files] + [vector]
        compressed = next((f for f in files if f["stage"] == "compress"), None)
        before = next((f for f in reversed(files) if f["stage"] != "compress"), None)
        ranks = retained = None
        if compressed is not None:
            ranks = [compressed["facts"]["ranks"].get(b) for b in blocks]
            retained = [_ratio(compressed["facts"]["norms"].get(b), before["facts"]["norms"].get(b)) if before else None
                        for b in blocks]
        return {
            "files": [{"stage": f["stage"], "label": f["label"], "name": f["name"], "href": f["href"],
                       "size": human_size(f["bytes"]), "modules": f["facts"]["modules"],
                       "ranks": f["facts"]["rank_range"]} for f in files],
            "preset": preset,
            "chart": self.store.chart(f"{self.part.name}-lora", key, lambda dest: charts.lora_chart(
                dest, blocks, norms, [vector.get(b) for b in blocks] if vector else None, ranks, retained)),
            "retained": self.records["compress"].output.data.get("fro_retained") if compressed else None,
        }

    # --- samples -----------------------------------------------------------------------

    def samples(self) -> dict[str, Any] | None:
        record = self.records.get("sample")
        if record is None or "grid" not in record.output.files:
            return None
        grid = self.path(record.output.files["grid"])
        return {"grid": self.store.thumbnail(grid, record.output_fingerprint, size=1600),
                "href": self.store.href(grid), "empty": record.output.data.get("empty") or [],
                "summary": record.output.summary}

    # --- stages ------------------------------------------------------------------------

    def stage_table(self) -> dict[str, Any]:
        rows = []
        ran = reused = 0.0
        for name, ps in self.stages.items():
            record = self.records.get(name)
            status = self.statuses.get(ps.key, {})
            state = status.get("status") or ("off" if ps.off else "built" if record else "not built")
            seconds = status.get("seconds") if state == "ran" else None
            if state == "ran":
                ran += seconds or 0.0
            elif state == "up to date" and record is not None:
                reused += record.seconds
            rows.append({"stage": name, "plugin": ps.plugin_names, "status": state,
                         "reason": status.get("reason") or "", "seconds": seconds,
                         "recorded": record.seconds if record else None,
                         "started": record.started.replace("T", " ").replace("+00:00", " UTC") if record else "",
                         "summary": record.output.summary if record else []})
        longest = max([r["seconds"] or r["recorded"] or 0.0 for r in rows] + [1e-9])
        for r in rows:
            r["bar"] = round(100 * (r["seconds"] or r["recorded"] or 0.0) / longest, 1)
        return {"rows": rows, "ran_seconds": ran, "reused_seconds": reused,
                "reused": sum(1 for r in rows if r["status"] == "up to date"),
                "ran": sum(1 for r in rows if r["status"] == "ran")}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _dataset_facts(config: Path) -> dict[str, Any]:
    """The trainer's own reading of the dataset config: datasets, subsets, buckets, batches."""
    from charfw.training.dataset import TrainingData

    data = TrainingData.load(config)
    data.finalize()
    datasets = []
    for block in data.blocks:
        entries = [e for e in data.entries if e.subset.dataset == block.index]
        buckets: dict[str, int] = {}
        for e in entries:
            key = f"{e.bucket[0]}×{e.bucket[1]}"
            buckets[key] = buckets.get(key, 0) + e.repeats
        datasets.append({
            "resolution": "×".join(str(v) for v in block.buckets.resolution),
            "batch_size": block.batch_size,
            "buckets": buckets,
            "batches": sum(math.ceil(n / block.batch_size) for n in buckets.values()),
            "subsets": [{
                "dir": s.image_dir.name, "parent": s.image_dir.parent.name, "images": s.image_count,
                "repeats": s.num_repeats, "flip": s.flip_aug, "color_aug": s.color_aug, "is_reg": s.is_reg,
                "class_tokens": s.class_tokens or "", "samples": s.image_count * s.num_repeats,
            } for s in block.subsets],
        })
    return {"datasets": datasets, "images": len(data.entries), "samples_per_epoch": data.num_train_images,
            "batches_per_epoch": data.batches_per_epoch(), "warnings": list(data.warnings)}


def _read_events(run_dir: Path) -> dict[str, Any]:
    """Loss and learning-rate series from the run's TensorBoard event files (the last value
    of a step wins, as after a resume), and the median wall time per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for tag in tags:
        by_step: dict[int, tuple[float, float]] = {}
        for ev in acc.Scalars(tag):
            by_step[int(ev.step)] = (float(ev.wall_time), float(ev.value))
        series[tag] = by_step
    loss_tags = [t for t in tags if t.startswith("loss")]
    loss_tag = "loss/current" if "loss/current" in series else (loss_tags[0] if loss_tags else None)
    loss = sorted(series.get(loss_tag, {}).items()) if loss_tag else []
    times = [b[1][0] - a[1][0] for a, b in itertools.pairwise(loss) if b[0] == a[0] + 1 and b[1][0] > a[1][0]]
    return {
        "loss_tag": loss_tag,
        "loss": [[s, v] for s, (_, v) in loss if math.isfinite(v)],
        "lrs": {t.split("/", 1)[-1]: [[s, v] for s, (_, v) in sorted(series[t].items())]
                for t in tags if t.startswith("lr")},
        "step_seconds": statistics.median(times) if times else None,
    }


def _block_facts(path: Path) -> dict[str, Any]:
    """‖ΔW‖ (Frobenius, scale included) and rank range per LBW block of one LoRA file."""
    from charfw.lora.block_weights import block_of
    from charfw.lora.file import read_lora
    from charfw.lora.svd import delta_norm

    lora = read_lora(path)
    squares: dict[str, float] = {}
    ranks: dict[str, list[int]] = {}
    for m in lora.modules.values():
        block = block_of(m.name) or "(none)"
        squares[block] = squares.get(block, 0.0) + delta_norm(m) ** 2
        if m.rank is not None:
            ranks.setdefault(block, []).append(m.rank)
    all_ranks = [r for rs in ranks.values() for r in rs]
    return {
        "family": lora.family, "modules": len(lora.modules),
        "norms": {b: math.sqrt(v) for b, v in squares.items()},
        "ranks": {b: [min(rs), statistics.median(rs), max(rs)] for b, rs in ranks.items()},
        "rank_range": f"{min(all_ranks)}–{max(all_ranks)}" if all_ranks and min(all_ranks) != max(all_ranks)
        else (str(all_ranks[0]) if all_ranks else "-"),
    }
