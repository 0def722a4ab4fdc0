"""training.study: the study's protocol end to end on the scenes model (a reduced run: a few prompts,
3 steps), every artefact of the report written and parseable, a rerun resumes without redoing work."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from training.study import caption_class, crossover, main

REDUCED = ["--model", "scenes", "--prompts", "6", "--steps", "3", "--noised-scenes", "4", "--noised-test-scenes", "2",
           "--curve-items", "2", "--classify-items", "2", "--intervene-captions", "1", "--iterations", "2",
           "--guidance", "2", "--no-progress"]


def test_caption_class_maps_cube_to_box():
    assert caption_class("a red cube on a grey floor") == "red box"
    assert caption_class("a light blue sphere on a beige floor") == "blue sphere"  # the last two words before "on"


def test_crossover_is_the_step_from_which_the_label_model_stays_ahead():
    assert crossover([0.5, 0.7, 0.7, 0.7], [0.2, 0.8, 0.6, 0.9]) == 3  # ahead at 1, behind at 2, ahead from 3 on
    assert crossover([0.5, 0.5], [0.6, 0.7]) == 0
    assert crossover([0.9, 0.9], [0.1, 0.2]) == "never"


@pytest.mark.parametrize(("args", "message"), [
    (["--prompts", "2"], "--prompts"),
    (["--train-fraction", "0.95"], "--train-fraction"),
    (["--labels", "dpt:x"], "--labels"),
    (["--skip", "figures"], "--skip"),
    (["--iterations", "0"], "--iterations"),
    (["--guidance", "-1"], "--guidance"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    rc = main(["--out", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_reduced_study_writes_every_artefact_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["--out", str(out), *REDUCED]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line["wall_s"]) == {"prompts", "generated", "noised", "reports", "classify", "intervene"}

    report = (out / "report.md").read_text()
    assert "guidance 2." in report  # --guidance reaches every generation: the fit, its report, the stages
    assert json.loads((out / "generated" / "job.json").read_text())["guidance"] == 2
    assert "relative depth (`--depth-norm image`" in report  # the report says how depth was fitted
    for heading in ("## Layers", "## Best probes", "## Emergence", "## Classification", "## Intervention", "## Wall time"):
        assert heading in report
    assert report.count("| enc1 |") + report.count("Encoder 1") >= 1  # the layer table names the blocks
    shading = next(line for line in report.splitlines() if line.startswith("| noised | shading | spearman |"))
    ceiling = float(shading.strip(" |").split("|")[-1])  # exact shading ties: no tie-free map reaches 1
    assert 0 < ceiling < 0.99 and "tie-free ceiling" in report
    for stage in line["wall_s"]:
        assert json.loads((out / "stages" / f"{stage}.json").read_text())["wall_s"] >= 0
    for png in ("figures/classification.png", "figures/intervention_histogram.png",
                "generated/report/figures/emergence.png", "generated/report/figures/heatmap_depth.png",
                "generated/report/figures/figure4.png", "noised/report/figures/emergence.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 100, png
    with Image.open(out / "figures" / "sweep.gif") as gif:
        assert gif.n_frames == 7
    classify = json.loads((out / "stages" / "classify.json").read_text())["result"]
    assert len(classify["latent"]["top1_accuracy_per_step"]) == 3
    intervene = json.loads((out / "stages" / "intervene.json").read_text())["result"]
    assert intervene["sequential"]["summary"]["n"] == 4 and intervene["joint"]["summary"]["n"] == 2
    assert intervene["activation"]["summary"]["n"] == 4 and intervene["activation"]["metric"] == "activation"
    assert intervene["sequential"]["metric"] == "euclidean"  # the study's edit
    assert "| sequential | activation | all |" in report and "| sequential | euclidean | study |" in report
    reports = json.loads((out / "stages" / "reports.json").read_text())["result"]
    for mode in ("generated", "noised"):
        props = reports[mode]["properties"]
        assert set(props) == {"foreground", "depth", "shading"}
        assert all("curve_model" in p for p in props.values())  # the label models on every step's decode

    # a rerun finds every stage done and only rewrites report.md
    assert main(["--out", str(out), *REDUCED]) == 0
    err = capsys.readouterr().err
    assert err.count("done before") == 6
    # other settings in the same folder are refused
    assert main(["--out", str(out), *REDUCED[:-1], "--prompts", "7"]) == 2
