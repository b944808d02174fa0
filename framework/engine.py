"""The build engine: manifests → a plan of stages → incremental execution with records.

Planning turns each character into parts (its face, then each body) and each group into
one part that depends on its members' images. Each part gets the stages of
:data:`charfw.stages.STAGES` that apply to it, each carried out by the plugin chain the
manifest picks (part-level choices override the character's, which override the
defaults), with options validated by that plugin's ``Options`` model.

Running walks the plan in order. Every stage writes into
``build/<target>/<part>/<stage>/`` and leaves a ``record.json``: what it depended on
(the content hashes of its inputs, its plugins, their versions and options, the part's
identity), what it produced, and how long it took. A stage whose fingerprint equals its
record's and whose outputs are intact is skipped. A stage whose plugin is not installed
stops its part (and whatever depends on it) with a message; everything else still runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from . import __version__, atomic, console
from .components import KINDS, Component
from .errors import BuildIncomplete, CharfwError, ManifestError
from .hashing import HashCache, fingerprint
from .items import to_record_path
from .manifest import CharacterManifest, GroupManifest, LoadedManifest, pydantic_messages
from .plugins import PluginInfo, PluginSystem
from .stage_context import ModelRefs, PartInfo, StageContext, StageOutput
from .stages import IMAGE_PARTS, STAGE_BY_NAME, STAGE_NAMES, STAGES, StageSpec, jobs_default
from .workspace import Workspace
from .yaml_lines import Loc

#: bump when the engine's record layout or generic stage behaviour changes
ENGINE_VERSION = "2"
RECORD_NAME = "record.json"


# --- parts -------------------------------------------------------------------------------


def _model_refs(lm: LoadedManifest, section: Any) -> ModelRefs:
    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = lm.base_dir / candidate
        return str(candidate.resolve()) if candidate.exists() else value

    return ModelRefs(resolve(section.base), resolve(section.vae), section.clip_skip, section.family)


def character_parts(ws: Workspace, lm: LoadedManifest) -> list[PartInfo]:
    m: CharacterManifest = lm.manifest  # type: ignore[assignment]
    model = _model_refs(lm, m.model)
    sets = ws.templates.angle_sets

    def angles(part: Any) -> tuple[str, ...]:
        codes = part.angles if part.angles is not None else sets[part.template].codes(m.symmetric)
        return tuple(c for c in codes if c not in set(part.exclude))

    face = PartInfo(
        target=m.name,
        name="face",
        kind="face",
        keyword=m.face.keyword or m.keyword,
        class_tokens=m.face.class_tokens or m.class_tokens or m.face.keyword or m.keyword,
        tags=tuple(m.face.tags),
        repeats=m.face.repeats or m.repeats,
        symmetric=m.symmetric,
        template=m.face.template,
        angles=angles(m.face),
        images_dir=(lm.base_dir / m.face.images).resolve(),
        model=model,
    )
    parts = [face]
    for name, body in m.bodies.items():
        parts.append(
            PartInfo(
                target=m.name,
                name=name,
                kind="body",
                keyword=body.keyword,
                class_tokens=body.class_tokens or body.keyword,
                tags=tuple(body.tags),
                repeats=body.repeats or m.repeats,
                symmetric=m.symmetric,
                template=body.template,
                angles=angles(body),
                images_dir=(lm.base_dir / body.images).resolve(),
                model=model,
                members=(face,),
            )
        )
    return parts


# --- stage choices -----------------------------------------------------------------------


@dataclass
class Pick:
    """One plugin a manifest picks for a stage, with its raw options and their locations."""

    name: str
    options: dict[str, Any]
    #: where each option key (and "" for the block itself) is written
    locs: dict[str, Loc]


@dataclass
class ResolvedPick:
    component: Component
    options: Any
    plugin: PluginInfo


def _parse_block(lm: LoadedManifest, spec: StageSpec, raw: Any, loc: Loc) -> list[Pick] | None:
    """A stage block → picks; None when the block switches the stage off."""

    def one(item: Any, where: Loc, allow_bare: bool) -> Pick:
        if isinstance(item, str):
            return Pick(item.strip(), {}, {"": where})
        if isinstance(item, dict):
            opts = dict(item)
            name = opts.pop("plugin", None)
            if name is not None and not isinstance(name, str):
                raise lm.error((*where, "plugin"), "expected a plugin name")
            if name is None and not allow_bare:
                raise lm.error(where, "each entry of a chain needs 'plugin: <name>'")
            locs = {k: (*where, k) for k in opts}
            locs[""] = (*where, "plugin") if name is not None else where
            return Pick(name or "", opts, locs)
        raise lm.error(where, "expected a plugin name, a mapping with 'plugin:' and options, or off")

    if raw is False or (isinstance(raw, str) and raw.strip().lower() in ("off", "none", "false")):
        if not spec.can_disable:
            raise lm.error(loc, f"the {spec.name} stage cannot be switched off")
        return None
    if raw is None or raw is True:
        raise lm.error(loc, "give a plugin name, a mapping with 'plugin:' and options, or off")
    if isinstance(raw, list):
        if not spec.chainable:
            raise lm.error(loc, f"the {spec.name} stage takes one plugin, not a list")
        if not raw:
            raise lm.error(loc, "an empty list; give at least one plugin")
        return [one(item, (*loc, i), False) for i, item in enumerate(raw)]
    return [one(raw, loc, True)]


def _combine(base: list[Pick] | None, over: list[Pick] | str | None) -> list[Pick] | None:
    """A part's block over its character's: options of the same plugin merge, else replace."""
    if over == "unset":
        return base
    if over is None or base is None:
        return over if over is not None else None  # type: ignore[return-value]
    assert isinstance(over, list)
    if len(over) == 1 and len(base) == 1 and over[0].name in ("", base[0].name):
        merged = {**base[0].options, **over[0].options}
        locs = {**base[0].locs, **{k: v for k, v in over[0].locs.items() if k}}
        return [Pick(base[0].name, merged, locs)]
    return over


def _picks_for(lm: LoadedManifest, spec: StageSpec, part_loc: Loc | None) -> list[Pick] | None:
    m = lm.manifest
    default = [Pick(spec.default, {}, {"": ()})] if spec.default else None
    picks: list[Pick] | str | None = "unset"
    if spec.name in m.stages:
        picks = _parse_block(lm, spec, m.stages[spec.name], ("stages", spec.name))
    current = _combine(default, picks)
    if part_loc is not None:
        part_stages = _part_stages(lm, part_loc)
        if part_stages is not None and spec.name in part_stages:
            over = _parse_block(lm, spec, part_stages[spec.name], (*part_loc, "stages", spec.name))
            current = _combine(current, over)
    if current is not None:
        for p in current:
            if not p.name:
                raise lm.error(p.locs[""], f"no plugin named for the {spec.name} stage and it has no default")
    return current


def _part_stages(lm: LoadedManifest, part_loc: Loc) -> dict[str, Any] | None:
    m: Any = lm.manifest
    if part_loc == ("face",):
        return m.face.stages
    if part_loc[0] == "bodies":
        return m.bodies[part_loc[1]].stages
    return None


def resolve_picks(
    lm: LoadedManifest, spec: StageSpec, picks: list[Pick], plugins: PluginSystem
) -> tuple[list[ResolvedPick], str | None]:
    """Look plugins up and validate their options. Returns (resolved, missing-message).

    A name close to a registered one is treated as a typo (a manifest error); a name that
    is not installed at all stops the build at this stage instead."""
    registry = plugins.registry
    noun = KINDS[spec.kind][2]
    resolved: list[ResolvedPick] = []
    problems: list[str] = []
    for pick in picks:
        reg = registry.find(spec.kind, pick.name)
        if reg is None:
            close = registry.suggestion(spec.kind, pick.name)
            if close is not None:
                problems.append(lm.problem(pick.locs[""], registry.unknown_message(spec.kind, pick.name)))
                continue
            if not pick.locs[""]:  # nothing in the manifest: the stage's default
                return [], f"the {noun} '{pick.name}' (the {spec.name} stage's default) is not installed"
            return [], lm.problem(pick.locs[""], f"the {noun} '{pick.name}' is not installed")
        try:
            options = reg.component.Options.model_validate(pick.options)
        except ValidationError as exc:
            for loc, msg in pydantic_messages(exc, reg.component.Options):
                key = str(loc[0]) if loc else ""
                base = pick.locs.get(key) or pick.locs[""]
                full = (*base, *loc[1:]) if key in pick.locs else (*base, *loc)
                problems.append(lm.problem(full, msg))
            continue
        resolved.append(ResolvedPick(reg.component, options, reg.plugin))
    if problems:
        raise ManifestError(problems)
    return resolved, None


# --- the plan ----------------------------------------------------------------------------


@dataclass(eq=False)
class PlannedStage:
    spec: StageSpec
    part: PartInfo
    dir: Path
    chain: list[ResolvedPick] = field(default_factory=list)
    #: why the stage cannot run (its plugin is not installed)
    missing: str | None = None
    #: off in the manifest: later stages read from the stage before it
    off: bool = False
    #: upstream stages by the key the stage's context knows them under
    deps: dict[str, PlannedStage] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.part.label}:{self.spec.name}"

    #: the plugin names the manifest asks for (shown even when one is missing)
    wanted: list[str] = field(default_factory=list)

    @property
    def plugin_names(self) -> str:
        if self.off:
            return "off"
        return " + ".join(self.wanted) or "-"


@dataclass
class Plan:
    workspace: Workspace
    targets: list[str]
    stages: list[PlannedStage]

    def parts(self) -> list[PartInfo]:
        seen: list[PartInfo] = []
        for s in self.stages:
            if s.part not in seen:
                seen.append(s.part)
        return seen


def make_plan(ws: Workspace, names: list[str] | None = None) -> Plan:
    """Plan the build of the named characters and groups (all manifests when None)."""
    plugins = ws.plugins
    loaded = [ws.load(n) for n in names] if names else ws.load_all()
    if not loaded:
        raise CharfwError(
            f"no manifests in {ws.characters_dir}", hint="create one with `charfw init NAME`"
        )
    part_stages: dict[str, list[PlannedStage]] = {}
    ordered: list[PlannedStage] = []
    problems: list[str] = []
    parts_of: dict[str, list[PartInfo]] = {}

    def plan_part(lm: LoadedManifest, part: PartInfo, part_loc: Loc | None) -> list[PlannedStage]:
        if part.label in part_stages:
            return part_stages[part.label]
        stages: list[PlannedStage] = []
        for spec in STAGES:
            if part.kind not in spec.parts:
                continue
            ps = PlannedStage(spec, part, ws.build_dir / part.target / part.name / spec.name)
            try:
                picks = _picks_for(lm, spec, part_loc)
                if picks is None:
                    ps.off = True
                else:
                    ps.wanted = [p.name for p in picks]
                    ps.chain, ps.missing = resolve_picks(lm, spec, picks, plugins)
            except ManifestError as exc:
                problems.extend(p for p in exc.problems if p not in problems)
            stages.append(ps)
        part_stages[part.label] = stages
        return stages

    def link(stages: list[PlannedStage], dataset_inputs: dict[str, PlannedStage]) -> None:
        previous: PlannedStage | None = None
        for ps in stages:
            if ps.spec.name == "dataset":
                ps.deps = dict(dataset_inputs)
            elif previous is not None:
                ps.deps = {previous.key: previous}
            if not ps.off:
                previous = ps

    def last_image_stage(label: str) -> PlannedStage:
        image_stages = [s for s in part_stages[label] if s.spec.parts == IMAGE_PARTS]
        return [s for s in image_stages if not s.off][-1]

    def dataset_inputs(part: PartInfo) -> dict[str, PlannedStage]:
        from .stages import dataset_parts

        return {p.label: last_image_stage(p.label) for p in dataset_parts(part)}

    def add(stages: list[PlannedStage]) -> None:
        for ps in stages:
            if ps not in ordered:
                ordered.append(ps)

    characters = [lm for lm in loaded if isinstance(lm.manifest, CharacterManifest)]
    groups = [lm for lm in loaded if isinstance(lm.manifest, GroupManifest)]

    def plan_character(lm: LoadedManifest) -> list[PartInfo]:
        if lm.name in parts_of:
            return parts_of[lm.name]
        parts = character_parts(ws, lm)
        for part in parts:
            loc: Loc = ("face",) if part.kind == "face" else ("bodies", part.name)
            plan_part(lm, part, loc)
        for part in parts:
            link(part_stages[part.label], dataset_inputs(part) if part.label in part_stages else {})
        parts_of[lm.name] = parts
        return parts

    for lm in characters:
        for part in plan_character(lm):
            add(part_stages[part.label])

    for lm in groups:
        g: GroupManifest = lm.manifest  # type: ignore[assignment]
        members: list[PartInfo] = []
        for i, ref in enumerate(g.members):
            char_name, body = ref.split("/")
            try:
                member_lm = ws.load(char_name)
            except CharfwError as exc:
                problems.append(lm.problem(("members", i), str(exc)))
                continue
            if not isinstance(member_lm.manifest, CharacterManifest):
                problems.append(lm.problem(("members", i), f"'{char_name}' is a group, not a character"))
                continue
            cparts = plan_character(member_lm)
            found = [p for p in cparts if p.kind == "body" and p.name == body]
            if not found:
                bodies = [p.name for p in cparts if p.kind == "body"]
                problems.append(lm.problem(("members", i), f"character '{char_name}' has no body '{body}'; "
                                           f"its bodies: {', '.join(bodies) or 'none'}"))
                continue
            members.append(found[0])
        if problems:
            continue
        first = members[0]
        model = _model_refs(lm, g.model) if g.model is not None else first.model
        part = PartInfo(target=g.name, name="group", kind="group", keyword=g.name, class_tokens=g.name,
                        repeats=1, symmetric=all(m.symmetric for m in members), model=model,
                        members=tuple(members))
        stages = plan_part(lm, part, None)
        link(stages, dataset_inputs(part))
        # the group needs its members' image stages, not their training
        for member in dataset_inputs(part).values():
            add(_closure(member))
        add(stages)

    if problems:
        raise ManifestError(problems)
    return Plan(ws, [lm.name for lm in loaded], ordered)


def _closure(stage: PlannedStage) -> list[PlannedStage]:
    out: list[PlannedStage] = []

    def visit(s: PlannedStage) -> None:
        for dep in s.deps.values():
            visit(dep)
        if s not in out:
            out.append(s)

    visit(stage)
    return out


# --- records -----------------------------------------------------------------------------


class StageRecord(BaseModel):
    """``record.json``: what a stage depended on and what it produced."""

    model_config = ConfigDict(extra="ignore")

    engine: str
    charfw: str
    stage: str
    part: str
    fingerprint: str
    #: the parts of the fingerprint, kept so that a rebuild can say what changed
    key: dict[str, Any]
    plugins: list[dict[str, str]]
    output: StageOutput
    output_fingerprint: str
    started: str
    seconds: float


def read_record(stage_dir: Path) -> StageRecord | None:
    try:
        return StageRecord.model_validate_json((stage_dir / RECORD_NAME).read_bytes())
    except (OSError, ValueError):
        return None


def chain_records(chain: list[ResolvedPick], ctx: StageContext) -> list[dict[str, Any]]:
    """What each component of a stage's chain contributes to its fingerprint, by name.

    ``plugin_version`` is the installed distribution's version for an entry-point plugin
    and ``file-<sha256>`` of the source for a workspace plugin file, so editing a plugin
    re-runs its stages even when the component's ``version`` was not bumped. Each
    component's ``cache_key()`` is called here, once per stage run."""
    return [
        {
            "component": r.component.name,
            "version": r.component.version,
            "plugin": r.plugin.name,
            "plugin_version": "" if r.plugin.source == "built-in" else r.plugin.version,
            "options": r.options.model_dump(mode="json"),
            "cache_key": r.component.cache_key(r.options, ctx),
        }
        for r in chain
    ]


