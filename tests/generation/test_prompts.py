"""charfw.generation.prompts: A1111's emphasis, <lora:…> tags, chunks and weighted encoding,
prompt files. Encoding runs on the tiny SD 1.5 text encoder (its tokenizer has one token per
character, so a prompt's token count is easy to set)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from charfw.errors import CharfwError
from charfw.generation.prompt_files import PromptLine, read_prompt_file
from charfw.generation.prompts import (
    BREAK,
    LoraRef,
    diffusers_clip_skip,
    encode_pair,
    encode_prompt,
    extract_extra_networks,
    extract_loras,
    parse_attention,
    tokenize_prompt,
)

# --- emphasis ------------------------------------------------------------------------------

# A1111's own doctests of parse_prompt_attention (modules/prompt_parser.py), exact floats included
A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        # the first "(" is never closed: everything after it gets x1.1, so [on] is 1/1.1 * 1.1
        [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
         (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCTESTS)
def test_a1111_doctests(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("((a)", [("a", 1.1 * 1.1)]),  # the outer bracket stays open to the end
        ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
        ("(a:1.2:3)", [("a:1.2", 3.0)]),  # ":1.2" is text; ":3)" closes the bracket
        ("(a:)", [("a:", 1.1)]),
        ("(word: 1.5 )", [("word", 1.5)]),
        ("(a:-1)", [("a", -1.0)]),
        ("x:1.3) y", [("x:1.3) y", 1.0)]),  # closers without an opener are text
        ("a]b)c", [("a]b)c", 1.0)]),
        ("\\(a\\) \\[b\\] \\\\", [("(a) [b] \\", 1.0)]),
        ("(\\(a\\))", [("(a)", 1.1)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped, as in A1111
        ("(a)(b:1.1)", [("ab", 1.1)]),  # equal neighbours merge
        ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
        ("a, BREAK,b", [("a,", 1.0), (BREAK, -1.0), (",b", 1.0)]),
        ("BREAK", [("", 1.0), (BREAK, -1.0), ("", 1.0)]),
        ("aBREAK b break", [("aBREAK b break", 1.0)]),  # uppercase, a whole word
        ("(a BREAK b)", [("a", 1.1), (BREAK, -1.0), ("b", 1.1)]),  # charfw: still a break (see the docstring)
    ],
)
def test_emphasis_edge_cases(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_a_weight_that_is_not_a_number_names_the_prompt() -> None:
    with pytest.raises(CharfwError, match=r"'1\.\.2' .* is not a number") as info:
        parse_attention("a (b:1..2) c")
    assert "a (b:1..2) c" in str(info.value)


# --- extra networks ------------------------------------------------------------------------


def test_extra_network_tags_are_removed_from_the_text() -> None:
    text, nets = extract_extra_networks("krnk, <lora:krnk_face:0.8:lbw=FACE>smile, <hypernet:h:0.5> x")
    assert text == "krnk, smile,  x"
    assert [(n.kind, n.items, n.tag) for n in nets] == [
        ("lora", ("krnk_face", "0.8", "lbw=FACE"), "<lora:krnk_face:0.8:lbw=FACE>"),
        ("hypernet", ("h", "0.5"), "<hypernet:h:0.5>"),
    ]
    assert nets[0].positional == ("krnk_face", "0.8") and nets[0].named == {"lbw": "FACE"}
    assert extract_extra_networks("a <notatag> <lora:> b") == ("a <notatag> <lora:> b", [])


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("<lora:krnk>", LoraRef("krnk", 1.0, 1.0)),
        ("<lora:krnk:0.7>", LoraRef("krnk", 0.7, 0.7)),
        ("<lora:krnk:0.7:0.4>", LoraRef("krnk", 0.7, 0.4)),
        ("<lora:krnk:te=0.3:unet=0.2>", LoraRef("krnk", 0.3, 0.2)),
        ("<lora:krnk:0.8:unet=0.5>", LoraRef("krnk", 0.8, 0.5)),
        ("<lora:krnk:0.8:te=0.5>", LoraRef("krnk", 0.5, 0.5)),  # A1111: unet defaults to the final te
        ("<lora:krnk:1:lbw=MIDD>", LoraRef("krnk", 1.0, 1.0, "MIDD")),
        ("<lora:krnk:0.6:w=OUTD>", LoraRef("krnk", 0.6, 0.6, "OUTD")),
        ("<lora:krnk:1:lbw=1,0,0,0,0,1,1,1,1,1,1,1>", LoraRef("krnk", 1.0, 1.0, "1,0,0,0,0,1,1,1,1,1,1,1")),
        ("<lora:krnk:1:FACE>", LoraRef("krnk", 1.0, 1.0, "FACE")),  # the older positional block spec
        ("<lora:krnk:0.5:0.9:lbw=BODY>", LoraRef("krnk", 0.5, 0.9, "BODY")),
        ("<lora:my lora v2:1>", LoraRef("my lora v2", 1.0, 1.0)),
        ("<lyco:krnk:0.5>", LoraRef("krnk", 0.5, 0.5)),
    ],
)
def test_lora_tags(tag: str, expected: LoraRef) -> None:
    text, loras = extract_loras(f"1girl, {tag}, smile")
    assert text == "1girl, , smile"
    assert loras == [expected]
    assert extract_loras(expected.tag())[1] == [expected]  # the canonical tag reads back the same


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("<lora:krnk:abc>", "weight 'abc' is not a number"),
        ("<lora:krnk:1:nan>", "'nan' is not a number"),
        ("<lora:krnk:te=x>", "te 'x' is not a number"),
        ("<lora:krnk:1:foo=2>", "unknown key 'foo='"),
        ("<lora:krnk:1:dyn=8>", "unknown key 'dyn='"),
        ("<lora:krnk:1:1:8>", "too many items"),
        ("<lora:krnk:1:FACE:lbw=BODY>", "block weights are given twice"),
        ("<lora:krnk:1:lbw=1,R,0>", "value 2 \\('R'\\) is not a number"),
        ("<lora:krnk:1:lbw=>", "block weights are empty"),
        ("<lora:te=1>", "no LoRA name"),
        ("<hypernet:krnk:1>", "charfw applies only <lora:…> tags"),
    ],
)
def test_bad_lora_tags_are_errors_that_name_the_tag(tag: str, message: str) -> None:
    with pytest.raises(CharfwError, match=message) as info:
        extract_loras(f"a, {tag}")
    assert str(info.value).startswith(tag)


# --- chunks (the tokenizer only) -----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_sd15: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_sd15), subfolder="tokenizer")


def body(chunk: Any, tokenizer: Any) -> list[int]:
    """A chunk's tokens between its start token and the first end token."""
    tokens = list(chunk.tokens)
    assert tokens[0] == tokenizer.bos_token_id and len(tokens) == 77
    return tokens[1 : tokens.index(tokenizer.eos_token_id)]


