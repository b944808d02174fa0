"""The kohya-format LoRA file: read, check, compute ΔW, write with kohya's hashes.

A LoRA file is a flat safetensors state dict. Every key is ``<module>.<suffix>`` where
``<module>`` is kohya's name of the layer it changes (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn1_to_q``, ``lora_te_text_model_encoder_layers_0_mlp_fc1``; SDXL files
use ``lora_te1_``/``lora_te2_`` and SGM UNet names such as ``lora_unet_input_blocks_4_1_…``)
and ``<suffix>`` says which tensor of which network type it is:

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

The scale is ``alpha / rank`` (rank: ``lora_down`` rows, ``hada_w1_b`` rows, ``lokr_w1_b`` or
else ``lokr_w2_b`` rows); a missing or zero ``alpha`` means scale 1, as in kohya and LyCORIS,
and a LoKr whose two factors are both full matrices ignores alpha (scale 1). These are the
formulas of LyCORIS' module forward passes and of A1111/ComfyUI (see
``reference/block-weights-lycoris.md`` §5); :func:`module_delta` implements them.

Reading memory-maps the file (a 300 MB LoRA costs no copy); writing streams the tensors to
a temporary file, hashing them on the way, then renames it into place, so an output is
complete or absent. ``sshs_model_hash`` and ``sshs_legacy_hash`` are computed exactly as
kohya's ``precalculate_safetensors_hashes`` does (the sha256 of the data section, and of the
64 KiB at 1 MiB of the file serialised with only the ``ss_*`` metadata), because A1111 shows
and trusts a stored hash without checking it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from charfw.build.atomic import atomic_path

from ..errors import CharfwError

# --- dtypes ------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
#: safetensors lays tensors out by this order, descending, then by name (Rust ``Dtype`` order)
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}

#: the names ``--precision`` and manifests use for output dtypes
PRECISIONS: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "float": torch.float32,
}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER = 100 * 1024 * 1024


def parse_precision(value: str | torch.dtype | None) -> torch.dtype | None:
    """``fp16``/``bf16``/``fp32`` (or a torch dtype) → a torch dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return PRECISIONS[value.lower()]
    except KeyError:
        raise CharfwError(f"unknown precision '{value}'; use fp16, bf16 or fp32") from None


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype).replace("torch.", ""))


# --- module names ------------------------------------------------------------------------

TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_SGM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|label_emb|time_embed|out)_")
_CONV3_NAME = re.compile(
    r"^lora_unet_(?:.*_(?:conv1|conv2|conv|in_layers_2|out_layers_3|op)|conv_in|conv_out|input_blocks_0_0|out_2)$"
)
_CONV1_NAME = re.compile(r"^lora_unet_.*_(?:conv_shortcut|skip_connection)$")
_PROJ_NAME = re.compile(r"^lora_unet_.*_(?:proj_in|proj_out)$")


def conv_kernel_from_name(name: str, family: str) -> int | None:
    """The kernel size of the layer a kohya module name points at: 3, 1, or None (Linear).

    Only needed where a file stores a conv factor flattened (LoHa ``hada_w1_b`` [r, in·k·k],
    LoKr ``lokr_w2_b`` [r, d·k·k]), which loses the kernel shape; everything else reads it
    from the tensors. SD 1.x's transformer ``proj_in``/``proj_out`` are 1×1 convs, SD 2.x's
    and SDXL's are Linear."""
    if _CONV3_NAME.match(name):
        return 3
    if _CONV1_NAME.match(name):
        return 1
    if _PROJ_NAME.match(name) and family == "sd1":
        return 1
    return None


