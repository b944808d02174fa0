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
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ..build.atomic import atomic_path
from ..errors import CharfwError

if TYPE_CHECKING:
    import torch

# --- dtypes ------------------------------------------------------------------------------
#
# Files are read into numpy arrays (bf16 and fp8 through ml_dtypes' numpy types), so that
# reading, checking, scaling and writing a file needs no torch; :func:`to_torch` and
# :func:`to_numpy` convert without copying where the computing code needs torch. A dtype
# is named by its safetensors name ("F16", "BF16", "F32"...) wherever torch is not needed.

_NUMPY_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                 "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "F32": "float32",
                 "F64": "float64"}
#: the dtypes numpy has only through ml_dtypes (imported when a file holds one)
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_TORCH_DTYPES = {**_NUMPY_DTYPES, **_ML_DTYPES}
_BY_NUMPY_NAME = {v: k for k, v in _TORCH_DTYPES.items()}
_BY_TORCH_NAME = {f"torch.{v}": k for k, v in _TORCH_DTYPES.items()}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
#: safetensors lays tensors out by this order, descending, then by name (Rust ``Dtype`` order)
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}

#: the names ``--precision`` and manifests use for output dtypes
PRECISIONS: dict[str, str] = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "float": "F32"}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype name (bf16/fp8: ml_dtypes' types)."""
    if name in _NUMPY_DTYPES:
        return np.dtype(_NUMPY_DTYPES[name])
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))


def dtype_name(t: Any) -> str:
    """The safetensors name ("F16", "BF16"...) of a numpy array's or torch tensor's dtype."""
    name = _BY_NUMPY_NAME.get(t.dtype.name) if isinstance(t, np.ndarray) else _BY_TORCH_NAME.get(str(t.dtype))
    if name is None:
        raise CharfwError(f"dtype {t.dtype} cannot be stored in safetensors")
    return name


def is_float(t: Any) -> bool:
    return dtype_name(t) in FLOAT_DTYPES


def to_numpy(t: Any) -> np.ndarray:
    """A numpy view of a (CPU) torch tensor; numpy arrays pass through."""
    if isinstance(t, np.ndarray):
        return t
    import torch

    t = t.detach().cpu()
    name = dtype_name(t)
    if name in _ML_DTYPES:  # numpy sees these through ml_dtypes: reinterpret the bits
        bits = torch.int16 if t.element_size() == 2 else torch.uint8
        return t.contiguous().view(bits).numpy().view(numpy_dtype(name))
    return t.numpy()


def to_torch(a: Any) -> torch.Tensor:
    """A torch view of a numpy array (no copy); torch tensors pass through."""
    import torch

    if isinstance(a, torch.Tensor):
        return a
    name = dtype_name(a)
    if name in _ML_DTYPES:
        bits = np.int16 if a.itemsize == 2 else np.uint8
        return torch.from_numpy(np.ascontiguousarray(a).view(bits)).view(getattr(torch, _TORCH_DTYPES[name]))
    return torch.from_numpy(a)


def parse_precision(value: str | None) -> str | None:
    """``fp16``/``bf16``/``fp32`` (or a safetensors name, or a torch dtype) → a safetensors
    dtype name ("F16"...); None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):  # a torch dtype
        return _BY_TORCH_NAME[str(value)]
    if value in FLOAT_DTYPES:
        return value
    try:
        return PRECISIONS[value.lower()]
    except KeyError:
        raise CharfwError(f"unknown precision '{value}'; use fp16, bf16 or fp32") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (imports torch)."""
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