def test_chunks_of_75_tokens_wrapped_and_padded_with_the_end_token(tokenizer: Any) -> None:
    a = tokenizer.convert_tokens_to_ids("a</w>")
    eos = tokenizer.eos_token_id
    chunks = tokenize_prompt(tokenizer, "a " * 80)
    assert len(chunks) == 2
    assert chunks[0].tokens == (tokenizer.bos_token_id, *[a] * 75, eos)
    assert chunks[1].tokens == (tokenizer.bos_token_id, *[a] * 5, *[eos] * 71)
    assert chunks[0].weights == (1.0,) * 77
    assert len(tokenize_prompt(tokenizer, "a " * 75)) == 1
    assert len(tokenize_prompt(tokenizer, "a " * 76)) == 2
    assert tokenize_prompt(tokenizer, "") == [tokenize_prompt(tokenizer, "   ")[0]]  # always one chunk
    assert body(tokenize_prompt(tokenizer, "")[0], tokenizer) == []


def test_weights_follow_the_tokens(tokenizer: Any) -> None:
    (chunk,) = tokenize_prompt(tokenizer, "ab (cd:1.5) [e]")
    # tiny tokenizer: one token per character; the spaces are not tokens
    assert chunk.weights[:7] == (1.0, 1.0, 1.0, 1.5, 1.5, pytest.approx(1 / 1.1), 1.0)
    (ignored,) = tokenize_prompt(tokenizer, "ab (cd:1.5)", emphasis="None")
    assert set(ignored.weights) == {1.0} and len(body(ignored, tokenizer)) > 4  # the brackets are text


