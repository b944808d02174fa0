"""Packaging and set-up: what pip installs, and the README's two commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPING = {"framework": "charfw", "templates": "charfw.templates", "plugins": "charfw.default_plugins"}


def test_every_package_folder_is_listed() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in MAPPING.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def test_template_files_are_package_data() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["charfw.templates"]
    suffixes = {p.rsplit(".", 1)[-1] for p in patterns}
    files = [p for p in (REPO / "templates").rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert files and all(p.suffix.lstrip(".") in suffixes for p in files), [p.name for p in files]


def test_readme_set_up_commands_are_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n([^\n]*python3 -m venv [^\n]+)\n```", readme)
    assert len(commands) == 2
    build, tests = commands
    assert build.endswith("charfw build krnk") and tests.endswith("pytest")
    ci = (REPO / ".ci/run").read_text()
    assert tests in ci.splitlines()
