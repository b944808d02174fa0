"""Model families told from a base model's files: single-file headers, diffusers configs,
the Hugging Face cache, built-in names; unknown families are one-line errors.

The single files here are safetensors *headers* with the tensor names and shapes of each
layout and no tensor data: detection reads nothing else (a real SDXL file is 6 GB)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from family_headers import sd1_shapes, sd2_shapes, sd35_shapes, sdxl_shapes, write_header

from charfw.errors import CharfwError
from charfw.training.families.detect import FamilyUnavailable, detect_family, family_from_shapes
from charfw.training.model_sources import ModelSource, resolve_source

UNET = "model.diffusion_model."

def single(path: Path) -> ModelSource:
    return ModelSource("single_file", str(path), path)


@pytest.mark.parametrize(("shapes", "family", "variant", "evidence"), [
    (sd1_shapes(), "sd1", None, "768-wide text context"),
    (sd2_shapes(), "sd2", None, "cond_stage_model.model"),
    (sdxl_shapes(), "sdxl", None, "conditioner.embedders"),
    # an SDXL UNet saved without its text encoders still has the 2816-wide label_emb
    ({k: v for k, v in sdxl_shapes().items() if k.startswith(UNET)}, "sdxl", None, "label_emb"),
    (sd35_shapes(38), "sd35", "SD 3.5 Large", "38 MMDiT joint_blocks, text encoders clip_g, clip_l, t5xxl"),
    (sd35_shapes(24, attn2=13), "sd35", "SD 3.5 Medium", "24 MMDiT joint_blocks"),
    (sd35_shapes(24, qk_norm=False, encoders=False), "sd3", "SD3 Medium", "24 MMDiT joint_blocks in"),
])
def test_single_file_layouts(tmp_path: Path, shapes, family, variant, evidence) -> None:
    path = write_header(tmp_path / "model.safetensors", shapes)
    found = detect_family(single(path))
    assert (found.name, found.variant) == (family, variant)
    assert evidence in found.evidence and "model.safetensors" in found.evidence
    assert found.describe().startswith(f"{family} (")


@pytest.mark.parametrize(("shapes", "what"), [
    ({"double_blocks.0.img_attn.qkv.weight": [9216, 3072], "img_in.weight": [3072, 64]}, "Flux"),
    ({"weight": [4, 4], "bias": [4]}, "no Stable Diffusion UNet or MMDiT tensors"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 320]}, "this is a LoRA"),
])
def test_unknown_family_is_one_line_naming_the_file_and_the_families(tmp_path: Path, shapes, what) -> None:
    path = write_header(tmp_path / "other.safetensors", shapes)
    with pytest.raises(CharfwError) as info:
        detect_family(single(path))
    text = str(info.value)
    assert "\n" not in text and "other.safetensors" in text and what in text
    assert "sd1 (SD 1.x), sdxl (SDXL), sd35 (SD 3.5)" in text


def test_sd2_and_sd3_are_recognised_but_not_trained(tmp_path: Path) -> None:
    path = write_header(tmp_path / "v2.safetensors", sd2_shapes())
    with pytest.raises(CharfwError, match=r"this is an SD 2\.x model .*charfw trains sd1 \(SD 1\.x\), sdxl"):
        detect_family(single(path)).require_trained(path=path)
    path = write_header(tmp_path / "sd3_medium.safetensors", sd35_shapes(24, qk_norm=False))
    with pytest.raises(CharfwError, match=r"this is an SD3 Medium model .*sd35 \(SD 3\.5\)"):
        detect_family(single(path)).require_trained(path=path)


def _pipeline_folder(root: Path, cls: str, **configs: dict) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls, "_diffusers_version": "0.30.0"}))
    for sub, config in configs.items():
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(config))
    return root


def test_diffusers_folders(tmp_path: Path) -> None:
    def found(path: Path):
        return detect_family(resolve_source(str(path), cache_dir=tmp_path))

    sd1 = _pipeline_folder(tmp_path / "sd15", "StableDiffusionPipeline", unet={"cross_attention_dim": 768})
    sd2 = _pipeline_folder(tmp_path / "sd21", "StableDiffusionPipeline", unet={"cross_attention_dim": 1024})
    xl = _pipeline_folder(tmp_path / "xl", "StableDiffusionXLPipeline")
    xl_img2img = _pipeline_folder(tmp_path / "xl2", "StableDiffusionXLImg2ImgPipeline")
    large = _pipeline_folder(tmp_path / "sd35l", "StableDiffusion3Pipeline",
                             transformer={"num_layers": 38, "qk_norm": "rms_norm"})
    sd3 = _pipeline_folder(tmp_path / "sd3m", "StableDiffusion3Pipeline", transformer={"num_layers": 24})
    assert (found(sd3).name, found(sd3).variant) == ("sd3", "SD3 Medium")
    medium = _pipeline_folder(tmp_path / "sd35m", "StableDiffusion3Pipeline",
                              transformer={"num_layers": 24, "qk_norm": "rms_norm",
                                           "dual_attention_layers": list(range(13))})
    assert found(sd1).name == "sd1" and "StableDiffusionPipeline in sd15" in found(sd1).evidence
    assert found(sd2).name == "sd2"
    assert found(xl).name == found(xl_img2img).name == "sdxl"
    assert (found(large).name, found(large).variant) == ("sd35", "SD 3.5 Large")
    assert found(medium).variant == "SD 3.5 Medium"
    # a bare UNet folder (no model_index.json) by its config
    unet_only = tmp_path / "unet-only"
    (unet_only / "unet").mkdir(parents=True)
    (unet_only / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert found(unet_only).name == "sdxl"
    flux = _pipeline_folder(tmp_path / "flux", "FluxPipeline")
    with pytest.raises(CharfwError, match=r"a FluxPipeline \(flux\): not a model family charfw trains"):
        found(flux)


def test_builtin_names(tmp_path: Path) -> None:
    for name, family in (("tiny-sd15", "sd1"), ("tiny-sdxl", "sdxl"), ("tiny-sd35", "sd35")):
        source = ModelSource("builtin", f"charfw:{name}", tmp_path / name)
        assert detect_family(source).name == family


def test_hub_ids_from_the_cache_or_as_declared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--xl-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _pipeline_folder(repo / "snapshots" / commit, "StableDiffusionXLPipeline")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    found = detect_family(ModelSource("hub", "someone/xl-model"))
    assert found.name == "sdxl" and "someone/xl-model's cached model_index.json" in found.evidence
    missing = ModelSource("hub", "someone/not-downloaded")
    assert detect_family(missing, declared="sd35").name == "sd35"
    with pytest.raises(FamilyUnavailable) as info:  # offline (the suite sets HF_HUB_OFFLINE)
        detect_family(missing)
    assert "cannot load the base model 'someone/not-downloaded'" in str(info.value)
    assert "set model.family" in str(info.value)


def test_a_declared_family_must_agree_with_the_files(tmp_path: Path) -> None:
    path = write_header(tmp_path / "xl.safetensors", sdxl_shapes())
    assert detect_family(single(path), declared="sdxl").name == "sdxl"
    with pytest.raises(CharfwError, match=r"model.family says sd1 \(SD 1.x\), but the base model is sdxl"):
        detect_family(single(path), declared="sd1")


def test_family_from_shapes_needs_no_file() -> None:
    assert family_from_shapes(sd1_shapes()).name == "sd1"


def test_build_plan_says_which_family_it_found(workspace: Path, run_cli) -> None:
    manifest = workspace / "characters/krnk.yaml"
    text = manifest.read_text("utf-8")
    assert "base: charfw:tiny-sd15" in text
    write_header(workspace / "illustrious.safetensors", sdxl_shapes())
    manifest.write_text(text.replace("base: charfw:tiny-sd15", "base: ../illustrious.safetensors"), "utf-8")
    code, out, err = run_cli("build", "krnk", "--dry-run", "--until", "tag", cwd=workspace)
    assert code == 0, out + err
    assert "model family sdxl (SDXL: conditioner.embedders.* in illustrious.safetensors)" in out
    # a checkpoint of a family charfw does not train: one line naming the manifest and the file
    write_header(workspace / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": [9216, 3072]})
    manifest.write_text(text.replace("base: charfw:tiny-sd15", "base: ../flux.safetensors"), "utf-8")
    code, out, err = run_cli("build", "krnk", "--dry-run", cwd=workspace)
    assert code != 0 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "flux.safetensors" in x]
    assert "krnk.yaml:" in line and "model.base" in line and "this is a Flux checkpoint" in line
    # a declared family that contradicts the file points at model.family
    manifest.write_text(text.replace("base: charfw:tiny-sd15", "base: ../illustrious.safetensors\n  family: sd1"),
                        "utf-8")
    code, out, err = run_cli("build", "krnk", "--dry-run", cwd=workspace)
    assert code != 0 and "model.family" in err and "model.family says sd1" in err


def test_charfw_train_refuses_an_unknown_family_before_loading(tmp_path: Path, run_cli) -> None:
    flux = write_header(tmp_path / "flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": [9216, 3072]})
    config = tmp_path / "data.toml"
    config.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    code, _out, err = run_cli("train", config, "--base-model", flux, "--cache-dir", tmp_path / "cache")
    assert code == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "flux1-dev.safetensors" in err and "this is a Flux checkpoint" in err and "sd35 (SD 3.5)" in err
    # SD 2.x is recognised and refused the same way
    v2 = write_header(tmp_path / "v2-1.safetensors", sd2_shapes())
    code, _out, err = run_cli("train", config, "--base-model", v2, "--cache-dir", tmp_path / "cache")
    assert code == 3 and "v2-1.safetensors" in err and "this is an SD 2.x model" in err
