"""``charfw tags add|translate|report``: the seed's caption tools.

* ``add``: put a common tag (a style or trigger word) in every caption of a dataset,
  once: running it again changes nothing. In a build, use the ``common-tag`` tagger
  (:mod:`charfw.default_plugins.taggers.common_tag`) instead (``tag: [angle-rules,
  {plugin: common-tag, tags: [nasumiso style]}]``): it writes the build's captions, and
  the chain order decides where the tag goes.
* ``translate``: ``<stem>_jp.txt`` beside each caption, from the dictionary in
  ``templates/tags/ja.yaml`` (a workspace copy adds to it; ``--dictionary`` too).
* ``report``: how many captions hold each tag (text, CSV or JSON).

The tools work on caption files only; images are never opened. Folders of a manifest's
source images are refused: their captions are made by the build.
"""

from __future__ import annotations

from pathlib import Path

import click

import charfw
from charfw import CharfwError, console
from charfw.build import atomic
from charfw.cli import workspace_from
from charfw.default_plugins.taggers.common_tag import CommonTagOptions
from charfw.errors import display_path
from charfw.folders.caption_files import (
    add_common_tags,
    caption_paths,
    frequency_report,
    load_dictionary,
    tag_frequencies,
    write_japanese,
)


def _refuse_sources(ws, folders: tuple[Path, ...]) -> None:
    sources = ws.characters_dir.resolve()
    for folder in folders:
        try:
            folder.resolve().relative_to(sources)
        except ValueError:
            continue
        raise CharfwError(
            "this is inside the manifests' source folder; the build makes those captions",
            path=folder,
            hint="run it on a built dataset, or add the tag in the manifest: "
                 "tag: [angle-rules, {plugin: common-tag, tags: [...]}]",
        )


@charfw.hookimpl
def register_commands(cli):
    @cli.group("tags")
    def tags_group():
        """Caption-file tools: add a common tag, Japanese copies, tag counts."""

    @tags_group.command("add")
    @click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @click.option("-t", "--tag", "tags", multiple=True, required=True, metavar="TAG",
                  help="The tag to add (repeatable).")
    @click.option("--last", is_flag=True, help="Add at the end instead of the front.")
    @click.option("--dry-run", is_flag=True, help="Only say which files would change.")
    @click.pass_context
    def add(ctx, folders, tags, last, dry_run):
        """Add a common tag to every caption (.txt) under FOLDERS, once.

        Captions that already have it are left as they are, so running it twice is
        harmless. Japanese copies (*_jp.txt) are left out."""
        from pydantic import ValidationError


        try:
            tags = CommonTagOptions(tags=list(tags)).tags
        except ValidationError as exc:
            raise CharfwError(f"--tag: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        _refuse_sources(workspace_from(ctx), folders)
        paths = caption_paths(folders)
        report = add_common_tags(paths, tags, position="last" if last else "first", dry_run=dry_run)
        verb = "would change" if dry_run else "changed"
        console.out.print(f"{verb} {len(report.changed)} caption(s); {report.unchanged} already had "
                          f"{', '.join(tags)}", markup=False)

    @tags_group.command("translate")
    @click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @click.option("-d", "--dictionary", "dictionaries", multiple=True,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="More entries (a YAML file like templates/tags/ja.yaml; repeatable).")
    @click.option("--dry-run", is_flag=True, help="Only count what would be written.")
    @click.pass_context
    def translate(ctx, folders, dictionaries, dry_run):
        """Write <name>_jp.txt beside each caption, with the tags in Japanese.

        Tags not in the dictionary stay in English; the most frequent of them are listed
        so that they can be added to templates/tags/ja.yaml in the workspace."""

        ws = workspace_from(ctx)
        dictionary = load_dictionary(ws.templates, dictionaries)
        paths = caption_paths(folders)
        written, unknown = write_japanese(paths, dictionary, dry_run=dry_run)
        verb = "would write" if dry_run else "wrote"
        msg = f"{verb} {written} Japanese caption(s) for {len(paths)} caption(s); {len(dictionary)} dictionary entries"
        console.out.print(msg, markup=False)
        if unknown:
            top = ", ".join(f"{t} ({n})" for t, n in unknown.most_common(10))
            console.out.print(f"{len(unknown)} tag(s) not in the dictionary, most frequent: {top}", markup=False)

    @tags_group.command("report")
    @click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True)
    @click.option("--top", type=click.IntRange(1), help="Only the most frequent N tags.")
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
    def report(folders, fmt, top, output):
        """Count how many captions hold each tag."""

        paths = caption_paths(folders)
        text = frequency_report(tag_frequencies(paths), len(paths), fmt=fmt, top=top)
        if output is None:
            click.echo(text)
        else:
            atomic.write_text(output, text if text.endswith("\n") else text + "\n")
            console.out.print(f"wrote {display_path(output)}", markup=False)
