"""charfw.generation.infotext: A1111's parameters text, written and read back; the hashes; the PNG chunk."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import pytest

from charfw.errors import CharfwError
from charfw.generation.infotext import (
    GenerationParams,
    charfw_version,
    format_infotext,
    lora_short_hash,
    model_hash,
    parse_infotext,
    parse_parameters_line,
    quote,
    read_png_infotext,
    save_png,
    split_infotext,
)


def params(**overrides: object) -> GenerationParams:
    base: dict[str, object] = dict(prompt="krnk, 1girl, school uniform", negative="lowres, bad hands", steps=20,
                                   sampler="DPM++ 2M Karras", cfg_scale=7, seed=1234, width=512, height=768,
                                   model_hash="6ce0161689", model_name="anything-v5", version="v1.6.0")
    base.update(overrides)
    return GenerationParams(**base)  # type: ignore[arg-type]


# --- writing ------------------------------------------------------------------------------


def test_reference_example_is_written_exactly() -> None:
    p = params(lora_hashes=[("krnk_face", "3a5c19b8d0e2")])
    assert format_infotext(p) == (
        "krnk, 1girl, school uniform\n"
        "Negative prompt: lowres, bad hands\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
        'Model: anything-v5, Lora hashes: "krnk_face: 3a5c19b8d0e2", Version: v1.6.0'
    )


def test_key_order_follows_create_infotext() -> None:
    p = params(schedule_type="Karras", vae_hash="735e4c3a44", vae_name="vae-ft-mse", denoising_strength=0.55,
               clip_skip=2, hires_upscale=2.0, hires_resize=(1024, 1536),
               lora_hashes=[("a", "111111111111"), ("b", "222222222222")],
               extra={"Hires steps": "10", "Emphasis": "No norm"})
    line = format_infotext(p).splitlines()[-1]
    assert list(parse_parameters_line(line)) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                    "VAE hash", "VAE", "Denoising strength", "Clip skip", "Hires upscale", "Hires resize",
                    "Lora hashes", "Hires steps", "Emphasis", "Version"]
    assert 'Lora hashes: "a: 111111111111, b: 222222222222"' in line
    assert "Denoising strength: 0.55, Clip skip: 2, Hires upscale: 2, Hires resize: 1024x1536" in line


def test_none_and_defaults_are_left_out() -> None:
    p = GenerationParams(prompt="x", steps=4, sampler="Euler a", cfg_scale=7.5, seed=1, width=64, height=64,
                         version=None)
    assert format_infotext(p) == "x\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64"
    assert "Clip skip" not in format_infotext(params(clip_skip=1))
    assert "Clip skip: 3" in format_infotext(params(clip_skip=3))
    assert "Negative prompt" not in format_infotext(params(negative=""))
    # an empty prompt with a negative one: the text starts with the negative line (stripped)
    assert format_infotext(params(prompt="")).startswith("Negative prompt: lowres")


def test_values_are_quoted_as_a1111_quotes_them() -> None:
    assert quote("anything-v5") == "anything-v5"
    assert quote("a, b") == '"a, b"'
    assert quote("a: b") == '"a: b"'
    assert quote("a\nb") == '"a\\nb"'
    assert quote("猫, ü") == '"猫, ü"'  # ensure_ascii=False
    assert quote('say "hi", ok') == json.dumps('say "hi", ok')
    # charfw's additions: what A1111's reader would otherwise change
    assert quote(" padded") == '" padded"'
    assert quote('"quoted"') == '"\\"quoted\\""'
    text = format_infotext(params(model_name="my model, v2"))
    assert 'Model: "my model, v2"' in text


def test_lora_aliases_lose_colons_and_commas_as_in_a1111() -> None:
    text = format_infotext(params(lora_hashes=[("krnk:face,v2", "abc"), ("", "def"), ("nohash", "")]))
    assert 'Lora hashes: "krnkfacev2: abc"' in text


def test_extra_keys_are_checked() -> None:
    with pytest.raises(CharfwError, match="'Steps' is a GenerationParams field"):
        format_infotext(params(extra={"Steps": "3"}))
    with pytest.raises(CharfwError, match="cannot be read back"):
        format_infotext(params(extra={"bad:key": "3"}))
    with pytest.raises(CharfwError, match="cannot be read back"):
        format_infotext(params(extra={"X": "3"}))  # A1111's key pattern needs two characters


def test_version_is_not_read_as_an_old_webui() -> None:
    version = pytest.importorskip("packaging.version")
    assert charfw_version().startswith("charfw ")
    with pytest.raises(version.InvalidVersion):  # A1111's backcompat then leaves the settings alone
        version.parse(charfw_version())
    assert GenerationParams(prompt="x", steps=1, sampler="Euler", cfg_scale=1, seed=0, width=8,
                            height=8).version == charfw_version()


# --- reading ------------------------------------------------------------------------------


PROMPTS = [
    ("plain", "krnk, 1girl, smile", "lowres"),
    ("colons and weights", "(masterpiece:1.2), krnk: face, [hair:0.8]", "bad: hands"),
    ("lora tags", "krnk, <lora:krnk_face:0.8>, <lora:style:1:lbw=FACE>", "<lora:bad:-1>"),
    ("multi-line", "krnk, 1girl\nBREAK\nschool uniform, (smile:1.1)", "lowres\nbad hands, jpeg"),
    ("unicode", "猫耳, café, ñ, emoji 🙂", "ぼやけ"),
    ("quotes and backslashes", 'a "quoted" word, \\(escaped\\), it\'s', 'no "text"'),
    ("empty negative", "just a prompt", ""),
    ("empty prompt", "", "only negative"),
    ("looks like parameters", "Steps: 3, Sampler: x, Seed: 4", "Size: 1x1, CFG scale: 2, Model: m"),
]


@pytest.mark.parametrize(("prompt", "negative"), [p[1:] for p in PROMPTS], ids=[p[0] for p in PROMPTS])
def test_round_trip(prompt: str, negative: str) -> None:
    p = params(prompt=prompt, negative=negative, schedule_type="Karras", model_name="anime, v5: final",
               vae_hash="735e4c3a44", vae_name='"vae"', denoising_strength=0.4, clip_skip=2, hires_upscale=1.5,
               hires_resize=(768, 1152), lora_hashes=[("krnk_face", "3a5c19b8d0e2"), ("style 2", "0123456789ab")],
               extra=OrderedDict([("Emphasis", "No norm"), ("Hires upscaler", "R-ESRGAN 4x+ Anime6B"),
                                  ("Note", "a, b: c\nd"), ("Padded", "  x  "), ("Empty", "")]),
               seed=4294967295, cfg_scale=6.5, version=charfw_version())
    text = format_infotext(p)
    back = parse_infotext(text)
    assert back == p
    assert format_infotext(back) == text


def test_round_trip_minimal() -> None:
    p = GenerationParams(prompt="x", steps=1, sampler="Euler", cfg_scale=1.25, seed=0, width=8, height=8,
                         version=None)
    assert parse_infotext(format_infotext(p)) == p


def test_parses_an_a1111_text() -> None:
    text = ("girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish)\n"
            "second line of the prompt  \n"
            "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
            "messy drawing\n"
            "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 965400086, Size: 512x768, "
            'Model hash: 45dee52b, Model: sd15, Lora hashes: "krnk: 3a5c19b8d0e2, style: 0123456789ab", '
            "Token merging ratio: 0.3, RNG: CPU, TI hashes: \"easyneg: c74b4e810b03\", Version: v1.9.4")
    p = parse_infotext(text)
    assert p.prompt == ("girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), "
                        "(coquettish)\nsecond line of the prompt")
    assert p.negative == "ugly, fat, (((deformed))), [blurry]\nmessy drawing"
    assert (p.steps, p.sampler, p.schedule_type, p.cfg_scale, p.seed) == (20, "Euler a", "Automatic", 7.0, 965400086)
    assert (p.width, p.height, p.model_hash, p.model_name, p.version) == (512, 768, "45dee52b", "sd15", "v1.9.4")
    assert p.clip_skip == 1 and p.denoising_strength is None and p.hires_resize is None
    assert p.lora_hashes == [("krnk", "3a5c19b8d0e2"), ("style", "0123456789ab")]
    assert list(p.extra.items()) == [("Token merging ratio", "0.3"), ("RNG", "CPU"),
                                     ("TI hashes", "easyneg: c74b4e810b03")]


def test_split_follows_parse_generation_parameters() -> None:
    # fewer than 3 key: value pairs on the last line: all prompt
    prompt, negative, pairs = split_infotext("a cat\nStyle: x, Mood: y")
    assert (prompt, negative, pairs) == ("a cat\nStyle: x, Mood: y", "", {})


def test_malformed_texts_are_one_line_errors() -> None:
    with pytest.raises(CharfwError, match="no 'Steps"):
        parse_infotext("just a prompt")
    with pytest.raises(CharfwError, match="no Seed, Size"):
        parse_infotext("x\nSteps: 20, Sampler: Euler, CFG scale: 7")
    with pytest.raises(CharfwError, match="Steps 'many' is not an integer"):
        parse_infotext("x\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8")
    with pytest.raises(CharfwError, match="Size '8' is not WIDTHxHEIGHT"):
        parse_infotext("x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8")
    with pytest.raises(CharfwError, match="CFG scale 'high' is not a number"):
        parse_infotext("x\nSteps: 2, Sampler: Euler, CFG scale: high, Seed: 1, Size: 8x8")


def test_parsed_sampler_resolves() -> None:
    from charfw.generation.samplers import resolve_sampler

    old = parse_infotext(format_infotext(params(sampler="DPM++ 2M Karras")))
    new = parse_infotext(format_infotext(params(sampler="DPM++ 2M", schedule_type="Karras")))
    assert resolve_sampler(old.sampler, old.schedule_type) == resolve_sampler(new.sampler, new.schedule_type)


# --- hashes -------------------------------------------------------------------------------


def test_model_hash_is_the_first_10_hex_of_the_file_sha256(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    data = bytes(range(256)) * 9000  # > 2 MiB: read in chunks
    f.write_bytes(data)
    assert model_hash(f) == hashlib.sha256(data).hexdigest()[:10]
    with pytest.raises(CharfwError, match="not a folder"):
        model_hash(tmp_path)
    with pytest.raises(CharfwError, match="cannot read"):
        model_hash(tmp_path / "missing.safetensors")


def _safetensors(path: Path, metadata: dict[str, str] | None) -> bytes:
    """Write a small file with numpy's safetensors writer; return its data section."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "lora_unet_x.alpha": np.array(4.0, dtype=np.float32)}, str(path), metadata=metadata)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n:]


