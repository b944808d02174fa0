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
