"""Procedural 3D scenes with exact labels: foreground mask, z-depth and Lambertian shading.

No pretrained label model can be downloaded here, and even a good one is only an estimate. So we
render scenes ourselves (numpy ray casting, vectorised over pixels) and know every label exactly.

World: y is up, the ground is the plane y = 0 (background), 1–3 objects (spheres, boxes that may
be rotated about the vertical, vertical cylinders) rest on it. A pinhole camera looks at the scene
centre; one directional light above the horizon plus an ambient term; rays that hit nothing (or
only ground beyond the far plane) see a sky gradient.

Label conventions (per pixel, for the nearest hit along the pixel-centre ray; no anti-aliasing):
  ids      int16   -1 sky, 0 ground, k >= 1 object spec.objects[k - 1]
  mask     bool    ids >= 1 (objects only; ground and sky are background)
  valid    bool    ids >= 0 (the ray hit something)
  depth    float32 z-depth: distance along the camera's forward axis, world units.
                   Sky = SKY_DEPTH (the far plane, 50.0); ground beyond the far plane counts as sky.
  shading  float32 max(0, n·l) times hard-shadow visibility, in [0, 1]; excludes the ambient term.
                   Sky = SKY_SHADING (1.0: the sky colour is shown unlit, as if fully lit).
  normals  float32 [H, W, 3] unit world-space normal; sky = 0.
  albedo   float32 [H, W, 3] linear reflectance (texture included); sky = its linear colour.
  image    uint8   [H, W, 3] sRGB: (albedo · (ambient + (1 − ambient) · shading)) ** (1 / 2.2).
So `albedo * (ambient + (1 - ambient) * shading)` reproduces the linear image everywhere, except on
the ground of a scene with mist (`SceneSpec.mist` > 0): there the image fades into the horizon colour
with distance, a depth cue a plain floor otherwise lacks; albedo, shading and depth stay the floor's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SKY_DEPTH = 50.0  # the far plane; also the depth label of sky pixels
SKY_SHADING = 1.0
GAMMA = 2.2
_EPS = 1e-6  # smallest accepted ray parameter
_SHADOW_OFFSET = 1e-4  # shadow rays start this far off the surface, so they don't hit it

# sRGB colours with prompt names. Ground colours are kept apart so the floor is never mistaken for an object.
OBJECT_COLORS = {
    "red": (0.80, 0.10, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.15, 0.30, 0.85),
    "yellow": (0.95, 0.85, 0.15), "orange": (0.95, 0.50, 0.10), "purple": (0.55, 0.20, 0.70),
    "pink": (0.95, 0.50, 0.70), "cyan": (0.20, 0.80, 0.85), "white": (0.92, 0.92, 0.92),
    "black": (0.08, 0.08, 0.08),
}
GROUND_COLORS = {
    "grey": (0.50, 0.50, 0.50), "beige": (0.85, 0.78, 0.60), "brown": (0.45, 0.30, 0.18),
    "light grey": (0.75, 0.75, 0.75), "dark grey": (0.28, 0.28, 0.28),
}
PATTERN_COLORS = {"white": (0.92, 0.92, 0.92), "black": (0.08, 0.08, 0.08), **GROUND_COLORS}
KINDS = ("sphere", "box", "cylinder")
PATTERNS = ("plain", "checker", "stripes")

# The scenes model's world (training.scenes_model): one plain object of a saturated colour on a plain
# floor. Narrowed from the full renderer so a 2-core training run learns it within the hour; one
# salient object per image is also what the study's LAION prompts mostly show. White and black are
# left out: next to the grey floors they are the colours a palette rule cannot tell from the floor.
MODEL_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
# The object is placed anywhere in the frame (`frame_offset`), not always at its centre: a model that has
# only seen centred objects has learned "the object is in the middle" and cannot be moved by any edit.
# The floor fades into the horizon colour with distance (`mist`): a plain floor otherwise says nothing of
# how far each of its pixels is, and the depth a model can know is bounded by the cues its world shows.
# 1.5 (stage 6) rather than 3.0 (stage 5): the stronger cue took the probes' noised depth 0.840 -> 0.853.
MODEL_SCENES = {"max_objects": 1, "colors": MODEL_COLORS, "plain": True, "frame_offset": 1.0, "mist": 1.5}


# ---------------------------------------------------------------- scene description


@dataclass
class Material:
    """Base colour plus an optional two-colour solid texture (checker or horizontal stripes)."""

    color: str = "grey"  # name used in the prompt
    rgb: tuple[float, float, float] = (0.5, 0.5, 0.5)  # sRGB in [0, 1]
    pattern: str = "plain"  # plain | checker | stripes
    color2: str = "white"
    rgb2: tuple[float, float, float] = (0.92, 0.92, 0.92)
    scale: float = 0.5  # width of one checker cell / stripe, world units


@dataclass
class SceneObject:
    """A sphere, box or vertical cylinder. `half_extents` is the half-size of its local box:
    sphere (r, r, r); box (a, b, c) before the yaw; cylinder (r, h/2, r). The yaw turns the
    object (and its texture) about the vertical axis through `center`."""

    kind: str
    center: tuple[float, float, float]
    half_extents: tuple[float, float, float]
    yaw_deg: float = 0.0
    material: Material = field(default_factory=Material)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        a, b, c = self.half_extents
        if min(a, b, c) <= 0:
            raise ValueError("half_extents must be positive")
        if self.kind == "sphere" and not (a == b == c):
            raise ValueError("a sphere needs equal half_extents (r, r, r)")
        if self.kind == "cylinder" and a != c:
            raise ValueError("a cylinder needs half_extents (r, h/2, r)")


def sphere(center, radius: float, material: Material | None = None, yaw_deg: float = 0.0) -> SceneObject:
    return SceneObject("sphere", tuple(map(float, center)), (radius,) * 3, yaw_deg, material or Material())


def box(center, half_extents, yaw_deg: float = 0.0, material: Material | None = None) -> SceneObject:
    return SceneObject("box", tuple(map(float, center)), tuple(map(float, half_extents)), yaw_deg,
                       material or Material())


def cylinder(center, radius: float, half_height: float, material: Material | None = None) -> SceneObject:
    return SceneObject("cylinder", tuple(map(float, center)), (radius, half_height, radius), 0.0,
                       material or Material())


@dataclass
class Camera:
    """Pinhole camera orbiting `target`: azimuth 0 puts it on +z, elevation 90 straight above."""

    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    distance: float = 8.0
    elevation_deg: float = 30.0
    azimuth_deg: float = 0.0
    fov_deg: float = 45.0  # vertical field of view; the horizontal one follows the aspect ratio

    @property
    def eye(self) -> np.ndarray:
        el, az = math.radians(self.elevation_deg), math.radians(self.azimuth_deg)
        offset = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
        return np.asarray(self.target, float) + self.distance * offset

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors; `right` stays horizontal (no roll)."""
        fwd = np.asarray(self.target, float) - self.eye
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        if np.linalg.norm(right) < 1e-9:  # looking straight down/up: pick any horizontal right
            right = np.array([math.cos(math.radians(self.azimuth_deg)), 0.0, -math.sin(math.radians(self.azimuth_deg))])
        right /= np.linalg.norm(right)
        return right, np.cross(right, fwd), fwd


