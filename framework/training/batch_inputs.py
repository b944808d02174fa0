"""A batch's model inputs: latents and text conditioning, from the caches or made now.

:meth:`BatchInputs.prepare` runs before the first step. It hashes every image, encodes
the latents that can be cached and are not yet (grouped by bucket, ``vae_batch_size`` at a
time), and decodes the images that cannot be cached, so that an unreadable image is found
*before* training: each one is reported with its reason and left out, or, with
``bad_images: stop``, the run stops listing all of them. Latents that come out NaN or
infinite (a VAE precision problem on one image) are reported the same way.

During training, :meth:`BatchInputs.latents` stacks cached latents, or decodes, augments
and encodes the images of subsets with colour augmentation or random crops (prefetched on
a worker thread while the previous step runs); :meth:`BatchInputs.conditioning` takes
cached text-encoder outputs or runs the text encoder(s) (with gradients when one trains),
as the family's :class:`~charfw.training.families.TextConditioning`;
:meth:`BatchInputs.sample_inputs` gives the family's per-sample inputs (SDXL's size and
crop ids).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ImageError
from .dataset import Batch, ImageEntry, TrainingData, load_image, make_caption, pixels

if TYPE_CHECKING:
    from .caches import LatentCache, TextCache
    from .families import LoadedModel, TextConditioning


class BatchInputs:
    def __init__(self, model: LoadedModel, *, latent_cache: LatentCache, text_cache: TextCache | None,
                 device: torch.device, sha256: Callable[[Path], str], clip_skip: int,
                 max_token_length: int | None, vae_batch_size: int) -> None:
        self.model = model
        self.family = model.family
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.device = device
        self.sha256 = sha256
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.vae_batch_size = vae_batch_size
        self.digests: dict[Path, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="charfw-pixels")
        #: a CPU with cores torch leaves idle: the worker encodes the next batch there too
        self._encode_in_worker = device.type == "cpu" and torch.get_num_threads() < (os.cpu_count() or 1)
        # On a CPU whose every core runs the step, a second thread's decoding and tensor work
        # only competes with it (a second OpenMP team on the same cores: measured 12 % slower
        # per step on 2 cores); there the next batch is made when it is needed.
        self._prefetch = device.type != "cpu" or self._encode_in_worker
        self._pending: dict[int, Future[tuple[bool, dict[int, torch.Tensor]]]] = {}

    # --- before training -----------------------------------------------------------------

    def prepare(self, data: TrainingData, progress: Any) -> dict[Path, str]:
        """Cache latents and check every image; returns the unusable ones with reasons."""
        bad: dict[Path, str] = {}
        todo: list[tuple[ImageEntry, bool, str]] = []
        with progress(len(data.entries), "checking images") as bar:
            for entry in data.entries:
                try:
                    digest = self.sha256(entry.path)
                except OSError as exc:
                    bad[entry.path] = f"cannot read ({exc.strerror or exc})"
                    bar.advance()
                    continue
                self.digests[entry.path] = digest
                if self.latent_cache.enabled and entry.subset.cacheable_latents:
                    flips = (False, True) if entry.subset.flip_aug else (False,)
                    todo += [(entry, f, digest) for f in flips
                             if self.latent_cache.get(self.latent_cache.key(entry, digest, f)) is None]
                else:
                    try:  # not cached: decode once now so a broken file is found before training
                        load_image(entry)
                    except ImageError as exc:
                        bad[entry.path] = exc.message
                bar.advance()
        if not todo:
            return bad
        todo.sort(key=lambda t: t[0].bucket)
        with progress(len(todo), "caching latents") as bar:
            start = 0
            while start < len(todo):
                bucket = todo[start][0].bucket
                group = []
                while start < len(todo) and todo[start][0].bucket == bucket and len(group) < self.vae_batch_size:
                    group.append(todo[start])
                    start += 1
                images: list[torch.Tensor] = []
                kept = []
                for entry, flip, digest in group:
                    if entry.path in bad:
                        continue
                    try:
                        image = load_image(entry)
                    except ImageError as exc:
                        bad[entry.path] = exc.message
                        continue
                    images.append(pixels(image, entry, flip=flip, seed=0))
                    kept.append((entry, flip, digest))
                if images:
                    latents = self._encode(torch.stack(images))
                    for (entry, flip, digest), lat in zip(kept, latents, strict=True):
                        if not torch.isfinite(lat).all():
                            bad[entry.path] = "the VAE gives NaN or infinite latents for this image"
                            continue
                        self.latent_cache.put(self.latent_cache.key(entry, digest, flip), lat)
                bar.advance(len(group))
        return bad

    def cache_text(self, data: TrainingData, progress: Any) -> None:
        """Encode every distinct caption once (text encoder frozen, captions fixed)."""
        assert self.text_cache is not None
        import random

        # captions are fixed: the epoch and generator do not change them
        captions = sorted({make_caption(e, random.Random(0), 1) for e in data.entries})
        with progress(len(captions), "caching text-encoder outputs") as bar, torch.no_grad():
            for start in range(0, len(captions), 16):
                chunk = captions[start : start + 16]
                states = self._text(chunk, None)
                for caption, s in zip(chunk, states.unbind(), strict=True):
                    self.text_cache.put(caption, s)
                bar.advance(len(chunk))

    # --- per step ------------------------------------------------------------------------

    def prefetch(self, batch: Batch, key: int) -> None:
        """Start making the uncached latents of a batch on a worker thread while the current
        step runs: decoding its images, and, on a CPU whose cores torch does not all use,
        encoding them too (the frozen VAE then runs on an idle core; on a GPU a second stream
        of work on the device would only compete with the step). Nothing is prefetched on a
        CPU whose every core runs the step."""
        missing = self._missing(batch) if self._prefetch else []
        if missing:
            self._pending[key] = self._pool.submit(self._make_latents, batch, missing, self._encode_in_worker)

    def latents(self, batch: Batch, key: int) -> torch.Tensor:
        cache = self.latent_cache
        missing = self._missing(batch)
        made: dict[int, torch.Tensor] = {}
        if missing:
            future = self._pending.pop(key, None)
            encoded, made = future.result() if future is not None else self._make_latents(batch, missing, True)
            if not encoded:  # decoded on the worker, encoded here
                made = dict(zip(missing, self._encode(torch.stack([made[i] for i in missing])), strict=True))
        out = []
        for i, s in enumerate(batch.samples):
            lat = made.get(i)
            if lat is None:
                lat = cache.get(cache.key(s.entry, self.digests[s.entry.path], s.flip))
            out.append(lat.to(self.device))
        return torch.stack(out)

    def conditioning(self, batch: Batch, text_encoders: list[Any] | None, *, grad: bool) -> TextConditioning:
        from .families import TextConditioning

        captions = [s.caption for s in batch.samples]
        if self.text_cache is not None and all(c in self.text_cache for c in captions):
            return TextConditioning.stack([self.text_cache.get(c) for c in captions])
        if grad:
            return self._text(captions, text_encoders)
        with torch.no_grad():
            return self._text(captions, text_encoders)

    def sample_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The family's per-sample inputs of the denoiser besides the text."""
        return self.family.sample_inputs(batch, self.device)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- helpers -------------------------------------------------------------------------

    def _missing(self, batch: Batch) -> list[int]:
        """Positions in the batch whose latents are not cached."""
        cache = self.latent_cache
        return [i for i, s in enumerate(batch.samples) if not (cache.enabled and s.entry.subset.cacheable_latents)]

    def _make_latents(self, batch: Batch, missing: list[int], encode: bool) -> tuple[bool, dict[int, torch.Tensor]]:
        """Pixels of the samples at ``missing`` (augmented as the sample says), encoded
        when ``encode``: (encoded, tensors by position)."""
        images = [pixels(load_image(s.entry), s.entry, flip=s.flip, seed=s.seed)
                  for s in (batch.samples[i] for i in missing)]
        if not encode:
            return False, dict(zip(missing, images, strict=True))
        return True, dict(zip(missing, self._encode(torch.stack(images)), strict=True))

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        with torch.no_grad():
            dist = vae.encode(images.to(self.device, vae.dtype)).latent_dist
            # SD3's VAE is shifted before it is scaled (shift 0 for SD 1.x and SDXL)
            return ((dist.mean - self.model.vae_shift_factor) * self.model.vae_scaling_factor).float()

    def _text(self, captions: list[str], text_encoders: list[Any] | None) -> TextConditioning:
        ids = self.family.tokenize(self.model, captions, self.max_token_length)
        return self.family.encode_text(self.model, ids, clip_skip=self.clip_skip, text_encoders=text_encoders)
