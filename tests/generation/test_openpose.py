"""OpenPose skeletons per angle code: the geometry against hand-computed numbers, the
mirrors, the framings, and the drawing against the reference's colours and shapes.

The expected numbers come from the model the module documents, worked out here by hand:
a 7.5-head figure (x to its left, y up, z forward), a pinhole camera 15 head units (full
body) or 10 (upper body) from the middle of the framed body, pitched ±30°, a uniform scale
that leaves a 0.06 margin on the tighter side. They are never taken from the module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from charfw.build.template_library import TemplateLibrary
from charfw.errors import CharfwError
from charfw.generation.openpose import (
    draw_angle_set,
    draw_openpose,
    draw_set,
    pose_for_code,
    write_set,
)

NAMES = [
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist",
    "RHip", "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar",
]  # fmt: skip
J = {name: i for i, name in enumerate(NAMES)}
FACE = ("Nose", "REye", "LEye", "REar", "LEar")
LOWER_LEGS = ("RKnee", "RAnkle", "LKnee", "LAnkle")
BODY = [n for n in NAMES if n not in FACE]

# the reference's colour table (section 7), RGB, row i = joint i = limb i + 1
REFERENCE_COLOURS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip
# the reference's limbs, 1-based as controlnet_aux writes them
REFERENCE_LIMBS_1_BASED = [
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
    (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
]  # fmt: skip

MARGIN = 0.06
TOL = 1e-9
C15 = math.cos(math.radians(15))
S15 = math.sin(math.radians(15))
C30 = math.cos(math.radians(30))


def pt(pose, name: str) -> tuple[float, float]:
    p = pose[J[name]]
    assert p is not None, f"{name} is hidden"
    return p


def dist(a: tuple[float, float], b: tuple[float, float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def mirrored_by_hand(pose):
    """x → 1 − x, R ↔ L, written out from the names."""
    out = []
    for name in NAMES:
        other = {"R": "L", "L": "R"}.get(name[0], "") + name[1:] if name[1].isupper() else name
        p = pose[J[other]]
        out.append(None if p is None else (1 - p[0], p[1]))
    return out


# --- the geometry ------------------------------------------------------------------------


def test_front_full_body_b00_matches_hand_projection() -> None:
    pose = pose_for_code("b00", framing="full body")
    assert all(p is not None for p in pose)
    # level camera at (0, 3.75, 15) aimed at (0, 3.75, 0); image x = x / depth, y = (y-3.75) / depth.
    # The extent runs from the top of the head (7.5) to the soles (0), both at depth 15:
    # height 7.5/15 = 0.5, centred on 0; the wrists (1.55 out) leave width to spare, so the
    # scale is (1 - 2*0.06) / 0.5.
    s = 0.88 / (7.5 / 15)
    assert pt(pose, "Nose") == pytest.approx((0.5, 0.5 - s * (6.8 - 3.75) / (15 - 0.45)), abs=TOL)
    assert pt(pose, "Neck") == pytest.approx((0.5, 0.5 - s * (6.2 - 3.75) / 15), abs=TOL)
    left, right = pt(pose, "LShoulder"), pt(pose, "RShoulder")
    assert left == pytest.approx((0.5 + s * 0.85 / 15, 0.5 - s * (6.1 - 3.75) / 15), abs=TOL)
    assert right == pytest.approx((1 - left[0], left[1]), abs=TOL)  # symmetric about the centre
    assert left[0] > 0.5  # the figure's left is on the viewer's right
    assert pt(pose, "LEye") == pytest.approx(
        (0.5 + s * 0.17 / (15 - 0.33), 0.5 - s * (7.0 - 3.75) / (15 - 0.33)), abs=TOL
    )
    assert pt(pose, "LEar") == pytest.approx((0.5 + s * 0.36 / 15, 0.5 - s * 3.2 / 15), abs=TOL)
    assert pt(pose, "LAnkle") == pytest.approx((0.5 + s * 0.4 / 15, 0.5 + s * 3.45 / 15), abs=TOL)
    # the soles (0.3 below the ankles) sit on the bottom margin
    assert 0.5 + s * 3.75 / 15 == pytest.approx(1 - MARGIN)


def test_side_b02_shoulders_overlap_and_far_eye_hidden() -> None:
    pose = pose_for_code("b02", framing="full body")
    # turned 90° counter-clockwise from above: the nose points to the image's right and the
    # figure's right side faces the camera; everything on the mid-plane lands on x = 0.5
    for r, left in (("RShoulder", "LShoulder"), ("RHip", "LHip"), ("RKnee", "LKnee")):
        assert pt(pose, r)[0] == pytest.approx(0.5, abs=TOL)
        assert pt(pose, left)[0] == pytest.approx(0.5, abs=TOL)
    assert pose[J["LEye"]] is None and pose[J["LEar"]] is None
    # the extent: head top at depth 15 (Y = 3.75/15), the near sole 0.4 nearer (Y = -3.75/14.6)
    top, bottom = 3.75 / 15, -3.75 / 14.6
    s = 0.88 / (top - bottom)
    middle = (top + bottom) / 2
    # the nose (0, 6.8, 0.45) turns to (0.45, 6.8, 0): depth 15
    assert pt(pose, "Nose") == pytest.approx(
        (0.5 + s * 0.45 / 15, 0.5 - s * ((6.8 - 3.75) / 15 - middle)), abs=TOL
    )
    # the right eye (-0.17, 7.0, 0.33) turns to (0.33, 7.0, 0.17): depth 14.83
    assert pt(pose, "REye") == pytest.approx(
        (0.5 + s * 0.33 / 14.83, 0.5 - s * ((7.0 - 3.75) / 14.83 - middle)), abs=TOL
    )
    assert pt(pose, "REar")[0] == pytest.approx(0.5, abs=TOL)


def test_behind_b04_hides_the_face_and_swaps_sides() -> None:
    front = pose_for_code("b00", framing="full body")
    back = pose_for_code("b04", framing="full body")
    for name in ("Nose", "REye", "LEye"):
        assert back[J[name]] is None
    s = 0.88 / (7.5 / 15)
    # turned 180°: the left shoulder (0.85, 6.1, 0) lands at (-0.85, 6.1, 0), the viewer's left
    assert pt(back, "LShoulder") == pytest.approx(
        (0.5 - s * 0.85 / 15, 0.5 - s * 2.35 / 15), abs=TOL
    )
    assert pt(back, "LEar") == pytest.approx((0.5 - s * 0.36 / 15, 0.5 - s * 3.2 / 15), abs=TOL)
    assert pt(back, "REar")[0] > 0.5
    assert pt(front, "LShoulder")[0] > 0.5 > pt(back, "LShoulder")[0]
    for name in ("Shoulder", "Hip", "Ankle"):
        assert pt(back, "L" + name) == pytest.approx(pt(front, "R" + name), abs=TOL)


@pytest.mark.parametrize("v", [0, 1, 2])
def test_face_points_seen_per_turn(v: int) -> None:
    seen = {
        0: {"Nose", "REye", "LEye", "REar", "LEar"},
        1: {"Nose", "REye", "LEye", "REar"},  # the far ear is behind the head
        2: {"Nose", "REye", "REar"},
        3: {"REar"},  # rear three-quarter: only the near ear
        4: {"REar", "LEar"},
        5: {"LEar"},
        6: {"Nose", "LEye", "LEar"},
        7: {"Nose", "REye", "LEye", "LEar"},
    }
    for h, expected in seen.items():
        for framing in ("upper body", "full body"):
            pose = pose_for_code(f"f{v}{h}", framing=framing)
            assert {n for n in FACE if pose[J[n]] is not None} == expected, (v, h, framing)


def test_from_above_draws_the_shoulders_larger_than_the_hips() -> None:
    # Full body, target (0, 3.75, 0), distance 15. From above (pitch +30°) the camera is at
    # (0, 3.75 + 7.5, 15 cos 30) looking along (0, -1/2, -cos 30): a point's depth is
    # -(y - 11.25)/2 + 15 cos²30 = -(y - 11.25)/2 + 11.25 for z = 0. Widths on one depth scale
    # as width / depth, and the framing scales every length alike, so the ratio of the drawn
    # shoulder width (1.7) to the hip width (1.0) is framing-free.
    above_shoulders = (11.25 - 6.1) / 2 + 11.25  # 13.825
    above_hips = (11.25 - 3.9) / 2 + 11.25  # 14.925
    # from below the camera is at (0, 3.75 - 7.5, 15 cos 30) looking along (0, 1/2, -cos 30)
    below_shoulders = (6.1 + 3.75) / 2 + 11.25  # 16.175
    below_hips = (3.9 + 3.75) / 2 + 11.25  # 15.075
    expected = {
        "b00": 1.7,
        "b10": (1.7 / above_shoulders) / (1.0 / above_hips),  # 1.835
        "b20": (1.7 / below_shoulders) / (1.0 / below_hips),  # 1.584
    }
    for code, ratio in expected.items():
        pose = pose_for_code(code, framing="full body")
        shoulders = dist(pt(pose, "LShoulder"), pt(pose, "RShoulder"))
        hips = dist(pt(pose, "LHip"), pt(pose, "RHip"))
        assert shoulders / hips == pytest.approx(ratio, rel=1e-9), code
    assert expected["b10"] == pytest.approx(1.8353, abs=1e-4)
    assert expected["b20"] == pytest.approx(1.5844, abs=1e-4)


def test_from_above_and_below_tilt_the_face() -> None:
    # From above, what lies further back (the ears, z = 0) shows higher than what lies
    # forward (eyes z = 0.33, nose z = 0.45); from below the other way round.
    # Hand numbers for f10 (upper body: target y = (7.5 + wrist y) / 2, distance 10):
    wrist_y = 6.1 - 1.5 * C15 - 1.25 * C15 * C15
    target = (7.5 + wrist_y) / 2
    cam_y, cam_z = target + 10 * 0.5, 10 * C30
    up, fwd = (C30, -0.5), (-0.5, -C30)  # (y, z) parts of the camera's up and forward

    def image_y(y: float, z: float) -> float:
        dy, dz = y - cam_y, z - cam_z
        return (dy * up[0] + dz * up[1]) / (dy * fwd[0] + dz * fwd[1])

    ear_above_eye = image_y(6.95, 0.0) - image_y(7.0, 0.33)
    eye_spacing = 0.34 / (-(7.0 - cam_y) * 0.5 - (0.33 - cam_z) * C30)
    assert ear_above_eye > 0
    above = pose_for_code("f10", framing="upper body")
    measured = (pt(above, "LEye")[1] - pt(above, "LEar")[1]) / dist(
        pt(above, "LEye"), pt(above, "REye")
    )
    assert measured == pytest.approx(ear_above_eye / eye_spacing, rel=1e-9)
    assert pt(above, "Nose")[1] > pt(above, "LEye")[1] > pt(above, "LEar")[1]
    below = pose_for_code("f20", framing="upper body")
    assert pt(below, "LEar")[1] > pt(below, "LEye")[1]
    level = pose_for_code("f00", framing="upper body")

    # torso against head: from above the head end grows, from below it shrinks
    def head_to_hips(pose) -> float:
        return dist(pt(pose, "LEye"), pt(pose, "REye")) / dist(pt(pose, "LHip"), pt(pose, "RHip"))

    assert head_to_hips(above) > head_to_hips(level) > head_to_hips(below)


@pytest.mark.parametrize("framing", ["upper body", "full body"])
def test_codes_5_to_7_mirror_3_to_1(framing: str) -> None:
    for v in range(3):
        for h in (1, 2, 3):
            pose = pose_for_code(f"f{v}{8 - h}", framing=framing)
            expected = mirrored_by_hand(pose_for_code(f"f{v}{h}", framing=framing))
            for name, got, want in zip(NAMES, pose, expected, strict=True):
                if want is None:
                    assert got is None, (v, h, name)
                else:
                    assert got == pytest.approx(want, abs=TOL), (v, h, name)


def test_upper_body_framing_leaves_out_knees_and_ankles() -> None:
    for v in range(3):
        for h in range(8):
            pose = pose_for_code(f"f{v}{h}", framing="upper body")
            for name in LOWER_LEGS:
                assert pose[J[name]] is None
            for name in BODY:
                if name not in LOWER_LEGS:
                    assert pose[J[name]] is not None
            # head to about the hips: both hips in the lower part of the picture (from above
            # the far hip of a side view rises to about 0.63)
            assert 0.6 < pt(pose, "LHip")[1] < 0.92 and 0.6 < pt(pose, "RHip")[1] < 0.92
    # front: the wrists, the lowest framed joints, rest on the bottom margin
    front = pose_for_code("f00", framing="upper body")
    assert pt(front, "LWrist")[1] == pytest.approx(1 - MARGIN, abs=TOL)
    assert pt(front, "Nose")[0] == pytest.approx(0.5, abs=TOL)


@pytest.mark.parametrize("framing", ["upper body", "full body"])
def test_every_code_is_framed_inside_the_margin(framing: str) -> None:
    for v in range(3):
        for h in range(8):
            pose = pose_for_code(f"b{v}{h}", framing=framing)
            if framing == "full body":
                assert all(pose[J[n]] is not None for n in BODY)
            pts = [p for p in pose if p is not None]
            assert all(MARGIN - TOL <= c <= 1 - MARGIN + TOL for p in pts for c in p)
            # the figure's axis (neck) is the vertical centre line at every turn
            assert pt(pose, "Neck")[0] == pytest.approx(0.5, abs=TOL)


def test_aspect_keeps_the_proportions() -> None:
    square = pose_for_code("b11", framing="full body")
    tall = pose_for_code("b11", framing="full body", aspect=384 / 512)

    def pixels(pose, w: int, h: int) -> list[tuple[float, float]]:
        return [(p[0] * w, p[1] * h) for p in pose if p is not None]

    a, b = pixels(square, 512, 512), pixels(tall, 384, 512)
    ratio = dist(a[2], a[5]) / dist(b[2], b[5])
    for i in range(len(a)):
        for k in range(i + 1, len(a)):
            assert dist(a[i], a[k]) == pytest.approx(ratio * dist(b[i], b[k]), rel=1e-9, abs=1e-9)


def test_bad_code_and_framing_are_user_errors() -> None:
    with pytest.raises(CharfwError, match="angle code"):
        pose_for_code("x9", framing="full body")
    with pytest.raises(CharfwError, match="framing"):
        pose_for_code("f00", framing="cowboy shot")
    with pytest.raises(CharfwError, match="framing"):
        draw_set(["f00"], 64, "portrait")


# --- the drawing -------------------------------------------------------------------------


def test_each_limb_has_its_shaded_colour_and_joints_their_full_colour() -> None:
    size = 200
    for k, (a1, b1) in enumerate(REFERENCE_LIMBS_1_BASED):
        a, b = a1 - 1, b1 - 1
        keypoints = [None] * 18
        keypoints[a], keypoints[b] = (0.25, 0.5), (0.75, 0.5)
        img = np.asarray(draw_openpose(keypoints, size))
        limb = tuple(int(c * 0.6) for c in REFERENCE_COLOURS[k])
        assert tuple(img[100, 100]) == limb, k
        assert tuple(img[100, 50]) == REFERENCE_COLOURS[a]
        assert tuple(img[100, 150]) == REFERENCE_COLOURS[b]
        # an ellipse 4 px thick each side of its axis, nothing else drawn
        assert all(tuple(img[r, 100]) == limb for r in range(96, 105))
        assert tuple(img[94, 100]) == (0, 0, 0) and tuple(img[106, 100]) == (0, 0, 0)
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours == {(0, 0, 0), limb, REFERENCE_COLOURS[a], REFERENCE_COLOURS[b]}


def test_joints_are_drawn_over_the_limbs_of_a_whole_figure() -> None:
    pose = pose_for_code("b00", framing="full body")
    img = np.asarray(draw_openpose(pose, 512))
    for i, p in enumerate(pose):
        assert tuple(img[int(p[1] * 512), int(p[0] * 512)]) == REFERENCE_COLOURS[i], NAMES[i]
    for k, (a1, b1) in enumerate(REFERENCE_LIMBS_1_BASED):
        pa, pb = pose[a1 - 1], pose[b1 - 1]
        mid = ((pa[0] + pb[0]) / 2 * 512, (pa[1] + pb[1]) / 2 * 512)
        assert tuple(img[int(mid[1]), int(mid[0])]) == tuple(
            int(c * 0.6) for c in REFERENCE_COLOURS[k]
        )


def test_draw_takes_width_and_height_and_skips_missing_joints() -> None:
    empty = draw_openpose([None] * 18, (320, 256))
    assert empty.size == (320, 256) and empty.mode == "RGB"
    assert not np.asarray(empty).any()
    keypoints = [None] * 18
    keypoints[J["LWrist"]] = (0.3, 0.6)
    img = np.asarray(draw_openpose(keypoints, (320, 256)))
    assert tuple(img[int(0.6 * 256), int(0.3 * 320)]) == REFERENCE_COLOURS[J["LWrist"]]
    assert {tuple(c) for c in img.reshape(-1, 3)} == {(0, 0, 0), REFERENCE_COLOURS[J["LWrist"]]}
    with pytest.raises(ValueError, match="18"):
        draw_openpose([None] * 17, 64)


def test_face_and_body_sets_draw_and_write(tmp_path: Path) -> None:
    sets = TemplateLibrary().angle_sets
    face = draw_angle_set(sets["face"], 128)
    body = draw_angle_set(sets["body"], 128)
    assert list(face) == [f"f{v}{h}" for v in range(3) for h in range(8)]
    assert list(body) == [f"b{v}{h}" for v in range(3) for h in range(8)]
    assert list(draw_angle_set(sets["face"], 64, symmetric=True)) == [
        f"f{v}{h}" for v in range(3) for h in range(5)
    ]
    for code, image in {**face, **body}.items():
        pixels = np.asarray(image)
        assert image.size == (128, 128) and pixels.any(), code
        drawn = np.argwhere(pixels.any(axis=2))
        # drawn inside the margin, give or take the 4-px discs
        assert drawn.min() >= int(MARGIN * 128) - 5 and drawn.max() <= int((1 - MARGIN) * 128) + 5
    same = draw_set(["f00", "F00-smile", "f12"], 128, "upper body")
    assert list(same) == ["f00", "f12"]
    assert np.array_equal(np.asarray(same["f00"]), np.asarray(face["f00"]))

    written = write_set(face, tmp_path / "openpose")
    assert [p.name for p in written] == [f"{c}.png" for c in face]
    assert sorted(p.name for p in (tmp_path / "openpose").iterdir()) == sorted(
        p.name for p in written
    )
    with Image.open(tmp_path / "openpose" / "f12.png") as reread:
        assert np.array_equal(np.asarray(reread.convert("RGB")), np.asarray(face["f12"]))
