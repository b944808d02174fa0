"""OpenPose skeletons for every angle code, made from a 3-D stick figure, no detector.

The method's training images are generated with ControlNet from one control image per
angle code (METHOD.md, "Generating the training images"); openpose is the route it names
for the future. This module makes those control images without any photo: a standing
figure is turned, looked at and drawn exactly as ``controlnet_aux``'s OpenPose annotator
draws what its detector found.

The figure
    18 COCO joints in CMU's order (:data:`KEYPOINT_NAMES`) of a person standing straight,
    in **head units** on the academic 7.5-head canon: the soles at y = 0, the top of the
    head at 7.5, chin 6.5, eyes 7.0, ears 6.95, nose tip 6.8, neck (the base, between the
    shoulders) 6.2, shoulder joints 6.1 and 1.7 apart, elbows at the waist (upper arm 1.5),
    wrists at the crotch (forearm 1.25), hip joints 3.9 and 1.0 apart, knees 2.0, ankles
    0.3. The arms hang 15° away from the body and the forearms bend 15° forward at relaxed
    elbows, so the wrists stand 0.32 forward and a side view shows the arm apart from the
    torso. The coordinate system is right-handed: **x to the figure's left, y up, z
    forward** (out of the chest, towards the viewer at front view). Neck, shoulders,
    elbows, hips, knees and ankles lie in the plane z = 0, the plumb line of a straight
    stance; the eyes (0.33) and the nose tip (0.45) stand forward of it, the ears on it.
    :data:`STANDING_FIGURE` holds the table.

Turning (the code's second digit, H)
    The figure turns H × 45° counter-clockwise seen from above (a rotation about +y): code
    1 faces the viewer's right at 45°, code 2 shows the figure's right side with the nose
    pointing to the image's right, code 4 its back. Codes 5, 6, 7 turn on to 225°, 270°,
    315°; as the figure is left–right symmetric these are exactly the mirror images of
    codes 3, 2, 1 (x → 1 − x with every left and right joint swapped).

Looking (the first digit, V)
    A pinhole camera aims at the middle of the framed body on the figure's vertical axis
    from :data:`CAMERA_DISTANCE` head units away (15 for a full body, twice its height; 10
    for an upper body), level for V = 0, raised :data:`PITCH_DEGREES` (30°) and looking
    down for V = 1 ("from above"), lowered 30° and looking up for V = 2 ("from below").
    The projection is a full perspective, not an orthographic one: from above the head is
    nearer the camera and drawn larger than the hips (the shoulders come out about 1.84
    times as wide as the hips instead of 1.7), from below smaller (about 1.58), and the
    face points forward of the skull move down (from above) or up (from below) against the
    ears; these are the cues a detector finds in such photos.

Framing
    ``"upper body"`` (the face set's framing) shows the head down to the wrists, which hang
    a little below the hips; knees and ankles are left out. ``"full body"`` (the body set's)
    shows the whole figure from the top of the head to the soles. The figure's vertical axis
    is the image's vertical centre line; the framed extent (joints, the top of the head and,
    for a full body, the soles; hidden face points count too, so hiding a point never moves
    the frame) is centred vertically and scaled uniformly to keep :data:`DEFAULT_MARGIN` of
    the image height free on the tighter side. Coordinates are normalised 0–1 (x across the
    width, y down the height), as ``controlnet_aux`` takes them; ``aspect`` (width ÷ height)
    keeps the figure's proportions on a canvas that is not square.

What OpenPose would not see
    Body joints are always given (a detector places limbs behind the torso too, and that is
    what it draws for a side view). A face point is left out (``None``) when it faces away
    from the camera: its outward direction (nose: forward; eyes: forward, 30° outwards;
    ears: straight sideways) must be within 90° of the direction to the camera for an eye,
    within 110° for the nose and the ears. So the front shows all five; a front
    three-quarter hides the far ear; the side shows nose, near eye and near ear; a rear
    three-quarter only the near ear; the back both ears and neither the nose nor the eyes.

Drawing (:func:`draw_openpose`)
    ``controlnet_aux``'s ``draw_bodypose``, re-stated from the reference
    (``/work/shared/reference/generation-sdxl-sd3.md`` §7): a black canvas; the 17 limbs in
    CMU's render order, each a filled ``cv2.ellipse2Poly`` polygon (half-width 4) in 0.6 of
    its colour; then every joint as a filled circle of radius 4 in its full colour. The
    colour triples are RGB in the returned image.

Importing this module is cheap: OpenCV, NumPy and Pillow load inside the functions that
draw.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, cast

from charfw.build.angles import AngleCode, parse_code
from charfw.build.atomic import write_bytes
from charfw.errors import CharfwError

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from charfw.build.angles import AngleSet

__all__ = [
    "CAMERA_DISTANCE",
    "COLORS",
    "DEFAULT_MARGIN",
    "FRAMINGS",
    "KEYPOINT_NAMES",
    "LIMBS",
    "PITCH_DEGREES",
    "STANDING_FIGURE",
    "Framing",
    "Keypoint",
    "Keypoints",
    "draw_angle_set",
    "draw_openpose",
    "draw_set",
    "mirror_keypoints",
    "pose_for_code",
    "write_set",
]

Framing = Literal["upper body", "full body"]
#: the framings an angle set may ask for (``AngleSet.framing``)
FRAMINGS: tuple[Framing, ...] = ("upper body", "full body")

#: one joint in normalised image coordinates: (x across the width, y down the height), 0–1
Keypoint = tuple[float, float]
#: the 18 COCO joints in CMU's order; ``None`` where OpenPose would not find the joint
Keypoints = tuple[Keypoint | None, ...]
Vec3 = tuple[float, float, float]

#: CMU OpenPose's COCO-18 body parts, in order (R and L are the person's own sides)
KEYPOINT_NAMES: tuple[str, ...] = (
    "Nose",
    "Neck",
    "RShoulder",
    "RElbow",
    "RWrist",
    "LShoulder",
    "LElbow",
    "LWrist",
    "RHip",
    "RKnee",
    "RAnkle",
    "LHip",
    "LKnee",
    "LAnkle",
    "REye",
    "LEye",
    "REar",
    "LEar",
)
_INDEX = {name: i for i, name in enumerate(KEYPOINT_NAMES)}

#: RGB colour of joint i, and of limb i (the same 18-colour list; limbs use the first 17)
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)

#: the 17 drawn limbs as 0-based joint pairs, in render order (limb i has colour i)
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)

#: the stick width of ``controlnet_aux`` (half the limb ellipse's short axis) and joint radius
STICK_WIDTH = 4
JOINT_RADIUS = 4
#: limbs are filled with this fraction of their colour
LIMB_SHADE = 0.6

#: the figure's height in head units (the 7.5-head canon)
FIGURE_HEIGHT = 7.5
#: camera pitch for V = 1 (from above, +) and V = 2 (from below, −), degrees
PITCH_DEGREES = 30.0
#: camera distance from the middle of the framed body, head units, per framing
CAMERA_DISTANCE: dict[str, float] = {"upper body": 10.0, "full body": 15.0}
#: free border on the tighter side, as a fraction of the image height
DEFAULT_MARGIN = 0.06

# the arms: 15° away from the body; the forearms bend 15° forward at a relaxed elbow
_ARM_OUT = math.radians(15.0)
_ELBOW_BEND = math.radians(15.0)
_SHOULDER: Vec3 = (-0.85, 6.1, 0.0)
_ELBOW: Vec3 = (
    _SHOULDER[0] - 1.5 * math.sin(_ARM_OUT),
    _SHOULDER[1] - 1.5 * math.cos(_ARM_OUT),
    0.0,
)
_WRIST: Vec3 = (
    _ELBOW[0] - 1.25 * math.sin(_ARM_OUT) * math.cos(_ELBOW_BEND),
    _ELBOW[1] - 1.25 * math.cos(_ARM_OUT) * math.cos(_ELBOW_BEND),
    1.25 * math.sin(_ELBOW_BEND),
)
# the right half of the figure (x < 0) and the points on its mid-line; the left half mirrors it
_RIGHT_HALF: dict[str, Vec3] = {
    "Nose": (0.0, 6.8, 0.45),
    "Neck": (0.0, 6.2, 0.0),
    "RShoulder": _SHOULDER,
    "RElbow": _ELBOW,
    "RWrist": _WRIST,
    "RHip": (-0.5, 3.9, 0.0),
    "RKnee": (-0.45, 2.0, 0.0),
    "RAnkle": (-0.4, 0.3, 0.0),
    "REye": (-0.17, 7.0, 0.33),
    "REar": (-0.36, 6.95, 0.0),
}


def _mirror_name(name: str) -> str:
    if name[0] == "R" and name[1:2].isupper():
        return "L" + name[1:]
    if name[0] == "L" and name[1:2].isupper():
        return "R" + name[1:]
    return name


def _figure() -> tuple[Vec3, ...]:
    points: dict[str, Vec3] = {}
    for name, (x, y, z) in _RIGHT_HALF.items():
        points[name] = (x, y, z)
        if _mirror_name(name) != name:
            points[_mirror_name(name)] = (-x, y, z)
    return tuple(points[name] for name in KEYPOINT_NAMES)


#: the standing figure, one (x, y, z) per joint in :data:`KEYPOINT_NAMES` order, head units;
#: x to the figure's left, y up from the soles, z forward
STANDING_FIGURE: tuple[Vec3, ...] = _figure()

#: points that bound the picture besides the joints: the top of the head, the soles
_HEAD_TOP: Vec3 = (0.0, FIGURE_HEIGHT, 0.0)
_SOLES: tuple[Vec3, ...] = ((-0.4, 0.0, 0.0), (0.4, 0.0, 0.0))

_EYE_OUTWARD = math.radians(30.0)
#: outward direction of each face point and the largest angle to the camera it is seen at
_FACE_VISIBILITY: dict[int, tuple[Vec3, float]] = {
    _INDEX["Nose"]: ((0.0, 0.0, 1.0), 110.0),
    _INDEX["REye"]: ((-math.sin(_EYE_OUTWARD), 0.0, math.cos(_EYE_OUTWARD)), 90.0),
    _INDEX["LEye"]: ((math.sin(_EYE_OUTWARD), 0.0, math.cos(_EYE_OUTWARD)), 90.0),
    _INDEX["REar"]: ((-1.0, 0.0, 0.0), 110.0),
    _INDEX["LEar"]: ((1.0, 0.0, 0.0), 110.0),
}
_LOWER_LEGS = frozenset(_INDEX[n] for n in ("RKnee", "RAnkle", "LKnee", "LAnkle"))
_SWAP = tuple(_INDEX[_mirror_name(name)] for name in KEYPOINT_NAMES)


def _sub(a: Vec3, b: Vec3) -> Vec3:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _dot(a: Vec3, b: Vec3) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _turn(p: Vec3, degrees: float) -> Vec3:
    """``p`` rotated about +y (counter-clockwise seen from above)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    x, y, z = p
    return (x * c + z * s, y, -x * s + z * c)


