"""safetensors files, streamed: memory-mapped reading, atomic writing with kohya's hashes.

Reading memory-maps the file (a 300 MB LoRA costs no copy) after checking the header
against the file size. Writing streams the tensors to a temporary file, hashing them on
the way, then renames it into place, so an output is complete or absent. The bytes are
exactly those ``safetensors.torch.save_file`` writes. ``sshs_model_hash`` and
``sshs_legacy_hash`` are computed exactly as kohya's ``precalculate_safetensors_hashes``
does (the sha256 of the data section, and of the 64 KiB at 1 MiB of the file serialised
with only the ``ss_*`` metadata), because A1111 shows and trusts a stored hash without
checking it.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..build.atomic import atomic_path
from ..errors import CharfwError
from .delta import torch_threads

# --- dtypes ------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
#: safetensors lays tensors out by this order, descending, then by name (Rust ``Dtype`` order)
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}

#: the names ``--precision`` and manifests use for output dtypes
PRECISIONS: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_precision(value: str | torch.dtype | None) -> torch.dtype | None:
    """``fp16``/``bf16``/``fp32`` (or a torch dtype) → a torch dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return PRECISIONS[value.lower()]
    except KeyError:
        raise CharfwError(f"unknown precision '{value}'; use fp16, bf16 or fp32") from None


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype).replace("torch.", ""))


# --- reading -----------------------------------------------------------------------------

MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str], Any]:
    """Tensors (memory-mapped views, in header order), metadata and the map they view.

    Validates the header against the file size first, so a truncated download is a clear
    error instead of a crash deep in a reader."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CharfwError(f"truncated or empty: {size} bytes, not a safetensors file", path=path)
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise CharfwError("not a safetensors file (no valid header)", path=path)
        if n > size - 8:
            raise CharfwError(f"truncated: the header alone needs {n + 8} bytes, the file has {size}", path=path,
                              hint="the download or copy is incomplete")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CharfwError(f"not a safetensors file (header: {exc})", path=path) from None
    meta_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    data_start = 8 + n
    available = size - data_start
    needed = 0
    for key, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CharfwError(f"tensor '{key}': bad header entry", path=path) from None
        needed = max(needed, end)
    if needed > available:
        raise CharfwError(
            f"truncated: the header describes {needed} bytes of tensor data, the file holds {available}",
            path=path,
            hint="the download or copy is incomplete",
        )
    tensors: dict[str, torch.Tensor] = {}
    buffer: Any = None
    if size > data_start:
        with open(path, "rb") as fh:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    for key, info in header.items():
        dtype = _DTYPES.get(str(info.get("dtype")))
        if dtype is None:
            raise CharfwError(f"tensor '{key}': unsupported dtype {info.get('dtype')}", path=path)
        shape = [int(s) for s in info.get("shape", [])]
        begin, end = (int(x) for x in info["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = math.prod(shape)
        if end - begin != count * itemsize or begin < 0:
            raise CharfwError(f"tensor '{key}': its offsets do not match its shape {shape}", path=path)
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        offset = data_start + begin
        if offset % itemsize:
            t = torch.frombuffer(bytearray(buffer[offset : offset + count * itemsize]), dtype=dtype)
        else:
            t = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        tensors[key] = t.reshape(shape)
    return tensors, metadata, buffer


# --- writing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedFile:
    """What :func:`write_safetensors` wrote."""

    path: Path
    #: kohya's sshs_model_hash: sha256 of the data section (A1111's "addnet" hash)
    model_hash: str
    #: kohya's sshs_legacy_hash
    legacy_hash: str
    size: int
    metadata: dict[str, str]


def write_safetensors(dest: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, Any] | None = None, *, dtype: str | torch.dtype | None = None,
                      hashes: bool = True) -> SavedFile:
    """Write ``tensors`` as a safetensors file, atomically and fsynced.

    Floating tensors are cast to ``dtype`` (fp16/bf16/fp32; None keeps each one's own).
    Metadata values are stored as strings. With ``hashes`` (the default), kohya's
    ``sshs_model_hash``/``sshs_legacy_hash`` are computed in the same pass and written into
    the header, replacing stale ones. Readers (kohya, A1111, ComfyUI, diffusers, the
    ``safetensors`` package) see exactly what ``safetensors.torch.save_file`` would write."""
    dest = Path(dest)
    target = parse_precision(dtype) if isinstance(dtype, str) or dtype is None else dtype
    meta = _clean_metadata(metadata)
    layout = _layout(tensors, target)
    entries = [(r[0], r[3], r[4], r[5], r[6]) for r in layout]
    if hashes:
        meta["sshs_model_hash"] = "0" * 64
        meta["sshs_legacy_hash"] = "0" * 8
    header = _header_bytes(entries, meta)
    ss_prefix = _ss_prefix(layout, meta)
    with atomic_path(dest, fsync=True) as tmp, torch_threads(1):  # casts are memory-bound
        with open(tmp, "wb") as fh:
            fh.write(len(header).to_bytes(8, "little"))
            fh.write(header)
            model_hash, legacy_hash = _stream(layout, ss_prefix, fh)
            if hashes:
                meta["sshs_model_hash"] = model_hash
                meta["sshs_legacy_hash"] = legacy_hash
                final = _header_bytes(entries, meta)
                assert len(final) == len(header)  # hex digests have fixed lengths
                fh.seek(8)
                fh.write(final)
        size = tmp.stat().st_size
    return SavedFile(dest, model_hash, legacy_hash, size, meta)


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                dtype: torch.dtype | None = None) -> tuple[str, str]:
    """kohya's ``(sshs_model_hash, sshs_legacy_hash)`` of ``tensors`` saved with ``metadata``
    (floats cast to ``dtype`` first), without writing anything."""
    layout = _layout(tensors, dtype)
    return _stream(layout, _ss_prefix(layout, _clean_metadata(metadata)), None)


def _clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}


def _layout(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> list[tuple[str, torch.Tensor, torch.dtype, str, list[int], int, int]]:
    """Tensors in safetensors' order (dtype descending, then name) with their offsets."""
    rows = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is not a tensor")
        out_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        dt = _DTYPE_NAMES.get(out_dtype)
        if dt is None:
            raise CharfwError(f"tensor '{name}': dtype {out_dtype} cannot be stored in safetensors")
        rows.append((name, t, out_dtype, dt))
    rows.sort(key=lambda r: (-_DTYPE_RANK[r[3]], r[0]))
    out = []
    pos = 0
    for name, t, out_dtype, dt in rows:
        nbytes = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        out.append((name, t, out_dtype, dt, list(t.shape), pos, pos + nbytes))
        pos += nbytes
    return out


def _header_bytes(entries: list[tuple[str, str, list[int], int, int]], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header safetensors writes: compact, ``__metadata__`` first, padded with
    spaces to a multiple of 8 bytes (the length matters: it moves kohya's legacy hash)."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = dict(metadata)
    for name, dt, shape, begin, end in entries:
        obj[name] = {"dtype": dt, "shape": shape, "data_offsets": [begin, end]}
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return raw + b" " * ((8 - len(raw) % 8) % 8)


def _ss_prefix(layout: list[Any], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and header of the file as kohya hashes it (``ss_*`` metadata only)."""
    entries = [(r[0], r[3], r[4], r[5], r[6]) for r in layout]
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    header = _header_bytes(entries, ss)
    return len(header).to_bytes(8, "little") + header


LEGACY_OFFSET = 0x100000
LEGACY_SIZE = 0x10000


def _stream(layout: list[tuple[str, torch.Tensor, torch.dtype, str, list[int], int, int]], ss_prefix: bytes,
            out: BinaryIO | None) -> tuple[str, str]:
    """Write the data section to ``out`` (if given) and return kohya's two hashes.

    ``ss_prefix`` is the 8-byte length and header of the file as kohya hashes it (ss_*
    metadata only); the legacy hash reads 64 KiB at 1 MiB of that virtual file."""
    sha = hashlib.sha256()
    start = LEGACY_OFFSET - len(ss_prefix)  # where the legacy window starts in the data section
    legacy = bytearray(ss_prefix[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_SIZE]) if start < 0 else bytearray()
    lo, hi = max(start, 0), start + LEGACY_SIZE
    for _name, t, dtype, _dt, _shape, begin, end in layout:
        data = _tensor_bytes(t, dtype)
        if out is not None:
            out.write(data)
        sha.update(data)
        if begin < hi and end > lo:
            legacy += data[max(lo, begin) - begin : min(hi, end) - begin]
    return sha.hexdigest(), hashlib.sha256(legacy).hexdigest()[:8]


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> memoryview:
    if t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


# --- checking a written file -------------------------------------------------------------


def data_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a safetensors file's data section: what ``sshs_model_hash`` should be."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a whole file (for reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
