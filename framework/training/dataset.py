"""Training data from a kohya dataset config: images, captions, buckets, and each epoch's batches.

The TOML is read with :mod:`charfw.folders.kohya_config` (sd-scripts' schema and its
subset → dataset → general → default precedence), so ``charfw train`` accepts exactly the
files ``train_network.py --dataset_config`` accepts, and understands them the same way:

* DreamBooth subsets: the images directly in ``image_dir``; the caption is the first line
  of ``<stem><caption_extension>``, else ``class_tokens``; ``num_repeats`` copies per
  epoch; ``is_reg`` subsets are regularisation images, cycled until they match the
  number of training images and weighted by ``prior_loss_weight``;
* per dataset: ``resolution``, ``batch_size`` and the bucket settings (:mod:`.buckets`);
* per sample: ``flip_aug`` (a coin flip), ``color_aug`` (a small hue or gamma change),
  ``random_crop``, ``shuffle_caption`` with ``keep_tokens`` / ``keep_tokens_separator``,
  caption and tag dropout, ``caption_prefix`` / ``caption_suffix``, wildcards.

Settings charfw's trainer does not implement (fine-tuning ``metadata_file`` datasets, face
crop, token warm-up, masked loss, validation splits) stop the run with a message instead
of being ignored.

Every random choice of an epoch (batch order, flips, caption shuffles, crops, colour
changes) comes from generators seeded by ``(seed, epoch, position)``: the batches of an
epoch are the same whether the run went through it in one go or was resumed in the
middle, which is what makes a resumed run end exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw.build import images
from charfw.build.images import KOHYA_IMAGE_SUFFIXES
from charfw.build.items import list_images
from charfw.build.manifest import MAX_REPEATS
from charfw.folders import kohya_config

from ..errors import CharfwError, ImageError
from .buckets import BucketSettings, Size, choose_bucket, resize_for_bucket

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: settings with a non-default value that charfw's trainer refuses, with the reason
UNSUPPORTED: dict[str, str] = {
    "face_crop_aug_range": "face crop augmentation",
    "token_warmup_min": "token warm-up",
    "token_warmup_step": "token warm-up",
    "alpha_mask": "masked loss (alpha_mask)",
    "validation_split": "validation splits",
}
INTERPOLATIONS = {"lanczos": "LANCZOS", "nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC",
                  "area": "BOX", "box": "BOX", "hamming": "HAMMING"}
WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")


@dataclass
class Subset:
    """One ``[[datasets.subsets]]`` with every setting resolved."""

    index: int
    dataset: int
    image_dir: Path
    is_reg: bool
    num_repeats: int
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    shuffle_caption: bool
    keep_tokens: int
    keep_tokens_separator: str
    caption_separator: str
    secondary_separator: str | None
    caption_extension: str
    class_tokens: str | None
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_tag_dropout_rate: float
    caption_dropout_every_n_epochs: int
    enable_wildcard: bool
    interpolation: str
    image_count: int = 0

    @property
    def fixed_captions(self) -> bool:
        """Every epoch sees the same caption for an image (text-encoder outputs can be cached)."""
        return not (self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate
                    or self.caption_dropout_every_n_epochs or self.enable_wildcard)

    @property
    def cacheable_latents(self) -> bool:
        """Pixels are the same every epoch up to a flip (latents can be cached)."""
        return not (self.color_aug or self.random_crop)


@dataclass
class ImageEntry:
    path: Path
    subset: Subset
    #: the caption file's text (all lines with wildcards), or the class tokens
    caption: str
    #: whether the caption came from a caption file
    has_caption_file: bool
    size: Size
    bucket: Size
    #: copies per epoch (num_repeats; for regularisation images, as cycled)
    repeats: int = 1


@dataclass
class DatasetBlock:
    """One ``[[datasets]]``: its batch size and buckets."""

    index: int
    batch_size: int
    buckets: BucketSettings
    subsets: list[Subset] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    entry: ImageEntry
    flip: bool
    caption: str
    #: seeds the sample's random crop and colour change
    seed: int
    #: loss weight (prior_loss_weight for regularisation images)
    weight: float

    @property
    def original_size(self) -> Size:
        """The image's (width, height) before resizing (SDXL's ``original_size``)."""
        return self.entry.size

    @property
    def crop_left_top(self) -> Size:
        """SDXL's crop coordinates (left, top), as sd-scripts computes them
        (``BucketManager.get_crop_ltrb``, "according to the preprocessing of Stability AI"):
        not the pixels trimmed off, but where the whole image, fitted *inside* the bucket,
        would start; flipped, the left edge is the bucket's width less the fitted right edge.
        Random crops get the same numbers (sd-scripts has "no idea how to reflect" them)."""
        left, top, right, _ = crop_ltrb(self.entry.bucket, self.entry.size)
        return (int(self.entry.bucket[0] - right) if self.flip else int(left), int(top))


@dataclass(frozen=True)
class Batch:
    dataset: int
    bucket: Size
    samples: tuple[Sample, ...]

    @property
    def paths(self) -> list[Path]:
        return [s.entry.path for s in self.samples]


class TrainingData:
    """The images of a dataset config and how each epoch batches them."""

    def __init__(self, config_path: Path, blocks: list[DatasetBlock], entries: list[ImageEntry],
                 bad: dict[Path, str], warnings: list[str]) -> None:
        self.config_path = config_path
        self.blocks = blocks
        self.entries = entries
        #: images that cannot be used, with the reason
        self.bad = bad
        self.warnings = warnings
        self.prior_loss_weight = 1.0

    # --- reading the config --------------------------------------------------------------

    @classmethod
    def load(cls, config_path: Path, *, resolution: int | None = None, default_resolution: int = 512,
             relative_to: Path | None = None) -> TrainingData:
        """Read the TOML, list every subset's images and probe their sizes (headers only)."""

        config = kohya_config.load(config_path)
        subsets = kohya_config.resolve_subsets(config)
        if not subsets:
            raise CharfwError("the dataset config has no subsets", path=config_path)
        blocks: list[DatasetBlock] = []
        entries: list[ImageEntry] = []
        bad: dict[Path, str] = {}
        warnings: list[str] = []
        seen_dirs: dict[int, set[Path]] = {}
        for n, resolved in enumerate(subsets):
            s = resolved.settings
            for key, what in UNSUPPORTED.items():
                if s.get(key) not in (None, False, 0, 0.0):
                    raise CharfwError(f"{what} ('{key}') is not supported by charfw's trainer yet", path=config_path,
                                      hint=f"remove '{key}' or train this config with sd-scripts")
            if resolved.metadata_file is not None:
                raise CharfwError("fine-tuning datasets (metadata_file) are not supported by charfw's trainer yet",
                                  path=config_path, hint="use DreamBooth-style subsets (image_dir + captions)")
            if float(s.get("network_multiplier", 1.0)) != 1.0:
                raise CharfwError("network_multiplier other than 1 is not supported by charfw's trainer yet",
                                  path=config_path)
            if resolved.dataset_index >= len(blocks):
                res = resolution or s.get("resolution") or default_resolution
                size = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
                blocks.append(DatasetBlock(
                    resolved.dataset_index, int(s["batch_size"]),
                    BucketSettings(size, bool(s["enable_bucket"]), bool(s["bucket_no_upscale"]),
                                   int(s["min_bucket_reso"]), int(s["max_bucket_reso"]), int(s["bucket_reso_steps"])),
                ))
            block = blocks[resolved.dataset_index]
            image_dir = _find_dir(resolved.image_dir, config_path, relative_to)
            if image_dir in seen_dirs.setdefault(block.index, set()):
                warnings.append(f"{image_dir}: listed twice in one dataset; the later subset is ignored (as in sd-scripts)")
                continue
            seen_dirs[block.index].add(image_dir)
            interpolation = (s.get("resize_interpolation") or "lanczos").lower()
            if interpolation not in INTERPOLATIONS:
                raise CharfwError(f"unknown resize_interpolation '{interpolation}'; use {', '.join(INTERPOLATIONS)}",
                                  path=config_path)
            subset = Subset(
                index=n, dataset=block.index, image_dir=image_dir, is_reg=bool(s["is_reg"]),
                num_repeats=int(s["num_repeats"]), flip_aug=bool(s["flip_aug"]), color_aug=bool(s["color_aug"]),
                random_crop=bool(s["random_crop"]), shuffle_caption=bool(s["shuffle_caption"]),
                keep_tokens=int(s["keep_tokens"]), keep_tokens_separator=s["keep_tokens_separator"] or "",
                caption_separator=s["caption_separator"] or ",", secondary_separator=s["secondary_separator"],
                caption_extension=s["caption_extension"], class_tokens=s["class_tokens"],
                caption_prefix=s["caption_prefix"], caption_suffix=s["caption_suffix"],
                caption_dropout_rate=float(s["caption_dropout_rate"]),
                caption_tag_dropout_rate=float(s["caption_tag_dropout_rate"]),
                caption_dropout_every_n_epochs=int(s["caption_dropout_every_n_epochs"]),
                enable_wildcard=bool(s["enable_wildcard"]), interpolation=interpolation,
            )
            if not 1 <= subset.num_repeats <= MAX_REPEATS:
                raise CharfwError(f"{image_dir}: num_repeats must be 1 to {MAX_REPEATS}, not {subset.num_repeats}",
                                  path=config_path, hint="for more training raise max_train_steps or the epochs")
            block.subsets.append(subset)
            files = list_images(image_dir, KOHYA_IMAGE_SUFFIXES)
            if not files:
                warnings.append(f"{image_dir}: no images")
            no_caption = 0
            for path in files:
                try:
                    info = images.probe(path)
                except ImageError as exc:
                    bad[path] = exc.message
                    continue
                caption, from_file = _read_caption(path, subset)
                no_caption += 0 if from_file else 1
                bucket = choose_bucket((info.width, info.height), block.buckets)
                entries.append(ImageEntry(path, subset, caption, from_file, (info.width, info.height), bucket,
                                          subset.num_repeats))
            if no_caption and not subset.class_tokens:
                warnings.append(f"{image_dir}: {no_caption} image(s) have no caption file and the subset no "
                                f"class_tokens; they train with an empty caption")
        return cls(config_path, blocks, entries, bad, warnings)

    # --- after the images were checked ---------------------------------------------------

    def drop(self, paths: dict[Path, str]) -> None:
        """Leave out images found unusable (decoding failed)."""
        self.bad.update(paths)
        self.entries = [e for e in self.entries if e.path not in self.bad]

    def finalize(self) -> None:
        """Count images per subset and cycle regularisation images to the training count."""
        if not any(not e.subset.is_reg for e in self.entries):
            raise CharfwError("no usable training images in the dataset config", path=self.config_path)
        for block in self.blocks:
            for subset in block.subsets:
                subset.image_count = sum(1 for e in self.entries if e.subset is subset)
        train = sum(e.repeats for e in self.entries if not e.subset.is_reg)
        reg = [e for e in self.entries if e.subset.is_reg]
        if reg:
            # as sd-scripts: each reg image once with its repeats, then one more copy at a
            # time, round robin, until as many reg samples as training samples
            for e in reg:
                e.repeats = 0
            total = 0
            first = True
            while total < train:
                for e in reg:
                    add = e.subset.num_repeats if first else 1
                    e.repeats += add
                    total += add
                    if total >= train:
                        break
                first = False
            reg_count = sum(e.repeats for e in reg)
            if len(reg) * min(e.subset.num_repeats for e in reg) > train:
                self.warnings.append(f"more regularisation images than training images; {reg_count} of them are used")

    # --- epochs --------------------------------------------------------------------------

    def epoch_batches(self, epoch: int, seed: int) -> list[Batch]:
        """The batches of ``epoch`` (1-based), in training order; deterministic."""
        order = random.Random(f"{seed}/order/{epoch}")
        plan: list[tuple[int, Size, list[ImageEntry]]] = []
        for block in self.blocks:
            by_bucket: dict[Size, list[ImageEntry]] = {}
            for entry in self.entries:
                if entry.subset.dataset == block.index:
                    by_bucket.setdefault(entry.bucket, []).extend([entry] * entry.repeats)
            for bucket in sorted(by_bucket):
                items = by_bucket[bucket]
                order.shuffle(items)
                for start in range(0, len(items), block.batch_size):
                    plan.append((block.index, bucket, items[start : start + block.batch_size]))
        order.shuffle(plan)
        batches = []
        for b, (dataset, bucket, items) in enumerate(plan):
            samples = []
            for p, entry in enumerate(items):
                rng = random.Random(f"{seed}/sample/{epoch}/{b}/{p}")
                flip = entry.subset.flip_aug and rng.random() < 0.5
                caption = make_caption(entry, rng, epoch)
                weight = self.prior_loss_weight if entry.subset.is_reg else 1.0
                samples.append(Sample(entry, flip, caption, rng.getrandbits(31), weight))
            batches.append(Batch(dataset, bucket, tuple(samples)))
        return batches

    def batches_per_epoch(self) -> int:
        count = 0
        for block in self.blocks:
            sizes = Counter()
            for entry in self.entries:
                if entry.subset.dataset == block.index:
                    sizes[entry.bucket] += entry.repeats
            count += sum(math.ceil(n / block.batch_size) for n in sizes.values())
        return count

    @property
    def fixed_captions(self) -> bool:
        return all(e.subset.fixed_captions for e in self.entries)

    @property
    def num_train_images(self) -> int:
        return sum(e.repeats for e in self.entries if not e.subset.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(e.repeats for e in self.entries if e.subset.is_reg)

    # --- kohya's metadata ----------------------------------------------------------------

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``ss_tag_frequency``: per image folder, how many images carry each tag."""
        out: dict[str, dict[str, int]] = {}
        for e in self.entries:
            if e.subset.is_reg:
                continue
            counts = out.setdefault(e.subset.image_dir.name, {})
            tags = [t.strip().lower() for t in e.caption.split(e.subset.caption_separator)] if e.has_caption_file \
                else [e.caption]
            for tag in dict.fromkeys(t for t in tags if t):
                counts[tag] = counts.get(tag, 0) + 1
        return out

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """``ss_dataset_dirs``: per training folder, its repeats and image count."""
        out: dict[str, dict[str, int]] = {}
        for block in self.blocks:
            for s in block.subsets:
                if s.is_reg:
                    continue
                name = s.image_dir.name
                n = 2
                while name in out:
                    name = f"{s.image_dir.name} ({n})"
                    n += 1
                out[name] = {"n_repeats": s.num_repeats, "img_count": s.image_count}
        return out

    def bucket_info(self, block: DatasetBlock) -> dict[str, Any]:
        counts = Counter()
        errors = []
        for e in self.entries:
            if e.subset.dataset == block.index:
                counts[e.bucket] += e.repeats
                errors.append(abs(e.bucket[0] / e.bucket[1] - e.size[0] / e.size[1]))
        return {"buckets": {i: {"resolution": list(b), "count": counts[b]} for i, b in enumerate(sorted(counts))},
                "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

    def datasets_metadata(self) -> list[dict[str, Any]]:
        """``ss_datasets``: kohya's per-dataset description."""
        out = []
        for block in self.blocks:
            entries = [e for e in self.entries if e.subset.dataset == block.index]
            out.append({
                "is_dreambooth": True,
                "batch_size_per_device": block.batch_size,
                "num_train_images": sum(e.repeats for e in entries if not e.subset.is_reg),
                "num_reg_images": sum(e.repeats for e in entries if e.subset.is_reg),
                "resolution": list(block.buckets.resolution),
                "enable_bucket": block.buckets.enable_bucket,
                "min_bucket_reso": block.buckets.min_reso,
                "max_bucket_reso": block.buckets.max_reso,
                "tag_frequency": {k: v for k, v in self.tag_frequency().items()
                                  if any(s.image_dir.name == k for s in block.subsets)},
                "bucket_info": self.bucket_info(block),
                "subsets": [{
                    "img_count": s.image_count, "num_repeats": s.num_repeats, "color_aug": s.color_aug,
                    "flip_aug": s.flip_aug, "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption,
                    "keep_tokens": s.keep_tokens, "keep_tokens_separator": s.keep_tokens_separator,
                    "secondary_separator": s.secondary_separator, "enable_wildcard": s.enable_wildcard,
                    "caption_prefix": s.caption_prefix, "caption_suffix": s.caption_suffix,
                    "image_dir": s.image_dir.name, "class_tokens": s.class_tokens, "is_reg": s.is_reg,
                } for s in block.subsets],
            })
        return out

    def summary(self) -> str:
        buckets = sorted({e.bucket for e in self.entries})
        shown = ", ".join(f"{w}x{h}" for w, h in buckets[:4]) + (" ..." if len(buckets) > 4 else "")
        reg = f" + {self.num_reg_images} regularisation" if self.num_reg_images else ""
        return (f"{len([e for e in self.entries if not e.subset.is_reg])} images "
                f"({self.num_train_images} per epoch with repeats{reg}) in {len(buckets)} bucket(s): {shown}")


def crop_ltrb(bucket: Size, size: Size) -> tuple[float, float, float, float]:
    """sd-scripts' ``get_crop_ltrb``: the image of ``size`` fitted inside ``bucket`` (aspect
    kept), centred: (left, top, right, bottom), floats as sd-scripts leaves them."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = size[0] / size[1]
    if bucket_ar > image_ar:
        width, height = bucket[1] * image_ar, float(bucket[1])
    else:
        width, height = float(bucket[0]), bucket[0] / image_ar
    left = (bucket[0] - width) // 2
    top = (bucket[1] - height) // 2
    return left, top, left + width, top + height


def _find_dir(image_dir: Path | None, config_path: Path, relative_to: Path | None) -> Path:
    assert image_dir is not None
    if image_dir.is_absolute():
        candidates = [image_dir]
    else:  # sd-scripts resolves relative paths from the working folder; then the TOML's folder
        candidates = [Path.cwd() / image_dir]
        if relative_to is not None:
            candidates.append(relative_to / image_dir)
        candidates.append(config_path.parent / image_dir)
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise CharfwError(f"image_dir '{image_dir}' not found", path=config_path,
                      hint="relative folders are looked up from the working folder, then beside the TOML")


def _read_caption(path: Path, subset: Subset) -> tuple[str, bool]:
    caption_path = path.with_suffix(subset.caption_extension)
    try:
        text = caption_path.read_text("utf-8")
    except FileNotFoundError:
        return subset.class_tokens or "", False
    except (OSError, UnicodeDecodeError) as exc:
        raise CharfwError(f"cannot read the caption ({exc})", path=caption_path) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return subset.class_tokens or "", False
    return ("\n".join(lines) if subset.enable_wildcard else lines[0]), True


def make_caption(entry: ImageEntry, rng: random.Random, epoch: int) -> str:
    """One epoch's caption of an image: wildcards, prefix/suffix, dropout, shuffling."""
    s = entry.subset
    text = entry.caption
    if s.enable_wildcard:
        text = rng.choice(text.split("\n")) if text else text
        text = WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    if s.caption_prefix:
        text = f"{s.caption_prefix} {text}"
    if s.caption_suffix:
        text = f"{text} {s.caption_suffix}"
    dropped = (s.caption_dropout_rate > 0 and rng.random() < s.caption_dropout_rate) or (
        s.caption_dropout_every_n_epochs > 0 and epoch % s.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""
    if s.shuffle_caption or s.caption_tag_dropout_rate > 0:
        sep = s.caption_separator
        if s.keep_tokens_separator and s.keep_tokens_separator in text:
            head, _, tail = text.partition(s.keep_tokens_separator)
            fixed = [t.strip() for t in head.split(sep) if t.strip()]
            free = [t.strip() for t in tail.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in text.split(sep) if t.strip()]
            fixed, free = tokens[: s.keep_tokens], tokens[s.keep_tokens :]
        if s.shuffle_caption:
            rng.shuffle(free)
        if s.caption_tag_dropout_rate > 0:
            free = [t for t in free if rng.random() >= s.caption_tag_dropout_rate]
        text = ", ".join(fixed + free)
    if s.secondary_separator:
        text = text.replace(s.secondary_separator, ", ")
    return text


# --- pixels ------------------------------------------------------------------------------


def load_image(entry: ImageEntry) -> Image.Image:
    """The image as 8-bit RGB (transparency dropped as sd-scripts drops it); raises ImageError."""

    image = images.to_rgb_or_rgba(images.load(entry.path))
    return image.convert("RGB") if image.mode != "RGB" else image


def pixels(image: Image.Image, entry: ImageEntry, *, flip: bool, seed: int) -> torch.Tensor:
    """The training pixels of one sample: resized to cover its bucket, cropped, augmented,
    flipped, as a (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    subset = entry.subset
    rng = random.Random(seed)
    size = resize_for_bucket(image.size, entry.bucket)
    if size != image.size:
        image = image.resize(size, getattr(PILImage.Resampling, INTERPOLATIONS[subset.interpolation]))
    bw, bh = entry.bucket
    if subset.random_crop:
        left, top = rng.randint(0, size[0] - bw), rng.randint(0, size[1] - bh)
    else:
        left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    if (left, top, bw, bh) != (0, 0, *size):
        image = image.crop((left, top, left + bw, top + bh))
    if subset.color_aug:
        image = color_aug(image, rng)
    if flip:
        image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div_(127.5).sub_(1.0)


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's colour augmentation: one time in three, a hue shift of up to ±16° or a
    gamma between 0.95 and 1.05 (each half of those times)."""
    import numpy as np
    from PIL import Image as PILImage

    if rng.random() > 1 / 3:
        return image
    if rng.random() < 0.5:
        hsv = np.asarray(image.convert("HSV")).copy()
        shift = rng.uniform(-16, 16) / 360 * 256  # Pillow's hue runs 0-255
        hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + shift) % 256).astype(np.uint8)
        return PILImage.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return PILImage.fromarray(np.clip(array**gamma * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


