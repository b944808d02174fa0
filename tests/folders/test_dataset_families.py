"""The method's dataset rules per model family: resolution classes scaled to the native size,
sd-scripts' SDXL bucket range, a batch-size table per family, and a TOML sd-scripts accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from family_headers import sdxl_shapes, write_header
from PIL import Image

from charfw.errors import CharfwError
from charfw.folders import kohya_config


def img(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 60, 30)).save(path)


@pytest.fixture
def xl_tree(tmp_path: Path) -> Path:
    """Images around SDXL's sizes: 1024 squares, a 1500x900, a 2048x1200 and a small one."""
    root = tmp_path / "3_krnk"
    for code in ("f00", "f01"):
        img(root / "krnk girl_face" / f"{code}.png", (1024, 1024))
    img(root / "krnk girl_face" / "f02.png", (600, 600))
    img(root / "krnk girl_wide" / "b00.png", (1500, 900))
    img(root / "krnk girl_large" / "b01.png", (2048, 1200))
    return root


def datasets(text: str) -> list[tuple[int, int, list[str]]]:
    data = tomllib.loads(text)
    return [(d["resolution"][0], d["batch_size"], [Path(s["image_dir"]).name for s in d["subsets"]])
            for d in data["datasets"]]


def test_resolution_classes_scale_with_the_native_size() -> None:
    assert kohya_config.dataset_rules("sd1").resolutions == (512, 768, 1024)
    for family in ("sdxl", "sd35"):
        rules = kohya_config.dataset_rules(family)
        assert rules.native == 1024 and rules.resolutions == (1024, 1536, 2048)
        assert (rules.min_bucket_reso, rules.max_bucket_reso, rules.bucket_reso_steps) == (256, 2048, 64)
        assert rules.step_multiple == 32
    with pytest.raises(CharfwError, match="no dataset rules for the model family 'sd2'"):
        kohya_config.dataset_rules("sd2")


@pytest.mark.parametrize("family", ["sdxl", "sd35"])
def test_sdxl_and_sd35_toml_classes_buckets_and_batches(xl_tree: Path, run_cli, family: str) -> None:
    code, out, err = run_cli("toml", xl_tree, "--family", family, "--dry-run")
    assert code == 0, err
    data = tomllib.loads(out)
    config = kohya_config.validate(data)  # sd-scripts' schema
    kohya_config.check_buckets(config, step_multiple=32)  # and sdxl/sd3_train_network's assertions
    assert {k: data["general"][k] for k in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")} == \
        {"min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64}
    # 600 and 1024 px train at 1024, 1500 at 1536, 2048 at 2048; the family's default table: batch 1
    assert datasets(out) == [(1024, 1, ["krnk girl_face"]), (1536, 1, ["krnk girl_wide"]),
                             (2048, 1, ["krnk girl_large"])]
    label = "SDXL" if family == "sdxl" else "SD 3.5"
    assert f"# {label} rules: classes up to 1024 and 1536 px, resolutions 1024, 1536, 2048" in out
    assert f"accelerate launch {'sdxl' if family == 'sdxl' else 'sd3'}_train_network.py" in out
    # the same table names as SD 1.x's, from the family's own file
    code, out, err = run_cli("toml", xl_tree, "--family", family, "--batch-sizes", "24gb", "--dry-run")
    assert code == 0, err
    assert datasets(out)[0][:2] == (1024, 4 if family == "sdxl" else 2)


def test_the_same_folders_under_sd1_rules(xl_tree: Path, run_cli) -> None:
    code, out, err = run_cli("toml", xl_tree, "--dry-run")
    assert code == 0, err
    data = tomllib.loads(out)
    assert "max_bucket_reso" not in data["general"] and "bucket_reso_steps" not in data["general"]
    assert [(r, b) for r, b, _ in datasets(out)] == [(1024, 1)]  # everything above 768 is HIGH


