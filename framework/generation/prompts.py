"""A1111's prompt syntax and its weighted text encoding, so a prompt gives the conditioning
AUTOMATIC1111's webui would give it; and charfw's prompt files.

A prompt is read in three steps, as A1111 does:

1. **Extra networks** (:func:`extract_extra_networks`, A1111 ``modules/extra_networks.py``):
   every ``<kind:arg1:arg2:…>`` tag (regex ``<(\\w+):([^>]+)>``) is removed from the text to
   encode; its arguments are split on ``:``, an argument with one ``=`` is named
   (``te=0.5``), the others are positional. The prompt written to the infotext keeps the
   tags. :func:`extract_loras` reads ``<lora:…>`` tags as :class:`LoraRef`:

   ==================================  ==================================================
   ``<lora:name>``                     te 1, unet 1
   ``<lora:name:w>``                   te w, unet w
   ``<lora:name:te:unet>``             A1111 ≥ 1.5; named ``te=`` / ``unet=`` override
   ``<lora:name:w:lbw=PRESET>``        LoRA Block Weight: a preset name or a vector
   ``<lora:name:w:lbw=1,0,…>``         (``w=`` is LBW's other spelling of ``lbw=``)
   ``<lora:name:w:FACE>``              the older LBW form: a third item that is not a
                                       number is the block spec (LBW itself now fails on
                                       it, reading it as ``unet``)
   ==================================  ==================================================

2. **Emphasis** (:func:`parse_attention`, A1111 ``modules/prompt_parser.py``
   ``parse_prompt_attention``): ``(text)`` multiplies the weight by 1.1, ``(text:1.3)`` by
   1.3, ``[text]`` by 1/1.1; brackets nest by multiplying; ``\\( \\) \\[ \\] \\\\`` are
   literal; a bracket left open applies to the rest of the prompt, a closing one without
   an opening one is text; ``BREAK`` (uppercase, a whole word) ends the current chunk.
   Adjacent pieces of equal weight are merged.

3. **Chunks and encoding** (:func:`tokenize_prompt`, :func:`encode_prompt`, A1111
   ``modules/sd_hijack_clip.py`` and ``modules/sd_emphasis.py``): each piece is tokenized
   without start/end tokens and its tokens go into chunks of 75; when a chunk is full and
   its last comma is at most 20 tokens back (``comma_padding_backtrack``), the tokens after
   that comma move to the next chunk; ``BREAK`` starts a new chunk. Each chunk becomes
   start + 75 + end = 77 tokens, padded with the end token (SD 1.x; a tokenizer with its own
   pad token, SD 2.x, gets it after the first end token). Each chunk goes through the text
   encoder on its own (clip skip N: the N-th hidden state from the end, then the final
   layer norm; 1 is the last layer). Emphasis ``Original``, A1111's default, multiplies
   every token vector by its weight and then rescales the chunk so that its mean is what
   it was: ``z *= w; z *= mean_before / mean_after``. The chunks are joined along the token
   axis: an 80-token prompt is ``[1, 154, dim]``.

:func:`encode_pair` encodes a prompt and its negative prompt to equal lengths for diffusers'
``prompt_embeds`` / ``negative_prompt_embeds``.

Where charfw differs from A1111, and why:

* **Unequal chunk counts.** diffusers' pipelines need the prompt and the negative prompt
  the same length, so the shorter gets empty chunks (the encoding of ``""``) appended. A1111
  does exactly this only with its option "Pad prompt/negative prompt" on; by default it runs
  the UNet on the two conditionings separately at their own lengths. The images agree
  whenever both have the same number of chunks (both under 75 tokens, the usual case).
* **BREAK inside brackets** still breaks. A1111 multiplies its internal marker's weight too,
  so ``(a BREAK b)`` there encodes the word "break" with weight -1.1 instead of breaking.
* **Bad numbers are errors.** ``(word:1..2)`` crashes A1111 with a ``ValueError``; here it
  is a :class:`~charfw.errors.CharfwError` that quotes the prompt, and so is a bad number in
  a ``<lora:…>`` tag (A1111 fails at generation time).
* **Tags charfw cannot apply are errors**, not skipped: ``<hypernet:…>`` and other kinds,
  the ``dyn=`` dimension, LBW's ``lbwe=``, ``start=``/``stop=``/``step=`` and ``R``/``U``/``X``
  vector entries. A1111 skips an unknown kind silently, which would give a different image
  with no sign of why. ``<lyco:…>`` is read as ``<lora:…>``, as A1111 ≥ 1.5 does.
* The mean is restored per prompt. A1111 takes it over the whole batch of prompts encoded
  together; for a batch of one prompt (or of copies of one prompt) that is the same.
* A chunk whose weighted mean is near zero (below 1e-4 of its mean absolute value) is not
  rescaled: A1111 divides by it and gets huge values or NaN (seen with untrained encoders
  such as charfw's tiny test model); real CLIP encoders' means are far from zero.

Clip skip: charfw (and A1111, and kohya) count 1 as "the last layer"; diffusers' pipelines
count 0 or ``None`` as the last layer, so charfw's N is diffusers' N - 1
(:func:`diffusers_clip_skip`).

Prompt files (:mod:`charfw.generation.prompt_files`, for ``charfw generate``): one prompt per line;
blank lines and lines starting with ``#`` are skipped; ``positive|||negative`` (the format
of the method's generation notebook) and kohya's sample-prompt options after the prompt
(`` --n --w --h --d --s --l --ss``, read by :func:`charfw.training.sample_prompts.parse_options`).

Importing this module is cheap: torch and transformers load inside the encoding functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from charfw.training.text_states import clip_text_states

from ..errors import CharfwError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BREAK",
    "CHUNK_LENGTH",
    "COMMA_PADDING_BACKTRACK",
    "EMPHASIS_MODES",
    "Emphasis",
    "ExtraNetwork",
    "LoraRef",
    "PromptChunk",
    "diffusers_clip_skip",
    "empty_chunk",
    "encode_chunks",
    "encode_pair",
    "encode_pair_pooled",
    "encode_prompt",
    "extract_extra_networks",
    "extract_loras",
    "is_break",
    "lora_ref",
    "parse_attention",
    "plain_text",
    "tokenize_prompt",
]

#: tokens of text per chunk; a chunk is these between a start and an end token
CHUNK_LENGTH = 75
#: A1111's default "Prompt word wrap length limit" (``comma_padding_backtrack``)
COMMA_PADDING_BACKTRACK = 20
#: the text of the marker :func:`parse_attention` puts where ``BREAK`` was
BREAK = "BREAK"
_BREAK_WEIGHT = -1.0
_ROUND = 1.1
_SQUARE = 1 / 1.1

#: A1111's emphasis modes (its ``Emphasis`` infotext values): ``Original`` multiplies and
#: restores the mean, ``No norm`` only multiplies, ``Ignore`` parses the brackets but
#: applies no weight, ``None`` reads brackets as plain text
Emphasis = Literal["Original", "No norm", "Ignore", "None"]
EMPHASIS_MODES: tuple[str, ...] = ("Original", "No norm", "Ignore", "None")


# --- emphasis ----------------------------------------------------------------------------

# the alternatives of A1111's re_attention, in its order: escapes, a lone backslash, the
# brackets, ":weight)" closing a round bracket, text without brackets or colons, a colon
_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\
    | \(
    | \[
    | :\s*([+-]?[.\d]+)\s*\)
    | \)
    | ]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A prompt (without extra-network tags) → ``(text, weight)`` pieces, as A1111's
    ``parse_prompt_attention``; a ``BREAK`` is the marker ``("BREAK", -1.0)``
    (see :func:`is_break`).

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_attention("a BREAK b")
    [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]
    """
    pieces: list[list[Any]] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, by: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= by

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise CharfwError(f"prompt '{_short(text)}': '{weight}' in '{token}' is not a number",
                                  hint=r"write a weight like (word:1.2), or \( \) for literal brackets") from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK_RE.split(token)):
                if i:
                    pieces.append([BREAK, _BREAK_WEIGHT, True])
                pieces.append([part, 1.0, False])
    for start in round_open:
        multiply(start, _ROUND)
    for start in square_open:
        multiply(start, _SQUARE)
    if not pieces:
        pieces = [["", 1.0, False]]

    merged: list[list[Any]] = [pieces[0]]
    for piece in pieces[1:]:
        last = merged[-1]
        if not piece[2] and not last[2] and piece[1] == last[1]:
            last[0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w, _ in merged]


