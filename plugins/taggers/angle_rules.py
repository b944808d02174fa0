"""``angle-rules``: the method's caption tags from the angle code in each file name.

The tags are not inferred from the pixels: they follow from the code (``f12`` is from
above, from the side, nude upper body, ...), so every LoRA built by the method is tagged
the same way. The keyword and the part's own tags come first, then the rules of
``templates/tags/angle-rules.yaml`` in order (the seed's GenerateCharTag). Asymmetric
codes 5, 6 and 7 are tagged as the codes they mirror. Captions are never shuffled.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import charfw
from charfw import CharfwError, Options, Tagger
from charfw.build.hashing import sha256_file
from charfw.build.template_library import read_yaml_file


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    angle_set: list[str] | None = Field(None, alias="set")
    v: list[int] | None = None
    h: list[int] | None = None
    code: list[str] | None = None

    def holds(self, set_name: str, v: int, h: int, code: str) -> bool:
        return (
            (self.angle_set is None or set_name in self.angle_set)
            and (self.v is None or v in self.v)
            and (self.h is None or h in self.h)
            and (self.code is None or code in self.code)
        )


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when: Condition = Condition()
    tags: list[str]


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule]


@functools.lru_cache(maxsize=16)
def _load_rules(path: str, digest: str) -> RuleFile:
    data = read_yaml_file(Path(path))
    try:
        return RuleFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise CharfwError(f"{where}: {err['msg']}", path=path, hint="see the comments at the top of the shipped rules file") from None


def rules_path(ctx, rules: str) -> Path:
    """The rules file an ``angle-rules`` option names: a path under templates/ (a workspace
    copy overrides charfw's), a workspace-relative or an absolute file path."""
    candidate = Path(rules)
    if candidate.is_absolute() or (ctx.workspace_root / candidate).is_file():
        path = candidate if candidate.is_absolute() else ctx.workspace_root / candidate
        if not path.is_file():
            raise CharfwError("tag rules file not found", path=path)
        return path
    return ctx.templates.find(rules)


def load_rules(path: Path) -> list[Rule]:
    """The rules of a rules file (validated; cached by content)."""
    return _load_rules(str(path), sha256_file(path)).rules


def rule_tags(rules: list[Rule], angle_set, angle) -> list[str]:
    """The tags the rules give an angle code of ``angle_set`` (mirrored codes 5-7 follow
    the code they mirror; ``{framing}`` filled in), in rule order."""
    base = angle.mirrored()
    found: list[str] = []
    for rule in rules:
        if rule.when.holds(angle_set.name, base.vertical, base.horizontal, base.code):
            found.extend(t.replace("{framing}", angle_set.framing) for t in rule.tags)
    return found


class AngleRulesOptions(Options):
    #: the rules file: a path under templates/ (a workspace copy overrides charfw's) or a file path
    rules: str = "tags/angle-rules.yaml"


class AngleRules(Tagger):
    name = "angle-rules"
    version = "1"
    description = "the method's tags from the angle code in the file name (GenerateCharTag)"
    Options = AngleRulesOptions
    needs_pixels = False

    def batch_size(self, ctx, options):
        return 4096

    def _rules_path(self, ctx, options) -> Path:
        return rules_path(ctx, options.rules)

    def cache_key(self, ctx, options):
        sets = {name: s.model_dump() for name, s in ctx.templates.angle_sets.items()}
        return [sha256_file(self._rules_path(ctx, options)), sets]

    def tag(self, ctx, options, items, images, tags_so_far):
        rules = load_rules(self._rules_path(ctx, options))
        head = [ctx.part.keyword, *ctx.part.tags]
        by_code: dict[tuple[str, str], list[str]] = {}  # rule results repeat per code
        out: list[list[str] | None] = []
        for item in items:
            angle = item.angle
            if angle is None:
                ctx.problem(item.source, "the name does not start with an angle code, so it cannot be tagged",
                            hint="rename it like f00.png, or tag it with another tagger")
                out.append(None)
                continue
            angle_set = ctx.templates.angle_set_for_prefix(angle.prefix)
            if angle_set is None:
                known = ", ".join(f"{s.prefix} ({s.name})" for s in ctx.templates.angle_sets.values())
                ctx.problem(item.source, f"no angle set uses the letter '{angle.prefix}'; known: {known}")
                out.append(None)
                continue
            key = (angle_set.name, angle.mirrored().code)
            if key not in by_code:
                by_code[key] = rule_tags(rules, angle_set, angle)
            out.append(head + by_code[key])
        return out


@charfw.hookimpl
def register_taggers(register):
    register(AngleRules())
