"""Model families: everything the trainer needs to know about one kind of base model.

The training loop never asks which model it trains. A :class:`ModelFamily` loads the
parts (UNet, text encoder(s), tokenizer(s), VAE, noise schedule), says which layers a
network attaches to and under which file prefixes, turns captions into the UNet's
conditioning (clip skip, long prompts), runs the UNet, and names the model in the file's
metadata. SD 1.x (:mod:`.sd1`) is the first family; SDXL and SD 3.5 fit the same
interface (two text encoders and pooled embeddings, or a transformer instead of a UNet).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import CharfwError

if TYPE_CHECKING:
    import torch

    from ..model_sources import ModelSource
    from ..networks.targets import NetworkRoot


@dataclass
class LoadedModel:
    """A base model's parts, as a family loaded them (float32, on the CPU)."""

    family: ModelFamily
    unet: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    vae: Any
    #: the training noise schedule's config (DDPM betas of the base model)
    scheduler_config: dict[str, Any]
    source: ModelSource
    vae_source: ModelSource | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type") or "epsilon")

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


class ModelFamily(ABC):
    #: the manifest's ``model.family``
    name: str = ""
    #: ``ss_base_model_version``
    base_model_version: str = ""
    #: ``modelspec.architecture`` of a LoRA for this family
    lora_architecture: str = ""
    #: the training resolution a dataset without one uses
    default_resolution: int = 512

    @abstractmethod
    def load(self, source: ModelSource, vae: ModelSource | None, *, cache_dir: Path) -> LoadedModel:
        """Load every part; a missing or unreadable model is a :class:`CharfwError`."""

    @abstractmethod
    def network_roots(self, model: LoadedModel) -> list[NetworkRoot]:
        """The models a network attaches to, with their file prefixes and target classes."""

    @abstractmethod
    def roots_for(self, unet: Any, text_encoders: list[Any]) -> list[NetworkRoot]:
        """The same for parts held elsewhere (a diffusers pipeline's)."""

    @abstractmethod
    def tokenize(self, model: LoadedModel, captions: list[str], max_token_length: int | None) -> torch.Tensor:
        """Token ids for a batch of captions."""

    @abstractmethod
    def encode_text(self, model: LoadedModel, input_ids: torch.Tensor, *, clip_skip: int,
                    text_encoders: list[Any] | None = None) -> torch.Tensor:
        """The UNet's text conditioning for token ids (runs the text encoder(s), through
        ``text_encoders`` when given: the training's wrapped copies)."""

    @abstractmethod
    def predict(self, unet: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (noise or velocity)."""

    @abstractmethod
    def metadata(self, model: LoadedModel) -> dict[str, str]:
        """The family's keys of a LoRA file's header (``ss_v2``, ``ss_base_model_version``,
        ``modelspec.*``)."""

    @abstractmethod
    def pipeline(self, model: LoadedModel, scheduler: Any) -> Any:
        """A diffusers text-to-image pipeline on the loaded (and possibly adapted) parts."""


def get_family(name: str) -> ModelFamily:
    if name == "sd1":
        from .sd1 import SD1Family

        return SD1Family()
    raise CharfwError(f"unknown model family '{name}'; charfw trains: sd1")