def test_break_starts_a_new_chunk(tokenizer: Any) -> None:
    chunks = tokenize_prompt(tokenizer, "ab BREAK cd")
    assert len(chunks) == 2
    assert chunks[0] == tokenize_prompt(tokenizer, "ab")[0] and chunks[1] == tokenize_prompt(tokenizer, "cd")[0]
    assert len(tokenize_prompt(tokenizer, "ab BREAK")) == 1  # a trailing BREAK makes no empty chunk
    assert len(tokenize_prompt(tokenizer, "BREAK ab")) == 2  # a leading one does (A1111)
    assert len(tokenize_prompt(tokenizer, "a " * 75 + "BREAK b")) == 2  # a full chunk is not followed by an empty one
    assert len(tokenize_prompt(tokenizer, "a BREAK b BREAK c")) == 3


def test_comma_backtrack_moves_the_text_after_a_near_comma(tokenizer: Any) -> None:
    a, b = tokenizer.convert_tokens_to_ids("a</w>"), tokenizer.convert_tokens_to_ids("b</w>")
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    text = "a " * 69 + "a, " + "b " * 10  # 70 a, a comma at index 70, 10 b: 81 tokens
    first, second = tokenize_prompt(tokenizer, text)
    assert body(first, tokenizer) == [a] * 70 + [comma]  # the 4 b after the comma moved on
    assert body(second, tokenizer) == [b] * 10
    first, second = tokenize_prompt(tokenizer, text, comma_padding_backtrack=0)  # A1111's setting at 0: no move
    assert body(first, tokenizer) == [a] * 70 + [comma] + [b] * 4 and body(second, tokenizer) == [b] * 6
    far = "a " * 49 + "a, " + "b " * 30  # the comma is 25 tokens back from the end of the chunk: no move
    first, second = tokenize_prompt(tokenizer, far)
    assert len(body(first, tokenizer)) == 75 and body(second, tokenizer) == [b] * 6


def test_a_tokenizer_with_its_own_pad_token_pads_after_the_end_token(tokenizer: Any) -> None:
    sd2 = copy.deepcopy(tokenizer)
    sd2.pad_token = "!"  # SD 2.x's OpenCLIP pads with "!" (id 0 there)
    pad = sd2.pad_token_id
    (chunk,) = tokenize_prompt(sd2, "ab")
    assert chunk.tokens[:4] == (sd2.bos_token_id, *tokenizer("ab", add_special_tokens=False)["input_ids"],
                                sd2.eos_token_id)
    assert chunk.tokens[4:] == (pad,) * 73


# --- encoding (the tiny SD 1.5 text encoder) -----------------------------------------------


@pytest.fixture(scope="module")
def text_encoder(tiny_sd15: Path) -> Any:
    """The tiny text encoder with a final layer norm that looks trained: the untrained one
    gives every token vector a mean of 0, which A1111's mean restore would divide by."""
    import torch
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(str(tiny_sd15), subfolder="text_encoder").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm = model.final_layer_norm
        norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
        norm.bias.copy_(0.2 + 0.3 * torch.randn(norm.bias.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def pipe(tiny_sd15: Path, tokenizer: Any, text_encoder: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15), tokenizer=tokenizer, text_encoder=text_encoder,
                                                   safety_checker=None, requires_safety_checker=False)
    # diffusers 0.42's clip-skip path reads text_encoder.text_model, which transformers 5's
    # CLIPTextModel no longer has (its layers sit on the model itself): alias it, unregistered
    text_encoder.__dict__.setdefault("text_model", text_encoder)
    return pipe


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_a_plain_prompt_equals_diffusers_encode_prompt(pipe: Any, tokenizer: Any, text_encoder: Any,
                                                       clip_skip: int) -> None:
    import torch

    prompt = "a girl, smiling, school uniform"
    ours = encode_prompt(tokenizer, text_encoder, prompt, clip_skip=clip_skip)
    # diffusers counts clip skip from 0: charfw's (A1111's) 2 is diffusers' 1
    theirs, _ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False, clip_skip=diffusers_clip_skip(clip_skip))
    assert ours.shape == theirs.shape == (1, 77, 32)
    torch.testing.assert_close(ours, theirs)


