"""Per-step classification: class lookup, batched == one by one, decoders, statistics, real
images, the CLI. VGG-16 is random-init (no weights here) and built once for the module: its
~138 M parameters cost seconds to initialise and a 224×224 image ~0.5 s on 2 CPU cores, so the
library tests feed it 64×64 inputs and classify few steps; the CLI test runs the real 224."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ldmprobe.classify import (
    Classification,
    ClassifyError,
    ImageClassifier,
    StepClassifier,
    UnknownClassError,
    WeightsSourceError,
    _timm_vgg_names,
    first_steps,
    imagenet_class,
    load_tiny_decoder,
    load_vgg16,
    make_decoder,
    plot_classification,
)
from ldmprobe.cli import main
from ldmprobe.schemas import GenerationSettings
from ldmprobe.serve.schemas import ClassifyRequest

SETTINGS = GenerationSettings(steps=2)
PROMPTS, SEEDS = ["a lemon", "an orange"], [0, 1]


@pytest.fixture(scope="module")
def vgg():
    return load_vgg16("random")


@pytest.fixture(scope="module")
def small_vgg(vgg):
    """The same VGG-16 fed 64×64 inputs: 12× cheaper than 224×224 (timm's VGG head pools small
    feature maps), for tests of properties that do not depend on the input size."""
    return ImageClassifier(vgg.module, "random", True, input_size=64)


@pytest.fixture(scope="module")
def vae_runner(tiny, small_vgg):
    return StepClassifier(make_decoder(tiny, "vae"), small_vgg, batch_size=3)  # chunks of 3 + 1


@pytest.fixture(scope="module")
def batched(vae_runner, sampler):
    """Two prompts × 2 steps: four latents through the decoder and VGG in chunks of 3 and 1."""
    return vae_runner.classify_generation(sampler, PROMPTS, SEEDS, SETTINGS, targets="lemon", top_k=3,
                                         keep_previews=True)


# --- class lookup -------------------------------------------------------------------------------
@pytest.mark.parametrize("query", [951, "951", " n07749582 ", "lemon", "LEMON"])
def test_lemon_by_index_wnid_and_name(query):
    c = imagenet_class(query)
    assert (c.index, c.wnid, c.name) == (951, "n07749582", "lemon")


def test_synonyms_and_full_description():
    assert imagenet_class("man-eater").index == 2  # a synonym of "great white shark"
    assert imagenet_class("Great_White_Shark").index == 2
    assert imagenet_class("tench, Tinca tinca").index == 0
    assert imagenet_class("granny smith").name == "Granny Smith"


@pytest.mark.parametrize(("query", "message"), [
    ("lemmon", "unknown ImageNet class 'lemmon'; close matches: lemon (951)"),
    ("zzzqqq", "no close matches"),
    ("crane", "ambiguous: 134 n02012849"),  # the bird and the machine
    (1000, "out of range 0-999"),
    ("n00000000", "is not an ImageNet-1k class"),
    ("", "must not be empty"),
    (True, "got bool"),
])
def test_unknown_and_ambiguous_classes(query, message):
    with pytest.raises(UnknownClassError, match=None) as err:
        imagenet_class(query)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- statistics on a known table --------------------------------------------------------------------
def test_first_steps_known_answer():
    table = torch.tensor([[0.70, 0.10, 0.10, 0.10],   # top-1 is class 0
                          [0.20, 0.10, 0.60, 0.10],   # target top-1 (lucky), 0.6
                          [0.50, 0.10, 0.30, 0.10],   # lost again
                          [0.02, 0.02, 0.95, 0.01],   # top-1 and > 0.9 from here on
                          [0.00, 0.00, 0.97, 0.03]])
    assert first_steps(table, 2) == {"first_top1_step": 1, "first_confident_step": 3,
                                     "top1_from_step": 3, "confident_from_step": 3}
    assert first_steps(table, 1) == dict.fromkeys(["first_top1_step", "first_confident_step",
                                                   "top1_from_step", "confident_from_step"])
    result = Classification(table, [999.0, 750.0, 500.0, 250.0, 0.0], top_k=2, target=imagenet_class(2))
    resp = result.response()
    assert (resp.first_top1_step, resp.first_confident_step) == (1, 3)
    assert resp.target_curve == pytest.approx([0.1, 0.6, 0.3, 0.95, 0.97])
    assert [s.top[0].index for s in resp.steps] == [0, 2, 0, 2, 2] and len(resp.steps[0].top) == 2
    assert len(result.rows()) == 10


# --- generation: batched == one by one, decode modes, decoders ------------------------------------
def test_batched_equals_one_by_one(batched, tiny, small_vgg, sampler):
    one_by_one = StepClassifier(make_decoder(tiny, "vae"), small_vgg, batch_size=1).classify_generation(
        sampler, PROMPTS, SEEDS, SETTINGS, targets="lemon", top_k=3, keep_previews=True)
    for a, b in zip(batched, one_by_one, strict=True):
        assert a.probabilities.shape == (2, 1000)
        torch.testing.assert_close(a.probabilities, b.probabilities, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.previews, b.previews, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.top()[1], b.top()[1])
    assert batched[0].metadata["prompt"] == "a lemon" and batched[1].metadata["seed"] == 1
    assert batched[0].probabilities.sum(-1).sub(1).abs().max() < 1e-4
    assert not torch.equal(batched[0].probabilities, batched[1].probabilities)


def test_padded_generation_classifies_only_the_real_rows(batched, vae_runner, sampler):
    """pad_to runs the denoising loop at a bucket size (a compiled U-Net reuses its graph); the
    padding rows are dropped before decoding and classifying, and change nothing."""
    padded = vae_runner.classify_generation(sampler, PROMPTS, SEEDS, SETTINGS, targets="lemon", top_k=3,
                                            keep_previews=True, pad_to=4)
    assert len(padded) == 2 and padded[0].metadata["generate_rows"] == 4
    assert padded[0].metadata["prompts"] == PROMPTS and batched[0].metadata["generate_rows"] == 2
    for a, b in zip(padded, batched, strict=True):
        assert a.probabilities.shape == (2, 1000) and a.previews.shape[0] == 2
        torch.testing.assert_close(a.probabilities, b.probabilities, rtol=1e-4, atol=1e-7)


def test_previews_are_the_decoded_latents(batched, sampler):
    """The VAE path decodes as the project's Sampler.decode does (same scaling)."""
    latents = []
    sampler.generate(PROMPTS[:1], SEEDS[:1], SETTINGS, callback=lambda s: latents.append(s.latents), keep_steps=False)
    torch.testing.assert_close(batched[0].previews, sampler.decode(torch.cat(latents)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[0].previews[-1], batched[0].image, rtol=1e-4, atol=1e-5)  # last = final


def test_decode_x0_differs_from_latent(batched, vae_runner, sampler):
    """decode="x0" classifies the scheduler's clean-latent prediction, not the noisy latent."""
    x0 = vae_runner.classify_generation(sampler, PROMPTS[:1], SEEDS[:1], SETTINGS, decode="x0", keep_previews=True)[0]
    assert x0.metadata["decode"] == "x0" and batched[0].metadata["decode"] == "latent"
    steps = []
    sampler.generate(PROMPTS[:1], SEEDS[:1], SETTINGS, callback=steps.append, keep_steps=False)
    latents, preds = torch.cat([s.latents for s in steps]), torch.cat([s.x0 for s in steps])
    # x0 = x_t − σ_t·ε and x_{t−1} = x_t + (σ_{t−1} − σ_t)·ε differ by σ_{t−1}·ε: small for this random U-Net
    # (its ε is tiny), so the check is which tensor the previews are the decoding of, to 1e-5
    assert float((latents[0] - preds[0]).abs().max()) > 1e-2
    torch.testing.assert_close(x0.previews, sampler.decode(preds), rtol=0, atol=1e-5)
    assert float((x0.previews[0] - sampler.decode(latents)[0]).abs().max()) > 1e-4
    assert not torch.equal(x0.probabilities[0], batched[0].probabilities[0])
    with pytest.raises(ClassifyError, match="decode must be"):
        vae_runner.classify_generation(sampler, PROMPTS[:1], SEEDS[:1], SETTINGS, decode="noise")


def test_tiny_decoder_random_matches_vae_shape(tiny, small_vgg, tmp_path):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vae, small = make_decoder(tiny, "vae"), make_decoder(tiny, "tiny", "random")
    out = small.decode(latents)
    assert out.shape == vae.decode(latents).shape == (2, 3, 128, 128)
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    meta = small.metadata()
    assert meta["random_weights"] is True and meta["scaling_factor"] == 1.0 and "warning" in meta
    # a diffusers-format folder loads the same decoder
    small.module.save_pretrained(tmp_path / "taesd")
    torch.testing.assert_close(load_tiny_decoder(tmp_path / "taesd").decode(latents), out)
    probs, previews = StepClassifier(small, small_vgg, batch_size=2).classify_latents(latents, keep_previews=True)
    assert probs.shape == (2, 1000) and previews.shape == (2, 3, 128, 128)
    with pytest.raises(WeightsSourceError, match="not a diffusers AutoencoderTiny folder"):
        load_tiny_decoder(tmp_path)
    with pytest.raises(ClassifyError, match="takes 4-channel latents"):
        small.decode(torch.zeros(1, 3, 8, 8))


# --- real images ----------------------------------------------------------------------------------
def test_real_image_like_generated_steps(batched, vae_runner):
    """A real image goes through the same preprocessing + VGG: a step's decoded image classified
    as an image gives that step's probabilities; PIL, uint8 and float inputs agree."""
    step = batched[0].previews[1]
    as_image = vae_runner.classify_image(step, target="n07749582", top_k=3)
    torch.testing.assert_close(as_image.probabilities[0], batched[0].probabilities[1], rtol=1e-4, atol=1e-7)
    assert as_image.metadata["mode"] == "image" and as_image.response().steps[0].timestep is None
    pil = Image.fromarray((torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(1)) * 255).byte()
                          .permute(1, 2, 0).numpy())
    from_pil = vae_runner.classify_image(pil)
    from_uint8 = vae_runner.classify_image(torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    torch.testing.assert_close(from_pil.probabilities, from_uint8.probabilities)
    assert from_pil.metadata["image_size"] == [96, 160]
    with pytest.raises(ClassifyError, match="expected an RGB image"):
        vae_runner.classify_image(torch.zeros(1, 64, 64))


def test_images_of_different_sizes_classified_together(vae_runner):
    """classify_image_batch preprocesses each image alone, classifies them in chunks: the same
    numbers as one classify_image call per image."""
    gen = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=gen) for h, w in ((64, 64), (80, 120), (50, 40), (64, 96))]
    together = vae_runner.classify_image_batch(images, [951, None, "lemon", None], top_k=2)
    assert [r.target.index if r.target else None for r in together] == [951, None, 951, None]
    for image, result in zip(images, together, strict=True):
        alone = vae_runner.classify_image(image, top_k=2)
        torch.testing.assert_close(result.probabilities, alone.probabilities, rtol=1e-4, atol=1e-7)
        assert result.metadata["image_size"] == list(image.shape[-2:])
    with pytest.raises(ClassifyError, match="got 4 images but 1 targets"):
        vae_runner.classify_image_batch(images, [951])


