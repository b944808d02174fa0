"""Planning and fingerprints: what re-runs when one image, one option, one plugin's code or
one rules file changes, and why the plan says it does."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_build import stage_status
from test_rebuild import QUICK, add_caption_rule, edit_text, repaint_one_image
from train_support import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = ("ingest", "background", "prepare", "tag", "dataset", "train", "merge", "compress")


@pytest.fixture
def built(workspace: Path, run_cli) -> Path:
    manifest = workspace / "characters/krnk.yaml"
    manifest.write_text(manifest.read_text("utf-8") + QUICK, "utf-8")
    code, out, err = run_cli("build", "krnk", cwd=workspace)
    assert code == 0, out + err
    return workspace


def plan(ws: Path, run_cli, part: str) -> dict[str, str]:
    code, out, err = run_cli("build", "krnk", "--dry-run", cwd=ws)
    assert code == 0, out + err
    return {stage: stage_status(out, part, stage) for stage in STAGES}


def reasons(ws: Path, run_cli) -> str:
    code, out, err = run_cli("build", "krnk", cwd=ws)
    assert code == 0, out + err
    return err


def test_one_image_re_runs_its_part_through_compress(built: Path, run_cli) -> None:
    repaint_one_image(built)
    assert plan(built, run_cli, "krnk/face")["ingest"] == "would run"
    err = reasons(built, run_cli)
    assert "krnk/face: ingest (folder): inputs changed (f00.png)" in err
    # the dataset's output is its content: the new image re-runs training and what follows
    for stage in ("train", "merge", "compress"):
        assert f"krnk/face: {stage} " in err and f"krnk/krnksf: {stage} " in err, err
    assert "upstream output changed" in err


def test_a_body_tag_reaches_the_captions_and_the_lora(built: Path, run_cli) -> None:
    edit_text(built / "characters/krnk.yaml", "pleated skirt]", "pleated skirt, hoodie]")
    before = plan(built, run_cli, "krnk/face")
    assert set(before.values()) == {"up to date"}  # the face does not change
    err = reasons(built, run_cli)
    assert "krnk/krnksf: tag (angle-rules): manifest changed (tags)" in err
    caption = (built / "build/krnk/krnksf/tag/captions/b00.txt").read_text("utf-8")
    assert caption.startswith("krnksf, school uniform, serafuku, red neckerchief, pleated skirt, hoodie,")
    assert "krnk/krnksf: train (lora)" in err


def test_keyword_change_is_in_every_caption(built: Path, run_cli) -> None:
    edit_text(built / "characters/krnk.yaml", "keyword: krnksf", "keyword: mykrnksf")
    reasons(built, run_cli)
    captions = list((built / "build/krnk/krnksf/tag/captions").glob("*.txt"))
    assert captions and all(p.read_text("utf-8").startswith("mykrnksf,") for p in captions)
    dataset = list((built / "build/krnk/krnksf/dataset/images").rglob("b*.txt"))
    assert dataset and all(p.read_text("utf-8").startswith("mykrnksf,") for p in dataset)


def test_a_rules_file_re_runs_tag_and_training(built: Path, run_cli) -> None:
    add_caption_rule(built)
    err = reasons(built, run_cli)
    assert "krnk/krnksf: tag (angle-rules): inputs changed" in err
    assert "cat tail" in (built / "build/krnk/krnksf/tag/captions/b00.txt").read_text("utf-8")
    assert "krnk/krnksf: train (lora): upstream output changed" in err


def test_a_plugin_option_re_runs_only_from_its_stage(built: Path, run_cli) -> None:
    edit_text(built / "characters/krnk.yaml", "prepare: {plugin: square, mode: pad}",
              "prepare: {plugin: square, mode: pad, size: 256}")
    status = plan(built, run_cli, "krnk/face")
    assert [status[s] for s in ("ingest", "background")] == ["up to date"] * 2
    assert status["prepare"] == "would run"
    err = reasons(built, run_cli)
    assert "krnk/face: prepare (square): options changed" in err


PLUGIN = '''
import charfw
from charfw.components import Tagger


class Marker(Tagger):
    name = "marker"
    needs_pixels = False

    def tag(self, ctx, options, items, images, tags_so_far):
        return [["MARK"] for _ in items]


@charfw.hookimpl
def register_taggers(register):
    register(Marker())
'''


def test_editing_a_workspace_plugin_re_runs_its_stage_without_a_version_bump(
    built: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from charfw import plugins

    monkeypatch.setenv("CHARFW_PLUGINS", "marker")
    (built / "plugins").mkdir()
    plugin = built / "plugins" / "marker.py"
    plugin.write_text(PLUGIN.replace("MARK", "marked v1"), "utf-8")
    edit_text(built / "characters/krnk.yaml", "  tag: angle-rules", "  tag: [angle-rules, marker]")
    reasons(built, run_cli)
    caption = built / "build/krnk/face/tag/captions/f00.txt"
    assert caption.read_text("utf-8").endswith(", marked v1")
    plugin.write_text(PLUGIN.replace("MARK", "marked v2"), "utf-8")  # same component version
    plugins.reset()  # a new process, as a user's next `charfw build`
    err = reasons(built, run_cli)
    assert "krnk/face: tag (angle-rules + marker): plugin code changed" in err
    assert caption.read_text("utf-8").endswith(", marked v2")
    assert "krnk/face: train (lora): upstream output changed" in err


def test_a_no_op_rebuild_runs_nothing(built: Path, run_cli) -> None:
    code, out, err = run_cli("build", "krnk", cwd=built)
    assert code == 0 and "Nothing to do" in out + err
