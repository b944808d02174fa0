"""Which model family a base model is, told from its files without loading a weight.

A manifest's ``model.base`` or ``charfw train --base-model`` names a checkpoint; the
family (and so the trainer, the dataset rules and the block layouts) follows from it:

* a single ``.safetensors`` file: its header's tensor names (and a few shapes). SD 1.x is
  the LDM layout (``model.diffusion_model.input_blocks.*`` with a CLIP-L context of 768),
  SD 2.x has an OpenCLIP text encoder (``cond_stage_model.model.*``, context 1024), SDXL
  its two text encoders under ``conditioner.embedders.*`` (or the UNet's ``label_emb``
  of width 2816), SD 3/3.5 an MMDiT (``model.diffusion_model.joint_blocks.*``, text
  encoders under ``text_encoders.*``). A pickle ``.ckpt`` is opened memory-mapped, so
  its tensors are not read either;
* a diffusers folder: ``model_index.json``'s ``_class_name`` (``StableDiffusionPipeline``,
  ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``; SD 1.x and 2.x share a
  pipeline and differ in the UNet's ``cross_attention_dim``), or the config of a bare
  ``unet/`` or ``transformer/`` folder;
* a Hugging Face id: its ``model_index.json`` when it is in the local Hugging Face cache,
  else the family the manifest (``model.family``) or the command line (``--family``) gives;
* a built-in model: its name (``charfw:tiny-sd15``, ``charfw:tiny-sdxl``, ``charfw:tiny-sd35``).

SD 3.5 Large and Medium are told apart by their number of joint blocks (38 or 24) and the
second attention of 3.5 Medium's first 13 blocks (``attn2``); SD3 Medium, without 3.5's
q/k norms, is recognised and refused as SD 2.x is (charfw trains neither). Anything
else (Flux, a LoRA given as a base model, random tensors) is a one-line
:class:`~charfw.errors.CharfwError` naming the file and the families charfw trains.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import CharfwError
from ..model_sources import BUILTIN_PREFIX, ModelSource, _hub_problem

#: the families charfw trains, with the names people call them
TRAINED: dict[str, str] = {"sd1": "SD 1.x", "sdxl": "SDXL", "sd35": "SD 3.5"}
#: every family detection can answer (SD 2.x and SD3, the MMDiT before 3.5 without its
#: q/k norms, are recognised, not trained)
KNOWN: dict[str, str] = {**TRAINED, "sd2": "SD 2.x", "sd3": "SD3"}
#: the built-in models' families
BUILTIN_FAMILIES: dict[str, str] = {"tiny-sd15": "sd1", "tiny-sdxl": "sdxl", "tiny-sd35": "sd35"}

#: diffusers pipeline class name (without Img2Img/Inpaint/... suffixes) → family
PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd35",
}
_PIPELINE_SUFFIX = re.compile(r"(Img2Img|Inpaint|InstructPix2Pix|ControlNet|Pag|PAG)+(?=Pipeline$)")

UNET = "model.diffusion_model."
#: the UNet's first cross-attention key (its input width is the text context)
_CONTEXT_KEY = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_CONTEXT_KEY = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
_JOINT = re.compile(r"(?:^|\.)joint_blocks\.(\d+)\.")


def families_text() -> str:
    return ", ".join(f"{name} ({label})" for name, label in TRAINED.items())


@dataclass(frozen=True)
class DetectedFamily:
    """A base model's family, and how it was told."""

    #: ``sd1``, ``sd2``, ``sdxl`` or ``sd35``
    name: str
    #: what was seen: "conditioner.embedders.* in Illustrious.safetensors"
    evidence: str
    #: the variant where it matters and was cheap to tell ("SD 3.5 Large")
    variant: str | None = None

    @property
    def label(self) -> str:
        return self.variant or KNOWN.get(self.name, self.name)

    def describe(self) -> str:
        """``sdxl (SDXL: conditioner.embedders.* in model.safetensors)``."""
        return f"{self.name} ({self.label}: {self.evidence})"

    def require_trained(self, *, path: Path | str | None = None) -> DetectedFamily:
        """This, or a one-line error if charfw does not train the family (SD 2.x)."""
        if self.name not in TRAINED:
            raise CharfwError(f"this is an {self.label} model ({self.evidence}); charfw trains {families_text()}",
                              path=path, hint="use a base model of one of those families")
        return self


def _unknown(path: Path | str | None, what: str, hint: str | None = None) -> CharfwError:
    return CharfwError(f"{what}: not a model family charfw trains ({families_text()})", path=path,
                       hint=hint or "give an SD 1.x, SDXL or SD 3.5 checkpoint, diffusers folder or Hugging Face id")


# --- single files ------------------------------------------------------------------------


