"""YAML loading that remembers the line of every key and value.

``yaml.safe_load`` throws positions away; a manifest error must say
``characters/krnk.yaml:14 face.template: ...``. :func:`load_with_lines` composes the node
tree, builds plain Python data from it, and returns a :class:`LineMap` from YAML paths
(tuples of keys and list indices) to 1-based line numbers. Duplicate keys, which PyYAML
silently collapses, are reported as errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from charfw.errors import CharfwError, read_text

Loc = tuple[str | int, ...]


@dataclass
class LineMap:
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its nearest ancestor that has one."""
        loc = tuple(loc)
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _yaml_error(exc: yaml.YAMLError, path: Path) -> CharfwError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "\\t" in problem or "'\\t'" in problem or "tab" in problem.lower():
        return CharfwError(
            "YAML error: a tab character is used for indentation", path=path, line=line,
            hint="indent with spaces only",
        )
    context = getattr(exc, "context", None)
    text = f"YAML error: {problem}" + (f" ({context})" if context else "")
    return CharfwError(text, path=path, line=line, hint="check the indentation and quoting on this line")


def load_with_lines(path: Path) -> tuple[Any, LineMap]:
    text = read_text(path, hint="save the file as UTF-8")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines = LineMap()
        data = _build(loader, node, (), lines, path) if node is not None else None
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, path) from None
    finally:
        loader.dispose()
    return data, lines


def _build(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, lines: LineMap, path: Path) -> Any:
    lines.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise CharfwError(
                    f"YAML error: keys must be plain words, got {key!r}",
                    path=path, line=key_node.start_mark.line + 1,
                )
            key = str(key) if not isinstance(key, str) else key
            if key in result:
                raise CharfwError(
                    f"{format_loc((*loc, key))}: key '{key}' appears twice",
                    path=path, line=key_node.start_mark.line + 1, hint="keep only one",
                )
            lines.lines[(*loc, key)] = key_node.start_mark.line + 1
            result[key] = _build(loader, value_node, (*loc, key), lines, path)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, child, (*loc, i), lines, path) for i, child in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
