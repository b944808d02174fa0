"""Character and group manifests: the YAML a user writes, validated with pydantic.

A *character* manifest (``characters/krnk.yaml``) names the character's keyword and class
tokens, its base model, a face part and zero or more body parts, and the plugin (with
options) each stage uses. A *group* manifest (``kind: group``) names body parts of
several characters to train together. Unknown keys are errors; every error names the
file, the YAML path and the line::

    characters/krnk.yaml:14 face.template: unknown template 'fcae'; known: body, face

Stage blocks (``stages:``) are kept raw here; the engine validates each one with the
``Options`` model of the plugin it picks (see :mod:`charfw.build.engine`).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from charfw.build.angles import AngleSet, parse_code
from charfw.build.stages import STAGE_NAMES
from charfw.build.yaml_lines import LineMap, Loc, format_loc, load_with_lines
from charfw.errors import ManifestError, display_path

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME_HINT = "use ASCII letters, digits, '.', '-' and '_' (it becomes a folder and file name)"
RESERVED_PART_NAMES = {"face", "group"}
#: the most repeats (kohya's num_repeats) a manifest, a folder name or a dataset config may
#: give: an epoch lists every image this often, so 10^12 would exhaust the memory; more
#: training comes from more steps or epochs
MAX_REPEATS = 1000
MEMBER_PATTERN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)$")

Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN)]


def _angle_code(code: str) -> str:
    parsed = parse_code(code)
    if parsed is None or len(code) != 3:
        raise ValueError(f"'{code}' is not an angle code like f00 or b24")
    return parsed.code


def _tag(value: str) -> str:
    return _check_tag_text(value, "tag")


def _member(value: str) -> str:
    if not MEMBER_PATTERN.match(value):
        raise ValueError(f"'{value}' is not '<character>/<body>', for example krnk/krnksf")
    return value


# validated one by one, so that an error points at the item's own line
AngleCodeText = Annotated[StrictStr, AfterValidator(_angle_code)]
TagText = Annotated[StrictStr, AfterValidator(_tag)]
MemberText = Annotated[StrictStr, AfterValidator(_member)]


def _check_tag_text(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{what} is empty")
    if "," in value:
        raise ValueError(f"{what} {value!r} contains a comma; captions separate tags with commas")
    if "\n" in value:
        raise ValueError(f"{what} must be on one line")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


#: charfw's built-in models (``charfw:tiny-sd15``)
BUILTIN_PREFIX = "charfw:"
#: a Hugging Face model id (``org/name``); anything else a model reference names is local
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: what a single-file checkpoint's name ends with
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def looks_local(ref: str) -> bool:
    """True when a model reference can only be a file or folder (a checkpoint name, a
    path starting with ``.``, ``/`` or ``~``), not a Hugging Face id or a built-in model."""
    text = ref.strip()
    if text.startswith(BUILTIN_PREFIX):
        return False
    return (text.endswith(SINGLE_FILE_SUFFIXES) or text.startswith((".", "/", "~")) or "\\" in text
            or not HUB_ID.match(text))


class ModelSection(_Strict):
    """The base model and VAE a character trains and samples with."""

    #: a Hugging Face id, a diffusers folder or a single-file checkpoint (relative to the manifest)
    base: StrictStr | None = None
    #: a separate VAE file or folder
    vae: StrictStr | None = None
    #: 1 = the text encoder's last layer, 2 = the penultimate (the method's choice)
    clip_skip: StrictInt = Field(2, ge=1, le=12)
    #: the model family; by default told from the checkpoint's tensors (needed only for a
    #: Hugging Face id that is not downloaded yet, and checked against the files otherwise)
    family: Literal["sd1", "sdxl", "sd35"] | None = None


class Part(_Strict):
    """What face and body parts share."""

    #: the folder of source images, relative to the manifest file
    images: StrictStr
    #: the angle set (a file in templates/angles/)
    template: StrictStr
    #: the exact angle codes this part expects (default: the template's, by symmetry)
    angles: list[AngleCodeText] | None = None
    #: codes of the template this part leaves out (for example [f04, f14, f24])
    exclude: list[AngleCodeText] = []
    keyword: StrictStr | None = None
    class_tokens: StrictStr | None = None
    #: tags written after the keyword in every caption of this part
    tags: list[TagText] = []
    #: how often each image is repeated per epoch (kohya's num_repeats)
    repeats: StrictInt | None = Field(None, ge=1, le=MAX_REPEATS)
    #: per-stage plugin choices for this part; they override the character's
    stages: dict[str, Any] = {}

    @field_validator("template")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        sets: dict[str, AngleSet] = (info.context or {}).get("angle_sets", {})
        if sets and value not in sets:
            close = difflib.get_close_matches(value, list(sets), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown template '{value}'{hint}; known: {', '.join(sorted(sets))}")
        return value

    @field_validator("keyword", "class_tokens")
    @classmethod
    def _identity(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_tag_text(value, info.field_name or "value")

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_stage_names(value)

    @model_validator(mode="after")
    def _codes_match_template(self, info: ValidationInfo) -> Part:
        sets: dict[str, AngleSet] = (info.context or {}).get("angle_sets", {})
        angle_set = sets.get(self.template)
        if angle_set is None:
            return self
        for field_name in ("angles", "exclude"):
            for code in getattr(self, field_name) or []:
                if code[0] != angle_set.prefix:
                    raise ValueError(
                        f"{field_name}: '{code}' does not belong to template '{self.template}' "
                        f"(its codes start with '{angle_set.prefix}')"
                    )
        return self


class FacePart(Part):
    template: StrictStr = "face"


class BodyPart(Part):
    template: StrictStr = "body"
    # keyword: default the character's keyword and the body's name (mia + casual →
    # miacasual; a name that holds the keyword stays: krnksf), see body_identity;
    # class_tokens: default that keyword and the face's class word (miacasual girl)


def body_identity(character_keyword: str, class_tokens: str | None, body: str,
                  keyword: str | None = None) -> tuple[str, str]:
    """A body's (keyword, class tokens) where its manifest leaves them out: a keyword no
    other character's part can share (the character's keyword, then the body's name,
    unless the name already holds the keyword), and class tokens made of it and the
    face's class word (``mia girl`` → ``miacasual girl``)."""
    if keyword is None:
        if character_keyword.casefold() in body.casefold():
            keyword = body
        else:
            keyword = f"{character_keyword}{' ' if ' ' in character_keyword else ''}{body}"
    tokens = class_tokens or character_keyword
    noun = tokens[len(character_keyword):].strip() if tokens.startswith(character_keyword) else tokens
    return keyword, f"{keyword} {noun}".strip()


