"""training.scenes_model.evaluate: the adherence judges on renders (known answers), the object-region
colour rule against a floor drawn in an object's hue, and the command's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.scenes_model.data import held_out_captions, held_out_scenes
from training.scenes_model.evaluate import judge


@pytest.fixture(scope="module")
def renders():
    scenes = held_out_scenes(16)  # the held-out captions come by colour: red, then green
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in scenes])
    masks = np.stack([s.mask for s in scenes])
    return images, masks, held_out_captions()[:16]


@pytest.fixture(scope="module")
def labels():
    from ldmprobe.label_models import load_label_models

    return load_label_models()


def test_renders_pass_every_judge(renders, labels):
    images, _, captions = renders
    out = judge(images, captions, labels)
    assert out["colour_adherence"] == out["object_colour_adherence"] == out["count_adherence"] == 1.0
    assert out["kind_adherence"] >= 0.875 and len(out["rows"]) == 16
    assert all(r["object_fraction"] >= 0.01 for r in out["rows"])


def test_a_floor_in_an_object_hue_fools_the_image_rule_not_the_object_rule(renders, labels):
    """The background repainted a saturated brown (hue 28°, saturation 0.8: as the model draws some brown
    floors; the palette's brown has saturation 0.6): the whole-image rule calls the image orange; the
    object's own pixels still carry the caption's colour. Repainting the object orange fails both."""
    images, masks, captions = renders
    i = min((k for k, c in enumerate(captions) if c["colour"] not in ("orange", "red", "yellow")),
            key=lambda k: masks[k].mean())  # the smallest object: the floor outweighs it
    assert masks[i].mean() < 0.4
    orange = torch.tensor([0.95, 0.50, 0.10])[:, None, None]
    floor = images[i:i + 1].clone()
    background = torch.from_numpy(~masks[i].astype(bool))
    brown = torch.tensor([0.50, 0.287, 0.10])[:, None, None]
    floor[0][:, background] = brown.expand(3, 128, 128)[:, background]
    row = judge(floor, captions[i:i + 1], labels)["rows"][0]
    assert row["dominant_colour"] == "orange" and not row["colour_ok"]
    assert row["object_colour"] == captions[i]["colour"] and row["object_colour_ok"]
    obj = images[i:i + 1].clone()
    obj[0][:, ~background] = (orange * 0.8).expand(3, 128, 128)[:, ~background]
    row = judge(obj, captions[i:i + 1], labels)["rows"][0]
    assert not row["colour_ok"] and not row["object_colour_ok"] and row["object_colour"] == "orange"


@pytest.mark.slow
def test_evaluate_prints_one_line_and_writes_the_grid(tmp_path, capsys):
    from training.scenes_model.__main__ import main

    assert main(["evaluate", "--model", "scenes", "--contrast", "none", "--captions", "2", "--steps", "3",
                 "--guidance", "2", "--out", str(tmp_path)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["captions"] == 2 and line["renders"]["colour_adherence"] == 1.0
    assert set(line["model"]) >= {"colour_adherence", "object_colour_adherence", "kind_adherence", "count_adherence"}
    saved = json.loads((tmp_path / "evaluate.json").read_text())
    assert len(saved["model_rows"]) == 2
    with Image.open(tmp_path / "samples.png") as im:
        assert im.format == "PNG"


def test_samples_figure_draws_a_row_per_guidance(tmp_path, capsys):
    """The README's samples figure: renders, then one row per guidance scale, every N-th caption."""
    from training.scenes_model.samples_figure import main

    out = tmp_path / "samples.png"
    assert main(["--model", "tiny", "--guidance", "2,7.5", "--captions", "4", "--every", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["columns"] == 2 and line["guidances"] == [2.0, 7.5]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.height > 300 and im.width > 200


@pytest.mark.parametrize("args, message", [(["--guidance", "two"], "--guidance"), (["--every", "0"], "--every"),
                                           (["--guidance", "2,90"], "--guidance")])
def test_samples_figure_bad_input_exits_2(args, message, capsys):
    from training.scenes_model.samples_figure import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_late_guidance_switches_the_scale_on_the_last_steps_only():
    """Known answer: K = 0 is the plain run at the first scale, K = all steps the plain run at the late
    scale, and anything between differs from both; the sampler is restored afterwards."""
    import ldmprobe.generate as generate
    from training.scenes_model.data import held_out_captions
    from training.scenes_model.evaluate import sample
    from training.scenes_model.late_guidance import late_guidance

    caps, steps = held_out_captions()[:2], 3
    plain = {g: sample("tiny", caps, steps, g, progress=False)[0] for g in (7.5, 2.0)}
    original = generate.Denoising.predict
    runs = {}
    for k in (0, 1, steps):
        with late_guidance(k, 2.0):
            runs[k] = sample("tiny", caps, steps, 7.5, progress=False)[0]
    assert generate.Denoising.predict is original
    assert torch.equal(runs[0], plain[7.5]) and torch.equal(runs[steps], plain[2.0])
    assert not torch.equal(runs[1], plain[7.5]) and not torch.equal(runs[1], plain[2.0])


@pytest.mark.parametrize("args, message", [(["--late-steps", "16"], "--late-steps"),
                                           (["--late-steps", "2", "--late-guidance", "nan"], "--late-guidance")])
def test_late_guidance_bad_input_exits_2(args, message, capsys):
    from training.scenes_model.late_guidance import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_step_trace_reads_the_sampler_without_changing_it():
    """Known answers: the traced run's images equal an untraced run's; the LMS coefficients of each step
    integrate over its interval (they sum to sigma_next - sigma); the branches' disagreement is measured
    only when guidance runs both; the sampler is restored afterwards."""
    from ldmprobe.generate import Sampler
    from ldmprobe.models import load_model
    from ldmprobe.schemas import GenerationSettings
    from training.scenes_model.step_trace import run, traced

    sampler = Sampler(load_model("tiny"))
    prompts, seeds, settings = ["a red sphere on a grey floor"], [3], GenerationSettings(steps=3, guidance=7.5)
    plain = sampler.generate(prompts, seeds, settings, layers=None).images
    unet_fn = sampler.unet_fn
    with traced(sampler) as log:
        images = sampler.generate(prompts, seeds, settings, layers=None).images
    assert sampler.unet_fn is unet_fn and torch.equal(images, plain) and len(log) == 3
    out = run("tiny", 7.5, captions=2, steps=3)
    sigmas = [row["sigma"] for row in out["steps"]] + [0.0]
    for i, row in enumerate(out["steps"]):
        assert sum(row["lms_coefficients"]) == pytest.approx(sigmas[i + 1] - sigmas[i], abs=2e-3)
        assert row["branch_disagreement"] > 0 and 0 <= row["x0_colour_adherence"] <= 1
    assert all(row["branch_disagreement"] is None for row in run("tiny", 1.0, captions=1, steps=2)["steps"])


@pytest.mark.parametrize("args, message", [(["--guidance", "-1"], "--guidance"), (["--captions", "0"], "--captions")])
def test_step_trace_bad_input_exits_2(args, message, capsys):
    from training.scenes_model.step_trace import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
