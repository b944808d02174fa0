"""``charfw adopt``: chosen draft candidates into a part's source folder, never replacing
a source image without --force, and never losing one."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image


def drafts(ws: Path, part: str, names: list[str]) -> Path:
    folder = ws / "build" / "krnk" / part / "draft"
    folder.mkdir(parents=True)
    for n, name in enumerate(names):
        Image.new("RGB", (16, 16), (n * 40, 0, 0)).save(folder / f"{name}.png")
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adopts_the_chosen_candidates_under_their_code(workspace: Path, run_cli) -> None:
    folder = drafts(workspace, "face", ["f05-0", "f05-1", "f06-0"])
    code, _, err = run_cli("adopt", "krnk", "face", "f05-1", "f06-0", cwd=workspace)
    assert code == 0, err
    faces = workspace / "characters/krnk/face"
    assert sha(faces / "f05.png") == sha(folder / "f05-1.png") and sha(faces / "f06.png") == sha(folder / "f06-0.png")
    assert "adopted 2 image(s)" in err


def test_an_existing_source_is_replaced_only_with_force_and_kept(workspace: Path, run_cli) -> None:
    folder = drafts(workspace, "face", ["f00-0", "f00-1"])
    source = workspace / "characters/krnk/face/f00.png"
    before = sha(source)
    code, _, err = run_cli("adopt", "krnk", "face", "f00-1", cwd=workspace)
    assert code == 3 and "f00 already has a source image (f00.png)" in err and len(err.strip().splitlines()) == 1
    assert sha(source) == before  # nothing written
    code, _, err = run_cli("adopt", "krnk", "face", "f00-1", "--force", cwd=workspace)
    assert code == 0, err
    assert sha(source) == sha(folder / "f00-1.png") and sha(folder / "replaced/f00.png") == before


def test_all_first_and_bad_names(workspace: Path, run_cli) -> None:
    drafts(workspace, "krnksf", ["b12-0", "b12-1", "b13-0", "b13-3"])
    code, _, err = run_cli("adopt", "krnk", "krnksf", "b13-3", "--all-first", cwd=workspace)
    assert code == 0, err
    bodies = workspace / "characters/krnk/krnksf"
    assert (bodies / "b12.png").is_file() and (bodies / "b13.png").is_file()
    for args, message in [
        (("krnk", "krnksf", "b14-0"), "no draft candidate 'b14-0'"),
        (("krnk", "nope", "b12-0"), "character 'krnk' has no part 'nope'; its parts: face, krnksf"),
        (("krnk", "face"), "name the candidates to adopt"),
        (("krnksf_tyankps", "krnksf", "b00-0"), "'krnksf_tyankps' is a group; its one part is 'group'"),
        (("krnksf_tyankps", "group", "b00-0"), "group 'krnksf_tyankps' has no folder for its own pictures"),
    ]:
        code, _, err = run_cli("adopt", *args, cwd=workspace)
        assert code == 3 and message in err, (args, err)
