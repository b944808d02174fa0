"""A1111's ``parameters`` text (what PNG Info, Civitai and most image browsers read): write and parse.

AUTOMATIC1111's webui stores how an image was made as one text, the *infotext*, in the PNG
text chunk ``parameters`` (``modules/images.py`` ``save_image``, with
``PngImagePlugin.PngInfo().add_text``)::

    krnk, 1girl, school uniform, <lora:krnk_face:0.8>
    Negative prompt: lowres, bad hands
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: anything-v5, Lora hashes: "krnk_face: 3a5c19b8d0e2", Version: charfw 0.1.0

**Writing** (:func:`format_infotext`) follows ``modules/processing.py`` ``create_infotext``:
the prompt, then ``Negative prompt: …`` on its own line unless the negative prompt is empty,
then one line of ``key: value`` pairs joined by ``", "``, in A1111's key order — Steps,
Sampler, Schedule type, CFG scale, Seed, Size (``{w}x{h}``), Model hash, Model, VAE hash, VAE,
Denoising strength, Clip skip (only when > 1), then the ``extra_generation_params`` (here
Hires upscale, Hires resize, Lora hashes, then :attr:`GenerationParams.extra` in its order,
e.g. ``Emphasis``), then Version. ``None`` values are left out, a value equal to its key is
written as the bare key (which no reader reads back, A1111's included), and the whole text is
stripped. A value is quoted as A1111's
``infotext_utils.quote`` does — ``json.dumps(value, ensure_ascii=False)`` when it contains
``,``, a newline or ``:`` — and, charfw's only addition, also when A1111's own reader would
not read the plain value back (leading or trailing whitespace, or a value that both starts
and ends with ``"``); A1111 reads those quoted values correctly. Numbers are written as
Python writes them, a whole float as an integer (``CFG scale: 7``, as A1111's texts show).

**Reading** (:func:`parse_infotext`) follows ``modules/infotext_utils.py``
``parse_generation_parameters``: the last line is the parameter line when its regex finds
at least 3 ``key: value`` pairs (otherwise the whole text is prompt); the lines before it are
the prompt until a line starting with ``Negative prompt:``, then the negative prompt; every
line is stripped and the lines are joined by ``\\n``; quoted values are JSON-decoded; keys
charfw has no field for are kept, in order and as text, in :attr:`GenerationParams.extra`.
Where A1111 fills defaults for absent keys charfw keeps what the text says, so a round trip
is exact: no ``Clip skip`` is 1 (as in A1111), no ``Schedule type`` is ``None`` (A1111's
"Automatic"; :func:`charfw.generation.samplers.resolve_sampler` reads both the same).
Inherited limits of the format, not fixed here: whitespace at the start and end of each
prompt line is lost, ``\\r`` too, and a prompt line that starts with ``Negative prompt:`` is
read as the start of the negative prompt.

**Hashes.** :func:`model_hash` is A1111's checkpoint short hash (``sd_models``:
first 10 hex digits of the sha256 of the whole file); :func:`lora_short_hash` is the hash
A1111's Lora extension writes into ``Lora hashes`` (``extensions-builtin/Lora/network.py``
``NetworkOnDisk``).

:func:`save_png` writes the image with the ``parameters`` chunk atomically (a temporary
file renamed into place, :mod:`charfw.build.atomic`).

Nothing here imports torch or PIL at import time.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..build import atomic
from ..build.hashing import sha256_file
from ..errors import CharfwError

if TYPE_CHECKING:
    from PIL import Image

#: the PNG text chunk A1111 writes and reads
PNG_KEY = "parameters"

#: A1111's ``re_param``: one ``key: value`` pair of the parameter line (value quoted or up to a comma)
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
#: A1111's ``re_imagesize``
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
#: a key :func:`parse_infotext` can find again (A1111's key group: 2 characters or more;
#: no trailing space)
_RE_KEY = re.compile(r"\w[\w \-/]*[\w\-/]")

_NEGATIVE = "Negative prompt:"

#: the keys :class:`GenerationParams` has fields for, in the order they are written
FIELD_KEYS: tuple[str, ...] = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
    "VAE hash", "VAE", "Denoising strength", "Clip skip", "Hires upscale", "Hires resize",
    "Lora hashes", "Version",
)


def charfw_version() -> str:
    """The ``Version`` charfw writes: ``charfw <version>``.

    Not a bare ``0.1.0``: A1111's ``infotext_versions.backcompat`` parses ``Version`` with
    ``packaging`` and, for anything older than 1.6, turns on compatibility options (old
    prompt-editing timelines, downcast ``alphas_cumprod``) when the text is pasted. A
    version with a name in front does not parse, so A1111 leaves its settings alone."""
    return f"charfw {__version__}"


@dataclass(kw_only=True)
class GenerationParams:
    """What made an image, by A1111's infotext keys (written by :func:`format_infotext`).

    Required: ``prompt``, ``steps``, ``sampler`` (A1111's name, e.g. ``SamplerSpec.display_name``),
    ``cfg_scale``, ``seed``, ``width``, ``height``. Optional values are left out of the text
    when ``None``; ``clip_skip`` only when it is more than 1; ``lora_hashes`` only when not
    empty. ``extra`` holds the other ``extra_generation_params`` in the order they are
    written (``Emphasis``, ``Hires steps`` …; text values); a plain dict given to it is kept
    as an :class:`~collections.OrderedDict`, so two params are equal only with the same order.
    """

    prompt: str
    negative: str = ""
    steps: int
    sampler: str
    #: A1111 ≥ 1.9 writes the schedule separately ("Karras", "Automatic"); ``None``: not written
    schedule_type: str | None = None
    cfg_scale: float
    seed: int
    width: int
    height: int
    #: :func:`model_hash` of the checkpoint (10 hex digits)
    model_hash: str | None = None
    #: the checkpoint's name without its extension (A1111's ``Model``)
    model_name: str | None = None
    vae_hash: str | None = None
    vae_name: str | None = None
    clip_skip: int = 1
    #: img2img strength, or the hires pass's
    denoising_strength: float | None = None
    #: hires fix by factor (``Hires upscale: 2``)
    hires_upscale: float | None = None
    #: hires fix to a size (``Hires resize: 1024x1536``), ``(width, height)``
    hires_resize: tuple[int, int] | None = None
    #: ``(alias, short hash)`` per LoRA, written as ``Lora hashes: "alias: hash, alias2: hash2"``
    lora_hashes: list[tuple[str, str]] = field(default_factory=list)
    extra: OrderedDict[str, str] = field(default_factory=OrderedDict)
    version: str | None = field(default_factory=charfw_version)

    def __post_init__(self) -> None:
        if not isinstance(self.extra, OrderedDict):
            self.extra = OrderedDict(self.extra)
        self.lora_hashes = [(str(a), str(h)) for a, h in self.lora_hashes]
        if self.hires_resize is not None:
            w, h = self.hires_resize
            self.hires_resize = (int(w), int(h))

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        return (self.width, self.height)


# --- writing ------------------------------------------------------------------------------


def _number(value: float | int) -> str:
    """A number as A1111's texts show it: whole floats without ``.0``, others exactly."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def quote(value: str) -> str:
    """A value as it goes into the parameter line.

    A1111 (``infotext_utils.quote``): JSON with non-ASCII kept when it contains ``,``, a
    newline or ``:``; else as is. charfw also quotes a value A1111's reader would change: one
    with whitespace at either end, or one that starts and ends with ``"``."""
    if "," in value or "\n" in value or ":" in value:
        return json.dumps(value, ensure_ascii=False)
    if value != value.strip() or (len(value) >= 2 and value[0] == '"' and value[-1] == '"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def format_lora_hashes(pairs: Iterable[tuple[str, str]]) -> str:
    """``alias: hash, alias2: hash2``, as A1111's Lora extension writes them.

    As A1111 does, ``:`` and ``,`` are removed from an alias (they would break the list)
    and a LoRA without an alias or a hash is left out."""
    items = []
    for alias, short in pairs:
        alias = alias.replace(":", "").replace(",", "")
        if alias and short:
            items.append(f"{alias}: {short}")
    return ", ".join(items)


def parse_lora_hashes(text: str) -> list[tuple[str, str]]:
    """The pairs of a ``Lora hashes`` value (A1111's ``lora_script.infotext_pasted`` reading:
    split on ``,``, then on the first ``:``); an item without ``:`` is skipped."""
    pairs = []
    for item in text.split(","):
        alias, sep, short = item.partition(":")
        if sep and alias.strip():
            pairs.append((alias.strip(), short.strip()))
    return pairs


def _pairs(params: GenerationParams) -> list[tuple[str, Any]]:
    for key in params.extra:
        if key in FIELD_KEYS:
            raise CharfwError(f"infotext: extra key '{key}' is a GenerationParams field",
                              hint="set the field instead")
        if not _RE_KEY.fullmatch(key):
            raise CharfwError(f"infotext: extra key '{key}' cannot be read back",
                              hint="use letters, digits, spaces, '-', '/' and '_', starting with a letter or digit")
    lora = format_lora_hashes(params.lora_hashes)
    return [
        ("Steps", params.steps),
        ("Sampler", params.sampler),
        ("Schedule type", params.schedule_type),
        ("CFG scale", params.cfg_scale),
        ("Seed", params.seed),
        ("Size", f"{params.width}x{params.height}"),
        ("Model hash", params.model_hash),
        ("Model", params.model_name),
        ("VAE hash", params.vae_hash),
        ("VAE", params.vae_name),
        ("Denoising strength", params.denoising_strength),
        ("Clip skip", params.clip_skip if params.clip_skip > 1 else None),
        ("Hires upscale", params.hires_upscale),
        ("Hires resize", None if params.hires_resize is None else "{}x{}".format(*params.hires_resize)),
        ("Lora hashes", lora or None),
        *params.extra.items(),
        ("Version", params.version),
    ]


def format_parameters_line(params: GenerationParams) -> str:
    """The last line of the infotext: ``Steps: 20, Sampler: …, Version: …``."""
    parts = []
    for key, value in _pairs(params):
        if value is None:
            continue
        text = _number(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)
        parts.append(key if key == text else f"{key}: {quote(text)}")
    return ", ".join(parts)


def format_infotext(params: GenerationParams) -> str:
    """The whole infotext, exactly as A1111's ``create_infotext`` lays it out."""
    negative = f"\n{_NEGATIVE} {params.negative}" if params.negative else ""
    return f"{params.prompt}{negative}\n{format_parameters_line(params)}".strip()


# --- reading ------------------------------------------------------------------------------


def _unquote(value: str) -> str:
    """A1111's ``unquote``: JSON-decode a ``"…"`` value; leave it as is if that fails."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def parse_parameters_line(line: str) -> OrderedDict[str, str]:
    """The ``key: value`` pairs of a parameter line, unquoted, in order (a later key wins)."""
    out: OrderedDict[str, str] = OrderedDict()
    for key, value in _RE_PARAM.findall(line):
        out[key] = _unquote(value)
    return out


def split_infotext(text: str) -> tuple[str, str, OrderedDict[str, str]]:
    """``(prompt, negative prompt, pairs)`` as A1111's ``parse_generation_parameters`` reads them."""
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), parse_parameters_line(last)


def _convert(key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise CharfwError(f"infotext: {key} '{value}' is not {'an integer' if kind is int else 'a number'}") from None


def _size(key: str, value: str) -> tuple[int, int]:
    match = _RE_SIZE.match(value)
    if not match:
        raise CharfwError(f"infotext: {key} '{value}' is not WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def parse_infotext(text: str) -> GenerationParams:
    """A :class:`GenerationParams` from an infotext (A1111's, Forge's or charfw's).

    Raises :class:`~charfw.errors.CharfwError` when the text has no parameter line or lacks
    one of Steps, Sampler, CFG scale, Seed, Size, or when a number is malformed."""
    prompt, negative, pairs = split_infotext(text)
    missing = [k for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if k not in pairs]
    if missing:
        raise CharfwError(f"not an A1111 parameters text: no {', '.join(missing)}" if pairs
                          else "not an A1111 parameters text: no 'Steps: …, Sampler: …' line")
    width, height = _size("Size", pairs.pop("Size"))
    fields: dict[str, Any] = {
        "prompt": prompt,
        "negative": negative,
        "steps": _convert("Steps", pairs.pop("Steps"), int),
        "sampler": pairs.pop("Sampler"),
        "schedule_type": pairs.pop("Schedule type", None),
        "cfg_scale": _convert("CFG scale", pairs.pop("CFG scale"), float),
        "seed": _convert("Seed", pairs.pop("Seed"), int),
        "width": width,
        "height": height,
        "model_hash": pairs.pop("Model hash", None),
        "model_name": pairs.pop("Model", None),
        "vae_hash": pairs.pop("VAE hash", None),
        "vae_name": pairs.pop("VAE", None),
        "version": pairs.pop("Version", None),
    }
    if "Clip skip" in pairs:
        fields["clip_skip"] = _convert("Clip skip", pairs.pop("Clip skip"), int)
    for key, name in (("Denoising strength", "denoising_strength"), ("Hires upscale", "hires_upscale")):
        if key in pairs:
            fields[name] = _convert(key, pairs.pop(key), float)
    if "Hires resize" in pairs:
        fields["hires_resize"] = _size("Hires resize", pairs.pop("Hires resize"))
    fields["lora_hashes"] = parse_lora_hashes(pairs.pop("Lora hashes", ""))
    fields["extra"] = pairs
    return GenerationParams(**fields)


# --- hashes -------------------------------------------------------------------------------


def model_hash(path: str | os.PathLike[str]) -> str:
    """A1111's checkpoint hash for ``Model hash``: the first 10 hex digits of the sha256 of
    the whole file (``sd_models.CheckpointInfo``: ``shorthash = sha256[0:10]``), read in
    chunks. (The pre-2023 8-digit hash of 64 KiB at 1 MiB is not written by A1111 any more.)

    A diffusers folder has no such hash (A1111 loads single files): a folder is an error;
    leave :attr:`GenerationParams.model_hash` ``None`` for it."""
    p = Path(path)
    if p.is_dir():
        raise CharfwError("A1111's model hash is of a single checkpoint file, not a folder", path=p,
                          hint="leave the model hash out for a diffusers folder")
    try:
        return sha256_file(p)[:10]
    except OSError as exc:
        raise CharfwError(f"cannot read the model file ({exc.strerror or exc})", path=p) from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8 or n > 100_000_000:
                raise CharfwError("not a safetensors file (bad header length)", path=path)
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise CharfwError(f"cannot read the LoRA file ({exc.strerror or exc})", path=path) from None
    except (ValueError, UnicodeDecodeError):
        raise CharfwError("not a safetensors file (the header is not JSON)", path=path) from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def lora_short_hash(path: str | os.PathLike[str], *, use_metadata: bool = True) -> str:
    """The LoRA hash A1111 writes into ``Lora hashes``: 12 hex digits.

    A1111 (``extensions-builtin/Lora/network.py`` ``NetworkOnDisk``) takes the file's
    ``sshs_model_hash`` metadata as it is, unchecked, else computes the "addnet" hash
    (``modules/hashes.py`` ``addnet_hash_safetensors``: the sha256 of the safetensors data
    section, everything after the 8-byte length and the JSON header; for other files the
    sha256 of the whole file), and keeps ``hash[0:12]``. charfw does the same; kohya and
    charfw write a correct ``sshs_model_hash`` (the same data-section sha256), so both
    ways agree on their files. ``use_metadata=False`` always computes the hash (for a file
    whose stored hash may be stale).

    Length: charfw's reference marks 12 vs 8 UNVERIFIED. 12 is chosen because every
    A1111 and Forge copy of ``NetworkOnDisk.set_hash`` read takes ``[0:12]`` (as does
    ``kohya-formats.md``); the one 8-digit copy is a fork's (with Flux/Chroma detection,
    SD.Next-like), not A1111's."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        try:
            return sha256_file(p)[:12]
        except OSError as exc:
            raise CharfwError(f"cannot read the LoRA file ({exc.strerror or exc})", path=p) from None
    meta = _safetensors_metadata(p)
    stored = meta.get("sshs_model_hash", "")
    if use_metadata and stored:
        return stored[:12]
    from ..lora.safetensors_io import data_sha256

    return data_sha256(p)[:12]


# --- PNG ------------------------------------------------------------------------------------


def save_png(image: Image.Image, path: str | os.PathLike[str], params: GenerationParams, *,
             extra_chunks: Mapping[str, str] | None = None) -> Path:
    """Write ``image`` as a PNG with the infotext in its ``parameters`` text chunk, atomically.

    As A1111's ``save_image``: ``PngInfo().add_text("parameters", infotext)`` (PIL writes a
    ``tEXt`` chunk, or ``iTXt`` when the text is not Latin-1). ``extra_chunks`` adds more
    text chunks (charfw's own keys, say); ``parameters`` cannot be one of them. The file is
    written to a temporary name beside ``path`` and renamed, so it is complete or absent."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, format_infotext(params))
    for key, value in (extra_chunks or {}).items():
        if key == PNG_KEY:
            raise CharfwError(f"save_png: '{PNG_KEY}' is written from the params, not extra_chunks")
        info.add_text(key, value)
    dest = Path(path)
    with atomic.atomic_path(dest) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return dest


def read_png_infotext(path: str | os.PathLike[str]) -> str | None:
    """The ``parameters`` text of a PNG (``image.text["parameters"]``), or ``None``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get(PNG_KEY)
    except OSError as exc:
        raise CharfwError(f"cannot read the image ({exc})", path=path) from None
    return text if isinstance(text, str) else None
