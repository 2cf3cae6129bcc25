"""Articulated 2D stick figures: skeleton, action animation and anti-aliased rendering.

The figure lives in body coordinates (X lateral, Y up, Z forward; unit = standing
height) and is seen by an orthographic camera whose yaw sets its facing. Every
limb segment is posed by two absolute angles in degrees: ``swing`` (rotation
forward, towards +Z) and ``raise`` (rotation outward, away from the body's midline);
(0, 0) hangs straight down. Segments are drawn as signed-distance capsules with
a one-pixel soft edge, far-side limbs slightly darker, in depth order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ACTIONS: tuple[str, ...] = ("walk", "run", "jump", "wave", "squat", "kick", "clap", "punch", "bow", "spin")
LOCOMOTION: frozenset[str] = frozenset({"walk", "run", "jump"})
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "blue": (40, 85, 225), "green": (30, 160, 60),
    "yellow": (235, 195, 20), "purple": (145, 60, 195), "orange": (245, 130, 20),
}
#: Background name -> (top colour, bottom colour) of a vertical gradient.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((244, 244, 240), (244, 244, 240)),
    "gray": ((62, 66, 74), (62, 66, 74)),
    "sky": ((120, 170, 228), (218, 232, 246)),
    "night": ((12, 16, 40), (48, 54, 96)),
}
DIRECTIONS: tuple[str, ...] = ("left", "right")
SPEEDS: dict[str, float] = {"slow": 0.5, "normal": 0.8, "fast": 1.3}  # action cycles per second
SIZES: dict[str, float] = {"small": 0.55, "large": 0.72}  # standing height / frame height

# Body proportions (unit = standing height) and capsule radii.
_SEG_LEN = {"ua": 0.16, "fa": 0.155, "th": 0.245, "sh": 0.235}
_TORSO, _NECK, _HEAD_R = 0.30, 0.11, 0.1
_SHOULDER_W, _HIP_W = 0.085, 0.05
_LIMB_R, _TORSO_R = 0.05, 0.065
_GROUND = 0.92  # ground line, fraction of frame height from the top
_STRIDE = {"walk": 0.45, "run": 0.8, "jump": 0.6}  # travel per cycle, body units
_FAR_SHADE, _EYE_RGB, _FLOOR_SHADE = 0.72, (25, 25, 30), 0.86

Pose = dict[str, float]  # segment angles "ua_a.swing" ..., plus "lean", "lift", "yaw"


@dataclass(frozen=True)
class ClipSpec:
    """Attributes of one clip; ``seed`` drives the small per-clip jitter (phase, position)."""

    action: str
    colour: str
    direction: str
    speed: str
    size: str
    background: str
    seed: int = 0

    def __post_init__(self) -> None:
        for name, valid in (("action", ACTIONS), ("colour", COLOURS), ("direction", DIRECTIONS),
                            ("speed", SPEEDS), ("size", SIZES), ("background", BACKGROUNDS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"ClipSpec.{name}: {getattr(self, name)!r} is not one of {list(valid)}")


# ---------------------------------------------------------------- animation

def _ease(x: float) -> float:
    return x * x * (3.0 - 2.0 * x)


def _keyframes(u: float, keys: list[tuple[float, Pose]]) -> Pose:
    """Eased interpolation of periodic keyframes at cycle position ``u`` in [0, 1)."""
    names = set().union(*(k for _, k in keys))
    for (u0, k0), (u1, k1) in zip(keys, keys[1:]):
        if u0 <= u <= u1:
            w = _ease((u - u0) / (u1 - u0))
            return {n: (1 - w) * k0.get(n, 0.0) + w * k1.get(n, 0.0) for n in names}
    raise ValueError(f"keyframes do not cover u={u}")


def _limbs(arm_a: tuple[float, float, float, float], arm_b: tuple[float, float, float, float],
           leg_a: tuple[float, float, float, float], leg_b: tuple[float, float, float, float]) -> Pose:
    """Pose entries from (upper swing, upper raise, lower swing, lower raise) per limb."""
    out: Pose = {}
    for side, arm, leg in (("a", arm_a, leg_a), ("b", arm_b, leg_b)):
        for (up, low), vals in ((("ua", "fa"), arm), (("th", "sh"), leg)):
            out[f"{up}_{side}.swing"], out[f"{up}_{side}.raise"] = vals[0], vals[1]
            out[f"{low}_{side}.swing"], out[f"{low}_{side}.raise"] = vals[2], vals[3]
    return out


def _walk(c: float) -> Pose:
    s, k = math.sin(2 * math.pi * c), math.cos(2 * math.pi * c)
    return {**_limbs((-20 * s, 8, -20 * s + 25, 8), (20 * s, 8, 20 * s + 25, 8),
                     (22 * s, 3, 22 * s - 5 - 35 * max(0.0, k), 3),
                     (-22 * s, 3, -22 * s - 5 - 35 * max(0.0, -k), 3)), "lean": 4.0}


def _run(c: float) -> Pose:
    s, k = math.sin(2 * math.pi * c), math.cos(2 * math.pi * c)
    return {**_limbs((-42 * s, 10, -42 * s + 90, 10), (42 * s, 10, 42 * s + 90, 10),
                     (10 + 38 * s, 3, 10 + 38 * s - 20 - 80 * max(0.0, k), 3),
                     (10 - 38 * s, 3, 10 - 38 * s - 20 - 80 * max(0.0, -k), 3)),
            "lean": 12.0, "lift": 0.035 * abs(s)}


def _sym(arm: tuple[float, float, float, float], leg: tuple[float, float, float, float], **extra: float) -> Pose:
    return {**_limbs(arm, arm, leg, leg), **extra}


_JUMP_KEYS = [
    (0.0, _sym((-10, 8, 0, 8), (0, 3, -5, 3), lean=3)),
    (0.2, _sym((-55, 10, -45, 10), (55, 3, -45, 3), lean=35)),
    (0.35, _sym((160, 12, 165, 12), (0, 3, 0, 3), lean=5)),
    (0.55, _sym((150, 20, 160, 20), (35, 6, -30, 6), lean=5)),
    (0.75, _sym((40, 15, 60, 15), (45, 3, -35, 3), lean=25)),
    (1.0, _sym((-10, 8, 0, 8), (0, 3, -5, 3), lean=3)),
]


def _jump(c: float) -> Pose:
    u = c % 1.0
    v = min(max((u - 0.35) / 0.4, 0.0), 1.0)
    return {**_keyframes(u, _JUMP_KEYS), "lift": 0.8 * v * (1 - v)}


def _wave(c: float) -> Pose:
    s = math.sin(2 * math.pi * c)
    return {**_limbs((10, 130 + 8 * s, 10, 160 + 30 * s), (10, 130 - 8 * s, 10, 160 - 30 * s),
                     (0, 5, 0, 5), (0, 5, 0, 5)), "yaw": 30.0}


_SQUAT_KEYS = [
    (0.0, _sym((0, 8, 5, 8), (0, 4, 0, 4), lean=2)),
    (0.45, _sym((85, 5, 90, 5), (80, 8, -40, 8), lean=35)),
    (0.6, _sym((85, 5, 90, 5), (80, 8, -40, 8), lean=35)),
    (1.0, _sym((0, 8, 5, 8), (0, 4, 0, 4), lean=2)),
]


def _squat(c: float) -> Pose:
    return {**_keyframes(c % 1.0, _SQUAT_KEYS), "yaw": 65.0}


_KICK_KEYS = [
    (0.0, _limbs((0, 10, 10, 10), (0, 10, 10, 10), (0, 3, -5, 3), (0, 3, -8, 3)) | {"lean": 3}),
    (0.25, _limbs((-20, 15, 0, 15), (30, 15, 60, 15), (-25, 3, -95, 3), (5, 3, -10, 3)) | {"lean": 5}),
    (0.45, _limbs((45, 35, 60, 35), (-30, 25, -20, 25), (85, 3, 80, 3), (-5, 3, -10, 3)) | {"lean": -15}),
    (0.65, _limbs((10, 20, 20, 20), (10, 20, 30, 20), (35, 3, -30, 3), (0, 3, -8, 3)) | {"lean": 0}),
    (1.0, _limbs((0, 10, 10, 10), (0, 10, 10, 10), (0, 3, -5, 3), (0, 3, -8, 3)) | {"lean": 3}),
]


def _kick(c: float) -> Pose:
    return {**_keyframes(c % 1.0, _KICK_KEYS), "yaw": 80.0}


def _clap(c: float) -> Pose:
    o = math.sin(math.pi * c) ** 2  # 0 when the hands meet in front of the chest, 1 wide open
    arm = (70 - 30 * o, -5 + 70 * o, 90 - 30 * o, -35 + 120 * o)
    return {**_sym(arm, (0, 5, 0, 5)), "yaw": 20.0}


def _punch(c: float) -> Pose:
    s = math.sin(2 * math.pi * c)
    e_a, e_b = max(0.0, s) ** 2, max(0.0, -s) ** 2

    def arm(e: float) -> tuple[float, float, float, float]:
        return (40 + 50 * e, 15 - 10 * e, 150 - 60 * e, 15 - 10 * e)

    return {**_limbs(arm(e_a), arm(e_b), (18, 4, 5, 4), (-15, 4, -25, 4)),
            "lean": 6 + 6 * (e_a + e_b), "yaw": 70.0}


_BOW_KEYS = [
    (0.0, _sym((0, 8, 5, 8), (0, 3, -3, 3), lean=2)),
    (0.35, _sym((60, 4, 62, 4), (-6, 3, -8, 3), lean=70)),
    (0.6, _sym((60, 4, 62, 4), (-6, 3, -8, 3), lean=70)),
    (1.0, _sym((0, 8, 5, 8), (0, 3, -3, 3), lean=2)),
]


def _bow(c: float) -> Pose:
    return {**_keyframes(c % 1.0, _BOW_KEYS), "yaw": 85.0}


def _spin(c: float) -> Pose:
    return {**_sym((0, 85, 0, 100), (0, 4, 0, 4)), "yaw": 360.0 * c}


_POSES: dict[str, Callable[[float], Pose]] = {
    "walk": _walk, "run": _run, "jump": _jump, "wave": _wave, "squat": _squat,
    "kick": _kick, "clap": _clap, "punch": _punch, "bow": _bow, "spin": _spin,
}


def _travel(action: str, cycles: np.ndarray) -> np.ndarray:
    """Progress of horizontal travel (in cycles of stride) at each time; 0 for in-place actions."""
    if action == "jump":
        u = cycles % 1.0
        return np.floor(cycles) + np.clip((u - 0.35) / 0.4, 0.0, 1.0)
    return cycles if action in LOCOMOTION else np.zeros_like(cycles)


# ---------------------------------------------------------------- skeleton

def _seg_dir(swing: float, raise_: float, side: float) -> np.ndarray:
    sw, ra = math.radians(swing), math.radians(raise_)
    return np.array([side * math.sin(ra), -math.cos(ra) * math.cos(sw), math.cos(ra) * math.sin(sw)])


def _skeleton(pose: Pose) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """Segments (name, start, end, radius) in body coordinates, hip at the origin before grounding."""
    lean = math.radians(pose.get("lean", 0.0))
    up = np.array([0.0, math.cos(lean), math.sin(lean)])
    hip, neck = np.zeros(3), _TORSO * up
    segs = [("torso", hip, neck, _TORSO_R), ("head", neck + _NECK * up, neck + _NECK * up, _HEAD_R)]
    for side, sgn in (("a", 1.0), ("b", -1.0)):
        lat = np.array([sgn, 0.0, 0.0])
        for (up_name, low_name), root in ((("ua", "fa"), neck - 0.02 * up + _SHOULDER_W * lat),
                                          (("th", "sh"), hip + _HIP_W * lat)):
            upper, lower = f"{up_name}_{side}", f"{low_name}_{side}"
            mid = root + _SEG_LEN[up_name] * _seg_dir(pose[f"{upper}.swing"], pose[f"{upper}.raise"], sgn)
            end = mid + _SEG_LEN[low_name] * _seg_dir(pose[f"{lower}.swing"], pose[f"{lower}.raise"], sgn)
            segs += [(f"{up_name}_{side}", root, mid, _LIMB_R), (f"{low_name}_{side}", mid, end, _LIMB_R)]
    return segs


def _project(p: np.ndarray, yaw: float) -> tuple[float, float, float]:
    """Body point -> (image x, height, depth towards the camera) for camera yaw in degrees."""
    c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    return p[0] * c + p[2] * s, p[1], p[2] * c - p[0] * s


def _frame_shapes(pose: Pose, yaw: float, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Capsules of one pose: ``(S, 6)`` [x0, y0, x1, y1, radius, depth] (body units, grounded) and ``(S, 3)`` colour."""
    segs = _skeleton(pose)
    feet = min(min(a[1], b[1]) for name, a, b, _ in segs if name.startswith("sh_"))
    lift = _LIMB_R - feet + pose.get("lift", 0.0)
    rows, colours = [], []
    for name, a, b, r in segs:
        (xa, ya, da), (xb, yb, db) = _project(a, yaw), _project(b, yaw)
        depth = 0.5 * (da + db)
        far = name[-2:] in ("_a", "_b") and depth < 0
        rows.append([xa, ya + lift, xb, yb + lift, r, depth])
        colours.append(rgb * (_FAR_SHADE if far else 1.0))
    head = segs[1][1]
    for sgn in (1.0, -1.0):  # eyes: on the face, drawn only when turned towards the camera
        eye = head + np.array([0.38 * sgn * _HEAD_R, 0.15 * _HEAD_R, 0.8 * _HEAD_R])
        x, y, d = _project(eye, yaw)
        if d > _project(head, yaw)[2] + 0.15 * _HEAD_R:
            rows.append([x, y + lift, x, y + lift, 0.2 * _HEAD_R, 1.0])
            colours.append(np.array(_EYE_RGB, dtype=np.float64))
    return np.array(rows), np.array(colours)


