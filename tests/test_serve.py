"""The probe endpoint behind a real TorchServe (started once for this module, stopped by PID),
plus in-process checks of ldmprobe.serve.probe for what a server cannot easily provoke.

Small settings for speed: the tiny model at 128×128, 4 LMS steps, a random test bank with a
known shape (tests/serve_fixtures.py). The worker compiles the U-Net with the clone's shared
inductor cache: warm, the module takes a few minutes; the first run on a machine pays the cold
compiles of batch sizes 1 and 4 (several minutes each on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
import requests
from serve_fixtures import (
    BANK_STEPS,
    BEST,
    FUZZ_SETTINGS,
    MISSING_LAYER,
    STEPS,
    alone_and_batched,
    answer_bytes,
    assert_batch_invariant,
    build_archive,
    fuzz_post,
    make_test_bank,
    map_array,
    png_array,
    running_server,
)

BASE = {"prompt": "a red apple on a wooden table", "seed": 5107435, "steps": STEPS}
OVERRIDES = {"maxBatchDelay": 50, "handler": {"warm_batch_sizes": [1, 2, 4], "max_side": 256, "warm_settings": {"steps": 2}}}


@pytest.fixture(scope="module")
def bank_file(tiny, tmp_path_factory):
    return make_test_bank(tiny, tmp_path_factory.mktemp("bank") / "bank.safetensors")


@pytest.fixture(scope="module")
def server(bank_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchserve")
    # built as `make serve` builds it: the service compiled once, its compile cache packed
    store = build_archive(root / "store", bank_file, OVERRIDES, env={"PRECOMPILE": "1"}).parent
    with running_server(root, store, ["probe"]) as srv:
        yield srv


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    return response.json()


# --- end to end ---------------------------------------------------------------------------------
def test_valid_request_end_to_end(server, bank_file, tiny):
    body = ok(server.post(BASE | {"format": "both", "return_steps": [0, 1, 3]}))
    image = png_array(body["image"]["png"])
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and image.std() > 0
    assert body["layers"] == {"foreground": [BEST["foreground"]], "depth": [BEST["depth"]], "shading": ["dec4.0"]}
    assert body["layer_choice"] == {"foreground": "bank_best", "depth": "bank_best", "shading": "default"}
    assert [s["step"] for s in body["steps"]] == [0, 1, 3]
    registry = tiny.registry(128, 128)
    for step in body["steps"]:
        assert set(step["summary"]) == {"foreground_fraction", "depth_mean", "shading_mean"}
        for m in step["maps"]:
            spec = registry[m["layer"]]
            assert m["shape"] == [spec.height, spec.width]
            assert m["probe"] == f"{m['property']}/{m['layer']}/{step['step']}" and m["probe_step"] == step["step"]
            values = map_array(m)
            grey = png_array(m["png"])
            assert values.shape == grey.shape == tuple(m["shape"]) and np.isfinite(values).all()
            assert values.mean() == pytest.approx(m["stats"]["mean"], abs=1e-2)
            if m["kind"] == "mask":
                assert m["png_scale"] == {"mode": "probability", "lo": 0.0, "hi": 1.0}
                np.testing.assert_allclose(grey / 255, np.clip(values, 0, 1), atol=1 / 255 + 1e-3)
                assert step["summary"]["foreground_fraction"] == pytest.approx(float((values > 0.5).mean()), abs=1e-2)
            else:
                lo, hi = m["png_scale"]["lo"], m["png_scale"]["hi"]
                assert m["png_scale"]["mode"] == "minmax" and lo == pytest.approx(values.min(), abs=1e-2)
                np.testing.assert_allclose(lo + grey / 255 * (hi - lo), values, atol=(hi - lo) / 255 + 1e-2)
    meta = body["metadata"]
    assert meta["model"] == "tiny" and meta["model_identity"] == tiny.identity
    digest = "sha256:" + hashlib.sha256(bank_file.read_bytes()).hexdigest()
    assert meta["bank"]["file_sha256"] == digest and meta["bank"]["checksum"].startswith("sha256:")
    assert meta["compiled"] is True and meta["backend"]["compiled"] is True
    assert meta["backend"]["probe_backend"] == "torch" and meta["backend"]["device"] == "cpu"
    assert meta["settings"]["steps"] == STEPS and meta["settings"]["seed"] == BASE["seed"]
    assert {"validate", "denoise", "probes", "decode", "encode_image", "total"} <= set(meta["timings_ms"])
    assert meta["worker"]["pid"] == server.first_worker["pid"] and meta["worker"]["warm_s"] > 0
    # the worker started from the archive's compile cache (written by the precompile at build)
    cache = meta["worker"]["compile_cache"]
    assert cache["file"] == "compile-cache.bin" and cache["bytes"] > 0 and cache["inductor"] >= 1
    assert meta["batch"]["generate_rows"] == 1


def test_served_maps_equal_the_librarys(server, bank_file, tiny, sampler):
    """The endpoint against the library for the same prompt and seed: the served probe maps are
    the bank's probes at the same bank step on the conditional half of the same layer's
    activations (to float16 and compile rounding), and the image is the library's. The maps of a
    neighbouring layer of the same shape, of another bank step and of the unconditional half
    each miss that tolerance by 5× or more, so none of those mistakes could pass."""
    from ldmprobe.generate import to_pil
    from ldmprobe.probes import ProbeBank
    from ldmprobe.schemas import GenerationSettings

    layers = ["dec4.0", "dec4.1", "mid.0"]
    body = ok(server.post(BASE | {"format": "array", "return_steps": list(BANK_STEPS), "layers": layers}))
    bank = ProbeBank.load(bank_file, tiny)
    lib = sampler.generate([BASE["prompt"]], [BASE["seed"]], GenerationSettings(steps=STEPS), layers="all", half="both")
    atol = rtol = 1e-3

    def misses(a, b):  # how many times the tolerance a mismatch of a against b exceeds it by
        return float((np.abs(a - b) / (atol + rtol * np.abs(b))).max())

    worst = 0.0
    controls = {"neighbouring layer": 0.0, "other bank step": 0.0, "unconditional half": 0.0}
    compared = 0
    for served in body["steps"]:
        k = served["step"]
        acts = lib.steps[k].activations
        expected = bank.apply({la: acts[la][1:] for la in layers}, k, layers=layers)
        other_step = bank.apply({la: acts[la][1:] for la in layers}, BANK_STEPS[(BANK_STEPS.index(k) + 1) % 3],
                                layers=layers)
        wrong_half = bank.apply({la: acts[la][:1] for la in layers}, k, layers=layers)
        for m in served["maps"]:
            key = (m["property"], m["layer"])
            got, want = map_array(m).astype(np.float32), expected[key][0].numpy()
            worst = max(worst, misses(got, want))
            if m["layer"] != "mid.0":  # dec4.0 and dec4.1: the same shape
                neighbour = (m["property"], "dec4.1" if m["layer"] == "dec4.0" else "dec4.0")
                controls["neighbouring layer"] = max(controls["neighbouring layer"],
                                                     misses(expected[neighbour][0].numpy(), want))
            controls["other bank step"] = max(controls["other bank step"], misses(other_step[key][0].numpy(), want))
            controls["unconditional half"] = max(controls["unconditional half"], misses(wrong_half[key][0].numpy(),
                                                                                        want))
            compared += 1
    assert compared == len(BANK_STEPS) * len(layers) * 3
    assert worst <= 1, f"served maps differ from the library's by {worst:.2f}× the tolerance"
    assert min(controls.values()) >= 5, controls
    print(f"served vs library: {worst:.2f}× the tolerance; the mistakes: {controls}")
    image = png_array(body["image"]["png"]).astype(int)
    assert np.abs(image - np.asarray(to_pil(lib.images)[0]).astype(int)).max() <= 2


def test_requested_layers_properties_and_formats(server):
    body = ok(server.post(BASE | {"layers": ["mid.0", "dec4.2"], "properties": ["depth"], "format": "array",
                                  "map_size": "image"}))
    assert body["layers"] == {"depth": ["mid.0", "dec4.2"]} and body["layer_choice"] == {"depth": "request"}
    (step,) = body["steps"]
    assert step["step"] == STEPS - 1 and [m["layer"] for m in step["maps"]] == ["mid.0", "dec4.2"]
    for m in step["maps"]:
        assert "png" not in m and map_array(m).shape == (128, 128)


# --- security -----------------------------------------------------------------------------------
def test_token_authorization_is_enforced(server):
    """TorchServe 0.12 refuses a missing or wrong token with 400 InvalidKeyException (not 401)."""
    for token in (None, "not-the-key", "management"):
        r = server.post(BASE, token=token, timeout=30)
        assert r.status_code == 400 and "Token Authorization failed" in r.json()["message"], r.text
    r = requests.get(f"{server.management}/models/probe", timeout=10)
    assert r.status_code == 400
    r = requests.get(f"{server.management}/models/probe", timeout=10,
                     headers={"Authorization": f"Bearer {server.keys['inference']}"})
    assert r.status_code == 400


def test_model_registration_through_the_api_is_off(server):
    """enable_model_api=false: even with the management token, registering is refused (405)."""
    auth = {"Authorization": f"Bearer {server.keys['management']}"}
    r = requests.post(f"{server.management}/models", params={"url": "probe.mar"}, timeout=30, headers=auth)
    assert r.status_code == 405, r.text
    models = requests.get(f"{server.management}/models", timeout=10, headers=auth).json()["models"]
    assert [m["modelName"] for m in models] == ["probe"]


def test_prometheus_metrics(server):
    r = requests.get(f"{server.metrics}/metrics", timeout=10)
    assert r.status_code == 200 and "# TYPE" in r.text and "Requests2XX" in r.text


# --- batching -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_batched_requests_match_unbatched(server):
    """Three valid requests and one bad one queued behind a slow request land in one TorchServe
    batch; the valid three run through one padded generate call, the bad one gets its own 400,
    and each valid answer is byte-identical to the same request sent alone (batch_invariant:
    compiled, every call at 4 rows)."""
    bodies = [BASE | {"prompt": p, "seed": s, "format": "array", "return_steps": [0, 3]}
              for p, s in (("a red apple", 1), ("a blue car", 22), ("a green tree", 333))]
    bad = BASE | {"seed": -1}
    results: dict[int, requests.Response] = {}

    def send(i, body):
        results[i] = server.post(body)

    blocker = threading.Thread(target=send, args=(-1, BASE | {"steps": 30, "return_steps": [0]}))
    blocker.start()
    time.sleep(1.0)  # the worker is busy with the blocker: the next four queue up
    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate([*bodies, bad])]
    for t in threads:
        t.start()
    for t in [blocker, *threads]:
        t.join()
    assert results[3].status_code == 400 and results[3].json()["field"] == "seed"
    batched = [ok(results[i]) for i in range(3)]
    for b in batched:
        assert {k: b["metadata"]["batch"][k] for k in ("requests", "generate_rows", "padded_to")} == \
            {"requests": 4, "generate_rows": 3, "padded_to": 4}
    assert sorted(b["metadata"]["batch"]["row"] for b in batched) == [0, 1, 2]
    for body, together in zip(bodies, batched, strict=True):
        alone = ok(server.post(body))
        assert {k: alone["metadata"]["batch"][k] for k in ("generate_rows", "padded_to")} == \
            {"generate_rows": 1, "padded_to": 4}
        assert alone["image"]["png"] == together["image"]["png"]
        for sa, sb in zip(alone["steps"], together["steps"], strict=True):
            for ma, mb in zip(sa["maps"], sb["maps"], strict=True):
                assert (ma["property"], ma["layer"]) == (mb["property"], mb["layer"])
                assert ma["array"]["data"] == mb["array"]["data"] and ma["stats"] == mb["stats"]
        assert answer_bytes(alone) == answer_bytes(together)


# --- streaming ----------------------------------------------------------------------------------
def test_streaming_sends_one_chunk_per_step(server):
    with server.post(BASE | {"stream": True, "return_steps": list(BANK_STEPS)}, stream=True) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-ndjson"
        assert r.headers.get("transfer-encoding") == "chunked"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [c["event"] for c in lines] == ["step"] * len(BANK_STEPS) + ["done"]
    assert [c["step"] for c in lines[:-1]] == list(BANK_STEPS)
    assert all(len(c["maps"]) == 3 for c in lines[:-1])
    done = lines[-1]
    assert done["steps"] == [] and png_array(done["image"]["png"]).shape == (128, 128, 3)


# --- bad input ----------------------------------------------------------------------------------
BAD = [
    ("malformed_json", b'{"prompt": "a", ', "invalid_json", "request"),
    ("not_an_object", b"[1, 2, 3]", "invalid_request", "request"),
    ("not_utf8", b'{"prompt": "\xff\xfe"}', "invalid_json", "request"),
    ("empty_body", b"", "invalid_json", "request"),
    ("json_string_body", json.dumps(json.dumps(BASE)).encode(), "invalid_request", "request"),
    ("missing_prompt", {"seed": 1}, "invalid_request", "prompt"),
    ("empty_prompt", {"prompt": ""}, "invalid_request", "prompt"),
    ("prompt_too_long", {"prompt": "x" * 1001}, "invalid_request", "prompt"),
    ("prompt_wrong_type", {"prompt": 5}, "invalid_request", "prompt"),
    ("steps_as_string", BASE | {"steps": "4"}, "invalid_request", "steps"),
    ("steps_as_float", BASE | {"steps": 4.0}, "invalid_request", "steps"),
    ("guidance_as_bool", BASE | {"guidance": True}, "invalid_request", "guidance"),
    ("unknown_field", BASE | {"colour": "red"}, "invalid_request", "colour"),
    ("unknown_layer", BASE | {"layers": ["dec9.0"]}, "unknown_layer", "layers"),
    ("layers_not_a_list", BASE | {"layers": "dec4.0"}, "invalid_request", "layers"),
    ("layer_name_wrong_type", BASE | {"layers": ["dec4.0", 3]}, "invalid_request", "layers.1"),
    ("unknown_property", BASE | {"properties": ["albedo"]}, "unknown_property", "properties"),
    ("steps_zero", BASE | {"steps": 0}, "invalid_request", "steps"),
    ("steps_too_many", BASE | {"steps": 1000}, "invalid_request", "steps"),
    ("steps_over_service_limit", BASE | {"steps": 60}, "invalid_request", "steps"),
    ("height_not_multiple_of_8", BASE | {"height": 100}, "invalid_request", "height"),
    ("width_too_large", BASE | {"width": 4096}, "invalid_request", "width"),
    ("width_over_service_limit", BASE | {"width": 512}, "invalid_request", "width"),
    ("height_zero", BASE | {"height": 0}, "invalid_request", "height"),
    ("negative_seed", BASE | {"seed": -1}, "invalid_request", "seed"),
    ("oversized_seed", BASE | {"seed": 2**64}, "invalid_request", "seed"),
    ("unknown_scheduler", BASE | {"scheduler": "magic"}, "invalid_request", "scheduler"),
    ("unknown_format", BASE | {"format": "jpeg"}, "invalid_request", "format"),
    ("return_step_out_of_range", BASE | {"return_steps": [STEPS]}, "invalid_request", "return_steps"),
    ("bank_lacks_step", BASE | {"return_steps": [2]}, "probe_unavailable", "return_steps"),
    ("bank_lacks_layer", BASE | {"layers": [MISSING_LAYER]}, "probe_unavailable", "layers"),
    ("stream_as_int", BASE | {"stream": 1}, "invalid_request", "stream"),
]


@pytest.mark.parametrize(("body", "error", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_400_naming_the_field(server, body, error, field):
    r = server.post(body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    assert set(got) == {"error", "field", "message"} and got["message"]
    assert (got["error"], got["field"]) == (error, field), got


def test_form_encoded_body_is_400(server):
    r = server.post(b"prompt=a+red+apple&seed=1", content_type="application/x-www-form-urlencoded", timeout=60)
    assert r.status_code == 400 and r.json()["field"] == "request"
    assert "Content-Type: application/json" in r.json()["message"]


def test_worker_survives_bad_input(server):
    """After the bad requests above: a valid request succeeds on the same, never restarted worker."""
    body = ok(server.post(BASE))
    worker = server.describe()["workers"][0]
    assert worker["status"] == "READY"
    assert (worker["pid"], worker["startTime"]) == (server.first_worker["pid"], server.first_worker["startTime"])
    assert body["metadata"]["worker"]["pid"] == worker["pid"]


# --- in process: what a server cannot easily provoke -----------------------------------------------
@pytest.fixture(scope="module")
def service(tiny, bank_file):
    from ldmprobe.probes import ProbeBank
    from ldmprobe.serve.probe import ProbeService

    return ProbeService(tiny, ProbeBank.load(bank_file, tiny), compile=False, max_batch=4)


def test_internal_failure_is_500_for_its_group_only(service, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated out-of-memory")

    monkeypatch.setattr(service.sampler, "generate", boom)
    out = service.handle([BASE, BASE | {"seed": -3}])
    assert out[0].status == 500 and out[0].body["error"] == "internal"
    assert "simulated out-of-memory" in out[0].body["message"]
    assert out[1].status == 400 and out[1].body["field"] == "seed"


def test_probe_heads_run_once_per_step(service, monkeypatch):
    """Three requests of different layers, properties, steps and map sizes in one batch: the
    probe heads of each step run in ONE grouped call over all rows × requested layers ×
    properties (not one per request row and layer), and each answer has what it asked for."""
    import ldmprobe.probes.heads as heads

    calls = []
    real = heads.grouped_linear

    def counting(xs, *args, **kwargs):
        calls.append([x.shape for x in xs])
        return real(xs, *args, **kwargs)

    monkeypatch.setattr(heads, "grouped_linear", counting)
    bodies = [BASE | {"prompt": "a", "return_steps": [0, 1, 3], "format": "array"},
              BASE | {"prompt": "b", "seed": 2, "return_steps": [1, 3], "layers": ["mid.0", "dec4.2"],
                      "properties": ["depth"], "format": "array", "map_size": "image"},
              BASE | {"prompt": "c", "seed": 3, "format": "array"}]
    answers = [o.body for o in service.handle(bodies)]
    assert [a["metadata"]["batch"]["generate_rows"] for a in answers] == [3, 3, 3]
    assert len(calls) == 3  # steps 0, 1 and 3: one launch each
    registry = service.model.registry(128, 128)
    defaults = {BEST["foreground"], BEST["depth"], "dec4.0"}  # shading: no metrics → dec4.0
    layers_at = [defaults, defaults | {"mid.0", "dec4.2"}, defaults | {"mid.0", "dec4.2"}]
    for shapes, layers in zip(calls, layers_at, strict=True):  # a group per layer, every row of the batch in it
        # rows: the 3 requests padded to the bucket (batch_invariant: the padding rows too)
        assert sorted(s[0] for s in shapes) == sorted(service.bucket(3) * registry[la].height * registry[la].width
                                                      for la in layers)
    assert [[s["step"] for s in a["steps"]] for a in answers] == [[0, 1, 3], [1, 3], [3]]
    b = answers[1]["steps"][0]["maps"]
    assert [(m["property"], m["layer"], m["shape"]) for m in b] == [("depth", "mid.0", [128, 128]),
                                                                    ("depth", "dec4.2", [128, 128])]


INVARIANT_OTHERS = [BASE | {"prompt": p, "seed": s, "return_steps": [1]}
                    for p, s in (("a blue car", 22), ("a green tree", 333), ("a yellow lemon", 4444))]
INVARIANT_BODY = BASE | {"prompt": "a red apple", "seed": 1, "format": "both", "return_steps": [0, 3],
                         "layers": ["dec3.1", "dec4.1"], "properties": ["foreground", "depth"]}


def test_same_bytes_alone_or_batched(service):
    """batch_invariant (the default): alone vs batched with 1, 2 and 3 other requests (this one
    on rows 0, 1, 2, 3) → byte-identical image, map PNGs, float16 arrays and stats; every call
    ran at the largest bucket."""
    assert service.batch_invariant
    alone = assert_batch_invariant(service, INVARIANT_BODY, INVARIANT_OTHERS)
    assert alone["metadata"]["batch"] == {"requests": 1, "generate_rows": 1, "padded_to": 4, "row": 0}
    maps = [m for s in alone["steps"] for m in s["maps"]]
    assert len(maps) == 2 * 2 * 2 and all("png" in m and "array" in m for m in maps)


def test_speed_mode_pads_less_and_is_not_byte_identical(tiny, bank_file):
    """The switch: batch_invariant false runs a lone request at 1 row (cheaper) and its answer
    batched differs in float rounding: what the default exists to prevent."""
    from ldmprobe.probes import ProbeBank
    from ldmprobe.serve.probe import ProbeService

    fast = ProbeService(tiny, ProbeBank.load(bank_file, tiny), compile=False, max_batch=4, batch_invariant=False)
    alone, batched = alone_and_batched(fast, INVARIANT_BODY, INVARIANT_OTHERS)
    assert alone["metadata"]["batch"]["padded_to"] == 1
    assert [b["metadata"]["batch"]["padded_to"] for b in batched] == [2, 3, 4]
    assert any(answer_bytes(b) != answer_bytes(alone) for b in batched)
    for b in batched:  # equal up to float rounding
        for sa, sb in zip(alone["steps"], b["steps"], strict=True):
            for ma, mb in zip(sa["maps"], sb["maps"], strict=True):
                np.testing.assert_allclose(map_array(ma), map_array(mb), atol=1e-2, rtol=1e-2)


def test_capture_requested_needs_speed_mode():
    from ldmprobe.serve.probe import ProbeConfig

    with pytest.raises(ValueError, match="batch_invariant"):
        ProbeConfig(capture="requested")
    assert ProbeConfig(capture="requested", batch_invariant=False).capture == "requested"


def test_steps_map_to_the_nearest_bank_timestep(tiny):
    from ldmprobe.probes import ProbeBank
    from ldmprobe.serve.probe import ProbeService

    bank = ProbeBank.random(tiny, layers="dec4.0", steps=range(15), scheduler="lms", num_steps=15)
    svc = ProbeService(tiny, bank, compile=False)
    assert svc.map_steps("lms", 15) == list(range(15))
    assert svc.map_steps("lms", 4) == [0, 5, 9, 14]  # timesteps 999, 666, 333, 0
    assert svc.map_steps("lms", 2) == [0, 14]  # 999, 0


def test_protocol_study_refuses_timesteps_the_bank_was_not_fitted_at(tiny):
    """A bank recording its exact timesteps (the fit job's `extra.timesteps`): a request at the
    same timesteps is exact under both protocols; one at other timesteps is mapped to the
    nearest (and says so in its metadata) under ldmprobe, and refused under study, a 400 naming
    steps (or scheduler). The protocol is recorded in every answer."""
    from ldmprobe.probes import ProbeBank, schedule_timesteps
    from ldmprobe.serve.probe import ProbeService

    svc0 = ProbeService(tiny, ProbeBank.random(tiny, properties=["foreground"], layers="dec4.0", steps=range(3),
                                               scheduler="lms", num_steps=3), compile=False)
    fitted = schedule_timesteps(svc0.sampler, "lms", 3)
    # the bank was fitted on a schedule whose middle step differs (as a "leading"-spaced folder's would)
    bank = ProbeBank.random(tiny, properties=["foreground"], layers="dec4.0", steps=range(3), scheduler="lms",
                            num_steps=3)
    bank.extra["timesteps"] = [fitted[0], fitted[1] - 100.0, fitted[2]]
    svc = ProbeService(tiny, bank, compile=False)
    base = {"prompt": "a red ball", "steps": 3, "height": 64, "width": 64, "return_steps": "all"}
    same = svc0.handle([base | {"protocol": "study"}])[0]
    assert same.status == 200, same.body
    assert same.body["metadata"]["protocol"] == "study" and same.body["metadata"]["step_mapping"]["exact"] is True
    mapped, refused, fewer = svc.handle([base, base | {"protocol": "study"}, base | {"steps": 2, "protocol": "study"}])
    assert mapped.status == 200, mapped.body
    meta = mapped.body["metadata"]
    assert meta["protocol"] == "ldmprobe" and meta["step_mapping"]["exact"] is False
    assert meta["step_mapping"]["bank_timesteps"] == bank.extra["timesteps"]
    assert meta["step_mapping"]["bank_steps"] == [0, 1, 2]  # each step's nearest bank timestep
    for out in (refused, fewer):
        assert out.status == 400 and (out.body["error"], out.body["field"]) == ("invalid_request", "steps"), out.body
    bad = svc.handle([base | {"protocol": "paper"}])[0]
    assert bad.status == 400 and bad.body["field"] == "protocol"


def test_default_layers_come_from_the_bank_metrics(service):
    assert service.bank.best_layers() == {"foreground": (BEST["foreground"], "bank_best"),
                                         "depth": (BEST["depth"], "bank_best"), "shading": ("dec4.0", "default")}


def test_server_helpers_keep_the_committed_security_settings(tmp_path):
    from serve_fixtures import ROOT, server_config

    text = server_config(ROOT / "config.properties", tmp_path, {"inference": 1, "management": 2, "metrics": 3,
                                                                "worker": 4})
    conf = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert conf["disable_token_authorization"] == "false" and conf["enable_model_api"] == "false"
    assert conf["management_address"] == "http://127.0.0.1:2" and conf["metrics_mode"] == "prometheus"
    assert conf["initial_worker_port"] == "4"


# --- fuzz and load ------------------------------------------------------------------------------
FUZZ_EXAMPLES = 320


def _fuzz_cases():
    """(body, field at fault) pairs: a valid request with exactly one thing wrong, or garbage."""
    from hypothesis import strategies as st

    from ldmprobe.schemas import MAX_SEED

    json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
    json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
    not_int = json_values.filter(lambda v: type(v) is not int)
    not_str = json_values.filter(lambda v: not isinstance(v, str))
    not_number = json_values.filter(lambda v: type(v) not in (int, float))
    not_bool = json_values.filter(lambda v: not isinstance(v, bool))
    not_list = json_values.filter(lambda v: v is not None and not isinstance(v, list))
    from ldmprobe.layers import LayerRegistry
    from ldmprobe.models import TINY_UNET

    layer_names = set(LayerRegistry.from_config(TINY_UNET).names)
    names = {"steps", "seed", "prompt", "guidance", "height", "width", "scheduler", "layers", "properties",
             "return_steps", "format", "map_size", "stream"}

    def one(field, values):
        return values.map(lambda v: (BASE | {field: v}, field))

    off_size = st.integers(-2**40, 2**40).filter(lambda v: not (8 <= v <= 256 and v % 8 == 0))
    return st.one_of(
        one("steps", not_int), one("seed", not_int), one("prompt", not_str), one("guidance", not_number),
        one("stream", not_bool), one("height", not_int.filter(lambda v: v is not None)),
        one("layers", not_list), one("properties", not_list), one("format", not_str),
        one("steps", st.integers(-2**40, 2**40).filter(lambda v: not 1 <= v <= 50)),
        one("seed", st.integers(-2**70, -1) | st.integers(MAX_SEED + 1, 2**70)),
        one("height", off_size), one("width", off_size),
        one("guidance", st.floats(allow_nan=False).filter(lambda v: not 0 <= v <= 50)),
        one("prompt", st.just("") | st.text(min_size=1001, max_size=1100)),
        one("scheduler", st.text(max_size=12).filter(lambda v: v not in ("lms", "ddim", "pndm", "euler", "euler_a",
                                                                        "dpm", "ddpm"))),
        one("layers", st.lists(st.text(max_size=8).filter(lambda v: v not in layer_names), min_size=1,
                               max_size=3, unique=True)),
        one("properties", st.lists(st.text(max_size=8).filter(lambda v: v not in ("foreground", "depth", "shading")),
                                   min_size=1, max_size=3, unique=True)),
        one("return_steps", st.lists(st.integers(STEPS, 2**40) | st.integers(-2**40, -1), min_size=1, max_size=3)),
        st.tuples(st.text(min_size=1, max_size=10).filter(lambda k: k not in names), json_values)
        .map(lambda kv: (BASE | {kv[0]: kv[1]}, kv[0])),
        st.binary(max_size=60).map(lambda b: (b, "request")),
        (st.lists(json_values, max_size=3) | json_scalars).map(lambda v: (json.dumps(v).encode(), "request")),
    )


@pytest.mark.slow
def test_fuzzed_bad_requests_never_cost_a_worker(server):
    """≥ 300 generated malformed requests: every one a 400 naming its field, no worker restart."""
    from hypothesis import HealthCheck, given, settings

    session = requests.Session()
    sent = []

    @settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=list(HealthCheck), **FUZZ_SETTINGS)
    @given(_fuzz_cases())
    def check(case):
        r, field, data = fuzz_post(server, "probe", session, case)
        sent.append(r.status_code)
        assert r.status_code == 400, (data[:200], r.text[:500])
        got = r.json()
        assert set(got) == {"error", "field", "message"}
        if field is not None:
            assert got["field"].split(".")[0] == field, (data[:200], got)

    started = time.monotonic()
    check()
    assert len(sent) >= 300 and set(sent) == {400}
    worker = server.describe()["workers"][0]
    assert (worker["pid"], worker["startTime"], worker["status"]) == \
        (server.first_worker["pid"], server.first_worker["startTime"], "READY")
    ok(server.post(BASE))
    print(f"fuzz: {len(sent)} requests in {time.monotonic() - started:.1f} s, all 400, worker {worker['pid']} kept")


LOAD_CLIENTS, LOAD_REQUESTS = 8, 50


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_load_eight_clients_fifty_requests_each(server):
    """8 concurrent clients × 50 requests (2 steps each): zero errors, batches form, bounded time."""
    from concurrent.futures import ThreadPoolExecutor

    def client(c: int) -> list[tuple[int, float, int]]:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {server.keys['inference']}"}
        out = []
        for i in range(LOAD_REQUESTS):
            t0 = time.monotonic()
            r = session.post(f"{server.inference}/predictions/probe", headers=headers, timeout=600,
                             json={"prompt": f"client {c} request {i}", "seed": 1000 * c + i, "steps": 2})
            rows = r.json()["metadata"]["batch"]["generate_rows"] if r.status_code == 200 else 0
            out.append((r.status_code, time.monotonic() - t0, rows))
        return out

    started = time.monotonic()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = [x for f in [pool.submit(client, c) for c in range(LOAD_CLIENTS)] for x in f.result()]
    wall = time.monotonic() - started
    latencies = sorted(x[1] for x in results)
    codes = [x[0] for x in results]
    print(f"load: {len(results)} requests in {wall:.1f} s, p50 {latencies[len(latencies) // 2]:.2f} s, "
          f"p99 {latencies[int(0.99 * len(latencies))]:.2f} s, batch rows {sorted(set(x[2] for x in results))}")
    assert len(results) == LOAD_CLIENTS * LOAD_REQUESTS and codes.count(200) == len(results), set(codes)
    assert max(x[2] for x in results) > 1  # concurrent requests were batched
    assert wall < 1200
    worker = server.describe()["workers"][0]
    assert (worker["pid"], worker["status"]) == (server.first_worker["pid"], "READY")
