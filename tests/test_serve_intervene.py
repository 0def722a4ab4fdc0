"""POST /predictions/intervene against a real TorchServe, plus the service in process.

The archive is built by scripts/build_archives.sh with a bank fitted on rendered scenes (the
training job); the worker runs eagerly (compile: false): the compiled path of the U-Net is
covered by the probe endpoint's tests and the compiled Adam step by test_intervene.py, and a
second cold compile here would only add minutes."""

from __future__ import annotations

import base64
import math
import time

import numpy as np
import pytest
import requests
import torch
from conftest import SCENE_BANK_STEPS
from serve_fixtures import (
    FUZZ_SETTINGS,
    assert_batch_invariant,
    assert_worker_kept,
    build_archive,
    fuzz_post,
    png_array,
    png_b64_of,
    running_server,
)

BASE = {"prompt": "a red apple on a wooden table", "seed": 5107435, "steps": SCENE_BANK_STEPS,
        "dx": 32, "edit_steps": [0, 1, 2], "iterations": 32}
MAX_WORK = 2048
OVERRIDES = {"handler": {"compile": False, "max_side": 256, "max_steps": 12, "max_work": MAX_WORK,
                         "warm_settings": {"steps": 2}}}
FUZZ_EXAMPLES = 120


@pytest.fixture(scope="module")
def server(scene_bank, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchserve-intervene")
    store = build_archive(root / "store", scene_bank, archives=("intervene",),
                          per_archive={"intervene": OVERRIDES}).parent
    with running_server(root, store, ["intervene"]) as srv:
        yield srv


def post(server, body, **kw):
    return server.post(body, model="intervene", **kw)


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    return response.json()


def test_intervention_end_to_end(server):
    body = ok(post(server, BASE))
    assert set(body) == {"images", "masks", "success", "layers", "edit_steps", "losses", "metadata"}
    for name in ("original", "edited"):
        img = png_array(body["images"][name]["png"])
        assert img.shape == (128, 128, 3) and body["images"][name]["height"] == 128
    for name in ("original", "target", "achieved"):
        m = body["masks"][name]
        assert png_array(m["png"]).shape == (128, 128)
        assert m["png_scale"] == {"mode": "probability", "lo": 0.0, "hi": 1.0}
    s = body["success"]
    assert s["property"] == "foreground"
    assert {"dice_to_target", "dice_baseline", "shift_requested_px", "shift_achieved_px", "pixel_change",
            "latent_change", "representation"} <= set(s)
    rep = s["representation"]
    assert rep["rmse_to_target"] < 0.5 * rep["rmse_baseline"]  # the edited layers' probes read the target
    assert body["edit_steps"] == [0, 1, 2] and len(body["layers"]) == 16  # ldmprobe's default: all
    assert set(body["losses"]) == {"0", "1", "2"}
    meta = body["metadata"]
    assert meta["affine"] == [[1, 0, 32], [0, 1, 0]] and meta["iterations"] == 32
    assert meta["limits"] == {"max_work": MAX_WORK, "work": 32 * 16 * 3}
    assert {"denoise", "optimise", "decode", "total", "validate", "encode"} <= set(meta["timings_ms"])
    # the target is the unedited mask moved 32 px to the right
    target = png_array(body["masks"]["target"]["png"]).astype(float)
    original = png_array(body["masks"]["original"]["png"]).astype(float)
    assert np.abs(target[:, 32:] - original[:, :-32]).max() <= 2


def test_served_intervention_equals_the_librarys(server, sampler, scene_bank, tiny):
    """The endpoint against the library for the same request: both images, the three masks,
    the success numbers and the losses are what `Intervention.run` gives (to float rounding).
    Half the shift moves the target mask by far more than that, so a lost or altered field
    could not pass."""
    from ldmprobe.generate import to_pil
    from ldmprobe.intervene import Intervention, InterventionSpec
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    body = ok(post(server, BASE))
    runner = Intervention(sampler, ProbeBank.load(scene_bank, tiny))
    settings = GenerationSettings(steps=BASE["steps"])
    lib = runner.run(BASE["prompt"], BASE["seed"], InterventionSpec(dx=32, edit_steps=[0, 1, 2], iterations=32), settings)
    half = runner.run(BASE["prompt"], BASE["seed"], InterventionSpec(dx=16, edit_steps=[0, 1, 2], iterations=32),
                      settings)
    for name, image in zip(("original", "edited"), to_pil(torch.stack([lib.original, lib.edited])), strict=True):
        assert np.abs(png_array(body["images"][name]["png"]).astype(int) - np.asarray(image)).max() <= 1, name
    for name, values in (("original", lib.original_map), ("target", lib.target_map), ("achieved", lib.edited_map)):
        grey = np.round(values.clamp(0, 1).numpy() * 255)
        assert np.abs(png_array(body["masks"][name]["png"]) - grey).max() <= 1, name
    moved = np.round(half.target_map.clamp(0, 1).numpy() * 255)
    assert np.abs(png_array(body["masks"]["target"]["png"]) - moved).max() > 100
    assert body["layers"] == lib.layers and body["edit_steps"] == lib.edit_steps
    # flattened and compared leaf by leaf: this pytest's approx refuses nested dicts and strings
    _close(_numbers(body["losses"]), _numbers({str(k): v for k, v in lib.losses.items()}), rel=1e-3, abs_=1e-6)
    _close(_numbers(body["success"]), _numbers(lib.success), rel=1e-3, abs_=2e-3)


def _close(served: dict, library: dict, rel: float, abs_: float) -> None:
    assert set(served) == set(library)
    for key, want in library.items():
        got = served[key]
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            assert math.isclose(got, want, rel_tol=rel, abs_tol=abs_), (key, got, want)
        else:
            assert got == want, (key, got, want)


def _numbers(tree, prefix=""):
    """The numbers of a nested answer, flattened to {path: value} (strings and Nones kept as is)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def test_zero_shift_returns_the_unedited_image(server):
    body = ok(post(server, BASE | {"dx": 0}))
    assert body["images"]["original"]["png"] == body["images"]["edited"]["png"]
    assert body["success"]["latent_change"] == 0.0


def test_user_mask_and_depth(server):
    mask = np.zeros((128, 128), np.uint8)
    mask[16:64, 64:112] = 255
    body = ok(post(server, {k: v for k, v in BASE.items() if k != "dx"} | {"target_mask": png_b64_of(mask)}))
    rep = body["success"]["representation"]
    assert rep["dice_to_target"] > rep["dice_baseline"] + 0.3
    assert np.array_equal(png_array(body["masks"]["target"]["png"]), mask)
    # 128 iterations (the default): relative-depth probes put the warped target further out in the probe's
    # units than the 32 of BASE reach without Adam overshooting (tests/test_intervene.py::test_depth_variant)
    depth = ok(post(server, BASE | {"property": "depth", "layers": ["dec4.0", "dec4.1"], "edit_steps": [0, 1],
                                    "iterations": 128}))
    assert depth["masks"]["target"]["png_scale"]["mode"] == "minmax"
    assert depth["success"]["representation"]["rmse_to_target"] < depth["success"]["representation"]["rmse_baseline"]


BAD = [
    ("malformed_json", b'{"prompt": ', "invalid_json", "request"),
    ("array_body", b"[1]", "invalid_request", "request"),
    ("empty_body", b"", "invalid_json", "request"),
    ("missing_prompt", {"dx": 3}, "invalid_request", "prompt"),
    ("unknown_field", BASE | {"shift": 3}, "invalid_request", "shift"),
    ("dx_as_string", BASE | {"dx": "3"}, "invalid_request", "dx"),
    ("dx_too_large", BASE | {"dx": 1e9}, "invalid_request", "dx"),
    ("iterations_as_float", BASE | {"iterations": 3.5}, "invalid_request", "iterations"),
    ("iterations_over_schema", BASE | {"iterations": 5000}, "invalid_request", "iterations"),
    ("too_much_work", BASE | {"iterations": 1000}, "too_much_work", "iterations"),
    ("lr_zero", BASE | {"lr": 0}, "invalid_request", "lr"),
    ("unknown_property", BASE | {"property": "shading"}, "invalid_request", "property"),
    ("unknown_layer", BASE | {"layers": ["dec9.9"]}, "invalid_request", "layers"),
    ("edit_step_out_of_range", BASE | {"edit_steps": [0, SCENE_BANK_STEPS]}, "invalid_request", "edit_steps"),
    ("edit_steps_empty", BASE | {"edit_steps": []}, "invalid_request", "edit_steps"),
    ("negative_edit_step", BASE | {"edit_steps": [-1]}, "invalid_request", "edit_steps"),
    ("bce_on_regression_probe", BASE | {"loss": "bce"}, "invalid_request", "loss"),
    ("unknown_loss", BASE | {"loss": "l1"}, "invalid_request", "loss"),
    ("affine_wrong_shape", BASE | {"dx": 0, "affine": [[1, 0], [0, 1]]}, "invalid_request", "affine"),
    ("affine_singular", BASE | {"dx": 0, "affine": [[0, 0, 1], [0, 0, 1]]}, "invalid_request", "affine"),
    ("dx_and_affine", BASE | {"affine": [[1, 0, 3], [0, 1, 0]]}, "invalid_request", "request"),
    ("mask_not_base64", BASE | {"dx": 0, "target_mask": "***"}, "invalid_request", "target_mask"),
    ("mask_not_png", BASE | {"dx": 0, "target_mask": base64.b64encode(b"GIF89a....").decode()},
     "invalid_request", "target_mask"),
    ("mask_wrong_size", BASE | {"dx": 0, "target_mask": png_b64_of(np.zeros((64, 64), np.uint8))},
     "invalid_request", "target_mask"),
    ("mask_with_depth", BASE | {"dx": 0, "property": "depth", "target_mask": png_b64_of(np.zeros((128, 128), np.uint8))},
     "invalid_request", "request"),
    ("steps_over_service_limit", BASE | {"steps": 20}, "invalid_request", "steps"),
    ("height_not_multiple_of_8", BASE | {"height": 100}, "invalid_request", "height"),
    ("width_over_service_limit", BASE | {"width": 512}, "invalid_request", "width"),
    ("unknown_eval_layer", BASE | {"eval_layer": "dec9.9"}, "invalid_request", "eval_layer"),
    ("unknown_order", BASE | {"order": "parallel"}, "invalid_request", "order"),
]


@pytest.mark.parametrize(("body", "error", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_400_naming_the_field(server, body, error, field):
    r = post(server, body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    assert set(got) == {"error", "field", "message"} and got["message"]
    assert (got["error"], got["field"]) == (error, field), got


def _fuzz_cases():
    """(body, field at fault): a valid request with one thing wrong, or garbage."""
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
    not_int = values.filter(lambda v: type(v) is not int)
    not_number = values.filter(lambda v: type(v) not in (int, float))
    not_str = values.filter(lambda v: not isinstance(v, str))
    names = set(BASE) | {"guidance", "height", "width", "scheduler", "property", "dy", "affine", "target_mask",
                         "layers", "lr", "loss", "eval_layer"}

    def one(field, strategy):
        return strategy.map(lambda v: (BASE | {field: v}, field))

    return st.one_of(
        one("iterations", not_int), one("iterations", st.integers(1025, 2**40) | st.integers(-2**40, -1)),
        one("dx", not_number), one("dy", not_number), one("lr", not_number),
        one("lr", st.floats(allow_nan=False).filter(lambda v: not 0 < v <= 1)),
        one("prompt", not_str), one("steps", not_int), one("seed", not_int),
        one("property", st.text(max_size=10).filter(lambda v: v not in ("foreground", "depth"))),
        one("edit_steps", st.lists(st.integers(SCENE_BANK_STEPS, 2**40) | st.integers(-2**40, -1), min_size=1,
                                   max_size=3)),
        one("target_mask", st.text(min_size=1, max_size=40)),
        one("affine", st.lists(st.lists(st.floats(allow_nan=False), max_size=4), max_size=3)
            .filter(lambda v: len(v) != 2 or any(len(r) != 3 for r in v))),
        st.tuples(st.text(min_size=1, max_size=10).filter(lambda k: k not in names), values)
        .map(lambda kv: (BASE | {kv[0]: kv[1]}, kv[0])),
        st.binary(max_size=60).map(lambda b: (b, "request")),
    )


@pytest.mark.slow
def test_fuzzed_bad_requests_never_cost_a_worker(server):
    from hypothesis import HealthCheck, given, settings

    session = requests.Session()
    sent = []

    @settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=list(HealthCheck), **FUZZ_SETTINGS)
    @given(_fuzz_cases())
    def check(case):
        r, field, data = fuzz_post(server, "intervene", session, case)
        sent.append(r.status_code)
        assert r.status_code == 400, (data[:200], r.text[:500])
        got = r.json()
        assert set(got) == {"error", "field", "message"}
        if field is not None:
            assert got["field"].split(".")[0] == field, (data[:200], got)

    check()
    assert len(sent) >= FUZZ_EXAMPLES and set(sent) == {400}
    assert_worker_kept(server, "intervene")


@pytest.mark.slow
def test_concurrent_clients_all_answered_worker_kept(server):
    """3 clients × 3 small interventions at once (queued: batch size 1), then the same worker."""
    from concurrent.futures import ThreadPoolExecutor

    def client(c: int) -> list[int]:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {server.keys['inference']}"}
        return [session.post(f"{server.inference}/predictions/intervene", headers=headers, timeout=600,
                             json=BASE | {"seed": c * 10 + i, "iterations": 4, "edit_steps": [0]}).status_code
                for i in range(3)]

    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        codes = [x for f in [pool.submit(client, c) for c in range(3)] for x in f.result()]
    assert codes == [200] * 9, codes
    print(f"intervene load: 9 requests in {time.monotonic() - started:.1f} s")
    worker = server.describe("intervene")["workers"][0]
    assert (worker["pid"], worker["status"]) == (server.first_worker["pid"], "READY")


# --- in process -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny, scene_bank):
    from ldmprobe.probes import ProbeBank
    from ldmprobe.serve.intervene import InterveneService

    return InterveneService(tiny, ProbeBank.load(scene_bank, tiny), compile=False, max_work=MAX_WORK)


def test_internal_failure_is_500_and_the_next_request_works(service, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    with monkeypatch.context() as m:
        m.setattr(service.runner, "run", boom)
        outcomes = service.handle([BASE, b"{"])
    assert [o.status for o in outcomes] == [500, 400]
    assert outcomes[0].body["error"] == "internal" and "simulated failure" in outcomes[0].body["message"]
    assert service.handle([BASE | {"iterations": 2, "edit_steps": [0]}])[0].status == 200


def test_same_bytes_alone_or_batched(service):
    """An intervention alone vs in one batch with 1, 2 and 3 others (run in turn, each with its
    own unedited twin) → byte-identical images, masks, success measures and losses."""
    body = BASE | {"iterations": 4, "edit_steps": [0, 1]}
    others = [BASE | {"prompt": p, "seed": s, "iterations": 2, "edit_steps": [0], "dx": -16}
              for p, s in (("a blue car", 22), ("a green tree", 333), ("a yellow lemon", 4))]
    alone = assert_batch_invariant(service, body, others)
    assert set(alone["images"]) == {"original", "edited"} and set(alone["masks"]) == {"original", "target", "achieved"}


def test_service_needs_a_bank(tiny):
    from ldmprobe.serve.intervene import InterveneService

    with pytest.raises(ValueError, match="probe bank"):
        InterveneService.load("tiny", None)


def test_order_field_in_process(service):
    """`order` reaches the run and its answer's metadata (sequential by default); a bad value
    is a 400 naming `order`, before any work."""
    small = BASE | {"iterations": 4, "edit_steps": [0]}
    default, joint, bad = service.handle([small, small | {"order": "joint"}, small | {"order": "parallel"}])
    assert (default.status, joint.status) == (200, 200)
    assert (default.body["metadata"]["order"], joint.body["metadata"]["order"]) == ("sequential", "joint")
    assert default.body["images"]["edited"]["png"] != joint.body["images"]["edited"]["png"]
    assert bad.status == 400 and (bad.body["error"], bad.body["field"]) == ("invalid_request", "order")
    assert default.body["metadata"]["protocol"] == "ldmprobe"


def test_protocol_field_in_process(service):
    """`protocol` is recorded in the answer; under study a depth target is min-max scaled to
    [-9, 9] (depth_target overrides), and a schedule the bank was not fitted at is refused."""
    depth = BASE | {"property": "depth", "iterations": 2, "edit_steps": [0], "layers": ["dec4.0"]}
    study, override, fewer, bad = service.handle([depth | {"protocol": "study"},
                                                  depth | {"protocol": "study", "depth_target": "warp"},
                                                  depth | {"protocol": "study", "steps": 3},
                                                  depth | {"depth_target": "clip"}])
    assert (study.status, override.status) == (200, 200), (study.body, override.body)
    assert (study.body["metadata"]["protocol"], study.body["metadata"]["depth_target"]) == ("study", "minmax")
    assert override.body["metadata"]["depth_target"] == "warp"
    assert study.body["metadata"]["step_mapping"]["exact"] is True
    assert fewer.status == 400 and fewer.body["field"] == "steps", fewer.body
    assert bad.status == 400 and bad.body["field"] == "depth_target"


def test_metric_field_in_process(service):
    """`metric` reaches the run (activation by default, euclidean under the study protocol or when
    asked) and its metadata; the two edits give other images; a bad value is a 400 naming `metric`."""
    small = BASE | {"iterations": 4, "edit_steps": [0]}
    default, euclid, study, bad = service.handle([small, small | {"metric": "euclidean"},
                                                  small | {"protocol": "study"}, small | {"metric": "cosine"}])
    assert (default.status, euclid.status, study.status) == (200, 200, 200)
    assert default.body["metadata"]["metric"] == "activation" and euclid.body["metadata"]["metric"] == "euclidean"
    assert study.body["metadata"]["metric"] == "euclidean" and len(study.body["layers"]) == 9  # the study's decoder
    assert len(default.body["layers"]) == 16
    assert default.body["images"]["edited"]["png"] != euclid.body["images"]["edited"]["png"]
    assert bad.status == 400 and (bad.body["error"], bad.body["field"]) == ("invalid_request", "metric")


def test_label_models_score_the_intervention_in_process(tiny, scene_bank):
    """With `label_models: scenes` the answer's success carries the segmenter's own reading: Dice to the
    target vs the unedited image's, and the shift it sees."""
    from ldmprobe.probes import ProbeBank
    from ldmprobe.serve.intervene import InterveneService

    svc = InterveneService(tiny, ProbeBank.load(scene_bank, tiny), compile=False, max_work=MAX_WORK,
                           label_models="scenes")
    out = svc.handle([BASE | {"iterations": 2, "edit_steps": [0]}])[0]
    assert out.status == 200, out.body
    seen = out.body["success"]["label_model"]
    assert set(seen) == {"dice_to_target", "dice_baseline", "shift_achieved_px", "shift_fraction"}
    assert 0.0 <= seen["dice_baseline"] <= 1.0
