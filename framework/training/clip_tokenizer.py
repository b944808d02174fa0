"""The CLIP ViT-L/14 tokenizer of SD 1.x, built from the BPE merges shipped with charfw.

Single-file checkpoints do not contain a tokenizer. Its vocabulary is fully determined by
OpenAI CLIP's byte-pair merges (``model_configs/sd15/tokenizer/bpe_simple_vocab_16e6.txt.gz``):
the 256 byte symbols, the same with the end-of-word mark, the first 48 894 merges, and the
two special tokens: 49 408 entries, exactly the ``vocab.json`` of the Hugging Face
tokenizer. :func:`clip_tokenizer_files` writes ``vocab.json`` and ``merges.txt`` once into
a cache folder so that loading needs no network.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from charfw.build import atomic

MERGES_GZ = Path(__file__).parent / "model_configs" / "sd15" / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
#: merges used: the vocabulary size less the byte symbols (x2) and the two special tokens
N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte value, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order = list(printable)
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(MERGES_GZ.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + N_MERGES]  # the first line is a version comment
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer_files(cache_dir: Path) -> Path:
    """A folder with ``vocab.json`` and ``merges.txt`` (written once)."""
    folder = cache_dir / "models" / "clip-vit-large-patch14-tokenizer"
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        vocab, merges = clip_vocab_and_merges()
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
        atomic.write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
    return folder
