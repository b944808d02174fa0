"""The ``sample`` stage's ``angle-grid``: a prompt per angle code (the angle-rules caption
plus the options), the template grid, option errors, and a quick build of krnk that
samples each finished LoRA, re-runs only when asked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from train_support import one_torch_thread  # noqa: F401 (fixture)

from charfw.build.hashing import HashCache
from charfw.build.items import ImageItem
from charfw.build.stages import caption_text, tag_items
from charfw.build.template_library import TemplateLibrary
from charfw.errors import CharfwError
from charfw.stage_context import ModelRefs, PartInfo, StageContext

GRID = "charfw.default_plugins.sample.angle_grid"


def registry():
    from charfw.plugins import load_plugins

    return load_plugins(None).registry


def context(kind: str = "face", *, symmetric: bool = True, keyword: str = "krnk", tags: tuple[str, ...] = (),
            angles: tuple[str, ...] | None = None, members: tuple[PartInfo, ...] = ()) -> StageContext:
    templates = TemplateLibrary(None)
    template = {"face": "face", "body": "body"}.get(kind)
    if angles is None and template is not None:
        angles = tuple(templates.angle_sets[template].codes(symmetric))
    part = PartInfo(target="krnk", name=kind, kind=kind, keyword=keyword, class_tokens=f"{keyword} girl", tags=tags,
                    symmetric=symmetric, template=template, angles=angles or (), members=members,
                    model=ModelRefs(base="charfw:tiny-sd15"))
    return StageContext(workspace_root=Path.cwd(), part=part, stage="sample", stage_dir=Path("."), inputs={},
                        cache_dir=Path("."), hash_cache=HashCache(None), templates=templates)


def tagger_caption(ctx: StageContext, code: str) -> str:
    """What the tag stage writes for an image of ``code`` of this part."""
    tagger = registry().get("tagger", "angle-rules")
    item = ImageItem(id=code, path=f"{code}.png", sha256="", source=f"{code}.png", code=code, width=1, height=1)
    [tagged] = tag_items(ctx, [(tagger, tagger.Options())], [item])
    return caption_text(tagged.tags)


def options(**values):
    return registry().get("sampler", "angle-grid").Options.model_validate(values)


@pytest.mark.parametrize(("kind", "code"), [("face", "f00"), ("face", "f12"), ("face", "f24"), ("body", "b13")])
def test_each_code_prompts_with_its_angle_rules_caption_then_the_prompt_option(kind: str, code: str) -> None:
    from charfw.default_plugins.sample.angle_grid import code_prompt

    ctx = context(kind, keyword="krnksf" if kind == "body" else "krnk",
                  tags=("school uniform", "serafuku") if kind == "body" else ())
    caption = tagger_caption(ctx, code)
    assert code_prompt(ctx, options(), code) == caption
    assert code_prompt(ctx, options(prompt="masterpiece, (best quality:1.2)"), code) == (
        caption + ", masterpiece, (best quality:1.2)")
    if code == "f00":
        assert caption.startswith("krnk, white background, black background, simple background, from horizontal")
    if code == "f24":
        assert "from below" in caption and "from behind" in caption and "navel" not in caption
    if kind == "body":
        assert caption.startswith("krnksf, school uniform, serafuku,") and "full body" in caption


def test_mirrored_codes_prompt_as_the_code_they_mirror_and_brackets_are_literal() -> None:
    from charfw.default_plugins.sample.angle_grid import code_prompt

    ctx = context(symmetric=False, tags=("cat ears (black)",))
    assert code_prompt(ctx, options(), "f16") == code_prompt(ctx, options(), "f12")
    assert code_prompt(ctx, options(), "f00").startswith(r"krnk, cat ears \(black\), white background")


def test_the_shots_are_the_part_codes_then_the_weights_row_on_the_front_code() -> None:
    from charfw.default_plugins.sample.angle_grid import plan_shots

    ctx = context()
    cells, row = plan_shots(ctx, options())
    assert [c.name for c in cells] == list(ctx.part.angles) and len(cells) == 15
    assert [(s.name, s.weight, s.code) for s in row] == [("weight-0", 0.0, "f00"), ("weight-0.5", 0.5, "f00"),
                                                         ("weight-1", 1.0, "f00")]
    assert {s.prompt for s in row} == {cells[0].prompt}
    cells, row = plan_shots(ctx, options(codes=["f12", "f01"], weights=[1, 0.25]))
    assert [c.name for c in cells] == ["f12", "f01"] and [s.name for s in row] == ["weight-1", "weight-0.25"]
    assert row[0].code == "f12"  # no f00 among the codes: the first one


def test_a_group_renders_its_members_keywords_at_the_weights_row_only() -> None:
    from charfw.default_plugins.sample.angle_grid import plan_shots

    members = (context("body", keyword="krnksf").part, context("body", keyword="tyankps").part)
    ctx = context("group", keyword="krnksf_tyankps", members=members)
    cells, row = plan_shots(ctx, options(prompt="2girls"))
    assert cells == [] and [s.prompt for s in row] == ["krnksf, tyankps, 2girls"] * 3
    with pytest.raises(CharfwError, match="has no angle template"):
        plan_shots(ctx, options(codes=["f00"]))


@pytest.mark.parametrize(("values", "message"), [
    ({"sampler": "Eular a"}, "Euler a"),
    ({"size": 60}, "multiple of 8"),
    ({"size": [64, 64, 64]}, "one size or"),
    ({"weights": []}, "at least 1"),
    ({"weights": [1, 1]}, "twice"),
    ({"codes": ["x"]}, "not an angle code"),
    ({"steps": 0}, "greater than or equal to 1"),
    ({"colour": 1}, "Extra inputs"),
])
def test_bad_options_are_rejected(values: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        options(**values)


def test_codes_outside_the_template_are_one_line_errors() -> None:
    from charfw.default_plugins.sample.angle_grid import part_codes

    with pytest.raises(CharfwError, match=r"'f05' is not a code of the 'face' template \(symmetric") as exc:
        part_codes(context(), options(codes=["f00", "f05"]))
    assert "\n" not in str(exc.value)
    assert part_codes(context(symmetric=False), options(codes=["f05"])) == ["f05"]


def _solid(n: int, size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256))


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_grid_has_the_template_shape_with_labels_and_empty_cells(symmetric: bool) -> None:
    from charfw.default_plugins.sample.angle_grid import COLUMN_LABELS, MIN_CELL, draw_grid

    codes = TemplateLibrary(None).angle_sets["face"].codes(symmetric)
    images = {c: _solid(n) for n, c in enumerate(codes) if c not in ("f14", "f23")}
    row = [("0", _solid(90)), ("0.5", _solid(91)), ("1", _solid(92))]
    grid, layout = draw_grid(codes, images, row)
    ncols = 5 if symmetric else 8
    assert len(codes) == 3 * ncols and grid.size == layout.size
    assert layout.cell == MIN_CELL  # 64 px images enlarged twice
    assert list(layout.column_labels) == [COLUMN_LABELS[h] for h in range(ncols)]
    assert list(layout.row_labels) == ["level", "from above", "from below", "LoRA weight"]
    assert sorted(layout.empty) == ["f14", "f23"]
    assert len(layout.cells) == len(codes) + 3
    # rows by vertical digit, columns by horizontal digit, labels above and left of them
    for code in codes:
        v, h = int(code[1]), int(code[2])
        left, top, right, bottom = layout.cells[code]
        assert (left, top) == (layout.cells[f"f0{h}"][0], layout.cells[f"f{v}0"][1])
        assert right - left == bottom - top == MIN_CELL
        cx, cy = layout.column_labels[COLUMN_LABELS[h]]
        assert left < cx < right and cy < layout.cells["f00"][1]
        assert layout.row_labels[["level", "from above", "from below"][v]][1] == (top + bottom) // 2
    assert layout.cells["weight 0"][1] > layout.cells["f20"][3]
    assert [layout.cells[f"weight {w}"][0] for w in ("0", "0.5", "1")] == [layout.cells[f"f0{h}"][0] for h in range(3)]
    # pictures land in their cells (enlarged with NEAREST: one solid colour), empty cells are grey
    for code, image in images.items():
        left, top, right, bottom = layout.cells[code]
        assert grid.crop((left, top, right, bottom)).getcolors() == [(MIN_CELL * MIN_CELL, image.getpixel((0, 0)))]
    left, top, right, bottom = layout.cells["f14"]
    assert grid.getpixel((left + 3, top + 3)) == (232, 232, 232)
    # labels are drawn: dark pixels around each label's centre
    for cx, cy in [*layout.column_labels.values(), *layout.row_labels.values()]:
        patch = grid.crop((cx - 12, cy - 6, cx + 12, cy + 6)).convert("L")
        assert min(patch.get_flattened_data()) < 100


def test_a_group_grid_is_the_weights_row_alone() -> None:
    from charfw.default_plugins.sample.angle_grid import draw_grid

    _grid, layout = draw_grid([], {}, [("0", _solid(1, 256)), ("1", _solid(2, 256))])
    assert list(layout.cells) == ["weight 0", "weight 1"] and layout.column_labels == {}
    assert layout.cell == 256 and list(layout.row_labels) == ["LoRA weight"]


# --- a quick build of krnk ---------------------------------------------------------------

QUICK_TRAIN = "  train: {plugin: lora, max_train_steps: 2, resolution: 64}\n"
SAMPLE = "  sample: {plugin: angle-grid, size: 64, steps: 4}\n"


def _records(ws: Path) -> dict[str, str]:
    """When each stage of krnk last ran, by ``part/stage``."""
    import json

    out = {}
    for path in sorted((ws / "build/krnk").glob("*/*/record.json")):
        out[f"{path.parent.parent.name}/{path.parent.name}"] = json.loads(path.read_text("utf-8"))["started"]
    return out


@pytest.mark.usefixtures("one_torch_thread")
def test_a_quick_build_samples_each_lora_and_reruns_only_when_asked(workspace: Path, run_cli) -> None:
    from charfw.generation.infotext import parse_infotext

    manifest = workspace / "characters/krnk.yaml"
    assert SAMPLE in manifest.read_text("utf-8")  # the example samples with these settings
    manifest.write_text(manifest.read_text("utf-8") + QUICK_TRAIN, "utf-8")
    code, out, err = run_cli("build", "krnk", cwd=workspace)
    assert code == 0, out + err
    for part, codes in (("face", 15), ("krnksf", 9)):
        folder = workspace / "build/krnk" / part / "sample"
        grid = Image.open(folder / "grid.png")
        assert grid.width > 5 * 128 and grid.height > 4 * 128
        shots = sorted(p.stem for p in folder.glob("*.png") if p.name != "grid.png")
        assert len([s for s in shots if not s.startswith("weight-")]) == codes
        assert [s for s in shots if s.startswith("weight-")] == ["weight-0", "weight-0.5", "weight-1"]
        lora = next((workspace / "build/krnk" / part / "compress").glob("*.safetensors")).stem
        for stem in shots:
            with Image.open(folder / f"{stem}.png") as image:
                assert image.size == (64, 64)
                params = parse_infotext(image.text["parameters"])
            assert (params.steps, params.width, params.height, params.seed) == (4, 64, 64, 0)
            assert params.prompt.startswith("krnk, " if part == "face" else "krnksf, school uniform")
            weight = stem.split("-", 1)[1] if stem.startswith("weight-") else "1"
            assert f"<lora:{lora}:{weight}" in params.prompt
            assert params.lora_hashes and params.clip_skip == 2
    before = _records(workspace)
    code, out, err = run_cli("build", "krnk", cwd=workspace)
    assert code == 0, out + err
    assert _records(workspace) == before
    manifest.write_text(manifest.read_text("utf-8").replace("steps: 4}", "steps: 4, seed: 7}"), "utf-8")
    code, out, err = run_cli("build", "krnk", cwd=workspace)
    assert code == 0, out + err
    after = _records(workspace)
    assert sorted(k for k in after if after[k] != before[k]) == ["face/sample", "krnksf/sample"]
    with Image.open(workspace / "build/krnk/face/sample/f00.png") as image:
        assert parse_infotext(image.text["parameters"]).seed == 7
