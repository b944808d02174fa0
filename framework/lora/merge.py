"""Merging several LoRAs into one, exactly, at kohya's ranks.

**Merging** sums the scaled deltas exactly: for LoRA sources the factors are stacked
(``[c₁U₁ … cₙUₙ]·[D₁; …; Dₙ] = Σ cᵢ UᵢDᵢ``, ``cᵢ`` = ratio × block ratio × αᵢ/rᵢ) and
reduced by the same QR route; other types go through the dense sum. Nothing is clamped
unless ``clamp_quantile`` asks for kohya ``svd_merge_lora.py``'s clamp (0.99 there).
The ranks, the spectra and the module builder are :mod:`charfw.lora.svd`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import CharfwError
from .block_weights import BlockWeights, module_ratio
from .delta import tucker_down
from .file import LoraFile, LoraModule
from .safetensors_io import parse_precision, torch_dtype
from .svd import (
    ModuleResize,
    NewFactors,
    RankRule,
    choose_rank,
    dense_spectrum,
    factor_spectrum,
    parallel_map,
    retained,
    store_modules,
)


@dataclass(frozen=True)
class MergeSource:
    """One input of a merge: a file, its ratio and optional per-block weights."""

    lora: LoraFile
    ratio: float = 1.0
    weights: BlockWeights | None = None
    label: str = ""


@dataclass
class MergeReport:
    rule: RankRule
    sources: list[str]
    modules: list[ModuleResize] = field(default_factory=list)
    dropped_unknown: int = 0
    clamp_quantile: float | None = None

    def lines(self) -> list[str]:
        ranks = sorted(m.new_rank for m in self.modules)
        fro = [m.fro_retained for m in self.modules]
        out = [f"merged {len(self.sources)} files: {'; '.join(self.sources)}",
               f"{len(ranks)} modules at {self.rule.describe()}: ranks {ranks[0]}..{ranks[-1]}" if ranks else "no modules"]
        if fro:
            out.append(f"Frobenius norm retained: average {sum(fro) / len(fro):.2%}, lowest {min(fro):.1%}")
        if self.clamp_quantile is not None:
            out.append(f"factors clamped at their {self.clamp_quantile:g} quantile (lossy, as kohya's svd_merge_lora)")
        if self.dropped_unknown:
            out.append(f"{self.dropped_unknown} keys of unknown types left out")
        return out


def _clamp(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    dist = torch.cat([up.flatten(), down.flatten()])
    if dist.numel() > 16_000_000:  # torch.quantile's limit: sample evenly
        dist = dist[:: math.ceil(dist.numel() / 16_000_000)]
    h = float(torch.quantile(dist, q))
    return up.clamp(-h, h), down.clamp(-h, h)


def merge_loras(sources: Sequence[MergeSource], rule: RankRule, *, precision: str | torch.dtype | None = None,
                clamp_quantile: float | None = None, other: float | str = 1.0, threads: int | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[LoraFile, MergeReport]:
    """One LoRA whose ΔW is the exact sum of each source's ΔW × ratio (× block ratio),
    reduced to ``rule``'s ranks; one alpha for the file (the most common rank: scale 1 there,
    as kohya's ``svd_merge_lora.py``; see :func:`~charfw.lora.svd.store_modules`)."""
    if not sources:
        raise CharfwError("nothing to merge")
    families = {s.lora.family for s in sources}
    if len(families) > 1:
        raise CharfwError(f"these LoRAs are for different base models ({', '.join(sorted(families))})")
    for s in sources:
        if s.lora.dora:
            raise CharfwError(f"{s.label or s.lora.path}: has {s.lora.dora} DoRA modules; their magnitude depends on "
                              "the base weight, so they cannot be summed with other LoRAs")
    dtype = torch_dtype(parse_precision(precision)) if precision is not None else sources[0].lora.float_dtype
    names: list[str] = []
    seen = set()
    for s in sources:
        for name in s.lora.modules:
            if name not in seen:
                seen.add(name)
                names.append(name)

    def coefficient(s: MergeSource, module: LoraModule) -> float:
        ratio = s.ratio
        if s.weights is not None:
            ratio *= module_ratio(module.name, s.weights, other=other)[1]
        return ratio

    def work(name: str) -> tuple[NewFactors, ModuleResize] | None:
        parts = [(s, s.lora.modules[name]) for s in sources if name in s.lora.modules]
        parts = [(s, m, coefficient(s, m)) for s, m in parts]
        parts = [(s, m, c) for s, m, c in parts if c != 0]
        if not parts:
            return None
        shapes = {m.shape for _, m, _ in parts}
        if len(shapes) > 1:
            raise CharfwError(f"module {name} changes layers of different shapes in the inputs: "
                              + ", ".join(str(list(sh)) for sh in shapes))
        shape = parts[0][1].shape
        if all(m.kind == "lora" for _, m, _ in parts):
            Us, Ds = [], []
            for _s, m, c in parts:
                up, down, mid = m.tensors["lora_up.weight"], m.tensors["lora_down.weight"], m.tensors.get("lora_mid.weight")
                D = tucker_down(down.float(), mid.float()) if mid is not None else down.float()
                Us.append(up.float().reshape(up.shape[0], -1) * (c * m.scale))
                Ds.append(D.reshape(D.shape[0], -1))
            spectrum = factor_spectrum(torch.cat(Us, 1), torch.cat(Ds, 0))
        else:
            total = None
            for _s, m, c in parts:
                d = m.delta().reshape(shape[0], -1) * c
                total = d if total is None else total + d
            assert total is not None
            spectrum = dense_spectrum(total)
        # without --rank a dynamic method is capped by the rank of the sum (Σ ranks for LoRA)
        total_rank = sum(m.rank or 0 for _, m, _ in parts) if all(m.kind == "lora" for _, m, _ in parts) else None
        cap = rule.cap(len(shape) == 4, total_rank)
        k = choose_rank(spectrum.S, min(spectrum.out, spectrum.cols), rule, cap)
        up, down = spectrum.top(k)
        if up.shape[1] < k:
            up = torch.cat([up, up.new_zeros(up.shape[0], k - up.shape[1])], 1)
            down = torch.cat([down, down.new_zeros(k - down.shape[0], down.shape[1])], 0)
        if clamp_quantile is not None:
            up, down = _clamp(up, down, clamp_quantile)
        s_sum, s_fro, ratio = retained(spectrum.S, k)
        return NewFactors(name, shape, up, down, 1.0), ModuleResize(name, None, k, 0.0, s_sum, s_fro, ratio)

    results = [r for r in parallel_map(work, names, threads, progress) if r is not None]
    modules, alpha = store_modules([r[0] for r in results], dtype, threads)
    labels = [f"{s.label or (s.lora.path.name if s.lora.path else '?')} x{s.ratio:g}"
              + (f" ({s.weights.name if s.weights.name != 'custom' else s.weights.text()})" if s.weights else "")
              for s in sources]
    report = MergeReport(rule, labels, [replace(r[1], alpha=alpha) for r in results],
                         dropped_unknown=sum(len(s.lora.unknown) for s in sources), clamp_quantile=clamp_quantile)
    meta = dict(sources[0].lora.metadata)
    for key in [k for k in meta if k.startswith(("sshs_", "ss_tag_frequency", "ss_dataset_dirs", "ss_datasets"))]:
        del meta[key]
    ranks = {m.new_rank for m in report.modules}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_dim"] = dim
    meta["ss_network_alpha"] = f"{alpha:g}"
    meta["ss_training_comment"] = f"merged by charfw ({rule.describe()}): {'; '.join(labels)}"
    meta["modelspec.merged_from"] = ", ".join(
        (s.lora.path.stem if s.lora.path else s.label) for s in sources)
    merged = sources[0].lora.with_modules(modules, unknown={}, metadata=meta)
    return merged, report
