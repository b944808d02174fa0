"""onnxruntime sessions on the execution providers a machine really has, with CPU as the floor.

Why this module exists: onnxruntime *raises* when asked for a provider its build does
not contain, and *silently runs on CPU* when a provider that is compiled in cannot load
its libraries (CUDA or cuDNN missing, or of another major version). Neither is what a
user preparing a dataset wants: asking for the GPU on a laptop should warn once and go
on on the CPU, and a GPU that quietly is not used should be said out loud, because it
makes tagging ten times slower. Every model-backed plugin (WD14, rembg) opens its
sessions through here so that this policy lives in one place.

onnxruntime itself is imported inside the functions: ``charfw --help`` must not pay
for it, and a missing install gives the ``pip install 'charfw[prep]'`` hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from charfw import console
from charfw.errors import CharfwError, require_module

CPU = "CPUExecutionProvider"

#: the names a manifest or a command line uses for providers
PROVIDER_NAMES: dict[str, str] = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
}

ProviderChoice = Literal["auto", "cpu", "cuda", "coreml", "rocm", "directml"]


def import_onnxruntime(purpose: str) -> Any:
    """``onnxruntime``, or a :class:`~charfw.errors.MissingDependency` with an install hint."""
    return require_module("onnxruntime", extra="prep", purpose=purpose)


def choose_providers(choice: str = "auto", *, auto_order: Sequence[str] = ("cuda", "cpu"),
                     purpose: str = "this model") -> list[str]:
    """The provider list to ask onnxruntime for, always ending with the CPU.

    ``auto`` takes the accelerators of ``auto_order`` that this onnxruntime build has.
    A named accelerator that the build lacks gives a warning and the CPU, never an error:
    the same manifest must build on a workstation and on a laptop.
    """
    ort = import_onnxruntime(purpose)
    available = list(ort.get_available_providers())
    if choice == "auto":
        wanted = [PROVIDER_NAMES[n] for n in auto_order if n != "cpu" and PROVIDER_NAMES[n] in available]
        return [*wanted, CPU]
    if choice == "cpu":
        return [CPU]
    name = PROVIDER_NAMES.get(choice)
    if name is None:
        raise CharfwError(f"unknown execution provider '{choice}'; use auto, {', '.join(PROVIDER_NAMES)}")
    if name not in available:
        console.warn(f"{purpose}: {name} is not in this onnxruntime build (it has "
                     f"{', '.join(available)}); running on the CPU")
        return [CPU]
    return [name, CPU]


def warn_if_fell_back(active: Sequence[str], requested: Sequence[str], purpose: str) -> None:
    """Warn when an accelerator was asked for but the session runs on the CPU only."""
    wanted = [p for p in requested if p != CPU]
    if wanted and not [p for p in active if p != CPU]:
        console.warn(f"{purpose}: {', '.join(wanted)} could not be started (its runtime "
                     f"libraries are missing or of another version); running on the CPU, "
                     f"which is much slower")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    # onnxruntime prefixes "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : "; keep the reason
    return line.split(" : ")[-1].strip() or line


def open_session(path: Path, *, providers: Sequence[str], purpose: str,
                 threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path``, falling back to the CPU.

    A file that is missing or is not an ONNX model raises a one-line
    :class:`CharfwError` naming it; a provider that fails to start gives a warning.
    """
    ort = import_onnxruntime(purpose)
    if not path.is_file():
        raise CharfwError(f"{purpose}: model file not found", path=path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own provider chatter; we warn ourselves
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:
        if any(p != CPU for p in providers):
            console.warn(f"{purpose}: could not start on {', '.join(p for p in providers if p != CPU)} "
                         f"({_first_line(exc)}); running on the CPU")
            return open_session(path, providers=[CPU], purpose=purpose, threads=threads)
        raise CharfwError(
            f"{purpose}: cannot load the ONNX model ({_first_line(exc)})",
            path=path,
            hint="the file is damaged or not an ONNX model; download it again",
        ) from None
    warn_if_fell_back(session.get_providers(), providers, purpose)
    return session


def batch_dimension(session: Any) -> int | None:
    """The fixed batch size of a session's first input, or None when it is dynamic.

    Many exported models (most WD14 v2 taggers among them) fix the batch at 1; running a
    stacked batch through them fails, so callers split batches to this size.
    """
    first = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return first if isinstance(first, int) and first > 0 else None


def describe_signature(session: Any) -> str:
    """``in input[batch_size,448,448,3] → out output[batch_size,10861]``, for messages."""

    def fmt(args: Any) -> str:
        return ", ".join(f"{a.name}[{','.join(str(d) for d in a.shape)}]" for a in args)

    return f"in {fmt(session.get_inputs())} → out {fmt(session.get_outputs())}"

