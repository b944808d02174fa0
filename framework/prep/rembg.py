"""Background removal with rembg's own sessions, with a vectorised, batched pre/post-processing path.

rembg (https://github.com/danielgatis/rembg) knows where each segmentation model lives,
how to download it and how to start an onnxruntime session for it; charfw uses exactly
that code (``rembg.new_session``), with the session always passed explicitly (the
default of ``remove()`` changed to a large download in 2.0.86) and never a silent
download: a missing model file is either fetched with a message, or, offline or with
``download: false``, reported in one line that says which file to put where.

What charfw does itself, and why:

* **Pre-processing** repeats rembg's ``BaseSession.normalize`` (resize to the model's
  square, divide by the image's own maximum, per-channel mean/std, NCHW) in float32
  straight into one batch array, instead of float64 per image; the parameters per
  session class are in :data:`SESSION_PARAMETERS`, checked against rembg's own
  ``predict`` in the tests. Sessions not listed there (cloth segmentation, SAM, ...)
  run through their own ``predict``. Resizing (to the model and the mask back) uses
  Pillow's antialiased bilinear filter rather than rembg's LANCZOS: it is what the
  ISNet/DIS reference code does, is about twice as fast on the largest step of the
  whole job, and gives the same masks to within a few levels on soft edges.
* **Batching**: a model whose batch dimension is dynamic gets one ``run`` per batch.
* **Post-processing** is rembg's (min-max normalise, to 8 bits, back to the image
  size), then the mask becomes the alpha channel of the untouched RGB pixels.
  rembg's ``naive_cutout`` pastes the image over transparent black through the mask,
  which darkens every soft edge; compositing that onto a plain colour darkens it a
  second time (a dark fringe around hair on white). Keeping straight alpha avoids it.

``import rembg`` calls ``sys.exit(1)`` when onnxruntime is missing, and takes a couple
of seconds (pymatting, numba); it only happens inside :func:`import_rembg`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw import console
from charfw.errors import CharfwError, MissingDependency
from charfw.prep.image_batches import for_each_index
from charfw.prep.model_files import offline
from charfw.prep.onnx_runtime import batch_dimension, import_onnxruntime, warn_if_fell_back

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
ONE = (1.0, 1.0, 1.0)

#: custom model files: which rembg session runs them
CUSTOM_SESSIONS = {"u2net": "u2net_custom", "isnet": "dis_custom"}
#: sessions that call a remote service or need prompts: not for a dataset build
UNSUITABLE = {"sam", "withoutbg", "atlascloud"}


@dataclass(frozen=True)
class SessionParameters:
    """How a rembg session class prepares its input (rembg 2.0.75–2.0.86)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: the model outputs logits (BiRefNet): apply a sigmoid before normalising
    sigmoid: bool = False


#: "<rembg.sessions module>.<class>" → parameters, as read from each class's ``predict``
#: (two classes are called DisSession, hence the module). Only a session whose
#: ``predict`` is defined by one of these classes takes the fast path.
SESSION_PARAMETERS: dict[str, SessionParameters] = {
    "u2net.U2netSession": SessionParameters(320, IMAGENET_MEAN, IMAGENET_STD),
    "u2netp.U2netpSession": SessionParameters(320, IMAGENET_MEAN, IMAGENET_STD),
    "u2net_human_seg.U2netHumanSegSession": SessionParameters(320, IMAGENET_MEAN, IMAGENET_STD),
    "silueta.SiluetaSession": SessionParameters(320, IMAGENET_MEAN, IMAGENET_STD),
    "u2net_custom.U2netCustomSession": SessionParameters(320, IMAGENET_MEAN, IMAGENET_STD),
    "dis_anime.DisSession": SessionParameters(1024, IMAGENET_MEAN, ONE),  # isnet-anime
    "dis_general_use.DisSession": SessionParameters(1024, HALF, ONE),
    "dis_custom.DisCustomSession": SessionParameters(1024, HALF, ONE),
    "birefnet_general.BiRefNetSessionGeneral": SessionParameters(1024, IMAGENET_MEAN, IMAGENET_STD, sigmoid=True),
    "bria_rmbg.BriaRmBgSession": SessionParameters(1024, IMAGENET_MEAN, IMAGENET_STD),
}


def import_rembg() -> Any:
    """The ``rembg`` module, or a :class:`MissingDependency` (never a process exit)."""
    import_onnxruntime("background removal with rembg")
    if "rembg" not in sys.modules and not _pymatting_compiled():
        console.info("rembg: the first import compiles pymatting's kernels with numba "
                     "(about a minute, once per environment)")
    try:
        import rembg
        import rembg.sessions
    except SystemExit:  # rembg exits the process when it cannot import onnxruntime
        raise MissingDependency(
            "background removal with rembg needs onnxruntime, which could not be imported",
            hint="install it with: pip install 'charfw[prep]'",
        ) from None
    except ImportError as exc:
        raise MissingDependency(
            f"background removal needs the Python package 'rembg', which is not installed ({exc})",
            hint="install it with: pip install 'charfw[prep]'",
        ) from None
    return rembg