def precision_name(name: str) -> str:
    """A safetensors dtype name as ``--precision`` spells it (fp16, bf16, fp32)."""
    return {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(name, name.lower())


# --- float conversions and checks (numpy, rounding as torch does) ------------------------

#: elements per step of the bit checks: the temporaries stay in the CPU cache
_CHUNK = 1 << 16


# numpy's own fp16 casts take a slow path, element by element, for fp16 subnormals (below
# 2^-14 ≈ 6e-5), and a LoRA's small factors hold many: these two do the same conversion,
# bit for bit, in a few vectorised passes over cache-sized steps (5 to 10 times faster there).

_STEP = 1 << 16


def _f16_to_f32(a: np.ndarray) -> np.ndarray:
    """fp16 → fp32, exactly. The bits shifted into place with the exponent rebiased are the
    value for normal numbers; for a subnormal m·2^-24 they read 2^-15 + m·2^-25, which one
    exact float step (2x − 2^-14) turns into the value, without touching a denormal."""
    src = np.ascontiguousarray(a).reshape(-1).view(np.uint16)
    out = np.empty(src.size, np.float32)
    bits = out.view(np.uint32)
    n = min(_STEP, src.size)
    m, t, mask = np.empty(n, np.uint32), np.empty(n, np.float32), np.empty(n, bool)
    for i in range(0, src.size, _STEP):
        k = min(_STEP, src.size - i)
        h, b, mm, tt, sm = src[i : i + k], bits[i : i + k], m[:k], t[:k], mask[:k]
        np.bitwise_and(h, 0x7FFF, out=mm, casting="unsafe")
        np.left_shift(mm, 13, out=b)
        np.add(b, np.uint32(0x38000000), out=b)  # exponent bias 15 → 127
        np.less(mm, 0x400, out=sm)
        if sm.any():  # zero or subnormal
            f = b.view(np.float32)
            np.subtract(f, np.float32(2.0**-14), out=tt)
            np.multiply(tt, sm, out=tt)
            np.add(f, tt, out=f)
        np.greater_equal(mm, 0x7C00, out=sm)
        if sm.any():  # Inf and NaN: every exponent bit set
            np.add(b, np.uint32(0x38000000), out=b, where=sm)
        np.bitwise_and(h, 0x8000, out=mm, casting="unsafe")
        np.left_shift(mm, 16, out=mm)
        np.bitwise_or(b, mm, out=b)
    return out.reshape(a.shape)


def _f32_to_f16(x: np.ndarray) -> np.ndarray:
    """fp32 → fp16, rounded to nearest even as torch rounds. numpy's cast for results that
    are normal fp16 numbers; results below 2^-14 by one fp32 addition (0.5 + |x| has a
    unit in the last place of 2^-24, so the sum is |x| rounded to fp16's subnormal step)."""
    src = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(src.size, np.float16)
    bits = out.view(np.uint16)
    n = min(_STEP, src.size)
    a, z, u, mask = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.uint32), np.empty(n, bool)
    with np.errstate(over="ignore"):  # beyond fp16's range: ±Inf, as torch
        for i in range(0, src.size, _STEP):
            k = min(_STEP, src.size - i)
            f, o, ob, aa, zz, uu, sm = src[i : i + k], out[i : i + k], bits[i : i + k], a[:k], z[:k], u[:k], mask[:k]
            np.abs(f, out=aa)
            np.less(aa, np.float32(2.0**-14), out=sm)  # False for NaN
            if not sm.any():
                np.copyto(o, f, casting="same_kind")
                continue
            np.copyto(zz, f)
            np.copyto(zz, np.float32(0), where=sm)  # the small ones as 0 for numpy's cast
            np.copyto(o, zz, casting="same_kind")
            np.add(aa, np.float32(0.5), out=aa)
            np.subtract(aa.view(np.uint32), np.uint32(0x3F000000), out=uu)
            np.bitwise_or(uu, np.right_shift(f.view(np.uint32), 16) & np.uint32(0x8000), out=uu)
            np.copyto(ob, uu, where=sm, casting="unsafe")
    return out.reshape(x.shape)


