"""Where a base model or VAE comes from, and what identifies its content.

A manifest's ``model.base`` (or ``charfw train --base-model``) may be

* ``charfw:tiny-sd15``: charfw's tiny SD 1.5, built deterministically on first use into
  ``<cache>/models/`` (the examples and tests train on it; nothing is downloaded), and
  its SDXL sibling ``charfw:tiny-sdxl``;
* a diffusers folder (``model_index.json``, ``unet/``, ...);
* a single-file checkpoint (``.safetensors``, or a pickle ``.ckpt`` read weights-only),
  the form A1111 users hold their models in;
* a Hugging Face id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), downloaded by
  diffusers into its own cache.

``model.vae`` may be a VAE file (``kl-f8-anime2.ckpt``), a diffusers VAE folder or a
Hugging Face id. :func:`source_identity` gives the data a build's fingerprint and the
latent cache's key need: content hashes of local files, the commit of a cached hub model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from charfw.build.manifest import BUILTIN_PREFIX, SINGLE_FILE_SUFFIXES, looks_local
from charfw.training.tiny_sd import build_tiny_sd15

from ..errors import CharfwError, display_path

#: the built-in models, with a version that changes whenever their weights would
BUILTIN_MODELS: dict[str, str] = {"tiny-sd15": "1", "tiny-sd35": "1", "tiny-sdxl": "1"}
TINY = "charfw:tiny-sd15"
#: training defaults on a built-in model, for options a manifest or command line leaves
#: unset: the tiny model learns nothing more from the method's 1200 steps of dim 128 at
#: 512 px, and a laptop CPU trains this in seconds (AdamW: 8-bit Adam needs a GPU)
BUILTIN_TRAIN_DEFAULTS: dict[str, dict[str, object]] = {
    "tiny-sd15": {"dim": 8, "optimizer": "AdamW", "max_train_steps": 24, "resolution": 128,
                  "gradient_checkpointing": False},
    # SD 3.5 trains plain LoRA only (its MMDiT has no convolutions), at alpha = dim as diffusers
    "tiny-sd35": {"network": "lora", "dim": 4, "alpha": "A100p", "optimizer": "AdamW", "max_train_steps": 24,
                  "resolution": 64, "gradient_checkpointing": False},
    "tiny-sdxl": {"dim": 8, "optimizer": "AdamW", "max_train_steps": 24, "resolution": 128,
                  "gradient_checkpointing": False},
}
#: training defaults of a model family, for options left unset: SD 3.5's MMDiT has no
#: convolutions for the method's lora3x3, so it trains plain LoRA (diffusers' format)
FAMILY_TRAIN_DEFAULTS: dict[str, dict[str, object]] = {"sd35": {"network": "lora"}}

SourceKind = Literal["builtin", "diffusers", "single_file", "hub"]


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    #: what the user wrote
    ref: str
    #: the local file or folder (builtin: where it is built)
    path: Path | None = None

    @property
    def name(self) -> str:
        """The name kohya records (``ss_sd_model_name``): a file's or folder's name, or the id."""
        return self.path.name if self.path is not None and self.kind != "builtin" else self.ref


def resolve_source(ref: str, *, cache_dir: Path, what: str = "base model") -> ModelSource:
    """Interpret a base-model or VAE reference; raise a one-line error if it cannot be."""
    text = ref.strip()
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise CharfwError(f"unknown built-in {what} '{text}'; built in: "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
        return ModelSource("builtin", text, cache_dir / "models" / f"{name}-v{BUILTIN_MODELS[name]}")
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet").is_dir() or (path / "config.json").is_file():
            return ModelSource("diffusers", text, path.resolve())
        raise CharfwError(f"this folder is not a diffusers {what} (no model_index.json or config.json)", path=path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise CharfwError(f"not a model file (expected {', '.join(SINGLE_FILE_SUFFIXES)})", path=path)
        return ModelSource("single_file", text, path.resolve())
    local = looks_local(text)
    if not local:
        return ModelSource("hub", text)
    raise CharfwError(f"{what} '{text}' not found", path=path if local else None,
                      hint="give a .safetensors file, a diffusers folder, a Hugging Face id or charfw:tiny-sd15")


#: seconds to wait for huggingface.co when a hub model is not in the cache
HUB_TIMEOUT = 4.0


@functools.lru_cache(maxsize=32)
def _hub_problem(repo_id: str) -> str | None:
    """Why a hub model not in the cache cannot be downloaded now (None: it can). One
    request with a short timeout, once per process."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        return None
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        return "it is gated on huggingface.co (accept its licence there and log in with `hf auth login`)"
    except RepositoryNotFoundError:
        return "huggingface.co has no model of that name (removed, private, or misspelled)"
    except Exception as exc:  # no network, DNS, timeout, proxy: all mean "cannot download now"
        return f"huggingface.co cannot be reached ({type(exc).__name__})"
    return None


def check_available(source: ModelSource, *, workspace_root: Path, what: str = "base model") -> None:
    """Raise a one-line error now, before any work, when a model cannot be loaded later: a
    Hugging Face id that is neither in the local cache nor downloadable (offline flags
    set, no network, no such model). Local files and folders were checked when resolved;
    the built-in model is built on use."""
    if source.kind != "hub" or _hub_commit(source.ref) is not None:
        return
    from charfw.prep.model_files import offline_flag

    flag = offline_flag()
    why = f"{flag} is set" if flag else _hub_problem(source.ref)
    if why is None:
        return
    name = source.ref.split("/")[-1]
    models = workspace_root / "models"
    raise CharfwError(
        f"{what} '{source.ref}' is not in the Hugging Face cache and cannot be downloaded: {why}",
        hint=f"put its .safetensors file at {display_path(models / (name + '.safetensors'))} and give that "
             f"path (in a manifest relative to it: ../models/{name}.safetensors), download it where there "
             f"is network (`hf download {source.ref}`), or try charfw with charfw:tiny-sd15",
    )


