"""Images per second of charfw's image-preparation plumbing next to the naive single-image loop.

Three measurements, each on the same decoded images, in the same run:

* **hashing** — naive: ``imagehash.phash(image)`` per image; charfw:
  ``near_duplicates.phashes(batch)`` (box-reduced resize in threads, one DCT per batch).
* **tagger preprocessing** — naive: SmilingWolf's ``prepare_image`` (every image made
  RGBA and composited on white, padded, bicubic, float32, BGR) and one ``run`` per image;
  charfw: ``WD14Model.tag(batch)`` (no-op steps skipped, one preallocated batch, threads,
  one ``run`` per batch). Both run the v3 stand-in tagger, whose own time is tiny.
* **background removal pre/post-processing** — naive: ``rembg.remove(image, session=s)``
  per image; charfw: ``Segmenter.cutouts(batch)``. The model is excluded from both: the
  session's ``run`` is replaced by one that returns a fixed mask of the right shape, so
  what is timed is resizing, normalising, mask handling and the cut-out.
* **near-duplicate search** — ``group_labels`` over all pairs of 10,000 pHashes at
  distance 8 (ten planted copies): target under a second (the test checks only the groups).

The machine is shared, so every measurement is repeated, naive and batched runs taking
turns so that both see the same load; the best and the median of the repeats are reported, with the speed-up of the best over the best and of the median over
the median. Usage::

    python benchmarks/prep_throughput.py [--images 24] [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# rembg imports pymatting, whose numba kernels compile for about a minute in a fresh
# environment; alpha matting is not measured here, so skip the compilation
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

import numpy as np
from PIL import Image, ImageDraw

# the tiny stand-in models and the reference WD14 preprocessing live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_prep_models import official_prepare

CPU = ["CPUExecutionProvider"]


def test_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Illustration-like images: a third portrait RGB, a third RGBA with a transparent
    background, a third landscape RGB; flat colours and soft shapes, like line art."""
    rng = np.random.default_rng(seed)
    sizes = [((1024, 1536), "RGB"), ((800, 1200), "RGBA"), ((1200, 900), "RGB")]
    out = []
    for i in range(n):
        (w, h), mode = sizes[i % 3]
        bg = (255, 255, 255, 0) if mode == "RGBA" else (255, 255, 255)
        im = Image.new(mode, (w, h), bg)
        draw = ImageDraw.Draw(im)
        for _ in range(10):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(40, 300))
            color = tuple(int(c) for c in rng.integers(0, 255, 3)) + ((255,) if mode == "RGBA" else ())
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        out.append(im)
    return out


def measure(naive: Callable[[], object], batched: Callable[[], object], n_images: int,
            repeats: int) -> dict[str, list[float]]:
    """Images per second of each repeat of both, alternating, so that both see the same
    load on a shared machine."""
    rates: dict[str, list[float]] = {"naive": [], "charfw": []}
    for _ in range(repeats):
        for name, fn in (("naive", naive), ("charfw", batched)):
            t = time.perf_counter()
            fn()
            rates[name].append(n_images / (time.perf_counter() - t))
    return rates


# --- the naive loops -----------------------------------------------------------------------


def naive_hashes(images: list[Image.Image]) -> list[object]:
    import imagehash

    return [imagehash.phash(im) for im in images]


def naive_wd14(images: list[Image.Image], session: object, size: int) -> list[np.ndarray]:
    """SmilingWolf's wd-tagger app: prepare_image, then one run per image."""
    input_name = session.get_inputs()[0].name
    return [session.run(None, {input_name: np.expand_dims(official_prepare(image, size), 0)})[0]
            for image in images]


class FixedMask:
    """Stands in for an onnxruntime session: a fixed soft mask, for any batch size."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        inp = inner.get_inputs()[0]
        side = inp.shape[2]
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
        self.mask = (1.0 / (1.0 + np.exp(40 * (np.hypot(xx, yy) - 0.3))))[None, None]

    def get_inputs(self):
        return self.inner.get_inputs()

    def get_providers(self):
        return self.inner.get_providers()

    def run(self, names, feeds):
        n = next(iter(feeds.values())).shape[0]
        return [np.repeat(self.mask, n, axis=0)]


def many_hashes(n: int = 10_000) -> np.ndarray:
    """``n`` random 64-bit hashes, ten of them three bits from hash 0 (at 5000..5009)."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    hashes[5000:5010] = hashes[0] ^ np.uint64(0b111)
    return hashes