def stage_key(ps: PlannedStage, ctx: StageContext, root: Path) -> dict[str, Any]:
    """Everything a stage's output depends on except its upstream outputs: the stage, its
    chain (plugins, versions, options, cache keys) and the part fields it reads. The engine
    adds the inputs' fingerprints; per-image caches key on this plus each image."""
    key: dict[str, Any] = {
        "stage": ps.spec.name,
        "chain": chain_records(ps.chain, ctx),
        "part": _part_key(ps.spec, ps.part, root),
    }
    if ps.spec.absolute_paths:
        key["location"] = ps.dir.as_posix()
    return key


def output_fingerprint(output: StageOutput, root: Path, hash_cache: HashCache) -> str:
    """The fingerprint later stages depend on: the output record (items carry their
    content hashes and tags) plus the content of every file and folder it names, so that
    a changed caption or image in a dataset folder re-runs training."""
    contents: dict[str, Any] = {}
    for path in [*output.files.values(), *output.folders.values()]:
        full = Path(path) if os.path.isabs(path) else root / path
        if full.is_dir():
            contents[path] = [
                [f.relative_to(full).as_posix(), hash_cache.sha256(f)]
                for f in sorted(full.rglob("*")) if f.is_file()
            ]
        elif full.is_file():
            contents[path] = hash_cache.sha256(full)
    return fingerprint(output.model_dump(mode="json", exclude={"summary"}), contents)


