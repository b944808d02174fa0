"""Manifest validation: every error names the file, the YAML path and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from charfw.build.workspace import Workspace
from charfw.errors import ManifestError

GOOD = """\
name: mia
keyword: mia
class_tokens: mia girl
repeats: 2
face:
  images: mia/face
  template: face
bodies:
  casual:
    images: mia/casual
    keyword: miac
    tags: [hoodie, jeans]
stages:
  background: {plugin: flat, colors: [black, white]}
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # messages show paths relative to the working folder, as a user sees them
    (tmp_path / "ws").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / "ws")


def write(ws: Path, text: str, name: str = "mia") -> Path:
    (ws / "characters").mkdir(parents=True, exist_ok=True)
    path = ws / "characters" / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(ws: Path, name: str = "mia") -> list[str]:
    with pytest.raises(ManifestError) as info:
        Workspace(ws).load(name)
    return info.value.problems


def plan_problems(ws: Path, name: str = "mia") -> list[str]:
    from charfw.build.plan import make_plan

    with pytest.raises(ManifestError) as info:
        make_plan(Workspace(ws), [name])
    return info.value.problems


def test_examples_load(workspace: Path) -> None:
    ws = Workspace(workspace)
    loaded = ws.load_all()
    assert sorted(lm.name for lm in loaded) == ["krnk", "krnksf_tyankps", "tyank"]
    krnk = ws.load("krnk").manifest
    assert krnk.keyword == "krnk" and list(krnk.bodies) == ["krnksf"]


def test_a_good_manifest_validates(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD)
    m = Workspace(tmp_path).load("mia").manifest
    assert m.repeats == 2 and m.bodies["casual"].tags == ["hoodie", "jeans"]


def test_unknown_template_names_file_path_and_line(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("template: face", "template: fcae"))
    assert problems(tmp_path) == [
        "characters/mia.yaml:7 face.template: unknown template 'fcae' (did you mean 'face'?); known: body, face"
    ]


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("  template: face", "  tempalte: face"))
    [line] = problems(tmp_path)
    assert line.startswith("characters/mia.yaml:7 face.tempalte: unknown key 'tempalte' (did you mean 'template'?)")
    assert "allowed here:" in line


def test_wrong_types_and_values(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("repeats: 2", "repeats: four").replace("keyword: miac", "keyword: [a, b]"))
    lines = problems(tmp_path)
    assert "characters/mia.yaml:4 repeats: expected a whole number, got 'four'" in lines
    assert any(x.startswith("characters/mia.yaml:11 bodies.casual.keyword: expected text") for x in lines)


def test_repeats_are_bounded(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("repeats: 2", "repeats: 1000000000000")
          .replace("    tags: [hoodie, jeans]", "    tags: [hoodie, jeans]\n    repeats: 1001"))
    lines = problems(tmp_path)
    assert "characters/mia.yaml:4 repeats: Input should be less than or equal to 1000" not in lines
    assert "characters/mia.yaml:4 repeats: should be less than or equal to 1000" in lines
    assert "characters/mia.yaml:13 bodies.casual.repeats: should be less than or equal to 1000" in lines


def test_body_defaults_cannot_collide_and_name_the_character(tmp_path: Path) -> None:
    from charfw.build.plan import character_parts
    from charfw.stage_context import PartInfo

    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("    keyword: miac\n", "")
          .replace("    tags: [hoodie, jeans]\n", "    tags: [hoodie, jeans]\n  miaswim:\n    images: mia/swim\n"))
    ws = Workspace(tmp_path)
    face, casual, swim = character_parts(ws, ws.load("mia"))
    assert (face.keyword, face.class_tokens) == ("mia", "mia girl")
    assert (casual.keyword, casual.class_tokens, casual.lora_name) == ("miacasual", "miacasual girl", "miacasual")
    assert (swim.keyword, swim.class_tokens) == ("miaswim", "miaswim girl")
    # a keyword written without the character's name: its files still carry it
    assert PartInfo(target="mia", name="casual", kind="body", keyword="casual", class_tokens="").lora_name \
        == "mia-casual"


def test_missing_required_key_points_at_the_parent(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("  images: mia/face\n", ""))
    assert problems(tmp_path) == ["characters/mia.yaml:5 face: missing required key 'images'"]


