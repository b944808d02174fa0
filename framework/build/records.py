"""Records: what each stage depended on and produced, and how the engine decides to skip.

Every stage leaves ``build/<target>/<part>/<stage>/record.json``. Its fingerprint is
built from content, as named records (:func:`stage_key`): the stage, its plugin chain
(component, version, plugin, the plugin's version or source hash, options, the
component's ``cache_key``), the part fields the stage reads, and the output fingerprints
of the stages upstream (:func:`output_fingerprint`: the output record plus the content of
every file and folder it names). The same stage key is what per-image caches key on. A
stage whose fingerprint equals its record's and whose outputs are intact is skipped;
otherwise :func:`what_changed` says why it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from charfw.build import atomic
from charfw.build.hashing import HashCache, fingerprint
from charfw.build.items import to_record_path
from charfw.build.stages import StageSpec
from charfw.errors import CharfwError
from charfw.stage_context import ModelRefs, PartInfo, StageContext, StageOutput

if TYPE_CHECKING:
    from charfw.build.plan import PlannedStage, ResolvedPick

#: bump when the engine's record layout or generic stage behaviour changes
ENGINE_VERSION = "2"
RECORD_NAME = "record.json"


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


def write_record(stage_dir: Path, record: StageRecord) -> None:
    atomic.write_text(stage_dir / RECORD_NAME, json.dumps(record.model_dump(mode="json"), indent=1, ensure_ascii=False))


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
            "cache_key": r.component.cache_key(ctx, r.options),
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
    if ps.spec.gate:
        key["checks"] = {
            "strict": ctx.strict,
            "chains": {name: [[c.name, c.version, o.model_dump(mode="json")] for c, o in chain]
                       for name, chain in ctx.part_chains.items()},
            "keywords": [[p.label, p.keyword, p.class_tokens] for p in ctx.workspace_parts],
        }
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


def intact(ws_root: Path, output: StageOutput) -> bool:
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


def what_changed(old: StageRecord, key: dict[str, Any]) -> str:
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
    if old.key.get("checks") != key.get("checks"):
        return "settings of the part's other stages, keywords or --strict changed"
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


# --- one build at a time ------------------------------------------------------------------


class BuildLock:
    """One build at a time per workspace; a lock left by a dead process is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "build.lock"

    def __enter__(self) -> BuildLock:
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


# --- what a build finished -----------------------------------------------------------------

#: the stages whose record names a part's LoRA, the last one that ran being the finished one
LORA_STAGES = ("compress", "merge", "train")


def finished_loras(build_dir: Path, root: Path) -> dict[str, Path]:
    """The finished LoRA of every built part, by the names a prompt may use for it:
    ``<target>/<part>`` always, and the short name: the character's name for its face
    (``krnk``), the body's name for a body (``krnksf``), the group's name for a group.
    Read from the records of the last LoRA stage that ran (compress, else merge, else
    train); parts not built yet are left out."""
    found: dict[str, Path] = {}
    for part_dir in sorted(p for p in build_dir.glob("*/*") if p.is_dir() and not p.parent.name.startswith(".")):
        for stage in LORA_STAGES:
            record = read_record(part_dir / stage)
            lora = record.output.files.get("lora") if record is not None else None
            if lora is None:
                continue
            path = Path(lora) if os.path.isabs(lora) else root / lora
            if path.is_file():
                target, part = part_dir.parent.name, part_dir.name
                found[f"{target}/{part}"] = path
                found.setdefault(target if part in ("face", "group") else part, path)
            break
    return found
