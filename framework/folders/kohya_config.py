"""The kohya sd-scripts dataset config (``--dataset_config file.toml``) as pydantic models.

sd-scripts validates this file with a strict voluptuous schema: unknown or misplaced
keys are rejected, and types are checked. These models follow that schema key for key
(``library/config_util.py``; see ``reference/kohya-formats.md`` section 3), so that

* charfw's dataset writer can check every TOML it writes before the file appears, and
* charfw's trainer reads exactly the files sd-scripts reads, with the same defaults
  (subset → dataset → general → default), via :func:`resolve_subsets`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from charfw.errors import CharfwError

Number = StrictFloat | StrictInt
Resolution = StrictInt | tuple[StrictInt, StrictInt]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _AllLevels(_Strict):
    """Keys allowed in [general], [[datasets]] and [[datasets.subsets]]."""

    num_repeats: StrictInt | None = None
    keep_tokens: StrictInt | None = None
    token_warmup_min: StrictInt | None = None
    token_warmup_step: Number | None = None
    shuffle_caption: StrictBool | None = None
    flip_aug: StrictBool | None = None
    color_aug: StrictBool | None = None
    random_crop: StrictBool | None = None
    enable_wildcard: StrictBool | None = None
    caption_separator: StrictStr | None = None
    keep_tokens_separator: StrictStr | None = None
    secondary_separator: StrictStr | None = None
    caption_prefix: StrictStr | None = None
    caption_suffix: StrictStr | None = None
    resize_interpolation: StrictStr | None = None
    face_crop_aug_range: tuple[Number, Number] | None = None
    custom_attributes: dict[str, Any] | None = None
    caption_dropout_rate: Number | None = None
    caption_tag_dropout_rate: Number | None = None
    caption_dropout_every_n_epochs: StrictInt | None = None
    # DreamBooth-style keys (also accepted at every level by the schema)
    caption_extension: StrictStr | None = None
    class_tokens: StrictStr | None = None
    cache_info: StrictBool | None = None


class _DatasetLevel(_AllLevels):
    """Keys allowed in [general] and [[datasets]] but not in subsets."""

    resolution: Resolution | None = None
    batch_size: StrictInt | None = None
    enable_bucket: StrictBool | None = None
    bucket_no_upscale: StrictBool | None = None
    min_bucket_reso: StrictInt | None = None
    max_bucket_reso: StrictInt | None = None
    bucket_reso_steps: StrictInt | None = None
    network_multiplier: Number | None = None
    validation_split: Number | None = None
    validation_seed: StrictInt | None = None


class KohyaSubset(_AllLevels):
    image_dir: StrictStr | None = None
    is_reg: StrictBool | None = None
    alpha_mask: StrictBool | None = None
    metadata_file: StrictStr | None = None

    @model_validator(mode="after")
    def _kind(self) -> KohyaSubset:
        if self.image_dir is None and self.metadata_file is None:
            raise ValueError("a subset needs image_dir (DreamBooth style) or metadata_file")
        return self


class KohyaGeneral(_DatasetLevel):
    pass


class KohyaDataset(_DatasetLevel):
    subsets: list[KohyaSubset] = []

    @model_validator(mode="after")
    def _not_mixed(self) -> KohyaDataset:
        kinds = {s.metadata_file is None for s in self.subsets}
        if len(kinds) > 1:
            raise ValueError(
                "a dataset mixes DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file)"
            )
        return self


class KohyaDatasetConfig(_Strict):
    general: KohyaGeneral = KohyaGeneral()
    datasets: list[KohyaDataset] = []


#: sd-scripts' defaults for values no level sets (train_util / config_util)
DEFAULTS: dict[str, Any] = {
    "num_repeats": 1,
    "keep_tokens": 0,
    "shuffle_caption": False,
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
    "enable_wildcard": False,
    "caption_separator": ",",
    "caption_extension": ".caption",
    "class_tokens": None,
    "caption_prefix": None,
    "caption_suffix": None,
    "caption_dropout_rate": 0.0,
    "caption_tag_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "keep_tokens_separator": "",
    "secondary_separator": None,
    "batch_size": 1,
    "resolution": None,
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "network_multiplier": 1.0,
    "is_reg": False,
    "alpha_mask": False,
}


# --- the method's dataset rules per model family ---------------------------------------------


@dataclass(frozen=True)
class FamilyDatasetRules:
    """How the method's dataset rules scale with a model family's native size.

    The seed's resolution classes are SD 1.x's: an image up to 512 px on both sides trains
    at 512, up to 768 at 768, anything larger at 1024. They are the native size × 1, 1.5
    and 2, so an SDXL or SD 3.5 dataset (native 1024) trains at 1024, 1536 and 2048. The
    bucket settings are those sd-scripts' SDXL trainings use (256 to 2048 in steps of 64);
    SD 1.x keeps sd-scripts' defaults (256 to 1024, 64), which the TOML then leaves out."""

    family: str
    label: str
    #: the family's native training size
    native: int
    #: the upper bounds of the LOW and MID classes, and the HIGH class's resolution
    resolutions: tuple[int, int, int]
    #: what [general] sets for the buckets (None: sd-scripts' default, not written)
    min_bucket_reso: int | None
    max_bucket_reso: int | None
    bucket_reso_steps: int | None
    #: the multiple sd-scripts' trainer for the family requires of bucket_reso_steps
    #: (train_network.py 64, sdxl_train_network.py and sd3_train_network.py 32)
    step_multiple: int
    #: the family's batch-size tables, a file of the template library
    batch_sizes_file: str
    #: the sd-scripts script that trains a LoRA of the family on the file
    trainer_script: str


