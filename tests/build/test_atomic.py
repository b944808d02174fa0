"""Atomic writes: a file or folder appears complete or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from charfw.build import atomic


def test_write_replaces_in_one_step(tmp_path: Path) -> None:
    dest = tmp_path / "a.txt"
    atomic.write_text(dest, "one")
    atomic.write_text(dest, "two", fsync=True)
    assert dest.read_text() == "two" and list(tmp_path.iterdir()) == [dest]


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(dest) as tmp:
        tmp.write_text("half")
        assert tmp.name.startswith(".model.tmp-") and tmp.suffix == ".safetensors"
        raise RuntimeError("crash")
    assert dest.read_text() == "old" and list(tmp_path.iterdir()) == [dest]


def test_folders_are_swapped_whole(tmp_path: Path) -> None:
    dest = tmp_path / "images"
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "a.png").write_text("a")
    with pytest.raises(RuntimeError), atomic.atomic_dir(dest) as tmp:
        (tmp / "b.png").write_text("b")
        raise RuntimeError
    assert [p.name for p in dest.iterdir()] == ["a.png"]
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "c.png").write_text("c")
    assert [p.name for p in dest.iterdir()] == ["c.png"] and sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_stale_temporaries_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".f00.tmp-123abc.png").write_text("x")
    (tmp_path / ".images.tmp-9").mkdir()
    (tmp_path / "f00.png").write_text("keep")
    assert atomic.remove_stale_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["f00.png"]


def test_links_share_build_files_and_copies_never_link(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_text("x")
    atomic.link_or_copy(src, tmp_path / "out" / "b")
    assert (tmp_path / "out" / "b").stat().st_ino == src.stat().st_ino
    atomic.copy_file(src, tmp_path / "c")
    assert (tmp_path / "c").stat().st_ino != src.stat().st_ino
