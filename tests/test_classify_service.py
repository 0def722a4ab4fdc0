"""ldmprobe.serve.classify without a server: validation (the same table the TorchServe test
sends over HTTP), batching and grouping, padding, real images, limits, the tiny decoder, and
failures that a server cannot easily provoke. Random-init VGG-16 fed 64×64 inputs and 64×64
generations of the tiny model keep each answer well under a second on 2 CPU cores."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from serve_fixtures import (
    CLASSIFY_BAD,
    CLASSIFY_BASE,
    CLASSIFY_INPUT_SIZE,
    CLASSIFY_LIMITS,
    SMALL_IMAGE,
    assert_batch_invariant,
    png_array,
    png_b64_of,
)

from ldmprobe.classify import ImageClassifier, StepClassifier, imagenet_class, load_vgg16, make_decoder
from ldmprobe.serve.base import RequestError, parse_body
from ldmprobe.serve.classify import ClassifyService


@pytest.fixture(scope="module")
def classifier():
    vgg = load_vgg16("random")
    return ImageClassifier(vgg.module, "random", True, input_size=CLASSIFY_INPUT_SIZE)


@pytest.fixture(scope="module")
def service(tiny, classifier):
    return ClassifyService(tiny, classifier, compile=False, max_batch=4, **CLASSIFY_LIMITS)


def ok(outcome) -> dict:
    assert outcome.status == 200, outcome.body
    return outcome.body


def close_answers(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Same classes per step with the same probabilities (float rounding apart)."""
    assert len(a["steps"]) == len(b["steps"])
    for sa, sb in zip(a["steps"], b["steps"], strict=True):
        assert [c["index"] for c in sa["top"]] == [c["index"] for c in sb["top"]]
        np.testing.assert_allclose([c["probability"] for c in sa["top"]], [c["probability"] for c in sb["top"]],
                                   rtol=1e-4, atol=atol)


# --- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "error", "field", "text"), [c[1:] for c in CLASSIFY_BAD],
                         ids=[c[0] for c in CLASSIFY_BAD])
def test_bad_input_is_400_naming_the_field(service, body, error, field, text):
    (out,) = service.handle([body])
    assert out.status == 400, out.body
    assert set(out.body) == {"error", "field", "message"}
    assert (out.body["error"], out.body["field"]) == (error, field), out.body
    assert text in out.body["message"], out.body


def test_parse_body_accepts_each_form_of_the_same_body():
    from ldmprobe.serve.schemas import ClassifyRequest

    text = json.dumps(CLASSIFY_BASE)
    forms = [(text, False), (text.encode(), False), (bytearray(text.encode()), False), (CLASSIFY_BASE, True)]
    assert len({parse_body(raw, ClassifyRequest, decoded).model_dump_json() for raw, decoded in forms}) == 1
    with pytest.raises(RequestError) as err:
        parse_body(text, ClassifyRequest, decoded=True)  # TorchServe decoded it: the client sent a JSON string
    assert err.value.field == "request" and "got a string" in err.value.message


