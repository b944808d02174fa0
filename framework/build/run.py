"""Running a plan: each stage in order, skipped when its record says it is up to date.

A :class:`BuildRun` walks the plan once. For each stage it decides, in this order: off in
the manifest; blocked (an upstream stage is blocked, or its plugin is not installed);
outside ``--only``/``--until`` (its recorded output still feeds later stages); up to date
(same fingerprint, outputs intact); or run. A run gets a :class:`StageContext`, calls the
stage's runner, and writes the record. Models loaded by components live in one
:class:`ModelCache` for the whole build, cleared when it ends.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from charfw import __version__, console
from charfw.build import atomic
from charfw.build.hashing import HashCache, fingerprint
from charfw.build.plan import Plan, PlannedStage, workspace_parts
from charfw.build.records import (
    ENGINE_VERSION,
    BuildLock,
    StageRecord,
    intact,
    output_fingerprint,
    read_record,
    stage_key,
    what_changed,
    write_record,
)
from charfw.build.stages import STAGE_BY_NAME, STAGE_NAMES, jobs_default
from charfw.build.workspace import Workspace
from charfw.errors import CharfwError
from charfw.stage_context import ModelCache, PartInfo, StageContext, StageOutput


@dataclass
class StageReport:
    """What happened to one planned stage (passed to the ``stage_finished`` hook)."""

    stage: PlannedStage
    #: "ran", "up to date", "would run", "off", "blocked", "not selected"
    status: str
    reason: str = ""
    output: StageOutput | None = None
    seconds: float = 0.0


@dataclass
class BuildSummary:
    """What a build did (passed to the ``build_finished`` hook and printed by the CLI)."""

    plan: Plan
    reports: list[StageReport] = field(default_factory=list)
    #: one line per plugin that was missing, with the parts it stopped
    stopped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False
    #: lines ``build_finished`` hooks add for the end of the summary (the report's path)
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.reports if r.status == status)


@dataclass
class BuildOptions:
    force: bool = False
    only: str | None = None
    until: str | None = None
    dry_run: bool = False
    strict: bool = False
    jobs: int = field(default_factory=jobs_default)


class BuildRun:
    """One execution of a plan: the outputs and fingerprints of the stages done so far,
    which parts are blocked and why, the hash cache and the models of this build."""

    def __init__(self, plan: Plan, options: BuildOptions | None = None) -> None:
        self.plan = plan
        self.ws: Workspace = plan.workspace
        self.opts = options or BuildOptions()
        for name in (self.opts.only, self.opts.until):
            if name is not None and name not in STAGE_BY_NAME:
                raise CharfwError(f"unknown stage '{name}'; stages: {', '.join(STAGE_NAMES)}")
        self.until_index = STAGE_NAMES.index(self.opts.until) if self.opts.until else len(STAGE_NAMES)
        self.hash_cache = HashCache(self.ws.state_dir / "hash-cache.json")
        self.models = ModelCache()
        #: by stage key ("krnk/face:tag"): the output and its fingerprint
        self.outputs: dict[str, StageOutput] = {}
        self.fingerprints: dict[str, str] = {}
        #: stage key → why it (and what depends on it) cannot run
        self.blocked: dict[str, str] = {}
        #: missing-plugin message → the parts it stopped
        self.missing: dict[str, list[str]] = {}
        #: every character part of the workspace, read when a check stage first needs it
        self._workspace_parts: tuple[PartInfo, ...] | None = None

    def run(self) -> BuildSummary:
        """Carry out the plan; returns what happened (``summary.stopped`` names the stages a
        missing plugin stopped)."""
        opts = self.opts
        summary = BuildSummary(self.plan, dry_run=opts.dry_run)
        started = time.perf_counter()
        hook = self.ws.plugins.pm.hook
        self.preflight()
        lock = contextlib.nullcontext() if opts.dry_run else BuildLock(self.ws.state_dir)
        with lock:
            if not opts.dry_run:
                hook.build_started(plan=self.plan)
            try:
                for ps in self.plan.stages:
                    report = self.stage(ps)
                    summary.reports.append(report)
                    if report.output is not None:
                        summary.problems.extend(p for p in report.output.problems if p not in summary.problems)
                    if report.status in ("ran", "up to date") and not opts.dry_run:
                        hook.stage_finished(report=report)
            finally:
                self.hash_cache.save()
                self.models.clear()
                summary.seconds = time.perf_counter() - started
            for message, parts in self.missing.items():
                summary.stopped.append(f"{message}: stopped {', '.join(parts)} there")
            if not opts.dry_run:
                hook.build_finished(summary=summary)
        return summary

    def selected(self, ps: PlannedStage) -> bool:
        """Inside ``--until`` and ``--only``."""
        name = ps.spec.name
        return STAGE_NAMES.index(name) <= self.until_index and self.opts.only in (None, name)

    def preflight(self) -> None:
        """Run every selected stage's ``check()`` before any work starts, so that a missing
        folder, model file or library is reported before an hour of work, not after."""
        for ps in self.plan.stages:
            if ps.off or ps.missing is not None or not self.selected(ps):
                continue
            ctx = self.context(ps, {})
            for r in ps.chain:
                try:
                    r.component.check(ctx, r.options)
                except CharfwError as exc:
                    raise ps.locate(exc, r) from None

    def context(self, ps: PlannedStage, inputs: dict[str, StageOutput]) -> StageContext:
        checks: dict[str, Any] = {}
        if ps.spec.gate:  # a check of the part as a whole: the workspace's parts, and the chains
            # of the part's stages before it and of the one it guards (not of later stages:
            # a sample option must not re-run it)
            if self._workspace_parts is None:
                self._workspace_parts = workspace_parts(self.ws)
            last = STAGE_NAMES.index(ps.spec.name) + 1
            checks = {"workspace_parts": self._workspace_parts,
                      "part_chains": {s.spec.name: [(r.component, r.options) for r in s.chain]
                                      for s in self.plan.stages if s.part is ps.part and not s.off
                                      and not s.spec.side_branch and STAGE_NAMES.index(s.spec.name) <= last}}
        return StageContext(
            workspace_root=self.ws.root,
            part=ps.part,
            stage=ps.spec.name,
            stage_dir=ps.dir,
            inputs=inputs,
            cache_dir=self.ws.cache_dir,
            hash_cache=self.hash_cache,
            templates=self.ws.templates,
            strict=self.opts.strict,
            force=self.opts.force,
            jobs=self.opts.jobs,
            models=self.models,
            **checks,
        )

    # --- one stage -----------------------------------------------------------------------

    def stage(self, ps: PlannedStage) -> StageReport:
        spec, opts = ps.spec, self.opts
        if ps.off:
            return StageReport(ps, "off")
        # a stage outside --until / --only still hands its recorded output to later stages
        selected = self.selected(ps)
        for dep in ps.deps.values():
            if dep.key in self.blocked:
                self.blocked[ps.key] = self.blocked[dep.key]
                return StageReport(ps, "blocked" if selected else "not selected",
                                   f"needs {dep.part.label} {dep.spec.name}")
        if ps.missing is not None:
            self.blocked[ps.key] = ps.missing
            if selected:
                self.missing.setdefault(ps.missing, []).append(f"{ps.part.label} at '{spec.name}'")
            return StageReport(ps, "blocked" if selected else "not selected", ps.missing)
        record = read_record(ps.dir)
        if not selected:
            if record is not None:
                self.outputs[ps.key] = record.output
                self.fingerprints[ps.key] = record.output_fingerprint
            return StageReport(ps, "not selected", output=record.output if record else None)

        inputs: dict[str, StageOutput] = {}
        for key, dep in ps.deps.items():
            if dep.key not in self.outputs:
                if opts.dry_run:
                    return StageReport(ps, "would run", "after the stages before it run")
                raise CharfwError(
                    f"{ps.part.label}: '{spec.name}' needs the output of '{dep.spec.name}' for "
                    f"{dep.part.label}, which has not been built",
                    hint=f"build it first, e.g. charfw build {dep.part.target} --until {dep.spec.name}",
                )
            inputs[key] = self.outputs[dep.key]

        # the fingerprint: the stage key (chain, options, cache keys, part) and the inputs'
        ctx = self.context(ps, inputs)
        ctx.stage_key = stage_key(ps, ctx, self.ws.root)
        key = {**ctx.stage_key, "inputs": {k: self.fingerprints[d.key] for k, d in ps.deps.items()}}
        fp = fingerprint(ENGINE_VERSION, key)
        ctx.fingerprint = fp
        up_to_date = (
            record is not None
            and record.fingerprint == fp
            and record.engine == ENGINE_VERSION
            and intact(self.ws.root, record.output)
        )
        if up_to_date and not opts.force:
            assert record is not None
            if opts.strict and record.output.problems:
                # files an earlier build skipped stop a strict build as they would have then
                first, more = record.output.problems[0], len(record.output.problems) - 1
                raise CharfwError(f"{first}" + (f" (and {more} more skipped by an earlier build)" if more else
                                                " (skipped by an earlier build)"),
                                  hint="fix or remove it, or build without --strict")
            self.outputs[ps.key] = record.output
            self.fingerprints[ps.key] = record.output_fingerprint
            return StageReport(ps, "up to date", output=record.output)
        if record is None:
            reason = "not built yet"
        elif opts.force:
            reason = "--force"
        elif record.fingerprint == fp:
            reason = "outputs missing"
        else:
            reason = what_changed(record, key)
        if opts.dry_run:
            return StageReport(ps, "would run", reason)
        return self.execute(ps, ctx, key, reason)

    def execute(self, ps: PlannedStage, ctx: StageContext, key: dict, reason: str) -> StageReport:
        """Run the stage's runner and write its record."""
        spec = ps.spec
        ps.dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temps(ps.dir)
        atomic.remove_stale_temps(ps.dir.parent)
        console.info(f"{ps.part.label}: {spec.name} ({ps.plugin_names}): {reason}")
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        try:
            output = spec.runner(ctx, [(r.component, r.options) for r in ps.chain])
        except BaseException:
            _remove_empty_dirs(ps.dir, self.ws.build_dir)
            raise
        seconds = time.perf_counter() - t0
        out_fp = output_fingerprint(output, self.ws.root, self.hash_cache)
        write_record(ps.dir, StageRecord(
            engine=ENGINE_VERSION,
            charfw=__version__,
            stage=spec.name,
            part=ps.part.label,
            fingerprint=ctx.fingerprint,
            key=key,
            plugins=[
                {"name": r.component.name, "version": r.component.version, "plugin": r.plugin.name,
                 "plugin_version": r.plugin.version, "source": r.plugin.source}
                for r in ps.chain
            ],
            output=output,
            output_fingerprint=out_fp,
            started=started_at,
            seconds=round(seconds, 3),
        ))
        self.outputs[ps.key] = output
        self.fingerprints[ps.key] = out_fp
        return StageReport(ps, "ran", reason, output, seconds)


def _remove_empty_dirs(folder: Path, stop: Path) -> None:
    """After a failed stage: remove the folders it created but left empty, up to ``stop``."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def run_build(plan: Plan, options: BuildOptions | None = None) -> BuildSummary:
    """Carry out a plan; returns what happened."""
    return BuildRun(plan, options).run()
