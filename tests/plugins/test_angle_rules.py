"""The angle-rules tagger against the method's rules, written out again independently."""

from __future__ import annotations

from pathlib import Path

import pytest

from charfw.build.angles import AngleCode, parse_code
from charfw.build.hashing import HashCache
from charfw.build.items import ImageItem
from charfw.build.stages import tag_items
from charfw.build.template_library import TemplateLibrary
from charfw.stage_context import PartInfo, StageContext

METHOD_F00 = (
    "krnk, white background, black background, simple background, from horizontal, "
    "from front, upper body, standing, straight standing, nude, completely nude, bare shoulders, "
    "nipples, collarbone, abs, ribs, looking at viewer, smile, open mouth, blush"
)


def method_tags(keyword: str, extra: list[str], code: str) -> list[str]:
    """METHOD.md "Tags from the angle code", rule by rule (the seed's GenerateCharTag)."""
    kind, v, h = code[0], int(code[1]), int(code[2])
    h = {5: 3, 6: 2, 7: 1}.get(h, h)  # asymmetric codes follow the code they mirror
    face = kind == "f"
    tags = [keyword, *extra]
    tags += ["white background", "black background", "simple background"]
    tags += [["from horizontal"], ["from above"], ["from below"]][v]
    tags += ["from front"] if h in (0, 1) else ["from side"] if h == 2 else ["from behind"]
    tags += ["upper body"] if face else ["full body"]
    tags += ["standing", "straight standing"]
    if face:
        tags += ["nude", "completely nude", "bare shoulders"]
        if h in (0, 1, 2):
            tags += ["nipples", "collarbone", "abs", "ribs"]
        if h in (3, 4):
            tags += ["shoulder blades", "median furrow"]
        if (v == 1 and h in (0, 1, 2)) or (v == 2 and h in (0, 1)):
            tags += ["navel"]
    tags += ["looking at viewer"] if h == 0 else ["looking away"]
    tags += ["smile", "open mouth", "blush"]
    return tags


ALL_CODES = [f"{k}{v}{h}" for k in "fb" for v in range(3) for h in range(8)]


def tag(codes: list[str], keyword: str = "krnk", extra: tuple[str, ...] = (), tmp: Path | None = None):
    from charfw.plugins import load_plugins

    tagger = load_plugins(None).registry.get("tagger", "angle-rules")
    part = PartInfo(target="t", name="face", kind="face", keyword=keyword, class_tokens=f"{keyword} girl", tags=extra)
    ctx = StageContext(workspace_root=tmp or Path.cwd(), part=part, stage="tag", stage_dir=Path("."), inputs={},
                       cache_dir=Path("."), hash_cache=HashCache(None), templates=TemplateLibrary(None))
    items = [ImageItem(id=c, path=f"{c}.png", sha256="", source=f"{c}.png", code=c[:3] if parse_code(c) else None,
                       width=1, height=1) for c in codes]
    return tag_items(ctx, [(tagger, tagger.Options())], items), ctx


def test_the_method_example_for_f00() -> None:
    [item], _ = tag(["f00"])
    assert ", ".join(item.tags) == METHOD_F00


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_code_follows_the_method(code: str) -> None:
    [item], _ = tag([code], "tyank", ("ahoge", "green eyes"))
    assert item.tags == method_tags("tyank", ["ahoge", "green eyes"], code)


def test_mirrored_codes_are_tagged_as_the_code_they_mirror() -> None:
    items, _ = tag(["f16", "f12", "b25", "b23", "f07", "f01"])
    assert items[0].tags == items[1].tags
    assert items[2].tags == items[3].tags
    assert items[4].tags == items[5].tags


def test_free_text_after_the_code_and_case() -> None:
    items, _ = tag(["f00-smile2", "F00"])
    assert items[0].tags == items[1].tags == method_tags("krnk", [], "f00")


def test_names_without_a_code_are_reported_not_tagged() -> None:
    items, ctx = tag(["portrait", "f00"])
    assert items[0] is None and items[1] is not None
    assert ctx.problems == ["portrait.png: the name does not start with an angle code, so it cannot be tagged"]


def test_unknown_angle_set_letter_is_reported() -> None:
    items, ctx = tag(["x00"])
    assert items == [None]
    assert "no angle set uses the letter 'x'" in ctx.problems[0]


def test_parse_code() -> None:
    assert parse_code("f12-smile.png") == AngleCode("f", 1, 2)
    assert parse_code("B27") == AngleCode("b", 2, 7)
    assert parse_code("f30") is None and parse_code("f08") is None and parse_code("00f") is None
    assert AngleCode("f", 2, 6).mirrored().code == "f22"


def test_a_workspace_can_edit_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "templates" / "tags"
    rules.mkdir(parents=True)
    (rules / "angle-rules.yaml").write_text("rules:\n  - when: {h: [0]}\n    tags: [front view]\n  - tags: ['{framing}']\n")
    from charfw.plugins import load_plugins

    tagger = load_plugins(None).registry.get("tagger", "angle-rules")
    part = PartInfo(target="t", name="face", kind="face", keyword="k", class_tokens="k")
    lib = TemplateLibrary(tmp_path / "templates")
    ctx = StageContext(workspace_root=tmp_path, part=part, stage="tag", stage_dir=tmp_path, inputs={},
                       cache_dir=tmp_path, hash_cache=HashCache(None), templates=lib)
    items = [ImageItem(id=c, path=c, sha256="", source=c, code=c, width=1, height=1) for c in ("f00", "b01")]
    out = tag_items(ctx, [(tagger, tagger.Options())], items)
    assert [i.tags for i in out] == [["k", "front view", "upper body"], ["k", "full body"]]
    before = tagger.cache_key(ctx, tagger.Options())
    (rules / "angle-rules.yaml").write_text("rules: []\n")
    assert tagger.cache_key(ctx, tagger.Options()) != before  # an edited rules file re-runs the tag stage
