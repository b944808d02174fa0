"""The WD14 tagger (SmilingWolf's v2 and v3 ONNX models): files, preprocessing, scores to tags.

What the models expect, and why each step is here (see SmilingWolf's wd-tagger app,
which every faithful implementation follows):

1. RGBA is put on **white**, then the image is **padded to a square with white**,
   centred, and resized to the model's side with **PIL bicubic**. The side and the input
   name are read from the session, never hard-coded (v2 says ``input_1:0``, v3 ``input``).
2. The array stays in **0–255** float32 (the graph rescales by itself) and is fed as
   **BGR**, NHWC. Feeding RGB, 0–1 values or black padding gives confidently wrong tags.
3. The outputs are already probabilities: no second sigmoid.
4. ``selected_tags.csv`` rows are the output columns in order; category 9 is rating,
   0 general, 4 character. General tags pass at 0.35 and characters at 0.85 (strictly
   greater), or at the MCut threshold (the midpoint of the largest gap between sorted
   scores; characters at least 0.15).

Speed: each image is resized before it is padded and put on white (so no full-size
canvas is composited or resampled; the pixels differ from the official order only where
the picture meets the padding), is written straight into one preallocated batch array
(the BGR swap and the float conversion happen in that copy), and the per-image PIL work
runs in a few threads (Pillow releases the GIL while resizing). Models with a dynamic batch (v3, swinv2 v2) get one ``run`` per batch; those
fixed at 1 (most v2 exports) get one per image.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from charfw.errors import CharfwError
from charfw.prep.image_batches import for_each_index
from charfw.prep.onnx_runtime import batch_dimension, describe_signature, open_session

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_MODEL = "SmilingWolf/wd-vit-tagger-v3"

RATING, GENERAL, CHARACTER = 9, 0, 4


@dataclass(frozen=True)
class TagTable:
    """The rows of ``selected_tags.csv``: names and categories, in output order."""

    names: tuple[str, ...]
    categories: tuple[int, ...]


def read_tag_table(path: Path) -> TagTable:
    """Read ``selected_tags.csv``; a missing or malformed file is a one-line error."""
    if not path.is_file():
        raise CharfwError(
            f"{TAGS_FILE} is missing",
            path=path,
            hint=f"put the {TAGS_FILE} of the same Hugging Face repository next to {MODEL_FILE}",
        )
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise CharfwError(f"cannot read ({exc})", path=path) from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise CharfwError("not a WD14 tag list (the header must start tag_id,name,category)", path=path)
    names, cats = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            names.append(row[1])
            cats.append(int(row[2]))
        except (IndexError, ValueError):
            raise CharfwError(f"line {n} is not tag_id,name,category,count", path=path) from None
    if not names:
        raise CharfwError("the tag list is empty", path=path)
    return TagTable(tuple(names), tuple(cats))


# --- preprocessing -----------------------------------------------------------------------


def prepare_image(image: Image.Image, size: int) -> Image.Image:
    """RGB on white, fitted into a white ``size`` square, centred, bicubic.

    The official app pads the full-size image to a square and then resizes the square;
    here the image is resized first and pasted on a white ``size`` square, so no
    full-size canvas is made or resized, and transparency is put on white at the small
    size (Pillow resamples RGBA premultiplied). The result differs from the official
    one only in the one or two pixel columns where the picture meets the padding.
    """
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    nw, nh = max(1, round(w * size / side)), max(1, round(h * size / side))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if image.mode != "RGB":
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        image = canvas.convert("RGB")
    if (nw, nh) == (size, size):
        return image
    padded = Image.new("RGB", (size, size), (255, 255, 255))
    padded.paste(image, ((size - nw) // 2, (size - nh) // 2))
    return padded


def preprocess_batch(images: Sequence[Image.Image], size: int, *, workers: int | None = None,
                     out: np.ndarray | None = None) -> np.ndarray:
    """NHWC float32 BGR 0–255 for a batch of images, written into one array."""
    import numpy as np

    n = len(images)
    batch = out if out is not None and out.shape == (n, size, size, 3) else np.empty((n, size, size, 3), np.float32)

    def one(i: int) -> None:
        rgb = np.asarray(prepare_image(images[i], size))
        batch[i] = rgb[:, :, ::-1]  # RGB → BGR and uint8 → float32 in the same copy

    for_each_index(one, n, workers)
    return batch


# --- scores to tags ----------------------------------------------------------------------


def mcut_threshold(scores: np.ndarray) -> float:
    """Maximum Cut Thresholding (Largeron et al. 2012): the midpoint of the largest gap
    between neighbouring sorted scores."""
    import numpy as np

    if scores.size < 2:
        return 0.0
    ordered = np.sort(scores)[::-1]
    gaps = ordered[:-1] - ordered[1:]
    t = int(np.argmax(gaps))
    return float((ordered[t] + ordered[t + 1]) / 2)


@dataclass(frozen=True)
class Thresholds:
    general: float = 0.35
    character: float = 0.85
    general_mcut: bool = False
    character_mcut: bool = False
    #: "none", "top" (the most likely rating) or "all" (every rating with its score)
    ratings: str = "none"
    #: False leaves character tags out
    characters: bool = True


@dataclass(frozen=True)
class ScoredTag:
    name: str
    score: float
    category: int


def select_tags(scores: np.ndarray, table: TagTable, th: Thresholds) -> list[ScoredTag]:
    """The tags of one image's scores: ratings first (when asked), then characters and
    general tags, each by descending score. Names are Danbooru's (underscores)."""
    import numpy as np

    out: list[ScoredTag] = []
    cats = np.asarray(table.categories)
    if th.ratings != "none":
        idx = np.flatnonzero(cats == RATING)
        if idx.size:
            chosen = [idx[int(np.argmax(scores[idx]))]] if th.ratings == "top" else idx
            out += [ScoredTag(table.names[i], float(scores[i]), RATING) for i in chosen]
    groups = [(CHARACTER, th.character, th.character_mcut, 0.15)] if th.characters else []
    groups.append((GENERAL, th.general, th.general_mcut, 0.0))
    for category, threshold, use_mcut, floor in groups:
        idx = np.flatnonzero(cats == category)
        if not idx.size:
            continue
        s = scores[idx]
        limit = max(floor, mcut_threshold(s)) if use_mcut else threshold
        keep = idx[s > limit]
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        out += [ScoredTag(table.names[i], float(scores[i]), category) for i in keep]
    return out


