"""Several LoRAs applied exactly to a UNet and its text encoder(s): patched once, restored bit-exactly.

A1111 and ComfyUI apply a LoRA by changing the weights: ``W' = W + Σ cᵢ · ΔWᵢ``, one term
per LoRA, with ``ΔWᵢ`` the module's dense change (LoRA, LoCon, Tucker, LoHa, LoKr, Full;
per-module alpha/rank, :func:`charfw.lora.delta.module_delta`) and ``cᵢ`` its coefficient:

* the LoRA's weight for a UNet module, its text-encoder weight (``te_weight``, the first
  number of A1111's ``<lora:name:te:unet>``; by default the weight) for a text encoder's;
* times the module's block ratio when the LoRA has block weights (a preset such as ``FACE``
  or a 26/17-value vector, LoRA Block Weight's ``lbw=``): the rules are
  :func:`charfw.lora.block_weights.module_ratio`'s, so ``BASE`` is the text encoder and a
  UNet module in no block (time embedding, ``conv_out``) keeps ratio 1, as LBW does.

diffusers' ``load_lora_weights`` cannot be used for this: it mis-reads per-module alphas
(any dynamically resized file) and cannot load LoHa (see the README).

**Once, in float32.** Every ΔW is computed in float32 on the weight's device, the terms of
all LoRAs are summed there, added to the original weight in float32 and the result is cast
to the weight's dtype once: one rounding per weight, whatever the number of LoRAs, so an
fp16/bf16 model gets the same weights as an fp32 patch rounded once.

**Restored bit-exactly, from copies.** Before a weight is first written, a copy of it is
kept (same device, same dtype; only the touched weights). Restoring copies it back, so the
model is bit-identical afterwards; subtracting ΔW again would not be (rounding). Re-patching
with another set always starts from the saved originals, so nothing drifts however many
sets are applied in turn.

**Once per set.** :class:`LoraPatcher` keeps the current set applied and only re-patches
when the set changes: generation calls :meth:`LoraPatcher.apply` for every prompt, and
prompts with the same LoRAs (in any order, same weights and blocks, files unchanged on
disk) cost a ``stat`` per file. The set's terms are summed in a fixed order, so the same set
gives the same bits whatever order the prompt named them in. :func:`patched` is the
one-shot form, a context manager.

**Checked before anything is written** (one-line :class:`~charfw.errors.CharfwError`
naming the file): a module not in the model (a LoRA for another model family), a layer of
another shape, keys of types charfw cannot apply, DoRA modules, NaN/Inf values, an
unknown preset, a vector that is no layout of this model. A failed :meth:`~LoraPatcher.apply`
leaves the model as it was.

:func:`bake_lora` (and :func:`bake_into_pipeline`) add one file's ΔW permanently, with the
same checks and arithmetic; the trainer's tests use them to check its own forward pass.

This module imports torch only inside functions; importing it is cheap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError

if TYPE_CHECKING:
    import torch

    from ..build.template_library import TemplateLibrary
    from ..lora.block_weights import BlockWeights, Preset
    from ..lora.file import LoraFile, LoraModule

__all__ = ["AppliedLora", "LoraPatcher", "LoraSpec", "bake_into_pipeline", "bake_lora", "patched"]

#: the ratio of UNet modules in no block (LBW leaves modules it cannot place alone)
OTHER_RATIO = 1.0
_HINT_FAMILY = "is it a LoRA for another model family?"


# --- what to apply --------------------------------------------------------------------------


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CharfwError(f"LoRA {what}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise CharfwError(f"LoRA {what}: {value!r} is not a finite number")
    return number


@dataclass(frozen=True, init=False)
class LoraSpec:
    """One LoRA to apply: its file, weight, optional block weights and text-encoder weight.

    ``blocks`` is a preset name (``FACE``, ``BODY``, LBW's ``ALL``…, or a workspace's own)
    or a vector of ratios (a list, or a comma-separated string); vectors are stored as a
    tuple so that a spec can be hashed and compared. ``te_weight`` None means ``weight``."""

    path: Path
    weight: float = 1.0
    blocks: str | tuple[float, ...] | None = None
    te_weight: float | None = None

    def __init__(self, path: str | os.PathLike[str], weight: float = 1.0,
                 blocks: str | Sequence[float] | None = None, te_weight: float | None = None) -> None:
        from ..lora.block_weights import is_preset_name, parse_vector

        object.__setattr__(self, "path", Path(path))
        object.__setattr__(self, "weight", _finite_number(weight, "weight"))
        object.__setattr__(self, "te_weight", None if te_weight is None else _finite_number(te_weight, "te weight"))
        normalised: str | tuple[float, ...] | None
        if blocks is None:
            normalised = None
        elif isinstance(blocks, str) and is_preset_name(blocks):
            normalised = blocks.strip()
        else:
            try:
                normalised = parse_vector(blocks)
            except CharfwError as exc:
                raise CharfwError(exc.message, path=self.path, hint=exc.hint) from None
        object.__setattr__(self, "blocks", normalised)

    @property
    def text_encoder_weight(self) -> float:
        """The weight of the text encoder's modules (``te_weight``, else ``weight``)."""
        return self.weight if self.te_weight is None else self.te_weight

    def describe(self) -> str:
        """``name:weight`` as an A1111 tag would say it (``name:te:unet``, ``lbw=``)."""
        text = self.path.stem
        if self.te_weight is not None and self.te_weight != self.weight:
            text += f":{self.te_weight:g}:{self.weight:g}"
        else:
            text += f":{self.weight:g}"
        if isinstance(self.blocks, str):
            text += f":lbw={self.blocks}"
        elif self.blocks is not None:
            text += ":lbw=" + ",".join(f"{v:g}" for v in self.blocks)
        return text

    def _blocks_key(self) -> str:
        if self.blocks is None:
            return ""
        if isinstance(self.blocks, str):
            return "preset:" + self.blocks.upper()
        return "vector:" + ",".join(repr(v) for v in self.blocks)