@dataclass
class Light:
    """Directional light from (elevation, azimuth), same angle convention as the camera."""

    elevation_deg: float = 50.0
    azimuth_deg: float = 30.0
    ambient: float = 0.2  # fraction of light that reaches every surface, shadowed or not

    @property
    def direction(self) -> np.ndarray:
        """Unit vector from a surface towards the light."""
        el, az = math.radians(self.elevation_deg), math.radians(self.azimuth_deg)
        return np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


@dataclass
class SceneSpec:
    """Everything needed to render a scene; JSON round-trips through to_dict / from_dict."""

    objects: list[SceneObject] = field(default_factory=list)
    ground: Material = field(default_factory=Material)
    camera: Camera = field(default_factory=Camera)
    light: Light = field(default_factory=Light)
    sky_horizon: tuple[float, float, float] = (0.85, 0.88, 0.92)  # sRGB
    sky_zenith: tuple[float, float, float] = (0.35, 0.55, 0.85)
    seed: int | None = None  # the seed it was sampled from, if any
    # Ground mist: the floor fades into the horizon colour with ray distance t as 1 - exp(-t / (mist · camera
    # distance)); 0 = none. Objects and labels are untouched (see the module docstring).
    mist: float = 0.0

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples → lists, numpy-free

    @classmethod
    def from_dict(cls, d: dict) -> SceneSpec:
        t = tuple
        objects = [SceneObject(o["kind"], t(o["center"]), t(o["half_extents"]), o["yaw_deg"],
                               _material(o["material"])) for o in d["objects"]]
        return cls(objects, _material(d["ground"]), Camera(**{**d["camera"], "target": t(d["camera"]["target"])}),
                   Light(**d["light"]), t(d["sky_horizon"]), t(d["sky_zenith"]), d.get("seed"), d.get("mist", 0.0))


