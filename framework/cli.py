"""The ``charfw`` command line.

Errors a user can fix print as one line and exit with :class:`~charfw.errors.ExitCode`;
anything else keeps its traceback. Plugins add commands through ``register_commands``.
Heavy libraries are never imported here, so ``charfw --help`` and a no-op build start fast.
The entry point is a dispatcher: each command imports the layer it drives (the build
engine, the folder tools) when it runs, so ``charfw --version`` or a shell completion
loads neither.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__, console
from .errors import CharfwError, ExitCode, display_path

HELP = """Turn character manifests into character LoRAs: face → body → group.

\b
Quick start:
  charfw init mychar          write characters/mychar.yaml and its image folders
  charfw build mychar         ingest → background → prepare → tag → dataset → lint → train → merge → compress
  charfw tag DIR...           captions beside images, from folder and file names
  charfw toml DIR...          a kohya dataset config from folders
  charfw plugins              what is installed, and what each plugin registers
"""


class CharfwGroup(click.Group):
    """Adds the commands the workspace's plugins register when a command is first looked
    up (a name registered twice is an error naming both plugins). Run in-process for
    another workspace, it swaps them for that workspace's plugins' commands."""

    #: charfw's own commands, before any plugin added one
    _own_commands: dict[str, click.Command] | None = None
    #: the plugin system whose commands are added now
    _commands_of: Any = None

    def _load_plugin_commands(self, ctx: click.Context) -> None:
        system = workspace_from(ctx).plugins
        if system is self._commands_of:
            return
        if self._own_commands is None:
            self._own_commands = dict(self.commands)
        self.commands = dict(self._own_commands)
        self._commands_of = None
        system.add_commands(self)
        self._commands_of = system

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --help is handled while the options are parsed, before -C is: look for the
        # workspace options first so that `charfw -C ws --help` lists ws's plugin commands
        ctx.meta["charfw.early"] = _early_options(args)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands(ctx)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if self._commands_of is None and cmd_name not in self.commands:
            # one built-in plugin's command: import that plugin alone (when no other is installed)
            from .plugins import builtin_command, plugins_folder

            root, plugins_dir = _workspace_args(ctx)
            command = builtin_command(cmd_name, plugins_folder(root.resolve(), plugins_dir))
            if command is not None:
                return command
        self._load_plugin_commands(ctx)
        return super().get_command(ctx, cmd_name)


def _early_options(args: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    names = {"-C": "workspace", "--workspace": "workspace", "--plugins-dir": "plugins_dir"}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            break  # the command name: options after it are the command's
        key, _, value = arg.partition("=")
        if key in names:
            if not value and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            found[names[key]] = value
        i += 1
    return found


def _workspace_args(ctx: click.Context) -> tuple[Path, Path | None]:
    """The workspace folder and ``--plugins-dir`` the command line gives (or the defaults)."""
    root = ctx.find_root()
    params = {**root.meta.get("charfw.early", {}), **{k: v for k, v in root.params.items() if v is not None}}
    folder = params.get("workspace") or os.environ.get("CHARFW_WORKSPACE") or "."
    plugins_dir = params.get("plugins_dir")
    return Path(folder), Path(plugins_dir) if plugins_dir else None


def templates_from(ctx: click.Context):  # -> TemplateLibrary
    """The workspace's template library, without opening the workspace (its manifests'
    models) when nothing else did: what a command that only reads templates needs."""
    from charfw.build.template_library import WORKSPACE_FOLDER, TemplateLibrary

    obj = ctx.find_root().obj
    if isinstance(obj, dict) and "workspace" in obj:
        return obj["workspace"].templates
    folder, _ = _workspace_args(ctx)
    return TemplateLibrary(folder.resolve() / WORKSPACE_FOLDER)


def workspace_from(ctx: click.Context):  # -> Workspace
    from charfw.build.workspace import Workspace

    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    if "workspace" not in obj:
        folder, plugins_dir = _workspace_args(ctx)
        obj["workspace"] = Workspace(folder, plugins_dir=plugins_dir)
        root.obj = obj
    return obj["workspace"]


@click.group(cls=CharfwGroup, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-C", "--workspace", type=click.Path(file_okay=False, path_type=Path),
              help="The workspace folder (default: $CHARFW_WORKSPACE or the current folder).")
@click.option("--plugins-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Load one-off plugin files from here (default: <workspace>/plugins).")
@click.version_option(__version__, prog_name="charfw")
def cli(workspace: Path | None, plugins_dir: Path | None) -> None:
    pass


# --- build -------------------------------------------------------------------------------


def _stage_choice(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from charfw.build.stages import STAGE_NAMES

    if value is not None and value not in STAGE_NAMES:
        raise click.BadParameter(f"unknown stage '{value}'; stages: {', '.join(STAGE_NAMES)}")
    return value


@cli.command()
@click.argument("targets", nargs=-1)
@click.option("--force", is_flag=True, help="Re-run every stage, ignoring records and caches.")
@click.option("--only", metavar="STAGE", callback=_stage_choice, help="Run only this stage (earlier ones must have been built).")
@click.option("--until", metavar="STAGE", callback=_stage_choice, help="Stop after this stage.")
@click.option("--dry-run", is_flag=True, help="Print the plan and what would run; change nothing.")
@click.option("--strict", is_flag=True, help="Stop at the first unusable source file instead of skipping it, "
              "and before training on any lint finding.")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None, help="Worker threads for image stages.")
@click.pass_context
def build(ctx: click.Context, targets: tuple[str, ...], force: bool, only: str | None, until: str | None,
          dry_run: bool, strict: bool, jobs: int | None) -> None:
    """Build characters and groups (all manifests in characters/ when none are named).

    Every stage writes into build/<target>/<part>/<stage>/ with a record; unchanged
    stages are skipped, so running the same build again does nothing."""
    from charfw.build.plan import make_plan
    from charfw.build.run import BuildOptions, run_build
    from charfw.build.stages import jobs_default

    ws = workspace_from(ctx)
    plan = make_plan(ws, list(targets) or None)
    opts = BuildOptions(force=force, only=only, until=until, dry_run=dry_run, strict=strict,
                        jobs=jobs or jobs_default())
    summary = run_build(plan, opts)
    print_summary(summary)
    if summary.stopped and not dry_run:
        ctx.exit(ExitCode.INCOMPLETE)


_STATUS_STYLE = {
    "ran": "green",
    "up to date": "dim",
    "would run": "yellow",
    "off": "dim",
    "blocked": "red",
    "not selected": "dim",
}


def print_summary(summary: Any) -> None:
    """Per part, one line per stage (status, plugin, what it produced), then problems."""
    from rich.text import Text

    out = console.out
    width = max((len(r.stage.spec.name) for r in summary.reports), default=8)
    last_part = None
    for report in summary.reports:
        ps = report.stage
        if ps.part.label != last_part:
            last_part = ps.part.label
            out.print(Text(ps.part.label, style="bold"))
            for note in summary.plan.notes.get(ps.part.label, []):
                out.print(Text(f"  {note}", style="dim"), highlight=False)
        status = report.status + (f" {report.seconds:.1f}s" if report.status == "ran" else "")
        if summary.dry_run or report.status in ("blocked", "would run", "not selected", "off"):
            details = [report.reason] if report.reason else []
        else:
            details = list(report.output.summary) if report.output is not None else []
        line = Text(f"  {ps.spec.name:<{width}}  ")
        line.append(f"{status:<14}", style=_STATUS_STYLE.get(report.status, ""))
        line.append(f" {ps.plugin_names:<13}")
        if details:
            line.append(f"  {details[0]}")
        out.print(line)
        for extra in details[1:]:
            out.print(" " * (width + 33) + extra, markup=False, highlight=False)
    if summary.problems:
        out.print(Text(f"\nskipped {len(summary.problems)} file(s):", style="yellow"))
        for line in summary.problems:
            out.print(f"  {line}", markup=False)
    if summary.stopped:
        out.print(Text("\nstopped:", style="bold red"))
        for line in summary.stopped:
            out.print(f"  {line}", markup=False)
        out.print("  install a plugin that provides it, switch the stage off in the manifest "
                  "(e.g. `merge: off`), or stop before it with --until STAGE", markup=False)
    ran = summary.count("ran")
    fresh = summary.count("up to date")
    if summary.dry_run:
        would = summary.count("would run")
        out.print(f"\ndry run: {would} stage(s) would run, {fresh} up to date.")
    elif ran == 0 and not summary.stopped:
        out.print(f"\nNothing to do: all {fresh} stages are up to date ({summary.seconds:.1f} s).")
    else:
        out.print(f"\n{ran} stage(s) ran, {fresh} up to date, in {summary.seconds:.1f} s. "
                  f"Outputs are under {display_path(summary.plan.workspace.build_dir)}/.")
    for note in summary.notes:
        out.print(note, markup=False, highlight=False)


# --- init --------------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@click.option("--keyword", help="The face keyword (default: NAME).")
@click.option("--class-tokens", help="kohya class tokens (default: '<keyword> girl').")
@click.option("--body", "bodies", multiple=True, metavar="NAME", help="Add a body part (repeatable).")
@click.option("--asymmetric", is_flag=True, help="Angles 0-7 and no flip augmentation.")
@click.pass_context
def init(ctx: click.Context, name: str, keyword: str | None, class_tokens: str | None,
         bodies: tuple[str, ...], asymmetric: bool) -> None:
    """Start a character: characters/NAME.yaml and folders for its images."""
    import re

    from charfw.build import atomic
    from charfw.build.manifest import NAME_HINT, NAME_PATTERN

    ws = workspace_from(ctx)
    for n in (name, *bodies):
        if not re.match(NAME_PATTERN, n):
            raise CharfwError(f"'{n}' is not a valid name", hint=NAME_HINT)
    path = ws.characters_dir / f"{name}.yaml"
    if path.exists():
        raise CharfwError("already exists", path=path, hint="edit it, or pick another name")
    keyword = keyword or name
    class_tokens = class_tokens or f"{keyword} girl"
    from charfw.build.manifest import body_identity
    from charfw.training.model_sources import first_run_model

    machine = first_run_model()  # a manifest that builds here: the tiny model / AdamW where needed
    body_rows = [dict(zip(("keyword", "class_tokens"), body_identity(keyword, class_tokens, b), strict=True), name=b)
                 for b in bodies]
    text = ws.templates.render(
        "manifest/character.yaml.j2",
        name=name, keyword=keyword, class_tokens=class_tokens, bodies=body_rows, symmetric=not asymmetric,
        charfw_version=__version__, base=machine.base, optimizer=machine.optimizer, lacks=machine.lacks,
    )
    from charfw.build.manifest import load_manifest  # check what we are about to write

    atomic.write_text(path, text)
    try:
        load_manifest(path, ws.templates.angle_sets)
    except CharfwError:
        path.unlink()
        raise
    folders = [ws.characters_dir / name / "face"] + [ws.characters_dir / name / b for b in bodies]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    console.out.print(f"wrote {display_path(path)}", markup=False)
    for folder in folders:
        console.out.print(f"made  {display_path(folder)}/", markup=False)
    face = ws.templates.angle_sets["face"].codes(not asymmetric)
    console.out.print(
        f"\nNext: put {face[0]}.png … {face[-1]}.png in {display_path(folders[0])}/ "
        f"(and b00.png … in the body folders), then run: charfw build {name}", markup=False)


# --- tag ---------------------------------------------------------------------------------


def _tagger_chain(ws: Any, names: tuple[str, ...]) -> list[tuple[Any, Any]]:
    registry = ws.plugins.registry
    chain = []
    for name in names:
        component = registry.get("tagger", name)
        chain.append((component, component.Options()))
    return chain


@cli.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tagger", "taggers", multiple=True, default=("angle-rules",), show_default=True,
              help="Tagger to use (repeat to chain several).")
@click.option("--overwrite", is_flag=True, help="Replace captions that differ from the generated ones.")
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
@click.option("--strict", is_flag=True, help="Stop at the first unusable file (nothing is written).")
@click.pass_context
def tag(ctx: click.Context, folders: tuple[Path, ...], taggers: tuple[str, ...], overwrite: bool,
        dry_run: bool, strict: bool) -> None:
    """Write caption .txt files beside the images of training folders.

    Tags come from the folder name (keyword, class tokens, extra tags) and each file's
    angle code. Images are never touched. Several folders, or a parent folder such as
    4_krnk, can be given at once."""
    from charfw.folders.caption_files import caption_folders

    ws = workspace_from(ctx)
    caption_folders(ws, list(folders), _tagger_chain(ws, taggers), overwrite=overwrite, dry_run=dry_run,
                    strict=strict, kept_hint="use --overwrite to replace them")


# --- toml --------------------------------------------------------------------------------


@cli.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write (default: <parent>/<parent name>.toml when the folders share a parent).")
@click.option("--dry-run", is_flag=True, help="Print the config on stdout; write nothing.")
@click.option("--writer", default="kohya-toml", show_default=True, help="Dataset-config writer.")
@click.option("--batch-sizes", metavar="TABLE", help="Batch-size table: default, 12gb (templates/kohya/batch-sizes.yaml).")
@click.option("--family", type=click.Choice(["sd1", "sdxl", "sd35"]),
              help="Whose dataset rules apply (default sd1: 512/768/1024; sdxl and sd35: 1024/1536/2048).")
@click.option("--base-model", metavar="MODEL", help="Take the family from this base model's files instead.")
@click.option("--relative", is_flag=True, help="Write image_dir relative to the current folder instead of absolute.")
@click.pass_context
def toml(ctx: click.Context, folders: tuple[Path, ...], output: Path | None, dry_run: bool, writer: str,
         batch_sizes: str | None, family: str | None, base_model: str | None, relative: bool) -> None:
    """Write a kohya dataset config (TOML) for training folders.

    Resolution and batch size come from the image sizes (headers only), class tokens
    from the folder names, num_repeats from <N>_ parent folders, flip from _flip_/_noflip_.
    The resolution classes and batch tables are the model family's (--family, or the
    family of --base-model)."""
    from charfw.build import atomic
    from charfw.folders.convention import dataset_spec_for_folders, expand_folders, folder_context

    ws = workspace_from(ctx)
    component = ws.plugins.registry.get("dataset_writer", writer)
    raw: dict[str, Any] = {"batch_sizes": batch_sizes} if batch_sizes else {}
    if base_model:
        from charfw.training.families.detect import detect_family
        from charfw.training.model_sources import resolve_source

        found = detect_family(resolve_source(base_model, cache_dir=ws.cache_dir), declared=family).require_trained()
        console.info(f"model family {found.describe()}")
        family = found.name
    if family:
        raw["family"] = family
    from pydantic import ValidationError

    try:
        options = component.Options.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = str(first["loc"][0]).replace("_", "-") if first["loc"] else "batch-sizes"
        raise CharfwError(f"--{option}: {first['msg']}", hint=f"the {writer} writer may not take it") from None
    dirs = expand_folders(list(folders))
    from charfw.build.stages import jobs_default

    spec, problems = dataset_spec_for_folders(dirs, relative_to=Path.cwd() if relative else None,
                                              jobs=jobs_default())
    for line in problems:
        console.warn(line)
    if not spec.subsets:  # type: ignore[attr-defined]
        raise CharfwError("no readable images in the given folders")
    if output is None:
        parents = {d.resolve().parent for d in dirs}
        if len(parents) == 1:
            parent = parents.pop()
            output = parent / f"{parent.name}.toml"
        else:
            output = Path("dataset.toml")
    # the writer runs outside a build: its context is the folder the config goes to
    writer_ctx = folder_context(ws, output.resolve().parent, stage="dataset", jobs=jobs_default())
    try:
        text = component.render(writer_ctx, options, spec)
    finally:
        writer_ctx.models.clear()
    if dry_run:
        click.echo(text, nl=False)
        return
    atomic.write_text(output, text)
    console.out.print(f"wrote {display_path(output)} ({len(spec.subsets)} subsets)", markup=False)  # type: ignore[attr-defined]


# --- plugins -----------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--options", "show_options", is_flag=True, help="Also list each component's options.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool, show_options: bool) -> None:
    """List every loaded plugin and what it registers: hooks, commands, components."""
    from .components import KINDS

    ws = workspace_from(ctx)
    system = ws.plugins
    rows = []
    for info in system.infos.values():
        registered = {}
        for kind, names in info.registered.items():
            registered[kind] = []
            for n in names:
                comp = system.registry.get(kind, n)
                entry: dict[str, Any] = {"name": n, "version": comp.version, "description": comp.description}
                if show_options or as_json:
                    entry["options"] = _options_doc(comp.Options)
                registered[kind].append(entry)
        rows.append({"name": info.name, "source": info.source, "version": info.version,
                     "hooks": info.hooks, "commands": list(info.commands), "registers": registered})
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for row in rows:
        console.out.print(f"[bold]{row['name']}[/bold]  [dim]{row['source']}, {row['version']}[/dim]")
        console.out.print(f"  hooks: {', '.join(row['hooks']) or '-'}", markup=False)
        console.out.print(f"  commands: {', '.join(row['commands']) or '-'}", markup=False)
        for kind, entries in row["registers"].items():
            noun = KINDS[kind][2]
            for e in entries:
                console.out.print(f"  {noun}: {e['name']} (v{e['version']}) {e['description']}", markup=False)
                for opt in e.get("options", []) if show_options else []:
                    console.out.print(f"      {opt['name']}: {opt['type']} = {opt['default']}", markup=False)


def _options_doc(model: Any) -> list[dict[str, Any]]:
    out = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        out.append({"name": name, "type": getattr(field.annotation, "__name__", str(field.annotation)),
                    "default": json.loads(json.dumps(default, default=str)),
                    "description": field.description or ""})
    return out


# --- entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the command line; exit with a :class:`ExitCode`."""
    console.reset_once()
    console.silence_harmless_notices()
    try:
        rv = cli.main(args=argv, prog_name="charfw", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        console.error("interrupted; run the same command again to resume")
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.USAGE_ERROR if isinstance(exc, click.UsageError) else ExitCode.INPUT_ERROR)
    except CharfwError as exc:
        console.error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.error("interrupted; run the same command again to resume")
        sys.exit(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        sys.exit(ExitCode.OK)
    except OSError as exc:  # the file system refused: a full disk, a folder where a file goes, ...
        error = CharfwError(f"{exc.strerror or exc} (nothing half-written was left)",
                            path=exc.filename2 if exc.filename2 is not None else exc.filename,
                            hint="free the path or the disk space, then run the same command again")
        console.error(str(error))
        sys.exit(error.exit_code)
    sys.exit(int(rv or 0))
