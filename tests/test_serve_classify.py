"""POST /predictions/classify behind a real TorchServe (started once for this module, stopped by
PID): generations and real images end to end, batching, the bad-input table, fuzz and load.

The archive comes from scripts/build_archives.sh (ARCHIVES=classify) with compile: false: the
classify path runs the plain U-Net graph (no capture), one more cold inductor compile per batch
size (~2 min each on 2 CPU cores) that would buy this module nothing: what compiling changes is
proven by tests/test_serve.py and tests/test_capture.py on the same Sampler. The VGG-16 is
random-init (no weights here) fed 64×64 inputs, generations are 64×64 with 1-3 steps: a request
takes well under a second, the module a couple of minutes.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from serve_fixtures import (
    CLASSIFY_BAD,
    CLASSIFY_BASE,
    CLASSIFY_INPUT_SIZE,
    CLASSIFY_LIMITS,
    FUZZ_SETTINGS,
    SMALL_IMAGE,
    Server,
    assert_worker_kept,
    build_archive,
    fuzz_post,
    png_array,
    png_b64_of,
    running_server,
)

from ldmprobe.schemas import GenerationSettings

MODEL = "classify"
OVERRIDES = {"maxBatchDelay": 50, "handler": {
    "compile": False,  # see the module docstring
    "input_size": CLASSIFY_INPUT_SIZE, **CLASSIFY_LIMITS,
    "warm_batch_sizes": [1], "warm_settings": {"steps": 1, "height": 64, "width": 64}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchserve-classify")
    store = build_archive(root / "store", archives=[MODEL], per_archive={MODEL: OVERRIDES}).parent
    with running_server(root, store, [MODEL]) as srv:
        yield srv


@pytest.fixture(scope="module")
def library_runner(tiny):
    """The library's own classifier, built as the worker builds it (same seeded random VGG-16,
    same input size): the reference for the HTTP answers."""
    from ldmprobe.classify import ImageClassifier, StepClassifier, load_vgg16, make_decoder

    vgg = load_vgg16("random")
    return StepClassifier(make_decoder(tiny, "vae"),
                          ImageClassifier(vgg.module, "random", True, input_size=CLASSIFY_INPUT_SIZE))


def post(server: Server, body, **kwargs) -> requests.Response:
    return server.post(body, model=MODEL, **kwargs)


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    assert response.headers["content-type"] == "application/json"
    return response.json()


def check_steps(body: dict, steps: int, top_k: int) -> None:
    """Per-step predictions for every step, sorted, probabilities that a softmax can give, and
    statistics consistent with the target curve."""
    assert [s["step"] for s in body["steps"]] == list(range(steps))
    for s in body["steps"]:
        probs = [c["probability"] for c in s["top"]]
        assert len(probs) == top_k and probs == sorted(probs, reverse=True)
        assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert len({c["index"] for c in s["top"]}) == top_k
    curve = body["target_curve"]
    if body["target"] is None:
        assert curve is None and body["first_top1_step"] is None
        return
    assert len(curve) == steps and curve == [s["target_probability"] for s in body["steps"]]
    top1 = [s["top"][0]["index"] == body["target"]["index"] for s in body["steps"]]
    confident = [p > body["confidence_threshold"] for p in curve]
    assert body["first_top1_step"] == (top1.index(True) if any(top1) else None)
    assert body["first_confident_step"] == (confident.index(True) if any(confident) else None)
    assert body["top1_from_step"] == next((s for s in range(steps) if all(top1[s:])), None)
    assert body["confident_from_step"] == next((s for s in range(steps) if all(confident[s:])), None)
    for s, hit in zip(body["steps"], top1, strict=True):  # the curve agrees with the top lists
        if hit:
            assert s["target_probability"] == s["top"][0]["probability"]


# --- end to end ---------------------------------------------------------------------------------
def test_generation_end_to_end(server, tiny):
    body = ok(post(server, CLASSIFY_BASE | {"target_class": "lemon", "previews": True, "top_k": 5}))
    check_steps(body, 3, 5)
    assert body["target"] == {"index": 951, "wnid": "n07749582", "name": "lemon"}
    timesteps = [s["timestep"] for s in body["steps"]]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3
    image = png_array(body["image"]["png"])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 0
    assert [p["step"] for p in body["previews"]] == [0, 1, 2]
    previews = [png_array(p["png"]) for p in body["previews"]]
    assert all(p.shape == (64, 64, 3) for p in previews)
    assert np.abs(previews[-1].astype(int) - image).max() <= 1  # decode=latent: the last step is the image
    assert np.abs(previews[0].astype(int) - image).max() > 8
    meta = body["metadata"]
    assert meta["model"] == "tiny" and meta["model_identity"] == tiny.identity and meta["mode"] == "generation"
    assert meta["classifier"]["random_weights"] is True and meta["classifier"]["input_size"] == CLASSIFY_INPUT_SIZE
    assert meta["warnings"] and "random-init VGG-16" in meta["warnings"][0]
    assert meta["decoder"]["kind"] == "vae" and meta["decode"] == "latent" and meta["compiled"] is False
    assert meta["settings"]["seed"] == CLASSIFY_BASE["seed"] and meta["settings"]["timesteps"] == timesteps
    assert meta["batch"]["rows"] == 1 and meta["worker"]["pid"] == server.first_worker["pid"]
    assert meta["worker"]["warm_s"] > 0
    assert {"validate", "denoise", "decode_classify", "encode_images", "total"} <= set(meta["timings_ms"])

    # aim the target at the class that wins the last step: the statistics must then be set
    winner = body["steps"][-1]["top"][0]["index"]
    aimed = ok(post(server, CLASSIFY_BASE | {"target_class": str(winner), "top_k": 5}))
    check_steps(aimed, 3, 5)
    assert aimed["first_top1_step"] is not None and aimed["top1_from_step"] is not None
    assert [s["top"] for s in aimed["steps"]] == [s["top"] for s in body["steps"]]  # same prompt, same seed


def test_served_generation_equals_the_librarys(server, library_runner, sampler):
    """The endpoint against the library for the same prompt and seed: every step's top-k and
    probabilities, the target curve and its statistics, the final image and the previews are
    what `StepClassifier.classify_generation` gives (to float rounding). The same generation
    classified from its predicted x0 instead differs far beyond that, so a wrong decode or a
    wrong step could not pass."""
    from ldmprobe.generate import to_pil

    request = CLASSIFY_BASE | {"target_class": "lemon", "top_k": 5, "previews": True}
    body = ok(post(server, request))
    settings = GenerationSettings(steps=request["steps"], height=64, width=64)
    (lib,) = library_runner.classify_generation(sampler, [request["prompt"]], [request["seed"]], settings,
                                                targets="lemon", top_k=5, keep_previews=True)
    (x0,) = library_runner.classify_generation(sampler, [request["prompt"]], [request["seed"]], settings,
                                               decode="x0", targets="lemon", top_k=5)
    want = lib.response().model_dump(mode="json")
    for got_step, want_step in zip(body["steps"], want["steps"], strict=True):
        assert [c["index"] for c in got_step["top"]] == [c["index"] for c in want_step["top"]]
        np.testing.assert_allclose([c["probability"] for c in got_step["top"]],
                                   [c["probability"] for c in want_step["top"]], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(body["target_curve"], want["target_curve"], rtol=1e-4, atol=1e-7)
    assert np.abs(np.array(x0.target_curve) - np.array(want["target_curve"])).max() > 10 * (
        1e-7 + 1e-4 * max(want["target_curve"]))
    for key in ("first_top1_step", "first_confident_step", "top1_from_step", "confident_from_step", "target"):
        assert body[key] == want[key], key
    assert np.abs(png_array(body["image"]["png"]).astype(int) - np.asarray(to_pil(lib.image[None])[0])).max() <= 1
    for served, image in zip(body["previews"], to_pil(lib.previews), strict=True):
        assert np.abs(png_array(served["png"]).astype(int) - np.asarray(image)).max() <= 1


def test_decode_x0_and_defaults(server):
    body = ok(post(server, {"prompt": "a lemon", "steps": 2, "height": 64, "width": 64, "decode": "x0"}))
    check_steps(body, 2, 5)
    assert body["previews"] is None and body["target"] is None
    assert body["metadata"]["decode"] == "x0" and body["metadata"]["settings"]["guidance"] == 7.5


def test_real_image_matches_the_library(server, library_runner):
    array = (np.random.default_rng(11).random((96, 160, 3)) * 255).astype(np.uint8)
    body = ok(post(server, {"image": png_b64_of(array), "target_class": "n07749582", "top_k": 4}))
    check_steps(body, 1, 4)
    assert body["steps"][0]["timestep"] is None and body["image"] is None and body["previews"] is None
    meta = body["metadata"]
    assert meta["mode"] == "image" and meta["settings"] == {"image_size": [96, 160]} and "decoder" not in meta
    alone = library_runner.classify_image(Image.fromarray(array), target=951, top_k=4).response()
    assert [c["index"] for c in body["steps"][0]["top"]] == [c.index for c in alone.steps[0].top]
    np.testing.assert_allclose([c["probability"] for c in body["steps"][0]["top"]],
                               [c.probability for c in alone.steps[0].top], rtol=1e-4)
    assert body["target_curve"] == pytest.approx(alone.target_curve, rel=1e-4)


def test_worker_registered_alone(server):
    auth = {"Authorization": f"Bearer {server.keys['management']}"}
    models = requests.get(f"{server.management}/models", timeout=10, headers=auth).json()["models"]
    assert [m["modelName"] for m in models] == [MODEL]
    assert server.describe(MODEL)["batchSize"] == 4


# --- batching -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_batched_requests_match_unbatched(server):
    """Three generations with equal settings and one with decode x0, queued behind a slow
    request, land in one TorchServe batch: the three share one generation (rows 3), the x0 one
    runs in its own group, and every answer equals the same request sent alone."""
    bodies = [CLASSIFY_BASE | {"prompt": p, "seed": s, "top_k": 3}
              for p, s in (("a red apple", 1), ("a blue car", 22), ("a green tree", 333))]
    bodies.append(CLASSIFY_BASE | {"prompt": "a lemon", "decode": "x0", "top_k": 3})
    results: dict[int, requests.Response] = {}

    def send(i, body):
        results[i] = post(server, body)

    blocker = threading.Thread(target=send, args=(-1, CLASSIFY_BASE | {"steps": 20}))
    blocker.start()
    time.sleep(1.0)  # the worker is busy with the blocker: the next four queue up
    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in [blocker, *threads]:
        t.join()
    together = [ok(results[i]) for i in range(4)]
    assert [b["metadata"]["batch"]["requests"] for b in together] == [4] * 4, \
        [b["metadata"]["batch"] for b in together]
    assert [b["metadata"]["batch"]["rows"] for b in together] == [3, 3, 3, 1]
    assert sorted(b["metadata"]["batch"]["row"] for b in together[:3]) == [0, 1, 2]
    for i, (body, batched) in enumerate(zip(bodies, together, strict=True)):
        text = json.dumps(batched)
        assert all(other["prompt"] not in text for j, other in enumerate(bodies) if j != i)  # no leaks
        alone = ok(post(server, body))
        assert alone["metadata"]["batch"]["rows"] == 1
        for sa, sb in zip(alone["steps"], batched["steps"], strict=True):
            assert [c["index"] for c in sa["top"]] == [c["index"] for c in sb["top"]]
            np.testing.assert_allclose([c["probability"] for c in sa["top"]],
                                       [c["probability"] for c in sb["top"]], rtol=1e-4, atol=1e-7)
        a, b = png_array(alone["image"]["png"]).astype(int), png_array(batched["image"]["png"]).astype(int)
        assert np.abs(a - b).max() <= 2


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "error", "field", "text"), [c[1:] for c in CLASSIFY_BAD],
                         ids=[c[0] for c in CLASSIFY_BAD])
def test_bad_input_is_400_naming_the_field(server, body, error, field, text):
    r = post(server, body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    assert set(got) == {"error", "field", "message"} and got["message"]
    assert (got["error"], got["field"]) == (error, field), got
    assert text in got["message"], got


def test_form_encoded_body_is_400(server):
    r = post(server, b"prompt=a+lemon", content_type="application/x-www-form-urlencoded", timeout=60)
    assert r.status_code == 400 and r.json()["field"] == "request"


def test_worker_survives_bad_input(server):
    """After the bad requests above: a valid request succeeds on the same, never restarted worker."""
    body = ok(post(server, CLASSIFY_BASE | {"steps": 1}))
    worker = server.describe(MODEL)["workers"][0]
    assert worker["status"] == "READY"
    assert (worker["pid"], worker["startTime"]) == (server.first_worker["pid"], server.first_worker["startTime"])
    assert body["metadata"]["worker"]["pid"] == worker["pid"]


# --- fuzz and load ------------------------------------------------------------------------------
FUZZ_EXAMPLES = 150
FUZZ_BASE = {"prompt": "fuzz", "steps": 1, "height": 64, "width": 64}


def _fuzz_cases():
    """(body, field at fault or None): a cheap valid request with one field replaced by a
    random JSON value (valid or not), random keys, or garbage bytes."""
    from hypothesis import strategies as st

    from ldmprobe.schemas import MAX_SEED

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
    known = {"prompt", "image", "seed", "steps", "guidance", "height", "width", "scheduler", "decoder", "decode",
             "top_k", "target_class", "previews"}

    def one(name, strategy, field=None):
        return strategy.map(lambda v: (FUZZ_BASE | {name: v}, field))

    bad = st.one_of(
        one("steps", values.filter(lambda v: type(v) is not int), "steps"),
        one("steps", st.integers(-2**40, 2**40).filter(lambda v: not 1 <= v <= 50), "steps"),
        one("seed", values.filter(lambda v: type(v) is not int) | st.integers(-2**70, -1)
            | st.integers(MAX_SEED + 1, 2**70), "seed"),
        one("top_k", values.filter(lambda v: type(v) is not int) | st.integers(-2**40, 0) | st.integers(101, 2**40),
            "top_k"),
        one("previews", values.filter(lambda v: not isinstance(v, bool)), "previews"),
        one("decoder", values.filter(lambda v: v != "vae"), "decoder"),  # tiny is not configured either
        one("decode", values.filter(lambda v: v not in ("latent", "x0")), "decode"),
        one("height", st.integers(-2**40, 2**40).filter(lambda v: not (8 <= v <= 256 and v % 8 == 0)), "height"),
        # with the base's prompt too, but an unreadable image is reported first, on its own field
        one("image", st.text(max_size=30) | st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),
            "image"),
        st.tuples(st.text(min_size=1, max_size=10).filter(lambda k: k not in known), values)
        .map(lambda kv: (FUZZ_BASE | {kv[0]: kv[1]}, kv[0])),
        st.binary(max_size=60).map(lambda b: (b, "request")),
        (st.lists(values, max_size=3) | scalars).map(lambda v: (json.dumps(v).encode(), "request")),
    )
    either = st.one_of(  # valid or not, depending on the value drawn
        one("target_class", st.integers(-5, 1005) | st.text(max_size=12)),
        one("top_k", st.integers(1, 12)),
        one("seed", st.integers(0, 2**40)),
        one("decode", st.sampled_from(["latent", "x0"])),
    )
    # half the cases from each family (st.one_of would flatten both into one uniform choice of 15
    # branches, leaving the valid-or-not family a quarter of the draws)
    return st.booleans().flatmap(lambda pick_bad: bad if pick_bad else either)


@pytest.mark.slow
def test_fuzzed_requests_never_cost_a_worker(server):
    """~150 generated requests: every answer a 200 or a 400 with a JSON body (naming the field
    when the case knows it), and the same worker process afterwards."""
    from hypothesis import HealthCheck, given, settings
    from pydantic import ValidationError

    from ldmprobe.serve.schemas import ClassifyRequest

    session = requests.Session()
    sent: list[int] = []

    @settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=list(HealthCheck), **FUZZ_SETTINGS)
    @given(_fuzz_cases())
    def check(case):
        r, field, data = fuzz_post(server, MODEL, session, case, timeout=120)
        sent.append(r.status_code)
        assert r.status_code in (200, 400), (data[:200], r.status_code, r.text[:500])
        assert r.headers["content-type"] == "application/json"
        got = r.json()
        if r.status_code == 400:
            assert set(got) == {"error", "field", "message"}, got
            if field is not None:
                assert field in (got["field"], got["field"].split(".")[0]), (data[:200], got)
        else:
            assert field is None, (data[:200], "expected a 400")
            assert len(got["steps"]) == 1 and got["metadata"]["mode"] == "generation"
        if field is None and isinstance(case[0], dict):  # a valid-or-not case: the library's schema decides
            try:
                ClassifyRequest.model_validate(case[0])
                expected = 200
            except ValidationError:
                expected = 400
            assert r.status_code == expected, (data[:200], r.text[:300])

    started = time.monotonic()
    check()
    # every verdict was the schema's (asserted per case above), and both verdicts were exercised
    assert len(sent) >= FUZZ_EXAMPLES - 10 and min(sent.count(200), sent.count(400)) >= len(sent) // 10, \
        (sent.count(200), sent.count(400))
    assert_worker_kept(server, MODEL)
    print(f"fuzz: {len(sent)} requests in {time.monotonic() - started:.1f} s: {sent.count(200)} × 200, "
          f"{sent.count(400)} × 400, worker {server.first_worker['pid']} kept")


LOAD_CLIENTS, LOAD_REQUESTS = 4, 20


@pytest.mark.slow
def test_load_four_clients_twenty_requests_each(server):
    """4 concurrent clients × 20 requests (every fifth a real image): zero errors, batches form."""
    from concurrent.futures import ThreadPoolExecutor

    def client(c: int) -> list[tuple[int, float, int]]:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {server.keys['inference']}"}
        out = []
        for i in range(LOAD_REQUESTS):
            body = ({"image": SMALL_IMAGE, "top_k": 2} if i % 5 == 4 else
                    {"prompt": f"client {c} request {i}", "seed": 1000 * c + i, "steps": 2, "height": 64,
                     "width": 64, "top_k": 2})
            t0 = time.monotonic()
            r = session.post(f"{server.inference}/predictions/{MODEL}", headers=headers, timeout=600, json=body)
            rows = r.json()["metadata"]["batch"]["rows"] if r.status_code == 200 else 0
            out.append((r.status_code, time.monotonic() - t0, rows))
        return out

    started = time.monotonic()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = [x for f in [pool.submit(client, c) for c in range(LOAD_CLIENTS)] for x in f.result()]
    wall = time.monotonic() - started
    latencies = sorted(x[1] for x in results)
    codes = [x[0] for x in results]
    print(f"load: {len(results)} requests in {wall:.1f} s, p50 {latencies[len(latencies) // 2]:.2f} s, "
          f"max {latencies[-1]:.2f} s, batch rows {sorted(set(x[2] for x in results))}")
    assert len(results) == LOAD_CLIENTS * LOAD_REQUESTS and codes.count(200) == len(results), set(codes)
    assert max(x[2] for x in results) > 1  # concurrent requests were batched
    worker = server.describe(MODEL)["workers"][0]
    assert (worker["pid"], worker["status"]) == (server.first_worker["pid"], "READY")