class _Camera:
    """A pinhole camera on the figure's mid-plane, aimed at ``(0, target_y, 0)``."""

    def __init__(self, target_y: float, distance: float, pitch_degrees: float) -> None:
        p = math.radians(pitch_degrees)
        self.position: Vec3 = (0.0, target_y + distance * math.sin(p), distance * math.cos(p))
        self.right: Vec3 = (1.0, 0.0, 0.0)
        self.up: Vec3 = (0.0, math.cos(p), -math.sin(p))
        self.forward: Vec3 = (0.0, -math.sin(p), -math.cos(p))

    def project(self, p: Vec3) -> tuple[float, float]:
        """Image-plane coordinates at focal length 1: x right, y up."""
        d = _sub(p, self.position)
        depth = _dot(d, self.forward)
        return _dot(d, self.right) / depth, _dot(d, self.up) / depth

    def sees(self, p: Vec3, outward: Vec3, max_angle_degrees: float) -> bool:
        """Whether a surface point facing ``outward`` is turned towards the camera."""
        to_camera = _sub(self.position, p)
        cos_angle = _dot(outward, to_camera) / math.sqrt(_dot(to_camera, to_camera))
        return cos_angle > math.cos(math.radians(max_angle_degrees))


def _angle_code(code: str | AngleCode) -> AngleCode:
    if isinstance(code, AngleCode):
        return code
    parsed = parse_code(code)
    if parsed is None:
        raise CharfwError(
            f"{code!r} is not an angle code",
            hint="an angle code is a letter and two digits: f00 … f27, b00 … b27",
        )
    return parsed