def _intact(ws_root: Path, output: StageOutput) -> bool:
    paths = [i.path for i in output.items or []] + list(output.files.values()) + list(output.folders.values())
    for p in paths:
        full = Path(p) if os.path.isabs(p) else ws_root / p
        if not full.exists():
            return False
    return True


def _part_key(spec: StageSpec, part: PartInfo, root: Path) -> dict[str, Any]:
    def norm(value: Any) -> Any:
        if isinstance(value, Path):
            return to_record_path(value, root)
        if isinstance(value, PartInfo):
            return {f.name: norm(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [norm(v) for v in value]
        if isinstance(value, ModelRefs):
            return dataclasses.asdict(value)
        return value

    return {f: norm(getattr(part, f)) for f in spec.part_fields}


def _what_changed(old: StageRecord, key: dict[str, Any]) -> str:
    """A short reason for re-running, from the differences between two fingerprints."""
    if old.engine != ENGINE_VERSION:
        return "charfw's engine changed"
    old_chain, new_chain = old.key.get("chain", []), key.get("chain", [])

    def column(chain: list[dict[str, Any]], *names: str) -> list[Any]:
        return [[c.get(n) for n in names] for c in chain]

    if column(old_chain, "component", "version", "plugin") != column(new_chain, "component", "version", "plugin"):
        return "plugin or plugin version changed"
    if column(old_chain, "plugin_version") != column(new_chain, "plugin_version"):
        return "plugin code changed"
    if column(old_chain, "options") != column(new_chain, "options"):
        return "options changed"
    if column(old_chain, "cache_key") != column(new_chain, "cache_key"):
        changed = _changed_files(old_chain, new_chain)
        return f"inputs changed ({changed})" if changed else "inputs changed"
    if old.key.get("part") != key.get("part"):
        old_part, new_part = old.key.get("part", {}), key.get("part", {})
        fields = sorted(k for k in new_part if old_part.get(k) != new_part.get(k))
        return f"manifest changed ({', '.join(fields)})"
    if old.key.get("inputs") != key.get("inputs"):
        return "upstream output changed"
    if old.key.get("location") != key.get("location"):
        return "the workspace moved"
    return "changed"


def _changed_files(old_chain: list[dict[str, Any]], new_chain: list[dict[str, Any]]) -> str:
    """Names of files whose hashes differ, when a cache key is a list of [name, sha256]."""
    names: list[str] = []
    for old, new in zip(old_chain, new_chain, strict=False):
        a, b = old.get("cache_key"), new.get("cache_key")
        if isinstance(a, list) and isinstance(b, list):
            try:
                da, db = dict(map(tuple, a)), dict(map(tuple, b))
            except (TypeError, ValueError):
                continue
            names += [n for n in sorted(set(da) | set(db)) if da.get(n) != db.get(n)]
    if not names:
        return ""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# --- running -----------------------------------------------------------------------------


@dataclass
class StageReport:
    stage: PlannedStage
    #: "ran", "up to date", "would run", "off", "blocked", "not selected"
    status: str
    reason: str = ""
    output: StageOutput | None = None
    seconds: float = 0.0


@dataclass
class BuildSummary:
    plan: Plan
    reports: list[StageReport] = field(default_factory=list)
    #: one line per plugin that was missing, with the parts it stopped
    stopped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False

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


class _Lock:
    """One build at a time per workspace; a lock left by a dead process is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "build.lock"

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise CharfwError(
                        f"another charfw build is running in this workspace (pid {pid})",
                        path=self.path,
                        hint="wait for it, or delete the lock file if that process is gone",
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise CharfwError("cannot take the build lock", path=self.path)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def run_build(plan: Plan, options: BuildOptions | None = None) -> BuildSummary:
    """Carry out a plan; returns what happened. Raises :class:`BuildIncomplete` (after the
    summary is filled) when a stage's plugin is missing."""
    opts = options or BuildOptions()
    ws = plan.workspace
    for name in (opts.only, opts.until):
        if name is not None and name not in STAGE_BY_NAME:
            raise CharfwError(f"unknown stage '{name}'; stages: {', '.join(STAGE_NAMES)}")
    until_index = STAGE_NAMES.index(opts.until) if opts.until else len(STAGE_NAMES)
    summary = BuildSummary(plan, dry_run=opts.dry_run)
    started = time.perf_counter()
    hash_cache = HashCache(ws.state_dir / "hash-cache.json")
    hook = ws.plugins.pm.hook
    outputs: dict[str, StageOutput] = {}
    fingerprints: dict[str, str] = {}
    blocked: dict[str, str] = {}
    missing: dict[str, list[str]] = {}

    _preflight(plan, opts, until_index, hash_cache)
    lock = contextlib.nullcontext() if opts.dry_run else _Lock(ws.state_dir)
    with lock:
        if not opts.dry_run:
            hook.build_started(plan=plan)
        try:
            for ps in plan.stages:
                report = _run_stage(ps, opts, until_index, ws, hash_cache, outputs, fingerprints, blocked, missing)
                summary.reports.append(report)
                if report.output is not None:
                    summary.problems.extend(p for p in report.output.problems if p not in summary.problems)
                if report.status in ("ran", "up to date") and not opts.dry_run:
                    hook.stage_finished(report=report)
        finally:
            hash_cache.save()
            summary.seconds = time.perf_counter() - started
        for message, parts in missing.items():
            summary.stopped.append(f"{message}: stopped {', '.join(parts)} there")
        if not opts.dry_run:
            hook.build_finished(summary=summary)
    return summary


def _preflight(plan: Plan, opts: BuildOptions, until_index: int, hash_cache: HashCache) -> None:
    """Run every selected stage's ``check()`` before any work starts, so that a missing
    folder, model file or library is reported before an hour of work, not after."""
    ws = plan.workspace
    for ps in plan.stages:
        if ps.off or ps.missing is not None:
            continue
        if STAGE_NAMES.index(ps.spec.name) > until_index or opts.only not in (None, ps.spec.name):
            continue
        ctx = _make_context(ws, ps, opts, hash_cache, {})
        for r in ps.chain:
            r.component.check(r.options, ctx)


def _make_context(ws: Workspace, ps: PlannedStage, opts: BuildOptions, hash_cache: HashCache,
                  inputs: dict[str, StageOutput]) -> StageContext:
    return StageContext(
        workspace_root=ws.root,
        part=ps.part,
        stage=ps.spec.name,
        stage_dir=ps.dir,
        inputs=inputs,
        cache_dir=ws.cache_dir,
        hash_cache=hash_cache,
        templates=ws.templates,
        strict=opts.strict,
        force=opts.force,
        jobs=opts.jobs,
    )


def _run_stage(
    ps: PlannedStage,
    opts: BuildOptions,
    until_index: int,
    ws: Workspace,
    hash_cache: HashCache,
    outputs: dict[str, StageOutput],
    fingerprints: dict[str, str],
    blocked: dict[str, str],
    missing: dict[str, list[str]],
) -> StageReport:
    spec = ps.spec
    if ps.off:
        return StageReport(ps, "off")
    # a stage outside --until / --only still hands its recorded output to later stages
    selected = STAGE_NAMES.index(spec.name) <= until_index and (opts.only in (None, spec.name))
    for dep in ps.deps.values():
        if dep.key in blocked:
            blocked[ps.key] = blocked[dep.key]
            status = "blocked" if selected else "not selected"
            return StageReport(ps, status, f"needs {dep.part.label} {dep.spec.name}")
    if ps.missing is not None:
        blocked[ps.key] = ps.missing
        if selected:
            missing.setdefault(ps.missing, []).append(f"{ps.part.label} at '{spec.name}'")
        return StageReport(ps, "blocked" if selected else "not selected", ps.missing)
    record = read_record(ps.dir)
    if not selected:
        if record is not None:
            outputs[ps.key] = record.output
            fingerprints[ps.key] = record.output_fingerprint
        return StageReport(ps, "not selected", output=record.output if record else None)

    inputs: dict[str, StageOutput] = {}
    for key, dep in ps.deps.items():
        if dep.key not in outputs:
            if opts.dry_run:
                return StageReport(ps, "would run", "after the stages before it run")
            raise CharfwError(
                f"{ps.part.label}: '{spec.name}' needs the output of '{dep.spec.name}' for "
                f"{dep.part.label}, which has not been built",
                hint=f"build it first, e.g. charfw build {dep.part.target} --until {dep.spec.name}",
            )
        inputs[key] = outputs[dep.key]

    ctx = _make_context(ws, ps, opts, hash_cache, inputs)
    ctx.stage_key = stage_key(ps, ctx, ws.root)
    key = {**ctx.stage_key, "inputs": {k: fingerprints[d.key] for k, d in ps.deps.items()}}
    fp = fingerprint(ENGINE_VERSION, key)
    ctx.fingerprint = fp
    up_to_date = (
        record is not None
        and record.fingerprint == fp
        and record.engine == ENGINE_VERSION
        and _intact(ws.root, record.output)
    )
    if up_to_date and not opts.force:
        assert record is not None
        outputs[ps.key] = record.output
        fingerprints[ps.key] = record.output_fingerprint
        return StageReport(ps, "up to date", output=record.output)
    if record is None:
        reason = "not built yet"
    elif opts.force:
        reason = "--force"
    elif record.fingerprint == fp:
        reason = "outputs missing"
    else:
        reason = _what_changed(record, key)
    if opts.dry_run:
        return StageReport(ps, "would run", reason)

    ps.dir.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(ps.dir)
    atomic.remove_stale_temps(ps.dir.parent)
    console.info(f"{ps.part.label}: {spec.name} ({ps.plugin_names}): {reason}")
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    chain = [(r.component, r.options) for r in ps.chain]
    try:
        output = spec.runner(ctx, chain)
    except BaseException:
        _remove_empty_dirs(ps.dir, ws.build_dir)
        raise
    seconds = time.perf_counter() - t0
    out_fp = output_fingerprint(output, ws.root, hash_cache)
    rec = StageRecord(
        engine=ENGINE_VERSION,
        charfw=__version__,
        stage=spec.name,
        part=ps.part.label,
        fingerprint=fp,
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
    )
    atomic.write_text(ps.dir / RECORD_NAME, json.dumps(rec.model_dump(mode="json"), indent=1, ensure_ascii=False))
    outputs[ps.key] = output
    fingerprints[ps.key] = out_fp
    return StageReport(ps, "ran", reason, output, seconds)


def _remove_empty_dirs(folder: Path, stop: Path) -> None:
    """After a failed stage: remove the folders it created but left empty, up to ``stop``."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


class BuildStopped(BuildIncomplete):
    """Raised by :func:`build` when a stage's plugin was missing; carries the summary."""

    def __init__(self, summary: BuildSummary) -> None:
        super().__init__("\n".join(summary.stopped))
        self.summary = summary


def build(ws: Workspace, names: list[str] | None, options: BuildOptions | None = None) -> BuildSummary:
    """Plan and run; raise :class:`BuildStopped` if a stage's plugin was missing."""
    plan = make_plan(ws, names)
    summary = run_build(plan, options)
    if summary.stopped and not (options and options.dry_run):
        raise BuildStopped(summary)
    return summary