def as_float32(a: np.ndarray) -> np.ndarray:
    """A float array in fp32 (exact)."""
    name = dtype_name(a)
    if name == "F32":
        return a
    if name == "F16":
        return _f16_to_f32(a)
    if name == "BF16":  # the top half of an fp32 (ml_dtypes' own cast is slower)
        return (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def cast(a: np.ndarray, name: str) -> np.ndarray:
    """A float array in the float dtype ``name``, rounded to nearest even as torch does."""
    have = dtype_name(a)
    if have == name:
        return a
    if name == "F32":
        return as_float32(a)
    if name == "F16" and have in ("F32", "BF16"):
        return _f32_to_f16(as_float32(a))
    with np.errstate(over="ignore"):  # beyond the format's range: ±Inf, as torch
        return a.astype(numpy_dtype(name))


def scaled(a: Any, ratio: float) -> np.ndarray:
    """``a × ratio`` computed in fp32 and stored back in ``a``'s dtype (as torch's
    ``(t.float() * ratio).to(t.dtype)``)."""
    a = to_numpy(a)
    return cast(as_float32(a) * np.float32(ratio), dtype_name(a))


#: float dtype → (unsigned view, the exponent bits): a value is Inf or NaN when all are set
_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000), "F8_E5M2": (np.uint8, 0x7C)}


def nonfinite(t: Any) -> str | None:
    """"NaN" or "Inf" when a float array holds one, else None: one pass over the bits
    (|x|'s bits ≥ the exponent mask), in cache-sized steps."""
    a = to_numpy(t)
    name = dtype_name(a)
    if name not in FLOAT_DTYPES or a.size == 0:
        return None
    if name not in _EXPONENT:  # F8_E4M3 has NaN and no Inf
        return "NaN" if bool(np.isnan(a.astype(np.float32)).any()) else None
    view, mask = _EXPONENT[name]
    bits = np.ascontiguousarray(a).reshape(-1).view(view)
    magnitude = view(np.iinfo(view).max >> 1)  # every bit but the sign
    found = False
    for i in range(0, bits.size, _CHUNK):
        if (bits[i : i + _CHUNK] & magnitude).max() >= mask:
            found = True
            break
    if not found:
        return None
    return "NaN" if bool(np.isnan(as_float32(a) if name != "F64" else a).any()) else "Inf"


def check_finite(tensors: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> None:
    """Raise a one-line :class:`CharfwError` naming the module and tensor that holds NaN or
    Inf (``module NAME: lora_up.weight holds NaN values``)."""
    for key, t in tensors.items():
        bad = nonfinite(t)
        if bad is None:
            continue
        parts = key.split(".")
        n = 2 if len(parts) > 2 and parts[-1] == "weight" else 1
        what = f"module {'.'.join(parts[:-n])}: {'.'.join(parts[-n:])}" if len(parts) > 1 else f"tensor {key}"
        raise CharfwError(f"{what} holds {bad} values", path=path,
                          hint="the training diverged or the file is damaged; use an earlier epoch")


# --- reading -----------------------------------------------------------------------------

MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | os.PathLike[str], *, finite: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str], Any]:
    """Tensors (numpy arrays viewing the file's memory map, in header order), metadata and
    the map they view.

    Validates the header against the file size first, so a truncated download is a clear
    error instead of a crash deep in a reader; with ``finite`` (the default) a float tensor
    holding NaN or Inf is a one-line error naming it (:func:`check_finite`)."""
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
    tensors: dict[str, np.ndarray] = {}
    buffer: Any = None
    if size > data_start:
        with open(path, "rb") as fh:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    for key, info in header.items():
        name = str(info.get("dtype"))
        if name not in _TORCH_DTYPES:
            raise CharfwError(f"tensor '{key}': unsupported dtype {info.get('dtype')}", path=path)
        dtype = numpy_dtype(name)
        shape = [int(s) for s in info.get("shape", [])]
        begin, end = (int(x) for x in info["data_offsets"])
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or begin < 0:
            raise CharfwError(f"tensor '{key}': its offsets do not match its shape {shape}", path=path)
        if count == 0:
            tensors[key] = np.empty(shape, dtype=dtype)
            continue
        offset = data_start + begin
        if offset % dtype.itemsize:
            a = np.frombuffer(bytearray(buffer[offset : offset + count * dtype.itemsize]), dtype=dtype)
        else:
            a = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        tensors[key] = a.reshape(shape)
    if finite:
        check_finite(tensors, path)
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