# ---------------------------------------------------------------- rendering

def _background(name: str, height: int, width: int, ground_px: float) -> np.ndarray:
    top, bottom = (np.array(c, dtype=np.float64) for c in BACKGROUNDS[name])
    w = np.linspace(0.0, 1.0, height)[:, None]
    img = (1 - w) * top + w * bottom  # (H, 3)
    floor = np.clip(np.arange(height) + 0.5 - ground_px, 0.0, 1.0)[:, None]
    img = img * (1 - floor * (1 - _FLOOR_SHADE))
    return np.broadcast_to(img[:, None, :], (height, width, 3)).copy()


def _draw_capsule(img: np.ndarray, cap: np.ndarray, rgb: np.ndarray) -> None:
    """Alpha-blend one capsule [x0, y0, x1, y1, r] (pixels) into ``img`` ``(H, W, 3)`` in place.

    Coverage is ``clip(r - distance + 0.5, 0, 1)``: a one-pixel anti-aliased edge,
    computed only over the capsule's bounding box.
    """
    x0, y0, x1, y1, r = (float(v) for v in cap)
    height, width = img.shape[:2]
    xa, xb = max(int(min(x0, x1) - r - 1), 0), min(int(max(x0, x1) + r + 2), width)
    ya, yb = max(int(min(y0, y1) - r - 1), 0), min(int(max(y0, y1) + r + 2), height)
    if xa >= xb or ya >= yb:
        return
    bx, by = x1 - x0, y1 - y0
    px = np.arange(xa, xb) + (0.5 - x0)  # (w,)
    py = np.arange(ya, yb)[:, None] + (0.5 - y0)  # (h, 1)
    h = np.clip((px * bx + py * by) / max(bx * bx + by * by, 1e-9), 0.0, 1.0)  # (h, w)
    d = np.sqrt((px - bx * h) ** 2 + (py - by * h) ** 2)
    a = np.clip(r - d + 0.5, 0.0, 1.0)[..., None]
    sub = img[ya:yb, xa:xb]
    sub += (rgb - sub) * a