def detect_family(names: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """``sd1``, ``sd2``, ``sdxl`` or ``unknown``, from module names (and kohya's metadata).

    SDXL files have two text encoders (``lora_te1_``/``lora_te2_``) and SGM UNet names;
    SD 1.x/2.x files have ``lora_te_`` and diffusers UNet names. SD 2.x has the same blocks
    as SD 1.x; it is told apart only by ``ss_v2``/``ss_base_model_version``."""
    metadata = metadata or {}
    base = str(metadata.get("ss_base_model_version", ""))
    names = list(names)
    if base.startswith("sdxl") or any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    sd_v2 = metadata.get("ss_v2") == "True" or base.startswith("sd_v2")
    sgm = [n for n in names if _SGM_UNET.match(n)]
    if sgm:
        # ldm-named SD 1.x files exist too: attention at the first level or a 12th block
        sd1_marks = re.compile(r"^lora_unet_(input_blocks_[12]_1_|input_blocks_(9|10|11)_|output_blocks_(9|10|11)_)")
        if any(sd1_marks.match(n) for n in sgm) or any(n.startswith("lora_te_") for n in names):
            return "sd2" if sd_v2 else "sd1"
        return "sdxl"
    if any(n.startswith("lora_unet_add_embedding") for n in names):
        return "sdxl"
    if any(n.startswith(("lora_unet_", "lora_te_")) for n in names):
        return "sd2" if sd_v2 else "sd1"
    return "unknown"


# --- dense ΔW ----------------------------------------------------------------------------


def lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
    """ΔW of a LoRA/LoCon module: ``scale · up·down`` shaped like the layer's weight.

    Conv factors are ``up`` [out, r, 1, 1] and ``down`` [r, in, k, k] (``ΔW = up·down`` on
    the flattened kernels); Tucker adds ``mid`` [r, r, k, k] between a 1×1 ``down`` and ``up``:
    ``ΔW[o, i] = Σ up[o, a]·mid[a, b]·down[b, i]`` per kernel position."""
    up32, down32 = up.float(), down.float()
    out = up32.shape[0]
    u = up32.reshape(out, -1)
    if mid is not None:
        d = tucker_down(down32, mid.float())
        return (u @ d.reshape(d.shape[0], -1)).reshape(out, *d.shape[1:]) * scale
    flat = u @ down32.reshape(down32.shape[0], -1)
    return flat.reshape(out, *down32.shape[1:]) * scale


def tucker_down(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Fold a Tucker ``mid`` [r, r, k, k] into a 1×1 ``down`` [r, in, 1, 1]: [r, in, k, k].

    Then ``up · result`` is the module's ΔW, so a Tucker module is an ordinary conv LoRA
    of the same rank for everything downstream (resizing, merging)."""
    d = down.reshape(down.shape[0], -1)
    return torch.einsum("abhw,bi->aihw", mid, d)


def _hada_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # P[o, i, h, w] = Σ t[a, b, h, w] · wa[a, o] · wb[b, i]   (wa [r, out], wb [r, in])
    return torch.einsum("abhw,ao,bi->oihw", t, wa, wb)


def loha_delta(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
    t1: torch.Tensor | None = None, t2: torch.Tensor | None = None,
    *, scale: float = 1.0, shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """ΔW of a LoHa module: ``scale · (w1a·w1b) ⊙ (w2a·w2b)`` (Hadamard product).

    With Tucker cores each product is ``Σ t[a, b]·w_a[a, o]·w_b[b, i]``. ``shape`` is the
    layer's weight shape, needed to unflatten a conv kernel stored as [r, in·k·k]."""
    if t1 is not None and t2 is not None:
        p = _hada_tucker(t1.float(), w1a.float(), w1b.float()) * _hada_tucker(t2.float(), w2a.float(), w2b.float())
    else:
        p1 = w1a.float().reshape(w1a.shape[0], -1) @ w1b.float().reshape(w1b.shape[0], -1)
        p2 = w2a.float().reshape(w2a.shape[0], -1) @ w2b.float().reshape(w2b.shape[0], -1)
        p = p1 * p2
    p = p * scale
    return p.reshape(shape) if shape is not None else p


def lokr_w2(w2: torch.Tensor | None, w2a: torch.Tensor | None, w2b: torch.Tensor | None,
            t2: torch.Tensor | None, kernel: tuple[int, ...] = ()) -> torch.Tensor:
    """The second (bigger) Kronecker factor of a LoKr module, dense: [b, d(, k, k)]."""
    if w2 is not None:
        return w2.float()
    assert w2a is not None and w2b is not None
    if t2 is not None:
        # w2[p, q, h, w] = Σ t2[a, c, h, w] · w2a[a, p] · w2b[c, q]   (w2a [r, b], w2b [r, d])
        return torch.einsum("achw,ap,cq->pqhw", t2.float(), w2a.float(), w2b.float())
    flat = w2a.float() @ w2b.float().reshape(w2b.shape[0], -1)
    if w2b.dim() > 2:
        return flat.reshape(w2a.shape[0], *w2b.shape[1:])
    if kernel:
        return flat.reshape(w2a.shape[0], -1, *kernel)
    return flat


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """ΔW of a LoKr module from its two dense factors: ``scale · w1 ⊗ w2`` (Kronecker).

    For a conv, ``w1`` [a, c] acts on channel blocks and ``w2`` [b, d, k, k] carries the
    kernel: ΔW [a·b, c·d, k, k]."""
    w1 = w1.float()
    w2 = w2.float().contiguous()  # torch.kron needs it (an einsum result may not be)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2) * scale


# --- the file model ----------------------------------------------------------------------

LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL_KEYS = ("diff", "diff_b")
COMMON_KEYS = ("alpha", "dora_scale")
KIND_KEYS: dict[str, tuple[str, ...]] = {"lora": LORA_KEYS, "loha": LOHA_KEYS, "lokr": LOKR_KEYS, "full": FULL_KEYS}
KIND_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "Full"}


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


@dataclass(frozen=True)
class LoraModule:
    """One layer's change: its kohya name, network type and tensors (suffix → tensor)."""

    name: str
    #: "lora" (LoRA and LoCon), "loha", "lokr" or "full"
    kind: str
    tensors: Mapping[str, torch.Tensor]
    #: the shape of the layer's weight this module changes: (out, in) or (out, in, kh, kw)
    shape: tuple[int, ...]

    def get(self, suffix: str) -> torch.Tensor | None:
        return self.tensors.get(suffix)

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().reshape(-1)[0]) if a.numel() else None

    @property
    def rank(self) -> int | None:
        """The rank ``alpha`` is divided by (None where alpha does not apply)."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            if "lokr_w1_b" in t:
                return int(t["lokr_w1_b"].shape[0])
            if "lokr_w2_b" in t:
                return int(t["lokr_w2_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        """``alpha / rank``; 1 when alpha is missing or 0, or the type has no rank."""
        rank = self.rank
        alpha = self.alpha
        if rank is None or alpha is None or alpha == 0:
            return 1.0
        return alpha / rank

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def tucker(self) -> bool:
        return any(k in self.tensors for k in ("lora_mid.weight", "hada_t1", "lokr_t2"))

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.tensors

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
            return ("lokr_w1",) if "lokr_w1" in self.tensors else ("lokr_w1_a",)
        return tuple(k for k in FULL_KEYS if k in self.tensors)

    def keys(self) -> list[str]:
        return [f"{self.name}.{suffix}" for suffix in self.tensors]

    def delta(self) -> torch.Tensor:
        """The dense ΔW (fp32, scale included, multiplier 1), shaped like the layer's weight.

        DoRA modules: this is the low-rank direction only; the applied change also
        renormalises with ``dora_scale`` against the base weight, which a LoRA file lacks."""
        return module_delta(self.tensors, shape=self.shape)

    def lokr_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoKr only: the dense Kronecker factors (w1 [a, c], w2 [b, d(, k, k)]), unscaled."""
        t = self.tensors
        w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
        w2 = lokr_w2(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"), self.kernel)
        return w1, w2

    def times(self, ratio: float) -> LoraModule:
        """This module with ΔW multiplied by exactly ``ratio``: one factor is scaled (in fp32,
        stored back in its dtype); alpha is never touched (LyCORIS reads alpha 0 as "full")."""
        if ratio == 1:
            return self
        new = dict(self.tensors)
        with torch_threads(1):
            for key in self.factor_key:
                t = new[key]
                new[key] = (t.float() * ratio).to(t.dtype)
        return replace(self, tensors=new)


def _finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(float(t.amax())) and math.isfinite(float(t.amin()))


def check_module_finite(module: LoraModule, path: str | os.PathLike[str] | None = None) -> None:
    """Raise a :class:`CharfwError` naming the module and tensor that holds NaN or Inf."""
    for suffix, t in module.tensors.items():
        if not _finite(t):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise CharfwError(
                f"module {module.name}: {suffix} holds {bad} values",
                path=path,
                hint="the training diverged or the file is damaged; use an earlier epoch",
            )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block.

    charfw parallelises LoRA work across modules with its own threads, one torch thread
    each: small LAPACK calls scale better that way, and OpenMP's barriers stall badly when
    another process holds a core."""
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def module_delta(tensors: Mapping[str, torch.Tensor], *, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Dense ΔW (fp32, scale included) of one module given its tensors by suffix.

    The trainer bakes LoRA/LoHa/LoKr into a pipeline with this: ``W += multiplier · ΔW``.
    ``shape`` (the layer's weight shape) is only needed for LoHa/LoKr convs stored flat."""
    kind = module_kind(tensors)
    probe = LoraModule("?", kind, tensors, shape or (0, 0))
    scale = probe.scale
    t = tensors
    if kind == "lora":
        d = lora_delta(t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"), scale=scale)
    elif kind == "loha":
        d = loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                       t.get("hada_t1"), t.get("hada_t2"), scale=scale)
    elif kind == "lokr":
        w1, w2 = probe.lokr_factors()
        d = lokr_delta(w1, w2, scale=scale)
    else:
        d = t["diff"].float()
    return d.reshape(shape) if shape is not None and tuple(d.shape) != tuple(shape) else d


def module_kind(tensors: Mapping[str, Any]) -> str:
    """lora, loha, lokr or full, from the suffixes present (LyCORIS' own detection order)."""
    if "lora_down.weight" in tensors or "lora_up.weight" in tensors:
        return "lora"
    if any(k.startswith("hada_") for k in tensors):
        return "loha"
    if any(k.startswith("lokr_") for k in tensors):
        return "lokr"
    if "diff" in tensors:
        return "full"
    return "unknown"


@dataclass
class LoraFile:
    """A LoRA file in memory: its modules, the keys charfw does not know, its metadata."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    #: tensors of types charfw cannot interpret (IA3, OFT, GLoRA, norms, embeddings…), by full
    #: key; they are written back unchanged and reported
    unknown: dict[str, torch.Tensor] = field(default_factory=dict)
    family: str = "unknown"
    path: Path | None = None
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
    def float_dtype(self) -> torch.dtype:
        """The float dtype most of the file's data is stored in (the default output dtype)."""
        sizes: Counter[torch.dtype] = Counter()
        for _, t in self.items():
            if t.is_floating_point():
                sizes[t.dtype] += t.numel()
        return sizes.most_common(1)[0][0] if sizes else torch.float32

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor by full key: the modules', then the unknown ones."""
        for m in self.modules.values():
            for suffix, t in m.tensors.items():
                yield f"{m.name}.{suffix}", t
        yield from self.unknown.items()

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def unknown_modules(self) -> list[str]:
        """Module names of the unknown keys (the part before the first dot)."""
        return sorted({k.split(".", 1)[0] for k in self.unknown})

    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in self.modules.values() if m.rank is not None)

    def alphas(self) -> Counter[float]:
        return Counter(a for m in self.modules.values() if (a := m.alpha) is not None)

    def with_modules(self, modules: Iterable[LoraModule], *, unknown: dict[str, torch.Tensor] | None = None,
                     metadata: dict[str, str] | None = None) -> LoraFile:
        """A new file with other modules (and optionally other unknown keys or metadata)."""
        return LoraFile(
            modules={m.name: m for m in modules},
            metadata=dict(self.metadata if metadata is None else metadata),
            unknown=dict(self.unknown if unknown is None else unknown),
            family=self.family,
            path=None,
            _buffer=self._buffer,
        )

    # --- checks ------------------------------------------------------------------------

    def check_finite(self) -> None:
        """Raise a one-line error naming the first module whose tensor holds NaN or Inf.

        max and min propagate NaN and are ±Inf when an element is, so two reductions per
        tensor decide it; elementwise ``isfinite`` only runs to name the culprit."""
        with torch_threads(1):  # memory-bound: extra threads only contend
            for m in self.modules.values():
                check_module_finite(m, self.path)
            for key, t in self.unknown.items():
                if not _finite(t):
                    raise CharfwError(f"{key} holds NaN or Inf values", path=self.path)

    # --- writing -----------------------------------------------------------------------

    def save(self, dest: str | os.PathLike[str], *, precision: str | torch.dtype | None = None,
             metadata: Mapping[str, str] | None = None) -> SavedFile:
        """Write as safetensors (atomic), floats in ``precision`` (default: the file's own),
        with ``metadata`` (default: the file's) and freshly computed ``sshs_*`` hashes."""
        dtype = parse_precision(precision) or self.float_dtype
        return write_safetensors(dest, self.tensors(), self.metadata if metadata is None else metadata, dtype=dtype)