@dataclass(frozen=True)
class AppliedLora:
    """What one spec of the applied set did: for logs and the generation's infotext."""

    spec: LoraSpec
    #: the resolved block weights (None: every module at ratio 1)
    weights: BlockWeights | None
    #: modules whose ΔW was added (coefficient ≠ 0)
    modules: int
    #: modules left out because their coefficient is 0 (weight 0, or block ratio 0)
    skipped: int


# --- one file, checked ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """A layer a LoRA module can change, with the model root it belongs to."""

    name: str
    module: Any
    text_encoder: bool


@dataclass(frozen=True)
class _Source:
    """A spec resolved against the model: its file and every module's coefficient."""

    spec: LoraSpec
    lora: LoraFile
    weights: BlockWeights | None
    #: module name → coefficient, only the non-zero ones
    coefficients: Mapping[str, float]

    def report(self) -> AppliedLora:
        n = len(self.coefficients)
        return AppliedLora(self.spec, self.weights, n, len(self.lora.modules) - n)


def _file_identity(path: Path) -> tuple[str, int, int]:
    """Which file, in which version: resolved path, modification time, size."""
    try:
        st = path.stat()
    except OSError:
        raise CharfwError("no such file", path=path) from None
    if not path.is_file():
        raise CharfwError("is not a file", path=path)
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def _check_file(lora: LoraFile, layers: Mapping[str, _Layer], path: Path) -> None:
    """Everything that would make applying the file wrong, as one-line errors."""
    from ..lora.file import check_module_finite

    if lora.unknown:
        names = lora.unknown_modules()
        raise CharfwError(f"the file has tensors charfw cannot apply ({', '.join(names[:3])}"
                          f"{', …' if len(names) > 3 else ''})", path=path)
    missing = sorted(set(lora.modules) - set(layers))
    if missing:
        raise CharfwError(f"{len(missing)} module(s) of the file are not in this model (e.g. {missing[0]})",
                          path=path, hint=_HINT_FAMILY)
    for name, module in lora.modules.items():
        if module.dora:
            raise CharfwError(f"module {name} is a DoRA module (dora_scale); charfw cannot apply DoRA "
                              "at generation time", path=path, hint="merge or train it without DoRA")
        weight = layers[name].module.weight
        shape = tuple(int(n) for n in weight.shape)
        if math.prod(module.shape) != math.prod(shape) or module.shape[0] != shape[0]:
            raise CharfwError(f"module {name} changes a layer of shape {list(module.shape)}, but the "
                              f"model's is {list(shape)}", path=path, hint=_HINT_FAMILY)
        bias_change = module.tensors.get("diff_b")
        if bias_change is not None:
            bias = getattr(layers[name].module, "bias", None)
            if bias is None or bias_change.numel() != bias.numel():
                raise CharfwError(f"module {name} changes a bias of {bias_change.numel()} values, but the "
                                  f"model's layer has {0 if bias is None else bias.numel()}", path=path,
                                  hint=_HINT_FAMILY)
    for module in lora.modules.values():
        check_module_finite(module, path)


