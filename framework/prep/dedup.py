"""Near-duplicate images: perceptual hashes, all-pairs Hamming distances, groups, the copy to keep.

Images collected from the web come back resized, re-encoded and re-posted; a dataset
with ten copies of one picture teaches the LoRA that picture. The seed's dedup script
compared each new image with every kept one in a Python loop; here:

* **Hashing** is imagehash's pHash (grayscale, 32×32 LANCZOS, 2-D DCT, the top-left
  8×8 block with its DC term, each bit ``> median``), with one change by default: large
  images are box-reduced before the LANCZOS step (Pillow's ``reducing_gap=3``), which
  is several times faster and lands within a few bits of imagehash's value (resizing or
  re-encoding an image moves pHash by 0–2 bits; the thresholds are 6–10).
  ``exact=True`` calls ``imagehash.phash`` itself. RGBA is put on white first, so that
  transparent pixels hash as what they look like, not as the colour stored under them.
  The DCTs of a whole batch run as one array operation.
* **Comparing** packs each hash into a ``uint64`` and counts differing bits of
  ``H[i:i+256, None] ^ H[None, :]`` with ``np.bitwise_count``: all pairs of 10,000
  hashes in well under a second, where a Python double loop over ``ImageHash`` objects
  takes minutes. Identical hashes are collapsed first, so a folder of exact copies
  costs nothing extra.
* **Grouping** links every pair within the threshold (connected components), and the
  copy kept is the **largest** (pixels), then a **lossless** file (PNG) over a JPEG,
  then the larger file, then the first by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw.build.items import natural_key
from charfw.prep.image_batches import for_each_index

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

HASH_SIDE = 32
LOSSY_SUFFIXES = frozenset({".jpg", ".jpeg"})


def _on_white(image: Image.Image) -> Image.Image:
    from PIL import Image as PILImage

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image


def small_gray(image: Image.Image, *, exact: bool = False) -> np.ndarray:
    """The 32×32 grayscale array pHash is computed from.

    With transparency, the image is shrunk first (Pillow resamples RGBA premultiplied)
    and put on white at 32×32, instead of compositing every full-size pixel."""
    import numpy as np
    from PIL import Image as PILImage

    gap = None if exact else 3.0
    size = (HASH_SIDE, HASH_SIDE)
    if exact or image.mode not in ("RGBA", "LA", "PA", "P"):
        small = _on_white(image).convert("L").resize(size, PILImage.Resampling.LANCZOS, reducing_gap=gap)
    else:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        small = _on_white(rgba.resize(size, PILImage.Resampling.LANCZOS, reducing_gap=gap)).convert("L")
    return np.asarray(small, dtype=np.float64)


def phash_from_arrays(arrays: np.ndarray) -> np.ndarray:
    """uint64 pHashes of an (N, 32, 32) stack, bit order as imagehash's hex strings."""
    import numpy as np
    import scipy.fftpack

    if len(arrays) == 0:
        return np.zeros(0, np.uint64)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(arrays, axis=1), axis=2)[:, :8, :8].reshape(len(arrays), 64)
    bits = dct > np.median(dct, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def phashes(images: Sequence[Image.Image], *, exact: bool = False, workers: int | None = None) -> np.ndarray:
    """uint64 pHashes of images (threads for the PIL work, one DCT for the batch)."""
    import numpy as np

    if exact:
        import imagehash

        return np.array([int(str(imagehash.phash(_on_white(im))), 16) for im in images], dtype=np.uint64)
    stack = np.empty((len(images), HASH_SIDE, HASH_SIDE), np.float64)

    def one(i: int) -> None:
        stack[i] = small_gray(images[i])

    for_each_index(one, len(images), workers)
    return phash_from_arrays(stack)


def flipped(images: Sequence[Image.Image], *, exact: bool = False) -> np.ndarray:
    """pHashes of the mirror images (to find mirrored re-posts)."""
    from PIL import Image as PILImage

    return phashes([im.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT) for im in images], exact=exact)


def to_hex(h: int) -> str:
    """imagehash's string form (``imagehash.hex_to_hash`` reads it back)."""
    return f"{int(h):016x}"


# --- all pairs ---------------------------------------------------------------------------