def test_tabs_are_reported_with_their_line(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("  template: face", "\ttemplate: face"))
    [line] = problems_or_error(tmp_path)
    assert line.startswith("characters/mia.yaml:7 YAML error: a tab character is used for indentation")


def problems_or_error(ws: Path) -> list[str]:
    from charfw.errors import CharfwError

    with pytest.raises(CharfwError) as info:
        Workspace(ws).load("mia")
    return str(info.value).splitlines()


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD + "repeats: 3\n")
    [line] = problems_or_error(tmp_path)
    assert line.startswith("characters/mia.yaml:15 repeats: key 'repeats' appears twice")


def test_stage_names_angle_codes_and_names(tmp_path: Path) -> None:
    text = (GOOD.replace("  background:", "  bakground:")
            .replace("  template: face\n", "  template: face\n  exclude: [f04, b00, x9]\n")
            .replace("  casual:", "  face:"))
    tmp_path = tmp_path / "ws"
    write(tmp_path, text)
    joined = "\n".join(problems(tmp_path))
    assert "characters/mia.yaml:8 face.exclude[2]: 'x9' is not an angle code like f00 or b24" in joined
    lines = problems(tmp_path)
    joined = "\n".join(lines)
    assert "stages: unknown stage 'bakground' (did you mean 'background'?)" in joined
    assert "bodies: a body cannot be called 'face'" in joined


def test_codes_must_belong_to_the_template(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("  template: face\n", "  template: face\n  exclude: [b04]\n"))
    [line] = problems(tmp_path)
    assert "exclude: 'b04' does not belong to template 'face'" in line


def test_the_name_must_match_the_file(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("name: mia", "name: other"))
    [line] = problems(tmp_path)
    assert line.startswith("characters/mia.yaml:1 name: name 'other' differs from the file name 'mia.yaml'")


def test_commas_in_keywords_and_bad_names(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("keyword: mia\n", "keyword: mia, girl\n").replace("  casual:", "  casual wear:"))
    lines = problems(tmp_path)
    assert any("keyword: keyword 'mia, girl' contains a comma" in x for x in lines)
    assert any("'casual wear' is not a valid name" in x for x in lines)


def test_stage_options_are_validated_by_the_chosen_plugin(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("colors: [black, white]", "colours: [black]"))
    [line] = plan_problems(tmp_path)
    assert line.startswith("characters/mia.yaml:14 stages.background.colours: unknown key 'colours' (did you mean 'colors'?)")


def test_stage_option_values_are_validated(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("colors: [black, white]", "colors: [blak]"))
    [line] = plan_problems(tmp_path)
    assert line.startswith("characters/mia.yaml:14 stages.background.colors: unknown colour 'blak'")


def test_part_stage_options_merge_over_the_character_block(tmp_path: Path) -> None:
    from charfw.build.plan import make_plan

    tmp_path = tmp_path / "ws"
    text = GOOD.replace("    tags: [hoodie, jeans]\n",
                        "    tags: [hoodie, jeans]\n    stages:\n      background: {colors: [gray]}\n")
    write(tmp_path, text)
    plan = make_plan(Workspace(tmp_path), ["mia"])
    colors = {s.part.name: s.chain[0].options.colors for s in plan.stages if s.spec.name == "background"}
    assert colors == {"face": ["black", "white"], "casual": ["gray"]}
    # an error in the part block points at the part block's line
    write(tmp_path, text.replace("{colors: [gray]}", "{colors: [gray], bogus: 1}"))
    [line] = plan_problems(tmp_path)
    assert line.startswith("characters/mia.yaml:14 bodies.casual.stages.background.bogus: unknown key 'bogus'")


def test_a_misspelled_plugin_name_is_a_manifest_error(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("plugin: flat", "plugin: flta"))
    [line] = plan_problems(tmp_path)
    assert line == ("characters/mia.yaml:14 stages.background.plugin: unknown background remover 'flta' "
                    "(did you mean 'flat'?); known: " + ", ".join(_names("background")))


