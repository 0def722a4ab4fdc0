"""The report job: tables equal metrics.json, figures are written, emergence steps, curve model, bad input."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from training import fit
from training.report import emergence_step, layer_key, main, shown_steps

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["mid.0", "dec4.0", "dec4.1", "dec4.2"]  # execution order of `--layers dec4,mid.0`
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine's 2 cores are shared: with 2 intra-op threads these tests ran 2-3× slower
    under load (threads waiting on each other), with 1 they run the same either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    assert fit.main(["--scenes", "10", "--test-scenes", "2", "--steps", str(STEPS), "--layers", "dec4,mid.0",
                     "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir, dpt_dir):
    """The full report: tables, heatmaps, Figure 4 of the first test scene, DPT on that scene."""
    assert main(["--run", str(run_dir), "--curve-model", f"dpt:{dpt_dir}", "--curve-items", "1",
                 "--show-layers", "mid.0"]) == 0
    out = run_dir / "report"
    return out, json.loads((out / "report.json").read_text())


def _same(a, b):
    return (a is None or math.isnan(a)) if (b is None or math.isnan(b)) else a == pytest.approx(b, abs=1e-12)


def _cell(text):
    return float(text)  # csv writes NaN as "nan"


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_files_and_figures(report):
    out, rep = report
    for name in ["heatmap_foreground", "heatmap_depth", "heatmap_shading", "emergence", "figure4"]:
        width, height = _png_size(out / "figures" / f"{name}.png")
        assert 300 <= width <= 3000 and 200 <= height <= 2000, (name, width, height)
    assert set(rep["files"]["figures"]) == {"heatmap_foreground", "heatmap_depth", "heatmap_shading", "emergence",
                                            "figure4"}
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temp files
    assert rep["figure4"]["steps"] == list(range(STEPS))  # ≤ 8 steps: all shown


def test_tables_equal_metrics_json(run_dir, report):
    out, _ = report
    rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    value = {(r["property"], r["layer"], r["step"], r["metric"]): r["value"] for r in rows}
    nested = json.loads((out / "tables" / "tables.json").read_text())["properties"]
    continuous = ["spearman", "pearson", "rmse", "rmse_study"]
    for prop, metrics in [("foreground", ["dice", "pearson"]), ("depth", continuous), ("shading", continuous)]:
        assert list(nested[prop]) == metrics
        for metric in metrics:
            with open(out / "tables" / f"{prop}_{metric}.csv", newline="") as f:
                table = list(csv.reader(f))
            assert table[0] == ["layer", *(f"step_{s}" for s in range(STEPS))]
            extra = ["baseline", "ceiling"] if metric == "spearman" else ["baseline"]
            assert [r[0] for r in table[1:]] == [*LAYERS, *extra]
            for r in table[1:len(LAYERS) + 1]:
                assert all(_same(_cell(v), value[(prop, r[0], s, metric)]) for s, v in enumerate(r[1:]))
            for r in table[len(LAYERS) + 1:]:
                assert all(_same(_cell(v), value[(prop, r[0], -1, metric)]) for v in r[1:])
            entry = nested[prop][metric]
            assert entry["primary"] == (metric == fit.PRIMARY[fit.PROPERTIES[prop]])
            assert len(entry["values"]) == len(LAYERS) and all(len(r) == STEPS for r in entry["values"])
    long = json.loads((out / "tables" / "metrics_long.json").read_text())
    assert len(long) == len(rows)
    assert all(_same(r["value"], value[(r["property"], r["layer"], r["step"], r["metric"])]) for r in long)


def test_report_json_summaries(run_dir, report):
    _, rep = report
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    assert list(rep["properties"]) == ["foreground", "depth", "shading"]
    for prop, s in rep["properties"].items():
        assert s["final"]["layer"] == summary["best"][prop]["layer"]
        assert s["final"]["value"] == pytest.approx(summary["best"][prop][s["metric"]])
        assert s["emergence_step"] == emergence_step(range(STEPS), s["best_per_step"]["values"])
        assert s["best"]["value"] >= s["final"]["value"]
        assert s["metric"] in s["baseline"]
    # Exact shading ties (lit floor, shadows, sky): no tie-free map reaches 1; depth barely ties.
    ceilings = summary["ceilings"]
    assert set(ceilings) == {"depth/spearman", "shading/spearman"}
    assert rep["properties"]["foreground"]["ceiling"] is None
    for prop in ("depth", "shading"):
        assert rep["properties"][prop]["ceiling"] == pytest.approx(ceilings[f"{prop}/spearman"])
    assert ceilings["shading/spearman"] < 0.97 < ceilings["depth/spearman"] <= 1.0
    curve = rep["properties"]["depth"]["curve_model"]
    assert curve["items"] == 1 and curve["metric"] == "spearman" and curve["steps"] == list(range(STEPS))
    assert set(curve["values"]) == {"spearman", "pearson", "rmse", "rmse_study"}
    assert all(len(v) == STEPS for v in curve["values"].values())
    assert "curve_model" not in rep["properties"]["foreground"]  # a depth model says nothing about masks


def test_emergence_step_known_answers():
    steps = [0, 1, 2, 3, 4]
    assert emergence_step(steps, [0.1, 0.5, 0.85, 0.95, 0.9]) == 2  # 0.85 ≥ 0.9 · 0.9 = 0.81
    assert emergence_step(steps, [0.1, 0.5, 0.80, 0.95, 0.9]) == 3
    assert emergence_step(steps, [0.9, 0.1, 0.2, 0.3, 1.0]) == 0  # first crossing, not a lasting one
    assert emergence_step(steps, [math.nan, 0.95, 0.2, 0.3, 1.0]) == 1  # undefined steps are skipped
    assert emergence_step(steps, [0.1, 0.2, 0.3, 0.4, 0.0]) is None  # nothing emerged
    assert emergence_step(steps, [0.1, 0.2, 0.3, 0.4, math.nan]) is None
    assert emergence_step([], []) is None


def test_layer_order_and_shown_steps():
    names = ["dec4.0", "mid.0", "enc1.1", "dec2.2", "enc1.0", "enc3.1", "dec3.0"]
    assert sorted(names, key=layer_key) == ["enc1.0", "enc1.1", "enc3.1", "mid.0", "dec2.2", "dec3.0", "dec4.0"]
    assert shown_steps(None, list(range(15))) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert shown_steps(None, list(range(10))) == [0, 2, 4, 6, 8, 9]
    assert shown_steps("all", list(range(10))) == list(range(10))
    assert shown_steps("1,3", list(range(4))) == [1, 3]


def test_synthetic_run_emergence_and_tables_only(tmp_path):
    """A hand-made metrics.json: the envelope's emergence step, baselines, no model loaded."""
    curves = {"dec4.0": [0.1, 0.3, 0.6, 0.8], "mid.0": [0.2, 0.75, 0.5, 0.4]}  # envelope .2 .75 .6 .8 → step 1
    rows = [{"property": "depth", "layer": la, "step": s, "metric": "spearman", "value": v, "n_images": 5,
             "n_undefined": 0} for la, vals in curves.items() for s, v in enumerate(vals)]
    rows.append({"property": "depth", "layer": "baseline", "step": -1, "metric": "spearman", "value": math.nan,
                 "n_images": 5, "n_undefined": 5})
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"rows": rows, "summary": {"test_images": 5}}))
    assert main(["--run", str(run), "--no-figure4", "--out", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())["properties"]["depth"]
    assert rep["emergence_step"] == 1 and rep["emergence_step_best_layer"] == 3
    assert rep["best_per_step"]["layers"] == ["mid.0", "mid.0", "dec4.0", "dec4.0"]
    assert rep["final"] == {"layer": "dec4.0", "step": 3, "value": 0.8}
    assert rep["baseline"] == {"spearman": None}  # NaN is written as null
    table = list(csv.reader(open(tmp_path / "r" / "tables" / "depth_spearman.csv")))
    assert [r[0] for r in table] == ["layer", "mid.0", "dec4.0", "baseline"]
    assert _png_size(tmp_path / "r" / "figures" / "emergence.png")[0] >= 300
    assert not (tmp_path / "r" / "figures" / "figure4.png").exists()


def test_figure4_of_a_prompt_and_generated_mode_curve(run_dir, dpt_dir, tmp_path):
    """Generated mode: each step's latent decoded, the final image labelled by the curve model."""
    run = tmp_path / "gen"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("report", "stats"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["summary"]["job"]["mode"] = "generated"
    (run / "metrics.json").write_text(json.dumps(metrics))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n")
    assert main(["--run", str(run), "--figure4-prompt", "a dog", "--figure4-seed", "3", "--figure4-steps", "0,3",
                 "--curve-model", f"dpt:{dpt_dir}", "--curve-prompts", str(prompts), "--curve-items", "5",
                 "--properties", "depth"]) == 0
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["figure4"]["steps"] == [0, 3] and "a dog" in rep["figure4"]["example"]
    assert rep["properties"]["depth"]["curve_model"]["items"] == 2  # the prompt file holds 2
    assert list(rep["properties"]) == ["depth"]
    width, height = _png_size(run / "report" / "figures" / "figure4.png")
    assert width < height * 1.5  # 2 steps + the final column; rows: image, depth probe, DPT


@pytest.mark.parametrize(("args", "message"), [
    (["--run", "/no/such/run"], "no such run folder"),
    (["--run", "EMPTY"], "no metrics.json"),
    (["--run", "RUN", "--properties", "foreground,albedo"], "unknown property 'albedo'"),
    (["--run", "RUN", "--show-layers", "dec9.0"], "unknown layer 'dec9.0'"),
    (["--run", "RUN", "--curve-model", "magic:x"], "'magic:x' is not dpt:PATH_OR_HUB_ID"),
    (["--run", "RUN", "--no-figure4", "--curve-model", "dpt:/no/such/dpt"], "cannot load depth model '/no/such/dpt'"),
    (["--run", "RUN", "--figure4-seed", "3"], "--figure4-seed needs --figure4-prompt"),
    (["--run", "RUN", "--figure4-steps", "0,9"], "step(s) [9] not in the run"),
    (["--run", "RUN", "--no-figure4", "--figure4-scene", "3"], "not allowed with argument"),
])
def test_bad_input_exits_2_with_one_line(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [{"RUN": str(run_dir), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in args]
    try:
        rc = main([*args, "--out", str(tmp_path / "r")])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_module_cli_bad_run_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.report", "--run", str(tmp_path / "missing")], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"training.report: error: --run {tmp_path / 'missing'}: no such run folder"]