def _material(d: dict) -> Material:
    return Material(**{**d, "rgb": tuple(d["rgb"]), "rgb2": tuple(d["rgb2"])})


@dataclass
class Scene:
    """A rendered scene: the image, its exact labels (see the module docstring) and its spec."""

    image: np.ndarray
    mask: np.ndarray
    valid: np.ndarray
    depth: np.ndarray
    shading: np.ndarray
    normals: np.ndarray
    albedo: np.ndarray
    ids: np.ndarray
    spec: SceneSpec

    @property
    def params(self) -> dict:
        return self.spec.to_dict()

    @property
    def prompt(self) -> str:
        return scene_prompt(self.spec)


# ---------------------------------------------------------------- sampling


def _pick_color(rng: np.random.Generator, palette: dict, exclude=()) -> tuple[str, tuple]:
    names = [n for n in palette if n not in exclude]
    name = names[rng.integers(len(names))]
    rgb = np.clip(np.asarray(palette[name]) + rng.uniform(-0.04, 0.04, 3), 0.0, 1.0)
    return name, tuple(float(v) for v in rgb)


def _pick_material(rng, palette, exclude, p_patterns, scale_range) -> Material:
    name, rgb = _pick_color(rng, palette, exclude)
    pattern = PATTERNS[rng.choice(3, p=p_patterns)]
    name2, rgb2 = _pick_color(rng, PATTERN_COLORS, exclude={name})
    return Material(name, rgb, pattern, name2, rgb2, float(rng.uniform(*scale_range)))


