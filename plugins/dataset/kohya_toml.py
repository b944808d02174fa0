"""``kohya-toml``: the dataset config kohya sd-scripts (and charfw's trainer) reads.

The seed's GenerateCharToml rules: every image folder is a subset with its class
tokens, flip augmentation and repeats; subsets are grouped into one ``[[datasets]]`` per
resolution class and batch size. An image wider or taller than 512 trains at 768 (or
1024 beyond 768); the rest at 512. The batch size comes from a table keyed by width
class × height class (LOW ≤ 512 < MID ≤ 768 < HIGH), ``default`` or ``12gb`` from
``templates/kohya/batch-sizes.yaml`` or a table in the options.

The classes scale with the model family's native size
(:data:`charfw.folders.kohya_config.DATASET_RULES`): SDXL and SD 3.5 train at 1024, 1536
and 2048 with classes LOW ≤ 1024 < MID ≤ 1536 < HIGH, buckets from 256 to 2048 in steps
of 64, and their own tables (``batch-sizes-sdxl.yaml``, ``batch-sizes-sd35.yaml``). The
family is the part's base model's (``family`` in the options, or ``charfw toml
--family``, outside a build). The file is rendered with ``templates/kohya/dataset.toml.j2``
and checked against sd-scripts' schema and its bucket assertions before it is written.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

import charfw
from charfw import CharfwError, DatasetWriter, Options, __version__
from charfw.folders import kohya_config

CLASSES = ("LOW", "MID", "HIGH")


class KohyaTomlOptions(Options):
    #: whose rules apply: sd1, sdxl or sd35 (default: the part's base model's family; sd1
    #: outside a build)
    family: Literal["sd1", "sdxl", "sd35"] | None = None
    #: a table name from the family's templates/kohya/batch-sizes*.yaml, or a table {LOW_LOW: 2, ...}
    batch_sizes: str | dict[str, int] = "default"
    #: the upper bounds of LOW and MID and the HIGH resolution (default: the family's:
    #: 512, 768, 1024 for SD 1.x; 1024, 1536, 2048 for SDXL and SD 3.5)
    resolutions: tuple[int, int, int] | None = None
    color_aug: bool = True
    enable_bucket: bool = True
    bucket_no_upscale: bool = True
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    #: kohya's keep_tokens (only matters with shuffle_caption)
    keep_tokens: int | None = Field(None, ge=0)
    #: flip augmentation for folders that do not say (_flip_ / _noflip_)
    flip_aug: bool = True
    #: bucket settings (default: the family's; SD 1.x leaves sd-scripts' 256, 1024, 64)
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = Field(None, ge=8)

    @field_validator("batch_sizes")
    @classmethod
    def _table(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key, size in v.items():
                w, _, h = key.partition("_")
                if w not in CLASSES or h not in CLASSES:
                    raise ValueError(f"'{key}' is not a class pair like LOW_LOW, MID_LOW, LOW_HIGH")
                if size < 1:
                    raise ValueError(f"batch size for {key} must be at least 1")
        return v

    @field_validator("resolutions")
    @classmethod
    def _res(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and not (0 < v[0] < v[1] < v[2]):
            raise ValueError("resolutions must grow: [512, 768, 1024]")
        return v


def size_class(pixels: int, resolutions: tuple[int, int, int]) -> int:
    """0 LOW, 1 MID, 2 HIGH."""
    return 0 if pixels <= resolutions[0] else 1 if pixels <= resolutions[1] else 2


class KohyaToml(DatasetWriter):
    name = "kohya-toml"
    version = "1"
    description = "kohya sd-scripts dataset config (the seed's GenerateCharToml rules)"
    Options = KohyaTomlOptions
    filename = "dataset.toml"

    @staticmethod
    def rules(ctx, options: KohyaTomlOptions) -> kohya_config.FamilyDatasetRules:
        """The dataset rules of the options' family, else of the part's base model."""
        return kohya_config.dataset_rules(options.family or ctx.part.model.family)

    def resolutions(self, ctx, options: KohyaTomlOptions) -> tuple[int, int, int]:
        return options.resolutions or self.rules(ctx, options).resolutions

    def _classes(self, sizes: list[tuple[int, int]], resolutions: tuple[int, int, int]) -> tuple[int, int]:
        w = max(size_class(s[0], resolutions) for s in sizes)
        h = max(size_class(s[1], resolutions) for s in sizes)
        return w, h

    def subset_key(self, ctx, options, width, height):
        resolutions = self.resolutions(ctx, options)
        w, h = self._classes([(width, height)], resolutions)
        return f"{resolutions[w]}x{resolutions[h]}"

    def batch_table(self, options: KohyaTomlOptions, templates,
                    rules: kohya_config.FamilyDatasetRules | None = None) -> dict[str, int]:
        if isinstance(options.batch_sizes, dict):
            return dict(options.batch_sizes)
        rules = rules or kohya_config.dataset_rules(options.family or "sd1")
        tables = templates.load_yaml(rules.batch_sizes_file) or {}
        if options.batch_sizes not in tables:
            raise CharfwError(
                f"unknown batch-size table '{options.batch_sizes}'; known: {', '.join(sorted(tables))}",
                hint=f"{rules.label} tables are in templates/{rules.batch_sizes_file}: add it there or give a "
                     "table in the options",
            )
        return dict(tables[options.batch_sizes])

    def _buckets(self, options: KohyaTomlOptions, rules: kohya_config.FamilyDatasetRules,
                 largest: int) -> dict[str, int]:
        """[general]'s bucket keys: the options', else the family's; a max_bucket_reso the
        options leave out grows to the largest resolution (sd-scripts stops below it)."""
        out = {"min_bucket_reso": options.min_bucket_reso or rules.min_bucket_reso,
               "max_bucket_reso": options.max_bucket_reso or rules.max_bucket_reso,
               "bucket_reso_steps": options.bucket_reso_steps or rules.bucket_reso_steps}
        if options.enable_bucket and options.max_bucket_reso is None and \
                largest > (out["max_bucket_reso"] or kohya_config.DEFAULTS["max_bucket_reso"]):
            out["max_bucket_reso"] = largest
        return {k: v for k, v in out.items() if v is not None}

    def render(self, ctx, options, spec):
        templates = ctx.templates
        rules = self.rules(ctx, options)
        resolutions = options.resolutions or rules.resolutions
        table = self.batch_table(options, templates, rules)
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        repeats = {s.num_repeats for s in spec.subsets}
        for subset in spec.subsets:
            w, h = self._classes(subset.sizes, resolutions)
            resolution = resolutions[max(w, h)]
            batch = int(table.get(f"{CLASSES[w]}_{CLASSES[h]}", 1))
            entry: dict[str, Any] = {"image_dir": _dir(subset.image_dir, spec.relative_to)}
            if subset.class_tokens:
                entry["class_tokens"] = subset.class_tokens
            entry["flip_aug"] = options.flip_aug if subset.flip_aug is None else subset.flip_aug
            if len(repeats) > 1:
                entry["num_repeats"] = subset.num_repeats
            if subset.is_reg:
                entry["is_reg"] = True
            if subset.keep_tokens is not None:
                entry["keep_tokens"] = subset.keep_tokens
            groups.setdefault((resolution, batch), []).append(entry)
        general: dict[str, Any] = {
            "caption_extension": options.caption_extension,
            "color_aug": options.color_aug,
            "enable_bucket": options.enable_bucket,
            "bucket_no_upscale": options.bucket_no_upscale,
            "shuffle_caption": options.shuffle_caption,
        }
        if options.keep_tokens is not None:
            general["keep_tokens"] = options.keep_tokens
        general.update(self._buckets(options, rules, max(res for res, _ in groups)))
        if len(repeats) == 1:
            general["num_repeats"] = repeats.pop()
        datasets = [
            {"settings": {"resolution": [res, res], "batch_size": batch}, "subsets": subsets}
            for (res, batch), subsets in sorted(groups.items())
        ]
        note = spec.note
        if rules.family != "sd1":
            note = (f"{note}; " if note else "") + (
                f"{rules.label} rules: classes up to {resolutions[0]} and {resolutions[1]} px, "
                f"resolutions {', '.join(map(str, resolutions))}")
        text = templates.render(
            "kohya/dataset.toml.j2", charfw_version=__version__, note=note,
            general=general, datasets=datasets, script=rules.trainer_script,
        )
        # the file must load in sd-scripts: parse it back and check it against its schema
        # and against what its trainer for this family asserts about buckets
        config = kohya_config.validate(tomllib.loads(text))
        kohya_config.check_buckets(config, step_multiple=rules.step_multiple)
        return text


def _dir(path: Path, relative_to: Path | None) -> str:
    if relative_to is not None:
        import os

        return Path(os.path.relpath(path, relative_to)).as_posix()
    return path.as_posix()


@charfw.hookimpl
def register_dataset_writers(register):
    register(KohyaToml())
