"""The checks of the training settings, and reading the dataset config they need."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from charfw.build.images import KOHYA_IMAGE_SUFFIXES
from charfw.components import Finding
from charfw.lint import DatasetInfo, LintConfig, LintInput, finding


def read_dataset(config: Path, file: str) -> DatasetInfo:
    """The dataset config as the trainer reads it: image count, steps per epoch, color_aug
    subsets, each image's resolution (kohya's resolution of its dataset)."""
    from charfw.folders import kohya_config

    info = DatasetInfo(file=file)
    resolved = kohya_config.resolve_subsets(kohya_config.load(config))
    per_dataset: dict[int, tuple[int, int]] = {}
    for subset in resolved:
        folder = subset.image_dir
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in KOHYA_IMAGE_SUFFIXES) \
            if folder is not None and folder.is_dir() else []
        res = subset["resolution"]
        side = int(max(res) if isinstance(res, list | tuple) else res)
        for f in files:
            info.resolution_of[f.resolve()] = side
        info.images += len(files)
        if subset["color_aug"] and files:
            info.color_aug_subsets += 1
        seen, batch = per_dataset.get(subset.dataset_index, (0, int(subset["batch_size"])))
        per_dataset[subset.dataset_index] = (seen + len(files) * int(subset["num_repeats"]), batch)
    info.steps_per_epoch = sum(math.ceil(n / max(1, b)) for n, b in per_dataset.values())
    return info


def training(inp: LintInput, config: LintConfig) -> Iterator[Finding]:
    data, train = inp.dataset, inp.train
    if data is None or train is None:
        return
    steps = train.steps
    if train.epochs:
        steps = train.epochs * data.steps_per_epoch
    if steps and data.images and train.length_chosen:
        per_image = steps / data.images
        low, high = config.steps_per_image
        if not low / config.steps_factor <= per_image <= high * config.steps_factor:
            yield finding("train-steps", f"{steps} steps on {data.images} images is {per_image:.0f} steps per image; "
                          f"the method trains {low:g}-{high:g} (1200 steps on 12-15 images x 4 repeats): set "
                          f"max_train_steps near {round(data.images * (low + high) / 2, -1):.0f}", file=data.file)
    if train.latents_cached and data.color_aug_subsets:
        yield finding("train-color-aug", f"color_aug is on in {data.color_aug_subsets} subset(s) while the trainer "
                      "caches latents: those images are encoded every step; put color_aug: false in the dataset "
                      "stage (dataset: {plugin: kohya-toml, color_aug: false}) or cache_latents: off in train",
                      file=data.file)
