"""``charfw adopt``: move chosen draft images into a part's source folder.

The ``draft`` stage writes candidates as ``build/<character>/<part>/draft/<code>-<k>.png``
(k = 0, 1, ... per angle code). ``charfw adopt krnk face f00-2 f01-0`` copies candidate 2
of f00 and candidate 0 of f01 into the face's images folder as ``f00.png`` and ``f01.png``;
``--all-first`` takes candidate 0 of every code that has drafts. The next ``charfw build``
then runs the usual stages on them. A group's drafts (the members together) go into the
group's own ``images`` folder: ``charfw adopt krnksf_tyankps group b00-1``.

This is the one command besides ``charfw tag`` that writes next to source images, so it
never replaces one without ``--force``; with ``--force`` the replaced file is kept under
``build/<character>/<part>/draft/replaced/`` (nothing is lost).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import click

import charfw
from charfw import CharfwError, console
from charfw.build import atomic
from charfw.build.images import SOURCE_IMAGE_SUFFIXES
from charfw.build.manifest import CharacterManifest
from charfw.errors import display_path

CANDIDATE = re.compile(r"^(?P<code>[a-z]\d\d)-(?P<k>\d+)$")


def draft_candidates(folder: Path) -> dict[str, list[int]]:
    """code → candidate numbers found in a draft folder, sorted."""
    found: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        m = CANDIDATE.match(path.stem)
        if m:
            found.setdefault(m["code"], []).append(int(m["k"]))
    return {code: sorted(ks) for code, ks in sorted(found.items())}


def existing_sources(images_dir: Path, code: str) -> list[Path]:
    """Source images of ``code`` already in the folder (``f00.png``, ``f00-smile.jpg``, ...)."""
    if not images_dir.is_dir():
        return []
    return sorted(p for p in images_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in SOURCE_IMAGE_SUFFIXES
                  and (p.stem == code or p.stem.startswith(f"{code}-") or p.stem.startswith(f"{code}_")))


def adopt(images_dir: Path, draft_dir: Path, chosen: list[str], *, force: bool) -> list[tuple[Path, Path]]:
    """Copy each chosen candidate (``<code>-<k>``) to ``<images_dir>/<code>.png``; returns
    (candidate, destination) pairs. Checks everything before writing anything."""
    available = draft_candidates(draft_dir)
    plan: list[tuple[Path, Path, list[Path]]] = []
    codes: set[str] = set()
    for name in chosen:
        m = CANDIDATE.match(name)
        if m is None or int(m["k"]) not in available.get(m["code"], []):
            shown = ", ".join(f"{c}-{k}" for c, ks in available.items() for k in ks[:1]) or "none"
            raise CharfwError(f"no draft candidate '{name}' in {display_path(draft_dir)}/ (first candidates: {shown})",
                              hint="name candidates as <code>-<k>, e.g. f00-0; run the draft stage first")
        if m["code"] in codes:
            raise CharfwError(f"two candidates chosen for {m['code']}", hint="choose one per angle code")
        codes.add(m["code"])
        existing = existing_sources(images_dir, m["code"])
        if existing and not force:
            raise CharfwError(f"{m['code']} already has a source image ({', '.join(p.name for p in existing)}) "
                              f"in {display_path(images_dir)}/",
                              hint="choose another code, remove it, or pass --force to replace it (the old "
                                   "file is kept under the draft folder's replaced/)")
        plan.append((draft_dir / f"{name}.png", images_dir / f"{m['code']}.png", existing))
    done = []
    images_dir.mkdir(parents=True, exist_ok=True)
    for src, dest, existing in plan:
        for old in existing:
            backup = draft_dir / "replaced" / old.name
            backup.parent.mkdir(parents=True, exist_ok=True)
            atomic.copy_file(old, backup)
            if old != dest:
                old.unlink()
        atomic.copy_file(src, dest)
        shutil.copystat(src, dest)
        done.append((src, dest))
    return done


@charfw.hookimpl
def register_commands(cli):
    @cli.command("adopt")
    @click.argument("target")
    @click.argument("part")
    @click.argument("candidates", nargs=-1)
    @click.option("--all-first", is_flag=True, help="Adopt candidate 0 of every angle code that has drafts.")
    @click.option("--force", is_flag=True, help="Replace source images of the same code (kept under draft/replaced/).")
    @click.pass_context
    def adopt_command(ctx: click.Context, target: str, part: str, candidates: tuple[str, ...], all_first: bool,
                      force: bool) -> None:
        """Copy chosen draft images into a part's source folder: `charfw adopt krnk face f00-2 f01-0`."""
        from charfw.build.plan import character_parts
        from charfw.cli import workspace_from

        ws = workspace_from(ctx)
        lm = ws.load(target)
        if isinstance(lm.manifest, CharacterManifest):
            parts = {p.name: p.images_dir for p in character_parts(ws, lm)}
            if part not in parts:
                raise CharfwError(f"character '{target}' has no part '{part}'; its parts: {', '.join(parts)}")
            images_dir = parts[part]
        else:
            if part != "group":
                raise CharfwError(f"'{target}' is a group; its one part is 'group' (charfw adopt {target} group …)")
            if lm.manifest.images is None:
                raise CharfwError(f"group '{target}' has no folder for its own pictures", path=lm.path,
                                  hint=f"add `images: {target}` (pictures of the members together) to the manifest")
            images_dir = (lm.base_dir / lm.manifest.images).resolve()
        draft_dir = ws.build_dir / target / part / "draft"
        chosen = list(candidates)
        if all_first:
            chosen += [f"{code}-{ks[0]}" for code, ks in draft_candidates(draft_dir).items()
                       if not any(c.startswith(f"{code}-") for c in candidates)]
        if not chosen:
            raise CharfwError("name the candidates to adopt (e.g. f00-2 f01-0), or pass --all-first",
                              hint=f"the drafts are in {display_path(draft_dir)}/")
        assert images_dir is not None
        for src, dest in adopt(images_dir, draft_dir, chosen, force=force):
            console.info(f"{src.stem} -> {display_path(dest)}")
        console.info(f"adopted {len(chosen)} image(s) into {display_path(images_dir)}/; "
                     f"run `charfw build {target}` to prepare and tag them")