def test_lora_short_hash_is_a1111s(tmp_path: Path) -> None:
    f = tmp_path / "krnk.safetensors"
    data = _safetensors(f, {"ss_output_name": "krnk"})
    computed = hashlib.sha256(data).hexdigest()[:12]
    assert lora_short_hash(f) == computed
    # A1111 takes a stored sshs_model_hash as it is
    stale = tmp_path / "stale.safetensors"
    _safetensors(stale, {"sshs_model_hash": "f" * 64})
    assert lora_short_hash(stale) == "f" * 12
    assert lora_short_hash(stale, use_metadata=False) == computed
    # other files: sha256 of the whole file
    pt = tmp_path / "old.pt"
    pt.write_bytes(b"pickle")
    assert lora_short_hash(pt) == hashlib.sha256(b"pickle").hexdigest()[:12]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(CharfwError, match="not a safetensors file"):
        lora_short_hash(bad)


def test_lora_short_hash_matches_charfws_sshs_hash(tmp_path: Path) -> None:
    import torch

    from charfw.lora.safetensors_io import write_safetensors

    f = tmp_path / "krnk.safetensors"
    write_safetensors(f, {"lora_unet_x.lora_up.weight": torch.ones(4, 2)}, {"ss_output_name": "krnk"})
    assert lora_short_hash(f) == lora_short_hash(f, use_metadata=False)


# --- PNG --------------------------------------------------------------------------------------


def test_save_png_writes_the_parameters_chunk(tmp_path: Path) -> None:
    from PIL import Image

    p = params(prompt="猫耳, <lora:krnk_face:0.8>\nsecond line", lora_hashes=[("krnk_face", "3a5c19b8d0e2")])
    dest = tmp_path / "out" / "00001-1234.png"
    assert save_png(Image.new("RGB", (8, 8), "red"), dest, p, extra_chunks={"charfw": "face/front"}) == dest
    with Image.open(dest) as img:
        assert img.format == "PNG" and img.size == (8, 8)
        assert img.text["parameters"] == format_infotext(p)
        assert img.text["charfw"] == "face/front"
        assert parse_infotext(img.text["parameters"]) == p
    assert read_png_infotext(dest) == format_infotext(p)
    assert sorted(x.name for x in dest.parent.iterdir()) == [dest.name]  # no temporary file left
    with pytest.raises(CharfwError, match="not extra_chunks"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", p, extra_chunks={"parameters": "x"})
    assert not (tmp_path / "x.png").exists()
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert read_png_infotext(plain) is None
