"""Planning: manifests → the parts of each character and group → the stages each part goes
through, each with the plugin chain the manifest picks.

A character becomes parts (its face, then each body); a group becomes one part that
depends on its members' images. Each part gets the stages of
:data:`charfw.build.stages.STAGES` that apply to it, each carried out by the plugin chain
the manifest picks (a part's choice overrides the character's, which overrides the
stage's default), with options validated by that plugin's ``Options`` model. Stages are
linked to the upstream stages they read from; :class:`Planner` orders them so that every
stage comes after what it depends on (bodies after their face, groups after their
members' image stages).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from charfw.build.manifest import (
    CharacterManifest,
    GroupManifest,
    LoadedManifest,
    body_identity,
    looks_local,
    pydantic_messages,
)
from charfw.build.stages import (
    IMAGE_PARTS,
    STAGE_NAMES,
    STAGES,
    StageSpec,
    dataset_parts,
    stage_applies,
)
from charfw.build.workspace import MANIFEST_SUFFIXES, Workspace
from charfw.build.yaml_lines import Loc
from charfw.components import KINDS, Component
from charfw.errors import CharfwError, ManifestError, display_path
from charfw.plugins import PluginInfo, PluginSystem
from charfw.stage_context import ModelRefs, PartInfo

# --- parts -------------------------------------------------------------------------------


def _model_refs(lm: LoadedManifest, section: Any, cache_dir: Path) -> tuple[ModelRefs, str | None]:
    """The part's model references, with the family told from the base model's files, and
    the plan's line about it. A base model that is not there (yet) or a Hugging Face id
    that is neither cached nor downloadable keeps the declared family (or sd1): the train
    stage's check says what is missing; a checkpoint of an unknown family is a manifest error."""
    from charfw.training.families.detect import FamilyUnavailable, detect_family
    from charfw.training.model_sources import resolve_source

    def resolve(value: str | None, key: str = "base") -> str | None:
        # relative to the manifest's folder, and only to it; a path that is not there is
        # a manifest error (a Hugging Face id is checked by the stages that load it)
        if value is None:
            return None
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = lm.base_dir / candidate
        if candidate.exists():
            return str(candidate.resolve())
        if looks_local(value):
            what = "VAE" if key == "vae" else "base model"
            raise lm.error(("model", key), f"{what} not found: no file or folder {display_path(candidate)} "
                           f"(a path here is relative to the manifest's folder, {display_path(lm.base_dir)}/); "
                           "put the model there or fix the path, or use a Hugging Face id or charfw:tiny-sd15")
        return value

    base = resolve(section.base)
    family, note = section.family or "sd1", None
    if base is not None:
        try:
            source = resolve_source(base, cache_dir=cache_dir)
        except CharfwError:
            source = None
            note = f"model family {family} (as given; the base model is not found)"
        if source is not None:
            try:
                found = detect_family(source, declared=section.family).require_trained()
                family, note = found.name, f"model family {found.describe()}"
            except FamilyUnavailable as exc:
                note = f"model family {family} assumed ({exc.message.partition(': ')[2]})"
            except CharfwError as exc:
                key = "family" if section.family and "model.family says" in exc.message else "base"
                raise lm.error(("model", key), str(exc)) from None
    return ModelRefs(base, resolve(section.vae, "vae"), section.clip_skip, family), note


def images_dir(ws: Workspace, lm: LoadedManifest, value: str, loc: Loc) -> Path:
    """An images folder of a manifest (relative to its folder); one outside the workspace
    is a manifest error unless the manifest says ``images_outside_workspace: true``."""
    folder = (lm.base_dir / Path(value).expanduser()).resolve()
    if not folder.is_relative_to(ws.root) and not getattr(lm.manifest, "images_outside_workspace", False):
        raise lm.error(loc, f"the folder {display_path(folder)} is outside the workspace ({display_path(ws.root)}/); "
                       "move the images into the workspace, or allow it with images_outside_workspace: true "
                       "at the top of the manifest")
    return folder