def sample_scene(rng: np.random.Generator | int, *, max_objects: int = 3, kinds: Iterable[str] = KINDS,
                 colors: Iterable[str] | None = None, plain: bool = False, frame_offset: float = 0.0,
                 mist: float = 0.0) -> SceneSpec:
    """Draw a random scene. The camera distance is set from the scene's extent, so objects fill
    roughly 2–80 % of the frame (tested over many seeds). `colors` narrows the object palette,
    `plain` turns every texture off (objects and floor); the random draws are the same either way
    up to those choices, so a narrowed distribution is a subset in kind, not a different sampler.
    `frame_offset` (0…1) moves the camera parallel to its image plane so the scene's centre lands
    anywhere in the part of the frame its extent leaves free (1: all of it horizontally, a third of it
    vertically); drawn last, so every other draw is the same with or without it. `mist` (≥ 0) fades the
    floor into the horizon colour with distance (SceneSpec.mist); it draws nothing."""
    seed = rng if isinstance(rng, int) else None
    rng = np.random.default_rng(rng)
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}")
    if max_objects < 1:
        raise ValueError("max_objects must be >= 1")
    if not 0.0 <= frame_offset <= 1.0:
        raise ValueError(f"frame_offset must be in [0, 1], got {frame_offset!r}")
    if not (mist >= 0.0 and math.isfinite(mist)):
        raise ValueError(f"mist must be a finite number >= 0, got {mist!r}")
    palette = OBJECT_COLORS if colors is None else {c: OBJECT_COLORS[c] for c in colors}
    if not palette or any(c not in OBJECT_COLORS for c in palette):
        raise ValueError(f"colors must be a non-empty subset of {tuple(OBJECT_COLORS)}")
    p_objects, p_ground = ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)) if plain else ((0.5, 0.3, 0.2), (0.6, 0.4, 0.0))

    objects: list[SceneObject] = []
    footprints: list[tuple[float, float, float]] = []  # (x, z, radius) on the ground
    used_colors: set[str] = set()
    n = int(rng.integers(1, max_objects + 1))
    spread = 0.4 + 0.9 * (n - 1)
    for _ in range(n):
        kind = kinds[rng.integers(len(kinds))]
        if kind == "sphere":
            r = rng.uniform(0.5, 1.0)
            half, foot = (r, r, r), r
        elif kind == "box":
            half = tuple(rng.uniform(0.35, 0.85, 3))
            foot = math.hypot(half[0], half[2])
        else:
            r, hh = rng.uniform(0.35, 0.75), rng.uniform(0.4, 1.0)
            half, foot = (r, hh, r), r
        yaw = float(rng.uniform(0, 90))
        for _try in range(50):  # rejection sampling: footprints must not overlap
            rad, ang = spread * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            x, z = rad * math.cos(ang), rad * math.sin(ang)
            if all(math.hypot(x - fx, z - fz) > foot + fr + 0.1 for fx, fz, fr in footprints):
                break
        else:
            continue  # no room: fewer objects
        if not set(palette) - used_colors:
            break  # every colour taken: fewer objects
        mat = _pick_material(rng, palette, used_colors, p_objects, (0.15, 0.4))
        used_colors.add(mat.color)
        footprints.append((x, z, foot))
        objects.append(SceneObject(kind, (float(x), float(half[1]), float(z)),
                                   tuple(float(h) for h in half), yaw, mat))

    fx = np.array([f[0] for f in footprints])
    fz = np.array([f[1] for f in footprints])
    cx, cz = float(fx.mean()), float(fz.mean())
    heights = [o.half_extents[1] for o in objects]
    # Rough radius of the scene around the target; the camera distance frames it.
    extent = max(math.hypot(x - cx, z - cz) + r for x, z, r in footprints)
    extent = max(extent, max(heights))
    target = (cx, 0.8 * float(np.mean(heights)), cz)
    fov = float(rng.uniform(35, 55))
    fill = rng.uniform(0.4, 0.9)  # fraction of the half-frame the scene's extent spans
    distance = extent / math.sin(math.radians(fov / 2) * fill)
    camera = Camera(target, float(distance), float(rng.uniform(8, 50)), float(rng.uniform(0, 360)), fov)
    # Floor checkers scale with the view, so distant cells don't shrink below a pixel and alias as much.
    ground = _pick_material(rng, GROUND_COLORS, (), p_ground, (0.08 * distance, 0.15 * distance))
    light = Light(float(rng.uniform(20, 75)), float(rng.uniform(0, 360)), float(rng.uniform(0.1, 0.3)))
    horizon = tuple(float(v) for v in rng.uniform(0.75, 0.95, 3))
    zenith = tuple(float(v) for v in np.clip(np.array([0.3, 0.5, 0.85]) + rng.uniform(-0.15, 0.15, 3), 0, 1))
    if frame_offset > 0:
        camera = _offset_camera(camera, rng.uniform(-1.0, 1.0, 2) * frame_offset * (1.0 - fill) * np.array([1.0, 1 / 3]))
    return SceneSpec(objects, ground, camera, light, horizon, zenith, seed, float(mist))


