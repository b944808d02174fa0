"""The lint stage and `charfw lint`: one small workspace per finding, made here with exactly
that problem; the examples lint clean; `--strict` stops a build before training."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from charfw.lint import CHECKS

CODES = ("f00", "f01", "f02")


def figure(path: Path, size: tuple[int, int] = (512, 512)) -> None:
    """A character cut out on a transparent background, leaving the frame at the bottom."""
    w, h = size
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    draw.ellipse([w // 3, h // 8, 2 * w // 3, h // 2], fill=(240, 200, 180, 255))
    draw.rectangle([w // 4, h // 2, 3 * w // 4, h - 1], fill=(200, 160, 150, 255))
    im.save(path)


def make_ws(root: Path, *, face: str = "", stages: str = "", train: str = "") -> Path:
    """characters/mini.yaml: a face of three angles (f00, f01, f02) on black, clean for lint."""
    folder = root / "characters/mini/face"
    folder.mkdir(parents=True)
    for code in CODES:
        figure(folder / f"{code}.png")
    manifest = textwrap.dedent("""\
        name: mini
        keyword: mini
        class_tokens: mini girl
        symmetric: true
        repeats: 4
        model: {base: "charfw:tiny-sd15"}
        face:
          images: mini/face
          angles: [f00, f01, f02]
        """) + textwrap.indent(face, "  ") + "stages:\n" + textwrap.indent(textwrap.dedent("""\
        background: {plugin: flat, colors: [black]}
        dataset: {plugin: kohya-toml, color_aug: false}
        """) + stages + (train or "train: {plugin: lora, max_train_steps: 270}\n"), "  ")
    (root / "characters/mini.yaml").write_text(manifest)
    return root


def lint(ws: Path, run_cli, *args: str) -> tuple[int, str, list[dict]]:
    code, out, err = run_cli("lint", "mini", *args, cwd=ws)
    assert code in (0, 1), out + err
    findings = json.loads((ws / "build/mini/face/lint/findings.json").read_text())
    return code, out, findings


def checks(findings: list[dict]) -> list[tuple[str, str | None]]:
    return sorted((f["check"], f["code"]) for f in findings)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_ws(tmp_path / "ws")


def test_the_fixture_is_clean_and_findings_have_the_report_format(ws: Path, run_cli) -> None:
    code, out, findings = lint(ws, run_cli)
    assert (code, findings) == (0, [])
    assert "mini/face  no findings" in out
    # a finding: exactly the keys the report reads
    (ws / "characters/mini/face/f02.png").unlink()
    code, out, findings = lint(ws, run_cli)
    assert findings == [{"check": "angle-missing", "severity": "warning", "message": findings[0]["message"],
                         "file": None, "code": "f02"}]
    assert code == 0 and "angle-missing" in out and "1 warning(s)" in out  # warnings alone: exit 0
    assert lint(ws, run_cli, "--strict")[0] == 1


def test_angle_duplicate(ws: Path, run_cli) -> None:
    figure(ws / "characters/mini/face/f00-smile.png")
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("angle-duplicate", "f00")]
    assert findings[0]["file"] == "characters/mini/face/f00-smile.png"


def test_angle_unknown_outside_the_parts_list(ws: Path, run_cli) -> None:
    figure(ws / "characters/mini/face/f13.png")
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("angle-unknown", "f13")]


def test_angle_mirror_on_a_symmetric_character(ws: Path, run_cli) -> None:
    figure(ws / "characters/mini/face/f07.png")
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("angle-mirror", "f07")]
    assert "f01" in findings[0]["message"]


def test_background_border_left_by_the_background_stage(ws: Path, run_cli) -> None:
    rng = random.Random(1)
    im = Image.new("RGB", (512, 512))
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(512 * 512)])
    im.save(ws / "characters/mini/face/f01.png")  # opaque: the flat stage passes it through
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("background-border", "f01")]
    assert findings[0]["file"] == "characters/mini/face/f01.png"


def test_background_half_transparent_leftovers(ws: Path, run_cli) -> None:
    path = ws / "characters/mini/face/f01.png"
    im = Image.open(path)
    ImageDraw.Draw(im).rectangle([40, 300, 140, 500], fill=(90, 90, 90, 110))  # a 50 % haze
    im.save(path)
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("background-semi-transparent", "f01")]


def test_background_colour_the_captions_do_not_claim(tmp_path: Path, run_cli) -> None:
    ws = make_ws(tmp_path / "ws")
    manifest = ws / "characters/mini.yaml"
    manifest.write_text(manifest.read_text().replace("colors: [black]", "colors: [gray]"))
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("background-caption", c) for c in CODES]
    assert "says black or white background" in findings[0]["message"] and "is gray" in findings[0]["message"]


def test_caption_edited_by_hand(ws: Path, run_cli) -> None:
    lint(ws, run_cli)
    caption = next((ws / "build/mini/face/dataset/images").rglob("f00.txt"))
    caption.write_text(caption.read_text().replace(", smile", ""))
    _, _, findings = lint(ws, run_cli)  # the lint stage re-runs on the edited caption
    assert checks(findings) == [("caption-rules", "f00")]
    assert "missing 'smile'" in findings[0]["message"]
    assert findings[0]["file"].endswith("f00.txt")


def test_caption_tag_in_only_some_captions(tmp_path: Path, run_cli) -> None:
    # captions without the rules: a tag the rules put in all captions, in two of three
    ws = make_ws(tmp_path / "ws", stages="tag: {plugin: common-tag, tags: [mini, simple background]}\n")
    lint(ws, run_cli)
    caption = next((ws / "build/mini/face/dataset/images").rglob("f01.txt"))
    caption.write_text("mini")
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("caption-inconsistent", "f01")]
    assert "'simple background' is in 2 of the part's 3 captions" in findings[0]["message"]


def other_character(ws: Path, keyword: str) -> None:
    (ws / "characters/other.yaml").write_text(f"name: other\nkeyword: {keyword}\nface:\n  images: other/face\n")


def test_keyword_of_another_character_in_captions(ws: Path, run_cli) -> None:
    other_character(ws, "otto")
    lint(ws, run_cli)
    caption = next((ws / "build/mini/face/dataset/images").rglob("f01.txt"))
    caption.write_text(caption.read_text().replace("mini, ", "mini, otto, "))
    assert checks(lint(ws, run_cli)[2]) == [("caption-rules", "f01"), ("keyword-foreign", "f01")]
    # from the manifest's tags: one finding for the part, an error (exit 1)
    manifest = ws / "characters/mini.yaml"
    manifest.write_text(manifest.read_text().replace("  angles:", "  tags: [otto]\n  angles:"))
    code, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("keyword-foreign", None)] and code == 1
    assert findings[0]["severity"] == "error" and "other/face" in findings[0]["message"]


def test_keyword_collision_between_characters(ws: Path, run_cli) -> None:
    other_character(ws, "mini")
    code, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("keyword-collision", None)] and code == 1
    assert "other/face" in findings[0]["message"]


def test_image_smaller_than_its_resolution_class(ws: Path, run_cli) -> None:
    figure(ws / "characters/mini/face/f01.png", (200, 200))
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("size-upscaled", "f01")]
    assert "200x200" in findings[0]["message"] and "512" in findings[0]["message"]


def test_very_different_aspect_ratio(tmp_path: Path, run_cli) -> None:
    ws = make_ws(tmp_path / "ws", stages="prepare: off\n")
    figure(ws / "characters/mini/face/f01.png", (512, 1024))
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("size-aspect", "f01")]


def test_steps_per_image_far_from_the_method(tmp_path: Path, run_cli) -> None:
    ws = make_ws(tmp_path / "ws", train="train: {plugin: lora, max_train_steps: 5000}\n")
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("train-steps", None)]
    assert "5000 steps on 3 images is 1667 steps per image" in findings[0]["message"]
    # the tiny model's quick default length is not the user's choice: not checked
    ws2 = make_ws(tmp_path / "ws2", train="train: lora\n")
    assert lint(ws2, run_cli)[2] == []


def test_color_aug_with_cached_latents(tmp_path: Path, run_cli) -> None:
    ws = make_ws(tmp_path / "ws")
    manifest = ws / "characters/mini.yaml"
    manifest.write_text(manifest.read_text().replace(", color_aug: false", ""))
    _, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("train-color-aug", None)]
    manifest.write_text(manifest.read_text().replace("max_train_steps: 270", "max_train_steps: 270, cache_latents: 'off'"))
    assert lint(ws, run_cli)[2] == []


def test_every_check_has_a_test() -> None:
    source = Path(__file__).read_text()
    assert [c for c in CHECKS if f'"{c}"' not in source] == []


def test_strict_build_stops_before_training(ws: Path, run_cli) -> None:
    (ws / "characters/mini/face/f02.png").unlink()
    code, out, err = run_cli("build", "mini", "--until", "lint", cwd=ws)
    assert code == 0 and "0 error(s), 1 warning(s)" in out and "angle-missing: f02: no image" in out
    code, out, err = run_cli("build", "mini", "--strict", cwd=ws)
    assert code == 3
    assert "lint found 1 problem(s); --strict stops before training" in err
    assert "warning angle-missing: f02: no image for f02" in err
    assert not (ws / "build/mini/face/train").exists()


def test_lint_runs_only_when_its_inputs_change(ws: Path, run_cli) -> None:
    run_cli("build", "mini", "--until", "lint", cwd=ws)
    code, out, _ = run_cli("build", "mini", "--until", "lint", cwd=ws)
    assert code == 0 and "Nothing to do" in out
    manifest = ws / "characters/mini.yaml"  # a train option is a lint input; training is not run
    manifest.write_text(manifest.read_text().replace("max_train_steps: 270", "max_train_steps: 5000"))
    code, out, err = run_cli("build", "mini", "--until", "lint", cwd=ws)
    assert "mini/face: lint (method): settings of the part's other stages" in err
    assert out.count(" ran ") == 1
    # a stage after training is not a lint input
    manifest.write_text(manifest.read_text() + "  merge: {plugin: block-weights, weights: BODY}\n")
    code, out, _ = run_cli("build", "mini", "--until", "lint", cwd=ws)
    assert code == 0 and "Nothing to do" in out


def test_the_examples_lint_clean(workspace: Path, run_cli) -> None:
    code, out, err = run_cli("lint", cwd=workspace)
    assert code == 0, out + err
    assert "no findings in 5 part(s)" in out


def test_hook_register_linters(ws: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "plugins").mkdir()
    (ws / "plugins/front_only.py").write_text(textwrap.dedent("""\
        import charfw

        class FrontOnly(charfw.Linter):
            name = "front-only"
            description = "a test linter"

            def lint(self, ctx, options):
                return [charfw.Finding("front-only", "error", "not a front view", i.source, i.code)
                        for i in ctx.input("images").items if not i.code.endswith("0")]

        @charfw.hookimpl
        def register_linters(register):
            register(FrontOnly())
        """))
    monkeypatch.setenv("CHARFW_PLUGINS", "front_only")
    manifest = ws / "characters/mini.yaml"
    manifest.write_text(manifest.read_text() + "  lint: [method, front-only]\n")
    code, _, findings = lint(ws, run_cli)
    assert checks(findings) == [("front-only", "f01"), ("front-only", "f02")] and code == 1