def _pymatting_compiled() -> bool:
    """Whether numba has cached pymatting's compiled kernels (else importing rembg stalls)."""
    import importlib.util

    if os.environ.get("NUMBA_DISABLE_JIT", "") not in ("", "0"):
        return True
    spec = importlib.util.find_spec("pymatting")
    if spec is None or not spec.submodule_search_locations:
        return True
    root = Path(next(iter(spec.submodule_search_locations)))
    return next(root.glob("*/__pycache__/*.nbi"), None) is not None


def session_classes() -> dict[str, Any]:
    """rembg's session classes by name, without those unsuitable for a local batch job."""
    import_rembg()
    from rembg.sessions import sessions_class

    return {cls.name(): cls for cls in sessions_class if cls.name() not in UNSUITABLE}


def fast_parameters(session: Any) -> SessionParameters | None:
    """The parameters for ``session``, or None when its ``predict`` is not one that
    :data:`SESSION_PARAMETERS` describes (then rembg's own ``predict`` runs)."""
    owner = next((c for c in type(session).__mro__ if "predict" in c.__dict__), None)
    if owner is None:
        return None
    key = f"{owner.__module__.removeprefix('rembg.sessions.')}.{owner.__qualname__}"
    return SESSION_PARAMETERS.get(key)


def model_locations(cls: Any) -> list[Path]:
    """Where rembg looks for a built-in model's file, in its order (2.0.75–2.0.86)."""
    fname = f"{cls.name()}.onnx"
    out = []
    if hasattr(cls, "model_dir"):
        out.append(Path(cls.model_dir()) / fname)
    home = cls.legacy_home() if hasattr(cls, "legacy_home") else cls.u2net_home()
    out.append(Path(home) / fname)
    return out


def models_roots(cls: Any) -> list[Path]:
    roots = [Path(cls.rembg_home())] if hasattr(cls, "rembg_home") else []
    legacy = cls.legacy_home() if hasattr(cls, "legacy_home") else cls.u2net_home()
    return [*roots, Path(legacy)]


# --- the segmenter -----------------------------------------------------------------------


class Segmenter:
    """One rembg session and the fast path for it."""

    def __init__(self, model: str, *, providers: Sequence[str], model_type: str = "isnet",
                 download: bool = True, bases: Sequence[Path] = ()) -> None:
        rembg = import_rembg()
        classes = session_classes()
        kwargs: dict[str, Any] = {}
        as_path = custom_model_path(model, bases)
        if as_path is not None:
            name = CUSTOM_SESSIONS[model_type]
            cls = classes[name]
            roots = models_roots(cls)
            if not any(_inside(as_path, r) for r in roots):
                raise CharfwError(
                    "rembg only loads custom model files from its models folder",
                    path=as_path,
                    hint=f"copy the file into {roots[-1]} (or point U2NET_HOME at its folder)",
                )
            kwargs["model_path"] = str(as_path)
        else:
            name = model
            cls = classes.get(name)
            if cls is None:
                raise CharfwError(
                    f"unknown rembg model '{model}'; use one of {', '.join(sorted(classes))}, "
                    "or a path to a .onnx file",
                )
            self._ensure_file(cls, download)
        self.name = name
        sess_opts = import_onnxruntime("background removal").SessionOptions()
        sess_opts.log_severity_level = 3
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # rembg's own fallback warning; we print ours
                self.session = rembg.new_session(name, sess_opts=sess_opts, providers=list(providers), **kwargs)
        except CharfwError:
            raise
        except ValueError as exc:
            raise CharfwError(f"rembg cannot use this model ({exc})", path=kwargs.get("model_path")) from None
        except Exception as exc:
            where = model_locations(cls)[-1] if as_path is None else as_path
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if as_path is None and not any(p.is_file() for p in model_locations(cls)):
                raise CharfwError(
                    f"the rembg model file {where.name} is missing and could not be downloaded ({reason[:120]})",
                    hint=f"put {where.name} at {where} (`rembg d {name}` fetches it on a machine with network)",
                ) from None
            raise CharfwError(f"rembg could not load {name} ({reason[:200]})", path=where,
                              hint="the file is damaged or not a segmentation model; replace it") from None
        inner = self.session.inner_session
        warn_if_fell_back(inner.get_providers(), providers, f"rembg {name}")
        self.params = fast_parameters(self.session)
        self.input_name = inner.get_inputs()[0].name
        self.fixed_batch = batch_dimension(inner)

    @staticmethod
    def _ensure_file(cls: Any, download: bool) -> None:
        locations = model_locations(cls)
        if any(p.is_file() for p in locations):
            return
        target = locations[-1]
        if not download or offline():
            why = "downloading is switched off" if not download else "offline"
            raise CharfwError(
                f"the rembg model file {target.name} is missing ({why})",
                hint=f"put {target.name} at {target} (`rembg d {cls.name()}` fetches it on a machine with network)",
            )
        console.info(f"rembg: downloading {target.name} into {locations[0].parent} (once; "
                     f"`rembg d {cls.name()}` does the same)")

    # --- inference ---------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output for an NCHW batch (split for fixed-batch models)."""
        import numpy as np

        inner = self.session.inner_session
        step = self.fixed_batch or len(batch)
        outs = [inner.run(None, {self.input_name: batch[i : i + step]})[0] for i in range(0, len(batch), step)]
        return np.concatenate(outs, axis=0)

    def masks(self, images: Sequence[Image.Image], *, workers: int | None = None) -> list[Image.Image | None]:
        """One L mask per image (None where the model sees no contrast at all)."""
        if not images:
            return []
        if self.params is None:  # a session charfw has no parameters for: its own code
            return [self.session.predict(im)[0] for im in images]
        batch = preprocess(images, self.params, workers=workers)
        return postprocess(self.run(batch), images, self.params, workers=workers)

    def cutouts(self, images: Sequence[Image.Image], *, post_process_mask: bool = False,
                alpha_matting: bool = False, workers: int | None = None) -> list[Image.Image | None]:
        """RGBA cut-outs (straight alpha), None where nothing could be separated."""
        out: list[Image.Image | None] = []
        for image, mask in zip(images, self.masks(images, workers=workers), strict=True):
            if mask is None:
                out.append(None)
                continue
            if post_process_mask:
                import numpy as np
                from PIL import Image as PILImage
                from rembg.bg import post_process

                mask = PILImage.fromarray(post_process(np.asarray(mask)))
            if alpha_matting:
                from rembg.bg import alpha_matting_cutout

                try:
                    out.append(alpha_matting_cutout(image, mask, 240, 10, 10))
                    continue
                except ValueError:  # matting can fail on flat regions: keep the plain cut-out
                    pass
            out.append(apply_mask(image, mask))
        return out