@dataclass(frozen=True)
class Nuisance:
    """What no caption states: start phase (cycles), horizontal offset and ground shift
    (fractions of the frame), tempo factor."""

    phase: float = 0.0
    x_offset: float = 0.0
    ground: float = 0.0
    tempo: float = 1.0


NUISANCE_FACTORS: tuple[str, ...] = ("phase", "x_offset", "ground", "tempo")
#: Half-width of each factor's uniform range around (0, 0, 0, 1).
NUISANCE_RANGE: dict[str, float] = {"phase": 0.02, "x_offset": 0.01, "ground": 0.005, "tempo": 0.02}


def draw_nuisance(seed: int) -> Nuisance:
    """The nuisance of a clip with ``ClipSpec.seed == seed``."""
    rng = np.random.default_rng([seed, 7919])
    a = NUISANCE_RANGE
    return Nuisance(*(float(rng.uniform(-a[f], a[f])) + (1.0 if f == "tempo" else 0.0) for f in NUISANCE_FACTORS))


def render_clip(spec: ClipSpec, frames: int, height: int, width: int, fps: float,
                nuisance: Nuisance | None = None) -> np.ndarray:
    """Render one clip of ``spec`` as video frames (a pure function of its arguments).

    Args:
        spec: action and attributes; ``spec.seed`` sets the nuisance (:func:`draw_nuisance`)
            unless ``nuisance`` is given.
        frames, height, width: output shape; fps: frame rate that converts ``SPEEDS`` (Hz) to frames.

    Returns:
        uint8 array ``(frames, height, width, 3)``, RGB.
    """
    nz = draw_nuisance(spec.seed) if nuisance is None else nuisance
    phase, x_jit, g_jit, freq_jit = nz.phase, nz.x_offset, nz.ground, nz.tempo
    facing = 1.0 if spec.direction == "right" else -1.0
    scale = SIZES[spec.size] * height  # pixels per body unit
    ground = (_GROUND + g_jit) * height
    cycles = phase + SPEEDS[spec.speed] * freq_jit * np.arange(frames) / fps
    travel = _travel(spec.action, cycles)
    if spec.action in LOCOMOTION:
        span = max(float(travel.max() - travel.min()), 1e-6)
        per_cycle = min(_STRIDE[spec.action], 0.55 * width / scale / span)
        x_body = facing * per_cycle * (travel - 0.5 * (travel.max() + travel.min()))
    else:
        x_body = np.zeros(frames)
    centre = width * (0.5 + x_jit)
    rgb = np.array(COLOURS[spec.colour], dtype=np.float64)
    bg = _background(spec.background, height, width, ground)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        pose = _POSES[spec.action](float(cycles[t]))
        yaw = facing * pose.get("yaw", 90.0)
        shapes, colours = _frame_shapes(pose, yaw, rgb)
        order = np.argsort(shapes[:, 5], kind="stable")
        px = np.empty((len(shapes), 5))
        px[:, [0, 2]] = centre + (shapes[:, [0, 2]] + x_body[t]) * scale
        px[:, [1, 3]] = ground - shapes[:, [1, 3]] * scale
        px[:, 4] = np.maximum(shapes[:, 4] * scale, 0.7)
        img = bg.copy()
        for i in order:
            _draw_capsule(img, px[i], colours[i])
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out