def character_parts(ws: Workspace, lm: LoadedManifest, model: ModelRefs | None = None) -> list[PartInfo]:
    m: CharacterManifest = lm.manifest  # type: ignore[assignment]
    if model is None:
        model = _model_refs(lm, m.model, ws.cache_dir)[0]
    sets = ws.templates.angle_sets

    def angles(part: Any) -> tuple[str, ...]:
        codes = part.angles if part.angles is not None else sets[part.template].codes(m.symmetric)
        return tuple(c for c in codes if c not in set(part.exclude))

    face = PartInfo(
        target=m.name,
        name="face",
        kind="face",
        keyword=m.face.keyword or m.keyword,
        class_tokens=m.face.class_tokens or m.class_tokens or m.face.keyword or m.keyword,
        tags=tuple(m.face.tags),
        repeats=m.face.repeats or m.repeats,
        symmetric=m.symmetric,
        template=m.face.template,
        angles=angles(m.face),
        images_dir=images_dir(ws, lm, m.face.images, ("face", "images")),
        model=model,
    )
    parts = [face]
    for name, body in m.bodies.items():
        keyword, class_tokens = body_identity(m.keyword, m.class_tokens, name, body.keyword)
        parts.append(
            PartInfo(
                target=m.name,
                name=name,
                kind="body",
                keyword=keyword,
                class_tokens=body.class_tokens or class_tokens,
                tags=tuple(body.tags),
                repeats=body.repeats or m.repeats,
                symmetric=m.symmetric,
                template=body.template,
                angles=angles(body),
                images_dir=images_dir(ws, lm, body.images, ("bodies", name, "images")),
                model=model,
                members=(face,),
            )
        )
    return parts


# --- stage choices -----------------------------------------------------------------------


@dataclass
class Pick:
    """One plugin a manifest picks for a stage, with its raw options and their locations."""

    name: str
    options: dict[str, Any]
    #: where each option key (and "" for the block itself) is written
    locs: dict[str, Loc]


@dataclass
class ResolvedPick:
    component: Component
    options: Any
    plugin: PluginInfo
    #: where each option key (and "" for the block itself) is written in the manifest
    locs: dict[str, Loc] = field(default_factory=dict)


def _parse_block(lm: LoadedManifest, spec: StageSpec, raw: Any, loc: Loc) -> list[Pick] | None:
    """A stage block → picks; None when the block switches the stage off."""

    def one(item: Any, where: Loc, allow_bare: bool) -> Pick:
        if isinstance(item, str):
            return Pick(item.strip(), {}, {"": where})
        if isinstance(item, dict):
            opts = dict(item)
            name = opts.pop("plugin", None)
            if name is not None and not isinstance(name, str):
                raise lm.error((*where, "plugin"), "expected a plugin name")
            if name is None and not allow_bare:
                raise lm.error(where, "each entry of a chain needs 'plugin: <name>'")
            locs = {k: (*where, k) for k in opts}
            locs[""] = (*where, "plugin") if name is not None else where
            return Pick(name or "", opts, locs)
        raise lm.error(where, "expected a plugin name, a mapping with 'plugin:' and options, or off")

    if raw is False or (isinstance(raw, str) and raw.strip().lower() in ("off", "none", "false")):
        if not spec.can_disable:
            raise lm.error(loc, f"the {spec.name} stage cannot be switched off")
        return None
    if raw is None or raw is True:
        raise lm.error(loc, "give a plugin name, a mapping with 'plugin:' and options, or off")
    if isinstance(raw, list):
        if not spec.chainable:
            raise lm.error(loc, f"the {spec.name} stage takes one plugin, not a list")
        if not raw:
            raise lm.error(loc, "an empty list; give at least one plugin")
        return [one(item, (*loc, i), False) for i, item in enumerate(raw)]
    return [one(raw, loc, True)]


def _combine(base: list[Pick] | None, over: list[Pick] | str | None) -> list[Pick] | None:
    """A part's block over its character's: options of the same plugin merge, else replace."""
    if over == "unset":
        return base
    if over is None or base is None:
        return over if over is not None else None  # type: ignore[return-value]
    assert isinstance(over, list)
    if len(over) == 1 and len(base) == 1 and over[0].name in ("", base[0].name):
        merged = {**base[0].options, **over[0].options}
        locs = {**base[0].locs, **{k: v for k, v in over[0].locs.items() if k}}
        return [Pick(base[0].name, merged, locs)]
    return over