# --- generations ----------------------------------------------------------------------------------
def test_generation_answer(service, tiny):
    body = ok(service.handle([CLASSIFY_BASE | {"target_class": "lemon", "previews": True, "top_k": 4}])[0])
    steps = body["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2] and len(body["target_curve"]) == 3
    assert steps[0]["timestep"] > steps[1]["timestep"] > steps[2]["timestep"]
    for s in steps:
        probs = [c["probability"] for c in s["top"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
        assert all(imagenet_class(c["index"]).wnid == c["wnid"] for c in s["top"])
    assert body["target"] == {"index": 951, "wnid": "n07749582", "name": "lemon"}
    assert [s["target_probability"] for s in steps] == body["target_curve"]
    assert png_array(body["image"]["png"]).shape == (64, 64, 3)
    assert [p["step"] for p in body["previews"]] == [0, 1, 2]
    assert all(png_array(p["png"]).shape == (64, 64, 3) for p in body["previews"])
    # decode="latent": the last step's latent is the final latent, so its preview is the final image
    assert np.abs(png_array(body["previews"][-1]["png"]).astype(int) - png_array(body["image"]["png"])).max() <= 1
    meta = body["metadata"]
    assert meta["model_identity"] == tiny.identity and meta["mode"] == "generation" and meta["decode"] == "latent"
    assert meta["classifier"]["random_weights"] is True and meta["decoder"]["kind"] == "vae"
    assert any("random-init VGG-16" in w for w in meta["warnings"])
    assert meta["settings"] | {"timesteps": None} == {"prompt": CLASSIFY_BASE["prompt"], "seed": 7, "steps": 3,
                                                      "guidance": 7.5, "height": 64, "width": 64,
                                                      "scheduler": "lms", "timesteps": None}
    assert meta["batch"] == {"requests": 1, "rows": 1, "padded_to": 4, "row": 0}  # batch_invariant: 4 rows
    assert {"validate", "denoise", "decode_classify", "encode_images", "total"} <= set(meta["timings_ms"])


def test_batch_equals_one_by_one_and_groups_by_decoder_settings(service):
    same = [CLASSIFY_BASE | {"prompt": p, "seed": s, "top_k": k} for p, s, k in
            (("a lemon", 1, 3), ("a red car", 22, 5), ("a tree", 333, 2))]
    x0 = CLASSIFY_BASE | {"decode": "x0"}
    other_shape = CLASSIFY_BASE | {"steps": 2}
    together = service.handle([*same, x0, other_shape, b"[]"])
    assert together[5].status == 400
    bodies = [ok(o) for o in together[:5]]
    assert [b["metadata"]["batch"]["rows"] for b in bodies] == [3, 3, 3, 1, 1]
    assert [b["metadata"]["batch"]["row"] for b in bodies[:3]] == [0, 1, 2]
    assert all(b["metadata"]["batch"]["requests"] == 6 for b in bodies)
    for request, batched in zip([*same, x0, other_shape], bodies, strict=True):
        alone = ok(service.handle([request])[0])
        assert alone["metadata"]["batch"]["rows"] == 1
        close_answers(alone, batched)
        assert len(batched["steps"][0]["top"]) == request.get("top_k", 5)
        a, b = png_array(alone["image"]["png"]).astype(int), png_array(batched["image"]["png"]).astype(int)
        assert np.abs(a - b).max() <= 1
    # each answer names only its own prompt, never those it was batched with
    for i, b in enumerate(bodies[:3]):
        text = json.dumps(b["metadata"])
        assert same[i]["prompt"] in text and all(o["prompt"] not in text for j, o in enumerate(same) if j != i)
    assert not np.allclose(png_array(bodies[0]["image"]["png"]), png_array(bodies[1]["image"]["png"]))


def test_padding_to_buckets_changes_nothing(tiny, classifier):
    """Speed mode (batch_invariant false): padding to the next bucket or not, equal answers up
    to float rounding."""
    fast = {"compile": False, "max_batch": 4, "batch_invariant": False, **CLASSIFY_LIMITS}
    padded = ClassifyService(tiny, classifier, pad_batches=True, **fast)
    unpadded = ClassifyService(tiny, classifier, pad_batches=False, **fast)
    requests = [CLASSIFY_BASE | {"prompt": p, "seed": i} for i, p in enumerate(("a", "b", "c"))]
    with_padding = [ok(o) for o in padded.handle(requests)]
    without = [ok(o) for o in unpadded.handle(requests)]
    assert [b["metadata"]["batch"]["padded_to"] for b in with_padding] == [4, 4, 4]
    assert [b["metadata"]["batch"]["padded_to"] for b in without] == [3, 3, 3]
    for a, b in zip(with_padding, without, strict=True):
        close_answers(a, b)


def test_same_bytes_alone_or_batched(service):
    """batch_invariant (the default): a generation alone vs batched with 1, 2 and 3 others (rows
    0–3; the decoder + VGG-16 chunks hold a different mix each time) → byte-identical
    probabilities per step, image and step previews; likewise a real image among others."""
    assert service.batch_invariant
    body = CLASSIFY_BASE | {"prompt": "a lemon", "seed": 1, "target_class": "lemon", "previews": True}
    others = [CLASSIFY_BASE | {"prompt": p, "seed": s} for p, s in (("a red car", 22), ("a tree", 333), ("a cup", 4))]
    alone = assert_batch_invariant(service, body, others)
    assert alone["metadata"]["batch"] == {"requests": 1, "rows": 1, "padded_to": 4, "row": 0}
    assert len(alone["previews"]) == CLASSIFY_BASE["steps"] and alone["target_curve"]
    rng = np.random.default_rng(5)
    images = [{"image": png_b64_of((rng.random((32 + 8 * i, 48, 3)) * 255).astype(np.uint8))} for i in range(4)]
    assert_batch_invariant(service, images[0] | {"top_k": 10}, images[1:])


def test_stochastic_schedulers_run_alone(service):
    bodies = [CLASSIFY_BASE | {"scheduler": "euler_a", "seed": s} for s in (1, 2)]
    answers = [ok(o) for o in service.handle(bodies)]
    assert [b["metadata"]["batch"]["rows"] for b in answers] == [1, 1]
    close_answers(answers[1], ok(service.handle([bodies[1]])[0]))


def test_target_statistics_follow_the_curve(service):
    """Aim the target at the class that wins the last step: first_top1_step / top1_from_step
    must then be set and agree with the per-step top-1 lists."""
    first = ok(service.handle([CLASSIFY_BASE])[0])
    winner = first["steps"][-1]["top"][0]["index"]
    body = ok(service.handle([CLASSIFY_BASE | {"target_class": winner}])[0])
    top1 = [s["top"][0]["index"] == winner for s in body["steps"]]
    assert body["first_top1_step"] == top1.index(True)
    assert body["top1_from_step"] == next(s for s in range(len(top1)) if all(top1[s:]))
    assert body["first_confident_step"] is None and max(body["target_curve"]) < 0.9  # random weights
    assert body["target_curve"][-1] == body["steps"][-1]["top"][0]["probability"]


# --- real images ----------------------------------------------------------------------------------
def test_real_images_classified_together_match_the_library(service, classifier, tiny):
    rng = np.random.default_rng(0)
    arrays = [(rng.random(shape) * 255).astype(np.uint8) for shape in ((96, 160, 3), (64, 64, 3), (200, 120, 3))]
    answers = [ok(o) for o in service.handle([{"image": png_b64_of(a), "top_k": 3, "target_class": 951}
                                              for a in arrays])]
    runner = StepClassifier(make_decoder(tiny, "vae"), classifier)
    for array, body in zip(arrays, answers, strict=True):
        assert body["metadata"]["batch"]["rows"] == 3 and body["metadata"]["mode"] == "image"
        assert body["metadata"]["settings"] == {"image_size": list(array.shape[:2])}
        assert "decoder" not in body["metadata"] and body["image"] is None and body["previews"] is None
        (step,) = body["steps"]
        assert step["timestep"] is None
        alone = runner.classify_image(Image.fromarray(array), target=951, top_k=3).response().model_dump(mode="json")
        close_answers(body, alone)
        assert body["target_curve"] == pytest.approx(alone["target_curve"], rel=1e-4)


def test_image_limits(tiny, classifier):
    small = ClassifyService(tiny, classifier, compile=False, max_image_pixels=1000, max_image_bytes=2000)
    noisy = png_b64_of((np.random.default_rng(1).random((28, 28, 3)) * 255).astype(np.uint8))  # 784 px
    wide = png_b64_of(np.zeros((20, 60, 3), np.uint8))  # 1200 pixels in a few hundred bytes
    fine = png_b64_of(np.zeros((20, 40, 3), np.uint8))
    assert len(base64.b64decode(noisy)) > 2000 and len(base64.b64decode(wide)) < 2000
    too_heavy, too_many, accepted = small.handle([{"image": noisy}, {"image": wide}, {"image": fine}])
    assert (too_heavy.status, too_heavy.body["field"]) == (400, "image")
    assert f"the image is {len(base64.b64decode(noisy))} bytes" in too_heavy.body["message"]
    assert "at most 2000" in too_heavy.body["message"]
    assert (too_many.status, too_many.body["field"]) == (400, "image")
    assert "60×20 pixels" in too_many.body["message"] and "at most 1000 pixels" in too_many.body["message"]
    assert ok(accepted)["metadata"]["settings"] == {"image_size": [20, 40]}


# --- the tiny decoder -----------------------------------------------------------------------------
def test_tiny_decoder_when_configured(tiny, classifier):
    tiny_svc = ClassifyService(tiny, classifier, compile=False, tiny_decoder=make_decoder(tiny, "tiny", "random"))
    body = ok(tiny_svc.handle([CLASSIFY_BASE | {"decoder": "tiny", "previews": True}])[0])
    meta = body["metadata"]
    assert meta["decoder"]["kind"] == "tiny" and meta["decoder"]["random_weights"] is True
    assert any(w.startswith("decoder: random-init decoder") for w in meta["warnings"])
    assert all(png_array(p["png"]).shape == (64, 64, 3) for p in body["previews"])
    # the final image is the model's VAE decode either way; only the per-step previews differ
    vae = ok(tiny_svc.handle([CLASSIFY_BASE | {"previews": True}])[0])
    assert np.abs(png_array(body["image"]["png"]).astype(int) - png_array(vae["image"]["png"])).max() <= 1
    assert np.abs(png_array(body["previews"][0]["png"]).astype(int) - png_array(vae["previews"][0]["png"])).max() > 8


# --- failures -------------------------------------------------------------------------------------
def test_internal_failure_is_500_for_its_group_only(service, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated out-of-memory")

    monkeypatch.setattr(service.sampler, "generate", boom)
    out = service.handle([CLASSIFY_BASE, CLASSIFY_BASE | {"seed": 9}, {"image": SMALL_IMAGE}, CLASSIFY_BASE | {"top_k": 0}])
    for o in out[:2]:
        assert o.status == 500 and o.body["error"] == "internal" and o.body["field"] == ""
        assert "generation failed: RuntimeError: simulated out-of-memory" in o.body["message"]
    assert out[2].status == 200 and len(out[2].body["steps"]) == 1  # the image group is unaffected
    assert out[3].status == 400 and out[3].body["field"] == "top_k"


def test_a_validator_bug_is_a_500_for_that_request_only(service, monkeypatch):
    def broken(self, req, index=0):
        raise KeyError("bug")

    monkeypatch.setattr(ClassifyService, "check", broken)
    out = service.handle([CLASSIFY_BASE, b"{"])
    assert out[0].status == 500 and "KeyError" in out[0].body["message"]
    assert out[1].status == 400


def test_warm_up(service):
    assert service.warm([1, 2], {"height": 64, "width": 64}) > 0
    assert service.worker["warm_s"] > 0
    with pytest.raises(RuntimeError, match="warm-up request failed"):
        service.warm([1], {"decoder": "tiny"})


def test_load_refuses_missing_weights(tmp_path):
    from ldmprobe.classify import WeightsSourceError

    with pytest.raises(WeightsSourceError, match="do not exist"):
        ClassifyService.load("tiny", tmp_path / "vgg16.safetensors", device="cpu")


def test_response_images_are_pngs(service):
    body = ok(service.handle([CLASSIFY_BASE | {"previews": True, "steps": 2}])[0])
    for payload in [body["image"], *body["previews"]]:
        with Image.open(io.BytesIO(base64.b64decode(payload["png"]))) as img:
            assert img.format == "PNG" and img.size == (payload["width"], payload["height"]) == (64, 64)
    assert torch.tensor(png_array(body["image"]["png"])).float().std() > 0
