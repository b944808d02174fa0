"""rembg background removal: rembg's own sessions on pre-seeded stand-ins in a temporary models folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from charfw.errors import CharfwError, MissingDependency

CPU = ["CPUExecutionProvider"]


def figure(w: int = 300, h: int = 200, color=(200, 30, 30), shift: int = 0) -> Image.Image:
    """A coloured ellipse on white: the stand-in model's foreground."""
    im = Image.new("RGB", (w, h), (255, 255, 255))
    ImageDraw.Draw(im).ellipse((40 + shift, 30, w - 60 + shift, h - 20), fill=color)
    return im


@pytest.mark.parametrize("model", ["u2net", "isnet-anime", "birefnet-general"])
def test_fast_path_matches_rembg_own_predict(rembg_home: Path, model: str) -> None:
    import rembg

    from charfw.prep.rembg import Segmenter

    if model == "birefnet-general":  # the 1024 stand-in under BiRefNet's name (logits → sigmoid)
        shutil.copy(rembg_home / "isnet-anime.onnx", rembg_home / "birefnet-general.onnx")
    seg = Segmenter(model, providers=CPU)
    assert seg.params is not None and seg.params.sigmoid == (model == "birefnet-general")
    assert seg.params is not None and seg.params.size == (320 if model == "u2net" else 1024)
    images = [figure(), figure(257, 311, (20, 20, 160), 7)]
    ours = seg.masks(images)
    for image, mask in zip(images, ours, strict=True):
        # rembg's own predict and remove(): the same mask, up to the resampling filter
        theirs = np.asarray(seg.session.predict(image)[0], dtype=np.int16)
        alpha = np.asarray(rembg.remove(image, session=seg.session).getchannel("A"), dtype=np.int16)
        mine = np.asarray(mask, dtype=np.int16)
        for other in (theirs, alpha):
            assert np.abs(mine - other).mean() < 2.0
            inter = ((mine > 127) & (other > 127)).sum()
            union = ((mine > 127) | (other > 127)).sum()
            assert inter / union > 0.98
    cut = seg.cutouts(images[:1])[0]
    a = np.asarray(cut)
    assert cut.mode == "RGBA" and a[100, 150, 3] > 250 and a[5, 5, 3] < 5  # subject kept, white gone
    assert tuple(a[100, 150, :3]) == (200, 30, 30)  # straight alpha: the subject's own colour