# --- reading -----------------------------------------------------------------------------


def read_lora(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA file: safetensors (memory-mapped), or a pickle checkpoint if allowed.

    Shapes are checked here (ranks of up/down/mid agree, factors have the dimensions
    their type needs): a bad module is a one-line :class:`CharfwError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CharfwError("no such file", path=path)
    tensors, metadata, buffer = _read_any(path, allow_pickle)
    names_by_module: dict[str, dict[str, torch.Tensor]] = {}
    unknown: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, dot, suffix = key.partition(".")
        if not dot:
            unknown[key] = t
            continue
        names_by_module.setdefault(module, {})[suffix] = t
    family = detect_family(names_by_module, metadata)
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
    return LoraFile(modules=modules, metadata=metadata, unknown=unknown, family=family, path=path, _buffer=buffer)


def _bad(name: str, message: str, path: Path | None) -> CharfwError:
    return CharfwError(f"module {name}: {message}", path=path, hint="the file is damaged or not a LoRA charfw can read")


def _check_module(name: str, kind: str, t: Mapping[str, torch.Tensor], family: str, path: Path | None) -> tuple[int, ...]:
    """Validate a module's tensor shapes and return the shape of the layer weight it changes."""

    def need(*keys: str) -> None:
        missing = [k for k in keys if k not in t]
        if missing:
            raise _bad(name, f"{', '.join(missing)} missing", path)

    if "alpha" in t and t["alpha"].numel() != 1:
        raise _bad(name, f"alpha has shape {_shape(t['alpha'])}, expected a single number", path)
    if kind == "lora":
        need("lora_down.weight", "lora_up.weight")
        down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
        if down.dim() not in (2, 4) or up.dim() not in (2, 4):
            raise _bad(name, f"lora_up.weight {_shape(up)} / lora_down.weight {_shape(down)} are not 2-D or 4-D", path)
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise _bad(name, f"lora_up.weight {_shape(up)} is not a 1x1 conv", path)
        r = down.shape[0]
        if mid is not None:
            if mid.dim() != 4 or down.dim() != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != r:
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
            ok = (t1.dim() >= 2 and t1.shape == t2.shape and w1a.shape == w2a.shape and w1b.shape == w2b.shape
                  and w1a.shape[0] == t1.shape[0] and w1b.shape[0] == t1.shape[1])
            if not ok:
                raise _bad(name, f"Tucker LoHa shapes do not chain: hada_t1 {_shape(t1)}, hada_w1_a "
                                 f"{_shape(w1a)}, hada_w1_b {_shape(w1b)}", path)
            return (w1a.shape[1], w1b.shape[1], *t1.shape[2:])
        for a, b, n in ((w1a, w1b, "1"), (w2a, w2b, "2")):
            if a.dim() != 2 or a.shape[1] != b.shape[0]:
                raise _bad(name, f"hada_w{n}_a {_shape(a)} and hada_w{n}_b {_shape(b)} have different ranks", path)
        out, cols = w1a.shape[0], int(math.prod(w1b.shape[1:]))
        if (w2a.shape[0], int(math.prod(w2b.shape[1:]))) != (out, cols):
            raise _bad(name, f"the two Hadamard factors have different shapes: ({out}, {cols}) and "
                             f"({w2a.shape[0]}, {math.prod(w2b.shape[1:])})", path)
        if w1b.dim() == 4:
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
        if w2b.dim() == 4:
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


def _looks_pickled(head: bytes) -> bool:
    """A torch zip checkpoint or a raw pickle; a safetensors header's JSON starts at byte 8."""
    if head[8:9] == b"{":
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _read_any(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], Any]:
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
        return _read_pickle(path), {}, None
    return read_safetensors(path)


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for refused or damaged pickles
        raise CharfwError(f"cannot load this checkpoint safely ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                          path=path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CharfwError("is not a flat dict of tensors", path=path)
    return {str(k): v for k, v in obj.items()}


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str], Any]:
    """Tensors (memory-mapped views, in header order), metadata and the map they view.

    Validates the header against the file size first, so a truncated download is a clear
    error instead of a crash deep in a reader."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CharfwError(f"truncated or empty: {size} bytes, not a safetensors file", path=path)
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise CharfwError("not a safetensors file (no valid header)", path=path)
        if n > size - 8:
            raise CharfwError(f"truncated: the header alone needs {n + 8} bytes, the file has {size}", path=path,
                              hint="the download or copy is incomplete")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CharfwError(f"not a safetensors file (header: {exc})", path=path) from None
    meta_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    data_start = 8 + n
    available = size - data_start
    needed = 0
    for key, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CharfwError(f"tensor '{key}': bad header entry", path=path) from None
        needed = max(needed, end)
    if needed > available:
        raise CharfwError(
            f"truncated: the header describes {needed} bytes of tensor data, the file holds {available}",
            path=path,
            hint="the download or copy is incomplete",
        )
    tensors: dict[str, torch.Tensor] = {}
    buffer: Any = None
    if size > data_start:
        with open(path, "rb") as fh:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    for key, info in header.items():
        dtype = _DTYPES.get(str(info.get("dtype")))
        if dtype is None:
            raise CharfwError(f"tensor '{key}': unsupported dtype {info.get('dtype')}", path=path)
        shape = [int(s) for s in info.get("shape", [])]
        begin, end = (int(x) for x in info["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = math.prod(shape)
        if end - begin != count * itemsize or begin < 0:
            raise CharfwError(f"tensor '{key}': its offsets do not match its shape {shape}", path=path)
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        offset = data_start + begin
        if offset % itemsize:
            t = torch.frombuffer(bytearray(buffer[offset : offset + count * itemsize]), dtype=dtype)
        else:
            t = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        tensors[key] = t.reshape(shape)
    return tensors, metadata, buffer


# --- writing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedFile:
    """What :func:`write_safetensors` wrote."""

    path: Path
    #: kohya's sshs_model_hash: sha256 of the data section (A1111's "addnet" hash)
    model_hash: str
    #: kohya's sshs_legacy_hash
    legacy_hash: str
    size: int
    metadata: dict[str, str]


def _header_bytes(entries: list[tuple[str, str, list[int], int, int]], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header safetensors writes: compact, ``__metadata__`` first, padded with
    spaces to a multiple of 8 bytes (the length matters: it moves kohya's legacy hash)."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = dict(metadata)
    for name, dt, shape, begin, end in entries:
        obj[name] = {"dtype": dt, "shape": shape, "data_offsets": [begin, end]}
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return raw + b" " * ((8 - len(raw) % 8) % 8)


def _layout(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> list[tuple[str, torch.Tensor, torch.dtype, str, list[int], int, int]]:
    """Tensors in safetensors' order (dtype descending, then name) with their offsets."""
    rows = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is not a tensor")
        out_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        dt = _DTYPE_NAMES.get(out_dtype)
        if dt is None:
            raise CharfwError(f"tensor '{name}': dtype {out_dtype} cannot be stored in safetensors")
        rows.append((name, t, out_dtype, dt))
    rows.sort(key=lambda r: (-_DTYPE_RANK[r[3]], r[0]))
    out = []
    pos = 0
    for name, t, out_dtype, dt in rows:
        nbytes = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        out.append((name, t, out_dtype, dt, list(t.shape), pos, pos + nbytes))
        pos += nbytes
    return out


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> memoryview:
    if t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


LEGACY_OFFSET = 0x100000
LEGACY_SIZE = 0x10000


def _stream(layout: list[tuple[str, torch.Tensor, torch.dtype, str, list[int], int, int]], ss_prefix: bytes,
            out: BinaryIO | None) -> tuple[str, str]:
    """Write the data section to ``out`` (if given) and return kohya's two hashes.

    ``ss_prefix`` is the 8-byte length and header of the file as kohya hashes it (ss_*
    metadata only); the legacy hash reads 64 KiB at 1 MiB of that virtual file."""
    sha = hashlib.sha256()
    start = LEGACY_OFFSET - len(ss_prefix)  # where the legacy window starts in the data section
    legacy = bytearray(ss_prefix[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_SIZE]) if start < 0 else bytearray()
    lo, hi = max(start, 0), start + LEGACY_SIZE
    for _name, t, dtype, _dt, _shape, begin, end in layout:
        data = _tensor_bytes(t, dtype)
        if out is not None:
            out.write(data)
        sha.update(data)
        if begin < hi and end > lo:
            legacy += data[max(lo, begin) - begin : min(hi, end) - begin]
    return sha.hexdigest(), hashlib.sha256(legacy).hexdigest()[:8]


def _ss_prefix(layout: list[Any], metadata: Mapping[str, str]) -> bytes:
    entries = [(r[0], r[3], r[4], r[5], r[6]) for r in layout]
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    header = _header_bytes(entries, ss)
    return len(header).to_bytes(8, "little") + header


def _clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                dtype: torch.dtype | None = None) -> tuple[str, str]:
    """kohya's ``(sshs_model_hash, sshs_legacy_hash)`` of ``tensors`` saved with ``metadata``
    (floats cast to ``dtype`` first), without writing anything."""
    layout = _layout(tensors, dtype)
    return _stream(layout, _ss_prefix(layout, _clean_metadata(metadata)), None)


def write_safetensors(dest: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, Any] | None = None, *, dtype: str | torch.dtype | None = None,
                      hashes: bool = True) -> SavedFile:
    """Write ``tensors`` as a safetensors file, atomically and fsynced.

    Floating tensors are cast to ``dtype`` (fp16/bf16/fp32; None keeps each one's own).
    Metadata values are stored as strings. With ``hashes`` (the default), kohya's
    ``sshs_model_hash``/``sshs_legacy_hash`` are computed in the same pass and written into
    the header, replacing stale ones. Readers (kohya, A1111, ComfyUI, diffusers, the
    ``safetensors`` package) see exactly what ``safetensors.torch.save_file`` would write."""
    dest = Path(dest)
    target = parse_precision(dtype) if isinstance(dtype, str) or dtype is None else dtype
    meta = _clean_metadata(metadata)
    layout = _layout(tensors, target)
    entries = [(r[0], r[3], r[4], r[5], r[6]) for r in layout]
    if hashes:
        meta["sshs_model_hash"] = "0" * 64
        meta["sshs_legacy_hash"] = "0" * 8
    header = _header_bytes(entries, meta)
    ss_prefix = _ss_prefix(layout, meta)
    with atomic_path(dest, fsync=True) as tmp, torch_threads(1):  # casts are memory-bound
        with open(tmp, "wb") as fh:
            fh.write(len(header).to_bytes(8, "little"))
            fh.write(header)
            model_hash, legacy_hash = _stream(layout, ss_prefix, fh)
            if hashes:
                meta["sshs_model_hash"] = model_hash
                meta["sshs_legacy_hash"] = legacy_hash
                final = _header_bytes(entries, meta)
                assert len(final) == len(header)  # hex digests have fixed lengths
                fh.seek(8)
                fh.write(final)
        size = tmp.stat().st_size
    return SavedFile(dest, model_hash, legacy_hash, size, meta)


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a safetensors file's data section: what ``sshs_model_hash`` should be."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a whole file (for reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

