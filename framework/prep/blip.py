"""BLIP captions (Salesforce's BlipForConditionalGeneration), batched, with transformers 4 or 5.

The seed captioned with ``pipeline("image-to-text")``; transformers 5 removed that task
(it is redirected to ``image-text-to-text``, which needs a text prompt per image). The
model and processor classes work the same in both versions, so charfw uses them
directly: one ``processor(images=batch)`` and one ``model.generate`` per batch, decoded
with ``batch_decode``. A prompt ("a picture of") makes the caption conditional; BLIP
then repeats the prompt at the start of its caption, which is kept.

torch and transformers are imported here only, inside the functions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw import console
from charfw.errors import CharfwError, require_module

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
#: what a Hugging Face download of a BLIP repository fetches (no TF/Flax/.bin weights)
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]


def default_model() -> str:
    return os.environ.get("CHARFW_BLIP_MODEL") or DEFAULT_MODEL


def _device(torch: Any, choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        console.warn("BLIP captioner: CUDA is not available here; running on the CPU")
        return "cpu"
    return choice


def _rgb(image: Image.Image) -> Image.Image:
    from PIL import Image as PILImage

    if image.mode == "RGB":
        return image
    if "A" in image.getbands():
        canvas = PILImage.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        return canvas.convert("RGB")
    return image.convert("RGB")


class BlipCaptioner:
    """A BLIP captioning model and its processor, loaded from a folder."""

    def __init__(self, folder: Path, *, device: str = "auto") -> None:
        torch = require_module("torch", extra="prep", purpose="BLIP captions")
        transformers = require_module("transformers", extra="prep", purpose="BLIP captions")
        self.torch = torch
        self.device = _device(torch, device)
        try:
            with warnings.catch_warnings():
                # transformers 5 without torchvision falls back to the PIL image processor
                # with a warning; the captions are the same
                warnings.simplefilter("ignore")
                self.processor = transformers.BlipProcessor.from_pretrained(str(folder))
                dtype = torch.float16 if self.device == "cuda" else torch.float32
                self.model = transformers.BlipForConditionalGeneration.from_pretrained(
                    str(folder), dtype=dtype).eval().to(self.device)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CharfwError(f"cannot load a BLIP captioning model from this folder ({reason[:200]})",
                              path=folder,
                              hint="it needs the config, processor and weights of a "
                                   "BlipForConditionalGeneration model") from None

    def caption(self, images: Sequence[Image.Image], *, prompt: str | None = None, max_new_tokens: int = 30,
                num_beams: int = 3) -> list[str]:
        """One caption per image, generated as one batch."""
        if not images:
            return []
        rgb = [_rgb(im) for im in images]
        text = [prompt] * len(rgb) if prompt else None
        inputs = self.processor(images=rgb, text=text, return_tensors="pt").to(self.device)
        if self.device == "cuda":
            inputs["pixel_values"] = inputs["pixel_values"].half()
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def caption_as_tag(caption: str) -> str:
    """A caption sentence as one caption-file entry (commas would split it into tags)."""
    return " ".join(caption.replace(",", " ").split())