def test_dynamic_batch_runs_once_per_batch(rembg_home: Path, standins: Path) -> None:
    from charfw.prep.rembg import Segmenter

    shutil.copy(standins / "mask-dynamic.onnx", rembg_home / "seg.onnx")
    seg = Segmenter(str(rembg_home / "seg.onnx"), model_type="u2net", providers=CPU)
    assert seg.name == "u2net_custom" and seg.fixed_batch is None
    calls = []
    real = seg.session.inner_session

    class Counting:
        def run(self, names, feeds):
            calls.append(next(iter(feeds.values())).shape[0])
            return real.run(names, feeds)

    seg.session.inner_session = Counting()
    images = [figure(shift=s) for s in range(0, 40, 8)]
    batched = seg.masks(images)
    assert calls == [5]
    singles = [seg.masks([im])[0] for im in images]
    for a, b in zip(batched, singles, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_custom_model_outside_the_models_folder_is_one_line(rembg_home: Path, standins: Path,
                                                            tmp_path: Path) -> None:
    from charfw.prep.rembg import Segmenter

    outside = tmp_path / "elsewhere" / "seg.onnx"
    outside.parent.mkdir()
    shutil.copy(standins / "u2net.onnx", outside)
    with pytest.raises(CharfwError) as err:
        Segmenter(str(outside), model_type="u2net", providers=CPU)
    assert "only loads custom model files from its models folder" in str(err.value)
    assert str(rembg_home) in str(err.value)
    with pytest.raises(CharfwError, match="unknown rembg model 'u3net'"):
        Segmenter("u3net", providers=CPU)


def test_missing_model_is_never_downloaded_silently(rembg_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from charfw.prep.rembg import Segmenter

    (rembg_home / "u2net.onnx").unlink()
    with pytest.raises(CharfwError) as err:
        Segmenter("u2net", providers=CPU, download=False)
    text = str(err.value)
    assert "\n" not in text and f"put u2net.onnx at {rembg_home / 'u2net.onnx'}" in text
    # allowed to download, but there is no network: one line, after saying what it tried
    from charfw.prep.model_files import OFFLINE_FLAGS

    for flag in OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    with pytest.raises(CharfwError) as err:
        Segmenter("u2net", providers=CPU, download=True)
    assert "downloading u2net.onnx" in capsys.readouterr().err
    text = str(err.value)
    assert "missing and could not be downloaded" in text and "\n" not in text
    assert f"put u2net.onnx at {rembg_home / 'u2net.onnx'}" in text
    monkeypatch.setenv("CHARFW_OFFLINE", "1")
    with pytest.raises(CharfwError, match=r"missing \(offline\)"):
        Segmenter("u2net", providers=CPU, download=True)


def test_import_guard_turns_exits_into_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from charfw.prep.rembg import import_rembg

    for name in [m for m in sys.modules if m == "rembg" or m.startswith("rembg.")]:
        monkeypatch.delitem(sys.modules, name)
    fake = tmp_path / "fake" / "rembg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import sys\nprint('No onnxruntime backend found.')\nsys.exit(1)\n")
    monkeypatch.syspath_prepend(str(fake.parent))
    with pytest.raises(MissingDependency, match="pip install 'charfw\\[prep\\]'"):
        import_rembg()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # onnxruntime itself missing
    with pytest.raises(MissingDependency, match="'onnxruntime'"):
        import_rembg()


def test_command_resumes_and_survives_bad_files(tmp_path: Path, rembg_home: Path, run_cli, bad_inputs) -> None:
    src = tmp_path / "src"
    files = bad_inputs(src)
    figure().save(src / "girl.png")
    figure(color=(20, 160, 20)).save(src / "girl2.jpg", quality=95)
    out = tmp_path / "out"
    code, stdout, err = run_cli("cutout", src, "-o", out, "-m", "u2net", "-c", "white", "-c", "black")
    assert code == 0, err
    assert "broken.png" in err and "skipped 1 file(s)" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}-{c}.png" for stem in ("anim", "deep", "dot", "girl", "girl2", "print") for c in ("white", "black"))
    white, black = Image.open(out / "girl-white.png"), Image.open(out / "girl-black.png")
    assert white.mode == black.mode == "RGB"
    assert white.getpixel((5, 5)) == (255, 255, 255) and black.getpixel((5, 5)) == (0, 0, 0)
    for im in (white, black):  # the subject keeps its colour on both (alpha ~254 in the middle)
        assert np.abs(np.subtract(im.getpixel((150, 100)), (200, 30, 30))).max() <= 2
    assert "3 had nothing to separate" in stdout  # the uniform ones (1x1, CMYK, GIF) are kept whole
    code, stdout, _ = run_cli("cutout", src, "-o", out, "-m", "u2net", "-c", "white", "-c", "black")
    assert code == 0 and "wrote 0 image(s)" in stdout and "6 already done" in stdout
    assert sorted(p.name for p in src.iterdir()) == sorted([*(f.name for f in files.values()), "girl.png", "girl2.jpg"])
    code, _, err = run_cli("cutout", src, "-o", src, "-m", "u2net")
    assert code == 3 and "the output folder is a source folder" in err
    code, _, err = run_cli("cutout", src, "-o", tmp_path / "strict", "-m", "u2net", "--strict")
    assert code == 3 and "broken.png" in err
    code, stdout, _ = run_cli("cutout", src / "girl.png", "-o", tmp_path / "alpha", "-m", "u2net")
    assert Image.open(tmp_path / "alpha" / "girl.png").mode == "RGBA"


REMBG_STAGE = "  background: {plugin: rembg, model: u2net, colors: [white, black], keep_transparency: false}\n"


def test_build_uses_one_session_for_every_part(workspace: Path, rembg_home: Path, run_cli,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import charfw.prep.rembg as rc
    from charfw.stage_context import ModelCache

    manifest = workspace / "characters" / "krnk.yaml"
    text = manifest.read_text("utf-8").replace("  background: {plugin: flat, colors: [black]}\n", REMBG_STAGE)
    manifest.write_text(text, "utf-8")
    made = []
    real_init = rc.Segmenter.__init__

    def counting_init(self, *args, **kwargs):
        made.append(args[0])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(rc.Segmenter, "__init__", counting_init)
    caches = []  # the model caches the session was asked from
    real_get = ModelCache.get

    def recording_get(self, key, factory):
        caches.append(self)
        return real_get(self, key, factory)

    monkeypatch.setattr(ModelCache, "get", recording_get)
    code, out, err = run_cli("-C", workspace, "build", "krnk", "--until", "background")
    assert code == 0, err
    assert made == ["u2net"]  # face and body: one session
    assert caches and all(len(c) == 0 for c in caches)  # released when the build finished
    face = sorted((workspace / "build" / "krnk" / "face" / "background").glob("*.png"))
    assert len(face) == 30 and any("-white." in p.name for p in face) and any("-black." in p.name for p in face)
    # the rebuild finds the model file without asking rembg (whose import takes seconds) ...
    monkeypatch.setattr(rc, "session_classes", lambda: pytest.fail("rembg was asked where its models are"))
    code, out, _ = run_cli("-C", workspace, "build", "krnk", "--until", "background")
    assert "Nothing to do" in out and made == ["u2net"]
    # ... and still sees a new model file
    (rembg_home / "u2net.onnx").write_bytes((rembg_home / "u2net.onnx").read_bytes() + b"\0")
    code, out, _ = run_cli("-C", workspace, "build", "krnk", "--until", "background", "--dry-run")
    assert "Nothing to do" not in out and "background" in out
