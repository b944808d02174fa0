"""Loading plugins and collecting what they register.

Plugins come from three places, loaded in this order:

1. the built-in plugins: every module in the ``charfw.default_plugins`` package (the repository's
   ``plugins/`` folder) whose name does not start with ``_``;
2. installed packages with an entry point in the ``charfw`` group;
3. single ``*.py`` files in the workspace's plugins folder (``<workspace>/plugins/``, or
   ``--plugins-dir`` / ``CHARFW_PLUGINS_DIR``).

``CHARFW_PLUGINS`` limits which plugins of (2) and (3) load: a comma-separated list of
entry-point names or file stems; set but empty loads none. ``CHARFW_TRACE_PLUGINS=1``
prints every hook call. After loading, ``check_pending()`` rejects hook implementations
with a misspelled name, and every ``register_*`` hook is called once to fill the
:class:`Registry`, which rejects a name registered twice and names both plugins.
Commands are added the same way (:meth:`PluginSystem.add_commands`, when the command line
first looks one up): a command name that is already taken, by charfw or by another
plugin, is an error that names both. Running one built-in plugin's command
(``charfw lora info``) imports only the module that adds it (:func:`builtin_command`,
:data:`BUILTIN_COMMANDS`) when no other plugin is installed; ``charfw --help`` and
``charfw plugins`` load every plugin.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from . import __version__, hookspecs
from .errors import CharfwError, PluginError, display_path

if TYPE_CHECKING:
    from .components import Component

ENTRY_POINT_GROUP = "charfw"
BUILTIN_PACKAGE = "charfw.default_plugins"

#: the commands the built-in plugins add → the module (under ``charfw.default_plugins``)
#: that adds each; tests/test_plugins.py checks it against what loading every plugin adds
BUILTIN_COMMANDS: dict[str, str] = {
    "adopt": "draft.adopt", "caption": "taggers.blip", "collect": "commands.collect", "cutout": "background.rembg_remover",
    "dedup": "filters.dedup", "export-model": "train.cli", "generate": "generate.cli", "lint": "commands.lint",
    "lora": "lora.commands", "report": "report.html_report", "tags": "commands.caption_tools",
    "templates": "commands.templates", "train": "train.cli", "wd14": "taggers.wd14",
}


def plugins_folder(root: Path, plugins_dir: Path | None = None) -> Path:
    """A workspace's one-off plugin files: ``--plugins-dir``, ``$CHARFW_PLUGINS_DIR`` or
    ``<workspace>/plugins``."""
    env = os.environ.get("CHARFW_PLUGINS_DIR")
    return (plugins_dir or (Path(env) if env else root / "plugins")).resolve()


def other_plugins(plugins_dir: Path | None) -> bool:
    """Whether a plugin other than the built-ins would load: a plugin file in
    ``plugins_dir`` or an entry point (as ``CHARFW_PLUGINS`` allows)."""
    allowed = _allowed()
    if plugins_dir is not None and plugins_dir.is_dir():
        for path in plugins_dir.glob("*.py"):
            if not path.name.startswith("_") and (allowed is None or path.stem in allowed):
                return True
    return any(allowed is None or ep.name in allowed for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))


def builtin_command(name: str, plugins_dir: Path | None) -> Any | None:
    """A built-in plugin's command ``name``, importing only the module that adds it (the
    other plugins' imports are most of a command's start-up). None when ``name`` is no
    built-in's command, or when another plugin is installed: then every plugin loads, so
    that a name registered twice stays an error naming both."""
    module_name = BUILTIN_COMMANDS.get(name)
    if module_name is None or other_plugins(plugins_dir):
        return None
    import click

    info = PluginInfo(f"charfw.{module_name}", "built-in", __version__)
    module = importlib.import_module(f"{BUILTIN_PACKAGE}.{module_name}")
    scratch = click.Group()
    try:
        module.register_commands(cli=scratch)
    except CharfwError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {info.name} ({info.source}) failed in register_commands: "
                          f"{type(exc).__name__}: {exc}") from exc
    return scratch.commands.get(name)


@dataclass
class PluginInfo:
    """One loaded plugin, for ``charfw plugins`` and for records."""

    name: str
    #: "built-in", "entry point <dist>", or "file <path>"
    source: str
    version: str
    hooks: list[str] = field(default_factory=list)
    #: kind → component names it registered
    registered: dict[str, list[str]] = field(default_factory=dict)
    #: the ``charfw`` commands it added (filled by :meth:`PluginSystem.add_commands`)
    commands: list[str] = field(default_factory=list)


@dataclass
class Registration:
    component: Component
    plugin: PluginInfo


class Registry:
    """Components by kind and name, with the plugin that registered each."""

    def __init__(self) -> None:
        from .components import KINDS  # pydantic: not needed to run one built-in command

        self._by_kind: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, component: Any, plugin: PluginInfo) -> None:
        from .components import KINDS

        base, hook, noun = KINDS[kind]
        if not isinstance(component, base):
            raise PluginError(
                f"plugin {plugin.name} ({plugin.source}) passed {component!r} to {hook}; "
                f"expected an instance of charfw.components.{base.__name__}"
            )
        name = getattr(component, "name", "")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin.name} ({plugin.source}) registered a {noun} without a name")
        existing = self._by_kind[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"{noun} '{name}' is registered twice: by {existing.plugin.name} "
                f"({existing.plugin.source}) and by {plugin.name} ({plugin.source})",
                hint="rename one of them, or limit loading with CHARFW_PLUGINS",
            )
        self._by_kind[kind][name] = Registration(component, plugin)
        plugin.registered.setdefault(kind, []).append(name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def find(self, kind: str, name: str) -> Registration | None:
        return self._by_kind[kind].get(name)

    def get(self, kind: str, name: str) -> Component:
        reg = self.find(kind, name)
        if reg is None:
            raise PluginError(self.unknown_message(kind, name))
        return reg.component

    def unknown_message(self, kind: str, name: str) -> str:
        from .components import KINDS

        noun = KINDS[kind][2]
        known = self.names(kind)
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            return f"unknown {noun} '{name}' (did you mean '{close[0]}'?); known: {', '.join(known)}"
        if known:
            return f"unknown {noun} '{name}'; known: {', '.join(known)}"
        return f"no {noun} named '{name}' is installed (no {noun} is installed at all)"

    def suggestion(self, kind: str, name: str) -> str | None:
        close = difflib.get_close_matches(name, self.names(kind), n=1)
        return close[0] if close else None

    def components(self, kind: str) -> list[Registration]:
        return [self._by_kind[kind][n] for n in self.names(kind)]


def _trace_enabled() -> bool:
    return os.environ.get("CHARFW_TRACE_PLUGINS", "") not in ("", "0")


def _allowed() -> set[str] | None:
    raw = os.environ.get("CHARFW_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


class PluginSystem:
    """A plugin manager with its plugins loaded and its registry filled."""

    def __init__(self, plugins_dir: Path | None = None) -> None:
        self.pm = pluggy.PluginManager("charfw")
        self.pm.add_hookspecs(hookspecs)
        self.plugins_dir = plugins_dir
        self.infos: dict[str, PluginInfo] = {}
        if _trace_enabled():
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(f"[charfw plugins] {text}"))
            self.pm.enable_tracing()
        self._load_builtins()
        self._load_entry_points()
        self._load_plugins_dir()
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = self.pm.get_name(exc.plugin) if exc.plugin is not None else "?"
            info = self.infos.get(plugin or "")
            where = f" ({info.source})" if info else ""
            raise PluginError(
                f"plugin {plugin}{where}: {exc}",
                hint=f"the hooks are: {', '.join(hookspecs.HOOK_NAMES)}",
            ) from None
        for name, info in self.infos.items():
            module = self.pm.get_plugin(name)
            info.hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
        self.registry = Registry()
        from .components import KINDS

        for kind, (_base, hook, _noun) in KINDS.items():
            self._collect(kind, hook)

    # --- loading -----------------------------------------------------------------------

    def _register(self, module: ModuleType, name: str, info: PluginInfo) -> None:
        try:
            self.pm.register(module, name=name)
        except ValueError as exc:
            other = self.infos.get(name)
            raise PluginError(
                f"two plugins are called '{name}': {other.source if other else '?'} and {info.source} ({exc})"
            ) from None
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name} ({info.source}): {exc}") from None
        self.infos[name] = info

    def _load_builtins(self) -> None:
        package = importlib.import_module(BUILTIN_PACKAGE)
        for mod in pkgutil.walk_packages(package.__path__, prefix=f"{BUILTIN_PACKAGE}."):
            leaf = mod.name.rsplit(".", 1)[-1]
            if mod.ispkg or leaf.startswith("_"):
                continue
            module = importlib.import_module(mod.name)
            short = mod.name[len(BUILTIN_PACKAGE) + 1 :]
            self._register(module, f"charfw.{short}", PluginInfo(f"charfw.{short}", "built-in", __version__))

    def _load_entry_points(self) -> None:
        allowed = _allowed()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allowed is not None and ep.name not in allowed:
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            source = f"entry point {ep.value} in {dist_name} {version}"
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name} ({source}) failed to load: {type(exc).__name__}: {exc}",
                    hint=f"reinstall or remove {dist_name}, or leave it out with CHARFW_PLUGINS",
                ) from None
            self._register(module, ep.name, PluginInfo(ep.name, source, version))

    def _load_plugins_dir(self) -> None:
        folder = self.plugins_dir
        if folder is None or not folder.is_dir():
            return
        allowed = _allowed()
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_") or (allowed is not None and path.stem not in allowed):
                continue
            module = _import_file(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            info = PluginInfo(path.stem, f"file {display_path(path)}", f"file-{digest}")
            self._register(module, path.stem, info)

    # --- registration ------------------------------------------------------------------

    def _collect(self, kind: str, hook: str) -> None:
        caller = getattr(self.pm.hook, hook)
        # call each implementation ourselves so every component is tied to its plugin;
        # in registration order (built-ins first), so a clash names the earlier one first
        for impl in caller.get_hookimpls():
            info = self.infos[impl.plugin_name]

            def register(component: Any, _info: PluginInfo = info) -> None:
                self.registry.add(kind, component, _info)

            _call(impl, info, hook, register=register)

    def add_commands(self, cli: Any) -> list[str]:
        """Call every ``register_commands`` implementation with the ``charfw`` click group,
        in loading order (built-ins first), noting which plugin added which command. A name
        already taken, by one of charfw's own commands or by an earlier plugin, is a
        :class:`PluginError` naming both. Returns the names added."""
        owners: dict[str, PluginInfo | None] = dict.fromkeys(cli.commands)  # None: charfw's own
        for info in self.infos.values():
            info.commands = []
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.infos[impl.plugin_name]
            before = dict(cli.commands)
            _call(impl, info, "register_commands", cli=cli)
            for name, command in cli.commands.items():
                if before.get(name) is command:
                    continue  # there before, untouched
                if name in owners:
                    first = owners[name]
                    by = "charfw's own commands" if first is None else f"{first.name} ({first.source})"
                    raise PluginError(
                        f"command '{name}' is registered twice: by {by} and by {info.name} ({info.source})",
                        hint="rename one of them, or limit loading with CHARFW_PLUGINS",
                    )
                owners[name] = info
                info.commands.append(name)
        return [name for name, owner in owners.items() if owner is not None]


def _call(impl: Any, info: PluginInfo, hook: str, **kwargs: Any) -> None:
    """Call one plugin's implementation of a registration hook ourselves (so that what it
    registers is tied to it), with the arguments it asks for; a failure names the plugin."""
    if _trace_enabled():
        sys.stderr.write(f"[charfw plugins] {impl.plugin_name}: {hook}\n")
    try:
        impl.function(**{k: kwargs[k] for k in impl.argnames})
    except CharfwError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {info.name} ({info.source}) failed in {hook}: {type(exc).__name__}: {exc}"
        ) from exc


def _import_file(path: Path) -> ModuleType:
    mod_name = f"charfw_workspace_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError("cannot import this file as a plugin", path=path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(mod_name, None)
        raise PluginError(f"syntax error: {exc.msg}", path=path, line=exc.lineno) from None
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        tb = exc.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        raise PluginError(
            f"plugin failed to load: {type(exc).__name__}: {exc}",
            path=path,
            line=line,
            hint="fix it, or move it out of the plugins folder",
        ) from None
    return module


_cache: dict[str, PluginSystem] = {}


def load_plugins(plugins_dir: Path | None = None) -> PluginSystem:
    """Load plugins once per plugins folder (idempotent) and return the plugin system."""
    key = str(plugins_dir.resolve()) if plugins_dir is not None else ""
    key += "|" + os.environ.get("CHARFW_PLUGINS", "<all>")
    system = _cache.get(key)
    if system is None:
        system = PluginSystem(plugins_dir)
        _cache[key] = system
    return system


def reset() -> None:
    """Forget loaded plugin systems (tests)."""
    _cache.clear()
