"""``wd14``: tags from SmilingWolf's WD14 tagger models (v2 and v3 ONNX), and ``charfw wd14``.

In a build it is chained after the angle rules (``tag: [angle-rules, wd14]``) and, by
default (``policy: complement``), only *adds* what the rules cannot know: clothing,
accessories, hair style, objects. It never adds:

* a tag the caption already has, or one the rules imply (the groups of
  ``templates/tags/wd14-policy.yaml``: view, framing, background, pose, gaze,
  expression and nudity follow from the angle code and would only repeat or contradict
  it);
* the character's own traits listed in ``own_tags`` (hair and eye colour, ears, ...),
  the ``absorbed`` tags of the policy file (breast size), and character-name tags: the
  keyword absorbs the character's identity, which is what makes it a trigger word.

``policy: all`` adds every tag that passes the thresholds except exact repeats and
``own_tags``; it is what ``charfw wd14`` does on a plain folder.

The model is a folder with ``model.onnx`` and ``selected_tags.csv``, or a Hugging Face
id found in the local cache (downloaded once, with a message, unless ``download: false``
or offline). One session per model serves the whole build: models come from the build's
``ctx.models`` (``charfw wd14``: the command's), released when it ends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import charfw
from charfw import CharfwError, Options, Tagger
from charfw.build.hashing import sha256_file
from charfw.build.template_library import read_yaml_file
from charfw.errors import check_module
from charfw.folders.caption_command import caption_command
from charfw.folders.tag_text import danbooru_to_caption, escape_a1111, tag_key
from charfw.prep.onnx_runtime import ProviderChoice


def default_model() -> str:
    from charfw.prep.wd14 import DEFAULT_MODEL

    return os.environ.get("CHARFW_WD14_MODEL") or DEFAULT_MODEL


class WD14Options(Options):
    #: a folder with model.onnx and selected_tags.csv, or a Hugging Face id
    #: (default: $CHARFW_WD14_MODEL, else SmilingWolf/wd-vit-tagger-v3)
    model: str = Field(default_factory=default_model)
    #: a selected_tags.csv somewhere else than next to model.onnx
    tags_file: str | None = None
    general_threshold: float = Field(0.35, ge=0.0, le=1.0)
    character_threshold: float = Field(0.85, ge=0.0, le=1.0)
    #: use the MCut threshold instead of general_threshold / character_threshold
    general_mcut: bool = False
    character_mcut: bool = False
    #: add the most likely rating tag (general, sensitive, questionable, explicit)
    rating: bool = False
    #: complement: only what the angle rules do not already say; all: every passing tag
    policy: Literal["complement", "all"] = "complement"
    #: the character's own traits (hair, eyes, ears...): never added, the keyword absorbs them
    own_tags: list[str] = Field(default_factory=list)
    #: the implied/absorbed tag groups for policy complement (templates/ path or a file)
    policy_file: str = "tags/wd14-policy.yaml"
    #: escape \ ( ) for A1111 prompts (kohya reads plain captions literally: leave off)
    escape: bool = False
    #: at most this many WD14 tags per image (the most confident)
    max_tags: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, le=512)
    providers: ProviderChoice = "auto"
    #: fetch a Hugging Face model that is not in the local cache (with a message)
    download: bool = True


class ImpliedGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    when: list[str]
    drop: list[str]


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    implied: list[ImpliedGroup] = []
    absorbed: list[str] = []


def _load_policy(path: Path) -> PolicyFile:
    try:
        return PolicyFile.model_validate(read_yaml_file(Path(path)))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise CharfwError(f"{where}: {err['msg']}", path=path,
                          hint="see the comments at the top of the shipped wd14-policy.yaml") from None


def combine(wd14_tags: list[Any], so_far: list[str], own: list[str], policy: PolicyFile | None,
            options: WD14Options) -> list[str]:
    """The WD14 tags to append to a caption that already holds ``so_far``.

    ``policy`` None means ``policy: all`` (only repeats and ``own`` are left out)."""
    from charfw.prep.wd14 import CHARACTER

    present = {tag_key(t) for t in so_far}
    blocked = {tag_key(t) for t in own}
    if policy is not None:
        blocked |= {tag_key(t) for t in policy.absorbed}
        for group in policy.implied:
            if any(tag_key(t) in present for t in group.when):
                blocked |= {tag_key(t) for t in group.drop}
    out: list[str] = []
    for scored in wd14_tags:
        if policy is not None and scored.category == CHARACTER:
            continue  # identity belongs to the keyword
        text = danbooru_to_caption(scored.name)
        key = tag_key(text)
        if key in present or key in blocked:
            continue
        present.add(key)
        out.append(escape_a1111(text) if options.escape else text)
        if options.max_tags is not None and len(out) >= options.max_tags:
            break
    return out


class WD14Tagger(Tagger):
    name = "wd14"
    version = "1"
    description = "WD14 tagger (SmilingWolf v2/v3 ONNX); in a chain, adds only what the angle rules do not say"
    Options = WD14Options
    needs_pixels = True

    def batch_size(self, ctx: Any, options: WD14Options) -> int:
        return options.batch_size

    # --- files -------------------------------------------------------------------------

    def _bases(self, ctx: Any) -> list[Path]:
        return [ctx.workspace_root, Path.cwd()]

    def _model_dir(self, ctx: Any, options: WD14Options, *, download: bool) -> Path:
        from charfw.prep.model_files import resolve_model_dir
        from charfw.prep.wd14 import MODEL_FILE, TAGS_FILE

        files = [MODEL_FILE] if options.tags_file else [MODEL_FILE, TAGS_FILE]
        return resolve_model_dir(options.model, files=files, what="WD14 tagger",
                                 bases=self._bases(ctx), download=download)

    def _tags_file(self, ctx: Any, options: WD14Options, folder: Path) -> Path:
        from charfw.prep.model_files import local_path
        from charfw.prep.wd14 import TAGS_FILE

        if options.tags_file is None:
            return folder / TAGS_FILE
        found = local_path(options.tags_file, self._bases(ctx))
        if found is None:
            raise CharfwError(f"{TAGS_FILE} is missing", path=options.tags_file)
        return found

    def _policy(self, ctx: Any, options: WD14Options) -> PolicyFile | None:
        if options.policy == "all":
            return None
        path = self._policy_path(ctx, options)
        return ctx.models.get(("wd14-policy", str(path), sha256_file(path)), lambda: _load_policy(path))

    def _policy_path(self, ctx: Any, options: WD14Options) -> Path:
        candidate = Path(options.policy_file)
        if candidate.is_absolute() or (ctx.workspace_root / candidate).is_file():
            path = candidate if candidate.is_absolute() else ctx.workspace_root / candidate
            if not path.is_file():
                raise CharfwError("WD14 policy file not found", path=path)
            return path
        return ctx.templates.find(options.policy_file)

    # --- engine hooks ------------------------------------------------------------------

    def check(self, ctx: Any, options: WD14Options) -> None:
        check_module("onnxruntime", extra="prep", purpose="the wd14 tagger")
        try:
            self._model_dir(ctx, options, download=False)
        except CharfwError:
            from charfw.prep.model_files import HF_ID, local_path, offline

            downloadable = (options.download and not offline() and HF_ID.match(options.model)
                            and local_path(options.model, self._bases(ctx)) is None)
            if not downloadable:
                raise
        if options.policy == "complement":
            self._policy_path(ctx, options)

    def cache_key(self, ctx: Any, options: WD14Options) -> Any:
        policy = ctx.sha256(self._policy_path(ctx, options)) if options.policy == "complement" else None
        try:
            folder = self._model_dir(ctx, options, download=False)
        except CharfwError:
            return [options.model, "not downloaded yet", policy]  # re-runs once after the download
        from charfw.prep.wd14 import MODEL_FILE

        return [ctx.sha256(folder / MODEL_FILE), ctx.sha256(self._tags_file(ctx, options, folder)), policy]

    def model(self, ctx: Any, options: WD14Options) -> Any:
        """The loaded model, from ``ctx.models`` (shared by every stage of the build)."""
        from charfw.prep.onnx_runtime import choose_providers
        from charfw.prep.wd14 import WD14Model

        folder = self._model_dir(ctx, options, download=options.download)
        tags = self._tags_file(ctx, options, folder)
        providers = choose_providers(options.providers, auto_order=("cuda", "coreml", "cpu"),
                                     purpose="WD14 tagger")
        key = ("wd14", str(folder), str(tags), tuple(providers))
        return ctx.models.get(key, lambda: WD14Model(folder, providers=providers, tags_file=tags))

    def tag(self, ctx, options, items, images, tags_so_far):
        from charfw.prep.wd14 import Thresholds

        model = self.model(ctx, options)
        thresholds = Thresholds(
            general=options.general_threshold, character=options.character_threshold,
            general_mcut=options.general_mcut, character_mcut=options.character_mcut,
            ratings="top" if options.rating else "none",
            characters=options.policy == "all",
        )
        scored = model.tag(images, thresholds)
        policy = self._policy(ctx, options)
        own = [*options.own_tags, ctx.part.keyword, ctx.part.class_tokens]
        return [combine(s, so_far, own, policy, options) for s, so_far in zip(scored, tags_so_far, strict=True)]


@charfw.hookimpl
def register_taggers(register):
    register(WD14Tagger())


@charfw.hookimpl
def register_commands(cli):
    caption_command(
        cli, "wd14", "wd14",
        help="""Tag images with a WD14 tagger: caption .txt files beside the images.

        Images are never touched. A caption that differs from the new one is kept unless
        --overwrite or --append is given.""",
        model_help="Folder with model.onnx + selected_tags.csv, or a Hugging Face id "
                   "(default: $CHARFW_WD14_MODEL or SmilingWolf/wd-vit-tagger-v3).",
        append_help="Add the new tags to existing captions.",
        options=[
            click.option("-t", "--threshold", "general_threshold", type=click.FloatRange(0, 1), default=0.35,
                         show_default=True, help="General tags pass above this score."),
            click.option("--character-threshold", type=click.FloatRange(0, 1), default=0.85, show_default=True),
            click.option("--mcut", is_flag=True, help="MCut thresholds instead of the fixed ones."),
            click.option("--rating", is_flag=True, help="Add the most likely rating tag."),
            click.option("--own", "own_tags", multiple=True, metavar="TAG",
                         help="A trait of the character never to add (repeatable)."),
            click.option("--with-rules", is_flag=True,
                         help="Chain after angle-rules (file names with angle codes) and add only what the "
                              "rules do not say (policy complement)."),
            click.option("--a1111", "escape", is_flag=True, help="Escape \\ ( ) for A1111 prompts."),
            click.option("-b", "--batch-size", type=click.IntRange(1, 512), default=8, show_default=True),
            click.option("--provider", "providers", type=click.Choice(["auto", "cpu", "cuda", "coreml"]),
                         default="auto", show_default=True),
        ],
        tagger_options=lambda p: {
            "general_threshold": p["general_threshold"], "character_threshold": p["character_threshold"],
            "general_mcut": p["mcut"], "character_mcut": p["mcut"], "rating": p["rating"],
            "own_tags": list(p["own_tags"]), "policy": "complement" if p["with_rules"] else "all",
            "escape": p["escape"], "batch_size": p["batch_size"], "providers": p["providers"],
        },
        chain_before=lambda p: ["angle-rules"] if p["with_rules"] else [],
    )