def _check_framing(framing: str) -> Framing:
    if framing not in FRAMINGS:
        raise CharfwError(
            f"no OpenPose framing {framing!r}",
            hint=f"OpenPose skeletons are drawn for {' or '.join(map(repr, FRAMINGS))}",
        )
    return cast(Framing, framing)


def pose_for_code(
    code: str | AngleCode,
    *,
    framing: str,
    aspect: float = 1.0,
    margin: float = DEFAULT_MARGIN,
) -> Keypoints:
    """The standing figure's 18 joints as OpenPose would find them in a picture of ``code``.

    ``code`` is an angle code (``"f12"``, or a file stem starting with one); its letter is
    not looked at, ``framing`` (``"upper body"`` or ``"full body"``) says what is shown.
    ``aspect`` is the canvas's width ÷ height, ``margin`` the free border as a fraction of
    the height. Returns normalised (x, y) per joint, ``None`` for joints not shown: the face
    points turned away from the camera, and knees and ankles in an upper-body picture.
    See the module's docstring for the geometry.
    """
    angle = _angle_code(code)
    framing = _check_framing(framing)
    if aspect <= 0:
        raise ValueError(f"aspect must be positive, not {aspect}")
    if not 0 <= margin < min(0.5, aspect / 2):
        raise ValueError(f"margin must leave room for the figure, not {margin}")

    upper = framing == "upper body"
    framed = [i for i in range(len(KEYPOINT_NAMES)) if not (upper and i in _LOWER_LEGS)]
    extent: list[Vec3] = [STANDING_FIGURE[i] for i in framed] + [_HEAD_TOP]
    if not upper:
        extent += _SOLES
    target_y = (max(p[1] for p in extent) + min(p[1] for p in extent)) / 2
    pitch = {0: 0.0, 1: PITCH_DEGREES, 2: -PITCH_DEGREES}[angle.vertical]
    camera = _Camera(target_y, CAMERA_DISTANCE[framing], pitch)
    turn = angle.horizontal * 45.0

    projected = [camera.project(_turn(p, turn)) for p in extent]
    half_width = max(abs(x) for x, _ in projected)
    top = max(y for _, y in projected)
    bottom = min(y for _, y in projected)
    scale = min((aspect / 2 - margin) / half_width, (1 - 2 * margin) / (top - bottom))
    middle = (top + bottom) / 2

    keypoints: list[Keypoint | None] = [None] * len(KEYPOINT_NAMES)
    for i in framed:
        point = _turn(STANDING_FIGURE[i], turn)
        if i in _FACE_VISIBILITY:
            outward, max_angle = _FACE_VISIBILITY[i]
            if not camera.sees(point, _turn(outward, turn), max_angle):
                continue
        x, y = camera.project(point)
        keypoints[i] = (0.5 + scale * x / aspect, 0.5 - scale * (y - middle))
    return tuple(keypoints)