def _offset_camera(camera: Camera, offset: np.ndarray) -> Camera:
    """The camera moved parallel to its image plane so its old target appears at `offset` (x right,
    y up) in units of the half-frame (square frame), its orientation unchanged. A move that would take
    the eye below a tenth of its height above the floor is mirrored vertically."""
    right, up, _ = camera.basis()
    half = camera.distance * math.tan(math.radians(camera.fov_deg / 2))
    ox, oy = float(offset[0]), float(offset[1])
    if (camera.eye - half * (ox * right + oy * up))[1] < 0.1 * camera.eye[1]:
        oy = -oy
    target = np.asarray(camera.target, float) - half * (ox * right + oy * up)
    return Camera(tuple(float(v) for v in target), camera.distance, camera.elevation_deg, camera.azimuth_deg, camera.fov_deg)


# ---------------------------------------------------------------- intersections
# Each takes ray origins o [N, 3] (or [1, 3], broadcast) and unit directions d [N, 3] (or [1, 3])
# and returns the ray parameter of the entering hit, inf where it misses. Only entering hits
# count: rays start outside every object, and shadow rays then never re-hit their own surface.


def _mul(a, m) -> np.ndarray:
    """a [..., 3] times a 3-vector or a 3×3 matrix. einsum, not `@`: matmul on these thin arrays goes
    through BLAS, which measured ~10× slower here (512² rays)."""
    return np.einsum("...j,j->...", a, m) if np.ndim(m) == 1 else np.einsum("...j,jk->...k", a, m)


def _yaw_matrix(yaw_deg: float) -> np.ndarray:
    """Rotation about +y; local → world is `q @ R.T`, world → local is `p @ R`."""
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_plane(o, d):
    """Ground y = 0, seen from above."""
    dy = d[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[:, 1] / dy
    return np.where((dy < -1e-12) & (t > _EPS), t, np.inf)


def _hit_sphere(obj: SceneObject, o, d):
    oc = o - np.asarray(obj.center)
    b = (oc * d).sum(1)
    disc = b * b - ((oc * oc).sum(1) - obj.half_extents[0] ** 2)
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _hit_box(obj: SceneObject, o, d):
    """Slab method in the box's local (un-yawed) frame, one axis at a time (columns are contiguous)."""
    rot = _yaw_matrix(obj.yaw_deg)
    ol, dl = np.broadcast_arrays(_mul(o - np.asarray(obj.center), rot), _mul(d, rot))
    tnear, tfar = np.full(len(ol), -np.inf), np.full(len(ol), np.inf)
    for oi, di, hi in zip(ol.T.copy(), dl.T.copy(), obj.half_extents, strict=True):
        di[np.abs(di) < 1e-12] = 1e-12  # parallel to a slab: huge but finite parameters
        t1, t2 = (-hi - oi) / di, (hi - oi) / di
        np.maximum(tnear, np.minimum(t1, t2), out=tnear)
        np.minimum(tfar, np.maximum(t1, t2), out=tfar)
    return np.where((tnear <= tfar) & (tnear > _EPS), tnear, np.inf)


def _hit_cylinder(obj: SceneObject, o, d):
    """Vertical cylinder: nearest of the side (quadratic in x, z) and the cap facing the ray."""
    r, hh = obj.half_extents[0], obj.half_extents[1]
    oc, d = np.broadcast_arrays(o - np.asarray(obj.center), d)
    (ox, oy, oz), (dx, dy, dz) = oc.T, d.T
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        side = (a > 1e-12) & (disc >= 0) & (ts > _EPS) & (np.abs(oy + ts * dy) <= hh)
        tc = (-np.sign(dy) * hh - oy) / dy  # dy < 0 enters through the top cap, dy > 0 the bottom
        hx, hz = ox + tc * dx, oz + tc * dz
        cap = (np.abs(dy) > 1e-12) & (tc > _EPS) & (hx * hx + hz * hz <= r * r)
    return np.minimum(np.where(side, ts, np.inf), np.where(cap, tc, np.inf))


_HIT = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}


