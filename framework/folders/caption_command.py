"""One skeleton for the commands that caption training folders with a model-backed tagger
(``charfw wd14``, ``charfw caption``).

Such a command takes folders, ``-m/--model``, its tagger's own options, then
``--no-download``, ``--append``, ``--overwrite``, ``--dry-run`` and ``--strict``; it
validates the tagger's options, optionally chains other taggers before it, and writes the
captions with :func:`charfw.folders.caption_files.caption_folders` (whose models last for
the command and are released when it ends). A plugin calls :func:`caption_command` from
its ``register_commands`` hook with only what differs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from charfw.cli import workspace_from
from charfw.folders.caption_files import caption_folders

#: a click decorator (``click.option(...)``)
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def caption_command(
    cli: click.Group,
    name: str,
    tagger: str,
    *,
    help: str,
    model_help: str,
    append_help: str,
    options: Sequence[Decorator],
    tagger_options: Callable[[dict[str, Any]], dict[str, Any]],
    chain_before: Callable[[dict[str, Any]], Sequence[str]] = lambda params: (),
) -> click.Command:
    """Add ``charfw <name> FOLDERS...`` to ``cli``: caption the folders with the tagger
    registered as ``tagger``.

    ``model_help`` and ``append_help`` are the help of ``-m/--model`` and ``--append``;
    ``options`` are the command's own click options, in the order ``--help`` lists them
    (between ``-m/--model`` and ``--no-download``); ``tagger_options`` turns their values
    (by parameter name) into the tagger's options (``model`` and ``download`` are added
    here); ``chain_before`` names the taggers, with their default options, that run first.
    """

    def command(ctx: click.Context, folders: tuple[Path, ...], model: str | None, no_download: bool,
                append: bool, overwrite: bool, dry_run: bool, strict: bool, **params: Any) -> None:

        ws = workspace_from(ctx)
        raw = {**tagger_options(params), "download": not no_download}
        if model:
            raw["model"] = model
        registry = ws.plugins.registry
        component = registry.get("tagger", tagger)
        chain = [(component, component.Options.model_validate(raw))]
        before = [registry.get("tagger", n) for n in chain_before(params)]
        chain = [*((c, c.Options()) for c in before), *chain]
        caption_folders(ws, list(folders), chain, overwrite=overwrite, append=append, dry_run=dry_run,
                        strict=strict)

    decorators: list[Decorator] = [
        click.argument("folders", nargs=-1, required=True,
                       type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("-m", "--model", default=None, help=model_help),
        *options,
        click.option("--no-download", is_flag=True, help="Never download a model."),
        click.option("--append", is_flag=True, help=append_help),
        click.option("--overwrite", is_flag=True, help="Replace captions that differ."),
        click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing."),
        click.option("--strict", is_flag=True, help="Stop at the first unusable image (nothing is written)."),
        click.pass_context,
    ]
    callback: Callable[..., Any] = command
    for decorator in reversed(decorators):  # as if written top to bottom above the function
        callback = decorator(callback)
    return cli.command(name, help=inspect.cleandoc(help))(callback)