def custom_model_path(model: str, bases: Sequence[Path]) -> Path | None:
    if not model.lower().endswith(".onnx"):
        return None
    candidate = Path(model).expanduser()
    options = [candidate] if candidate.is_absolute() else [b / candidate for b in bases]
    for p in options:
        if p.is_file():
            return p.resolve()
    raise CharfwError("model file not found", path=model)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.expanduser().resolve())
        return True
    except ValueError:
        return False


# --- the vectorised pre/post-processing ----------------------------------------------------


def preprocess(images: Sequence[Image.Image], params: SessionParameters, *,
               workers: int | None = None) -> np.ndarray:
    """rembg's ``normalize`` for a batch: NCHW float32, written into one array
    (resized with Pillow's antialiased bilinear filter; see the module docstring)."""
    import numpy as np
    from PIL import Image

    s = params.size
    batch = np.empty((len(images), 3, s, s), np.float32)
    mean = np.asarray(params.mean, np.float32)[:, None, None]
    std = np.asarray(params.std, np.float32)[:, None, None]

    def one(i: int) -> None:
        im = images[i] if images[i].mode == "RGB" else images[i].convert("RGB")
        im = im.resize((s, s), Image.Resampling.BILINEAR)
        arr = np.asarray(im).transpose(2, 0, 1)
        top = max(float(arr.max()), 1e-6)
        np.multiply(arr, (1.0 / (top * std)).astype(np.float32), out=batch[i])
        batch[i] -= mean / std

    for_each_index(one, len(images), workers)
    return batch


def postprocess(output: np.ndarray, images: Sequence[Image.Image], params: SessionParameters, *,
                workers: int | None = None) -> list[Image.Image | None]:
    """rembg's mask handling: first channel, min-max, 8 bits, back to the image size."""
    import numpy as np
    from PIL import Image

    masks: list[Image.Image | None] = [None] * len(images)

    def one(i: int) -> None:
        pred = output[i, 0]
        if params.sigmoid:
            pred = 1.0 / (1.0 + np.exp(-pred))
        lo, hi = float(pred.min()), float(pred.max())
        if not hi - lo > 1e-12:  # a uniform prediction: nothing to separate
            return
        m = ((pred - lo) / (hi - lo) * 255).astype(np.uint8)
        masks[i] = Image.fromarray(m, mode="L").resize(images[i].size, Image.Resampling.BILINEAR)

    for_each_index(one, len(images), workers)
    return masks


def apply_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image's own RGB with the mask as straight alpha."""
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    out.putalpha(mask)
    return out
