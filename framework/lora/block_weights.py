"""Per-block weights (LoRA Block Weight / SuperMerger vectors) applied exactly to a LoRA file.

The method finishes a face LoRA with ``FACE`` and a body or group LoRA with ``BODY``: one
ratio per UNet block (and ``BASE`` for the text encoder) saying how much of the LoRA to
keep there. Applied at generation time by LBW, each ratio multiplies the module's ΔW. A
merged file must give the same images, so here every module's ΔW is multiplied by exactly
its block's ratio r, whatever the network type, by scaling *one* factor of the product
(LoRA ``lora_up``, LoHa ``hada_w1_a``, LoKr ``lokr_w1``/``lokr_w1_a``, Full ``diff``);
a module whose ratio is 0 is dropped. SuperMerger's LoRA-to-LoRA merge instead scales
every tensor by r (or √r), which gives r², r³ or r^1.5 on LyCORIS files and is why its
README allows only 0 and 1 for them (``reference/block-weights-lycoris.md`` §4).

Layouts and block names are LBW's: a vector has 26 or 17 values (SD 1.x/2.x) or 20 or 12
(SDXL), is placed by block name, and blocks a short vector does not name get 0. Module →
block follows the standard diffusers ↔ LDM mapping (``down_blocks.i.{resnets,attentions}.j``
→ ``IN(1+3i+j)``, downsampler i → ``IN(3+3i)``, ``mid_block`` → ``M00``, up (i, j) →
``OUT(3i+j)``, upsampler i → ``OUT(3i+2)``, ``conv_in`` → ``IN00``); SGM-named (SDXL)
files name the block directly (``input_blocks_N`` → ``IN N``).

**SD 3.5** has no UNet blocks and LBW has no vector for it; charfw's layout is one value per
MMDiT joint block after ``BASE`` (the CLIP text encoders): ``BASE, J00 … J23`` (25 values,
SD3/SD 3.5 Medium's 24 blocks) or ``BASE, J00 … J37`` (39 values, SD 3.5 Large's 38). Block
``JNN`` is diffusers' ``transformer_blocks.NN`` (kohya's ``joint_blocks.NN``) with everything
in it: both attentions, both feed-forwards, the adaptive norms. The embedders,
``context_embedder`` and the final layer are in no block (the ``other`` ratio). A 25-value
vector on a Large file gives J24-J37 0, as a short LBW vector does.

Two rules the tools disagree on, made explicit here:

* **BASE is the text encoder, only** (``lora_te_``, ``lora_te1_``, ``lora_te2_``).
* **Modules in no block** (``time_embedding``, ``conv_out``, ``conv_norm_out``, SDXL
  ``add_embedding``/``label_emb``, LyCORIS "full" presets train them) get the ``other``
  ratio, 1 by default, as LBW does at generation time (it leaves modules it cannot place
  alone); ``other="BASE"`` gives them BASE's ratio as SuperMerger's merge does.

This module imports no torch: presets and vectors are checked when a manifest is.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError
from .names import TE_PREFIXES

if TYPE_CHECKING:
    from charfw.build.template_library import TemplateLibrary

    from .file import LoraFile, LoraModule

PRESETS_FILE = "block-weights/presets.yaml"

BLOCKS26: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS17: tuple[str, ...] = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                             *(f"OUT{i:02d}" for i in range(3, 12)))
BLOCKS20: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
BLOCKS12: tuple[str, ...] = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
#: SD 3.5: BASE (the CLIP encoders), then one value per joint block (Medium 24, Large 38)
BLOCKS_SD35_MEDIUM: tuple[str, ...] = ("BASE", *(f"J{i:02d}" for i in range(24)))
BLOCKS_SD35_LARGE: tuple[str, ...] = ("BASE", *(f"J{i:02d}" for i in range(38)))

#: layout family → vector length → block names, in vector order
LAYOUTS: dict[str, dict[int, tuple[str, ...]]] = {
    "sd1": {26: BLOCKS26, 17: BLOCKS17},
    "sdxl": {20: BLOCKS20, 12: BLOCKS12},
    "sd35": {25: BLOCKS_SD35_MEDIUM, 39: BLOCKS_SD35_LARGE},
}
FAMILY_NAMES = {"sd1": "SD 1.x/2.x", "sdxl": "SDXL", "sd35": "SD 3.5"}


def full_layout(family: str) -> tuple[str, ...]:
    """Every block a layout family has (its longest layout)."""
    return max(LAYOUTS[family].values(), key=len)


def layout_family(family: str) -> str:
    """The block layout a base-model family uses (SD 2.x has SD 1.x's blocks)."""
    if family in ("sd1", "sd2"):
        return "sd1"
    if family in ("sdxl", "sd35"):
        return family
    raise CharfwError(
        "cannot tell which base model this LoRA is for (no SD 1.x/2.x, SDXL or SD 3.5 module names), "
        "so its blocks are unknown"
    )


def family_of_length(n: int) -> str | None:
    for fam, layouts in LAYOUTS.items():
        if n in layouts:
            return fam
    return None


# --- module name → block -----------------------------------------------------------------

_DOWN = re.compile(r"^lora_unet_down_blocks_(\d+)_(?:resnets|attentions)_(\d+)_")
_DOWNSAMPLE = re.compile(r"^lora_unet_down_blocks_(\d+)_downsamplers_")
_UP = re.compile(r"^lora_unet_up_blocks_(\d+)_(?:resnets|attentions)_(\d+)_")
_UPSAMPLE = re.compile(r"^lora_unet_up_blocks_(\d+)_upsamplers_")
_SGM_IN = re.compile(r"^lora_unet_input_blocks_(\d+)_")
_SGM_OUT = re.compile(r"^lora_unet_output_blocks_(\d+)_")
_JOINT = re.compile(r"^lora_(?:transformer_transformer_blocks|unet_joint_blocks)_(\d+)_")


def block_of(name: str) -> str | None:
    """The LBW block of a kohya module name: ``BASE``, ``IN00``…, ``M00``, ``OUT00``… (SD 3.5:
    ``J00``…), or
    None for a UNet module in no block (time embedding, ``conv_out``, ``add_embedding``) and
    for names that are not UNet/text-encoder modules."""
    if name.startswith(TE_PREFIXES):
        return "BASE"
    if m := _JOINT.match(name):  # SD 3.5
        return f"J{int(m[1]):02d}"
    if not name.startswith("lora_unet_"):
        return None
    if m := _DOWN.match(name):
        return f"IN{1 + 3 * int(m[1]) + int(m[2]):02d}"
    if m := _DOWNSAMPLE.match(name):
        return f"IN{3 + 3 * int(m[1]):02d}"
    if name.startswith(("lora_unet_mid_block_", "lora_unet_middle_block_")):
        return "M00"
    if m := _UP.match(name):
        return f"OUT{3 * int(m[1]) + int(m[2]):02d}"
    if m := _UPSAMPLE.match(name):
        return f"OUT{3 * int(m[1]) + 2:02d}"
    if m := _SGM_IN.match(name + "_"):
        return f"IN{int(m[1]):02d}"
    if m := _SGM_OUT.match(name):
        return f"OUT{int(m[1]):02d}"
    if name == "lora_unet_conv_in":
        return "IN00"
    return None


# --- vectors and presets -----------------------------------------------------------------


def parse_vector(value: Any, *, what: str = "block weights") -> tuple[float, ...]:
    """``"0,1,0.5"`` or ``[0, 1, 0.5]`` → floats; a bad item is an error that names it."""
    items: list[Any]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise CharfwError(f"{what}: expected comma-separated numbers, got {value!r}")
    out = []
    for i, item in enumerate(items, 1):
        if isinstance(item, bool):
            raise CharfwError(f"{what}: value {i} ({item!r}) is not a number")
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise CharfwError(f"{what}: value {i} ({item!r}) is not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise CharfwError(f"{what}: value {i} ({item!r}) is not a finite number")
        out.append(number)
    return tuple(out)


def _check_length(values: tuple[float, ...], what: str) -> str:
    fam = family_of_length(len(values))
    if fam is None:
        raise CharfwError(
            f"{what}: {len(values)} values is not a block layout; use 26 or 17 (SD 1.x/2.x), "
            "20 or 12 (SDXL), 25 or 39 (SD 3.5 Medium, Large)"
        )
    return fam


@dataclass(frozen=True)
class Preset:
    """A named set of vectors, at most one per layout family."""

    name: str
    vectors: Mapping[str, tuple[float, ...]]
    source: str = ""


def _preset_entry(name: str, value: Any, source: str) -> Preset:
    vectors: dict[str, tuple[float, ...]] = {}
    what = f"preset {name}"
    if isinstance(value, Mapping):
        for key, vec in value.items():
            fam = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sd35": "sd35"}.get(str(key))
            if fam is None:
                raise CharfwError(f"{what}: unknown base model '{key}'; use sd1, sdxl or sd35")
            values = parse_vector(vec, what=what)
            got = _check_length(values, what)
            if got != fam:
                raise CharfwError(f"{what}: the {key} vector has {len(values)} values, a {FAMILY_NAMES[got]} layout")
            vectors[fam] = values
    elif isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        for vec in value:
            values = parse_vector(vec, what=what)
            vectors[_check_length(values, what)] = values
    else:
        values = parse_vector(value, what=what)
        vectors[_check_length(values, what)] = values
    return Preset(name, vectors, source)


def read_presets_file(path: Path) -> dict[str, Preset]:
    """Presets from a YAML file (``presets: {NAME: vector}``) or an LBW ``lbwpresets.txt``
    (``NAME:v1,v2,…`` lines; lines with ``#`` are ignored, as LBW does)."""

    source = str(path)
    if path.suffix.lower() == ".txt":
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise CharfwError(f"cannot read ({exc.strerror or exc})", path=path) from None
        out = {}
        for line in text.splitlines():
            if "#" in line or ":" not in line:
                continue
            name, _, vec = line.partition(":")
            name = name.strip()
            if name:
                out[name] = _preset_entry(name, vec, source)
        return out
    from charfw.build.template_library import read_yaml_file  # pydantic: only when presets are read

    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("presets", {}), dict) or set(data) - {"presets"}:
        raise CharfwError("expected a mapping 'presets: {NAME: vector}'", path=path)
    try:
        return {str(name): _preset_entry(str(name), value, source) for name, value in (data.get("presets") or {}).items()}
    except CharfwError as exc:
        raise CharfwError(exc.message, path=path) from None


def load_presets(templates: TemplateLibrary | None = None, extra: Iterable[Path] = ()) -> dict[str, Preset]:
    """charfw's presets, then the workspace's ``templates/block-weights/presets.yaml``, then
    ``extra`` files; a later preset replaces an earlier one of the same name."""
    if templates is None:
        from charfw.build.template_library import TemplateLibrary

        templates = TemplateLibrary(None)
    presets: dict[str, Preset] = {}
    for folder in reversed(templates.dirs):
        path = folder / PRESETS_FILE
        if path.is_file():
            presets.update(read_presets_file(path))
    for path in extra:
        presets.update(read_presets_file(Path(path)))
    return presets


@dataclass(frozen=True)
class BlockWeights:
    """A resolved vector: a ratio for every block of its family's full layout."""

    #: "sd1" (SD 1.x/2.x layouts), "sdxl" or "sd35"
    family: str
    #: the preset's name, or "custom"
    name: str
    values: tuple[float, ...]
    #: the block names of ``values``, in order
    layout: tuple[str, ...]
    ratios: Mapping[str, float]

    @property
    def full(self) -> tuple[str, ...]:
        return full_layout(self.family)

    def ratio(self, block: str) -> float:
        return self.ratios[block]

    def text(self) -> str:
        return ",".join(f"{v:g}" for v in self.values)

    def describe(self) -> str:
        label = self.name if self.name != "custom" else "custom"
        return f"{label} ({len(self.values)} values: {self.text()})"


def is_preset_name(spec: str) -> bool:
    """A vector has commas (or is one number); anything else names a preset."""
    text = spec.strip()
    return "," not in text and not re.fullmatch(r"[-+]?[\d.]+(?:[eE][-+]?\d+)?", text)


def resolve_weights(spec: str | Sequence[float], family: str, presets: Mapping[str, Preset]) -> BlockWeights:
    """A preset name or a vector → :class:`BlockWeights` for a LoRA of ``family``.

    Errors (one line each): an unknown preset (with the closest name), a vector whose
    length is no layout, a layout of the other base model, a preset with no vector for
    this base model."""
    fam = layout_family(family)
    name = "custom"
    if isinstance(spec, str) and is_preset_name(spec):
        key = spec.strip()
        preset = presets.get(key) or next((p for n, p in presets.items() if n.upper() == key.upper()), None)
        if preset is None:
            close = difflib.get_close_matches(key.upper(), [n.upper() for n in presets], n=1)
            original = {n.upper(): n for n in presets}
            hint = f"did you mean '{original[close[0]]}'? " if close else ""
            raise CharfwError(f"unknown block-weight preset '{key}'",
                              hint=f"{hint}presets: {', '.join(presets)}; or give 26/17 (SD 1.x), 20/12 (SDXL) "
                                   "or 25/39 (SD 3.5) numbers")
        if fam not in preset.vectors:
            raise CharfwError(
                f"preset {preset.name} has no {FAMILY_NAMES[fam]} vector",
                hint=f"add a {fam}: vector for it in templates/{PRESETS_FILE}",
            )
        values = preset.vectors[fam]
        name = preset.name
    else:
        values = parse_vector(spec)
        got = _check_length(values, "block weights")
        if got != fam:
            sizes = " or ".join(str(n) for n in LAYOUTS[fam])
            raise CharfwError(
                f"{len(values)} block weights is a {FAMILY_NAMES[got]} layout, but this LoRA is for {FAMILY_NAMES[fam]}",
                hint=f"give {sizes} values",
            )
    layout = LAYOUTS[fam][len(values)]
    full = full_layout(fam)
    ratios = dict.fromkeys(full, 0.0)
    ratios.update(zip(layout, values, strict=True))
    return BlockWeights(fam, name, values, layout, ratios)


# --- applying ----------------------------------------------------------------------------


@dataclass
class BlockMergeReport:
    """What a block merge did, for the summary and ``charfw lora blocks``."""

    weights: BlockWeights
    strength: float
    other: float | str
    #: block → (modules in the file, ratio applied)
    blocks: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: out-of-block module names → ratio applied
    outside: dict[str, float] = field(default_factory=dict)
    kept: int = 0
    scaled: int = 0
    dropped: int = 0
    #: blocks a short vector did not name that hold modules of this file (they got 0)
    unnamed: list[str] = field(default_factory=list)
    #: DoRA modules scaled by a ratio other than 0 and 1 (their renormalisation is not linear)
    dora_scaled: int = 0
    #: unknown-type keys kept as they are
    unknown_kept: int = 0
    unknown_dropped: int = 0

    def lines(self) -> list[str]:
        out = [f"block weights {self.weights.describe()}"
               + (f" x{self.strength:g}" if self.strength != 1 else "")]
        out.append(f"{self.scaled} modules scaled, {self.kept} unchanged, {self.dropped} dropped (ratio 0)")
        if self.unnamed:
            out.append(f"{len(self.weights.values)}-value layout: blocks {', '.join(self.unnamed)} are not in it "
                       f"and got 0; give {len(self.weights.full)} values to weight them")
        if self.outside:
            ratios = sorted(set(self.outside.values()))
            out.append(f"{len(self.outside)} modules in no block (time embedding, conv_out…) got "
                       f"{', '.join(f'{r:g}' for r in ratios)} (other={self.other})")
        if self.dora_scaled:
            out.append(f"{self.dora_scaled} DoRA modules scaled: their direction is scaled exactly, "
                       "their magnitude (dora_scale) is kept")
        if self.unknown_kept or self.unknown_dropped:
            out.append(f"unknown keys: {self.unknown_kept} kept unchanged, {self.unknown_dropped} dropped")
        return out

    def table(self) -> list[str]:
        """``BLOCK  modules  ratio`` rows, in layout order, for blocks that have modules."""
        rows = []
        for block in self.weights.full:
            if block in self.blocks:
                n, r = self.blocks[block]
                rows.append(f"{block:<6} {n:>4} modules  x{r:g}")
        return rows


def module_ratio(name: str, weights: BlockWeights, *, other: float | str = 1.0, strength: float = 1.0) -> tuple[str | None, float]:
    """(block, ratio) of a module under ``weights``."""
    block = block_of(name)
    if block is None:
        r = weights.ratio("BASE") if other == "BASE" else float(other)
        return None, r * strength
    if block not in weights.ratios:
        raise CharfwError(
            f"module {name} is in block {block}, which {FAMILY_NAMES[weights.family]} does not have",
            hint="the file mixes base models or is misdetected",
        )
    return block, weights.ratio(block) * strength


def apply_block_weights(lora: LoraFile, weights: BlockWeights, *, other: float | str = 1.0,
                        strength: float = 1.0) -> tuple[LoraFile, BlockMergeReport]:
    """Multiply every module's ΔW by its block's ratio (× ``strength``); drop ratio-0 modules.

    Unknown-type modules (IA3, OFT, GLoRA, norms) cannot be scaled exactly: at ratio 0
    they are dropped, at 1 kept, any other ratio is an error that names the module."""
    if other != "BASE" and not isinstance(other, int | float):
        raise CharfwError(f"other: expected a number or BASE, got {other!r}")
    report = BlockMergeReport(weights, strength, other)
    kept: list[LoraModule] = []
    present_blocks: set[str] = set()
    for module in lora.modules.values():
        block, r = module_ratio(module.name, weights, other=other, strength=strength)
        if block is None:
            report.outside[module.name] = r
        else:
            present_blocks.add(block)
            n, _ = report.blocks.get(block, (0, r))
            report.blocks[block] = (n + 1, r)
        if r == 0:
            report.dropped += 1
            continue
        if r == 1:
            report.kept += 1
            kept.append(module)
            continue
        report.scaled += 1
        if module.dora:
            report.dora_scaled += 1
        kept.append(module.times(r))
    unknown = {}
    for key, t in lora.unknown.items():
        name = key.split(".", 1)[0]
        if not name.startswith(("lora_unet_", *TE_PREFIXES)):
            unknown[key] = t
            report.unknown_kept += 1
            continue
        block, r = module_ratio(name, weights, other=other, strength=strength)
        if r == 0:
            report.unknown_dropped += 1
            continue
        if r != 1:
            raise CharfwError(
                f"module {name} ({key.split('.', 1)[1] if '.' in key else key}) is of a type charfw cannot "
                f"scale exactly, and its block {block or '(none)'} has ratio {r:g}",
                path=lora.path,
                hint="give that block 0 (drop it) or 1 (keep it)",
            )
        unknown[key] = t
        report.unknown_kept += 1
    if not kept and not unknown:
        raise CharfwError(f"every module has ratio 0 under {weights.describe()}: the result would be empty",
                          path=lora.path)
    report.unnamed = [b for b in weights.full if b in present_blocks and b not in weights.layout]
    metadata = dict(lora.metadata)
    note = f"block weights {weights.name} {weights.text()}" + (f" x{strength:g}" if strength != 1 else "")
    note += f" (other {other}) applied by charfw"
    metadata["ss_training_comment"] = f"{note}; {metadata.get('ss_training_comment', '')}".rstrip("; ").rstrip()
    return lora.with_modules(kept, unknown=unknown, metadata=metadata), report
