"""Tiny stand-ins for the image-preparation models, with the real signatures, built offline.

The real WD14 taggers, rembg segmenters and BLIP weigh hundreds of megabytes and cannot
be downloaded in tests or CI. These stand-ins have the real input and output names,
shapes and file layout, so the real loading and running code is exercised end to end;
their arithmetic is chosen so that the classic mistakes show up as wrong tags:

* **WD14 tagger** (``model.onnx`` + ``selected_tags.csv``): the graph rescales its input
  as the real ones do (``(x - 127.5) / 127.5``), averages each channel and maps the
  three means to tag scores through a sigmoid. ``red_hair`` follows the *third*
  channel, which is red only when the input is BGR, so feeding RGB tags a red image
  ``blue_hair``; feeding 0–1 values makes every channel look black, so no colour tag
  passes 0.35; padding with black instead of white sinks ``white_background``. Some tags
  have fixed scores just above and below the thresholds, and the CSV has a kaomoji, a
  name with parentheses and one with a backslash, laid out like the real file
  (4 ratings, then general, then character tags).
* **Mask model** for rembg (``u2net.onnx``, ``isnet-anime.onnx``, ...): ``input.1``
  ``[1,3,S,S]`` → ``[1,1,S,S]`` = ``sigmoid(8 - 2·Σc x)``: after rembg's min-max
  normalisation, white pixels are background and coloured ones foreground.
* **BLIP**: a 31k-parameter ``BlipForConditionalGeneration`` with a 12-word vocabulary
  whose greedy output is "girl girl ..." (built with torch and transformers).

Nothing here is imported by charfw at run time; ``onnx`` is only in the test extra.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

#: (name, category, weights on the (B, G, R) channel means, bias); category 9 rating,
#: 0 general, 4 character; weights None = fixed score sigmoid(bias)
WD14_TAGS: list[tuple[str, int, tuple[float, float, float] | None, float]] = [
    ("general", 9, None, math.log(0.8 / 0.2)),
    ("sensitive", 9, None, math.log(0.15 / 0.85)),
    ("questionable", 9, None, math.log(0.04 / 0.96)),
    ("explicit", 9, None, math.log(0.01 / 0.99)),
    ("red_hair", 0, (-1.5, -1.5, 3.0), -2.0),
    ("green_hair", 0, (-1.5, 3.0, -1.5), -2.0),
    ("blue_hair", 0, (3.0, -1.5, -1.5), -2.0),
    ("white_background", 0, (2.0, 2.0, 2.0), -2.0),
    ("solo", 0, None, math.log(0.36 / 0.64)),
    ("1girl", 0, None, math.log(0.34 / 0.66)),
    ("^_^", 0, None, math.log(0.9 / 0.1)),
    ("star_(symbol)", 0, None, math.log(0.8 / 0.2)),
    ("\\m/", 0, None, math.log(0.7 / 0.3)),
    ("from_side", 0, None, math.log(0.75 / 0.25)),
    ("large_breasts", 0, None, math.log(0.6 / 0.4)),
    ("cat_ears", 0, None, math.log(0.65 / 0.35)),
    ("hakurei_reimu", 4, (-3.0, -3.0, 6.0), -4.0),
    ("kirisame_marisa", 4, None, 0.0),
]


def _onnx() -> Any:
    import onnx  # the test extra

    return onnx


def write_selected_tags(path: Path, tags: list[tuple[str, int, Any, float]] = WD14_TAGS) -> Path:
    """A ``selected_tags.csv`` in the real layout (ratings count down from 9999999)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _w, _b) in enumerate(tags):
            tag_id = 9999999 - i if category == 9 else 100000 + i
            writer.writerow([tag_id, name, category, 1000 - i])
    return path


def build_wd14_tagger(folder: Path, *, version: str = "v3", size: int = 448,
                      tags: list[tuple[str, int, Any, float]] = WD14_TAGS,
                      write_csv: bool = True) -> Path:
    """``folder/model.onnx`` (+ ``selected_tags.csv``) with the v2 or v3 signature."""
    onnx = _onnx()
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if version == "v2":
        in_name, out_name, batch = "input_1:0", "predictions_sigmoid", 1
    elif version == "v3":
        in_name, out_name, batch = "input", "output", "batch_size"
    else:
        raise ValueError(f"version must be v2 or v3, not {version!r}")
    k = len(tags)
    weights = np.zeros((3, k), dtype=np.float32)
    bias = np.zeros((k,), dtype=np.float32)
    for j, (_name, _cat, w, b) in enumerate(tags):
        if w is not None:
            weights[:, j] = w
        bias[j] = b
    inits = [
        numpy_helper.from_array(np.array(127.5, dtype=np.float32), "half"),
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
    ]
    nodes = [
        helper.make_node("Sub", [in_name, "half"], ["centred"]),
        helper.make_node("Div", ["centred", "half"], ["scaled"]),  # the graph rescales itself
        helper.make_node("ReduceMean", ["scaled"], ["means"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["means", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [out_name]),
    ]
    graph = helper.make_graph(
        nodes, "wd14-standin",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, k])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    if write_csv:
        write_selected_tags(folder / "selected_tags.csv", tags)
    return folder / "model.onnx"


def build_mask_model(path: Path, *, size: int = 320, dynamic_batch: bool = False) -> Path:
    """A segmentation stand-in: ``input.1 [1,3,S,S]`` → ``[1,1,S,S]``, foreground = not white."""
    onnx = _onnx()
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    batch: Any = "batch" if dynamic_batch else 1
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "c_axis"),
        numpy_helper.from_array(np.array(-2.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(8.0, dtype=np.float32), "offset"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["input.1", "c_axis"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "scale"], ["m"]),
        helper.make_node("Add", ["m", "offset"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["d0"]),
    ]
    graph = helper.make_graph(
        nodes, "mask-standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("d0", TensorProto.FLOAT, [batch, 1, size, size])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_tiny_blip(folder: Path) -> Path:
    """A tiny ``BlipForConditionalGeneration`` + ``BlipProcessor`` saved in ``folder``."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:  # transformers 5 without torchvision; 4.x has only the PIL-based class
        from transformers import BlipImageProcessorPil as ImageProcessor  # type: ignore[attr-defined]
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "girl", "with", "red", "hair", "cat"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # the vocabulary path goes positionally: transformers 5 renamed the keyword
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]",
                              model_max_length=32)
    ids = {t: vocab.index(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 16},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "encoder_hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 32, "projection_dim": 16, "bos_token_id": ids["[DEC]"],
                     "sep_token_id": ids["[SEP]"], "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"]},
        projection_dim=16, image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # a deterministic, non-empty greedy caption
        model.text_decoder.cls.predictions.bias[vocab.index("girl")] += 50.0
    image_processor = ImageProcessor(size={"height": 32, "width": 32},
                                     image_mean=[0.48145466, 0.4578275, 0.40821073],
                                     image_std=[0.26862954, 0.26130258, 0.27577711])
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def official_prepare(image: Any, size: int) -> Any:
    """SmilingWolf's wd-tagger ``prepare_image``, step by step: the reference the tests
    and the benchmark compare charfw's batched preprocessing with."""
    import numpy as np
    from PIL import Image

    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image.convert("RGBA"))
    image = canvas.convert("RGB")
    side = max(image.size)
    padded = Image.new("RGB", (side, side), (255, 255, 255))
    padded.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        padded = padded.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(padded, dtype=np.float32)
    return arr[:, :, ::-1]
