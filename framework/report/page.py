"""Writing the pages: a target's ``report.html`` and the workspace's ``index.html``.

The pages are rendered from ``templates/report/*.html.j2`` (a workspace's own
``templates/report/`` files replace them, as for every template), with autoescaping on.
What the last build did to each stage (ran, up to date, off, blocked) is kept in
``.report/last-build.json``, so that ``charfw report`` shows it again later.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw import __version__
from charfw.build import atomic
from charfw.errors import CharfwError
from charfw.report.collect import PartReport
from charfw.report.store import FOLDER, ReportStore

if TYPE_CHECKING:
    from charfw.build.plan import Plan
    from charfw.build.run import StageReport
    from charfw.build.workspace import Workspace

REPORT_NAME = "report.html"
INDEX_NAME = "index.html"
LAST_BUILD = "last-build.json"
ENTRY = "entry.json"


def write_reports(plan: Plan, reports: list[StageReport] | None = None, *, seconds: float | None = None,
                  jobs: int = 1) -> list[Path]:
    """The report of every target of ``plan``, then the index; returns the report paths.
    ``reports`` (what a build just did) are kept for later ``charfw report`` runs."""
    env = _environment(plan.workspace)
    written = [write_report(plan, target, reports, seconds=seconds, jobs=jobs, env=env) for target in plan.targets]
    write_index(plan.workspace, env=env)
    return written


def write_report(plan: Plan, target: str, reports: list[StageReport] | None = None, *,
                 seconds: float | None = None, jobs: int = 1, env: Any = None) -> Path:
    ws = plan.workspace
    target_dir = ws.build_dir / target
    store = ReportStore(target_dir, jobs)
    build = _last_build(store, plan, target, reports, seconds)
    parts = [p for p in plan.parts() if p.target == target]
    data = [
        PartReport(p, [ps for ps in plan.stages if ps.part.label == p.label], store, ws.root, build["stages"],
                   ws.templates.angle_sets).data()
        for p in parts
    ]
    store.make_thumbnails()
    manifest = ws.load(target).manifest
    kind = "group" if parts and parts[0].kind == "group" else "character"
    page = {
        "name": target, "kind": kind, "description": getattr(manifest, "description", "") or "",
        "parts": data, "build": build, "version": __version__,
        "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "index": f"../{INDEX_NAME}",
        "lint_known": any(p["lint"] is not None for p in data),
    }
    path = target_dir / REPORT_NAME
    env = env or _environment(ws)
    atomic.write_text(path, _render(env, "report/report.html.j2", page))
    atomic.write_json(store.dir / ENTRY, _entry(page, target))
    store.finish()
    return path


def write_index(ws: Workspace, *, env: Any = None) -> Path:
    """``build/index.html``: every character and group of the workspace, with its report."""
    names = {p.stem for p in ws.manifest_paths()}
    if ws.build_dir.is_dir():
        names |= {d.name for d in ws.build_dir.iterdir() if (d / REPORT_NAME).is_file()}
    entries = []
    for name in sorted(names):
        entry = {"name": name, "kind": None, "description": "", "report": None, "cover": None, "parts": [],
                 "built": None}
        try:
            saved = json.loads((ws.build_dir / name / FOLDER / ENTRY).read_text("utf-8"))
            entry.update(saved if isinstance(saved, dict) else {})
        except (OSError, ValueError):
            pass
        if entry.get("report") and not (ws.build_dir / entry["report"]).is_file():
            entry["report"] = None
        entries.append(entry)
    page = {"entries": entries, "version": __version__, "workspace": ws.root.name,
            "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    path = ws.build_dir / INDEX_NAME
    env = env or _environment(ws)
    atomic.write_text(path, _render(env, "report/index.html.j2", page))
    return path


def _last_build(store: ReportStore, plan: Plan, target: str, reports: list[StageReport] | None,
                seconds: float | None) -> dict[str, Any]:
    """What the last build did to each stage of the target: from ``reports`` when a build
    just ran (and saved), else as saved by the last one."""
    path = store.dir / LAST_BUILD
    if reports is None:
        try:
            saved = json.loads(path.read_text("utf-8"))
            if isinstance(saved.get("stages"), dict):
                return saved
        except (OSError, ValueError, AttributeError):
            pass
        return {"finished": None, "seconds": None, "stages": {}}
    stages = {
        r.stage.key: {"status": r.status, "reason": r.reason, "seconds": round(r.seconds, 3)}
        for r in reports if r.stage.part.target == target
    }
    build = {"finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "seconds": round(seconds, 3) if seconds is not None else None, "stages": stages}
    atomic.write_json(path, build)
    return build


def _entry(page: dict[str, Any], target: str) -> dict[str, Any]:
    """What the index shows of a target."""
    cover = None
    parts = []
    for part in page["parts"]:
        sheet = part["angles"]
        if cover is None and part["members"]:
            cover = next((m["thumb"] for m in part["members"] if m["thumb"]), None)
        if cover is None and sheet:
            cover = next((img["thumb"] for row in sheet["rows"] for cell in row["cells"]
                          for img in cell["images"] if img["thumb"]), None)
        lora = part["lora"]["files"][-1] if part["lora"] else None
        parts.append({"name": part["name"], "kind": part["kind"],
                      "angles": f"{sheet['present']}/{sheet['expected']}" if sheet else None,
                      "lora": lora["name"] if lora else None, "size": lora["size"] if lora else None,
                      "lint": part["lint"]["counts"] if part["lint"] else None})
        if cover is None and part["samples"] and part["samples"]["grid"]:
            cover = part["samples"]["grid"]
    return {"name": target, "kind": page["kind"], "description": page["description"],
            "report": f"{target}/{REPORT_NAME}", "cover": f"{target}/{cover}" if cover else None,
            "parts": parts, "built": page["build"]["finished"]}


def _render(env: Any, name: str, page: dict[str, Any]) -> str:
    """The page from template ``name``; a template error (a workspace's own template) is a
    one-line error naming the file and line."""
    import jinja2

    try:
        return env.get_template(name).render(page=page)
    except jinja2.TemplateSyntaxError as exc:
        raise CharfwError(f"template error: {exc.message}", path=exc.filename, line=exc.lineno) from None
    except jinja2.TemplateError as exc:
        raise CharfwError(f"template '{name}': {exc}", hint="compare it with charfw's own in templates/report/") from None


def _environment(ws: Workspace) -> Any:
    """The templates' environment, HTML-escaped. Compiled templates (keyed by their source)
    are kept in the user's charfw cache, else in ``build/.cache/jinja``: compiling the
    page's template costs more than rendering it."""
    import jinja2

    from charfw.build.workspace import user_cache_dir

    env = ws.templates.environment(autoescape=True)
    for folder in (user_cache_dir() / "jinja", ws.cache_dir / "jinja"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            env.bytecode_cache = jinja2.FileSystemBytecodeCache(str(folder))
            break
    env.filters["seconds"] = _seconds
    return env


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 0.05:
        return "<0.1 s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
