"""SVD compression: resize a LoRA to lower ranks (merging several: :mod:`charfw.lora.merge`).

**Ranks are kohya's.** ``resize_lora.py`` forms each module's dense ΔW, takes its full SVD
and keeps ``new_rank`` directions, or a number chosen from the singular values S (sorted,
of the unscaled product up·down, ``L = min(out, in·k·k)`` of them):

* ``sv_ratio X``: ``clamp(#{S > S[0]/X}, 1, L-1) + 1``
* ``sv_cumulative X``: ``clamp(searchsorted(cumsum(S)/ΣS, X) + 1, 1, L-1) + 1``
* ``sv_fro X``: the same on S² against X²
* then 1 if ``S[0] ≤ 1e-6``, else at most the cap: ``new_rank`` for 2-D (Linear) factors and
  ``new_conv_rank`` for every 4-D factor, 1×1 convs included (kohya branches on the tensor's
  dimensions, not on the kernel size); in fixed mode ``new_rank`` even above the old rank.

The ``+1`` keeps one direction past the threshold (so kohya's "max(S) ratio" reads just
above X). ``tight=True`` drops it and never pads past the module's real rank.
``up = U_k·S_k``, ``down = V_kᵀ`` as kohya writes them.

**One alpha for the whole file.** kohya gives each module ``alpha = old scale × new rank``,
so a dynamic resize (or a merge, alpha = rank) writes as many alphas as ranks. sd-scripts
(``networks/lora.py``: ``alpha / lora_dim``), A1111 (``extensions-builtin/Lora``:
``alpha / dim``, dim = ``lora_down`` rows) and ComfyUI (``comfy/weight_adapter/lora.py``:
``alpha / mat2.shape[0]``) read each module's own alpha, but diffusers (0.42) converts
kohya's UNet attention q/k/v/out alphas under key names its peft config does not match, so
those modules get the file's most common alpha and their ΔW is off. Here every module gets
the same alpha, the most common of kohya's per-module values, and each module's own
``scale·rank / alpha`` is folded into ``lora_up`` (in fp32, before the one rounding): all
four compute ``(alpha / rank)·up·down``, the same ΔW (diffusers: ``lora_alpha`` = that
alpha, each module's ``r`` from its ``lora_B``).

**The SVD is computed from the factors.** ΔW = U·D (U [out, r], D [r, in·k·k]) has rank ≤ r,
so with ``U = Q_u R_u`` and ``Dᵀ = Q_d R_d`` (Householder QR, R only) the singular values of
ΔW are those of the r×r core ``C = R_u R_dᵀ = U_c S V_cᵀ``. The kept factors follow
without ever forming Q or ΔW:

* ``up   = U_k S_k = ΔW V_k = U · (R_dᵀ V_c,k)``      (because ``D Q_d = R_dᵀ``)
* ``down = V_kᵀ   = S_k⁻¹ U_c,kᵀ Q_uᵀ ΔW = S_k⁻¹ (U_c,kᵀ R_u) · D``

That is two tall QRs, one small SVD and two thin products per module instead of kohya's
full SVD of up to 1280 × 23 040 (whose Vh alone is 2 GB): the same singular values (to
fp32 precision, as kohya's own), the same ranks, the same truncated ΔW. LoHa is converted
through its dense ΔW; LoKr through the SVDs of its two Kronecker factors (the SVD of
``A ⊗ B`` is made of those of A and B).

"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace

import torch

from ..errors import CharfwError
from .delta import delta_norm as delta_norm  # re-exported: ‖ΔW‖ beside the resize tools
from .delta import torch_threads, tucker_down
from .file import LoraFile, LoraModule, check_module_finite
from .rank_rule import RankRule
from .safetensors_io import parse_precision, torch_dtype

MIN_SV = 1e-6
#: directions whose singular value is below this fraction of the largest are written as zeros
ZERO_SV = 1e-7
def choose_rank(S: torch.Tensor, full_len: int, rule: RankRule, cap: int) -> int:
    """kohya's ``rank_resize`` rank for singular values ``S`` (descending) of a matrix whose
    full SVD has ``full_len`` values (the missing ones are zero: ΔW's rank is at most r)."""
    S = S.double()
    n = int(S.numel())
    s0 = float(S[0]) if n else 0.0
    last = max(full_len - 1, 1)
    if rule.method == "rank":
        k = cap
    else:
        param = float(rule.param or 0)
        if rule.method == "sv_ratio":
            count = int(torch.gt(S, s0 / param).sum())
        else:
            values = S if rule.method == "sv_cumulative" else S * S
            target = param if rule.method == "sv_cumulative" else param * param
            total = float(values.sum())
            cums = torch.cumsum(values, 0) / total if total > 0 else torch.ones_like(values)
            count = int(torch.searchsorted(cums, torch.tensor([target], dtype=cums.dtype))[0])
            count = full_len if count >= n and target > float(cums[-1]) else count
            count += 1
        if rule.tight:
            k = max(1, min(count, n))
        else:
            k = max(1, min(count, last)) + 1
    if s0 <= MIN_SV:
        return 1
    k = min(k, cap)
    if rule.tight:
        k = min(k, max(n, 1))
    return k


def retained(S: torch.Tensor, k: int) -> tuple[float, float, float]:
    """kohya's verbose figures: (sum(S) retained, Frobenius retained, S[0]/S[k-1])."""
    S = S.double()
    total = float(S.sum())
    fro = float((S * S).sum())
    s_sum = float(S[:k].sum()) / total if total > 0 else 1.0
    s_fro = math.sqrt(float((S[:k] ** 2).sum()) / fro) if fro > 0 else 1.0
    last = float(S[k - 1]) if k - 1 < S.numel() else 0.0
    ratio = float(S[0]) / last if last > 0 else math.inf
    return s_sum, s_fro, ratio


# --- per-module decompositions -----------------------------------------------------------


@dataclass
class Spectrum:
    """A module's ΔW/scale as a thin SVD that can hand out its top-k factors."""

    S: torch.Tensor
    #: rows and columns of the dense (flattened) ΔW
    out: int
    cols: int
    top: Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _zero_tiny(up: torch.Tensor, down: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s0 = float(S[0]) if S.numel() else 0.0
    tiny = torch.le(S, s0 * ZERO_SV) if s0 > 0 else torch.ones_like(S, dtype=torch.bool)
    if bool(tiny.any()):
        up[:, tiny] = 0
        down[tiny, :] = 0
    return up, down


def factor_spectrum(U: torch.Tensor, D: torch.Tensor) -> Spectrum:
    """The SVD of ``U·D`` through QR of the factors (see the module docstring)."""
    U = U.float()
    D = D.float()
    Ru = torch.linalg.qr(U, mode="r").R
    Rd = torch.linalg.qr(D.mT, mode="r").R
    Uc, S, Vch = torch.linalg.svd(Ru @ Rd.mT, full_matrices=False)

    def top(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, S.numel())
        up = U @ (Rd.mT @ Vch[:k].mT)
        Sk = S[:k]
        safe = torch.where(Sk > 0, Sk, torch.ones_like(Sk))
        down = ((Uc[:, :k].mT @ Ru) / safe[:, None]) @ D
        return _zero_tiny(up, down, Sk)

    return Spectrum(S, U.shape[0], D.shape[1], top)


def dense_spectrum(W: torch.Tensor) -> Spectrum:
    """The thin SVD of a dense ΔW [out, cols] (LoHa, full diffs, mixed merges)."""
    W = W.float().reshape(W.shape[0], -1)
    Uw, S, Vh = torch.linalg.svd(W, full_matrices=False)

    def top(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, S.numel())
        return _zero_tiny(Uw[:, :k] * S[:k], Vh[:k].clone(), S[:k])

    return Spectrum(S, W.shape[0], W.shape[1], top)


def kron_spectrum(A: torch.Tensor, B: torch.Tensor) -> Spectrum:
    """The SVD of ``A ⊗ B`` (a LoKr ΔW, flattened) from the SVDs of A and B: its singular
    values are the products ``a_i·b_j`` with vectors ``u_i ⊗ u'_j`` and ``v_i ⊗ v'_j``."""
    A = A.float().reshape(A.shape[0], -1)
    B = B.float().reshape(B.shape[0], -1)
    Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
    Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
    prod = torch.outer(Sa, Sb).reshape(-1)
    S, order = torch.sort(prod, descending=True)
    ia, ib = order // Sb.numel(), order % Sb.numel()

    def top(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, S.numel())
        i, j = ia[:k], ib[:k]
        # columns kron(u_i, u'_j): element (p, q) at row p·rows(B) + q
        up = (Ua[:, i][:, None, :] * Ub[:, j][None, :, :]).reshape(-1, k) * S[:k]
        down = (Vha[i][:, :, None] * Vhb[j][:, None, :]).reshape(k, -1)
        return _zero_tiny(up, down, S[:k])

    return Spectrum(S, A.shape[0] * B.shape[0], A.shape[1] * B.shape[1], top)


def module_spectrum(module: LoraModule, path: object = None) -> tuple[Spectrum, float]:
    """(spectrum of ΔW/scale, scale) for any module type.

    NaN or Inf anywhere in the module makes S non-finite (or LAPACK refuse it); then the
    module is checked tensor by tensor so the error names the culprit. Checking here
    instead of in a separate pass saves reading the whole file once more."""
    try:
        spectrum, scale = _module_spectrum(module)
    except RuntimeError:
        check_module_finite(module, path)  # type: ignore[arg-type]
        raise
    if not bool(torch.isfinite(spectrum.S).all()):
        check_module_finite(module, path)  # type: ignore[arg-type]
        raise CharfwError(f"module {module.name}: its ΔW has no finite SVD", path=path)  # type: ignore[arg-type]
    return spectrum, scale


def _module_spectrum(module: LoraModule) -> tuple[Spectrum, float]:
    t = module.tensors
    if module.kind == "lora":
        up = t["lora_up.weight"]
        down = t["lora_down.weight"]
        mid = t.get("lora_mid.weight")
        U = up.float().reshape(up.shape[0], -1)
        D = (tucker_down(down.float(), mid.float()) if mid is not None else down.float()).reshape(down.shape[0], -1)
        return factor_spectrum(U, D), module.scale
    if module.kind == "lokr":
        w1, w2 = module.lokr_factors()
        return kron_spectrum(w1, w2.reshape(w2.shape[0], -1)), module.scale
    if module.kind == "loha":
        scale = module.scale
        return dense_spectrum(module.delta() / scale), scale
    return dense_spectrum(module.delta()), 1.0


# --- building LoRA modules ---------------------------------------------------------------


def _stored(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


@dataclass
class NewFactors:
    """A module's new factors (fp32) before they are stored: ``ΔW = scale·up·down``."""

    name: str
    shape: tuple[int, ...]
    up: torch.Tensor
    down: torch.Tensor
    scale: float
    extra: Mapping[str, torch.Tensor] | None = None


def store_modules(factors: Sequence[NewFactors], dtype: torch.dtype,
                  threads: int | None = None) -> tuple[list[LoraModule], float]:
    """Store new factors as kohya LoRA modules with one alpha for the whole file (see the
    module docstring): the most common of kohya's per-module alphas (``scale × rank`` as
    stored in ``dtype``; a tie goes to the larger). Returns the modules and that alpha."""
    counts = Counter(_stored(f.scale * f.down.shape[0], dtype) for f in factors)
    alpha = max(counts, key=lambda a: (counts[a], a)) if counts else 1.0
    modules = parallel_map(lambda f: lora_module(f.name, f.shape, f.up, f.down, f.scale, dtype=dtype, alpha=alpha,
                                                 extra=f.extra), list(factors), threads)
    return modules, alpha


def lora_module(name: str, shape: Sequence[int], up: torch.Tensor, down: torch.Tensor, scale: float, *,
                dtype: torch.dtype, alpha: float | None = None, extra: Mapping[str, torch.Tensor] | None = None) -> LoraModule:
    """A kohya LoRA module with ``ΔW = scale·up·down`` stored in ``dtype``.

    alpha defaults to ``scale × rank`` (kohya's "keep the scale"); it is stored in ``dtype``
    as kohya does, and whatever that rounding changes is folded back into ``up``, so the
    written module's ΔW is the intended one, not one off by fp16's rounding of alpha."""
    k = down.shape[0]
    want = scale * k if alpha is None else alpha
    stored = _stored(want, dtype)
    if stored == 0 or not math.isfinite(stored):
        raise CharfwError(f"module {name}: alpha {want:g} cannot be stored in {dtype}")
    up = up * (scale * k / stored)
    out, *rest = shape
    if len(shape) == 4:
        up = up.reshape(out, k, 1, 1)
        down = down.reshape(k, *rest)
    tensors: dict[str, torch.Tensor] = {
        "lora_down.weight": down.to(dtype).contiguous(),
        "lora_up.weight": up.to(dtype).contiguous(),
        "alpha": torch.tensor(stored, dtype=dtype),
    }
    tensors.update(extra or {})
    return LoraModule(name, "lora", tensors, tuple(shape))


# --- resizing a file ---------------------------------------------------------------------


@dataclass
class ModuleResize:
    name: str
    old_rank: int | None
    new_rank: int
    alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float
    kind: str = "LoRA"

    def line(self, dynamic: bool) -> str:
        """kohya's ``--verbose`` line."""
        text = (f"{self.name:75} | sum(S) retained: {self.sum_retained:.1%}, fro retained: "
                f"{self.fro_retained:.1%}, max(S) ratio: {self.max_ratio:0.1f}")
        if dynamic:
            text += f", dynamic | dim: {self.new_rank}, alpha: {self.alpha:g}"
        return text


@dataclass
class ResizeReport:
    rule: RankRule
    modules: list[ModuleResize] = field(default_factory=list)
    seconds: float = 0.0
    dora: int = 0
    unknown: int = 0

    @property
    def fro_mean(self) -> float:
        vals = [m.fro_retained for m in self.modules if math.isfinite(m.fro_retained)]
        return sum(vals) / len(vals) if vals else 1.0

    @property
    def fro_std(self) -> float:
        vals = [m.fro_retained for m in self.modules if math.isfinite(m.fro_retained)]
        if not vals:
            return 0.0
        mean = sum(vals) / len(vals)
        return math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))

    def ranks(self) -> list[int]:
        return sorted(m.new_rank for m in self.modules)

    def lines(self) -> list[str]:
        ranks = self.ranks()
        if not ranks:
            return ["no modules"]
        median = ranks[len(ranks) // 2]
        out = [f"{self.rule.describe()}: {len(ranks)} modules, ranks {ranks[0]}..{ranks[-1]} (median {median})",
               f"Frobenius norm retained: average {self.fro_mean:.2%} (std {self.fro_std:.3f}), "
               f"lowest {min(m.fro_retained for m in self.modules):.1%}"]
        if self.dora:
            out.append(f"{self.dora} DoRA modules: dora_scale kept as it was")
        if self.unknown:
            out.append(f"{self.unknown} keys of unknown types kept unchanged")
        return out


def _workers(threads: int | None) -> int:
    if threads:
        return max(1, threads)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _cost(module: LoraModule) -> int:
    return math.prod(module.shape) if module.kind != "lora" else sum(t.numel() for t in module.tensors.values())


def parallel_map(fn: Callable, items: list, threads: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list:
    """``[fn(x) for x in items]`` on worker threads with one torch thread each.

    Modules are independent, and many small LAPACK calls scale better across threads than
    inside one call. The first error cancels what has not started and is raised as is.
    ``progress(1)`` is called from this thread as each item finishes."""
    workers = _workers(threads)
    with torch_threads(1):
        if workers == 1 or len(items) < 2:
            out = []
            for x in items:
                out.append(fn(x))
                if progress is not None:
                    progress(1)
            return out
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            results: list = [None] * len(items)
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if progress is not None:
                    progress(1)
            return results
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def resize_lora(lora: LoraFile, rule: RankRule, *, precision: str | torch.dtype | None = None,
                threads: int | None = None, progress: Callable[[int], None] | None = None) -> tuple[LoraFile, ResizeReport]:
    """Resize every module to kohya's rank under ``rule`` (LoHa/LoKr/Full become LoRA).

    DoRA's ``dora_scale`` and unknown keys are kept as they are (and counted)."""
    started = time.perf_counter()
    dtype = torch_dtype(parse_precision(precision)) if precision is not None else lora.float_dtype
    modules = list(lora.modules.values())
    order = sorted(range(len(modules)), key=lambda i: -_cost(modules[i]))

    def work(i: int) -> tuple[NewFactors, ModuleResize]:
        module = modules[i]
        spectrum, scale = module_spectrum(module, lora.path)
        is_4d = module.is_conv if module.kind != "lora" else module.tensors["lora_down.weight"].dim() == 4
        cap = rule.cap(is_4d, module.rank)
        k = choose_rank(spectrum.S, min(spectrum.out, spectrum.cols), rule, cap)
        up, down = spectrum.top(k)
        if up.shape[1] < k:  # kohya keeps directions past ΔW's rank: they are zero
            up = torch.cat([up, up.new_zeros(up.shape[0], k - up.shape[1])], 1)
            down = torch.cat([down, down.new_zeros(k - down.shape[0], down.shape[1])], 0)
        extra = {"dora_scale": module.tensors["dora_scale"]} if module.dora else None
        s_sum, s_fro, ratio = retained(spectrum.S, k)
        return (NewFactors(module.name, module.shape, up, down, scale, extra),
                ModuleResize(module.name, module.rank, k, 0.0, s_sum, s_fro, ratio, module.label))

    results = parallel_map(work, order, threads, progress)
    by_index = dict(zip(order, results, strict=True))
    new_modules, alpha = store_modules([by_index[i][0] for i in range(len(modules))], dtype, threads)
    rows = [replace(by_index[i][1], alpha=alpha) for i in range(len(modules))]
    report = ResizeReport(rule, rows, dora=lora.dora, unknown=len(lora.unknown))
    report.seconds = time.perf_counter() - started
    return lora.with_modules(new_modules, metadata=resize_metadata(lora, rule, report)), report


def resize_metadata(lora: LoraFile, rule: RankRule, report: ResizeReport) -> dict[str, str]:
    """kohya's metadata edits, plus ``ss_network_args`` conv_dim/conv_alpha kept true."""
    meta = dict(lora.metadata)
    old = max((m.old_rank or 0 for m in report.modules), default=0)
    comment = meta.get("ss_training_comment", "")
    if rule.method == "rank":
        conv = "" if not rule.conv_rank or rule.conv_rank == rule.rank else f" (conv: {rule.conv_rank})"
        meta["ss_training_comment"] = f"dimension is resized from {old} to {rule.rank}{conv}; {comment}"
        meta["ss_network_dim"] = str(rule.rank)
        conv_dim = str(rule.conv_rank or rule.rank)
    else:
        meta["ss_training_comment"] = f"Dynamic resize with {rule.method}: {rule.param:g} from {old}; {comment}"
        meta["ss_network_dim"] = "Dynamic"
        conv_dim = "Dynamic"
    # one alpha for every module (kohya writes "Dynamic" or the last module's)
    conv_alpha = meta["ss_network_alpha"] = f"{report.modules[0].alpha:g}" if report.modules else "1"
    args = meta.get("ss_network_args")
    if args:
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "conv_dim" in parsed:
            parsed["conv_dim"] = conv_dim
            if "conv_alpha" in parsed and conv_alpha is not None:
                parsed["conv_alpha"] = conv_alpha
            meta["ss_network_args"] = json.dumps(parsed)
    return meta