DATASET_RULES: dict[str, FamilyDatasetRules] = {
    "sd1": FamilyDatasetRules("sd1", "SD 1.x", 512, (512, 768, 1024), None, None, None, 64,
                              "kohya/batch-sizes.yaml", "train_network.py"),
    "sdxl": FamilyDatasetRules("sdxl", "SDXL", 1024, (1024, 1536, 2048), 256, 2048, 64, 32,
                               "kohya/batch-sizes-sdxl.yaml", "sdxl_train_network.py"),
    "sd35": FamilyDatasetRules("sd35", "SD 3.5", 1024, (1024, 1536, 2048), 256, 2048, 64, 32,
                               "kohya/batch-sizes-sd35.yaml", "sd3_train_network.py"),
}


def dataset_rules(family: str) -> FamilyDatasetRules:
    rules = DATASET_RULES.get(family)
    if rules is None:
        raise CharfwError(f"no dataset rules for the model family '{family}'; charfw has them for "
                          + ", ".join(DATASET_RULES))
    return rules


def _side_pair(resolution: Any) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def check_buckets(config: KohyaDatasetConfig, *, step_multiple: int = 64, path: Path | None = None) -> None:
    """What sd-scripts asserts about a dataset's buckets when it builds it (beyond the
    schema), so that a written TOML does not stop sd-scripts after its model has loaded:
    ``bucket_reso_steps`` a multiple of ``step_multiple``, and ``min_bucket_reso`` ≤ the
    resolution ≤ ``max_bucket_reso`` once both are moved to multiples of the step
    (``train_util.BaseDataset.adjust_min_max_bucket_reso_by_steps``)."""
    general = config.general.model_dump(exclude_none=True)
    for i, dataset in enumerate(config.datasets):
        s = {**DEFAULTS, **general, **dataset.model_dump(exclude_none=True, exclude={"subsets"})}
        if not s["enable_bucket"] or s["resolution"] is None:
            continue
        step = int(s["bucket_reso_steps"])
        where = f"datasets[{i}]"
        if step <= 0 or step % step_multiple:
            raise CharfwError(f"{where}: bucket_reso_steps {step} is not a multiple of {step_multiple}, "
                              "which sd-scripts requires for this model family", path=path)
        low = int(s["min_bucket_reso"]) // step * step
        high = -(-int(s["max_bucket_reso"]) // step) * step
        width, height = _side_pair(s["resolution"])
        if min(width, height) < low:
            raise CharfwError(f"{where}: resolution {width}x{height} is below min_bucket_reso {low}; "
                              "sd-scripts stops on it", path=path)
        if max(width, height) > high:
            raise CharfwError(f"{where}: resolution {width}x{height} is above max_bucket_reso {high}; "
                              "sd-scripts stops on it", path=path, hint="raise max_bucket_reso")


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: key not allowed here (sd-scripts rejects it)")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def validate(data: dict[str, Any], *, path: Path | None = None) -> KohyaDatasetConfig:
    """Check a parsed dataset config against sd-scripts' schema."""
    try:
        return KohyaDatasetConfig.model_validate(data)
    except ValidationError as exc:
        raise CharfwError(
            f"not a valid kohya dataset config: {_format_error(exc)}", path=path
        ) from None


def load(path: str | Path) -> KohyaDatasetConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise CharfwError(f"cannot read ({exc.strerror or exc})", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise CharfwError(f"TOML error: {exc}", path=path) from None
    return validate(data, path=path)


@dataclass
class ResolvedSubset:
    """One subset with every setting resolved as sd-scripts resolves it."""

    dataset_index: int
    image_dir: Path | None
    metadata_file: Path | None
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]


def resolve_subsets(
    config: KohyaDatasetConfig, *, overrides: dict[str, Any] | None = None
) -> list[ResolvedSubset]:
    """Subsets with values taken from subset → dataset → general → ``overrides`` → defaults.

    ``overrides`` plays the part of sd-scripts' command-line arguments.
    """
    base = {**DEFAULTS, **(overrides or {})}
    general = config.general.model_dump(exclude_none=True)
    out: list[ResolvedSubset] = []
    for i, dataset in enumerate(config.datasets):
        ds = dataset.model_dump(exclude_none=True, exclude={"subsets"})
        for subset in dataset.subsets:
            sub = subset.model_dump(exclude_none=True)
            settings = {**base, **general, **ds, **sub}
            out.append(
                ResolvedSubset(
                    dataset_index=i,
                    image_dir=Path(sub["image_dir"]) if "image_dir" in sub else None,
                    metadata_file=Path(sub["metadata_file"]) if "metadata_file" in sub else None,
                    settings=settings,
                )
            )
    return out