def family_from_shapes(shapes: Mapping[str, list[int]], *, path: Path | str | None = None) -> DetectedFamily:
    """The family of a single-file checkpoint from its tensor names and shapes."""
    name = Path(path).name if path is not None else "the checkpoint"
    joint = {int(m[1]) for k in shapes if (m := _JOINT.search(k))}
    if joint:
        depth = max(joint) + 1
        has_attn2 = any(".x_block.attn2." in k for k in shapes)
        qk_norm = any(".x_block.attn.ln_q." in k for k in shapes)
        encoders = sorted({k.split(".")[1] for k in shapes if k.startswith("text_encoders.")})
        with_te = f", text encoders {', '.join(encoders)}" if encoders else ""
        return _mmdit(depth, has_attn2, qk_norm, f"{depth} MMDiT joint_blocks{with_te} in {name}")
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return DetectedFamily("sdxl", f"conditioner.embedders.* in {name}")
    label_emb = shapes.get(UNET + "label_emb.0.0.weight")
    if label_emb is not None and list(label_emb)[-1:] == [2816]:
        return DetectedFamily("sdxl", f"the UNet's label_emb (2816 wide) in {name}")
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return DetectedFamily("sd2", f"OpenCLIP text encoder cond_stage_model.model.* in {name}")
    context = shapes.get(_CONTEXT_KEY)
    if context is not None and len(context) == 2:
        width = context[1]
        if width == 1024:
            return DetectedFamily("sd2", f"the UNet's 1024-wide text context in {name}")
        return DetectedFamily("sd1", f"LDM layout with a {width}-wide text context in {name}")
    if UNET + "input_blocks.0.0.weight" in shapes:
        xl_context = shapes.get(_SDXL_CONTEXT_KEY)
        if xl_context is not None and len(xl_context) == 2 and xl_context[1] == 2048:
            return DetectedFamily("sdxl", f"the UNet's 2048-wide text context in {name}")
        return DetectedFamily("sd1", f"LDM layout (model.diffusion_model.*) in {name}")
    if any(k.startswith(("lora_unet_", "lora_te", "transformer.transformer_blocks.")) and "lora" in k for k in shapes):
        raise _unknown(path, "this is a LoRA, not a base model", "give it as a LoRA (continue_from, <lora:...>)")
    if any(k.startswith(("double_blocks.", UNET + "double_blocks.")) for k in shapes):
        raise _unknown(path, "this is a Flux checkpoint")
    raise _unknown(path, "no Stable Diffusion UNet or MMDiT tensors in this file")


