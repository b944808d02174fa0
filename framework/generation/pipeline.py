"""Text-to-image generation on a base model, with LoRAs applied exactly by charfw.

:class:`Generator` loads a base model (and VAE) once through the model family, builds one
diffusers ``StableDiffusionPipeline`` on its parts (no safety checker) and turns
:class:`ImageRequest` records into images:

* LoRAs: the prompt's ``<lora:name:…>`` tags (``<name>.safetensors`` in ``lora_dirs``)
  plus ``request.loras``, applied by one :class:`~charfw.generation.lora_patch.LoraPatcher`.
  Requests are grouped by LoRA set, so each set is patched once; the original weights are
  restored when :meth:`Generator.generate` finishes (or fails).
* Prompts: the family's ``encode_prompts`` (:func:`~charfw.generation.prompts.encode_pair`
  per text encoder: A1111 weighting, ``BREAK``, 75-token chunks, clip skip), passed as the
  pipeline's ``prompt_embeds``/``negative_prompt_embeds`` (and SDXL's pooled ones). A
  prompt's encoding is computed once per LoRA set and reused by every image that uses it.
* Batches: requests with the same size, steps, CFG, sampler and number of 75-token chunks
  (and LoRA set) go through the pipeline together, up to ``batch_size``. Each image has its
  own CPU ``torch.Generator`` seeded with its seed, for the initial noise and the ancestral
  samplers' noise alike, so an image does not depend on its batch neighbours (see
  :meth:`Generator.generate` on bit-exactness) nor on the device.
* ControlNet: ``request.controls`` (:class:`ControlRequest`: image, model, weight, guidance
  start/end). Each ControlNet model is loaded once per :class:`Generator` (cached by its
  name); a ``StableDiffusionControlNetPipeline`` is built on the already loaded modules for
  each call (no reloading), several controls at once become diffusers' multi-ControlNet.
  Requests with controls are made one image per pipeline call.
* Hires fix: ``request.hires`` (:class:`HiresFix`): the image is made at the request's size,
  enlarged (Lanczos) by ``scale`` and denoised again by img2img with strength ``denoise``
  (with the controls, if any, at the large size). The infotext keeps the first pass's
  ``Size`` and adds ``Denoising strength``, ``Hires upscale`` and ``Hires upscaler``, as A1111.
* Output: a :class:`GeneratedImage` per request with the A1111 infotext parameters
  (:class:`~charfw.generation.infotext.GenerationParams`) to save with
  :func:`~charfw.generation.infotext.save_png`. ``grayscale`` gives a mode ``"L"`` image.

:meth:`Generator.from_loaded` wraps parts already loaded (the trainer's, with its network
attached, for the samples during training) without loading, moving or freeing them.

Importing this module is cheap; torch and diffusers load when a :class:`Generator` is made.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError
from .infotext import GenerationParams, lora_short_hash, model_hash
from .lora_patch import LoraSpec
from .prompts import extract_loras
from .samplers import SamplerSpec, resolve_sampler

if TYPE_CHECKING:
    from PIL import Image

    from ..build.template_library import TemplateLibrary
    from ..training.families import LoadedModel


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet of a request: its control image and model, weight and guidance range.

    ``model`` is a diffusers ControlNet folder, a single ``.safetensors`` file or a Hugging
    Face id. ``start``/``end`` are fractions of the sampling steps (diffusers'
    ``control_guidance_start``/``_end``): step i of N uses the ControlNet when
    ``i/N >= start`` and ``(i+1)/N <= end``."""

    image: Image.Image = field(hash=False)
    model: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def key(self) -> tuple[str, float, float, float]:
        return (self.model, float(self.weight), float(self.start), float(self.end))


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: enlarge by ``scale`` (Lanczos), then img2img with strength
    ``denoise`` and ``steps`` steps (None: the request's)."""

    scale: float = 1.5
    denoise: float = 0.7
    steps: int | None = None


@dataclass(frozen=True)
class ImageRequest:
    """One image to make."""

    #: A1111 syntax; ``<lora:name:w…>`` tags are resolved and applied
    prompt: str
    negative: str = ""
    seed: int = 0
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    #: A1111 numbering (1 = the text encoder's last layer)
    clip_skip: int = 1
    #: applied in addition to the prompt's own tags
    loras: tuple[LoraSpec, ...] = ()
    grayscale: bool = False
    #: A1111 ≥ 1.9's ``Schedule type`` (``Karras``…); a schedule in ``sampler`` wins
    schedule_type: str | None = None
    #: ControlNets (several: diffusers' multi-ControlNet)
    controls: tuple[ControlRequest, ...] = ()
    #: a second, larger pass (None: off)
    hires: HiresFix | None = None


@dataclass
class GeneratedImage:
    image: Image.Image
    #: what goes into the PNG's infotext
    params: GenerationParams
    request: ImageRequest
    #: the global index of this image in the run (its request's position, plus ``first_index``)
    index: int
    #: every LoRA applied to this image (the prompt's tags, then ``request.loras``), with
    #: A1111's short hash of each file
    loras: tuple[tuple[LoraSpec, str], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class _Prepared:
    """A request resolved: its LoRAs found, its sampler known, its text to encode."""

    index: int
    request: ImageRequest
    text: str
    specs: tuple[LoraSpec, ...]
    sampler: SamplerSpec
    set_key: tuple[Any, ...]


def _spec_key(spec: LoraSpec) -> tuple[Any, ...]:
    blocks = spec.blocks if isinstance(spec.blocks, str | None) else tuple(spec.blocks)
    return (str(spec.path.resolve()), spec.weight, spec.text_encoder_weight, repr(blocks))


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def find_lora(name: str, lora_dirs: Sequence[Path], *, prompt: str = "",
              named: Mapping[str, Path] | None = None) -> Path:
    """``<name>.safetensors`` in the first of ``lora_dirs`` that has it, else the LoRA
    ``named`` gives that name (a build's finished LoRAs: ``krnk``, ``krnksf``); a one-line
    error naming the prompt and the places searched otherwise."""
    for folder in lora_dirs:
        candidate = Path(folder) / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    if named and name in named:
        return Path(named[name])
    places = [str(d) for d in lora_dirs] + (["the build's finished LoRAs"] if named else [])
    where = ", ".join(places) if places else "no LoRA folder given"
    raise CharfwError(f"LoRA '{name}' of the prompt '{_short(prompt)}' not found (searched: {where})",
                      hint="give the folder with --lora-dir, or the file with --lora")


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires pass's size: A1111's ``int(side * scale)``, down to a multiple of 8."""
    return (int(width * scale) // 8 * 8, int(height * scale) // 8 * 8)


def controlnet_name(model: str) -> str:
    """The name a ControlNet goes by in the infotext: a file's stem, a folder's or id's last part."""
    name = model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".pth", ".ckpt", ".bin"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def control_infotext(controls: Sequence[ControlRequest]) -> OrderedDict[str, str]:
    """The infotext entries of the controls, as A1111's ControlNet extension writes a unit:
    ``ControlNet 0: "Module: none, Model: name, Weight: 0.5, Guidance Start: 0, Guidance End: 0.3"``
    (the extension's ``ControlNetUnit`` serialisation, keys it reads back by name; charfw gives
    the control image ready made, so the preprocessor module is ``none``)."""
    out: OrderedDict[str, str] = OrderedDict()
    for i, c in enumerate(controls):
        out[f"ControlNet {i}"] = (f"Module: none, Model: {controlnet_name(c.model)}, Weight: {float(c.weight):g}, "
                                  f"Guidance Start: {float(c.start):g}, Guidance End: {float(c.end):g}")
    return out


def parse_control_infotext(value: str) -> dict[str, str]:
    """A ``ControlNet N`` infotext value as its fields (``Model`` → name, ``Weight`` → "0.5" …)."""
    fields = {}
    for item in value.split(", "):
        key, sep, text = item.partition(": ")
        if sep:
            fields[key.strip()] = text.strip()
    return fields


def load_controlnet(name: str, *, cache_dir: Path, unet_config: Mapping[str, Any] | None = None,
                    model_class: str = "ControlNetModel") -> Any:
    """A ``diffusers.ControlNetModel`` from a diffusers folder, a single file (configured
    from the base UNet's ``unet_config``, see :mod:`.controlnet_files`) or a Hugging Face
    id; a one-line error naming the file or id when it cannot be found or read.
    ``model_class`` is the family's ControlNet class (SD 3.5: ``SD3ControlNetModel``, read
    from diffusers folders and ids only)."""
    import diffusers

    ControlNetModel = getattr(diffusers, model_class)

    from charfw.build.manifest import looks_local

    path = Path(name).expanduser()
    if not path.exists() and looks_local(name):
        raise CharfwError("ControlNet model not found", path=path,
                          hint="give a diffusers ControlNet folder, a .safetensors file or a Hugging Face id")
    try:
        if path.is_file():
            if model_class != "ControlNetModel":
                raise CharfwError(f"charfw reads {model_class} ControlNets from diffusers folders or Hugging Face ids, "
                                  "not single files", path=path, hint="give the ControlNet's diffusers folder")
            if unet_config is None:
                raise CharfwError("a single-file ControlNet needs the base model it is used with", path=path)
            from .controlnet_files import load_single_file

            return load_single_file(path, unet_config)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CharfwError("not a diffusers ControlNet folder (no config.json)", path=path)
            return ControlNetModel.from_pretrained(str(path))
        return ControlNetModel.from_pretrained(name, cache_dir=str(cache_dir / "huggingface"))
    except CharfwError:
        raise
    except Exception as exc:  # diffusers/hub errors: one line naming the model
        first = " ".join(str(exc).split())[:200]
        raise CharfwError(f"cannot load the ControlNet model '{name}' ({type(exc).__name__}: {first})",
                          hint="give a diffusers ControlNet folder, a .safetensors file or a Hugging Face id "
                               "(downloads need network access)") from None


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[Any, Any]:
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is None:
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in names:
        raise CharfwError(f"unknown dtype '{dtype}'", hint="use fp16, bf16 or fp32")
    return dev, names[dtype]


class Generator:
    """A loaded base model that makes images from :class:`ImageRequest` records.

    ``base`` and ``vae`` are what ``--base-model``/``--vae`` accept (a single-file
    checkpoint, a diffusers folder, a Hugging Face id, ``charfw:tiny-sd15``). ``device``
    defaults to CUDA when there is one, ``dtype`` to fp16 on CUDA and fp32 on the CPU.
    ``templates`` is where LoRA block-weight presets are looked up (charfw's own when None).
    """

    def __init__(self, base: str, *, vae: str | None = None, cache_dir: Path, lora_dirs: Sequence[Path] = (),
                 device: str | None = None, dtype: str | None = None, family: str | None = None,
                 templates: TemplateLibrary | None = None, named_loras: Mapping[str, Path] | None = None,
                 t5_max_length: int | None = None) -> None:
        from ..training.families import get_family
        from ..training.model_sources import resolve_source
        from .lora_patch import LoraPatcher

        self.lora_dirs = [Path(d) for d in lora_dirs]
        #: LoRAs by name besides the folders (``charfw generate`` in a workspace: the build's)
        self.named_loras = dict(named_loras or {})
        source = resolve_source(base, cache_dir=Path(cache_dir))
        if family is None:  # told from the checkpoint's files
            from ..training.families.detect import detect_family

            family = detect_family(source).require_trained(path=source.path).name
        self.family_name = family
        vae_source = resolve_source(vae, cache_dir=Path(cache_dir), what="VAE") if vae else None
        self.device, self.dtype = _device_and_dtype(device, dtype)
        loader = get_family(family)
        if t5_max_length is not None:  # SD 3.5's third text encoder, off unless asked for
            enable = getattr(loader, "enable_t5", None)
            if enable is None:
                raise CharfwError(f"T5 is an SD 3.5 text encoder; this base model is {family}", hint="leave out --t5")
            enable(t5_max_length)
        self.model = loader.load(source, vae_source, cache_dir=Path(cache_dir))
        self.model_name, self.model_hash = self._identity(source)
        self.vae_name, self.vae_hash = self._identity(vae_source) if vae_source is not None else (None, None)
        model = self.model
        for part in (model.unet, *model.text_encoders, model.vae):
            part.requires_grad_(False)
            part.eval()
            part.to(self.device, self.dtype)
        self.pipe = model.family.pipeline(model, self._scheduler(resolve_sampler("Euler a")))
        self.patcher = LoraPatcher(model.unet, model.text_encoders, family=family, templates=templates)
        self._lora_hashes: dict[Path, str] = {}
        self.cache_dir = Path(cache_dir)
        self._controlnets: dict[str, Any] = {}
        #: whether this generator loaded the model (False: :meth:`from_loaded` wraps someone's)
        self.owns_model = True

    @classmethod
    def from_loaded(cls, model: LoadedModel, *, device: Any, dtype: Any, lora_dirs: Sequence[Path] = (),
                    model_name: str | None = None, model_hash: str | None = None, vae_name: str | None = None,
                    vae_hash: str | None = None, cache_dir: Path | None = None,
                    templates: TemplateLibrary | None = None) -> Generator:
        """A generator on parts someone else loaded and keeps (the trainer's, with its network
        attached): nothing is loaded, moved, cast, frozen or switched to eval.

        ``device`` is where the parts are, ``dtype`` the UNet's (a ``torch.dtype`` or
        ``fp16``/``bf16``/``fp32``): the text encodings are cast to it. Weights are patched
        only for a request's own LoRAs and restored after each :meth:`generate`; requests
        without LoRAs leave every weight alone. :meth:`close` drops the references only.
        ``model_name`` defaults to the source's name (no hash: hashing a checkpoint is the
        caller's choice, ``model_hash``). ``cache_dir`` is where Hugging Face ControlNets are
        downloaded (Hugging Face's own cache when None)."""
        import torch

        from .lora_patch import LoraPatcher

        self = cls.__new__(cls)
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.family_name = model.family.name
        if isinstance(dtype, str):
            dtype = _device_and_dtype("cpu", dtype)[1]
        self.device, self.dtype = torch.device(device), dtype
        self.model = model
        self.model_name = model_name if model_name is not None else cls._identity(model.source, hashed=False)[0]
        self.model_hash = model_hash
        self.vae_name, self.vae_hash = vae_name, vae_hash
        if vae_name is None and model.vae_source is not None:
            self.vae_name = cls._identity(model.vae_source, hashed=False)[0]
        self.pipe = model.family.pipeline(model, self._scheduler(resolve_sampler("Euler a")))
        self.patcher = LoraPatcher(model.unet, model.text_encoders, family=self.family_name, templates=templates)
        self._lora_hashes = {}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache"
        self._controlnets = {}
        self.owns_model = False
        return self

    @staticmethod
    def _identity(source: Any, *, hashed: bool = True) -> tuple[str | None, str | None]:
        """A1111's ``Model``/``Model hash`` (``VAE``/``VAE hash``): a file's stem and hash;
        a folder's or id's name and no hash (A1111 hashes single files only)."""
        if source.kind == "single_file":
            return source.path.stem, model_hash(source.path) if hashed else None
        if source.kind == "builtin":
            return source.ref.split(":", 1)[1], None
        return source.name.rstrip("/").rsplit("/", 1)[-1], None

    def _scheduler(self, sampler: SamplerSpec) -> Any:
        from .samplers import make_scheduler

        return make_scheduler(sampler, self.model.scheduler_config)

    def lora_hash(self, path: Path) -> str:
        if path not in self._lora_hashes:
            self._lora_hashes[path] = lora_short_hash(path)
        return self._lora_hashes[path]

    def controlnet(self, name: str) -> Any:
        """The ControlNet model ``name`` (a diffusers folder, a ``.safetensors`` file or a
        Hugging Face id), loaded once and kept; a one-line error naming it when missing."""
        if name not in self._controlnets:
            unet = getattr(self.pipe, "unet", None)
            net = load_controlnet(name, cache_dir=self.cache_dir, unet_config=unet.config if unet is not None else None,
                                  model_class=getattr(self.model.family, "controlnet_class", "ControlNetModel"))
            net.requires_grad_(False)
            self._controlnets[name] = net.eval().to(self.device, self.dtype)
        return self._controlnets[name]

    # --- resolving --------------------------------------------------------------------------

    def _prepare(self, index: int, request: ImageRequest) -> _Prepared:
        text, refs = extract_loras(request.prompt)
        specs = [LoraSpec(find_lora(r.name, self.lora_dirs, prompt=request.prompt, named=self.named_loras),
                          r.unet, r.blocks, r.te)
                 for r in refs]
        specs += list(request.loras)
        for spec in request.loras:
            if not spec.path.is_file():
                raise CharfwError("LoRA file not found", path=spec.path)
        if request.width % 8 or request.height % 8 or min(request.width, request.height) < 8:
            raise CharfwError(f"image size {request.width}x{request.height}: sides must be multiples of 8")
        if request.steps < 1:
            raise CharfwError(f"steps must be at least 1, got {request.steps}")
        if request.clip_skip < 1:
            raise CharfwError(f"clip skip must be at least 1, got {request.clip_skip}")
        for control in request.controls:
            if not 0 <= control.start < control.end <= 1:
                raise CharfwError(f"ControlNet guidance range {control.start:g}-{control.end:g}: "
                                  "need 0 <= start < end <= 1")
            self.controlnet(control.model)
        if request.hires is not None:
            if not 0 < request.hires.denoise <= 1 or request.hires.scale < 1:
                raise CharfwError(f"hires fix: scale {request.hires.scale:g} must be at least 1 and "
                                  f"denoise {request.hires.denoise:g} between 0 (excluded) and 1")
            if request.hires.steps is not None and request.hires.steps < 1:
                raise CharfwError(f"hires fix: steps must be at least 1, got {request.hires.steps}")
        sampler = resolve_sampler(request.sampler, request.schedule_type)
        key = tuple(sorted(_spec_key(s) for s in specs))
        return _Prepared(index, request, text, tuple(specs), sampler, key)

    # --- generating -------------------------------------------------------------------------

    def generate(self, requests: Sequence[ImageRequest], *, batch_size: int = 1,
                 progress: Callable[[int], None] | None = None, first_index: int = 0) -> Iterator[GeneratedImage]:
        """Make one image per request; yields them as batches finish (grouped by LoRA set,
        then by batch shape, so not necessarily in request order: use ``index``).

        Every request is resolved before the first image (a missing LoRA or an unknown
        sampler fails at once). ``progress(n)`` is called after each batch with the number
        of images it made. The LoRA weights are restored when the iterator is exhausted or
        closed.

        Same seed, same pixels: each image's noise comes from its own CPU generator, so the
        batch does not change which noise an image gets, and the same requests with the same
        ``batch_size`` give the same bytes (the batches are formed from the requests alone).
        Across batch sizes the pixels are equal up to rounding: torch's batched kernels sum in
        another order, so on the CPU in fp32 about 0.1 % of 8-bit values differ by 1 between a
        batch of 1 and of 3 (measured on the tiny model). ``batch_size=1`` (the command's
        default) makes every image independent of its neighbours.
        """
        if batch_size < 1:
            raise CharfwError(f"batch size must be at least 1, got {batch_size}")
        prepared = [self._prepare(first_index + i, r) for i, r in enumerate(requests)]
        by_set: dict[tuple[Any, ...], list[_Prepared]] = {}
        for p in prepared:
            by_set.setdefault(p.set_key, []).append(p)
        try:
            for group in by_set.values():
                yield from self._generate_set(group, batch_size, progress)
        finally:
            self.patcher.restore()

    def _generate_set(self, group: list[_Prepared], batch_size: int,
                      progress: Callable[[int], None] | None) -> Iterator[GeneratedImage]:
        import torch

        self.patcher.apply(group[0].specs)
        model = self.model
        encodings: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for p in group:
                key = (p.text, p.request.negative, p.request.clip_skip)
                if key not in encodings:
                    embeds = model.family.encode_prompts(model, p.text, p.request.negative,
                                                         clip_skip=p.request.clip_skip, device=self.device)
                    encodings[key] = {k: v.to(self.dtype) for k, v in embeds.items()}
        shapes: dict[tuple[Any, ...], list[_Prepared]] = {}
        for p in group:
            r = p.request
            cond = encodings[(p.text, r.negative, r.clip_skip)]["prompt_embeds"]
            shape = (r.width, r.height, r.steps, float(r.cfg_scale), p.sampler, cond.shape[1],
                     tuple(c.key() for c in r.controls), r.hires)
            shapes.setdefault(shape, []).append(p)
        for members in shapes.values():
            size = 1 if members[0].request.controls else batch_size
            for start in range(0, len(members), size):
                batch = members[start : start + size]
                images = self._run_batch(batch, encodings)
                for p, image in zip(batch, images, strict=True):
                    yield self._result(p, image)
                if progress is not None:
                    progress(len(batch))

    def _run_batch(self, batch: list[_Prepared], encodings: dict[tuple[str, str, int], Any]) -> list[Any]:
        import torch

        first = batch[0].request
        conds = [encodings[(p.text, p.request.negative, p.request.clip_skip)] for p in batch]
        embeds: dict[str, Any] = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        embeds.update(guidance_scale=float(first.cfg_scale), output_type="pil")

        def generators() -> list[Any]:
            return [torch.Generator("cpu").manual_seed(int(p.request.seed)) for p in batch]

        pipe, control_args = self._pipeline(batch[0], img2img=False)
        images = list(pipe(width=first.width, height=first.height, num_inference_steps=first.steps,
                           generator=generators(), **control_args, **embeds).images)
        hires = first.hires
        if hires is None:
            return images
        import inspect

        from PIL import Image as PILImage

        width, height = hires_size(first.width, first.height, hires.scale)
        large = [im.resize((width, height), PILImage.Resampling.LANCZOS) for im in images]
        pipe, control_args = self._pipeline(batch[0], img2img=True)
        if "image" in control_args:  # txt2img's control argument is img2img's control_image
            control_args["control_image"] = control_args.pop("image")
            control_args.update(width=width, height=height)
        elif "height" in inspect.signature(pipe.__call__).parameters:
            # SD 3.5's img2img resizes to its default size unless told the image's
            control_args.update(width=width, height=height)
        result = pipe(image=large, strength=float(hires.denoise),
                      num_inference_steps=hires.steps or first.steps, generator=generators(),
                      **control_args, **embeds)
        return list(result.images)

    def _pipeline(self, p: _Prepared, *, img2img: bool) -> tuple[Any, dict[str, Any]]:
        """The pipeline for a batch (built on the loaded modules) and its ControlNet arguments."""
        model, controls = self.model, p.request.controls
        scheduler = self._scheduler(p.sampler)
        if not controls and not img2img:
            self.pipe.scheduler = scheduler
            return self.pipe, {}
        args: dict[str, Any] = {}
        if controls:
            nets = [self.controlnet(c.model) for c in controls]
            pipe = model.family.pipeline(model, scheduler, img2img=img2img,
                                         controlnet=nets[0] if len(nets) == 1 else nets)
            images = [c.image.convert("RGB") for c in controls]
            if len(controls) == 1:
                c = controls[0]
                args = {"image": images[0], "controlnet_conditioning_scale": float(c.weight),
                        "control_guidance_start": float(c.start), "control_guidance_end": float(c.end)}
            else:
                args = {"image": images, "controlnet_conditioning_scale": [float(c.weight) for c in controls],
                        "control_guidance_start": [float(c.start) for c in controls],
                        "control_guidance_end": [float(c.end) for c in controls]}
            if model.family.name == "sd35":  # diffusers' SD3 ControlNet pipeline names it so
                args["control_image"] = args.pop("image")
        else:
            pipe = model.family.pipeline(model, scheduler, img2img=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe, args

    def _result(self, p: _Prepared, image: Any) -> GeneratedImage:
        r = p.request
        if r.grayscale:
            image = image.convert("L")
        loras = tuple((s, self.lora_hash(s.path)) for s in p.specs)
        prompt = r.prompt
        for spec in r.loras:  # so that the infotext, pasted into A1111, applies them too
            prompt += f" <lora:{spec.describe()}>"
        hashes: list[tuple[str, str]] = []
        for spec, short in loras:
            if (spec.path.stem, short) not in hashes:
                hashes.append((spec.path.stem, short))
        params = GenerationParams(
            prompt=prompt, negative=r.negative, steps=r.steps, sampler=p.sampler.display_name,
            cfg_scale=r.cfg_scale, seed=r.seed, width=r.width, height=r.height, model_hash=self.model_hash,
            model_name=self.model_name, vae_hash=self.vae_hash, vae_name=self.vae_name,
            clip_skip=r.clip_skip if self.model.family.uses_clip_skip else 1,
            lora_hashes=hashes, extra=control_infotext(r.controls))
        if r.hires is not None:
            params.denoising_strength = float(r.hires.denoise)
            params.hires_upscale = float(r.hires.scale)
            extra = [("Hires upscaler", "Lanczos")]
            if r.hires.steps is not None:
                extra.insert(0, ("Hires steps", str(r.hires.steps)))
            params.extra = OrderedDict([*extra, *params.extra.items()])
        return GeneratedImage(image=image, params=params, request=r, index=p.index, loras=loras)

    def close(self) -> None:
        """Restore the LoRA-patched weights and let the model go (a model from
        :meth:`from_loaded` is only let go: its owner keeps it as it was)."""
        patcher = getattr(self, "patcher", None)
        if patcher is not None:
            patcher.restore()
        self.pipe = None
        self.model = None  # type: ignore[assignment]

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def part_generator(ctx: Any) -> Generator:
    """The build's generator for a part's base model and VAE (``ctx.part.model``), loaded
    once per build through the stage context's model cache and shared by every stage that
    makes images (sample, draft)."""
    model = ctx.part.model
    key = ("charfw.generation.Generator", model.base, model.vae, str(ctx.cache_dir))
    return ctx.models.get(key, lambda: Generator(model.base, vae=model.vae, cache_dir=ctx.cache_dir,
                                                     family=model.family))