def write_safetensors(dest: str | os.PathLike[str], tensors: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None, *, dtype: Any = None,
                      hashes: bool = True) -> SavedFile:
    """Write ``tensors`` (numpy arrays or CPU torch tensors) as a safetensors file,
    atomically and fsynced.

    Floating tensors are cast to ``dtype`` (fp16/bf16/fp32, a safetensors name or a torch
    dtype; None keeps each one's own), rounded as torch rounds. Metadata values are stored
    as strings. With ``hashes`` (the default), kohya's ``sshs_model_hash``/``sshs_legacy_hash``
    are computed in the same pass and written into the header, replacing stale ones. Readers
    (kohya, A1111, ComfyUI, diffusers, the ``safetensors`` package) see exactly what
    ``safetensors.torch.save_file`` would write."""
    dest = Path(dest)
    meta = _clean_metadata(metadata)
    layout = _layout(tensors, parse_precision(dtype))
    entries = [(r[0], r[2], r[3], r[4], r[5]) for r in layout]
    if hashes:
        meta["sshs_model_hash"] = "0" * 64
        meta["sshs_legacy_hash"] = "0" * 8
    header = _header_bytes(entries, meta)
    ss_prefix = _ss_prefix(layout, meta)
    with atomic_path(dest, fsync=True) as tmp:
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


def sshs_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
                dtype: Any = None) -> tuple[str, str]:
    """kohya's ``(sshs_model_hash, sshs_legacy_hash)`` of ``tensors`` saved with ``metadata``
    (floats cast to ``dtype`` first), without writing anything."""
    layout = _layout(tensors, parse_precision(dtype))
    return _stream(layout, _ss_prefix(layout, _clean_metadata(metadata)), None)


def _clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}


#: a tensor as it is laid out: (key, array, dtype name, shape, begin, end)
_Row = tuple[str, np.ndarray, str, list[int], int, int]


def _layout(tensors: Mapping[str, Any], dtype: str | None) -> list[_Row]:
    """Tensors in safetensors' order (dtype descending, then name) with their offsets."""
    rows = []
    for name, t in tensors.items():
        if not hasattr(t, "dtype") or not hasattr(t, "shape"):
            raise TypeError(f"{name} is not a tensor")
        a = to_numpy(t)
        have = dtype_name(a)
        dt = dtype if (dtype is not None and have in FLOAT_DTYPES) else have
        rows.append((name, a, dt))
    rows.sort(key=lambda r: (-_DTYPE_RANK[r[2]], r[0]))
    out = []
    pos = 0
    for name, a, dt in rows:
        nbytes = a.size * numpy_dtype(dt).itemsize
        out.append((name, a, dt, list(a.shape), pos, pos + nbytes))
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


def _ss_prefix(layout: list[_Row], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and header of the file as kohya hashes it (``ss_*`` metadata only)."""
    entries = [(r[0], r[2], r[3], r[4], r[5]) for r in layout]
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    header = _header_bytes(entries, ss)
    return len(header).to_bytes(8, "little") + header


LEGACY_OFFSET = 0x100000
LEGACY_SIZE = 0x10000


def _stream(layout: list[_Row], ss_prefix: bytes, out: BinaryIO | None) -> tuple[str, str]:
    """Write the data section to ``out`` (if given) and return kohya's two hashes.

    ``ss_prefix`` is the 8-byte length and header of the file as kohya hashes it (ss_*
    metadata only); the legacy hash reads 64 KiB at 1 MiB of that virtual file."""
    sha = hashlib.sha256()
    start = LEGACY_OFFSET - len(ss_prefix)  # where the legacy window starts in the data section
    legacy = bytearray(ss_prefix[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_SIZE]) if start < 0 else bytearray()
    lo, hi = max(start, 0), start + LEGACY_SIZE
    for _name, a, dt, _shape, begin, end in layout:
        data = _tensor_bytes(a, dt)
        if out is not None:
            out.write(data)
        sha.update(data)
        if begin < hi and end > lo:
            legacy += data[max(lo, begin) - begin : min(hi, end) - begin]
    return sha.hexdigest(), hashlib.sha256(legacy).hexdigest()[:8]


def _tensor_bytes(a: np.ndarray, dt: str) -> memoryview:
    a = np.ascontiguousarray(cast(a, dt)).reshape(-1)
    if a.size == 0:
        return memoryview(b"")
    return memoryview(a.view(np.uint8)).cast("B")


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

