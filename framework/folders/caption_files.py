"""Caption files of a dataset: writing them from taggers, a common tag, Japanese copies, tag counts.

These are the seed's caption tools (add_common_tag, generate_jp_tags) and the folder
side of the model-backed taggers (``charfw wd14``, ``charfw caption``), kept apart from
the command line so that the build and the tests use the same code.

Rules they share:

* A caption is ``<image stem>.txt`` next to its image; its tags are separated by commas.
* Writes are atomic and idempotent: running a tool twice changes nothing the second
  time (a common tag already present is not added again).
* Japanese copies are ``<stem>_jp.txt``. They are never read as captions (kohya would
  not pick them up either: they have no image of that name) and tools skip them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charfw import console
from charfw.build import atomic
from charfw.build.stages import jobs_default
from charfw.build.template_library import read_yaml_file
from charfw.errors import CharfwError, display_path, read_text
from charfw.folders.convention import CaptionWriter, expand_folders, plan_captions, write_captions
from charfw.folders.tag_text import join_caption, split_caption, tag_key, unique_tags
from charfw.stage_context import ModelCache

CAPTION_SUFFIX = ".txt"
JAPANESE_SUFFIX = "_jp.txt"


# --- captions from taggers (charfw wd14, charfw caption) ---------------------------------


def caption_folders(ws: Any, folders: Sequence[Path], chain: list[tuple[Any, Any]], *, overwrite: bool,
                    append: bool = False, dry_run: bool = False, strict: bool = False,
                    kept_hint: str = "use --overwrite or --append") -> list[Any]:
    """Run a tagger chain over image folders and write ``.txt`` captions beside the images
    (``charfw tag``, ``charfw wd14``, ``charfw caption``): new captions are written,
    differing ones kept unless ``overwrite``; ``append`` adds the new tags after the
    existing ones. Each folder is written while the next one is planned, except with
    ``strict`` (nothing is written when a file is unusable) or ``dry_run``. The taggers'
    models are loaded once for all the folders and released before this returns."""

    def appended(changes: list[Any]) -> list[Any]:
        for change in changes if append else []:
            if change.old is not None and change.status == "changed":
                merged = join_caption(unique_tags([*split_caption(change.old), *split_caption(change.text)]))
                change.text = merged
                change.status = "unchanged" if merged == change.old.strip() else "changed"
        return changes

    dirs = expand_folders(list(folders))
    models = ModelCache()  # the command's: one load per model for every folder
    try:
        if dry_run or strict:
            changes, problems = plan_captions(ws, dirs, chain, strict=strict, jobs=jobs_default(), models=models)
            appended(changes)
            if dry_run:
                for c in changes:
                    if c.status in ("new", "changed"):
                        console.out.print(f"{c.status:9} {display_path(c.path)}: {c.text}", markup=False)
            else:
                write_captions(changes, overwrite=overwrite or append, jobs=jobs_default())
        else:
            with CaptionWriter(overwrite=overwrite or append, jobs=jobs_default()) as writer:
                changes, problems = plan_captions(ws, dirs, chain, strict=False, jobs=jobs_default(), models=models,
                                                  on_folder=lambda folder: writer.submit(appended(folder)))
    finally:
        models.clear()
    counts = {s: sum(1 for c in changes if c.status == s) for s in ("new", "changed", "unchanged", "kept")}
    verb = "would write" if dry_run else "wrote"
    written = counts["new"] + (counts["changed"] if (overwrite or append or dry_run) else 0)
    msg = f"{verb} {written} caption(s) in {len(dirs)} folder(s); {counts['unchanged']} unchanged"
    if counts["kept"]:
        msg += f"; kept {counts['kept']} that differ ({kept_hint})"
    if problems:
        msg += f"; skipped {len(problems)} file(s)"
    console.out.print(msg, markup=False)
    return changes


# --- finding caption files ---------------------------------------------------------------


def caption_paths(folders: Iterable[Path], *, recursive: bool = True) -> list[Path]:
    """The ``.txt`` captions under the folders (Japanese copies and hidden files left out)."""
    out: list[Path] = []
    for folder in folders:
        if folder.is_file():
            candidates: Iterable[Path] = [folder]
        elif folder.is_dir():
            candidates = folder.rglob(f"*{CAPTION_SUFFIX}") if recursive else folder.glob(f"*{CAPTION_SUFFIX}")
        else:
            raise CharfwError("no such file or folder", path=folder)
        for p in sorted(candidates):
            if p.suffix == CAPTION_SUFFIX and not p.name.endswith(JAPANESE_SUFFIX) and not p.name.startswith("."):
                out.append(p)
    return out


def read_caption(path: Path) -> list[str]:
    return split_caption(read_text(path, encoding="utf-8-sig"))


# --- a common tag ------------------------------------------------------------------------


def with_common_tags(tags: list[str], common: Sequence[str], *, position: str = "first") -> list[str]:
    """``tags`` with each of ``common`` present once: moved to the front (``first``) or the
    end (``last``) where missing, left where it already is otherwise (idempotent)."""
    keys = {tag_key(t) for t in tags}
    missing = [c for c in common if tag_key(c) not in keys]
    return unique_tags([*missing, *tags] if position == "first" else [*tags, *missing])


@dataclass
class EditReport:
    changed: list[Path] = field(default_factory=list)
    unchanged: int = 0


def add_common_tags(paths: Sequence[Path], common: Sequence[str], *, position: str = "first",
                    dry_run: bool = False) -> EditReport:
    """Add tags to caption files in place (for a dataset charfw made, never a source folder)."""
    report = EditReport()
    for path in paths:
        tags = read_caption(path)
        new = with_common_tags(tags, common, position=position)
        if new == tags:
            report.unchanged += 1
            continue
        report.changed.append(path)
        if not dry_run:
            atomic.write_text(path, join_caption(new))
    return report


# --- Japanese copies ---------------------------------------------------------------------


def load_dictionary(templates: Any, extra: Sequence[Path] = ()) -> dict[str, str]:
    """The tag → Japanese dictionary: charfw's ``templates/tags/ja.yaml``, then the
    workspace's file of the same name merged over it (so it only needs the entries it
    adds or changes), then any files given; later entries win."""

    paths = [d / "tags" / "ja.yaml" for d in reversed(templates.dirs) if (d / "tags" / "ja.yaml").is_file()]
    merged: dict[str, str] = {}
    for path in [*paths, *extra]:
        data = read_yaml_file(path)
        table = data.get("tags") if isinstance(data, dict) else None
        if not isinstance(table, dict):
            raise CharfwError("expected a mapping 'tags:' of English tag → Japanese", path=path)
        for en, ja in table.items():
            if not isinstance(en, str) or not isinstance(ja, str) or not ja.strip():
                raise CharfwError(f"entry {en!r}: both sides must be text", path=path)
            merged[tag_key(en)] = ja.strip()
    return merged


def translate_tags(tags: Sequence[str], dictionary: dict[str, str]) -> tuple[list[str], list[str]]:
    """(translated tags, tags not in the dictionary); unknown tags stay in English."""
    out, unknown = [], []
    for tag in tags:
        ja = dictionary.get(tag_key(tag))
        if ja is None:
            unknown.append(tag)
            out.append(tag)
        else:
            out.append(ja)
    return out, unknown


def write_japanese(paths: Sequence[Path], dictionary: dict[str, str], *, dry_run: bool = False
                   ) -> tuple[int, Counter[str]]:
    """Write ``<stem>_jp.txt`` beside each caption; returns (files written, unknown tag counts)."""
    unknown: Counter[str] = Counter()
    written = 0
    for path in paths:
        translated, missing = translate_tags(read_caption(path), dictionary)
        unknown.update(tag_key(t) for t in missing)
        dest = path.with_name(path.stem + JAPANESE_SUFFIX)
        text = join_caption(translated)
        if dest.is_file() and dest.read_text("utf-8") == text:
            continue
        written += 1
        if not dry_run:
            atomic.write_text(dest, text)
    return written, unknown


# --- tag frequency -----------------------------------------------------------------------


def tag_frequencies(paths: Sequence[Path]) -> Counter[str]:
    """How many captions hold each tag (a tag counts once per caption)."""
    counts: Counter[str] = Counter()
    for path in paths:
        counts.update({tag_key(t): None for t in read_caption(path)}.keys())
    return counts


def frequency_report(counts: Counter[str], files: int, *, fmt: str = "text", top: int | None = None) -> str:
    rows = counts.most_common(top)
    if fmt == "json":
        return json.dumps({"captions": files, "tags": [{"tag": t, "count": n, "share": round(n / max(files, 1), 4)}
                                                       for t, n in rows]}, ensure_ascii=False, indent=1)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["tag", "count", "share"])
        for t, n in rows:
            writer.writerow([t, n, f"{n / max(files, 1):.4f}"])
        return buf.getvalue()
    width = max((len(t) for t, _ in rows), default=3)
    lines = [f"{files} caption(s), {len(counts)} distinct tag(s)"]
    lines += [f"{n:6d}  {100 * n / max(files, 1):5.1f}%  {t:<{width}}" for t, n in rows]
    return "\n".join(lines)