def pair_search_seconds(repeats: int) -> list[float]:
    """Seconds of each repeat of ``group_labels`` on all pairs of 10,000 hashes."""
    from charfw.prep.dedup import group_labels

    hashes = many_hashes()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        labels = group_labels(hashes, 8)
        times.append(time.perf_counter() - t)
    assert len(np.unique(labels)) == len(hashes) - 10  # the ten copies grouped with hash 0
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args(argv)

    import rembg
    from tiny_prep_models import build_mask_model, build_wd14_tagger

    from charfw.prep.dedup import phashes
    from charfw.prep.rembg import Segmenter
    from charfw.prep.wd14 import Thresholds, WD14Model

    images = test_images(args.images)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_wd14_tagger(root / "wd14", version="v3")
        os.environ["U2NET_HOME"] = str(root / "u2net")
        build_mask_model(root / "u2net" / "isnet-anime.onnx", size=1024)

        results["hashing"] = measure(lambda: naive_hashes(images), lambda: phashes(images), len(images),
                                     args.repeats)

        model = WD14Model(root / "wd14", providers=CPU)
        results["tagger preprocessing"] = measure(lambda: naive_wd14(images, model.session, model.size),
                                                  lambda: model.tag(images, Thresholds()), len(images),
                                                  args.repeats)

        seg = Segmenter("isnet-anime", providers=CPU)
        seg.session.inner_session = FixedMask(seg.session.inner_session)  # no model time
        session = seg.session
        results["background pre/post-processing"] = measure(
            lambda: [rembg.remove(im, session=session) for im in images], lambda: seg.cutouts(images),
            len(images), args.repeats)

    pairs = pair_search_seconds(args.repeats)
    summary = {}
    for name, r in results.items():
        best = {k: max(v) for k, v in r.items()}
        typical = {k: statistics.median(v) for k, v in r.items()}
        summary[name] = {"naive_best": best["naive"], "naive_median": typical["naive"],
                         "charfw_best": best["charfw"], "charfw_median": typical["charfw"],
                         "speedup_best": best["charfw"] / best["naive"],
                         "speedup_median": typical["charfw"] / typical["naive"]}
    if args.json:
        print(json.dumps({"images": args.images, "repeats": args.repeats, "cpus": os.cpu_count(),
                          "results": summary, "pair_search_10000_s": {"best": min(pairs),
                                                                     "median": statistics.median(pairs)}},
                         indent=1))
    else:
        print(f"{args.images} images (1024x1536 RGB, 800x1200 RGBA, 1200x900 RGB), {args.repeats} repeats, "
              f"{os.cpu_count()} CPUs; images/s, best / median")
        print(f"{'':32} {'naive loop':>17} {'charfw batched':>17} {'speed-up':>15}")
        for name, s in summary.items():
            print(f"{name:32} {s['naive_best']:7.1f} / {s['naive_median']:7.1f} "
                  f"{s['charfw_best']:7.1f} / {s['charfw_median']:7.1f} "
                  f"{s['speedup_best']:6.2f}x / {s['speedup_median']:5.2f}x")
        print(f"near-duplicate search, all pairs of 10,000 hashes: best {min(pairs):.3f} s, "
              f"median {statistics.median(pairs):.3f} s (target: under 1 s)")
    slow = [n for n, s in summary.items() if s["speedup_median"] < 2.0]
    if slow:
        print(f"below 2x (median): {', '.join(slow)}", file=sys.stderr)
    if min(pairs) >= 1.0:
        print(f"near-duplicate search over 1 s: {min(pairs):.2f} s", file=sys.stderr)
    return 1 if slow or min(pairs) >= 1.0 else 0


if __name__ == "__main__":
    sys.exit(main())