def check_model_refs(model: Any, *, cache_dir: Path, workspace_root: Path, label: str, purpose: str) -> None:
    """A stage's ``check`` of its part's ``ModelRefs``: a base model is set, it and the VAE
    resolve and can be loaded; errors name the manifest key (``model.base``, ``model.vae``)."""
    if not model.base:
        raise CharfwError(f"{label}: no base model to {purpose}", manifest_key=("model", "base"),
                          hint="set model.base in the manifest (charfw:tiny-sd15, a .safetensors file, "
                               "a diffusers folder or a Hugging Face id)")
    for key, ref, what in (("base", model.base, "base model"), ("vae", model.vae, "VAE")):
        if not ref:
            continue
        try:
            check_available(resolve_source(ref, cache_dir=cache_dir, what=what), workspace_root=workspace_root,
                            what=what)
        except CharfwError as exc:
            exc.manifest_key = ("model", key)
            raise


#: the SD 1.5 a new manifest names when it is in the Hugging Face cache
DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class FirstRunModel:
    """What ``charfw init`` writes so that the new manifest builds on this machine."""

    base: str
    #: the optimizer to write (None: the method's AdamW8bit can run here)
    optimizer: str | None
    gpu: bool
    #: what the machine lacks for the method's defaults, for the manifest's comment
    lacks: tuple[str, ...]


def first_run_model() -> FirstRunModel:
    """The base model and optimizer a new manifest starts with: SD 1.5 when it is in the
    Hugging Face cache, else charfw's tiny model (nothing to download); AdamW8bit only on
    an NVIDIA GPU with bitsandbytes installed, else AdamW. Nothing is downloaded."""
    import importlib.util

    gpu = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        gpu = torch.cuda.is_available()
    eight_bit = gpu and importlib.util.find_spec("bitsandbytes") is not None
    cached = _hub_commit(DEFAULT_HUB_MODEL) is not None
    lacks = tuple(what for what, missing in (("an NVIDIA GPU", not gpu), ("bitsandbytes", gpu and not eight_bit),
                                              (f"{DEFAULT_HUB_MODEL} in the Hugging Face cache", not cached))
                  if missing)
    return FirstRunModel(DEFAULT_HUB_MODEL if cached else TINY, None if eight_bit else "AdamW", gpu, lacks)


def ensure_builtin(source: ModelSource) -> Path:
    """Build a built-in model on first use (atomically: a half-built model never appears)."""
    assert source.kind == "builtin" and source.path is not None
    if not (source.path / "model_index.json").is_file():
        if source.ref == BUILTIN_PREFIX + "tiny-sd35":
            from charfw.training.tiny_sd35 import build_tiny_sd35

            build_tiny_sd35(source.path)
        elif source.ref == BUILTIN_PREFIX + "tiny-sdxl":
            from charfw.training.tiny_sdxl import build_tiny_sdxl

            build_tiny_sdxl(source.path)
        else:
            build_tiny_sd15(source.path)
    return source.path


def _hub_commit(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            parts = Path(found).parts
            if "snapshots" in parts:
                return parts[parts.index("snapshots") + 1]
    return None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def source_identity(source: ModelSource, sha256: Callable[[Path], str]) -> dict[str, Any]:
    """What identifies a model's weights: file hashes (stat-cached by ``sha256``) for
    local models, the snapshot commit for a cached hub model."""
    if source.kind == "hub":
        return {"hub": source.ref, "commit": _hub_commit(source.ref)}
    if source.kind == "builtin":
        ensure_builtin(source)
    assert source.path is not None
    if source.path.is_file():
        return {"file": source.path.name, "sha256": sha256(source.path)}
    files = sorted(p for p in source.path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(source.path).parts))
    return {"folder": source.ref if source.kind == "builtin" else source.path.name,
            "files": [[p.relative_to(source.path).as_posix(), sha256(p)] for p in files]}


def old_webui_hash(path: Path) -> str:
    """A1111's legacy model hash (``ss_sd_model_hash``): sha256 of 64 KiB at offset 1 MiB, 8 hex."""
    import hashlib

    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def model_key_pairs(model: Any, *, cache_dir: Path, sha256: Any) -> list[list[Any]]:
    """A part's base model and VAE as ``[name, fingerprint]`` pairs for a stage's
    ``cache_key`` (what the engine cannot see: the models' content), so that a rebuild
    says which one changed. ``model`` is the part's ``ModelRefs``; ``sha256`` hashes a file
    (the stage context's stat-cached ``ctx.sha256``)."""
    from charfw.build.hashing import fingerprint

    pairs: list[list[Any]] = []
    if model.base:
        src = resolve_source(model.base, cache_dir=cache_dir)
        pairs.append([f"base model {src.name}", fingerprint(source_identity(src, sha256))])
    if model.vae:
        src = resolve_source(model.vae, cache_dir=cache_dir, what="VAE")
        pairs.append([f"VAE {src.name}", fingerprint(source_identity(src, sha256))])
    return pairs
