"""``report``: ``build/<target>/report.html`` and ``build/index.html`` after every build, and
``charfw report NAME [--open]``.

The pages come from :mod:`charfw.report`; this plugin only connects them to the build
(the ``build_finished`` hook, which also puts the report's path in the summary) and to
the command line. A workspace that wants another report replaces the templates in its
own ``templates/report/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

import charfw
from charfw import console
from charfw.errors import display_path

#: set to 0 (or off, false, no) to build without writing the report (scripts, CI; about 2 s
#: on a fresh build of the example); `charfw report` still writes it on demand
SWITCH = "CHARFW_REPORT"


def enabled() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() not in ("0", "off", "false", "no")


@charfw.hookimpl
def build_finished(summary):
    """Write the report of the targets just built. A page that cannot be written (a broken
    template of the workspace's own, a full disk) is a warning: the build's work is done."""
    if not enabled():
        return
    from charfw.build.stages import jobs_default
    from charfw.errors import CharfwError
    from charfw.report import write_reports

    try:
        paths = write_reports(summary.plan, summary.reports, seconds=summary.seconds, jobs=jobs_default())
    except (CharfwError, OSError) as exc:
        console.warn(f"the build report was not written: {exc}; then: charfw report {' '.join(summary.plan.targets)}")
        return
    for path in paths:
        summary.notes.append(f"report: {display_path(path)}")


@charfw.hookimpl
def register_commands(cli):
    @cli.command("report")
    @click.argument("targets", nargs=-1)
    @click.option("--open", "open_page", is_flag=True, help="Open the page in the web browser.")
    @click.pass_context
    def report(ctx: click.Context, targets: tuple[str, ...], open_page: bool) -> None:
        """Write the HTML report of characters and groups (all when none are named):
        build/NAME/report.html, and build/index.html linking them.

        A build writes it too; this command refreshes it from what is in build/ without
        running any stage, and --open shows it."""
        from charfw.build.plan import make_plan
        from charfw.build.stages import jobs_default
        from charfw.cli import workspace_from
        from charfw.report import write_reports

        ws = workspace_from(ctx)
        paths = write_reports(make_plan(ws, list(targets) or None), jobs=jobs_default())
        for path in paths:
            console.out.print(f"wrote {display_path(path)}", markup=False)
        if open_page:
            import webbrowser

            page = paths[0] if len(paths) == 1 else ws.build_dir / "index.html"
            if not webbrowser.open(Path(page).resolve().as_uri()):
                console.warn(f"no web browser found; open {display_path(page)} yourself")