def is_break(piece: tuple[str, float]) -> bool:
    """Whether a piece from :func:`parse_attention` is the ``BREAK`` marker."""
    return piece[0] == BREAK and piece[1] == _BREAK_WEIGHT


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- extra networks ------------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")
_LORA_KEYS = ("te", "unet", "lbw", "w")


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:arg:…>`` tag: its kind, its ``:``-separated items, the tag as written."""

    kind: str
    items: tuple[str, ...]
    tag: str

    @property
    def positional(self) -> tuple[str, ...]:
        """The items without exactly one ``=`` (A1111's ``ExtraNetworkParams.positional``)."""
        return tuple(item for item in self.items if len(item.split("=", 2)) != 2)

    @property
    def named(self) -> dict[str, str]:
        """``key=value`` items (A1111's ``ExtraNetworkParams.named``; a later key wins)."""
        pairs = (item.split("=", 2) for item in self.items)
        return {p[0]: p[1] for p in pairs if len(p) == 2}


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove every ``<kind:…>`` tag from ``text``: (the text to encode, the tags in order).

    >>> extract_extra_networks("krnk, <lora:krnk_face:0.8>smile")
    ('krnk, smile', [ExtraNetwork(kind='lora', items=('krnk_face', '0.8'), tag='<lora:krnk_face:0.8>')])
    """
    found: list[ExtraNetwork] = []

    def take(match: re.Match[str]) -> str:
        found.append(ExtraNetwork(match.group(1), tuple(match.group(2).split(":")), match.group(0)))
        return ""

    return _EXTRA_NETWORK.sub(take, text), found


@dataclass(frozen=True)
class LoraRef:
    """A LoRA a prompt asks for: its name (a file stem or alias), the multipliers for the
    text encoder and the UNet, and a LoRA Block Weight spec (a preset name such as ``FACE``
    or comma-separated ratios; resolved by :func:`charfw.lora.block_weights.resolve_weights`
    once the LoRA's base model is known)."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    blocks: str | None = None

    def tag(self) -> str:
        """The shortest ``<lora:…>`` tag that reads back as this reference."""
        parts = [self.name, f"{self.te:g}"]
        if self.unet != self.te:
            parts.append(f"{self.unet:g}")
        if self.blocks is not None:
            parts.append(f"lbw={self.blocks}")
        return f"<lora:{':'.join(parts)}>"


def _number(value: str, what: str, tag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise CharfwError(f"{tag}: {what} '{value}' is not a number",
                          hint="write <lora:name:weight> or <lora:name:te:unet>")
    return number


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_blocks(spec: str, tag: str) -> str:
    from charfw.lora.block_weights import is_preset_name, parse_vector

    spec = spec.strip()
    if not spec:
        raise CharfwError(f"{tag}: the block weights are empty", hint="give a preset name or comma-separated ratios")
    if is_preset_name(spec):
        if not re.fullmatch(r"[\w.+-]+", spec):
            raise CharfwError(f"{tag}: '{spec}' is not a block-weight preset name or a list of numbers")
        return spec
    try:
        parse_vector(spec)
    except CharfwError as exc:
        raise CharfwError(f"{tag}: {exc.message}",
                          hint="LBW's R, U and X entries are not supported; give numbers") from None
    return spec


def lora_ref(network: ExtraNetwork) -> LoraRef:
    """A ``<lora:…>`` (or ``<lyco:…>``) tag → :class:`LoraRef`, read as A1111 ≥ 1.5 and LoRA
    Block Weight read it (the module docstring has the forms). Errors name the tag."""
    tag = network.tag
    if network.kind not in _LORA_KINDS:
        raise CharfwError(f"{tag}: not a LoRA tag")
    positional, named = network.positional, network.named
    unknown = [k for k in named if k not in _LORA_KEYS]
    if unknown:
        key = unknown[0]
        why = {"dyn": "charfw applies the whole LoRA, not a lower dynamic rank",
               "lbwe": "LBW's elemental weights are not supported",
               "start": "LBW's step ranges are not supported", "stop": "LBW's step ranges are not supported",
               "step": "LBW's step ranges are not supported",
               "x": "LBW's X entries are not supported"}.get(key)
        raise CharfwError(f"{tag}: unknown key '{key}='" + (f" ({why})" if why else ""),
                          hint="use te=, unet= or lbw= (w=)")
    if not positional or not positional[0].strip():
        raise CharfwError(f"{tag}: no LoRA name", hint="write <lora:name:weight>")
    if len(positional) > 3:
        raise CharfwError(f"{tag}: too many items ('{positional[3]}'; A1111 reads a fourth as the dynamic rank, "
                          "which charfw does not support)", hint="write <lora:name:te:unet:lbw=PRESET>")
    name = positional[0].strip()
    te = _number(positional[1], "weight", tag) if len(positional) > 1 else 1.0
    if "te" in named:
        te = _number(named["te"], "te", tag)
    blocks: str | None = None
    unet = te
    if len(positional) > 2:
        if _is_number(positional[2]):
            unet = _number(positional[2], "unet weight", tag)
        else:
            blocks = positional[2]
    if "unet" in named:
        unet = _number(named["unet"], "unet", tag)
    for key in ("lbw", "w"):
        if key in named:
            if blocks is not None:
                raise CharfwError(f"{tag}: block weights are given twice", hint="give one of lbw=, w= or a preset item")
            blocks = named[key]
    if blocks is not None:
        blocks = _check_blocks(blocks, tag)
    return LoraRef(name, te, unet, blocks)


def extract_loras(text: str) -> tuple[str, list[LoraRef]]:
    """Remove the ``<lora:…>`` tags: (the text to encode, the LoRAs in order). A tag of
    another kind (``<hypernet:…>``) is an error: charfw cannot apply it."""
    clean, networks = extract_extra_networks(text)
    refs = []
    for network in networks:
        if network.kind not in _LORA_KINDS:
            raise CharfwError(f"{network.tag}: charfw applies only <lora:…> tags, not '{network.kind}'",
                              hint="remove the tag from the prompt")
        refs.append(lora_ref(network))
    return clean, refs


# --- chunks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids (start, 75, end/padding) and the weight of each."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise CharfwError("the tokenizer has no start or end token; A1111 prompts need a CLIP tokenizer")
    pad = tokenizer.pad_token_id
    return bos, eos, eos if pad is None else pad


def _finish(body: list[int], weights: list[float], ids: tuple[int, int, int]) -> PromptChunk:
    bos, eos, pad = ids
    fill = CHUNK_LENGTH - len(body)
    tokens = [bos, *body, *[eos] * fill, eos]
    if pad != eos:  # SD 2.x: what follows the first end token is the pad token
        first = tokens.index(eos)
        tokens[first + 1 :] = [pad] * (len(tokens) - first - 1)
    return PromptChunk(tuple(tokens), (1.0, *weights, *[1.0] * fill, 1.0))


def empty_chunk(tokenizer: Any) -> PromptChunk:
    """The chunk of an empty prompt (A1111's ``empty_chunk``)."""
    return _finish([], [], _special_ids(tokenizer))


def tokenize_prompt(tokenizer: Any, text: str, *, emphasis: Emphasis = "Original",
                    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK) -> list[PromptChunk]:
    """A prompt (tags already removed) → its chunks, as A1111's ``tokenize_line``.

    Always at least one chunk; ``BREAK`` ends the current chunk even when it is empty (so
    ``BREAK a`` is two chunks, as in A1111); a chunk of a trailing ``BREAK`` is not made."""
    _check_emphasis(emphasis)
    ids = _special_ids(tokenizer)
    pieces = [(text, 1.0)] if emphasis == "None" else parse_attention(text)
    texts = [t for t, w in pieces if not is_break((t, w))]
    # verbose=False: no warning that a piece is longer than the encoder's 77 tokens
    ids_of = tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    encoded = iter(ids_of)
    comma = tokenizer.get_vocab().get(",</w>")

    chunks: list[PromptChunk] = []
    body: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal body, weights, last_comma
        chunks.append(_finish(body, weights, ids))
        body, weights, last_comma = [], [], -1

    for piece in pieces:
        if is_break(piece):
            next_chunk()
            continue
        weight = piece[1]
        for token in next(encoded):
            if token == comma:
                last_comma = len(body)
            elif (comma_padding_backtrack and len(body) == CHUNK_LENGTH and last_comma != -1
                  and len(body) - last_comma <= comma_padding_backtrack):
                # the chunk is full and a comma is near its end: what follows the comma moves on
                moved, moved_weights = body[last_comma + 1 :], weights[last_comma + 1 :]
                body, weights = body[: last_comma + 1], weights[: last_comma + 1]
                next_chunk()
                body, weights = moved, moved_weights
            if len(body) == CHUNK_LENGTH:
                next_chunk()
            body.append(token)
            weights.append(weight)
    if body or not chunks:
        next_chunk()
    return chunks


def _check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise CharfwError(f"unknown emphasis mode '{emphasis}'", hint=f"use one of {', '.join(EMPHASIS_MODES)}")


# --- encoding ------------------------------------------------------------------------------


def diffusers_clip_skip(clip_skip: int) -> int | None:
    """charfw's (A1111's, kohya's) clip skip → the ``clip_skip`` of diffusers' pipelines,
    which count one less: charfw 1 (the last layer) is diffusers' ``None``, 2 is 1."""
    if clip_skip < 1:
        raise CharfwError(f"clip skip {clip_skip}: it counts from 1 (the last layer)")
    return None if clip_skip == 1 else clip_skip - 1


def encode_chunks(text_encoder: Any, chunks: Sequence[PromptChunk], *, clip_skip: int = 1,
                  emphasis: Emphasis = "Original", device: Any = None, final_norm: bool = True) -> torch.Tensor:
    """Encode chunks and apply their weights: ``[len(chunks), 77, dim]``, one row per chunk.

    The chunks go through the encoder as one batch (each is encoded on its own: CLIP's
    attention stays within a sequence); the weights and the mean restore apply per chunk.
    ``final_norm`` False takes a skipped layer's states without the final layer norm
    (SDXL's CLIP-L, as SGM's ``layer="hidden"`` embedder and A1111 read it)."""
    import torch

    _check_emphasis(emphasis)
    layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
    if clip_skip < 1 or (layers is not None and clip_skip > layers):
        raise CharfwError(f"clip skip {clip_skip} is out of range for a text encoder of {layers} layers",
                          hint=f"use 1 to {layers}")
    if device is None:
        device = getattr(text_encoder, "device", None)
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
    with torch.no_grad():
        return _emphasis(clip_text_states(text_encoder, ids, clip_skip, final_norm=final_norm), chunks, emphasis)


def _emphasis(z: torch.Tensor, chunks: Sequence[PromptChunk], emphasis: Emphasis) -> torch.Tensor:
    """The chunks' token weights applied to their states ``z`` (A1111's ``sd_emphasis``)."""
    import torch

    if emphasis not in ("Original", "No norm"):
        return z
    weights = torch.tensor([c.weights for c in chunks], dtype=z.dtype, device=z.device)
    before = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * weights.unsqueeze(-1)
    if emphasis == "Original":
        after = weighted.mean(dim=(1, 2), keepdim=True)
        # a mean near zero (next to the values' size) makes mean/mean meaningless:
        # such a chunk keeps its weighted values, as "No norm" would
        size = weighted.abs().mean(dim=(1, 2), keepdim=True)
        usable = after.abs() > 1e-4 * size
        weighted = torch.where(usable, weighted * (before / torch.where(usable, after, 1)), weighted)
    # a chunk without emphasis is left as it is: A1111's z * (mean / mean) is z, but
    # 0 / 0 when a chunk's mean is exactly 0
    plain = (weights == 1).all(dim=1).reshape(-1, 1, 1)
    return torch.where(plain, z, weighted)


def encode_prompt(tokenizer: Any, text_encoder: Any, text: str, *, clip_skip: int = 1, device: Any = None,
                  emphasis: Emphasis = "Original",
                  comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK) -> torch.Tensor:
    """A prompt → A1111's conditioning, ``[1, 77 * chunks, dim]``.

    ``text`` is encoded as written: remove ``<lora:…>`` tags first (:func:`extract_loras`);
    a tag left in is encoded as plain text."""
    chunks = tokenize_prompt(tokenizer, text, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack)
    z = encode_chunks(text_encoder, chunks, clip_skip=clip_skip, emphasis=emphasis, device=device)
    return z.reshape(1, -1, z.shape[-1])


def _pair_chunks(tokenizer: Any, prompt: str, negative: str, emphasis: Emphasis,
                 comma_padding_backtrack: int) -> tuple[list[PromptChunk], int]:
    """The prompt's chunks then the negative's, the shorter padded with empty chunks to
    the same count ``k``: (2k chunks, k)."""
    options: dict[str, Any] = {"emphasis": emphasis, "comma_padding_backtrack": comma_padding_backtrack}
    cond = tokenize_prompt(tokenizer, prompt, **options)
    uncond = tokenize_prompt(tokenizer, negative, **options)
    count = max(len(cond), len(uncond))
    empty = empty_chunk(tokenizer)
    cond += [empty] * (count - len(cond))
    uncond += [empty] * (count - len(uncond))
    return cond + uncond, count


def encode_pair(tokenizer: Any, text_encoder: Any, prompt: str, negative: str = "", *, clip_skip: int = 1,
                device: Any = None, emphasis: Emphasis = "Original",
                comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
                final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt and its negative prompt → ``(cond, uncond)``, each ``[1, 77 * k, dim]`` with
    the same ``k``: the one with fewer chunks gets empty ones appended (see the module
    docstring). Pass them as diffusers' ``prompt_embeds`` and ``negative_prompt_embeds``.
    ``final_norm``: as :func:`encode_chunks`'."""
    chunks, count = _pair_chunks(tokenizer, prompt, negative, emphasis, comma_padding_backtrack)
    z = encode_chunks(text_encoder, chunks, clip_skip=clip_skip, emphasis=emphasis, device=device,
                      final_norm=final_norm)
    return z[:count].reshape(1, -1, z.shape[-1]), z[count:].reshape(1, -1, z.shape[-1])


def encode_pair_pooled(tokenizer: Any, text_encoder: Any, prompt: str, negative: str = "", *, layer: int = -2,
                       device: Any = None, emphasis: Emphasis = "Original",
                       comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK) -> tuple[torch.Tensor, ...]:
    """For a ``CLIPTextModelWithProjection`` whose hidden state ``layer`` (no final norm)
    conditions the model and whose projected pooled output too (SD 3.5; SDXL's second
    encoder): ``(cond, cond_pooled, uncond, uncond_pooled)``, the states ``[1, 77 * k, dim]``
    of equal ``k`` as :func:`encode_pair`, weighted the same way, the pooled ``[1, proj]``
    of each text's first chunk (A1111's rule for SDXL's pooled vector)."""
    import torch

    chunks, count = _pair_chunks(tokenizer, prompt, negative, emphasis, comma_padding_backtrack)
    if device is None:
        device = getattr(text_encoder, "device", None)
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=True)
        z = _emphasis(out.hidden_states[layer], chunks, emphasis)
    pooled = out.text_embeds
    return (z[:count].reshape(1, -1, z.shape[-1]), pooled[:1], z[count:].reshape(1, -1, z.shape[-1]),
            pooled[count : count + 1])


def plain_text(text: str) -> str:
    """A prompt without emphasis syntax and ``BREAK`` (for encoders A1111 does not weight:
    SD 3.5's T5)."""
    return " ".join(t.strip() for t, w in parse_attention(text) if not is_break((t, w)) and t.strip())