def close_pairs(hashes: np.ndarray, threshold: int, *, mirrors: np.ndarray | None = None,
                chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every pair i < j within ``threshold`` bits.

    With ``mirrors``, the distance of a pair is the smaller of the direct one and the one
    to the other image's mirror."""
    import numpy as np

    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    rows, cols, dists = [], [], []
    col_index = np.arange(n)
    for start in range(0, n, chunk):
        block = h[start : start + chunk, None]
        d = np.bitwise_count(block ^ h[None, :])
        if mirrors is not None:
            np.minimum(d, np.bitwise_count(block ^ mirrors[None, :]), out=d)
        hit = (d <= threshold) & (col_index[None, :] > np.arange(start, start + len(block))[:, None])
        r, c = np.nonzero(hit)
        rows.append(r + start)
        cols.append(c)
        dists.append(d[r, c])
    if not rows:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty.astype(np.uint8)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists).astype(np.uint8)


def group_labels(hashes: np.ndarray, threshold: int, *, mirrors: np.ndarray | None = None) -> np.ndarray:
    """A group label per hash: connected components of "within ``threshold`` bits"."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h = np.asarray(hashes, dtype=np.uint64)
    if len(h) == 0:
        return np.zeros(0, np.int64)
    if mirrors is None:
        unique, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        m = None
    else:  # collapse on (hash, mirror) so each node keeps its own mirror hash
        pairs = np.stack([h, np.asarray(mirrors, np.uint64)], axis=1)
        _, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
        unique, m = h[first], np.asarray(mirrors, np.uint64)[first]
    inverse = inverse.ravel()
    i, j, _ = close_pairs(unique, threshold, mirrors=m)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(unique), len(unique)))
    _, labels = connected_components(graph, directed=False)
    return labels[inverse]


# --- choosing the copy to keep -----------------------------------------------------------


@dataclass
class Candidate:
    """One image as the grouping sees it."""

    key: str
    path: Path
    width: int
    height: int
    hash: int
    #: images only compared within the same partition (for example one angle code)
    partition: str = ""
    mirror: int | None = None


def keep_rank(c: Candidate) -> tuple[Any, ...]:
    """Sort key: the best copy first (largest, lossless, larger file, first by name)."""

    try:
        size = c.path.stat().st_size
    except OSError:
        size = 0
    return (-(c.width * c.height), c.path.suffix.lower() in LOSSY_SUFFIXES, -size, natural_key(c.path.name))


@dataclass
class DuplicateGroup:
    kept: Candidate
    dropped: list[tuple[Candidate, int]] = field(default_factory=list)


def find_groups(candidates: Sequence[Candidate], threshold: int, *, mirrors: bool = False) -> list[DuplicateGroup]:
    """Groups of near-duplicates (two or more images), each with the copy to keep."""
    import numpy as np

    groups: list[DuplicateGroup] = []
    by_partition: dict[str, list[int]] = {}
    for n, c in enumerate(candidates):
        by_partition.setdefault(c.partition, []).append(n)
    for members in by_partition.values():
        hashes = np.array([candidates[n].hash for n in members], dtype=np.uint64)
        mirror = (np.array([candidates[n].mirror or 0 for n in members], dtype=np.uint64) if mirrors else None)
        labels = group_labels(hashes, threshold, mirrors=mirror)
        for label in np.unique(labels):
            idx = [members[k] for k in np.flatnonzero(labels == label)]
            if len(idx) < 2:
                continue
            ranked = sorted((candidates[k] for k in idx), key=keep_rank)
            best = ranked[0]
            dropped = []
            for other in ranked[1:]:
                d = int(np.bitwise_count(np.uint64(best.hash) ^ np.uint64(other.hash)))
                if mirrors and other.mirror is not None:
                    d = min(d, int(np.bitwise_count(np.uint64(best.hash) ^ np.uint64(other.mirror))))
                dropped.append((other, d))
            groups.append(DuplicateGroup(best, dropped))
    groups.sort(key=lambda g: g.kept.key)
    return groups


def report_data(groups: Sequence[DuplicateGroup], total: int, threshold: int, root: Path | None = None) -> dict[str, Any]:
    """The JSON report: what was kept and dropped, with distances and hashes."""

    def show(c: Candidate) -> str:
        if root is not None:
            try:
                return c.path.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                pass
        return str(c.path)

    dropped = sum(len(g.dropped) for g in groups)
    return {
        "images": total,
        "kept": total - dropped,
        "dropped": dropped,
        "threshold": threshold,
        "groups": [
            {"kept": show(g.kept), "size": [g.kept.width, g.kept.height], "phash": to_hex(g.kept.hash),
             "duplicates": [{"path": show(c), "distance": d, "size": [c.width, c.height], "phash": to_hex(c.hash)}
                            for c, d in g.dropped]}
            for g in groups
        ],
    }