def _local(obj: SceneObject, p):
    return _mul(p - np.asarray(obj.center), _yaw_matrix(obj.yaw_deg))


def _normals(obj: SceneObject, p):
    """Outward unit normals at surface points p [M, 3], from the point's place on the surface."""
    q = _local(obj, p)
    h = np.asarray(obj.half_extents)
    if obj.kind == "sphere":
        n = q / h[0]
    elif obj.kind == "box":  # the face is the axis where the point is proportionally furthest out
        axis = np.argmax(np.abs(q) / h, axis=1)
        n = np.zeros_like(q)
        n[np.arange(len(q)), axis] = np.sign(q[np.arange(len(q)), axis])
    else:
        radial = np.hypot(q[:, 0], q[:, 2])
        on_cap = np.abs(q[:, 1]) / h[1] >= radial / h[0]
        n = np.where(on_cap[:, None], np.stack([0 * radial, np.sign(q[:, 1]), 0 * radial], 1),
                     q * np.array([1.0, 0.0, 1.0]) / np.maximum(radial, 1e-12)[:, None])
    n = _mul(n, _yaw_matrix(obj.yaw_deg).T)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _pattern(mat: Material, q) -> np.ndarray:
    """Which texture colour each local point takes (True = rgb2). Solid textures need no UVs."""
    if mat.pattern == "plain":
        return np.zeros(len(q), bool)
    cells = np.floor(q / mat.scale + 0.25).astype(np.int64)  # offset: surfaces rarely lie on cell borders
    if mat.pattern == "stripes":
        return cells[:, 1] % 2 == 1
    return cells.sum(1) % 2 == 1


def _to_linear(rgb) -> np.ndarray:
    return np.asarray(rgb, float) ** GAMMA


# ---------------------------------------------------------------- rendering


