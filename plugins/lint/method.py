"""``method``: the built-in linter of the ``lint`` stage, the method's checks (:mod:`charfw.lint`).

It gathers what the checks read from the stage's context: the images the background
stage read (``source``), the part's finished images (``images``) with the captions that
train, read from the dataset folder (so a caption edited there by hand is found), the
dataset config, the tag rules the ``angle-rules`` tagger (or, when it is not used, the
shipped rules) gives each code, the background stage's colours, the trainer's settings
and every character part of the workspace (a dataset config that is not kohya's TOML, from
another writer, skips the size and training checks). Options are the checks' thresholds and
``ignore: [check, ...]``. A built-in test model's quick default length (the tiny model's
24 steps) is not compared with the method's steps per image; a length set in the
manifest is.
"""

from __future__ import annotations

import contextlib
from typing import Any

import charfw
from charfw import CharfwError, Linter, Options
from charfw.build.hashing import sha256_file
from charfw.lint import LintConfig


class MethodLintOptions(LintConfig, Options):
    pass


DEFAULT_RULES = "tags/angle-rules.yaml"


def _tag_rules(ctx: Any) -> tuple[str, bool, bool]:
    """(rules option, tagged by the rules, the rules alone) from the part's tag chain."""
    from charfw.default_plugins.taggers.angle_rules import AngleRules

    chain = ctx.part_chains.get("tag", [])
    ours = [o for c, o in chain if isinstance(c, AngleRules)]
    if ours:
        return ours[0].rules, True, len(chain) == 1
    return DEFAULT_RULES, False, False


class MethodLinter(Linter):
    name = "method"
    version = "1"
    description = "the method's checks: angles, backgrounds, captions, keywords, sizes, training settings"
    Options = MethodLintOptions

    def _rules_file(self, ctx: Any) -> Any:
        from charfw.default_plugins.taggers.angle_rules import rules_path

        if not ctx.part.template:
            return None
        return rules_path(ctx, _tag_rules(ctx)[0])

    def cache_key(self, ctx: Any, options: Any) -> Any:
        """What the engine does not see: the captions in the dataset folder (a hand edit
        there re-runs the checks) and the tag rules file, as [name, sha256] pairs."""
        pairs = []
        dataset = ctx.inputs.get("dataset")
        if dataset is not None and "images" in dataset.folders:
            folder = ctx.path(dataset.folders["images"])
            pairs = [[p.relative_to(folder).as_posix(), ctx.sha256(p)] for p in sorted(folder.rglob("*.txt"))]
        rules = self._rules_file(ctx)
        if rules is not None:
            pairs.append([f"tag rules {rules.name}", sha256_file(rules)])
        return pairs

    def lint(self, ctx: Any, options: Any) -> list[charfw.Finding]:
        from charfw.lint import LintInput, run_checks
        from charfw.lint.training import read_dataset

        part = ctx.part
        sets = ctx.templates.angle_sets
        inp = LintInput(part=part, workspace_parts=ctx.workspace_parts,
                        template_codes=tuple(sets[part.template].codes(False)) if part.template in sets else ())
        dataset = ctx.input("dataset")
        if "config" in dataset.files:
            # not a kohya config (another writer's format): no size or training checks
            with contextlib.suppress(CharfwError):
                inp.dataset = read_dataset(ctx.path(dataset.files["config"]), dataset.files["config"])
        inp.sources = _sources(ctx)
        inp.images = _images(ctx, dataset, inp.dataset.resolution_of if inp.dataset else {})
        _, inp.rules_tagged, inp.rules_alone = _tag_rules(ctx)
        inp.rule_captions = self._rule_captions(ctx, {i.code for i in inp.images if i.code} | set(part.angles))
        for _, opts in ctx.part_chains.get("background", []):
            if hasattr(opts, "rgb_colors"):
                inp.background_colors += opts.rgb_colors()
        inp.train = _train(ctx)
        return run_checks(inp, options)

    def _rule_captions(self, ctx: Any, codes: set[str]) -> dict[str, list[str]]:
        from charfw.build.angles import parse_code
        from charfw.build.stages import merge_tags
        from charfw.default_plugins.taggers.angle_rules import load_rules, rule_tags

        path = self._rules_file(ctx)
        if path is None:
            return {}
        rules = load_rules(path)
        head = [ctx.part.keyword, *ctx.part.tags]
        out = {}
        for code in sorted(codes):
            angle = parse_code(code)
            angle_set = ctx.templates.angle_set_for_prefix(angle.prefix) if angle is not None else None
            if angle_set is not None:
                out[code] = merge_tags([], head + rule_tags(rules, angle_set, angle))
        return out


def _sources(ctx: Any) -> list[Any]:
    from charfw.lint import SourceImage

    source = ctx.inputs.get("source")
    return [SourceImage(i.id, i.code, ctx.path(i.path), i.source) for i in (source.items or [])] if source else []


def _images(ctx: Any, dataset: Any, resolution_of: dict[Any, int]) -> list[Any]:
    """The part's finished images, each with its caption file in the dataset folder."""
    from charfw.build.items import safe_file_stem
    from charfw.folders.caption_files import read_caption
    from charfw.lint import PartImage

    images = ctx.inputs.get("images")
    if images is None:
        return []
    label = ctx.part.label
    trained: dict[str, Any] = {}
    for subset in dataset.data.get("subsets", []):
        if subset.get("label", "") == label or subset.get("label", "").startswith(label + " "):
            for txt in ctx.path(subset["dir"]).glob("*.txt"):
                trained[txt.stem] = txt
    out = []
    for item in images.items or []:
        txt = trained.get(safe_file_stem(item.id))
        picture = next((p for p in txt.parent.glob(txt.stem + ".*") if p.suffix != ".txt"), None) if txt else None
        out.append(PartImage(
            id=item.id, code=item.code, path=ctx.path(item.path), file=item.source, width=item.width,
            height=item.height, caption_file=ctx.record_path(txt) if txt else None,
            caption=read_caption(txt) if txt else None,
            resolution=resolution_of.get(picture.resolve()) if picture is not None else None,
        ))
    return out


def _train(ctx: Any) -> Any:
    from charfw.lint import TrainInfo

    chain = ctx.part_chains.get("train", [])
    if not chain:
        return None
    options = chain[0][1]
    settings = options.for_model(ctx.part.model.base, family=ctx.part.model.family) \
        if hasattr(options, "for_model") else options
    length_set = {"max_train_steps", "max_train_epochs"} & options.model_fields_set
    cache = getattr(settings, "cache_latents", None)
    return TrainInfo(steps=getattr(settings, "max_train_steps", None), epochs=getattr(settings, "max_train_epochs", None),
                     latents_cached=cache not in (None, False, "off"),
                     length_chosen=settings is options or bool(length_set))


@charfw.hookimpl
def register_linters(register):
    register(MethodLinter())
