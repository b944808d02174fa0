"""The draft stage's ``controlnet`` drafter: the method's prompt per angle code, option errors,
and a quick build of krnk that drafts the face and the body (with the face LoRA) on the tiny
SD 1.5 and a tiny ControlNet, stays up to date on a rebuild, and hands over to ``charfw adopt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from controlnet_support import make_tiny_controlnet
from PIL import Image
from train_support import one_torch_thread  # noqa: F401 (fixture)

from charfw.build.hashing import HashCache
from charfw.build.template_library import TemplateLibrary
from charfw.errors import CharfwError
from charfw.stage_context import ModelRefs, PartInfo, StageContext

QUICK_TRAIN = "  train: {plugin: lora, max_train_steps: 2, resolution: 64}\n"


def registry():
    from charfw.plugins import load_plugins

    return load_plugins(None).registry


def options(**values):
    return registry().get("drafter", "controlnet").Options.model_validate({"controlnet": "cn", **values})


def context(kind: str = "face", tags: tuple[str, ...] = ()) -> StageContext:
    templates = TemplateLibrary(None)
    template = "face" if kind == "face" else "body"
    face = PartInfo(target="krnk", name="face", kind="face", keyword="krnk", class_tokens="krnk girl",
                    template="face", angles=tuple(templates.angle_sets["face"].codes(True)))
    part = PartInfo(target="krnk", name=kind if kind == "face" else "krnksf", kind=kind,
                    keyword="krnk" if kind == "face" else "krnksf", class_tokens="x girl", tags=tags,
                    template=template, angles=tuple(templates.angle_sets[template].codes(True)),
                    members=() if kind == "face" else (face,), model=ModelRefs(base="charfw:tiny-sd15"))
    return StageContext(workspace_root=Path.cwd(), part=part, stage="draft", stage_dir=Path("."), inputs={},
                        cache_dir=Path("."), hash_cache=HashCache(None), templates=templates)


def test_the_prompt_follows_the_method() -> None:
    from charfw.default_plugins.draft.controlnet import draft_prompt

    face = context()
    f00 = draft_prompt(face, options(prompt="1girl, short hair, cat ears"), "f00")
    assert f00.startswith("(black background:1.3), simple background, upper body, (nude, completely nude, naked:1.4)")
    assert f00.endswith(", 1girl, short hair, cat ears")
    assert "looking away" not in f00 and "white background" not in f00 and "from horizontal" not in f00
    assert "krnk" not in f00.split(", 1girl")[0]  # the untrained keyword is not prompted
    f12 = draft_prompt(face, options(background="white"), "f12")
    assert f12.startswith("(white background:1.3), simple background")
    assert "(from above:1.3)" in f12 and "from side" in f12 and "looking away" in f12
    f23 = draft_prompt(face, options(), "f23")
    assert "(from below:1.3)" in f23 and "(from behind:1.3)" in f23
    body = draft_prompt(context("body", ("school uniform", "serafuku")), options(), "b13")
    assert body.startswith("(black background:1.3), simple background, full body, standing, straight standing")
    assert "nude" not in body and "(from above:1.3)" in body and "(from behind:1.3)" in body
    assert body.endswith("krnk, school uniform, serafuku") and "krnksf" not in body


def test_codes_are_taken_per_angle_set() -> None:
    from charfw.default_plugins.draft.controlnet import draft_codes

    both = options(codes=["f00", "f12", "b00", "b11"])
    assert draft_codes(context(), both) == ["f00", "f12"]
    assert draft_codes(context("body"), both) == ["b00", "b11"]
    assert len(draft_codes(context(), options())) == 15
    with pytest.raises(CharfwError, match="'f05' is not a code of the 'face' template"):
        draft_codes(context(), options(codes=["f05"]))
    with pytest.raises(CharfwError, match="none of b00 is a code"):
        draft_codes(context(), options(codes=["b00"]))


@pytest.mark.parametrize(("values", "message"), [
    ({"controlnet": None}, "controlnet"),
    ({"guidance_start": 0.5, "guidance_end": 0.3}, "before guidance_end"),
    ({"size": 60}, "multiple of 8"),
    ({"control": "hed"}, "openpose"),
    ({"hires": {"denoise": 0}}, "greater than 0"),
    ({"candidates": 0}, "greater than or equal to 1"),
])
def test_bad_options_are_rejected(values: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        options(**values)


def test_missing_control_image_and_controlnet_are_one_line_errors(tmp_path: Path) -> None:
    drafter = registry().get("drafter", "controlnet")
    ctx = context()
    with pytest.raises(CharfwError, match=r"templates/controls/face/f00\.png is missing") as exc:
        drafter.check(ctx, options(control="file", controlnet=str(tmp_path), codes=["f00"]))
    assert "\n" not in str(exc.value)
    missing = tmp_path / "control_openpose.safetensors"
    with pytest.raises(CharfwError, match="ControlNet model not found") as exc:
        drafter.check(ctx, options(controlnet=str(missing)))
    assert exc.value.path == missing


def _records(ws: Path) -> dict[str, str]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text("utf-8"))["started"]
            for p in sorted((ws / "build/krnk").glob("*/*/record.json"))}


@pytest.mark.usefixtures("one_torch_thread")
def test_a_quick_build_drafts_face_and_body_and_adopt_takes_a_candidate(workspace: Path, tiny_sd15: Path,
                                                                        run_cli) -> None:
    from diffusers import UNet2DConditionModel

    from charfw.generation.infotext import parse_infotext
    from charfw.generation.pipeline import parse_control_infotext

    make_tiny_controlnet(UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet"),
                         workspace / "models/cn-tiny", 3)
    manifest = workspace / "characters/krnk.yaml"
    draft = ("  draft: {plugin: controlnet, controlnet: models/cn-tiny, codes: [f00, f12, b00, b11], candidates: 2, "
             "size: 64, steps: 2, seed: 10, prompt: '1girl, cat ears'}\n")
    manifest.write_text(manifest.read_text("utf-8") + QUICK_TRAIN + draft, "utf-8")
    stale = workspace / "build/krnk/face/draft/f24-0.png"
    stale.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(stale)
    code, out, err = run_cli("build", "krnk", cwd=workspace)
    assert code == 0, out + err
    assert "4 candidates for 2 codes" in out and "charfw adopt krnk face f00-0 f12-0" in out
    assert not stale.exists()
    face_lora = next((workspace / "build/krnk/face/compress").glob("*.safetensors")).stem
    for part, codes in (("face", ["f00", "f12"]), ("krnksf", ["b00", "b11"])):
        folder = workspace / "build/krnk" / part / "draft"
        names = sorted(p.stem for p in folder.glob("*.png"))
        assert names == sorted([*(f"{c}-{k}" for c in codes for k in range(2)), "contact-sheet"])
        with Image.open(folder / "contact-sheet.png") as sheet:
            assert sheet.width >= 2 * 128 and sheet.height >= 2 * 128
        for name in (n for n in names if n != "contact-sheet"):
            with Image.open(folder / f"{name}.png") as image:
                assert image.size == (64, 64)
                params = parse_infotext(image.text["parameters"])
            assert (params.steps, params.seed, params.cfg_scale) == (2, 10 + int(name[-1]), 10)
            unit = parse_control_infotext(params.extra["ControlNet 0"])
            assert (unit["Model"], unit["Weight"], unit["Guidance End"]) == ("cn-tiny", "0.5", "0.3")
            assert (f"<lora:{face_lora}:1>" in params.prompt) == (part == "krnksf")
            assert bool(params.lora_hashes) == (part == "krnksf")
    before = _records(workspace)
    code, out, err = run_cli("build", "krnk", cwd=workspace)
    assert code == 0, out + err
    assert _records(workspace) == before
    code, out, err = run_cli("adopt", "krnk", "face", "f00-1", "--force", cwd=workspace)
    assert code == 0, out + err
    adopted = workspace / "characters/krnk/face/f00.png"
    assert adopted.read_bytes() == (workspace / "build/krnk/face/draft/f00-1.png").read_bytes()


def group_context() -> StageContext:
    templates = TemplateLibrary(None)
    body = templates.angle_sets["body"]
    krnksf = PartInfo(target="krnk", name="krnksf", kind="body", keyword="krnksf", class_tokens="krnksf girl",
                      tags=("school uniform",), template="body", angles=tuple(body.codes(True)))
    tyankps = PartInfo(target="tyank", name="tyankps", kind="body", keyword="tyankps", class_tokens="tyankps girl",
                       tags=("plugsuit", "school uniform"), template="body", angles=tuple(body.codes(True)))
    part = PartInfo(target="both", name="group", kind="group", keyword="both", class_tokens="both",
                    members=(krnksf, tyankps), model=ModelRefs(base="charfw:tiny-sd15"))
    return StageContext(workspace_root=Path.cwd(), part=part, stage="draft", stage_dir=Path("."), inputs={},
                        cache_dir=Path("."), hash_cache=HashCache(None), templates=templates)


def test_a_group_drafts_every_member_in_its_outfit_on_the_body_codes() -> None:
    from charfw.default_plugins.draft.controlnet import draft_codes, draft_prompt

    ctx = group_context()
    assert draft_codes(ctx, options()) == ctx.templates.angle_sets["body"].codes(True)
    assert draft_codes(ctx, options(codes=["f00", "b11"])) == ["b11"]
    prompt = draft_prompt(ctx, options(prompt="2girls, side-by-side"), "b11")
    assert prompt.startswith("(black background:1.3), simple background, full body, standing, straight standing")
    # each member's keyword and outfit once, in the members' order, then the user's words
    assert prompt.endswith("krnksf, school uniform, tyankps, plugsuit, 2girls, side-by-side")
    assert "(from above:1.3)" in prompt and "nude" not in prompt
    mixed = group_context()
    object.__setattr__(mixed.part.members[1], "template", "face")
    with pytest.raises(CharfwError, match="different angle templates"):
        draft_codes(mixed, options())


@pytest.mark.usefixtures("one_torch_thread")
def test_a_group_drafts_with_its_members_body_loras_and_adopts_into_its_own_pictures(
        workspace: Path, tiny_sd15: Path, run_cli) -> None:
    from diffusers import UNet2DConditionModel

    from charfw.generation.infotext import parse_infotext

    make_tiny_controlnet(UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet"),
                         workspace / "models/cn-tiny", 3)
    for name in ("krnk", "tyank"):
        manifest = workspace / f"characters/{name}.yaml"
        manifest.write_text(manifest.read_text("utf-8") + QUICK_TRAIN, "utf-8")
    group = workspace / "characters/krnksf_tyankps.yaml"
    draft = ("  draft: {plugin: controlnet, controlnet: models/cn-tiny, codes: [b00, b11], candidates: 1, "
             "size: [96, 64], steps: 2, seed: 3, prompt: 2girls}\n")
    group.write_text(group.read_text("utf-8") + QUICK_TRAIN + draft, "utf-8")
    code, out, err = run_cli("build", "krnksf_tyankps", cwd=workspace)
    assert code == 0, out + err
    folder = workspace / "build/krnksf_tyankps/group/draft"
    assert sorted(p.name for p in folder.glob("*.png")) == ["b00-0.png", "b11-0.png", "contact-sheet.png"]
    member_loras = [next((workspace / f"build/{c}/{b}/compress").glob("*.safetensors")).stem
                    for c, b in (("krnk", "krnksf"), ("tyank", "tyankps"))]
    with Image.open(folder / "b11-0.png") as image:
        assert image.size == (96, 64)
        params = parse_infotext(image.text["parameters"])
    assert all(f"<lora:{stem}:1>" in params.prompt for stem in member_loras)
    assert len(params.lora_hashes) == 2 and "krnksf, school uniform" in params.prompt
    # the group has no folder for its pictures yet: adopt says where to add one
    code, _, err = run_cli("adopt", "krnksf_tyankps", "group", "b11-0", cwd=workspace)
    assert code != 0 and "add `images: krnksf_tyankps`" in err
    trained = {p: p.read_bytes() for p in (workspace / "build").glob("*/*/train/record.json")}
    group.write_text(group.read_text("utf-8").replace("stages:", "images: krnksf_tyankps\ntags: [2girls]\n\nstages:"),
                     "utf-8")
    code, _, err = run_cli("adopt", "krnksf_tyankps", "group", "b11-0", cwd=workspace)
    assert code == 0, err
    adopted = workspace / "characters/krnksf_tyankps/b11.png"
    assert adopted.read_bytes() == (folder / "b11-0.png").read_bytes()
    code, out, err = run_cli("build", "krnksf_tyankps", cwd=workspace)
    assert code == 0, out + err
    # the group's picture joins its dataset, captioned with every member; the members are untouched
    captions = list((workspace / "build/krnksf_tyankps/group/dataset/images").glob("*/*_group*/b11.txt"))
    assert len(captions) == 1
    caption = captions[0].read_text("utf-8")
    assert caption.startswith("krnksf_tyankps, 2girls, krnksf, school uniform, serafuku")
    assert "tyankps, plugsuit, bodysuit" in caption and "from above" in caption
    for path, before in trained.items():
        if "krnksf_tyankps" not in str(path):
            assert path.read_bytes() == before, path


def _family_controlnet(family: str, base: Path, folder: Path) -> Path:
    """A tiny ControlNet for the family's tiny model: an SDXL ControlNet from its UNet, an
    ``SD3ControlNetModel`` of two joint blocks; their zero layers made to act."""
    import torch

    if family == "sdxl":
        from diffusers import UNet2DConditionModel

        return make_tiny_controlnet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), folder, 4)
    from diffusers import SD3ControlNetModel

    from charfw.training.tiny_sd35 import transformer_config

    config = {k: v for k, v in transformer_config().items() if k not in ("dual_attention_layers", "qk_norm")}
    torch.manual_seed(0)
    net = SD3ControlNetModel(**{**config, "num_layers": 2})
    with torch.no_grad():
        for module in (*net.controlnet_blocks, net.pos_embed_input.proj):
            module.weight.normal_(0, 0.2)
    net.save_pretrained(folder)
    return folder


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("family", ["sdxl", "sd35"])
def test_the_draft_stage_drafts_on_sdxl_and_sd35(family: str, workspace: Path, run_cli,
                                                  request: pytest.FixtureRequest) -> None:
    from charfw.generation.infotext import parse_infotext
    from charfw.generation.pipeline import parse_control_infotext

    base = request.getfixturevalue(f"tiny_{family}")
    _family_controlnet(family, base, workspace / "models/cn")
    manifest = workspace / "characters/krnk.yaml"
    text = manifest.read_text("utf-8").replace("base: charfw:tiny-sd15", f"base: {base}")
    draft = ("  draft: {plugin: controlnet, controlnet: models/cn, codes: [f00, f12], candidates: 1, size: 64, "
             "steps: 2, cfg_scale: 5, sampler: Euler}\n")
    manifest.write_text(text + draft, "utf-8")
    code, out, err = run_cli("build", "krnk/face", "--until", "draft", cwd=workspace)
    assert code == 0, out + err
    assert f"model family {family}" in out + err
    folder = workspace / "build/krnk/face/draft"
    assert sorted(p.name for p in folder.glob("*.png")) == ["contact-sheet.png", "f00-0.png", "f12-0.png"]
    with Image.open(folder / "f12-0.png") as image:
        assert image.size == (64, 64)
        params = parse_infotext(image.text["parameters"])
    assert "(from above:1.3)" in params.prompt and params.steps == 2
    assert parse_control_infotext(params.extra["ControlNet 0"])["Model"] == "cn"