def _size(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


def pixel_rays(camera: Camera, size) -> np.ndarray:
    """Unit ray directions [H, W, 3] through pixel centres (row 0 at the top)."""
    h, w = _size(size)
    right, up, fwd = camera.basis()
    tan_y = math.tan(math.radians(camera.fov_deg) / 2)
    x = ((np.arange(w) + 0.5) * 2 / w - 1) * tan_y * w / h
    y = (1 - (np.arange(h) + 0.5) * 2 / h) * tan_y
    d = fwd + x[None, :, None] * right + y[:, None, None] * up
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def project(camera: Camera, points, size) -> np.ndarray:
    """World points [..., 3] → continuous pixel coordinates [..., 2] as (row, col); pixel (i, j)'s
    centre is at (i, j). The inverse of pixel_rays, for placing known points in tests and plots."""
    h, w = _size(size)
    right, up, fwd = camera.basis()
    v = np.asarray(points, float) - camera.eye
    z = _mul(v, fwd)
    tan_y = math.tan(math.radians(camera.fov_deg) / 2)
    xn = _mul(v, right) / z / (tan_y * w / h)
    yn = _mul(v, up) / z / tan_y
    return np.stack([(1 - yn) * h / 2 - 0.5, (xn + 1) * w / 2 - 0.5], -1)


def render(spec: SceneSpec, size=(128, 128)) -> Scene:
    """Cast one ray per pixel centre; nearest hit wins; one shadow ray per lit surface point."""
    h, w = _size(size)
    eye = spec.camera.eye[None]
    fwd = spec.camera.basis()[2]
    d = pixel_rays(spec.camera, (h, w)).reshape(-1, 3)
    n_px = len(d)

    t_best = _hit_plane(eye, d)
    ids = np.where(np.isfinite(t_best), 0, -1).astype(np.int16)
    for k, obj in enumerate(spec.objects, start=1):
        t = _HIT[obj.kind](obj, eye, d)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        ids[closer] = k
    z = t_best * _mul(d, fwd)
    ids[z > SKY_DEPTH] = -1  # beyond the far plane (or a miss): sky

    hit = ids >= 0
    p = eye + t_best[hit, None] * d[hit]
    hid = ids[hit]
    normals = np.zeros((n_px, 3))
    albedo = np.zeros((n_px, 3))
    n_hit = np.tile([0.0, 1.0, 0.0], (len(p), 1))
    alb_hit = np.empty((len(p), 3))
    surfaces = [(0, spec.ground, None)] + [(k, o.material, o) for k, o in enumerate(spec.objects, start=1)]
    for k, mat, obj in surfaces:
        sel = hid == k
        if not sel.any():
            continue
        if obj is None:  # ground texture lives in (x, z); its stripes run along x
            q = np.stack([p[sel, 0], p[sel, 2], np.zeros(sel.sum())], 1)
        else:
            q = _local(obj, p[sel])
            n_hit[sel] = _normals(obj, p[sel])
        alb_hit[sel] = np.where(_pattern(mat, q)[:, None], _to_linear(mat.rgb2), _to_linear(mat.rgb))
    normals[hit] = n_hit
    albedo[hit] = alb_hit

    light = spec.light.direction
    lambert = np.maximum(0.0, _mul(n_hit, light))
    lit = lambert > 0
    if lit.any() and spec.objects:  # shadow rays: only objects can block a light above the horizon
        origin = p[lit] + _SHADOW_OFFSET * n_hit[lit]
        blocked = np.zeros(len(origin), bool)
        for obj in spec.objects:
            blocked |= np.isfinite(_HIT[obj.kind](obj, origin, light[None]))
        lambert[np.flatnonzero(lit)[blocked]] = 0.0

    shading = np.full(n_px, SKY_SHADING)
    shading[hit] = lambert
    depth = np.full(n_px, SKY_DEPTH)
    depth[hit] = z[hit]
    up = np.clip(d[~hit, 1], 0.0, 1.0)[:, None] ** 0.6  # sky: horizon colour → zenith colour
    sky = np.asarray(spec.sky_horizon) + (np.asarray(spec.sky_zenith) - np.asarray(spec.sky_horizon)) * up
    albedo[~hit] = _to_linear(np.clip(sky, 0, 1))
    amb = spec.light.ambient
    linear = albedo * (amb + (1 - amb) * shading[:, None])
    srgb = np.clip(linear, 0, 1) ** (1 / GAMMA)
    if spec.mist > 0:  # faded in sRGB, a painter's aerial perspective: a linear-light fade washes dark floors out
        ground = np.flatnonzero(ids == 0)
        fade = 1.0 - np.exp(-t_best[ground] / (spec.mist * spec.camera.distance))
        srgb[ground] += fade[:, None] * (np.asarray(spec.sky_horizon) - srgb[ground])
    image = np.round(srgb * 255).astype(np.uint8)

    def grid(a, dtype):
        return np.ascontiguousarray(a.reshape(h, w, *a.shape[1:]).astype(dtype))

    return Scene(image=grid(image, np.uint8), mask=grid(ids >= 1, bool), valid=grid(hit, bool),
                 depth=grid(depth, np.float32), shading=grid(shading, np.float32),
                 normals=grid(normals, np.float32), albedo=grid(albedo, np.float32),
                 ids=grid(ids, np.int16), spec=spec)


def render_scene(seed: int, size=(128, 128), **options) -> Scene:
    """Sample a scene from `seed` (options go to sample_scene) and render it: same seed, same bits."""
    return render(sample_scene(int(seed), **options), size)


def make_dataset(seeds: Iterable[int], size=(128, 128), **options) -> Iterator[Scene]:
    """Render scenes lazily, one per seed."""
    for seed in seeds:
        yield render_scene(seed, size, **options)


# ---------------------------------------------------------------- prompts


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _described(mat: Material, noun: str) -> str:
    if mat.pattern == "plain":
        return f"{mat.color} {noun}"
    adjective = "checkered" if mat.pattern == "checker" else "striped"
    return f"{mat.color} and {mat.color2} {adjective} {noun}"


def scene_prompt(spec: SceneSpec) -> str:
    """A text condition naming what was rendered, e.g. 'a red sphere and a blue box on a grey floor'."""
    names = []
    for o in spec.objects:
        noun = o.kind
        if o.kind == "box" and max(o.half_extents) / min(o.half_extents) < 1.2:
            noun = "cube"
        names.append(_article(_described(o.material, noun)))
    if not names:
        things = "nothing"
    elif len(names) == 1:
        things = names[0]
    else:
        things = ", ".join(names[:-1]) + " and " + names[-1]
    return f"{things} on {_article(_described(spec.ground, 'floor'))}"


# ---------------------------------------------------------------- files and CLI

LABEL_METADATA = {
    "depth": f"z-depth along the camera forward axis, world units; sky = {SKY_DEPTH}",
    "shading": f"max(0, n.l) with hard shadows, no ambient; sky = {SKY_SHADING}",
    "mask": "1 = object (nearest hit), 0 = ground or sky",
    "valid": "1 = ray hit ground or an object",
    "ids": "-1 sky, 0 ground, k>=1 spec.objects[k-1]",
}


def save_scene(scene: Scene, out: str | Path, stem: str) -> list[Path]:
    """Write `stem`.png, `stem`.safetensors (labels) and `stem`.json (spec + prompt), each atomically."""
    from PIL import Image
    from safetensors.numpy import save_file

    from ldmprobe.atomic import atomic_path, save_image, write_json

    out = Path(out)
    paths = [out / f"{stem}.png", out / f"{stem}.safetensors", out / f"{stem}.json"]
    save_image(Image.fromarray(scene.image), paths[0])
    tensors = {"mask": scene.mask.astype(np.uint8), "valid": scene.valid.astype(np.uint8), "depth": scene.depth,
               "shading": scene.shading, "normals": scene.normals, "ids": scene.ids}
    with atomic_path(paths[1]) as tmp:
        save_file(tensors, str(tmp), metadata=LABEL_METADATA)
    write_json(paths[2], {"prompt": scene.prompt, "size": list(scene.mask.shape), "labels": LABEL_METADATA,
                          "spec": scene.params})
    return paths


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) > 2 or not (8 <= h <= 4096 and 8 <= w <= 4096):
        raise argparse.ArgumentTypeError(f"expected N or HxW with sides in 8..4096, got {text!r}")
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m training.scenes", description="Render procedural scenes with exact labels.")
    p.add_argument("--out", required=True, type=Path, help="output folder (required; created if missing)")
    p.add_argument("--count", required=True, type=int, help="number of scenes (required)")
    p.add_argument("--size", default=(128, 128), type=_parse_size, help="N or HxW pixels (default: 128)")
    p.add_argument("--seed", default=0, type=int, help="seed of the first scene; scene i uses seed + i (default: 0)")
    p.add_argument("--max-objects", default=3, type=int, help="at most this many objects per scene (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count: must be >= 1, got {args.count}")
    if args.seed < 0:
        p.error(f"--seed: must be >= 0, got {args.seed}")
    if args.max_objects < 1:
        p.error(f"--max-objects: must be >= 1, got {args.max_objects}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out: {args.out} exists and is not a folder")

    from tqdm.auto import tqdm

    for seed in tqdm(range(args.seed, args.seed + args.count), desc="scenes", unit="scene", disable=args.no_progress):
        save_scene(render_scene(seed, args.size, max_objects=args.max_objects), args.out, f"scene_{seed:06d}")
    print(f"wrote {args.count} scenes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