def mirror_keypoints(keypoints: Sequence[Keypoint | None]) -> Keypoints:
    """The mirror image: x → 1 − x, and every left joint trades places with its right one."""
    _check_length(keypoints)
    flipped = [None if k is None else (1.0 - k[0], k[1]) for k in keypoints]
    return tuple(flipped[_SWAP[i]] for i in range(len(KEYPOINT_NAMES)))


def _check_length(keypoints: Sequence[Keypoint | None]) -> None:
    if len(keypoints) != len(KEYPOINT_NAMES):
        raise ValueError(f"expected {len(KEYPOINT_NAMES)} COCO keypoints, got {len(keypoints)}")


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, not {size}")
    return int(width), int(height)


def draw_openpose(
    keypoints: Sequence[Keypoint | None], size: int | tuple[int, int] = 512
) -> Image.Image:
    """Draw an OpenPose body skeleton the way ``controlnet_aux``'s ``draw_bodypose`` does.

    ``keypoints`` are the 18 COCO joints, normalised (x, y) or ``None``; ``size`` is a side
    length or (width, height). Limbs with both ends present are filled ellipse polygons in
    0.6 of their colour, drawn in CMU's order; joints follow on top as radius-4 discs in
    their full colour, on black. Returns an RGB image.
    """
    import cv2
    import numpy as np
    from PIL import Image

    _check_length(keypoints)
    width, height = _size(size)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for (a, b), color in zip(LIMBS, COLORS, strict=False):
        start, end = keypoints[a], keypoints[b]
        if start is None or end is None:
            continue
        # controlnet_aux's names: X runs down the rows, Y across the columns
        rows = (start[1] * height, end[1] * height)
        cols = (start[0] * width, end[0] * width)
        mean_row = (rows[0] + rows[1]) / 2
        mean_col = (cols[0] + cols[1]) / 2
        # the square root as the reference writes it, so that int(length / 2) agrees to the ulp
        length = ((rows[0] - rows[1]) ** 2 + (cols[0] - cols[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(rows[0] - rows[1], cols[0] - cols[1]))
        polygon = cv2.ellipse2Poly(
            (int(mean_col), int(mean_row)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
        )
        points = np.asarray(polygon, dtype=np.int32)
        cv2.fillConvexPoly(canvas, points, [int(c * LIMB_SHADE) for c in color])
    for keypoint, color in zip(keypoints, COLORS, strict=True):
        if keypoint is None:
            continue
        centre = (int(keypoint[0] * width), int(keypoint[1] * height))
        cv2.circle(canvas, centre, JOINT_RADIUS, color, thickness=-1)
    return Image.fromarray(canvas)


def draw_set(
    template_codes: Iterable[str | AngleCode],
    size: int | tuple[int, int],
    framing: str,
) -> dict[str, Image.Image]:
    """One OpenPose control image per angle code, keyed by the code (``"f00"``).

    The figure keeps its proportions on a canvas of any ``size`` (side, or width × height).
    """
    framing = _check_framing(framing)
    width, height = _size(size)
    images: dict[str, Image.Image] = {}
    for code in template_codes:
        angle = _angle_code(code)
        pose = pose_for_code(angle, framing=framing, aspect=width / height)
        images[angle.code] = draw_openpose(pose, (width, height))
    return images


def draw_angle_set(
    angle_set: AngleSet, size: int | tuple[int, int] = 512, *, symmetric: bool = False
) -> dict[str, Image.Image]:
    """:func:`draw_set` for every code of an angle set, in the set's own framing.

    ``symmetric=False`` (the default) draws the full set, mirrors 5–7 included.
    """
    return draw_set(angle_set.codes(symmetric=symmetric), size, angle_set.framing)


def write_set(images: Mapping[str, Image.Image], folder: str | os.PathLike[str]) -> list[Path]:
    """Write each image as ``<code>.png`` into ``folder`` (made if missing), atomically.

    Returns the written paths in the mapping's order.
    """
    written: list[Path] = []
    for code, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        written.append(write_bytes(os.path.join(folder, f"{code}.png"), buffer.getvalue()))
    return written
