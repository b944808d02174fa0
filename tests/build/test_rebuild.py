"""The engine's promise: after any edit, a rebuild gives exactly what a clean build of the
edited workspace gives, through train, merge and compress; an interrupted build, resumed,
ends with the files of an uninterrupted one.

Builds run in-process on the example character ``krnk`` with quick training (2 steps at
64 px on the tiny model). Outputs are compared file by file (sha256), ignoring only what
is not an output: the timings in records, TensorBoard event files, and the folders of
caches and build state (``build/.cache``, ``build/.charfw``). ``SOURCE_DATE_EPOCH`` fixes
the times in LoRA headers, as it does for any reproducible build.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from train_support import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = "  train: {plugin: lora, max_train_steps: 2, resolution: 64}\n"
FINAL = "build/krnk/krnksf/compress"


def build_digest(ws: Path) -> dict[str, str]:
    """sha256 of every output file under build/, records without their timings."""
    out: dict[str, str] = {}
    build = ws / "build"
    for path in sorted(build.rglob("*")):
        rel = path.relative_to(build).as_posix()
        if not path.is_file() or rel.startswith((".cache/", ".charfw/")) or "/logs/" in rel:
            continue
        if rel == "index.html" or path.name == "report.html" or "/.report/" in rel:
            continue  # the report shows timings and what was reused: a view of the build, not an output
        data = path.read_bytes()
        if path.name == "record.json":
            record = json.loads(data)
            record.pop("started", None)
            record.pop("seconds", None)
            record["output"].pop("summary", None)  # its lines say how long training took
            data = json.dumps(record, sort_keys=True).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def final_lora(digest: dict[str, str], part: str = "krnksf") -> str:
    (key,) = [k for k in digest if k.startswith(f"krnk/{part}/compress/") and k.endswith(".safetensors")]
    return digest[key]


def clean_build_dir(ws: Path) -> None:
    """Remove every output and cache, keeping the tiny model built on first use."""
    if not (ws / "build").is_dir():
        return
    for entry in (ws / "build").iterdir():
        if entry.name != ".cache":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for entry in (ws / "build" / ".cache").iterdir() if (ws / "build" / ".cache").is_dir() else []:
        if entry.name != "models":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def clean_build(ws: Path, run_cli, target: str = "krnk") -> dict[str, str]:
    """A clean build of the workspace as it is now, in the same place."""
    clean_build_dir(ws)
    code, out, err = run_cli("build", target, cwd=ws)
    assert code == 0, out + err
    return build_digest(ws)


def edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert old in text, (old, path)
    path.write_text(text.replace(old, new, 1), "utf-8")


def repaint_one_image(ws: Path) -> None:
    path = ws / "characters/krnk/face/f00.png"
    image = Image.open(path)
    image.load()
    image.putpixel((image.width // 2, image.height // 2), (255, 0, 0, 255) if image.mode == "RGBA" else (255, 0, 0))
    image.save(path)


def add_caption_rule(ws: Path) -> None:
    from charfw.build.template_library import TemplateLibrary

    rules = TemplateLibrary(None).find("tags/angle-rules.yaml").read_text("utf-8")
    dest = ws / "templates/tags/angle-rules.yaml"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(rules + "  - when: {set: [body]}\n    tags: [cat tail]\n", "utf-8")


MANIFEST = "characters/krnk.yaml"

#: (name, edit): each changes the final body LoRA
EDITS: list[tuple[str, Callable[[Path], None]]] = [
    ("one image", repaint_one_image),
    ("one caption rule", add_caption_rule),
    ("one tag", lambda ws: edit_text(ws / MANIFEST, "pleated skirt]", "pleated skirt, hoodie]")),
    ("keyword", lambda ws: edit_text(ws / MANIFEST, "keyword: krnksf", "keyword: mykrnksf")),
    ("class tokens", lambda ws: edit_text(ws / MANIFEST, "class_tokens: krnksf girl", "class_tokens: krnksf catgirl")),
    ("a plugin option", lambda ws: edit_text(ws / MANIFEST, "colors: [black]", "colors: [white]")),
    ("a tagger added", lambda ws: edit_text(ws / MANIFEST, "  tag: angle-rules",
                                            "  tag: [angle-rules, {plugin: common-tag, tags: [cat ears]}]")),
    ("a train option", lambda ws: edit_text(ws / MANIFEST, "max_train_steps: 2", "max_train_steps: 3")),
]


@pytest.fixture
def quick_ws(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # fixed header times: builds of the same workspace are then identical byte for byte
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
    manifest = workspace / MANIFEST
    manifest.write_text(manifest.read_text("utf-8") + QUICK, "utf-8")
    return workspace


def test_rebuild_after_each_edit_equals_a_clean_build(quick_ws: Path, run_cli) -> None:
    code, out, err = run_cli("build", "krnk", cwd=quick_ws)
    assert code == 0, out + err
    before = build_digest(quick_ws)
    for name, edit in EDITS:
        edit(quick_ws)
        code, out, err = run_cli("build", "krnk", cwd=quick_ws)
        assert code == 0, f"{name}: {out + err}"
        rebuilt = build_digest(quick_ws)
        assert final_lora(rebuilt) != final_lora(before), f"{name}: the body LoRA was not rebuilt\n{out}"
        clean = clean_build(quick_ws, run_cli)
        differ = sorted(k for k in set(rebuilt) | set(clean) if rebuilt.get(k) != clean.get(k))
        assert not differ, f"after '{name}' the rebuild differs from a clean build in {differ}"
        before = clean


GROUP = "characters/krnksf_tyankps.yaml"


def test_a_groups_own_pictures_rebuild_as_a_clean_build(quick_ws: Path, run_cli) -> None:
    """A group with its own pictures: adding one (which also changes the captions' group
    tags) gives, rebuilt, exactly a clean build of the group (members included)."""
    # quick training and no samples (the sample stage reads the LoRA the test compares)
    sample = "  sample: {plugin: angle-grid, size: 64, steps: 4}\n"
    edit_text(quick_ws / MANIFEST, sample, "")
    edit_text(quick_ws / "characters/tyank.yaml", sample, QUICK)
    edit_text(quick_ws / GROUP, sample, QUICK)
    edit_text(quick_ws / GROUP, "stages:", "images: pictures\ntags: [2girls]\n\nstages:")
    pictures = quick_ws / "characters/pictures"
    pictures.mkdir()
    shutil.copy(quick_ws / "characters/krnk/krnksf/b00.png", pictures / "b00.png")
    code, out, err = run_cli("build", "krnksf_tyankps", cwd=quick_ws)
    assert code == 0, out + err

    def group_lora(digest: dict[str, str]) -> str:
        (key,) = [k for k in digest if k.startswith("krnksf_tyankps/group/compress/") and k.endswith(".safetensors")]
        return digest[key]

    before = build_digest(quick_ws)
    assert any(k.startswith("krnksf_tyankps/group/tag/") for k in before)
    shutil.copy(quick_ws / "characters/krnk/krnksf/b11.png", pictures / "b11.png")
    edit_text(quick_ws / GROUP, "tags: [2girls]", "tags: [2girls, side-by-side]")
    code, out, err = run_cli("build", "krnksf_tyankps", cwd=quick_ws)
    assert code == 0, out + err
    rebuilt = build_digest(quick_ws)
    assert group_lora(rebuilt) != group_lora(before), f"the group LoRA was not rebuilt\n{out}"
    assert all(rebuilt[k] == v for k, v in before.items() if k.startswith(("krnk/", "tyank/")) and "/record" not in k)
    clean = clean_build(quick_ws, run_cli, "krnksf_tyankps")
    differ = sorted(k for k in set(rebuilt) | set(clean) if rebuilt.get(k) != clean.get(k))
    assert not differ, f"the rebuild differs from a clean build in {differ}"


#: stage → (folder under build/krnk/face, how many writes there before the Ctrl-C)
INTERRUPTS = {
    "ingest": ("ingest", 0),
    "background": ("background", 4),
    "prepare": ("prepare", 4),
    "tag": ("tag", 4),
    "dataset": ("dataset", 6),
    "train": ("train", 0),
    "merge": ("merge", 0),
    "compress": ("compress", 0),
}


@pytest.mark.parametrize("stage", list(INTERRUPTS))
def test_ctrl_c_in_a_stage_then_rebuild_equals_an_uninterrupted_build(
    stage: str, quick_ws: Path, run_cli
) -> None:
    from charfw.build import atomic

    reference = clean_build(quick_ws, run_cli)
    clean_build_dir(quick_ws)
    folder, after = INTERRUPTS[stage]
    stage_dir = (quick_ws / "build/krnk/face" / folder).resolve()
    writes = {"n": 0}

    def interrupting(original: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args, **kwargs):
            if any(isinstance(a, str | Path) and stage_dir in Path(a).resolve().parents for a in args):
                writes["n"] += 1
                if writes["n"] > after:
                    raise KeyboardInterrupt
            return original(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in ("write_bytes", "write_text", "write_json", "link_or_copy", "copy_file", "atomic_path",
                     "atomic_dir"):
            patch.setattr(atomic, name, interrupting(getattr(atomic, name)))
        # the record is the last write of every stage, so even ingest (no other file) stops
        code, out, err = run_cli("build", "krnk", cwd=quick_ws)
    assert code == 130, out + err
    assert "interrupted" in err
    assert writes["n"] > after
    code, out, err = run_cli("build", "krnk", cwd=quick_ws)
    assert code == 0, out + err
    rebuilt = build_digest(quick_ws)
    differ = sorted(k for k in set(rebuilt) | set(reference) if rebuilt.get(k) != reference.get(k))
    assert not differ, f"a build interrupted in {stage} and resumed differs in {differ}"
