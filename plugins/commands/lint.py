"""``charfw lint [NAME...]``: the lint stage's findings, without training.

It builds the named characters and groups (all when none are named) up to the ``lint``
stage, exactly as ``charfw build --until lint`` would (what is up to date is reused, and
``charfw build`` reuses what it made), then lists every part's findings with the file
each is about. They are also in ``build/<name>/<part>/lint/findings.json``.

Exit status: 0 when there are no errors (warnings are listed); 1 when a finding is an
error, or with ``--strict`` when there is any finding (as linters do); 4 when a part's
lint stage could not run (a plugin is missing); 3 for bad input, as every command.
``charfw build --strict`` stops before training on the same findings.
"""

from __future__ import annotations

import json

import click
from rich.text import Text

import charfw
from charfw import console
from charfw.cli import workspace_from
from charfw.errors import ExitCode

#: the exit status when lint finds errors (or anything, with --strict)
FINDINGS_EXIT = 1
_STYLE = {"error": "bold red", "warning": "yellow"}


@charfw.hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command("lint")
    @click.argument("targets", nargs=-1)
    @click.option("--strict", is_flag=True, help="Exit with 1 on warnings too (charfw build --strict stops on them).")
    @click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON, by part.")
    @click.pass_context
    def lint(ctx: click.Context, targets: tuple[str, ...], strict: bool, as_json: bool) -> None:
        """Check characters' images, captions and training settings before training.

        Builds the stages up to lint (reusing what is built), then lists each finding with
        its file. Exit 1 on errors, or on any finding with --strict."""
        from charfw.build.plan import make_plan
        from charfw.build.run import BuildOptions, run_build

        ws = workspace_from(ctx)
        summary = run_build(make_plan(ws, list(targets) or None), BuildOptions(until="lint"))
        by_part: dict[str, list[dict]] = {}
        blocked = []
        for report in summary.reports:
            if report.stage.spec.name != "lint" or report.status == "off":
                continue
            if report.output is None or report.status not in ("ran", "up to date"):
                blocked.append(f"{report.stage.part.label}: {report.reason or report.status}")
                continue
            by_part[report.stage.part.label] = list(report.output.data.get("findings", []))
        if as_json:
            click.echo(json.dumps(by_part, indent=1, ensure_ascii=False))
        else:
            show(by_part, summary.problems)
        for line in blocked:
            console.warn(f"not linted: {line}")
        found = [f for fs in by_part.values() for f in fs]
        if any(f["severity"] == "error" for f in found) or (strict and found):
            ctx.exit(FINDINGS_EXIT)
        if blocked:
            ctx.exit(ExitCode.INCOMPLETE)


def show(by_part: dict[str, list[dict]], problems: list[str]) -> None:
    """Per part, one line per finding (severity, check, file or code, message), then totals."""
    out = console.out
    for label, findings in by_part.items():
        out.print(Text(label, style="bold") + (Text("  no findings", style="green") if not findings else Text("")))
        for f in findings:
            where = f["file"] or f["code"]
            line = Text("  ") + Text(f"{f['severity']:<8}", style=_STYLE[f["severity"]]) + Text(f"{f['check']}  ")
            if where:
                line.append(f"{where}: ", style="cyan")
            out.print(line + Text(f["message"]))
    for line in problems:
        out.print(Text("skipped: ", style="yellow") + Text(line))
    found = [f for fs in by_part.values() for f in fs]
    errors = sum(1 for f in found if f["severity"] == "error")
    if found:
        out.print(f"\n{errors} error(s), {len(found) - errors} warning(s) in {len(by_part)} part(s)")
    else:
        out.print(f"\nno findings in {len(by_part)} part(s)")
