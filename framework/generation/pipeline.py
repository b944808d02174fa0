"""Text-to-image generation on a base model, with LoRAs applied exactly by charfw.

:class:`Generator` loads a base model (and VAE) once through the model family, builds one
diffusers ``StableDiffusionPipeline`` on its parts (no safety checker) and turns
:class:`ImageRequest` records into images:

* LoRAs: the prompt's ``<lora:name:…>`` tags (``<name>.safetensors`` in ``lora_dirs``)
  plus ``request.loras``, applied by one :class:`~charfw.generation.lora_patch.LoraPatcher`.
  Requests are grouped by LoRA set, so each set is patched once; the original weights are
  restored when :meth:`Generator.generate` finishes (or fails).
* Prompts: :func:`~charfw.generation.prompts.encode_pair` (A1111 weighting, ``BREAK``,
  75-token chunks, clip skip), passed as ``prompt_embeds``/``negative_prompt_embeds``. A
  prompt's encoding is computed once per LoRA set and reused by every image that uses it.
* Batches: requests with the same size, steps, CFG, sampler and number of 75-token chunks
  (and LoRA set) go through the pipeline together, up to ``batch_size``. Each image has its
  own CPU ``torch.Generator`` seeded with its seed, for the initial noise and the ancestral
  samplers' noise alike, so an image does not depend on its batch neighbours (see
  :meth:`Generator.generate` on bit-exactness) nor on the device.
* Output: a :class:`GeneratedImage` per request with the A1111 infotext parameters
  (:class:`~charfw.generation.infotext.GenerationParams`) to save with
  :func:`~charfw.generation.infotext.save_png`. ``grayscale`` gives a mode ``"L"`` image.

Importing this module is cheap; torch and diffusers load when a :class:`Generator` is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def find_lora(name: str, lora_dirs: Sequence[Path], *, prompt: str = "") -> Path:
    """``<name>.safetensors`` in the first of ``lora_dirs`` that has it; a one-line error
    naming the prompt and the folders searched otherwise."""
    for folder in lora_dirs:
        candidate = Path(folder) / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in lora_dirs) if lora_dirs else "no LoRA folder given"
    raise CharfwError(f"LoRA '{name}' of the prompt '{_short(prompt)}' not found (searched: {where})",
                      hint="give the folder with --lora-dir, or the file with --lora")


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
                 device: str | None = None, dtype: str | None = None, family: str = "sd1",
                 templates: TemplateLibrary | None = None) -> None:
        from ..training.families import get_family
        from ..training.model_sources import resolve_source
        from .lora_patch import LoraPatcher

        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.family_name = family
        source = resolve_source(base, cache_dir=Path(cache_dir))
        vae_source = resolve_source(vae, cache_dir=Path(cache_dir), what="VAE") if vae else None
        self.device, self.dtype = _device_and_dtype(device, dtype)
        self.model = get_family(family).load(source, vae_source, cache_dir=Path(cache_dir))
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

    @staticmethod
    def _identity(source: Any) -> tuple[str | None, str | None]:
        """A1111's ``Model``/``Model hash`` (``VAE``/``VAE hash``): a file's stem and hash;
        a folder's or id's name and no hash (A1111 hashes single files only)."""
        if source.kind == "single_file":
            return source.path.stem, model_hash(source.path)
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

    # --- resolving --------------------------------------------------------------------------

    def _prepare(self, index: int, request: ImageRequest) -> _Prepared:
        text, refs = extract_loras(request.prompt)
        specs = [LoraSpec(find_lora(r.name, self.lora_dirs, prompt=request.prompt), r.unet, r.blocks, r.te)
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

        from .prompts import encode_pair

        self.patcher.apply(group[0].specs)
        model = self.model
        encodings: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for p in group:
                key = (p.text, p.request.negative, p.request.clip_skip)
                if key not in encodings:
                    cond, uncond = encode_pair(model.tokenizers[0], model.text_encoders[0], p.text,
                                               p.request.negative, clip_skip=p.request.clip_skip, device=self.device)
                    encodings[key] = (cond.to(self.dtype), uncond.to(self.dtype))
        shapes: dict[tuple[Any, ...], list[_Prepared]] = {}
        for p in group:
            r = p.request
            cond = encodings[(p.text, r.negative, r.clip_skip)][0]
            shape = (r.width, r.height, r.steps, float(r.cfg_scale), p.sampler, cond.shape[1])
            shapes.setdefault(shape, []).append(p)
        for members in shapes.values():
            for start in range(0, len(members), batch_size):
                batch = members[start : start + batch_size]
                images = self._run_batch(batch, encodings)
                for p, image in zip(batch, images, strict=True):
                    yield self._result(p, image)
                if progress is not None:
                    progress(len(batch))

    def _run_batch(self, batch: list[_Prepared], encodings: dict[tuple[str, str, int], Any]) -> list[Any]:
        import torch

        first = batch[0].request
        conds = [encodings[(p.text, p.request.negative, p.request.clip_skip)] for p in batch]
        self.pipe.scheduler = self._scheduler(batch[0].sampler)
        generators = [torch.Generator("cpu").manual_seed(int(p.request.seed)) for p in batch]
        result = self.pipe(prompt_embeds=torch.cat([c for c, _ in conds]),
                           negative_prompt_embeds=torch.cat([u for _, u in conds]),
                           width=first.width, height=first.height, num_inference_steps=first.steps,
                           guidance_scale=float(first.cfg_scale), generator=generators, output_type="pil")
        return list(result.images)

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
            model_name=self.model_name, vae_hash=self.vae_hash, vae_name=self.vae_name, clip_skip=r.clip_skip,
            lora_hashes=hashes)
        return GeneratedImage(image=image, params=params, request=r, index=p.index, loras=loras)

    def close(self) -> None:
        """Restore the LoRA-patched weights and let the model go."""
        patcher = getattr(self, "patcher", None)
        if patcher is not None:
            patcher.restore()
        self.pipe = None
        self.model = None  # type: ignore[assignment]

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
