"""Dense ΔW of a LoRA module: the change it makes to its layer's weight.

A module is given by its tensors, keyed by suffix (``lora_up.weight``, ``hada_w1_a``,
``lokr_w1``, ``diff``…; :mod:`charfw.lora.file` lists them). Its type is what the suffixes
say (:func:`module_kind`), and its scale is ``alpha / rank`` (rank: ``lora_down`` rows,
``hada_w1_b`` rows, ``lokr_w1_b`` or else ``lokr_w2_b`` rows); a missing or zero ``alpha``
means scale 1, as in kohya and LyCORIS, and a LoKr whose two factors are both full matrices
ignores alpha (scale 1). The formulas are those of LyCORIS' module forward passes and of
A1111/ComfyUI (see ``reference/block-weights-lycoris.md`` §5):

=========  ===================================================================================
LoRA       ``up·down`` on the flattened kernels; Tucker: ``Σ up[o, a]·mid[a, b]·down[b, i]``
LoHa       ``(w1a·w1b) ⊙ (w2a·w2b)``; Tucker: each product is ``Σ t[a, b]·w_a[a, o]·w_b[b, i]``
LoKr       ``w1 ⊗ w2`` (Kronecker), each factor whole or a low-rank pair (w2 possibly Tucker)
Full       ``diff`` as stored
=========  ===================================================================================

Everything is computed in fp32. :func:`torch_threads` is how charfw runs this work: many
small products on its own threads, one torch thread each. The functions that read what a
module is (type, alpha, rank, scale) take numpy arrays or torch tensors and need no torch;
those that compute ΔW take torch tensors and import torch when they run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .file import LoraModule

# --- what a module's tensors say --------------------------------------------------------


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


def module_alpha(tensors: Mapping[str, Any]) -> float | None:
    """The stored ``alpha`` (None when missing or empty)."""
    a = tensors.get("alpha")
    return None if a is None else float(a.reshape(-1)[0]) if math.prod(a.shape) else None


def module_rank(tensors: Mapping[str, Any], kind: str) -> int | None:
    """The rank ``alpha`` is divided by (None where alpha does not apply)."""
    t = tensors
    if kind == "lora":
        return int(t["lora_down.weight"].shape[0])
    if kind == "loha":
        return int(t["hada_w1_b"].shape[0])
    if kind == "lokr":
        if "lokr_w1_b" in t:
            return int(t["lokr_w1_b"].shape[0])
        if "lokr_w2_b" in t:
            return int(t["lokr_w2_b"].shape[0])
    return None


def module_scale(tensors: Mapping[str, Any], kind: str) -> float:
    """``alpha / rank``; 1 when alpha is missing or 0, or the type has no rank."""
    rank = module_rank(tensors, kind)
    alpha = module_alpha(tensors)
    if rank is None or alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


# --- ΔW ----------------------------------------------------------------------------------


def module_delta(tensors: Mapping[str, torch.Tensor], *, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Dense ΔW (fp32, scale included) of one module given its tensors by suffix.

    The trainer bakes LoRA/LoHa/LoKr into a pipeline with this: ``W += multiplier · ΔW``.
    ``shape`` (the layer's weight shape) is only needed for LoHa/LoKr convs stored flat."""
    kind = module_kind(tensors)
    scale = module_scale(tensors, kind)
    t = tensors
    if kind == "lora":
        d = lora_delta(t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"), scale=scale)
    elif kind == "loha":
        d = loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                       t.get("hada_t1"), t.get("hada_t2"), scale=scale)
    elif kind == "lokr":
        w1, w2 = lokr_factors(tensors, tuple((shape or (0, 0))[2:]))
        d = lokr_delta(w1, w2, scale=scale)
    else:
        d = t["diff"].float()
    return d.reshape(shape) if shape is not None and tuple(d.shape) != tuple(shape) else d


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
    import torch

    d = down.reshape(down.shape[0], -1)
    return torch.einsum("abhw,bi->aihw", mid, d)


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


def _hada_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # P[o, i, h, w] = Σ t[a, b, h, w] · wa[a, o] · wb[b, i]   (wa [r, out], wb [r, in])
    import torch

    return torch.einsum("abhw,ao,bi->oihw", t, wa, wb)


def lokr_factors(tensors: Mapping[str, torch.Tensor], kernel: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr module's dense Kronecker factors (w1 [a, c], w2 [b, d(, k, k)]), unscaled;
    ``kernel`` is the layer's kernel size, for a conv ``lokr_w2_b`` stored flat."""
    t = tensors
    w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    w2 = lokr_w2(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"), kernel)
    return w1, w2


def lokr_w2(w2: torch.Tensor | None, w2a: torch.Tensor | None, w2b: torch.Tensor | None,
            t2: torch.Tensor | None, kernel: tuple[int, ...] = ()) -> torch.Tensor:
    """The second (bigger) Kronecker factor of a LoKr module, dense: [b, d(, k, k)]."""
    if w2 is not None:
        return w2.float()
    assert w2a is not None and w2b is not None
    if t2 is not None:
        # w2[p, q, h, w] = Σ t2[a, c, h, w] · w2a[a, p] · w2b[c, q]   (w2a [r, b], w2b [r, d])
        import torch

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
    import torch

    w1 = w1.float()
    w2 = w2.float().contiguous()  # torch.kron needs it (an einsum result may not be)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2) * scale


# --- ‖ΔW‖ ------------------------------------------------------------------------------------


def delta_norm(module: LoraModule) -> float:
    """‖ΔW‖_F without forming ΔW where the type allows it: ``trace(UᵀU · DDᵀ)`` for LoRA
    (in numpy: ``charfw lora info`` needs no torch for LoRA/LoCon files), ``‖A‖·‖B‖`` for
    LoKr; other types form ΔW with torch."""
    import numpy as np

    from .safetensors_io import as_float32, to_numpy

    a = module.arrays
    if module.kind == "lora" and "lora_mid.weight" not in a:
        U = as_float32(to_numpy(a["lora_up.weight"]))
        D = as_float32(to_numpy(a["lora_down.weight"]))
        U = U.reshape(U.shape[0], -1)
        D = D.reshape(D.shape[0], -1)
        sq = float(np.sum(np.dot(U.T, U).astype(np.float64) * np.dot(D, D.T)))
        return math.sqrt(max(sq, 0.0)) * abs(module.scale)
    t = module.tensors
    if module.kind == "lora":
        U = t["lora_up.weight"].float()
        U = U.reshape(U.shape[0], -1)
        down = t["lora_down.weight"].float()
        D = tucker_down(down, t["lora_mid.weight"].float()).reshape(down.shape[0], -1)
        sq = float(((U.mT @ U).double() * (D @ D.mT).double()).sum())
        return math.sqrt(max(sq, 0.0)) * abs(module.scale)
    if module.kind == "lokr":
        w1, w2 = module.lokr_factors()
        return float(w1.norm()) * float(w2.norm()) * abs(module.scale)
    return float(module.delta().norm())


# --- how torch runs it ---------------------------------------------------------------------


@contextlib.contextmanager
def numpy_threads(n: int) -> Iterator[None]:
    """Run numpy's BLAS (OpenBLAS) with ``n`` threads inside the block: as for torch,
    charfw runs many small products on its own threads, and OpenBLAS' spinning threads
    cost many times the work on a busy machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block.

    charfw parallelises LoRA work across modules with its own threads, one torch thread
    each: small LAPACK calls scale better that way, and OpenMP's barriers stall badly when
    another process holds a core."""
    import torch

    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