def test_family_from_a_base_model_file(xl_tree: Path, run_cli, tmp_path: Path) -> None:
    model = write_header(tmp_path / "noobai.safetensors", sdxl_shapes())
    code, out, err = run_cli("toml", xl_tree, "--base-model", model, "--dry-run")
    assert code == 0, err
    assert "model family sdxl" in err and "resolution = [2048, 2048]" in out


def test_sd_scripts_bucket_assertions() -> None:
    # what the SD 1.x writer would have written for 2048 px classes: sd-scripts' default
    # max_bucket_reso (1024) is below the resolution and sd-scripts stops on it
    old = kohya_config.validate({"general": {"enable_bucket": True},
                                 "datasets": [{"resolution": [2048, 2048], "subsets": [{"image_dir": "a"}]}]})
    with pytest.raises(CharfwError, match=r"datasets\[0\]: resolution 2048x2048 is above max_bucket_reso 1024"):
        kohya_config.check_buckets(old, step_multiple=32)
    odd = kohya_config.validate({"general": {"enable_bucket": True, "bucket_reso_steps": 48},
                                 "datasets": [{"resolution": 1024, "subsets": [{"image_dir": "a"}]}]})
    kohya_config.check_buckets(odd, step_multiple=16)
    with pytest.raises(CharfwError, match="bucket_reso_steps 48 is not a multiple of 32"):
        kohya_config.check_buckets(odd, step_multiple=32)
    small = kohya_config.validate({"general": {"enable_bucket": True, "min_bucket_reso": 512},
                                   "datasets": [{"resolution": 256, "subsets": [{"image_dir": "a"}]}]})
    with pytest.raises(CharfwError, match="below min_bucket_reso 512"):
        kohya_config.check_buckets(small)
    # without buckets sd-scripts checks none of it
    kohya_config.check_buckets(kohya_config.validate({"datasets": [{"resolution": 4096, "subsets": [{"image_dir": "a"}]}]}))


def test_sd1_resolutions_above_1024_raise_max_bucket_reso(xl_tree: Path, run_cli, tmp_path: Path) -> None:
    """Explicit classes beyond sd-scripts' default bucket range: the writer raises
    max_bucket_reso to the largest resolution instead of writing a file sd-scripts rejects."""
    from charfw.build.template_library import TemplateLibrary
    from charfw.components import DatasetSpec, SubsetSpec
    from charfw.plugins import load_plugins
    from charfw.stage_context import PartInfo

    writer = load_plugins(None).registry.get("dataset_writer", "kohya-toml")
    options = writer.Options.model_validate({"resolutions": [512, 1024, 1536]})
    ctx = type("Ctx", (), {"templates": TemplateLibrary(None),
                           "part": PartInfo(target="x", name="x", kind="folder", keyword="", class_tokens="")})()
    spec = DatasetSpec([SubsetSpec(tmp_path / "a", [(1200, 1200)], class_tokens="krnk girl")])
    data = tomllib.loads(writer.render(ctx, options, spec))
    assert data["datasets"][0]["resolution"] == [1536, 1536] and data["general"]["max_bucket_reso"] == 1536


def test_the_build_dataset_follows_the_base_models_family(workspace: Path, run_cli) -> None:
    """An SDXL checkpoint as model.base: nothing else in the manifest changes, and the
    dataset stage writes SDXL's classes and buckets."""
    manifest = workspace / "characters/krnk.yaml"
    write_header(workspace / "illustrious.safetensors", sdxl_shapes())
    manifest.write_text(manifest.read_text("utf-8").replace("base: charfw:tiny-sd15", "base: ../illustrious.safetensors"),
                        "utf-8")
    code, out, err = run_cli("build", "krnk", "--until", "dataset", cwd=workspace)
    assert code == 0, out + err
    assert "model family sdxl" in out
    for part in ("face", "krnksf"):
        config = kohya_config.load(workspace / f"build/krnk/{part}/dataset/dataset.toml")
        kohya_config.check_buckets(config, step_multiple=32)
        assert config.general.max_bucket_reso == 2048
        assert {d.resolution[0] for d in config.datasets} == {1024}  # the examples are at most 768 px
