"""Latent and text-encoder caches: work that does not change between steps, done once.

**Latents.** Encoding an image with the VAE costs as much as a good part of a training
step, and without colour augmentation or random crops an image always gives the same
latents (up to a flip). :class:`LatentCache` keeps them under a key made of the image's
*content* hash, its bucket, the resize method, the flip and the VAE's identity. On disk
(``<cache>/latents/``) the key makes the cache safe to share: the face images inside a
body's dataset, or a re-run with other training settings, find their latents again; a
changed image or another VAE simply misses. Latents are the mean of the VAE's posterior
(not a random sample), so a cached and an uncached run train on the same numbers.

**Text-encoder outputs.** When the text encoders are not trained and captions are fixed
(no shuffling, dropout or wildcards: the method's fixed tags), each caption's conditioning
(the family's :class:`~charfw.training.families.TextConditioning`: SD 1.x's token states,
SDXL's joined states and pooled vector) is the same every epoch; :class:`TextCache` keeps
one sample's worth in memory, keyed by caption.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from charfw.build import atomic

if TYPE_CHECKING:
    import torch

    from .dataset import ImageEntry
    from .families import TextConditioning

#: bump when the way latents are computed changes (resizing, cropping, encoding)
LATENT_FORMAT = "1"


class LatentCache:
    """Latents by content key, in memory and optionally on disk."""

    def __init__(self, mode: str, folder: Path, vae_identity: str) -> None:
        self.mode = mode
        self.folder = folder / "latents" / hashlib.sha256(vae_identity.encode()).hexdigest()[:16]
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.encoded = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def key(self, entry: ImageEntry, digest: str, flip: bool) -> str:
        w, h = entry.bucket
        return f"{digest}-{w}x{h}-{entry.subset.interpolation}-{'flip' if flip else 'orig'}-v{LATENT_FORMAT}"

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        found = self._memory.get(key)
        if found is None and self.mode == "disk":
            path = self._path(key)
            if path.is_file():
                from safetensors.torch import load_file

                try:
                    found = load_file(str(path))["latents"]
                except Exception:  # a damaged cache file is re-made, never trusted
                    found = None
                if found is not None:
                    self._memory[key] = found
        if found is not None:
            self.hits += 1
        return found

    def put(self, key: str, latents: torch.Tensor) -> None:
        latents = latents.detach().to("cpu").contiguous()
        self._memory[key] = latents
        self.encoded += 1
        if self.mode == "disk":
            from safetensors.torch import save_file

            with atomic.atomic_path(self._path(key)) as tmp:
                save_file({"latents": latents}, str(tmp))


class TextCache:
    """Text-encoder outputs by caption, one sample's conditioning each (memory only: they
    are quick to make again)."""

    def __init__(self) -> None:
        self._memory: dict[str, TextConditioning] = {}

    def __contains__(self, caption: str) -> bool:
        return caption in self._memory

    def get(self, caption: str) -> TextConditioning:
        return self._memory[caption]

    def put(self, caption: str, conditioning: TextConditioning) -> None:
        self._memory[caption] = conditioning.detach()

    def __len__(self) -> int:
        return len(self._memory)