def test_preprocess_matches_timm_config(vgg):
    assert vgg.input_size == 224 and vgg.interpolation == "bilinear"
    assert vgg.metadata()["mean"] == [0.485, 0.456, 0.406] and vgg.metadata()["std"] == [0.229, 0.224, 0.225]
    x = vgg.preprocess(torch.full((1, 3, 100, 300), 0.485))
    assert x.shape == (1, 3, 224, 224) and abs(float(x[0, 0].mean())) < 1e-5


# --- weights ---------------------------------------------------------------------------------------
def test_weight_files_and_torchvision_names(vgg, tmp_path):
    from safetensors.torch import save_file

    sd = vgg.module.state_dict()
    save_file(sd, tmp_path / "vgg16.safetensors")
    loaded = load_vgg16(tmp_path / "vgg16.safetensors")
    assert loaded.random_weights is False and "warning" not in loaded.metadata()
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), loaded.module.state_dict().values(), strict=True))
    # torchvision's layout: Linear classifier.{0,3,6} → timm's conv pre_logits + head, same numbers
    tv_names = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.", "head.fc.": "classifier.6."}
    torchvision_sd = {}
    for key, value in sd.items():
        for new, old in tv_names.items():
            if key.startswith(new):
                key, value = old + key.removeprefix(new), value.flatten(1) if value.dim() > 2 else value
        torchvision_sd[key] = value
    assert "classifier.0.weight" in torchvision_sd and torchvision_sd["classifier.0.weight"].shape == (4096, 25088)
    back = _timm_vgg_names(torchvision_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsSourceError, match="not a VGG-16 ImageNet state dict: 32 missing"):
        load_vgg16(tmp_path / "other.safetensors")
    with pytest.raises(WeightsSourceError, match="do not exist"):
        load_vgg16(tmp_path / "nothing.pth")