def test_a_missing_model_file_names_the_line_and_the_one_folder_searched(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD + "model:\n  base: ../models/mine.safetensors\n")
    [line] = plan_problems(tmp_path)
    assert line == ("characters/mia.yaml:16 model.base: base model not found: no file or folder "
                    "models/mine.safetensors (a path here is relative to the manifest's folder, characters/); "
                    "put the model there or fix the path, or use a Hugging Face id or charfw:tiny-sd15")


def test_a_hub_model_that_cannot_be_loaded_stops_the_dry_run(workspace: Path, run_cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workspace / "empty-hub-cache"))
    path = workspace / "characters" / "krnk.yaml"
    path.write_text(path.read_text().replace("base: charfw:tiny-sd15", "base: someorg/some-model"))
    line = path.read_text().splitlines().index("  base: someorg/some-model") + 1
    code, _out, err = run_cli("build", "krnk", "--dry-run", cwd=workspace)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: characters/krnk.yaml:{line} model.base: base model 'someorg/some-model' is not "
                          "in the Hugging Face cache and cannot be downloaded: HF_HUB_OFFLINE is set; put its "
                          ".safetensors file at models/some-model.safetensors and give that path")


def test_a_hub_model_is_probed_once_with_a_short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    from charfw.training import model_sources

    calls = []

    def unreachable(self, repo_id, *, timeout=None, **kwargs):
        calls.append(timeout)
        raise ConnectionError("no route")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    model_sources._hub_problem.cache_clear()
    assert model_sources._hub_problem("org/a") == "huggingface.co cannot be reached (ConnectionError)"
    assert model_sources._hub_problem("org/a") is not None
    assert calls == [model_sources.HUB_TIMEOUT] and model_sources.HUB_TIMEOUT <= 5
    model_sources._hub_problem.cache_clear()


@pytest.mark.parametrize("folder", ["../../etc", "/etc"])
def test_images_outside_the_workspace_need_an_opt_in(tmp_path: Path, folder: str) -> None:
    from charfw.build.plan import make_plan

    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD.replace("images: mia/face", f"images: {folder}"))
    expected = (tmp_path / "characters" / folder).resolve()
    [line] = plan_problems(tmp_path)
    assert line == (f"characters/mia.yaml:6 face.images: the folder {expected} is outside the workspace (./); "
                    "move the images into the workspace, or allow it with images_outside_workspace: true at the "
                    "top of the manifest")
    write(tmp_path, "images_outside_workspace: true\n" + GOOD.replace("images: mia/face", f"images: {folder}"))
    plan = make_plan(Workspace(tmp_path), ["mia"])
    assert plan.parts()[0].images_dir == expected


def _names(kind: str) -> list[str]:
    from charfw.plugins import load_plugins

    return load_plugins(None).registry.names(kind)


def test_stages_that_cannot_be_switched_off(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD + "  ingest: off\n")
    [line] = plan_problems(tmp_path)
    assert line == "characters/mia.yaml:15 stages.ingest: the ingest stage cannot be switched off"


def test_only_chainable_stages_take_lists(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, GOOD + "  prepare: [square, square]\n")
    [line] = plan_problems(tmp_path)
    assert line == "characters/mia.yaml:15 stages.prepare: the prepare stage takes one plugin, not a list"


def test_group_members_are_checked(workspace: Path) -> None:
    path = workspace / "characters" / "krnksf_tyankps.yaml"
    path.write_text(path.read_text().replace("  - tyank/tyankps\n", "  - tyank/tyankpz\n  - nobody\n"))
    lines = problems(workspace, "krnksf_tyankps")
    assert lines == ["characters/krnksf_tyankps.yaml:10 members[2]: 'nobody' is not '<character>/<body>', for example krnk/krnksf"]
    path.write_text(path.read_text().replace("  - nobody\n", ""))
    [line] = plan_problems(workspace, "krnksf_tyankps")
    assert line == ("characters/krnksf_tyankps.yaml:9 members[1]: character 'tyank' has no body 'tyankpz'; "
                    "its bodies: tyankps")


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    write(tmp_path, "")
    assert problems(tmp_path) == ["characters/mia.yaml the file is empty; start from `charfw init NAME`"]
    write(tmp_path, "- a\n- b\n")
    assert problems(tmp_path) == ["characters/mia.yaml:1 expected a mapping of keys to values at the top, got a list"]