def _check_stage_names(value: dict[str, Any]) -> dict[str, Any]:
    for key in value:
        if key not in STAGE_NAMES:
            close = difflib.get_close_matches(key, STAGE_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown stage '{key}'{hint}; stages: {', '.join(STAGE_NAMES)}")
    return value


class CharacterManifest(_Strict):
    kind: Literal["character"] = "character"
    #: the build folder name (build/<name>/)
    name: Name
    description: StrictStr = ""
    #: the face keyword (trigger word); it absorbs whatever the tags do not describe
    keyword: StrictStr
    #: kohya's class_tokens for the face images (default: the keyword)
    class_tokens: StrictStr | None = None
    #: true: angles 0-4 and flip augmentation; false: angles 0-7 and no flipping
    symmetric: StrictBool = True
    #: true: images folders may be outside the workspace (``/data/art``, ``../../shared``);
    #: off by default, so that a manifest from elsewhere reads nothing outside its workspace
    images_outside_workspace: StrictBool = False
    repeats: StrictInt = Field(1, ge=1, le=MAX_REPEATS)
    model: ModelSection = ModelSection()
    face: FacePart
    bodies: dict[Name, BodyPart] = {}
    stages: dict[str, Any] = {}

    @field_validator("keyword", "class_tokens")
    @classmethod
    def _identity(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_tag_text(value, info.field_name or "value")

    @field_validator("bodies")
    @classmethod
    def _body_names(cls, value: dict[str, BodyPart]) -> dict[str, BodyPart]:
        for name in value:
            if name in RESERVED_PART_NAMES:
                raise ValueError(f"a body cannot be called '{name}'")
        return value

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_stage_names(value)


class GroupManifest(_Strict):
    kind: Literal["group"]
    name: Name
    description: StrictStr = ""
    #: body parts to train together, as "<character>/<body>" (each brings its face images)
    members: list[MemberText] = Field(min_length=1)
    #: base model for the group (default: the first member's)
    model: ModelSection | None = None
    #: true: the group's images folder may be outside the workspace
    images_outside_workspace: StrictBool = False
    #: optional folder of pictures of the members together (relative to the manifest), named
    #: by the members' body angle codes (b00.png …; `charfw adopt` fills it from the group's
    #: drafts); trained with the members' images, captioned with every member's keyword
    images: StrictStr | None = None
    #: tags for the group's own pictures, after the group name (for example [2girls])
    tags: list[TagText] = []
    #: how often each group picture is repeated per epoch (default: the first member's)
    repeats: StrictInt | None = Field(None, ge=1, le=MAX_REPEATS)
    stages: dict[str, Any] = {}

    @field_validator("members")
    @classmethod
    def _members(cls, value: list[str]) -> list[str]:
        seen = set()
        for member in value:
            if member in seen:
                raise ValueError(f"'{member}' is listed twice")
            seen.add(member)
        return value

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_stage_names(value)


Manifest = CharacterManifest | GroupManifest


@dataclass
class LoadedManifest:
    """A validated manifest with where it came from, for later errors."""

    path: Path
    manifest: Manifest
    lines: LineMap

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def problem(self, loc: Loc, message: str) -> str:
        """One formatted problem line: ``file:line path: message``."""
        line = self.lines.line_of(loc)
        where = display_path(self.path) + (f":{line}" if line else "")
        return f"{where} {format_loc(loc)}: {message}" if loc else f"{where} {message}"

    def error(self, loc: Loc, message: str) -> ManifestError:
        return ManifestError([self.problem(loc, message)])


# --- turning pydantic errors into messages a user can act on ------------------------------


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    if origin is Annotated:
        return _strip_optional(typing.get_args(annotation)[0])
    return annotation


def _model_at(model: Any, loc: Loc) -> Any:
    """The pydantic model class that owns the keys at ``loc`` (best effort)."""
    current: Any = model
    for part in loc:
        current = _strip_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return None
    current = _strip_optional(current)
    if typing.get_origin(current) in (dict,):
        return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_TYPE_WORDS = {
    "string_type": "text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping of keys to values",
    "model_type": "a mapping of keys to values",
    "model_attributes_type": "a mapping of keys to values",
    "tuple_type": "a list",
}


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def pydantic_messages(exc: ValidationError, model: Any, prefix: Loc = ()) -> list[tuple[Loc, str]]:
    """(YAML path, message) for each error of a validation of ``model``."""
    out: list[tuple[Loc, str]] = []
    for err in exc.errors():
        loc: Loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            allowed = sorted(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key '{loc[-1]}'"
            if close:
                msg += f" (did you mean '{close[0]}'?)"
            if allowed:
                msg += f"; allowed here: {', '.join(allowed)}"
            out.append(((*prefix, *loc), msg))
        elif kind == "missing":
            out.append(((*prefix, *loc[:-1]), f"missing required key '{loc[-1]}'"))
        elif kind in _TYPE_WORDS:
            out.append(((*prefix, *loc), f"expected {_TYPE_WORDS[kind]}, got {_describe(err.get('input'))}"))
        elif kind == "string_pattern_mismatch":
            out.append(((*prefix, *loc), f"{err.get('input')!r} is not a valid name; {NAME_HINT}"))
        elif kind == "literal_error":
            out.append(((*prefix, *loc), f"{_describe(err.get('input'))} is not allowed; {err['msg'].replace('Input should be', 'use')}"))
        elif kind in ("value_error", "assertion_error"):
            msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            out.append(((*prefix, *loc), msg))
        else:
            msg = err["msg"].replace("Input should be", "should be")
            out.append(((*prefix, *loc), msg))
    return out


def load_manifest(path: Path, angle_sets: dict[str, AngleSet]) -> LoadedManifest:
    """Read and validate one manifest file; raise :class:`ManifestError` listing every problem."""
    data, lines = load_with_lines(path)
    stub = LoadedManifest(path, None, lines)  # type: ignore[arg-type]
    if data is None:
        raise stub.error((), "the file is empty; start from `charfw init NAME`")
    if not isinstance(data, dict):
        raise stub.error((), f"expected a mapping of keys to values at the top, got {_describe(data)}")
    kind = data.get("kind", "character")
    model: type[BaseModel]
    if kind == "group":
        model = GroupManifest
    elif kind == "character":
        model = CharacterManifest
    else:
        raise stub.error(("kind",), f"unknown kind {kind!r}; use character or group")
    try:
        manifest = model.model_validate(data, context={"angle_sets": angle_sets})
    except ValidationError as exc:
        problems = [stub.problem(loc, msg) for loc, msg in pydantic_messages(exc, model)]
        raise ManifestError(problems) from None
    expected = path.stem
    if manifest.name != expected:  # type: ignore[attr-defined]
        raise stub.error(
            ("name",),
            f"name '{manifest.name}' differs from the file name '{path.name}'; "  # type: ignore[attr-defined]
            f"make them the same so `charfw build {expected}` finds it",
        )
    return LoadedManifest(path, manifest, lines)  # type: ignore[arg-type]