# --- request model ---------------------------------------------------------------------------------
def test_request_validation():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    image = base64.b64encode(png.getvalue()).decode()
    assert ClassifyRequest(image=image, target_class="lemon").target().index == 951
    req = ClassifyRequest(prompt="lemon", steps=4, target_class=951, decoder="tiny")
    assert req.settings().steps == 4 and req.target().wnid == "n07749582"
    for bad, field in [({"prompt": "a", "target_class": "lemmon"}, "target_class"),
                       ({"prompt": "a", "top_k": "5"}, "top_k"),
                       ({"prompt": "a", "decode": "noise"}, "decode"),
                       ({"prompt": "a", "image": image}, "request"),
                       ({}, "request"),
                       ({"image": "not base64!"}, "image"),
                       ({"prompt": "a", "extra": 1}, "extra")]:
        with pytest.raises(ValidationError) as err:
            ClassifyRequest(**bad)
        loc = err.value.errors()[0]["loc"]
        assert (".".join(map(str, loc)) or "request") == field, (bad, err.value)


# --- the CLI ---------------------------------------------------------------------------------------
def test_cli_classify_end_to_end(tmp_path, capsys, monkeypatch, vgg):
    import ldmprobe.classify

    asked = []

    def reuse_random_vgg(source, device, dtype, preprocessing="timm"):  # the module's random VGG-16
        assert source == "random"
        asked.append(preprocessing)
        return vgg

    monkeypatch.setattr(ldmprobe.classify, "load_classifier", reuse_random_vgg)
    out = tmp_path / "run"
    rc = main(["classify", "--model", "tiny", "--prompt", "lemon", "--seed", "0", "--steps", "2", "--out", str(out),
               "--decoder", "tiny", "--tiny-decoder", "random", "--decode", "x0", "--classifier", "random",
               "--top-k", "3", "--target", "lemon", "--previews", "--no-progress"])
    assert rc == 0
    assert "random weights: not a result" in capsys.readouterr().out
    with Image.open(out / "classification.png") as fig:
        fig.verify()
    assert Image.open(out / "image.png").size == (128, 128)
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_000.png", "step_001.png"]
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert len(rows) == 2 * 3 and [(r["step"], r["rank"]) for r in rows[:4]] == [("0", "1"), ("0", "2"), ("0", "3"),
                                                                                   ("1", "1")]
    data = json.loads((out / "steps.json").read_text())
    assert len(data["steps"]) == 2 and all(len(s["top"]) == 3 for s in data["steps"])
    assert data["target"] == {"index": 951, "wnid": "n07749582", "name": "lemon"} and len(data["target_curve"]) == 2
    meta = data["metadata"]
    assert meta["classifier"]["random_weights"] is True and "warning" in meta["classifier"]
    assert meta["decoder"]["kind"] == "tiny" and meta["decoder"]["random_weights"] is True
    assert meta["decode"] == "x0" and meta["prompt"] == "lemon" and meta["steps"] == 2
    assert asked == ["timm"]
    bad = main(["classify", "--model", "tiny", "--prompt", "lemon", "--out", str(tmp_path / "bad"), "--classifier",
                "random", "--preprocessing", "keras", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert bad == 2 and len(err.splitlines()) == 1 and "--preprocessing" in err
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(("args", "message"), [
    # the target is one of the classifier's classes: checked once the classifier is loaded
    (["--target", "lemmon", "--classifier", "random"], "--target: unknown ImageNet class 'lemmon'; close matches: lemon (951)"),
    (["--target", "crane", "--classifier", "random"], "--target: class name 'crane' is ambiguous"),
    (["--decode", "noise"], "--decode: Input should be 'latent' or 'x0'"),
    (["--decoder", "big"], "--decoder: Input should be 'vae' or 'tiny'"),
    (["--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
    (["--steps", "0"], "--steps: Input should be greater than or equal to 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--tiny-decoder", "random"], "--tiny-decoder: only used with --decoder tiny"),
    ([], "could not download classifier weights 'timm/vgg16.tv_in1k'"),  # never silently random
    (["--classifier", "/no/such/vgg.pth"], "classifier weights '/no/such/vgg.pth' do not exist"),
    (["--decoder", "tiny", "--classifier", "random"], "could not load the tiny decoder 'madebyollin/taesd'"),
    (["--decoder", "tiny", "--tiny-decoder", "/no/taesd", "--classifier", "random"], "'/no/taesd' does not exist"),
])
def test_cli_errors_one_line_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    rc = main(["classify", "--model", "tiny", "--prompt", "lemon", "--steps", "2", "--out", str(out), "--no-progress",
               *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.count("\n") == 1 and err.startswith("ldmprobe: error:")
    assert not out.exists()


def test_cli_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["classify", "--model", "tiny", "--prompt", "lemon", "--out", str(out), "--classifier", "random"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_figure_without_previews(batched, tmp_path):
    result = batched[0]
    result_np = Classification(result.probabilities, result.timesteps, 3, result.target, None, None,
                               metadata=result.metadata)
    path = plot_classification(result_np, tmp_path / "fig.png", title="no previews")
    with Image.open(path) as img:
        assert img.format == "PNG"


def test_caffe_preprocessing_is_keras_vgg16_on_the_png(vgg):
    """preprocessing="caffe" (issue 13 item 11): what the capstone's Keras VGG-16 saw — the
    image as an 8-bit PNG, resized whole to 224 with PIL's NEAREST (Keras' load_img), BGR, the
    ImageNet BGR means subtracted in 0–255, no std — computed here from PIL, element for element."""
    import numpy as np
    from PIL import Image

    from ldmprobe.classify import CAFFE_BGR_MEAN

    caffe = ImageClassifier(vgg.module, "random", True, preprocessing="caffe")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 96, 80)
    got = caffe.preprocess(images)
    for i in range(2):
        png = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        keras = np.asarray(Image.fromarray(png).resize((224, 224), Image.NEAREST), dtype=np.float32)
        keras = keras[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, dtype=np.float32)
        np.testing.assert_array_equal(got[i].permute(1, 2, 0).numpy(), keras)
    assert not torch.allclose(got, vgg.preprocess(images).float())  # not timm's
    meta = caffe.metadata()
    assert (meta["preprocessing"], meta["interpolation"], meta["std"]) == ("caffe", "nearest", [1.0, 1.0, 1.0])
    assert vgg.metadata()["preprocessing"] == "timm"
    with pytest.raises(ValueError, match="preprocessing"):
        ImageClassifier(vgg.module, "random", True, preprocessing="keras")


def test_a_named_class_set_resolves_targets_and_the_schema_checks_them_against_the_serving_classifier():
    from pydantic import ValidationError

    from ldmprobe.classify import ClassSet, UnknownClassError
    from ldmprobe.serve.schemas import ClassifyRequest

    scenes = ClassSet.from_names("scenes", ["red sphere", "red box", "blue sphere"])
    assert scenes.resolve("Blue_Sphere").index == 2 and scenes.resolve(1).name == "red box"
    assert scenes.resolve("2").info().wnid == "scenes:blue-sphere"
    with pytest.raises(UnknownClassError, match="close matches: red sphere"):
        scenes.resolve("red spher")
    with pytest.raises(UnknownClassError, match="out of range 0-2"):
        scenes.resolve(3)
    # the request model: ImageNet without a context, the serving classifier's classes with one
    assert ClassifyRequest.model_validate({"prompt": "a", "target_class": "red box"},
                                          context={"classes": scenes}).target(scenes).index == 1
    with pytest.raises(ValidationError, match="unknown ImageNet class"):
        ClassifyRequest.model_validate({"prompt": "a", "target_class": "red box"})
    with pytest.raises(ValidationError, match="unknown scenes class 'lemon'"):
        ClassifyRequest.model_validate({"prompt": "a", "target_class": "lemon"}, context={"classes": scenes})
    with pytest.raises(ValueError, match="unique"):
        ClassSet.from_names("x", ["a", "a"])


def test_cli_scenes_classifier_takes_its_own_class_names(tmp_path, capsys):
    """--model scenes classifies with the scenes label models' classifier by default; the target is one
    of its colour × kind classes (an ImageNet name is refused with close matches, before any generation)."""
    import json

    out = tmp_path / "run"
    assert main(["classify", "--model", "scenes", "--prompt", "a red sphere on a grey floor", "--seed", "3",
                 "--steps", "3", "--target", "Red_Sphere", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "steps.json").read_text())
    assert data["target"] == {"index": data["target"]["index"], "wnid": "scenes:red-sphere", "name": "red sphere"}
    assert len(data["target_curve"]) == 3 and data["metadata"]["classifier"]["classes"] == "scenes"
    assert data["metadata"]["classifier"]["random_weights"] is False
    capsys.readouterr()
    assert main(["classify", "--model", "scenes", "--prompt", "a", "--target", "lemon", "--out",
                 str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--target: unknown scenes class 'lemon'" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
