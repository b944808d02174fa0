"""A workspace: the folder a user works in.

::
    characters/   manifests (krnk.yaml, krnksf_tyankps.yaml) and their source images
    plugins/      one-off plugin files (*.py), loaded automatically
    templates/    the user's own angle sets, tag rules and templates (override charfw's)
    build/        everything charfw makes, one folder per character or group

The charfw repository is itself a workspace: its examples build with ``charfw build krnk``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from charfw.build.manifest import LoadedManifest, load_manifest
from charfw.build.template_library import WORKSPACE_FOLDER, TemplateLibrary
from charfw.errors import CharfwError, ManifestError, display_path
from charfw.plugins import load_plugins, plugins_folder

MANIFEST_SUFFIXES = (".yaml", ".yml")


def user_cache_dir() -> Path:
    """Caches shared by all workspaces: ``$CHARFW_CACHE``, else ``$XDG_CACHE_HOME/charfw``,
    else ``~/.cache/charfw``."""
    root = os.environ.get("CHARFW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "charfw")
    return Path(root)


class Workspace:
    def __init__(self, root: Path, *, plugins_dir: Path | None = None, build_dir: Path | None = None) -> None:
        self.root = root.resolve()
        self.characters_dir = self.root / "characters"
        self.build_dir = (build_dir or self.root / "build").resolve()
        self.plugins_dir = plugins_folder(self.root, plugins_dir)
        self.templates = TemplateLibrary(self.root / WORKSPACE_FOLDER)
        self._manifests: dict[Path, LoadedManifest] = {}

    @property
    def state_dir(self) -> Path:
        """build/.charfw: the hash cache and the build lock."""
        return self.build_dir / ".charfw"

    @property
    def cache_dir(self) -> Path:
        """build/.cache: caches shared across characters (latents, text-encoder outputs)."""
        return self.build_dir / ".cache"

    @functools.cached_property
    def plugins(self):  # -> PluginSystem (imported lazily: plugin loading is the slow part)

        return load_plugins(self.plugins_dir)

    # --- manifests ---------------------------------------------------------------------

    def manifest_paths(self) -> list[Path]:
        if not self.characters_dir.is_dir():
            return []
        return sorted(p for p in self.characters_dir.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())

    def find_manifest(self, name: str) -> Path:
        """A manifest by name (``krnk``) or path (``characters/krnk.yaml``)."""
        as_path = Path(name)
        if as_path.suffix in MANIFEST_SUFFIXES:
            candidate = as_path if as_path.is_absolute() else Path.cwd() / as_path
            if candidate.is_file():
                return candidate.resolve()
            raise CharfwError("no such manifest file", path=as_path)
        for suffix in MANIFEST_SUFFIXES:
            candidate = self.characters_dir / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        known = [p.stem for p in self.manifest_paths()]
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else (
            f"known: {', '.join(known)}" if known else f"create one with `charfw init {name}`"
        )
        raise CharfwError(
            f"no manifest '{name}' in {display_path(self.characters_dir)}/", hint=hint
        )

    def load(self, name_or_path: str | Path) -> LoadedManifest:
        path = name_or_path if isinstance(name_or_path, Path) else self.find_manifest(name_or_path)
        path = path.resolve()
        if path not in self._manifests:
            self._manifests[path] = load_manifest(path, self.templates.angle_sets)
        return self._manifests[path]

    def load_all(self) -> list[LoadedManifest]:
        """Every manifest in characters/, reporting all problems of all files at once."""
        loaded, problems = [], []
        for path in self.manifest_paths():
            try:
                loaded.append(self.load(path))
            except ManifestError as exc:
                problems.extend(exc.problems)
            except CharfwError as exc:
                problems.append(str(exc))
        if problems:
            raise ManifestError(problems)
        return loaded
