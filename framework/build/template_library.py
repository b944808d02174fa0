"""The template library: angle sets, tag rules, batch-size tables and jinja2 templates.

charfw ships its templates in the top-level ``templates/`` folder (installed as
``charfw.templates``). A workspace may have its own ``templates/`` folder: a file there
with the same relative path replaces the shipped one, and new files add to it (a new
``templates/angles/chibi.yaml`` becomes a template a manifest can name).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from charfw.errors import CharfwError

if TYPE_CHECKING:
    from charfw.build.angles import AngleSet

#: a workspace's own templates, beside its characters/ folder
WORKSPACE_FOLDER = "templates"


def builtin_dir() -> Path:
    import charfw.templates as _pkg  # the templates/ folder, installed as a package

    return Path(_pkg.__file__).parent


class TemplateLibrary:
    """Looks files up in the workspace's templates folder first, then in charfw's own."""

    def __init__(self, workspace_dir: Path | None = None) -> None:
        dirs: list[Path] = []
        shipped = builtin_dir().resolve()
        if workspace_dir is not None and workspace_dir.is_dir() and workspace_dir.resolve() != shipped:
            dirs.append(workspace_dir.resolve())
        dirs.append(shipped)
        self.dirs = dirs

    def find(self, relpath: str) -> Path:
        for d in self.dirs:
            candidate = d / relpath
            if candidate.is_file():
                return candidate
        raise CharfwError(
            f"template '{relpath}' not found in {', '.join(str(d) for d in self.dirs)}"
        )

    def files(self, folder: str, suffix: str) -> dict[str, Path]:
        """name → path for every ``<folder>/*<suffix>``; workspace files win."""
        found: dict[str, Path] = {}
        for d in reversed(self.dirs):
            sub = d / folder
            if sub.is_dir():
                for p in sorted(sub.glob(f"*{suffix}")):
                    found[p.name[: -len(suffix)]] = p
        return found

    def load_yaml(self, relpath: str) -> Any:
        path = self.find(relpath)
        return read_yaml_file(path)

    @functools.cached_property
    def angle_sets(self) -> dict[str, AngleSet]:
        from pydantic import ValidationError  # pydantic only when angle sets are read

        from charfw.build.angles import AngleSet

        sets: dict[str, AngleSet] = {}
        for name, path in self.files("angles", ".yaml").items():
            data = read_yaml_file(path)
            try:
                angle_set = AngleSet.model_validate(data)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise CharfwError(f"{where}: {first['msg']}", path=path) from None
            if angle_set.name != name:
                raise CharfwError(
                    f"angle set is named '{angle_set.name}' but the file is '{name}.yaml'",
                    path=path,
                    hint="make the two agree",
                )
            sets[name] = angle_set
        return sets

    def angle_set_for_prefix(self, prefix: str) -> AngleSet | None:
        for angle_set in self.angle_sets.values():
            if angle_set.prefix == prefix.lower():
                return angle_set
        return None

    @functools.cached_property
    def jinja(self) -> Any:
        from charfw.build.toml_format import toml_value

        env = self.environment()
        env.filters["toml"] = toml_value
        return env

    def environment(self, *, autoescape: bool = False) -> Any:
        """A new jinja2 environment over the library's folders (the workspace's first);
        ``autoescape`` for HTML pages (the build report)."""
        import jinja2

        return jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(d) for d in self.dirs]),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=autoescape,
        )

    def render(self, relpath: str, **context: Any) -> str:
        return self.jinja.get_template(relpath).render(**context)


def read_yaml_file(path: Path) -> Any:
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise CharfwError(f"cannot read ({exc.strerror or exc})", path=path) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise CharfwError(f"YAML error: {problem}", path=path, line=line) from None