def _module_delta(module: LoraModule, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The module's ΔW (float32, scale included), computed on ``device``."""
    from ..lora.delta import module_delta

    tensors = {k: v.to(device) for k, v in module.tensors.items() if k != "diff_b"}
    return module_delta(tensors, shape=shape)


# --- the patcher ------------------------------------------------------------------------------


class LoraPatcher:
    """Keeps one set of LoRAs applied to a UNet and its text encoder(s).

    :meth:`apply` makes a set current: when it is the set already applied (same files
    unchanged on disk, weights and blocks, in any order) nothing is done; otherwise every
    touched weight is rewritten from its saved original. :meth:`restore` (or leaving the
    ``with`` block) puts the original weights back, bit-exactly. Not thread-safe: one
    generation loop owns a patcher.

    ``family`` is the model family (``sd1``): it says where its layers are and which block
    layout vectors use. ``templates`` is where presets are found (charfw's own and the
    workspace's ``templates/block-weights/presets.yaml``)."""

    def __init__(self, unet: Any, text_encoders: Sequence[Any], *, family: str = "sd1",
                 templates: TemplateLibrary | None = None) -> None:
        self.unet = unet
        self.text_encoders = list(text_encoders)
        self.family = family
        self.templates = templates
        #: how many times the weights were rewritten: :meth:`apply` with a new set, :meth:`restore`
        self.applications = 0
        self._layers: dict[str, _Layer] | None = None
        self._presets: dict[str, Preset] | None = None
        self._files: dict[str, tuple[tuple[str, int, int], LoraFile]] = {}
        self._key: tuple[tuple[Any, ...], ...] = ()
        self._applied: tuple[AppliedLora, ...] = ()
        #: (module name, "weight" or "bias") → the original tensor
        self._originals: dict[tuple[str, str], torch.Tensor] = {}

    # --- state ----------------------------------------------------------------------------

    @property
    def applied(self) -> tuple[AppliedLora, ...]:
        """The set now applied, one entry per spec, in the order it was applied."""
        return self._applied

    @property
    def touched(self) -> int:
        """How many tensors (weights and biases) differ from the original now."""
        return len(self._originals)

    def __enter__(self) -> LoraPatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    # --- applying -------------------------------------------------------------------------

    def apply(self, specs: Iterable[LoraSpec]) -> bool:
        """Make ``specs`` the applied set; True when the weights were rewritten.

        Every file is read and checked before a weight is written: on a :class:`CharfwError`
        the model keeps the set it had. Should writing itself fail (out of memory), every
        original weight is put back before the exception propagates."""
        ordered = sorted(((self._spec_key(s), s) for s in specs), key=lambda pair: pair[0])
        key = tuple(k for k, _ in ordered)
        if key == self._key:
            return False
        sources = [self._source(s) for _, s in ordered]
        try:
            self._write(sources, backup=True)
        except BaseException:
            self._restore_all()
            raise
        self._key = key
        self._applied = tuple(s.report() for s in sources)
        self.applications += 1
        return True

    def restore(self) -> None:
        """Put every original weight back (bit-exactly); the applied set becomes empty."""
        rewritten = bool(self._originals)
        self._restore_all()
        if rewritten:
            self.applications += 1

    # --- internals ------------------------------------------------------------------------

    def _restore_all(self) -> None:
        import torch

        with torch.no_grad():
            for (name, attr), original in self._originals.items():
                getattr(self._layer_map()[name].module, attr).copy_(original)
        self._originals.clear()
        self._key = ()
        self._applied = ()

    def _layer_map(self) -> dict[str, _Layer]:
        if self._layers is None:
            from ..training.families import get_family
            from ..training.networks.targets import enumerate_targets

            roots = get_family(self.family).roots_for(self.unet, self.text_encoders)
            self._layers = {t.name: _Layer(t.name, t.layer, t.root == "text_encoder")
                            for t in enumerate_targets(roots, conv3x3=True)}
        return self._layers

    def _spec_key(self, spec: LoraSpec) -> tuple[Any, ...]:
        if not isinstance(spec, LoraSpec):
            raise TypeError(f"expected a LoraSpec, got {type(spec).__name__}")
        return (*_file_identity(spec.path), spec.weight, spec.text_encoder_weight, spec._blocks_key())

    def _read(self, spec: LoraSpec) -> LoraFile:
        """The spec's file, read and checked once per version of the file."""
        from ..lora.file import read_lora

        identity = _file_identity(spec.path)
        cached = self._files.get(identity[0])
        if cached is not None and cached[0] == identity:
            return cached[1]
        from ..training.families import get_family

        # files of other tools in another naming (kohya's SD3 names) as modules on our layers
        lora = get_family(self.family).adapt_lora(read_lora(spec.path), self.unet)
        _check_file(lora, self._layer_map(), spec.path)
        self._files[identity[0]] = (identity, lora)
        return lora

    def _block_weights(self, spec: LoraSpec) -> BlockWeights | None:
        from ..lora.block_weights import layout_family, load_presets, resolve_weights

        if spec.blocks is None:
            return None
        try:
            if isinstance(spec.blocks, str) and self._presets is None:
                self._presets = load_presets(self.templates)
            return resolve_weights(spec.blocks, layout_family(self.family), self._presets or {})
        except CharfwError as exc:
            raise CharfwError(exc.message, path=spec.path, hint=exc.hint) from None

    def _source(self, spec: LoraSpec) -> _Source:
        from ..lora.block_weights import module_ratio

        lora = self._read(spec)
        weights = self._block_weights(spec)
        layers = self._layer_map()
        coefficients: dict[str, float] = {}
        for name in lora.modules:
            weight = spec.text_encoder_weight if layers[name].text_encoder else spec.weight
            if weights is not None:
                try:
                    weight *= module_ratio(name, weights, other=OTHER_RATIO)[1]
                except CharfwError as exc:
                    raise CharfwError(exc.message, path=spec.path, hint=exc.hint) from None
            if weight != 0:
                coefficients[name] = weight
        return _Source(spec, lora, weights, coefficients)

    def _write(self, sources: Sequence[_Source], *, backup: bool) -> None:
        """Rewrite every weight the sources touch from its original; put back the ones
        they no longer touch. ``backup`` False (baking): no originals are kept."""
        import torch

        layers = self._layer_map()
        wanted = {name for s in sources for name in s.coefficients}
        with torch.no_grad():
            for key in [k for k in self._originals if k[0] not in wanted]:
                getattr(layers[key[0]].module, key[1]).copy_(self._originals.pop(key))
            for name in (n for n in layers if n in wanted):  # the model's order: deterministic
                terms = [(s.coefficients[name], s.lora.modules[name]) for s in sources if name in s.coefficients]
                self._write_layer(layers[name], terms, backup=backup)

    def _write_layer(self, layer: _Layer, terms: Sequence[tuple[float, LoraModule]], *, backup: bool) -> None:
        import torch

        weight = layer.module.weight
        shape = tuple(int(n) for n in weight.shape)
        total: torch.Tensor | None = None
        bias_total: torch.Tensor | None = None
        for coefficient, module in terms:
            delta = _module_delta(module, shape, weight.device)
            delta = delta if coefficient == 1 else delta * coefficient
            total = delta if total is None else total + delta
            if "diff_b" in module.tensors:
                bias = layer.module.bias
                change = module.tensors["diff_b"].to(bias.device, torch.float32).reshape(bias.shape) * coefficient
                bias_total = change if bias_total is None else bias_total + change
        assert total is not None
        self._write_tensor(layer, "weight", total, backup=backup)
        key = (layer.name, "bias")
        if bias_total is not None:
            self._write_tensor(layer, "bias", bias_total, backup=backup)
        elif key in self._originals:
            layer.module.bias.copy_(self._originals.pop(key))

    def _write_tensor(self, layer: _Layer, attr: str, total: torch.Tensor, *, backup: bool) -> None:
        """``W = (W₀ in float32 + total)`` cast to W's dtype once; W₀ saved on first write."""
        import torch

        param = getattr(layer.module, attr)
        key = (layer.name, attr)
        original = self._originals.get(key)
        if original is None:
            original = param.detach()
            if backup:
                original = self._originals[key] = original.clone()
        base = original.to(device=param.device, dtype=torch.float32)
        param.copy_((base + total).to(param.dtype))


# --- the one-shot forms -------------------------------------------------------------------------


@contextmanager
def patched(unet: Any, text_encoders: Sequence[Any], specs: Iterable[LoraSpec], *, family: str = "sd1",
            templates: TemplateLibrary | None = None) -> Iterator[LoraPatcher]:
    """Apply ``specs`` inside the block and restore the original weights bit-exactly after
    it (also when it raises). Yields the :class:`LoraPatcher` (``.applied`` says what was
    applied). For one set per prompt over many prompts, keep a :class:`LoraPatcher`."""
    patcher = LoraPatcher(unet, text_encoders, family=family, templates=templates)
    patcher.apply(specs)
    try:
        yield patcher
    finally:
        patcher.restore()


def bake_lora(unet: Any, text_encoders: Sequence[Any], path: str | os.PathLike[str], *,
              multiplier: float = 1.0, family: str = "sd1") -> list[str]:
    """Add a LoRA file's ``multiplier · ΔW`` to the weights permanently (no copies kept);
    returns the names of the file's modules. Same checks and arithmetic as :func:`patched`."""
    patcher = LoraPatcher(unet, text_encoders, family=family)
    source = patcher._source(LoraSpec(path, multiplier))
    patcher._write([source], backup=False)
    return sorted(source.lora.modules)


def bake_into_pipeline(pipe: Any, path: str | os.PathLike[str], *, multiplier: float = 1.0) -> list[str]:
    """:func:`bake_lora` on a diffusers Stable Diffusion pipeline's UNet and text encoder."""
    return bake_lora(pipe.unet, [pipe.text_encoder], path, multiplier=multiplier)