def _pickle_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes of a pickle checkpoint, memory-mapped (its tensors are not read)."""
    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old (non-zip) pickle cannot be mapped: read it
        from ..single_file import read_state_dict

        data = read_state_dict(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CharfwError("this checkpoint holds no state dict", path=path)
    return {k: list(v.shape) for k, v in data.items() if hasattr(v, "shape")}


def detect_single_file(path: Path) -> DetectedFamily:
    from ..single_file import tensor_shapes

    shapes = tensor_shapes(path) if path.suffix.lower() == ".safetensors" else _pickle_shapes(path)
    return family_from_shapes(shapes, path=path)


# --- diffusers folders and the hub ----------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise CharfwError(f"cannot read this config ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise CharfwError("expected a JSON object", path=path)
    return data


def _unet_family(config: Mapping[str, Any], where: str) -> DetectedFamily:
    if config.get("addition_embed_type") == "text_time":
        return DetectedFamily("sdxl", f"a UNet with SDXL's added time ids in {where}")
    context = config.get("cross_attention_dim")
    if context == 1024:
        return DetectedFamily("sd2", f"a UNet with a 1024-wide text context in {where}")
    return DetectedFamily("sd1", f"a UNet with a {context}-wide text context in {where}")


def _mmdit(depth: int, attn2: bool, qk_norm: bool, evidence: str) -> DetectedFamily:
    """SD 3.5 Large (38 blocks) or Medium (second attention in its first blocks), or SD3:
    without the q/k norms 3.5 added."""
    if not qk_norm:
        return DetectedFamily("sd3", evidence, "SD3 Medium" if depth == 24 else f"SD3 ({depth} joint blocks)")
    if depth >= 38:
        return DetectedFamily("sd35", evidence, "SD 3.5 Large")
    return DetectedFamily("sd35", evidence, "SD 3.5 Medium" if attn2 else f"SD 3.5 ({depth} joint blocks)")


def _transformer_family(config: Mapping[str, Any], where: str) -> DetectedFamily:
    depth = int(config.get("num_layers") or 0)
    return _mmdit(depth, bool(config.get("dual_attention_layers")), bool(config.get("qk_norm")),
                  f"SD3Transformer2DModel with {depth} blocks in {where}")


def family_from_model_index(index: Mapping[str, Any], read_config: Any, where: str,
                            *, path: Path | str | None = None) -> DetectedFamily:
    """The family of a diffusers model from its ``model_index.json``; ``read_config(sub)``
    returns a component's ``config.json`` (or None) to tell SD 1.x from 2.x and the SD 3.5
    variants."""
    cls = str(index.get("_class_name") or "")
    base = _PIPELINE_SUFFIX.sub("", cls)
    family = PIPELINES.get(base)
    if family is None:
        raise _unknown(path, f"a {cls or 'pipeline without _class_name'} ({where})")
    evidence = f"{cls} in {where}"
    if family == "sd1":
        unet = read_config("unet")
        if unet is not None:
            found = _unet_family(unet, where)
            return DetectedFamily(found.name, evidence)
    if family == "sd35":
        transformer = read_config("transformer")
        if transformer is not None:
            found = _transformer_family(transformer, where)
            return DetectedFamily(found.name, evidence, found.variant)
    return DetectedFamily(family, evidence)


def detect_folder(path: Path) -> DetectedFamily:
    def read_config(sub: str) -> dict[str, Any] | None:
        file = path / sub / "config.json"
        return _read_json(file) if file.is_file() else None

    if (path / "model_index.json").is_file():
        return family_from_model_index(_read_json(path / "model_index.json"), read_config, path.name, path=path)
    for sub, reader in (("unet", _unet_family), ("transformer", _transformer_family)):
        config = read_config(sub)
        if config is not None:
            return reader(config, f"{path.name}/{sub}")
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    cls = str(config.get("_class_name") or "")
    if cls == "UNet2DConditionModel":
        return _unet_family(config, path.name)
    if cls == "SD3Transformer2DModel":
        return _transformer_family(config, path.name)
    raise _unknown(path, f"a {cls or 'folder'} without a model_index.json, unet/ or transformer/")


class FamilyUnavailable(CharfwError):
    """A Hugging Face model whose files are neither in the cache nor downloadable now."""


def detect_hub(repo_id: str, declared: str | None) -> DetectedFamily:
    """From the cached ``model_index.json``, else a download of that one small file (unless
    offline), else the declared family."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from charfw.prep.model_files import offline

    def cached(filename: str) -> dict[str, Any] | None:
        found = try_to_load_from_cache(repo_id, filename)
        return _read_json(Path(found)) if isinstance(found, str) else None

    index = cached("model_index.json")
    where = f"{repo_id}'s cached model_index.json"
    problem = "it is not in the local Hugging Face cache"
    if index is None and not offline():
        # one short probe first (shared with the stages' checks), so that a machine without
        # network does not wait for the download's longer timeouts
        why = _hub_problem(repo_id)
        try:
            if why is not None:
                raise ConnectionError(why)
            index = _read_json(Path(hf_hub_download(repo_id, "model_index.json")))
            where = f"{repo_id}'s model_index.json"
        except Exception as exc:  # no network, no such repository, a gated one
            problem += f" and its model_index.json cannot be downloaded ({why or type(exc).__name__})"
    if index is not None:
        return family_from_model_index(index, lambda sub: cached(f"{sub}/config.json"), where)
    if declared:
        return DetectedFamily(declared, f"as given: {repo_id} is not downloaded")
    raise FamilyUnavailable(f"cannot load the base model '{repo_id}' to tell its family: {problem}",
                            hint="check the id and your network, or download it first; or set model.family "
                                 "(sd1, sdxl or sd35) in the manifest or --family")


# --- any source -----------------------------------------------------------------------------


def detect_family(source: ModelSource, *, declared: str | None = None) -> DetectedFamily:
    """The family of a base model, from headers and config files only.

    ``declared`` is a family the user gave (a manifest's ``model.family``): it is used
    where nothing can be read (a hub id not in the cache), and it must agree with what
    the files say elsewhere."""
    if declared is not None and declared not in KNOWN:
        raise CharfwError(f"unknown model family '{declared}'; charfw trains {families_text()}")
    if source.kind == "builtin":
        name = source.ref[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_FAMILIES:
            raise CharfwError(f"the built-in model '{source.ref}' has no known family")
        found = DetectedFamily(BUILTIN_FAMILIES[name], f"built-in {source.ref}")
    elif source.kind == "hub":
        found = detect_hub(source.ref, declared)
    else:
        assert source.path is not None
        found = detect_single_file(source.path) if source.kind == "single_file" else detect_folder(source.path)
    if declared is not None and found.name != declared:
        raise CharfwError(f"model.family says {declared} ({KNOWN[declared]}), but the base model is {found.describe()}",
                          path=source.path if source.kind in ("single_file", "diffusers") else None,
                          hint="remove model.family (charfw tells the family from the checkpoint) or fix it")
    return found
