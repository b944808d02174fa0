"""The component contract, checked on every registered component of every kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from charfw.build.hashing import HashCache
from charfw.build.template_library import TemplateLibrary
from charfw.components import KINDS, Component
from charfw.errors import CharfwError
from charfw.plugins import load_plugins
from charfw.stage_context import PartInfo, StageContext


def _registered() -> list[tuple[str, Component]]:
    registry = load_plugins(None).registry
    return [(kind, reg.component) for kind in KINDS for reg in registry.components(kind)]


COMPONENTS = _registered()
IDS = [f"{kind}:{c.name}" for kind, c in COMPONENTS]


@pytest.mark.parametrize(("kind", "component"), COMPONENTS, ids=IDS)
def test_options_reject_unknown_keys(kind: str, component: Component) -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        component.Options.model_validate({"no_such_option": 1})


@pytest.mark.parametrize(("kind", "component"), COMPONENTS, ids=IDS)
def test_name_version_and_description_are_set(kind: str, component: Component) -> None:
    assert component.kind == kind
    for field in ("name", "version", "description"):
        value = getattr(component, field)
        assert isinstance(value, str) and value.strip(), f"{component!r} needs a {field}"


def _bare_context(tmp_path: Path, kind: str) -> StageContext:
    part = PartInfo(target="t", name="face", kind="face", keyword="t", class_tokens="t", template="face",
                    images_dir=tmp_path / "missing")
    return StageContext(workspace_root=tmp_path, part=part, stage=kind, stage_dir=tmp_path / "stage", inputs={},
                        cache_dir=tmp_path / "cache", hash_cache=HashCache(None), templates=TemplateLibrary(None))


#: the options a component cannot do without (a manifest must name them), for the check below
REQUIRED: dict[str, dict[str, object]] = {"drafter:controlnet": {"controlnet": "no-such-controlnet"}}


@pytest.mark.parametrize(("kind", "component"), COMPONENTS, ids=IDS)
def test_check_on_a_bare_context_raises_only_charfw_errors(kind: str, component: Component, tmp_path: Path) -> None:
    """Nothing exists (no images folder, no model file, no upstream output): ``check`` may
    refuse, but only with a one-line :class:`CharfwError`, never a traceback. A component
    with required options is checked with the values in ``REQUIRED``."""
    options = component.Options.model_validate(REQUIRED.get(f"{kind}:{component.name}", {}))
    try:
        component.check(_bare_context(tmp_path, kind), options)
    except CharfwError as exc:
        assert "\n" not in exc.message


#: stage and manifest block that put each built-in image-stage component through a build
RUNS = {
    "source:folder": ("ingest", None),
    "image_filter:dedup": ("filter", "filter: dedup"),
    "background:flat": ("background", "background: {plugin: flat, colors: [white]}"),
    "preparer:square": ("prepare", "prepare: {plugin: square, size: 64}"),
    "tagger:angle-rules": ("tag", "tag: angle-rules"),
    "tagger:common-tag": ("tag", "tag: [angle-rules, {plugin: common-tag, tags: [contract]}]"),
    "dataset_writer:kohya-toml": ("dataset", "dataset: kohya-toml"),
    "linter:method": ("lint", "lint: method"),
}
#: components that need model files or whole models: their own tests run them on tiny ones
ELSEWHERE = {
    "background:rembg": "tests/prep/test_rembg.py (tiny ONNX segmenter)",
    "tagger:wd14": "tests/prep/test_wd14.py (tiny ONNX tagger)",
    "tagger:blip": "tests/prep/test_blip.py (tiny BLIP)",
    "trainer:lora": "tests/build/test_rebuild.py and tests/training (tiny SD 1.5)",
    "block_merger:block-weights": "tests/build/test_rebuild.py and tests/plugins/test_lora_stages.py",
    "compressor:svd": "tests/build/test_rebuild.py and tests/plugins/test_lora_stages.py",
    "sampler:angle-grid": "tests/plugins/test_sample_grid.py (a quick build of krnk on tiny SD 1.5)",
    "drafter:controlnet": "tests/plugins/test_draft_stage.py (a quick build of krnk with a tiny ControlNet)",
}


def test_every_component_has_a_tiny_run() -> None:
    assert set(IDS) <= set(RUNS) | set(ELSEWHERE), "add the new component to RUNS or ELSEWHERE"


@pytest.mark.parametrize("component_id", [i for i in IDS if i in RUNS])
def test_component_survives_a_tiny_run_through_the_real_runner(component_id: str, workspace: Path, run_cli) -> None:
    stage, block = RUNS[component_id]
    manifest = workspace / "characters" / "krnk.yaml"
    text = manifest.read_text("utf-8")
    if block is not None:
        key = block.split(":", 1)[0]
        lines = [line for line in text.splitlines() if not line.startswith(f"  {key}:")]
        text = "\n".join(lines) + f"\n  {block}\n"
    manifest.write_text(text, "utf-8")
    code, out, err = run_cli("build", "krnk", "--until", stage, cwd=workspace)
    assert code == 0, out + err
    assert (workspace / "build/krnk/face" / stage / "record.json").is_file()