def _picks_for(lm: LoadedManifest, spec: StageSpec, part_loc: Loc | None) -> list[Pick] | None:
    m = lm.manifest
    default = [Pick(spec.default, {}, {"": ()})] if spec.default else None
    picks: list[Pick] | str | None = "unset"
    if spec.name in m.stages:
        picks = _parse_block(lm, spec, m.stages[spec.name], ("stages", spec.name))
    current = _combine(default, picks)
    if part_loc is not None:
        part_stages = _part_stages(lm, part_loc)
        if part_stages is not None and spec.name in part_stages:
            over = _parse_block(lm, spec, part_stages[spec.name], (*part_loc, "stages", spec.name))
            current = _combine(current, over)
    if current is not None:
        for p in current:
            if not p.name:
                raise lm.error(p.locs[""], f"no plugin named for the {spec.name} stage and it has no default")
    return current


def _part_stages(lm: LoadedManifest, part_loc: Loc) -> dict[str, Any] | None:
    m: Any = lm.manifest
    if part_loc == ("face",):
        return m.face.stages
    if part_loc[0] == "bodies":
        return m.bodies[part_loc[1]].stages
    return None


def resolve_picks(
    lm: LoadedManifest, spec: StageSpec, picks: list[Pick], plugins: PluginSystem
) -> tuple[list[ResolvedPick], str | None]:
    """Look plugins up and validate their options. Returns (resolved, missing-message).

    A name close to a registered one is treated as a typo (a manifest error); a name that
    is not installed at all stops the build at this stage instead."""
    registry = plugins.registry
    noun = KINDS[spec.kind][2]
    resolved: list[ResolvedPick] = []
    problems: list[str] = []
    for pick in picks:
        reg = registry.find(spec.kind, pick.name)
        if reg is None:
            close = registry.suggestion(spec.kind, pick.name)
            if close is not None:
                problems.append(lm.problem(pick.locs[""], registry.unknown_message(spec.kind, pick.name)))
                continue
            if not pick.locs[""]:  # nothing in the manifest: the stage's default
                return [], f"the {noun} '{pick.name}' (the {spec.name} stage's default) is not installed"
            return [], lm.problem(pick.locs[""], f"the {noun} '{pick.name}' is not installed")
        try:
            options = reg.component.Options.model_validate(pick.options)
        except ValidationError as exc:
            for loc, msg in pydantic_messages(exc, reg.component.Options):
                key = str(loc[0]) if loc else ""
                base = pick.locs.get(key) or pick.locs[""]
                full = (*base, *loc[1:]) if key in pick.locs else (*base, *loc)
                problems.append(lm.problem(full, msg))
            continue
        resolved.append(ResolvedPick(reg.component, options, reg.plugin, pick.locs))
    if problems:
        raise ManifestError(problems)
    return resolved, None


# --- the plan ----------------------------------------------------------------------------


@dataclass(eq=False)
class PlannedStage:
    spec: StageSpec
    part: PartInfo
    dir: Path
    chain: list[ResolvedPick] = field(default_factory=list)
    #: why the stage cannot run (its plugin is not installed)
    missing: str | None = None
    #: off in the manifest: later stages read from the stage before it
    off: bool = False
    #: upstream stages by the key the stage's context knows them under
    deps: dict[str, PlannedStage] = field(default_factory=dict)
    #: the manifest that picks the stage's plugins, and the one whose ``model:`` the part
    #: trains on (a group without one: its first member's), for errors with file and line
    manifest: LoadedManifest | None = None
    model_manifest: LoadedManifest | None = None

    @property
    def key(self) -> str:
        return f"{self.part.label}:{self.spec.name}"

    #: the plugin names the manifest asks for (shown even when one is missing)
    wanted: list[str] = field(default_factory=list)

    @property
    def plugin_names(self) -> str:
        if self.off:
            return "off"
        return " + ".join(self.wanted) or "-"

    def locate(self, exc: CharfwError, pick: ResolvedPick) -> CharfwError:
        """``exc`` from ``pick``'s ``check``, with the manifest file, line and key in front
        when it names one of the pick's options (``exc.option``) or a manifest key
        (``exc.manifest_key``, such as model.base); an option the manifest leaves out is
        named where it would go."""
        if isinstance(exc, ManifestError):
            return exc
        lm, loc = None, None
        if exc.option is not None and self.manifest is not None:
            lm = self.manifest
            loc = pick.locs.get(exc.option)
            if loc is None:
                block = pick.locs.get("") or ("stages", self.spec.name)
                loc = (*(block[:-1] if block[-1] == "plugin" else block), exc.option)
        elif exc.manifest_key is not None and self.model_manifest is not None:
            lm, loc = self.model_manifest, exc.manifest_key
        if lm is None or loc is None:
            return exc
        return ManifestError([lm.problem(loc, str(exc))])


