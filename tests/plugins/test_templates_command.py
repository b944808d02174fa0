"""``charfw templates draw openpose``: a control image for every angle code, to look at."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def test_draws_every_code_of_every_set(workspace: Path, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "drawn"
    code, _, err = run_cli("templates", "draw", "openpose", "-o", out, "--size", "128", cwd=workspace)
    assert code == 0, err
    for name, prefix in (("face", "f"), ("body", "b")):
        files = sorted(p.name for p in (out / name).glob(f"{prefix}*.png"))
        assert len(files) == 24 and files[0] == f"{prefix}00.png" and files[-1] == f"{prefix}27.png"
        assert (out / name / "contact-sheet.png").is_file()
        image = Image.open(out / name / f"{prefix}00.png")
        assert image.size == (128, 128) and image.getbbox() is not None  # something is drawn
    assert "wrote 48 image(s)" in err


def test_symmetric_and_one_set(workspace: Path, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "drawn"
    code, _, err = run_cli("templates", "draw", "openpose", "-o", out, "--set", "face", "--symmetric",
                           "--size", "64", cwd=workspace)
    assert code == 0, err
    assert len(list((out / "face").glob("f*.png"))) == 15 and not (out / "body").exists()


def test_an_unknown_set_is_one_line(workspace: Path, run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("templates", "draw", "openpose", "-o", tmp_path / "x", "--set", "hands", cwd=workspace)
    assert code == 3
    assert err.strip() == "error: no angle set named hands; the sets are body, face"
