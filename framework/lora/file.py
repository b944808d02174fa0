"""The kohya-format LoRA file: its modules, network type, base model and metadata.

A LoRA file is a flat safetensors state dict. Every key is ``<module>.<suffix>`` where
``<module>`` is kohya's name of the layer it changes (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn1_to_q``, ``lora_te_text_model_encoder_layers_0_mlp_fc1``; SDXL files
use ``lora_te1_``/``lora_te2_`` and SGM UNet names such as ``lora_unet_input_blocks_4_1_…``,
see :mod:`.names`) and ``<suffix>`` says which tensor of which network type it is (SD 3.5 files in diffusers' peft
format, ``transformer.….lora_A.weight``, are read under kohya-style names and written back
in their own format, see :mod:`.peft_format`):

==========  =======================================================================================
type        suffixes (shapes for a layer ``out × in`` or ``out × in × k × k``)
==========  =======================================================================================
LoRA/LoCon  ``lora_down.weight`` [r, in(, k, k)], ``lora_up.weight`` [out, r(, 1, 1)], ``alpha``;
            Tucker conv adds ``lora_mid.weight`` [r, r, k, k] and has down [r, in, 1, 1]
LoHa        ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in·k·k], ``hada_w2_a``, ``hada_w2_b``, ``alpha``;
            Tucker: ``hada_t1``/``hada_t2`` [r, r, k, k], ``hada_w?_a`` [r, out], ``hada_w?_b`` [r, in]
LoKr        ``lokr_w1`` [a, c] or ``lokr_w1_a`` [a, r] + ``lokr_w1_b`` [r, c]; ``lokr_w2`` [b, d(, k, k)]
            or ``lokr_w2_a`` [b, r] + ``lokr_w2_b`` [r, d(·k·k)], or Tucker ``lokr_t2`` [r, r, k, k] +
            ``lokr_w2_a`` [r, b] + ``lokr_w2_b`` [r, d]; ``alpha``
Full        ``diff`` (the whole ΔW), ``diff_b`` (the bias change)
any         ``dora_scale`` (DoRA's magnitude vector): kept and reported, never recomputed
==========  =======================================================================================

:func:`read_lora` reads a file (safetensors memory-mapped into numpy arrays through
:mod:`.safetensors_io`, or a pickle checkpoint when allowed), refuses NaN/Inf and files with
no LoRA module, checks every module's shapes and groups the tensors into
:class:`LoraModule` objects; keys of types charfw does not know are kept aside and written
back unchanged. A module's ΔW and scale come from :mod:`.delta`; :meth:`LoraFile.save`
writes through :mod:`.safetensors_io`, with kohya's hashes.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError
from .delta import (
    lokr_factors,
    module_alpha,
    module_delta,
    module_kind,
    module_rank,
    module_scale,
)
from .names import conv_kernel_from_name, detect_family
from .peft_format import from_peft, is_peft, to_peft
from .safetensors_io import (
    FLOAT_DTYPES,
    SavedFile,
    check_finite,
    dtype_name,
    parse_precision,
    read_safetensors,
    scaled,
    to_numpy,
    to_torch,
    torch_dtype,
    write_safetensors,
)

if TYPE_CHECKING:
    import torch

# --- modules ---------------------------------------------------------------------------

LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL_KEYS = ("diff", "diff_b")
COMMON_KEYS = ("alpha", "dora_scale")
KIND_KEYS: dict[str, tuple[str, ...]] = {"lora": LORA_KEYS, "loha": LOHA_KEYS, "lokr": LOKR_KEYS, "full": FULL_KEYS}
KIND_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "Full"}


@dataclass(frozen=True)
class LoraModule:
    """One layer's change: its kohya name, network type and tensors (suffix → tensor).

    ``arrays`` are as read or made: numpy arrays (a file read) or torch tensors (a module
    computed by :mod:`.svd`); reading what a module is, scaling it and writing it need no
    torch. ``tensors`` are the same data as torch tensors (no copy), for the code that
    computes ΔW."""

    name: str
    #: "lora" (LoRA and LoCon), "loha", "lokr" or "full"
    kind: str
    arrays: Mapping[str, Any]
    #: the shape of the layer's weight this module changes: (out, in) or (out, in, kh, kw)
    shape: tuple[int, ...]

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors as torch tensors (imports torch; views, no copies)."""
        return {k: to_torch(v) for k, v in self.arrays.items()}

    def get(self, suffix: str) -> torch.Tensor | None:
        return self.tensors.get(suffix)

    @property
    def alpha(self) -> float | None:
        return module_alpha(self.arrays)

    @property
    def rank(self) -> int | None:
        """The rank ``alpha`` is divided by (None where alpha does not apply)."""
        return module_rank(self.arrays, self.kind)

    @property
    def scale(self) -> float:
        """``alpha / rank``; 1 when alpha is missing or 0, or the type has no rank."""
        return module_scale(self.arrays, self.kind)

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def tucker(self) -> bool:
        return any(k in self.arrays for k in ("lora_mid.weight", "hada_t1", "lokr_t2"))

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.arrays

    @property
    def label(self) -> str:
        """LoRA, LoCon (a LoRA on a k×k conv), LoHa, LoKr or Full."""
        if self.kind == "lora" and self.is_conv and any(k > 1 for k in self.kernel):
            return "LoCon"
        return KIND_LABELS[self.kind]

    @property
    def factor_key(self) -> tuple[str, ...]:
        """The tensor(s) whose scaling by r scales ΔW by exactly r (one factor per product)."""
        if self.kind == "lora":
            return ("lora_up.weight",)
        if self.kind == "loha":
            return ("hada_w1_a",)
        if self.kind == "lokr":
            return ("lokr_w1",) if "lokr_w1" in self.arrays else ("lokr_w1_a",)
        return tuple(k for k in FULL_KEYS if k in self.arrays)

    def keys(self) -> list[str]:
        return [f"{self.name}.{suffix}" for suffix in self.arrays]

    def delta(self) -> torch.Tensor:
        """The dense ΔW (fp32, scale included, multiplier 1), shaped like the layer's weight.

        DoRA modules: this is the low-rank direction only; the applied change also
        renormalises with ``dora_scale`` against the base weight, which a LoRA file lacks."""
        return module_delta(self.tensors, shape=self.shape)

    def lokr_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoKr only: the dense Kronecker factors (w1 [a, c], w2 [b, d(, k, k)]), unscaled."""
        return lokr_factors(self.tensors, self.kernel)

    def times(self, ratio: float) -> LoraModule:
        """This module with ΔW multiplied by exactly ``ratio``: one factor is scaled (in fp32,
        stored back in its dtype); alpha is never touched (LyCORIS reads alpha 0 as "full")."""
        if ratio == 1:
            return self
        new = dict(self.arrays)
        for key in self.factor_key:
            new[key] = scaled(new[key], ratio)
        return replace(self, arrays=new)


def check_module_finite(module: LoraModule, path: str | os.PathLike[str] | None = None) -> None:
    """Raise a :class:`CharfwError` naming the module and tensor that holds NaN or Inf
    (files are checked when read; this is for modules computed in memory)."""
    check_finite({f"{module.name}.{suffix}": t for suffix, t in module.arrays.items()}, path)


# --- the file ------------------------------------------------------------------------------


@dataclass
class LoraFile:
    """A LoRA file in memory: its modules, the keys charfw does not know, its metadata."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    #: tensors of types charfw cannot interpret (IA3, OFT, GLoRA, norms, embeddings…), by full
    #: key; they are written back unchanged and reported
    unknown: dict[str, Any] = field(default_factory=dict)
    family: str = "unknown"
    path: Path | None = None
    #: a diffusers/peft-format file (SD 3.5): module name → its dotted module path, so that
    #: it is written back in that format (:mod:`.peft_format`); empty for kohya files
    peft_paths: dict[str, str] = field(default_factory=dict)
    #: the open memory map the tensors view (kept alive with the file object)
    _buffer: Any = field(default=None, repr=False)

    # --- what the file is --------------------------------------------------------------

    @property
    def network_type(self) -> str:
        """``LoRA``, ``LoCon``, ``LoHa``, ``LoKr``, ``Full``, or several joined by " + "."""
        labels = Counter(m.label for m in self.modules.values())
        if not labels:
            return "none"
        order = ["LoCon", "LoRA", "LoHa", "LoKr", "Full"]
        present = [k for k in order if k in labels]
        if "LoCon" in present and "LoRA" in present:
            present.remove("LoRA")  # a LoCon file has linear modules too
        return " + ".join(present)

    @property
    def tucker(self) -> bool:
        return any(m.tucker for m in self.modules.values())

    @property
    def dora(self) -> int:
        return sum(1 for m in self.modules.values() if m.dora)

    @property
    def float_format(self) -> str:
        """The safetensors name ("F16", "BF16", "F32") of the float dtype most of the file's
        data is stored in: the default output dtype."""
        sizes: Counter[str] = Counter()
        for _, t in self.items():
            name = dtype_name(t)
            if name in FLOAT_DTYPES:
                sizes[name] += math.prod(t.shape)
        return sizes.most_common(1)[0][0] if sizes else "F32"

    @property
    def float_dtype(self) -> torch.dtype:
        """:attr:`float_format` as a torch dtype (imports torch)."""
        return torch_dtype(self.float_format)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every tensor by full key, as stored (numpy arrays or torch tensors): the
        modules', then the unknown ones."""
        for m in self.modules.values():
            for suffix, t in m.arrays.items():
                yield f"{m.name}.{suffix}", t
        yield from self.unknown.items()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by full key, as torch tensors (imports torch)."""
        return {k: to_torch(t) for k, t in self.items()}

    def unknown_modules(self) -> list[str]:
        """Module names of the unknown keys (the part before the first dot)."""
        return sorted({k.split(".", 1)[0] for k in self.unknown})

    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in self.modules.values() if m.rank is not None)

    def alphas(self) -> Counter[float]:
        return Counter(a for m in self.modules.values() if (a := m.alpha) is not None)

    def with_modules(self, modules: Iterable[LoraModule], *, unknown: dict[str, Any] | None = None,
                     metadata: dict[str, str] | None = None) -> LoraFile:
        """A new file with other modules (and optionally other unknown keys or metadata)."""
        return LoraFile(
            modules={m.name: m for m in modules},
            metadata=dict(self.metadata if metadata is None else metadata),
            unknown=dict(self.unknown if unknown is None else unknown),
            family=self.family,
            path=None,
            peft_paths=self.peft_paths,
            _buffer=self._buffer,
        )

    # --- writing -----------------------------------------------------------------------

    def save(self, dest: str | os.PathLike[str], *, precision: str | torch.dtype | None = None,
             metadata: Mapping[str, str] | None = None) -> SavedFile:
        """Write as safetensors (atomic), floats in ``precision`` (default: the file's own),
        with ``metadata`` (default: the file's) and freshly computed ``sshs_*`` hashes."""
        dtype = parse_precision(precision) or self.float_format
        header = dict(self.metadata if metadata is None else metadata)
        tensors = dict(self.items())
        if self.peft_paths:  # written back in diffusers' format (scale folded into lora_B)
            known = {k: to_torch(v) for k, v in tensors.items() if k not in self.unknown}
            tensors = {**to_peft(known, self.peft_paths), **self.unknown}
            header.setdefault("format", "pt")
        return write_safetensors(dest, tensors, header, dtype=dtype)


# --- reading -----------------------------------------------------------------------------


def read_lora(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA file: safetensors (memory-mapped), or a pickle checkpoint if allowed.

    Shapes are checked here (ranks of up/down/mid agree, factors have the dimensions
    their type needs): a bad module is a one-line :class:`CharfwError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CharfwError("no such file", path=path)
    tensors, metadata, buffer = _read_any(path, allow_pickle)
    peft_paths: dict[str, str] = {}
    if is_peft(tensors):
        tensors, peft_paths = from_peft(tensors)
    names_by_module: dict[str, dict[str, Any]] = {}
    unknown: dict[str, Any] = {}
    for key, t in tensors.items():
        module, dot, suffix = key.partition(".")
        if not dot:
            unknown[key] = t
            continue
        names_by_module.setdefault(module, {})[suffix] = t
    family = detect_family(names_by_module, metadata)
    if peft_paths and not any(k.startswith("unet.") for k in tensors):
        family = "sd35"  # text-encoder-only files of diffusers' SD3 trainer name no transformer block
    modules: dict[str, LoraModule] = {}
    for name, parts in names_by_module.items():
        kind = module_kind(parts)
        if kind == "unknown":
            unknown.update({f"{name}.{s}": t for s, t in parts.items()})
            continue
        allowed = set(KIND_KEYS[kind]) | set(COMMON_KEYS)
        own = {s: t for s, t in parts.items() if s in allowed}
        for s, t in parts.items():
            if s not in allowed:
                unknown[f"{name}.{s}"] = t
        shape = _check_module(name, kind, own, family, path)
        modules[name] = LoraModule(name, kind, own, shape)
    if not modules and not any(k.startswith("lora_") for k in unknown):
        _not_a_lora(path, list(tensors))
    return LoraFile(modules=modules, metadata=metadata, unknown=unknown, family=family, path=path,
                    peft_paths=peft_paths, _buffer=buffer)


def _not_a_lora(path: Path, keys: list[str]) -> None:
    """A file with no LoRA module and no key of a LoRA module's name (``lora_…``): a full
    checkpoint, a VAE, an embedding, an empty file."""
    if not keys:
        what = "it holds no tensors"
    else:
        what = f"none of its {len(keys)} keys is a LoRA module's (such as '{keys[0]}')"
    raise CharfwError(f"not a LoRA: {what}", path=path,
                      hint="give a LoRA, LoCon, LoHa or LoKr file (kohya, LyCORIS or diffusers format)")


def _shape(t: Any) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _bad(name: str, message: str, path: Path | None) -> CharfwError:
    return CharfwError(f"module {name}: {message}", path=path, hint="the file is damaged or not a LoRA charfw can read")


def _check_module(name: str, kind: str, t: Mapping[str, Any], family: str, path: Path | None) -> tuple[int, ...]:
    """Validate a module's tensor shapes and return the shape of the layer weight it changes."""

    def need(*keys: str) -> None:
        missing = [k for k in keys if k not in t]
        if missing:
            raise _bad(name, f"{', '.join(missing)} missing", path)

    if "alpha" in t and math.prod(t["alpha"].shape) != 1:
        raise _bad(name, f"alpha has shape {_shape(t['alpha'])}, expected a single number", path)
    if kind == "lora":
        need("lora_down.weight", "lora_up.weight")
        down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
        if len(down.shape) not in (2, 4) or len(up.shape) not in (2, 4):
            raise _bad(name, f"lora_up.weight {_shape(up)} / lora_down.weight {_shape(down)} are not 2-D or 4-D", path)
        if len(up.shape) == 4 and tuple(up.shape[2:]) != (1, 1):
            raise _bad(name, f"lora_up.weight {_shape(up)} is not a 1x1 conv", path)
        r = down.shape[0]
        if mid is not None:
            if len(mid.shape) != 4 or len(down.shape) != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != r:
                raise _bad(name, f"lora_up.weight {_shape(up)}, lora_mid.weight {_shape(mid)} and "
                                 f"lora_down.weight {_shape(down)} do not chain", path)
            return (up.shape[0], down.shape[1], *mid.shape[2:])
        if up.shape[1] != r:
            raise _bad(name, f"lora_up.weight {_shape(up)} and lora_down.weight {_shape(down)} have "
                             f"different ranks ({up.shape[1]} and {r})", path)
        return (up.shape[0], *down.shape[1:])
    if kind == "loha":
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1a, w1b, w2a, w2b = (t[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if ("hada_t1" in t) != ("hada_t2" in t):
            raise _bad(name, "has only one of hada_t1/hada_t2", path)
        if "hada_t1" in t:
            t1, t2 = t["hada_t1"], t["hada_t2"]
            ok = (len(t1.shape) >= 2 and t1.shape == t2.shape and w1a.shape == w2a.shape and w1b.shape == w2b.shape
                  and w1a.shape[0] == t1.shape[0] and w1b.shape[0] == t1.shape[1])
            if not ok:
                raise _bad(name, f"Tucker LoHa shapes do not chain: hada_t1 {_shape(t1)}, hada_w1_a "
                                 f"{_shape(w1a)}, hada_w1_b {_shape(w1b)}", path)
            return (w1a.shape[1], w1b.shape[1], *t1.shape[2:])
        for a, b, n in ((w1a, w1b, "1"), (w2a, w2b, "2")):
            if len(a.shape) != 2 or a.shape[1] != b.shape[0]:
                raise _bad(name, f"hada_w{n}_a {_shape(a)} and hada_w{n}_b {_shape(b)} have different ranks", path)
        out, cols = w1a.shape[0], int(math.prod(w1b.shape[1:]))
        if (w2a.shape[0], int(math.prod(w2b.shape[1:]))) != (out, cols):
            raise _bad(name, f"the two Hadamard factors have different shapes: ({out}, {cols}) and "
                             f"({w2a.shape[0]}, {math.prod(w2b.shape[1:])})", path)
        if len(w1b.shape) == 4:
            return (out, *w1b.shape[1:])
        return _unflatten(name, out, cols, family)
    if kind == "lokr":
        has_w1 = "lokr_w1" in t
        if has_w1 == ("lokr_w1_a" in t or "lokr_w1_b" in t):
            raise _bad(name, "needs either lokr_w1 or lokr_w1_a + lokr_w1_b", path)
        if not has_w1:
            need("lokr_w1_a", "lokr_w1_b")
            if t["lokr_w1_a"].shape[1] != t["lokr_w1_b"].shape[0]:
                raise _bad(name, f"lokr_w1_a {_shape(t['lokr_w1_a'])} and lokr_w1_b {_shape(t['lokr_w1_b'])} "
                                 "have different ranks", path)
            a, c = t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]
        else:
            a, c = t["lokr_w1"].shape[0], t["lokr_w1"].shape[1]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            return (a * w2.shape[0], c * w2.shape[1], *w2.shape[2:])
        need("lokr_w2_a", "lokr_w2_b")
        w2a, w2b = t["lokr_w2_a"], t["lokr_w2_b"]
        if "lokr_t2" in t:
            t2 = t["lokr_t2"]
            if t2.shape[0] != w2a.shape[0] or t2.shape[1] != w2b.shape[0]:
                raise _bad(name, f"lokr_t2 {_shape(t2)}, lokr_w2_a {_shape(w2a)} and lokr_w2_b {_shape(w2b)} "
                                 "do not chain", path)
            return (a * w2a.shape[1], c * w2b.shape[1], *t2.shape[2:])
        if w2a.shape[1] != w2b.shape[0]:
            raise _bad(name, f"lokr_w2_a {_shape(w2a)} and lokr_w2_b {_shape(w2b)} have different ranks", path)
        if len(w2b.shape) == 4:
            return (a * w2a.shape[0], c * w2b.shape[1], *w2b.shape[2:])
        flat = _unflatten(name, a * w2a.shape[0], c * w2b.shape[1], family)
        if len(flat) == 4:
            return (flat[0], flat[1], *flat[2:])
        return flat
    need("diff")
    return tuple(t["diff"].shape)


def _unflatten(name: str, out: int, cols: int, family: str) -> tuple[int, ...]:
    """The layer shape of a factor stored as [out, in·k·k], using the layer's name."""
    k = conv_kernel_from_name(name, family)
    if k is None:
        return (out, cols)
    if cols % (k * k):
        return (out, cols)
    return (out, cols // (k * k), k, k)


# --- safetensors or a pickle checkpoint ---------------------------------------------------

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _looks_pickled(head: bytes) -> bool:
    """A torch zip checkpoint or a raw pickle; a safetensors header's JSON starts at byte 8."""
    if head[8:9] == b"{":
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _read_any(path: Path, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, str], Any]:
    with open(path, "rb") as fh:
        head = fh.read(9)
    pickled = path.suffix.lower() in PICKLE_SUFFIXES or _looks_pickled(head)
    if pickled:
        if not allow_pickle:
            raise CharfwError(
                "is a pickle checkpoint, not safetensors; loading one can run code",
                path=path,
                hint="convert it to .safetensors, or pass --allow-pickle if you trust its source",
            )
        tensors = _read_pickle(path)
        check_finite(tensors, path)
        return tensors, {}, None
    return read_safetensors(path)


def _read_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for refused or damaged pickles
        raise CharfwError(f"cannot load this checkpoint safely ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                          path=path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CharfwError("is not a flat dict of tensors", path=path)
    return {str(k): to_numpy(v) for k, v in obj.items()}