@dataclass
class Plan:
    workspace: Workspace
    targets: list[str]
    stages: list[PlannedStage]
    #: lines shown under a part's name before its stages, by part label
    notes: dict[str, list[str]] = field(default_factory=dict)

    def parts(self) -> list[PartInfo]:
        seen: list[PartInfo] = []
        for s in self.stages:
            if s.part not in seen:
                seen.append(s.part)
        return seen


class Planner:
    """Builds a :class:`Plan`: parts, their stages and plugin chains, links, order.

    Each part is planned once (a character's parts are shared by the groups it is in);
    manifest problems are collected across all manifests and raised together."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.plugins = ws.plugins
        #: each part's stages, by part label
        self.stages_of: dict[str, list[PlannedStage]] = {}
        #: each character's parts, by character name
        self.parts_of: dict[str, list[PartInfo]] = {}
        self.ordered: list[PlannedStage] = []
        self.problems: list[str] = []
        #: lines the plan shows under a part's name (the model family found), by part label
        self.notes: dict[str, list[str]] = {}

    def plan(self, names: list[str] | None = None) -> Plan:
        """Plan characters and groups by name, or one part of a character (``krnk/krnksf``,
        ``krnk/face``): then only the stages of other parts that it reads are planned (its
        face's images for a body), and the plan says so under those parts."""
        targets = [_split_target(n) for n in names] if names else [(None, None)]
        loaded = [(self.ws.load(n), part) for n, part in targets] if names else \
            [(lm, None) for lm in self.ws.load_all()]
        if not loaded:
            raise CharfwError(
                f"no manifests in {self.ws.characters_dir}", hint="create one with `charfw init NAME`"
            )
        wanted: list[str] = []
        for lm, part_name in loaded:
            if isinstance(lm.manifest, CharacterManifest):
                parts = self.character(lm)
                for part in self.select(lm, parts, part_name):
                    wanted.append(part.label)
                    if part_name is not None:  # what it reads of the other parts first, part by part
                        needed = {d for ps in self.stages_of[part.label] for d in _closure(ps)}
                        for other in parts:
                            self.add([s for s in self.stages_of[other.label] if s in needed])
                    self.add(self.stages_of[part.label])
        for lm, part_name in loaded:
            if isinstance(lm.manifest, GroupManifest):
                if part_name not in (None, "group"):
                    raise CharfwError(f"'{lm.name}' is a group: it has one part, not '{part_name}'",
                                      hint=f"build it with `charfw build {lm.name}`")
                self.group(lm)
                wanted.append(f"{lm.name}/group")
        if self.problems:
            raise ManifestError(self.problems)
        if any(part is not None for _, part in loaded):
            self.note_upstream(wanted)
        return Plan(self.ws, [lm.name for lm, _ in loaded], self.ordered, self.notes)

    @staticmethod
    def select(lm: LoadedManifest, parts: list[PartInfo], name: str | None) -> list[PartInfo]:
        """All of a character's parts, or the one ``name`` picks."""
        if name is None:
            return parts
        found = [p for p in parts if p.name == name]
        if not found:
            import difflib

            names = [p.name for p in parts]
            close = difflib.get_close_matches(name, names, n=1)
            raise CharfwError(f"character '{lm.name}' has no part '{name}'",
                              hint=(f"did you mean '{lm.name}/{close[0]}'? " if close else "")
                              + f"its parts: {', '.join(names)}")
        return found

    def note_upstream(self, wanted: list[str]) -> None:
        """Under each part that was not asked for but has stages in the plan: which stages,
        and for which part (they run when out of date, else their outputs are reused)."""
        for label in dict.fromkeys(s.part.label for s in self.ordered):
            if label in wanted:
                continue
            stages = [s for s in self.ordered if s.part.label == label]
            readers = sorted({s.part.label for s in self.ordered if s.part.label in wanted
                              and any(d in stages for d in _closure(s))})
            self.notes.setdefault(label, []).append(
                f"not asked for: its {', '.join(s.spec.name for s in stages)} stage(s) run or are reused "
                f"because {', '.join(readers)} reads them")

    # --- characters and groups -----------------------------------------------------------

    def character(self, lm: LoadedManifest) -> list[PartInfo]:
        """A character's parts, planned and linked (once)."""
        if lm.name in self.parts_of:
            return self.parts_of[lm.name]
        model, note = _model_refs(lm, lm.manifest.model, self.ws.cache_dir)  # type: ignore[union-attr]
        parts = character_parts(self.ws, lm, model)
        if note:
            self.notes[parts[0].label] = [note]
        for part in parts:
            self.part(lm, part, ("face",) if part.kind == "face" else ("bodies", part.name))
        for part in parts:
            self.link(self.stages_of[part.label], self.dataset_inputs(part), self.lora_inputs(part))
        self.parts_of[lm.name] = parts
        return parts

    def group(self, lm: LoadedManifest) -> None:
        g: GroupManifest = lm.manifest  # type: ignore[assignment]
        members = [m for i, ref in enumerate(g.members) if (m := self.member(lm, i, ref)) is not None]
        if self.problems:
            return
        first = members[0]
        if g.model is not None:
            model, note = _model_refs(lm, g.model, self.ws.cache_dir)
        else:
            model, note = first.model, self.notes.get(self.parts_of[first.target][0].label, [None])[0]
        if note:
            self.notes[f"{g.name}/group"] = [note]
        part = PartInfo(target=g.name, name="group", kind="group", keyword=g.name, class_tokens=g.name,
                        repeats=1, symmetric=all(m.symmetric for m in members), model=model,
                        members=tuple(members))
        if g.images is not None:
            # the group's own pictures: the members' body codes (no code is required), each
            # caption naming every member in its outfit after the group's name and tags
            templates = sorted({m.template for m in members if m.template})
            if len(templates) != 1:
                self.problems.append(lm.problem(("images",), "the members' bodies follow different angle templates "
                                                f"({', '.join(templates)}); group pictures need one"))
                return
            tags = [*g.tags, *(t for m in members for t in (m.keyword, *m.tags))]
            part = dataclasses.replace(part, images_dir=images_dir(self.ws, lm, g.images, ("images",)),
                                       template=templates[0], tags=tuple(dict.fromkeys(tags)),
                                       repeats=g.repeats or first.repeats)
        stages = self.part(lm, part, None)
        if g.model is None:  # the first member's model
            for ps in stages:
                ps.model_manifest = self.ws.load(first.target)
        self.link(stages, self.dataset_inputs(part), self.lora_inputs(part))
        # add() puts what the group's stages need first: its members' image stages (the
        # dataset reads them), not their training
        self.add(stages)

    def member(self, lm: LoadedManifest, index: int, ref: str) -> PartInfo | None:
        """The body part a group's ``members[index]`` (``character/body``) names."""
        char_name, body = ref.split("/")
        try:
            member_lm = self.ws.load(char_name)
        except CharfwError as exc:
            self.problems.append(lm.problem(("members", index), str(exc)))
            return None
        if not isinstance(member_lm.manifest, CharacterManifest):
            self.problems.append(lm.problem(("members", index), f"'{char_name}' is a group, not a character"))
            return None
        parts = self.character(member_lm)
        found = [p for p in parts if p.kind == "body" and p.name == body]
        if not found:
            bodies = [p.name for p in parts if p.kind == "body"]
            self.problems.append(lm.problem(("members", index), f"character '{char_name}' has no body '{body}'; "
                                            f"its bodies: {', '.join(bodies) or 'none'}"))
            return None
        return found[0]

    # --- one part ------------------------------------------------------------------------

    def part(self, lm: LoadedManifest, part: PartInfo, part_loc: Loc | None) -> list[PlannedStage]:
        """The stages of one part with their resolved plugin chains (once per part)."""
        if part.label in self.stages_of:
            return self.stages_of[part.label]
        stages: list[PlannedStage] = []
        for spec in STAGES:
            if not stage_applies(spec, part):
                continue
            ps = PlannedStage(spec, part, self.ws.build_dir / part.target / part.name / spec.name,
                              manifest=lm, model_manifest=lm)
            try:
                picks = _picks_for(lm, spec, part_loc)
                if picks is None:
                    ps.off = True
                else:
                    ps.wanted = [p.name for p in picks]
                    ps.chain, ps.missing = resolve_picks(lm, spec, picks, self.plugins)
            except ManifestError as exc:
                self.problems.extend(p for p in exc.problems if p not in self.problems)
            stages.append(ps)
        self.stages_of[part.label] = stages
        return stages

    @staticmethod
    def link(stages: list[PlannedStage], dataset_inputs: dict[str, PlannedStage],
             lora_inputs: dict[str, PlannedStage] | None = None) -> None:
        """Each stage reads from the stage before it that is on; the dataset stage reads the
        last image stage of every part its dataset holds; the draft stage (a side branch
        that nothing reads) reads the finished LoRAs of the parts it builds on."""
        previous: PlannedStage | None = None
        for ps in stages:
            if ps.spec.side_branch:
                ps.deps = dict(lora_inputs or {})
                continue
            if ps.spec.gate and previous is not None:
                ps.deps = gate_inputs(stages, previous)
                continue
            if ps.spec.name == "dataset":
                ps.deps = dict(dataset_inputs)
            elif previous is not None:
                ps.deps = {previous.key: previous}
            if not ps.off:
                previous = ps

    def dataset_inputs(self, part: PartInfo) -> dict[str, PlannedStage]:
        return {p.label: self.last_image_stage(p.label) for p in dataset_parts(part)} \
            if part.label in self.stages_of else {}

    def lora_inputs(self, part: PartInfo) -> dict[str, PlannedStage]:
        """The stages whose finished LoRA a part's drafts use: a body's face, a group's
        member bodies."""
        return {m.label: self.last_lora_stage(m.label) for m in part.members if m.label in self.stages_of}

    def last_lora_stage(self, label: str) -> PlannedStage:
        lora_stages = [s for s in self.stages_of[label] if s.spec.name in ("train", "merge", "compress")]
        return [s for s in lora_stages if not s.off][-1]

    def last_image_stage(self, label: str) -> PlannedStage:
        image_stages = [s for s in self.stages_of[label] if s.spec.parts == IMAGE_PARTS and not s.spec.side_branch]
        return [s for s in image_stages if not s.off][-1]

    def add(self, stages: list[PlannedStage]) -> None:
        """Append stages to the order, each after everything it depends on."""
        for ps in stages:
            for needed in _closure(ps):
                if needed not in self.ordered:
                    self.ordered.append(needed)


def gate_inputs(stages: list[PlannedStage], previous: PlannedStage) -> dict[str, PlannedStage]:
    """What a check stage (lint) reads: the stage before it as "dataset"; for a part with
    image stages, its last one as "images" and the one the background stage read as
    "source" (the images before their background was replaced)."""
    deps = {"dataset": previous}
    image_stages = [s for s in stages if s.spec.parts == IMAGE_PARTS and not s.spec.side_branch and not s.off]
    if image_stages:
        deps["images"] = image_stages[-1]
        before = [s for s in image_stages if STAGE_NAMES.index(s.spec.name) < STAGE_NAMES.index("background")]
        deps["source"] = before[-1] if before else image_stages[0]
    return deps


def workspace_parts(ws: Workspace) -> tuple[PartInfo, ...]:
    """Every part of every character manifest in the workspace (those that load), for the
    checks that compare keywords across characters. Models are not looked at."""
    parts: list[PartInfo] = []
    for path in ws.manifest_paths():
        try:
            lm = ws.load(path)
        except CharfwError:
            continue  # its own build reports it
        if isinstance(lm.manifest, CharacterManifest):
            parts.extend(character_parts(ws, lm, ModelRefs()))
    return tuple(parts)


def _split_target(name: str) -> tuple[str, str | None]:
    """``krnk/krnksf`` → (``krnk``, ``krnksf``); a manifest name or file → (it, None)."""
    if Path(name).suffix in MANIFEST_SUFFIXES or name.count("/") != 1:
        return name, None
    character, part = name.split("/")
    return (character, part) if character and part else (name, None)


def make_plan(ws: Workspace, names: list[str] | None = None) -> Plan:
    """Plan the build of the named characters and groups (all manifests when None)."""
    return Planner(ws).plan(names)


def _closure(stage: PlannedStage) -> list[PlannedStage]:
    out: list[PlannedStage] = []

    def visit(s: PlannedStage) -> None:
        for dep in s.deps.values() if not s.off else ():  # a stage that is off reads nothing
            visit(dep)
        if s not in out:
            out.append(s)

    visit(stage)
    return out