def test_diffusers_clip_skip_counts_one_less() -> None:
    assert (diffusers_clip_skip(1), diffusers_clip_skip(2), diffusers_clip_skip(12)) == (None, 1, 11)
    with pytest.raises(CharfwError, match="counts from 1"):
        diffusers_clip_skip(0)


def test_the_trainer_conditions_short_captions_the_same_way(tokenizer: Any, text_encoder: Any) -> None:
    import torch

    from charfw.training.families.sd1 import SD1Family

    model = SimpleNamespace(tokenizers=[tokenizer], text_encoders=[text_encoder])
    family = SD1Family()
    with torch.no_grad():
        trainer = family.encode_text(model, family.tokenize(model, ["krnk, 1girl"], None), clip_skip=2)
        trainer = trainer["encoder_hidden_states"]
    torch.testing.assert_close(encode_prompt(tokenizer, text_encoder, "krnk, 1girl", clip_skip=2), trainer)


def test_weight_one_is_no_weight(tokenizer: Any, text_encoder: Any) -> None:
    import torch

    plain = encode_prompt(tokenizer, text_encoder, "a girl, smiling", clip_skip=2)
    for same in ("a girl, (smiling:1.0)", "(a girl, smiling:1)", "a girl, ([smiling])"):
        torch.testing.assert_close(encode_prompt(tokenizer, text_encoder, same, clip_skip=2), plain)


def test_emphasis_multiplies_the_token_and_keeps_the_chunk_mean(tokenizer: Any, text_encoder: Any) -> None:
    import torch

    plain = encode_prompt(tokenizer, text_encoder, "ab cd ef")[0]
    weighted = encode_prompt(tokenizer, text_encoder, "ab (cd:1.5) ef")[0]
    (chunk,) = tokenize_prompt(tokenizer, "ab (cd:1.5) ef")
    w = torch.tensor(chunk.weights).unsqueeze(-1)
    assert [i for i, x in enumerate(chunk.weights) if x != 1.0] == [3, 4]
    # A1111's Original: z *= w; z *= mean(z before) / mean(z after)
    expected = plain * w * (plain.mean() / (plain * w).mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    assert not torch.allclose(weighted[3], plain[3], atol=1e-3)
    no_norm = encode_prompt(tokenizer, text_encoder, "ab (cd:1.5) ef", emphasis="No norm")[0]
    torch.testing.assert_close(no_norm, plain * w)
    ignore = encode_prompt(tokenizer, text_encoder, "ab (cd:1.5) ef", emphasis="Ignore")[0]
    torch.testing.assert_close(ignore, plain)


def test_long_prompts_and_break_make_more_chunks(tokenizer: Any, text_encoder: Any) -> None:
    import torch

    assert encode_prompt(tokenizer, text_encoder, "a " * 80).shape == (1, 154, 32)
    assert encode_prompt(tokenizer, text_encoder, "a " * 151).shape == (1, 231, 32)
    broken = encode_prompt(tokenizer, text_encoder, "ab BREAK cd", clip_skip=2)
    assert broken.shape == (1, 154, 32)
    torch.testing.assert_close(broken[:, :77], encode_prompt(tokenizer, text_encoder, "ab", clip_skip=2))
    torch.testing.assert_close(broken[:, 77:], encode_prompt(tokenizer, text_encoder, "cd", clip_skip=2))


def test_prompt_and_negative_are_padded_to_the_same_chunks(tokenizer: Any, text_encoder: Any) -> None:
    import torch

    long, short = "a, " * 40, "lowres"
    cond, uncond = encode_pair(tokenizer, text_encoder, long, short, clip_skip=2)
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond, encode_prompt(tokenizer, text_encoder, long, clip_skip=2))
    torch.testing.assert_close(uncond[:, :77], encode_prompt(tokenizer, text_encoder, short, clip_skip=2))
    torch.testing.assert_close(uncond[:, 77:], encode_prompt(tokenizer, text_encoder, "", clip_skip=2))
    neg_first, pos_second = encode_pair(tokenizer, text_encoder, short, long)
    assert neg_first.shape == pos_second.shape == (1, 154, 32)
    cond, uncond = encode_pair(tokenizer, text_encoder, "a", "")
    assert cond.shape == uncond.shape == (1, 77, 32)


