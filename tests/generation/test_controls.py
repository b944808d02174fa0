"""Control images per angle code: drawn OpenPose, the workspace's own files, canny edges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from charfw.build.template_library import TemplateLibrary
from charfw.errors import CharfwError
from charfw.generation.controls import canny_edges, control_image
from charfw.generation.openpose import draw_set


@pytest.fixture
def library(tmp_path: Path) -> TemplateLibrary:
    return TemplateLibrary(tmp_path / "templates")


def square_picture(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(255, 255, 255))
    return image


def test_canny_marks_the_square_outline_only() -> None:
    edges = np.asarray(canny_edges(square_picture()))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 1] == edges[..., 2]).all()
    on = np.argwhere(edges[..., 0] == 255)
    # every edge pixel lies on the square's border (one pixel either side), none inside or outside
    near_border = ((np.abs(on - 16) <= 1) | (np.abs(on - 47) <= 1)).any(axis=1)
    assert near_border.all() and len(on) > 100
    assert not canny_edges(Image.new("RGB", (32, 32), (90, 90, 90))).getbbox()  # flat: no edge


def test_transparency_counts_as_black() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    ImageDraw.Draw(rgba).rectangle((16, 16, 47, 47), fill=(255, 255, 255, 255))
    assert np.array_equal(np.asarray(canny_edges(rgba)), np.asarray(canny_edges(square_picture())))


def test_openpose_is_the_drawn_skeleton(library: TemplateLibrary) -> None:
    face = library.angle_sets["face"]
    image = control_image(library, face, "f02", "openpose", 96)
    assert image.mode == "RGB" and image.size == (96, 96)
    assert np.array_equal(np.asarray(image), np.asarray(draw_set(["f02"], 96, face.framing)["f02"].convert("RGB")))


def test_file_and_canny_come_from_the_workspace_templates(tmp_path: Path) -> None:
    controls = tmp_path / "templates" / "controls" / "body"
    controls.mkdir(parents=True)
    Image.new("RGB", (32, 48), (10, 200, 30)).save(controls / "b12.png")
    pictures = tmp_path / "templates" / "pictures" / "body"
    pictures.mkdir(parents=True)
    square_picture().save(pictures / "b00.png")
    library = TemplateLibrary(tmp_path / "templates")
    body = library.angle_sets["body"]
    image = control_image(library, body, "b12", "file", (64, 96))
    assert image.size == (64, 96) and image.getpixel((10, 10)) == (10, 200, 30)
    edges = control_image(library, body, "b00", "canny", 64)
    assert np.array_equal(np.asarray(edges), np.asarray(canny_edges(square_picture())))


def test_missing_files_and_bad_kinds_are_one_line(library: TemplateLibrary) -> None:
    face = library.angle_sets["face"]
    with pytest.raises(CharfwError) as missing:
        control_image(library, face, "f00", "file", 64)
    assert "templates/controls/face/f00.png is missing" in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(CharfwError, match=r"templates/pictures/face/f10\.png is missing"):
        control_image(library, face, "f10", "canny", 64)
    with pytest.raises(CharfwError, match="unknown control image kind 'depth'"):
        control_image(library, face, "f00", "depth", 64)
    with pytest.raises(CharfwError, match="canny thresholds"):
        canny_edges(square_picture(), 200, 100)


def test_a_group_control_puts_one_figure_per_member_side_by_side(library: TemplateLibrary) -> None:
    body = library.angle_sets["body"]
    one = np.asarray(control_image(library, body, "b11", "openpose", (66, 96)))
    three = np.asarray(control_image(library, body, "b11", "openpose", (200, 96), figures=3))
    assert three.shape == (96, 200, 3) and one.any()
    # three slots of 200 // 3 = 66 px, centred: a one-pixel margin each side
    assert not three[:, :1].any() and not three[:, -1:].any()
    for left in (1, 67, 133):
        assert np.array_equal(three[:, left:left + 66], one)
    with pytest.raises(CharfwError, match="no room for 3 figures"):
        control_image(library, body, "b11", "openpose", (16, 96), figures=3)
