"""Procedural scenes: known-answer geometry, label conventions, determinism, variety, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.scenes import (
    SKY_DEPTH,
    SKY_SHADING,
    Camera,
    Light,
    Material,
    SceneSpec,
    box,
    cylinder,
    main,
    make_dataset,
    pixel_rays,
    project,
    render,
    render_scene,
    sample_scene,
    scene_prompt,
    sphere,
)

ROOT = Path(__file__).resolve().parents[1]  # `python -m training.scenes` runs from the repo root
N = 129  # odd, so the centre pixel's ray is exactly the camera's forward axis
C = N // 2


def _pixel_radius(angle_tan: float, fov_deg: float, size: int = N) -> float:
    """Image-plane distance, in pixels, of a ray at tan(angle) off the axis."""
    return angle_tan / math.tan(math.radians(fov_deg) / 2) * size / 2


def _front(target, distance, fov=40.0, light=None, elevation=0.0, azimuth=0.0):
    return dict(camera=Camera(target, distance, elevation, azimuth, fov), light=light or Light(40.0, 20.0, 0.2))


# ---------------------------------------------------------------- known-answer geometry


def test_sphere_disc_depth_and_shading():
    light = Light(elevation_deg=40.0, azimuth_deg=20.0)
    s = render(SceneSpec([sphere((0, 1, 0), 1.0)], **_front((0, 1, 0), 5.0, light=light)), N)
    expected_r = _pixel_radius(math.tan(math.asin(1 / 5)), 40.0)
    assert abs(math.sqrt(s.mask.sum() / math.pi) - expected_r) < 1.0
    assert abs(s.mask[C].sum() - 2 * expected_r) <= 1.0 and abs(s.mask[:, C].sum() - 2 * expected_r) <= 1.0
    assert np.array_equal(s.mask, s.mask[:, ::-1])  # symmetric about the vertical axis
    assert s.depth[C, C] == pytest.approx(5.0 - 1.0, abs=1e-5)  # z-depth of the nearest surface point
    np.testing.assert_allclose(s.normals[C, C], [0, 0, 1], atol=1e-6)
    assert s.shading[C, C] == pytest.approx(max(0.0, light.direction @ [0, 0, 1]), abs=1e-6)
    assert s.ids[C, C] == 1 and s.valid[C, C]


def test_sphere_stays_round_in_a_wide_image():
    s = render(SceneSpec([sphere((0, 1, 0), 1.0)], **_front((0, 1, 0), 5.0)), (65, 129))
    r = _pixel_radius(math.tan(math.asin(1 / 5)), 40.0, 65)
    assert abs(s.mask[32].sum() - 2 * r) <= 1.0 and abs(s.mask[:, 64].sum() - 2 * r) <= 1.0


def test_box_face_on_is_a_rectangle_of_constant_depth():
    a, b, c, dist = 0.8, 0.5, 0.3, 6.0
    s = render(SceneSpec([box((0, b, 0), (a, b, c))], **_front((0, b, 0), dist)), N)
    rows, cols = np.flatnonzero(s.mask.any(1)), np.flatnonzero(s.mask.any(0))
    assert abs(len(cols) - 2 * _pixel_radius(a / (dist - c), 40.0)) <= 1.0
    assert abs(len(rows) - 2 * _pixel_radius(b / (dist - c), 40.0)) <= 1.0
    assert s.mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # fills its bounding box
    np.testing.assert_allclose(s.depth[s.mask], dist - c, atol=1e-5)
    np.testing.assert_allclose(s.normals[s.mask], np.tile([0, 0, 1], (s.mask.sum(), 1)), atol=1e-6)


def test_box_rotation_matches_the_turned_view():
    """A cube turned 45° seen from azimuth 45° looks exactly like an unturned cube seen face-on."""
    straight = render(SceneSpec([box((0, 0.5, 0), (0.5, 0.5, 0.5))], **_front((0, 0.5, 0), 5.0)), 65)
    turned = render(SceneSpec([box((0, 0.5, 0), (0.5, 0.5, 0.5), yaw_deg=45.0)],
                           **_front((0, 0.5, 0), 5.0, azimuth=45.0)), 65)
    assert (straight.mask != turned.mask).sum() <= 2
    both = straight.mask & turned.mask
    np.testing.assert_allclose(straight.depth[both], turned.depth[both], atol=1e-4)
    # A box 90° turned swaps its x and z extents.
    a = render(SceneSpec([box((0, 0.5, 0), (0.8, 0.5, 0.3))], **_front((0, 0.5, 0), 6.0)), 65)
    b = render(SceneSpec([box((0, 0.5, 0), (0.3, 0.5, 0.8), yaw_deg=90.0)], **_front((0, 0.5, 0), 6.0)), 65)
    assert (a.mask != b.mask).sum() <= 2


def test_cylinder_from_above_is_a_disc_at_its_cap():
    r, hh, dist = 0.6, 0.7, 6.0
    spec = SceneSpec([cylinder((0, hh, 0), r, hh)], **_front((0, hh, 0), dist, elevation=90.0))
    s = render(spec, N)
    expected_r = _pixel_radius(r / (dist - hh), 40.0)
    assert abs(math.sqrt(s.mask.sum() / math.pi) - expected_r) < 1.0
    np.testing.assert_allclose(s.depth[s.mask], dist - hh, atol=1e-5)  # the cap faces the camera
    np.testing.assert_allclose(s.normals[C, C], [0, 1, 0], atol=1e-6)
    side = render(SceneSpec([cylinder((0, hh, 0), r, hh)], **_front((0, hh, 0), dist)), N)
    assert side.depth[C, C] == pytest.approx(dist - r, abs=1e-5)
    np.testing.assert_allclose(side.normals[C, C], [0, 0, 1], atol=1e-6)


def test_ground_plane_depth_matches_the_plane_intersection():
    el, fov, dist = 30.0, 45.0, 10.0
    light = Light(elevation_deg=55.0, azimuth_deg=0.0)
    s = render(SceneSpec([], camera=Camera((0, 0, 0), dist, el, 0.0, fov), light=light), N)
    assert s.valid.all() and not s.mask.any()
    assert s.depth[C, C] == pytest.approx(dist, rel=1e-6)  # the centre ray hits the target
    height = dist * math.sin(math.radians(el))
    for row in (0, 20, 90, N - 1):  # independent 2D derivation in the camera's vertical plane
        theta = math.atan((1 - 2 * (row + 0.5) / N) * math.tan(math.radians(fov / 2)))
        t = height / math.sin(math.radians(el) - theta)
        assert s.depth[row, C] == pytest.approx(t * math.cos(theta), rel=1e-5)
    np.testing.assert_allclose(s.shading, math.sin(math.radians(55.0)), atol=1e-6)  # n = up, no shadows


def test_sky_gets_the_documented_constants():
    s = render(SceneSpec([], camera=Camera((0, 0, 0), 10.0, 5.0, 0.0, 45.0)), 64)
    sky = ~s.valid
    assert sky[0].all() and not sky[-1].any()  # horizon in between
    assert (s.depth[sky] == SKY_DEPTH).all() and (s.shading[sky] == SKY_SHADING).all()
    assert (s.ids[sky] == -1).all() and (s.normals[sky] == 0).all()
    assert s.depth[s.valid].max() <= SKY_DEPTH  # ground beyond the far plane counts as sky


def test_sphere_casts_a_hard_shadow_on_the_ground():
    light = Light(elevation_deg=35.0, azimuth_deg=90.0, ambient=0.2)  # towards +x
    ground = Material("grey", (0.5, 0.5, 0.5))
    spec = SceneSpec([sphere((0, 1, 0), 1.0)], ground, Camera((0, 0, 0), 10.0, 60.0, 0.0, 45.0), light)
    s = render(spec, N)
    l = light.direction  # noqa: E741
    centre = np.array([0.0, 1.0, 0.0])
    i, j = np.round(project(spec.camera, centre - l / l[1], N)).astype(int)  # behind the sphere
    assert s.ids[i, j] == 0 and s.shading[i, j] == 0.0
    assert s.image[i, j, 0] == round(255 * (0.5 ** 2.2 * 0.2) ** (1 / 2.2))  # ambient only
    i, j = np.round(project(spec.camera, [2.5, 0.0, 1.0], N)).astype(int)
    assert s.ids[i, j] == 0 and s.shading[i, j] == pytest.approx(l[1], abs=1e-6)

    # Every ground pixel: shadowed exactly when the ray towards the light passes within r of the centre.
    g = s.ids == 0
    d = pixel_rays(spec.camera, N)[g]
    p = spec.camera.eye + (s.depth[g] / (d @ spec.camera.basis()[2]))[:, None] * d
    to_c = centre - p
    miss = np.linalg.norm(to_c - (to_c @ l)[:, None] * l, axis=1)
    clear = np.abs(miss - 1.0) > 0.02  # leave pixels on the shadow's edge alone
    expected = np.where(miss < 1.0, 0.0, l[1])
    np.testing.assert_allclose(s.shading[g][clear], expected[clear], atol=1e-5)
    assert (expected[clear] == 0).sum() > 100


def test_nearer_sphere_wins_whatever_the_order():
    near, far = sphere((0, 1, 0), 1.0), sphere((0, 1.5, -4), 1.5)
    view = _front((0, 1, 0), 6.0)
    a, b = render(SceneSpec([near, far], **view), N), render(SceneSpec([far, near], **view), N)
    assert a.ids[C, C] == 1 and b.ids[C, C] == 2
    assert a.depth[C, C] == pytest.approx(5.0, abs=1e-5)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.depth, b.depth)
    i, j = np.round(project(view["camera"], [0, 2.9, -4], N)).astype(int)  # top of the far sphere
    assert a.ids[i, j] == 2 and a.depth[i, j] > 6.0
    alone = render(SceneSpec([near], **view), N)
    assert (a.mask & ~alone.mask).any()  # the far one shows around the near one


# ---------------------------------------------------------------- conventions, determinism, variety


def test_shapes_dtypes_and_image_formation():
    s = render_scene(11, (48, 80))
    assert s.image.shape == (48, 80, 3) and s.image.dtype == np.uint8
    for name, dtype in [("mask", bool), ("valid", bool), ("depth", np.float32), ("shading", np.float32),
                        ("ids", np.int16)]:
        assert getattr(s, name).shape == (48, 80) and getattr(s, name).dtype == dtype, name
    assert s.normals.shape == s.albedo.shape == (48, 80, 3)
    amb = s.spec.light.ambient
    linear = s.albedo * (amb + (1 - amb) * s.shading[..., None])
    assert np.abs(np.round(np.clip(linear, 0, 1) ** (1 / 2.2) * 255) - s.image).max() <= 1


def test_works_at_512():
    s = render_scene(0, 512)
    assert s.image.shape == (512, 512, 3) and 0.0 < s.mask.mean() < 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_label_invariants(seed):
    s = render_scene(seed, 24)
    assert (s.mask <= s.valid).all()
    assert (s.depth > 0).all() and (s.depth <= SKY_DEPTH).all() and (s.depth[~s.valid] == SKY_DEPTH).all()
    assert (s.shading >= 0).all() and (s.shading <= 1).all()
    np.testing.assert_allclose(np.linalg.norm(s.normals[s.valid], axis=-1), 1.0, atol=1e-5)


def test_same_seed_same_bits_other_seed_other_scene():
    a, b, c = render_scene(7, 48), render_scene(7, 48), render_scene(8, 48)
    for name in ("image", "mask", "valid", "depth", "shading", "normals", "albedo", "ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.params == b.params and a.params != c.params
    assert not np.array_equal(a.image, c.image)
    assert [x.params for x in make_dataset([7, 8], 16)] == [a.params, c.params]


def test_spec_round_trips_through_json():
    spec = sample_scene(3)
    again = SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert np.array_equal(render(again, 32).image, render(spec, 32).image)


def test_variety_over_seeds():
    scenes = list(make_dataset(range(50), 48))
    fractions = np.array([s.mask.mean() for s in scenes])
    assert ((fractions > 0.02) & (fractions < 0.8)).sum() >= 45
    assert {len(s.spec.objects) for s in scenes} == {1, 2, 3}
    assert {o.kind for s in scenes for o in s.spec.objects} == {"sphere", "box", "cylinder"}
    assert {o.material.pattern for s in scenes for o in s.spec.objects} == {"plain", "checker", "stripes"}
    assert len({s.spec.ground.color for s in scenes}) >= 3


def test_frame_offset_moves_the_camera_in_its_image_plane_only():
    """Every draw but the camera target is the same with or without the offset; the target moves in the
    image plane (orientation, distance and field of view kept), so the object lands off centre: over
    seeds its horizontal centroid spreads far more than when centred, and it stays in the frame."""
    from training.scenes import MODEL_SCENES

    centred_opts = {**MODEL_SCENES, "frame_offset": 0.0}
    assert sample_scene(11, **{k: v for k, v in centred_opts.items() if k != "frame_offset"}) == sample_scene(11, **centred_opts)
    a, b = sample_scene(11, **centred_opts), sample_scene(11, **MODEL_SCENES)
    assert a.objects == b.objects and a.light == b.light and a.ground == b.ground
    assert (a.camera.distance, a.camera.elevation_deg, a.camera.azimuth_deg, a.camera.fov_deg) == \
        (b.camera.distance, b.camera.elevation_deg, b.camera.azimuth_deg, b.camera.fov_deg)
    move = np.subtract(b.camera.target, a.camera.target)
    assert np.linalg.norm(move) > 0 and abs(float(move @ a.camera.basis()[2])) < 1e-9  # no move along the view
    xs = {}
    for name, opts in (("centred", centred_opts), ("offset", MODEL_SCENES)):
        scenes = [render_scene(s, 64, **opts) for s in range(40)]
        assert all(sc.mask.any() for sc in scenes) and all(sc.spec.camera.eye[1] > 0 for sc in scenes)
        xs[name] = np.array([np.nonzero(sc.mask)[1].mean() for sc in scenes])
    assert xs["offset"].std() > 3 * xs["centred"].std() and xs["offset"].std() > 4  # pixels at 64²
    with pytest.raises(ValueError, match="frame_offset"):
        sample_scene(1, frame_offset=1.5)


def test_mist_fades_only_the_floor_towards_the_horizon_with_distance():
    """Mist draws nothing and changes no label; off the floor the image is the same bits; on the floor
    each pixel lies between its unmisted colour and the horizon colour, nearer the horizon the farther
    it is (the depth cue it exists for), and a floor of constant colour becomes monotone in depth."""
    from training.scenes import MODEL_SCENES

    opts = {**MODEL_SCENES, "mist": 0.0}
    clear, misty = render_scene(21, 64, **opts), render_scene(21, 64, **{**opts, "mist": 3.0})
    assert misty.spec.mist == 3.0 and clear.spec == SceneSpec.from_dict({**misty.spec.to_dict(), "mist": 0.0})
    for name in ("mask", "valid", "depth", "shading", "normals", "albedo", "ids"):
        assert np.array_equal(getattr(clear, name), getattr(misty, name)), name
    floor = clear.ids == 0
    assert floor.sum() > 200 and np.array_equal(clear.image[~floor], misty.image[~floor])
    horizon = np.asarray(misty.spec.sky_horizon) * 255
    a, b = clear.image[floor].astype(float), misty.image[floor].astype(float)
    moved = np.abs(b - a).sum(-1)
    assert np.all(np.abs(b - horizon).sum(-1) <= np.abs(a - horizon).sum(-1) + 3) and moved.mean() > 10
    lit = floor & (clear.shading > 0)  # same shading: the floor's own colour is constant there
    fraction = (misty.image[lit].astype(float) - clear.image[lit]) / (horizon - clear.image[lit])
    from scipy.stats import spearmanr
    assert spearmanr(fraction.mean(-1), clear.depth[lit]).statistic > 0.95
    assert SceneSpec.from_dict(json.loads(json.dumps(misty.spec.to_dict()))) == misty.spec
    with pytest.raises(ValueError, match="mist"):
        sample_scene(1, mist=-1.0)


def test_prompt_names_objects_and_floor():
    red = Material("red", (0.8, 0.1, 0.1))
    blue = Material("blue", (0.1, 0.2, 0.8), "checker", "white", (0.9, 0.9, 0.9))
    spec = SceneSpec([sphere((0, 1, 0), 1), box((3, 0.5, 0), (0.5, 0.5, 1.0), material=blue)],
                     ground=Material("grey", (0.5, 0.5, 0.5)))
    spec.objects[0].material = red
    assert scene_prompt(spec) == "a red sphere and a blue and white checkered box on a grey floor"
    spec.objects.append(cylinder((-3, 1, 0), 0.5, 1.0, Material("orange", (0.9, 0.5, 0.1))))
    assert scene_prompt(spec).startswith("a red sphere, a blue and white checkered box and an orange cylinder")
    assert render_scene(5, 16).prompt == scene_prompt(sample_scene(5))


# ---------------------------------------------------------------- CLI


def test_cli_writes_images_labels_and_specs(tmp_path, capsys):
    from PIL import Image
    from safetensors.numpy import load_file

    assert main(["--out", str(tmp_path), "--count", "2", "--size", "32x48", "--seed", "5", "--no-progress"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"scene_00000{i}.{ext}" for i in (5, 6) for ext in ("json", "png", "safetensors")]
    ref = render_scene(6, (32, 48))
    labels = load_file(tmp_path / "scene_000006.safetensors")
    assert labels["mask"].dtype == np.uint8 and np.array_equal(labels["mask"], ref.mask.astype(np.uint8))
    assert np.array_equal(labels["depth"], ref.depth) and np.array_equal(labels["shading"], ref.shading)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "scene_000006.png")), ref.image)
    meta = json.loads((tmp_path / "scene_000006.json").read_text())
    assert meta["prompt"] == ref.prompt and SceneSpec.from_dict(meta["spec"]) == ref.spec


@pytest.mark.parametrize("args", [
    ["--count", "0"], ["--count", "x"], ["--size", "0"], ["--size", "12x"], ["--seed", "-1"],
    ["--max-objects", "0"], ["--bogus"],
])
def test_cli_bad_arguments_exit_2(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "o"), "--count", "1", "--no-progress", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    assert not (tmp_path / "o").exists()


def test_cli_process_rejects_a_file_as_out(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "training.scenes", "--out", str(f), "--count", "1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a folder" in r.stderr