def test_bad_settings_are_errors(tokenizer: Any, text_encoder: Any) -> None:
    with pytest.raises(CharfwError, match="clip skip 4 is out of range"):
        encode_prompt(tokenizer, text_encoder, "a", clip_skip=4)
    with pytest.raises(CharfwError, match="unknown emphasis mode"):
        encode_prompt(tokenizer, text_encoder, "a", emphasis="Strong")  # type: ignore[arg-type]


def test_importing_the_module_loads_no_torch() -> None:
    code = "import sys, charfw.generation.prompts; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- prompt files --------------------------------------------------------------------------


def test_prompt_files(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# krnk, front and back\n"
        "\n"
        "krnk, 1girl, <lora:krnk:0.8>smile|||lowres, bad hands\n"
        "  krnk, from behind --n worst quality --w 512 --h 768 --d 42 --s 28 --l 6.5 --ss euler_a\n"
        "krnk, (sitting:1.2) ||| lowres --d 7\n"
        "only a prompt\n",
        encoding="utf-8",
    )
    assert read_prompt_file(path) == [
        PromptLine("krnk, 1girl, <lora:krnk:0.8>smile", "lowres, bad hands", line=3),
        PromptLine("krnk, from behind", "worst quality", 512, 768, 42, 28, 6.5, "euler_a", line=4),
        PromptLine("krnk, (sitting:1.2)", "lowres", seed=7, line=5),
        PromptLine("only a prompt", line=6),
    ]
    assert read_prompt_file(path)[1].options() == {"width": 512, "height": 768, "seed": 42, "steps": 28,
                                                   "scale": 6.5, "sampler": "euler_a"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a --x 1", "unknown sample option '--x 1'"),
        ("a --w 500", "multiples of 8"),
        ("a --d seven", "--d expects a number"),
        ("a --ss turbo", "unknown sampler"),
        ("a|||b|||c", "'\\|\\|\\|' appears more than once"),
        ("a|||b --n c", "the negative prompt is given twice"),
    ],
)
def test_a_bad_prompt_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text(f"# header\ngood prompt\n{line}\n", encoding="utf-8")
    with pytest.raises(CharfwError, match=message) as info:
        read_prompt_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3 ") or "prompts.txt:3 " in text
    assert "\n" not in text and info.value.line == 3


def test_a_missing_prompt_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CharfwError, match="cannot read the prompt file"):
        read_prompt_file(tmp_path / "nope.txt")


def test_a_weighted_chunk_whose_mean_is_near_zero_is_not_blown_up(tiny_sd15: Path) -> None:
    """charfw's untrained tiny encoder has a chunk mean of about 1e-9: A1111's mean/mean
    would give huge values or NaN; charfw keeps the weighted values ("No norm")."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd15 / "text_encoder")
    plain = encode_prompt(tokenizer, encoder, "red hair, blue eyes")
    weighted = encode_prompt(tokenizer, encoder, "(red hair:1.3), blue eyes")
    assert torch.isfinite(weighted).all()
    assert weighted.abs().max() <= 1.3 * plain.abs().max() + 1e-5
    no_norm = encode_prompt(tokenizer, encoder, "(red hair:1.3), blue eyes", emphasis="No norm")
    if abs(float((no_norm).mean())) <= 1e-4 * float(no_norm.abs().mean()):
        torch.testing.assert_close(weighted, no_norm)
