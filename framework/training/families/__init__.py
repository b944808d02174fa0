"""Model families: everything the trainer needs to know about one kind of base model.

The training loop never asks which model it trains. A :class:`ModelFamily` loads the
parts (denoiser, text encoder(s), tokenizer(s), VAE, noise schedule), says which layers a
network attaches to and under which file prefixes, turns captions into the denoiser's
text conditioning (a :class:`TextConditioning`: named tensors, batch first), adds each
sample's own inputs (:meth:`ModelFamily.sample_inputs`: SDXL's size and crop ids), owns
the training objective (:class:`Objective`: noise, timesteps, noisy input, target and
per-sample loss weighting), runs the denoiser, names the model in the file's metadata and
builds its diffusers pipelines and prompt encodings for generation.

SD 1.x (:mod:`.sd1`) and SDXL (:mod:`.sdxl`) use the DDPM objective of
:mod:`charfw.training.objectives`; a flow-matching family brings its own objective and
plugs into the same loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import CharfwError

if TYPE_CHECKING:
    import torch

    from ...lora.file import LoraFile
    from ..dataset import Batch
    from ..model_sources import ModelSource
    from ..networks.targets import NetworkRoot
    from ..settings import TrainSettings


@dataclass
class LoadedModel:
    """A base model's parts, as a family loaded them (float32, on the CPU)."""

    family: ModelFamily
    #: the denoiser (a UNet, or SD 3.5's transformer)
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

    @property
    def vae_shift_factor(self) -> float:
        """SD3's VAE latents are ``(z - shift) * scale``; 0 for VAEs without a shift."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)


class TextConditioning(Mapping[str, "torch.Tensor"]):
    """The denoiser's text conditioning: named tensors, batch first (SD 1.x:
    ``encoder_hidden_states``; SDXL adds the pooled ``text_embeds``; SD 3.5
    ``pooled_projections``). Names are the denoiser's keyword arguments.

    The text cache keeps one sample's conditioning per caption (:meth:`unbind`) and the
    loop stacks a batch back (:meth:`stack`)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(v.shape)}" for k, v in self.tensors.items())
        return f"TextConditioning({shapes})"

    def to(self, *args: Any, **kwargs: Any) -> TextConditioning:
        """Every tensor ``.to(...)`` (a dtype cast touches floating-point tensors only)."""
        return TextConditioning({k: v.to(*args, **kwargs) for k, v in self.tensors.items()})

    def detach(self) -> TextConditioning:
        return TextConditioning({k: v.detach() for k, v in self.tensors.items()})

    def unbind(self) -> list[TextConditioning]:
        """One conditioning per sample (the batch dimension removed)."""
        names = list(self.tensors)
        columns = [self.tensors[n].unbind(0) for n in names]
        return [TextConditioning(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]

    @staticmethod
    def stack(items: Sequence[TextConditioning]) -> TextConditioning:
        """Samples (from :meth:`unbind`) back into one batch."""
        import torch

        return TextConditioning({n: torch.stack([c[n] for c in items]) for n in items[0]})


@dataclass
class NoisedBatch:
    """One step's forward diffusion, as an :class:`Objective` made it."""

    #: the denoiser's input
    noisy: torch.Tensor
    #: what the denoiser is told about the noise level (its ``timestep`` argument)
    timesteps: torch.Tensor
    #: what the prediction is compared with
    target: torch.Tensor
    #: per-sample loss factors of the objective (min-SNR, SD3 weighting schemes), or None
    weights: torch.Tensor | None = None
    #: anything else the objective's loss needs (sigmas for preconditioned outputs)
    extra: dict[str, Any] = field(default_factory=dict)


class Objective(ABC):
    """What a family trains the denoiser to do: the noise, the noisy input and the target
    of each step (:meth:`noise`), and the loss of a prediction (:meth:`loss`).

    Every random number comes from the run's ``generator`` (saved with resumable state),
    in a fixed order, so a resumed run draws the same numbers as one that never stopped."""

    @abstractmethod
    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        """Noise, timesteps, the noisy input and the target for clean ``latents``."""

    @abstractmethod
    def loss(self, prediction: torch.Tensor, noised: NoisedBatch, sample_weights: torch.Tensor) -> torch.Tensor:
        """The batch's scalar loss; ``sample_weights`` are the data's per-sample weights
        (``prior_loss_weight`` for regularisation images)."""


class ModelFamily(ABC):
    #: the manifest's ``model.family``
    name: str = ""
    #: ``ss_base_model_version``
    base_model_version: str = ""
    #: ``modelspec.architecture`` of a LoRA for this family
    lora_architecture: str = ""
    #: the training resolution a dataset without one uses
    default_resolution: int = 512
    #: whether clip skip means anything (SDXL conditions on fixed layers)
    uses_clip_skip: bool = True

    @abstractmethod
    def load(self, source: ModelSource, vae: ModelSource | None, *, cache_dir: Path) -> LoadedModel:
        """Load every part; a missing or unreadable model is a :class:`CharfwError`."""

    @abstractmethod
    def network_roots(self, model: LoadedModel) -> list[NetworkRoot]:
        """The models a network attaches to, with their file prefixes and target classes
        (text encoders in the model's order)."""

    @abstractmethod
    def roots_for(self, unet: Any, text_encoders: list[Any]) -> list[NetworkRoot]:
        """The same for parts held elsewhere (a diffusers pipeline's)."""

    # --- training --------------------------------------------------------------------------

    @abstractmethod
    def tokenize(self, model: LoadedModel, captions: list[str], max_token_length: int | None) -> Any:
        """Token ids for a batch of captions (whatever :meth:`encode_text` reads)."""

    @abstractmethod
    def encode_text(self, model: LoadedModel, input_ids: Any, *, clip_skip: int,
                    text_encoders: list[Any] | None = None) -> TextConditioning:
        """The denoiser's text conditioning for token ids (runs the text encoder(s), through
        ``text_encoders`` when given: the training's wrapped copies)."""

    def configure(self, settings: TrainSettings) -> None:
        """Take the run's settings before loading (SD 3.5: whether T5 is loaded); a network
        the family cannot train is a one-line :class:`CharfwError` here. Nothing by default."""
        return None

    def sample_inputs(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample inputs of the denoiser besides the text (SDXL's size and crop ids),
        batch first; none by default."""
        return {}

    def text_layers_unused(self, clip_skip: int) -> bool:
        """Whether a text encoder's last layers take no part in the conditioning (clip skip,
        SDXL's penultimate states): distributed training must then look for parameters
        without gradients."""
        return clip_skip > 1

    def objective(self, model: LoadedModel, settings: TrainSettings, device: torch.device) -> Objective:
        """The training objective; DDPM noise prediction (epsilon or v) by default."""
        from ..objectives import DDPMObjective

        return DDPMObjective(model, settings, device)

    @abstractmethod
    def predict(self, unet: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: TextConditioning, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's prediction (noise, velocity or flow); ``inputs`` are
        :meth:`sample_inputs`'."""

    @abstractmethod
    def metadata(self, model: LoadedModel) -> dict[str, str]:
        """The family's keys of a LoRA file's header (``ss_v2``, ``ss_base_model_version``,
        ``modelspec.*``)."""

    def _load_parts(self, source: ModelSource, vae: ModelSource | None, *, cache_dir: Path) -> dict[str, Any]:
        """Every part of ``source`` by diffusers component name: a single file through the
        family's ``_load_single_file(path, cache_dir)``, else ``_load_diffusers(where, source)``;
        a VAE given apart replaces the model's own (``_load_vae``)."""
        from .sd1 import _quiet_loaders, where_to_load

        _quiet_loaders()
        if source.kind == "single_file":
            assert source.path is not None
            parts = self._load_single_file(source.path, cache_dir)  # type: ignore[attr-defined]
        else:
            parts = self._load_diffusers(where_to_load(source), source)  # type: ignore[attr-defined]
        if vae is not None:
            parts["vae"] = self._load_vae(vae)  # type: ignore[attr-defined]
        return parts

    def adapt_lora(self, lora: LoraFile, unet: Any) -> LoraFile:
        """A LoRA file made by another tool, as modules on the layers :meth:`roots_for` names
        (SD 3.5: kohya's native MMDiT names); unchanged by default."""
        return lora

    def save_single_file(self, model: LoadedModel, dest: Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write the loaded parts as one checkpoint in the layout real files of the family
        use (``charfw export-model``)."""
        raise CharfwError(f"charfw cannot write {self.name} models as single files")

    # --- generation ------------------------------------------------------------------------

    @abstractmethod
    def pipeline(self, model: LoadedModel, scheduler: Any, *, img2img: bool = False,
                 controlnet: Any = None) -> Any:
        """A diffusers pipeline on the loaded (and possibly adapted) parts: text-to-image,
        or image-to-image with ``img2img``; with ``controlnet`` (one model or a list) its
        ControlNet pipeline. A family without one raises a one-line :class:`CharfwError`."""

    @abstractmethod
    def encode_prompts(self, model: LoadedModel, prompt: str, negative: str, *, clip_skip: int,
                       device: Any) -> dict[str, torch.Tensor]:
        """A prompt and its negative prompt in A1111 syntax (``<lora:…>`` tags removed) →
        the pipeline's keyword arguments (``prompt_embeds``, ``negative_prompt_embeds``, and
        the pooled ones where the family has them), each batch 1, the two of equal length."""


def get_family(name: str) -> ModelFamily:
    if name == "sd1":
        from .sd1 import SD1Family

        return SD1Family()
    if name == "sdxl":
        from .sdxl import SDXLFamily

        return SDXLFamily()
    if name == "sd35":
        from .sd35 import SD35Family

        return SD35Family()
    raise CharfwError(f"unknown model family '{name}'; charfw trains: sd1, sdxl, sd35")