# --- the model ---------------------------------------------------------------------------


class WD14Model:
    """A loaded WD14 model: its session, tag table, input side and batch limit."""

    def __init__(self, folder: Path, *, providers: Sequence[str], tags_file: Path | None = None) -> None:
        self.folder = folder
        self.table = read_tag_table(tags_file or folder / TAGS_FILE)
        self.session = open_session(folder / MODEL_FILE, providers=providers, purpose="WD14 tagger")
        self._check_signature()

    def _check_signature(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        problem = None
        shape = inputs[0].shape if inputs else []
        if len(inputs) != 1 or len(outputs) < 1:
            problem = "expected one image input and a score output"
        elif len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            problem = "expected an NHWC input [batch, side, side, 3]"
        elif "float" not in inputs[0].type:
            problem = f"expected a float input, not {inputs[0].type}"
        else:
            out_shape = outputs[0].shape
            k = out_shape[-1] if out_shape else None
            if len(out_shape) != 2:
                problem = "expected scores [batch, tags]"
            elif isinstance(k, int) and k != len(self.table.names):
                problem = (f"the model gives {k} scores but {TAGS_FILE} lists {len(self.table.names)} "
                           "tags (they come from different models)")
        if problem:
            raise CharfwError(
                f"not a WD14 tagger: {problem}; it has {describe_signature(self.session)}",
                path=self.folder / MODEL_FILE,
                hint="use a SmilingWolf wd-*-tagger model.onnx",
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.size: int = int(shape[1])
        #: None: any batch size; else the model's fixed batch (usually 1 for v2)
        self.fixed_batch = batch_dimension(self.session)

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """Run the model over an NHWC batch, splitting it for fixed-batch models."""
        import numpy as np

        step = self.fixed_batch or len(batch)
        parts = []
        for start in range(0, len(batch), max(1, step)):
            chunk = batch[start : start + step]
            parts.append(self.session.run([self.output_name], {self.input_name: chunk})[0])
        result = np.concatenate(parts, axis=0) if parts else np.zeros((0, len(self.table.names)), np.float32)
        if result.shape[-1] != len(self.table.names):
            raise CharfwError(
                f"the model gives {result.shape[-1]} scores but {TAGS_FILE} lists "
                f"{len(self.table.names)} tags (they come from different models)",
                path=self.folder / MODEL_FILE,
            )
        return result

    def tag(self, images: Sequence[Image.Image], th: Thresholds, *, workers: int | None = None) -> list[list[ScoredTag]]:
        batch = preprocess_batch(images, self.size, workers=workers)
        probs = self.scores(batch)
        return [select_tags(row, self.table, th) for row in probs]
