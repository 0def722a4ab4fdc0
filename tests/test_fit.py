"""The fitting job end to end on the tiny model: known answer, resume, torchrun, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldmprobe.probes import ProbeBank
from training.fit import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "4", "--layers", "dec4,mid.0", "--test-scenes", "4", "--no-progress"]


def _run_module(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "training.fit", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _bank_tensors(path):
    return load_file(str(path))


def _best(rows, prop, metric, step, lower=False):
    vals = [r["value"] for r in rows if r["property"] == prop and r["metric"] == metric and r["step"] == step
            and not math.isnan(r["value"])]
    return min(vals) if lower else max(vals)


@pytest.fixture(scope="module")
def known_answer(tmp_path_factory):
    out = tmp_path_factory.mktemp("known") / "run"
    assert main(["--scenes", "64", "--test-scenes", "16", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_known_answer_probes_beat_trivial_baselines(known_answer, tiny):
    """Rendered scenes, noised mode, all 16 layers × 15 steps: at low noise the probes clearly
    beat the all-background mask and the training mean; the advantage shrinks toward step 0."""
    data = json.loads((known_answer / "metrics.json").read_text())
    rows, base = data["rows"], data["summary"]["baselines"]
    last, first = 14, 0
    dice_last, dice_first = _best(rows, "foreground", "dice", last), _best(rows, "foreground", "dice", first)
    assert base["foreground/dice"] < 0.05 and dice_last > base["foreground/dice"] + 0.15
    # Depth is clearly decodable; shading (shadows, facing ratio) only weakly from a random-weight
    # model: it must still beat the training mean and rank pixels better than at pure noise.
    for prop, margin in (("depth", 0.9), ("shading", 1.0)):
        rmse_last = _best(rows, prop, "rmse", last, lower=True)
        rmse_first = _best(rows, prop, "rmse", first, lower=True)
        assert rmse_last < base[f"{prop}/rmse"] * margin, prop
        assert base[f"{prop}/rmse"] - rmse_last > base[f"{prop}/rmse"] - rmse_first, prop  # shrinks with noise
        assert _best(rows, prop, "spearman", last) > max(0.2, _best(rows, prop, "spearman", first)), prop
    assert dice_last > dice_first + 0.1
    # The bank loads for this model and the probe-head path applies it.
    bank = ProbeBank.load(known_answer / "bank.safetensors", tiny)
    assert bank.layers == tiny.registry().names and bank.steps == list(range(15))
    assert set(bank.properties) == {"foreground", "depth", "shading"}
    probe = bank.probe("depth", "dec4.0", 14)
    assert probe.fit["method"] == "ridge" and probe.fit["lambda"] > 0 and "spearman" in probe.metrics
    csv_lines = (known_answer / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "property,layer,step,metric,value,n_images,n_undefined" and len(csv_lines) == len(rows) + 1


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_scores_use_the_banks_upsampling(mode):
    """The job scores each probe's map brought to image size as its bank says (the protocol's
    `upsample`): a 2×2 map of 0…3 against its own bilinear 8×8 upsampling ranks every pixel right
    only when bilinearly upsampled; nearest ties each 4×4 block."""
    from training.data import Batch
    from training.fit import Dist, evaluate

    bank = ProbeBank("test", {"L": (1, 2, 2)}, image_size=(8, 8), upsample=mode)
    bank.add("depth", "L", 0, torch.ones(1))
    acts = torch.arange(4.0).reshape(1, 1, 4, 1)  # [N, S, h·w, C]
    label = torch.nn.functional.interpolate(acts.reshape(1, 1, 2, 2), size=(8, 8), mode="bilinear",
                                            align_corners=False)[:, 0]

    class Source:
        def batch(self, ids):
            return Batch(ids, torch.zeros(1, 3, 8, 8), {"depth": label}, {"L": acts})

    sums = evaluate(bank, Source(), ["a"], ["depth"], ["L"], 1, 1, Dist(), {"depth": 0.0}, False)
    rho = next(r["value"] for r in sums.rows() if r["layer"] == "L" and r["metric"] == "spearman")
    assert (rho > 0.9999) == (mode == "bilinear") and rho > 0.8


def test_small_run_outputs(tmp_path, tiny):
    out = tmp_path / "run"
    assert main(["--scenes", "10", "--shard-size", "4", "--out", str(out), *SMALL]) == 0
    assert sorted(p.name for p in (out / "stats").iterdir()) == [f"shard_{i:05d}.safetensors" for i in range(3)]
    bank = ProbeBank.load(out / "bank.safetensors", tiny)
    assert bank.layers == ["mid.0", "dec4.0", "dec4.1", "dec4.2"] and bank.steps == [0, 1, 2, 3]
    assert bank.probe("foreground", "dec4.0", 3).kind == "mask" and not bank.probe("foreground", "dec4.0", 3).sigmoid
    depth = bank.probe("depth", "dec4.0", 3)
    # Depth labels are standardised per image (--depth-norm image), so the stored global z-score is 0 / 1.
    assert abs(depth.mean[0]) < 1e-4 and abs(depth.std[0] - 1) < 1e-4
    assert bank.probe("shading", "dec4.0", 3).mean[0] > 0  # other properties keep their values
    job = json.loads((out / "job.json").read_text())
    assert job["options"]["depth_norm"] == "image" and job["source"]["depth_norm"] == "image"
    assert job["options"]["upsample"] == bank.upsample == "bilinear"  # scored and drawn bilinearly
    assert job["model_identity"] == tiny.identity and job["method"] == "ridge"
    assert (job["protocol"], job["recipe"]) == ("ldmprobe", "ridge") and bank.extra["protocol"] == "ldmprobe"
    assert job["timesteps"] == bank.extra["timesteps"] == list(np.linspace(0, 999, 4)[::-1])
    assert not list(out.rglob("*.tmp"))
    # Running again resumes every shard from its checkpoint and reproduces the bank exactly.
    first = _bank_tensors(out / "bank.safetensors")
    assert main(["--scenes", "10", "--shard-size", "4", "--out", str(out), *SMALL]) == 0
    second = _bank_tensors(out / "bank.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_bank(tmp_path):
    args = ["--scenes", "24", "--shard-size", "4", *SMALL]
    clean = tmp_path / "clean"
    assert main([*args, "--out", str(clean)]) == 0
    killed = tmp_path / "killed"
    proc = _run_module([*args, "--out", str(killed)], start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "stats" / "shard_00001.safetensors").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted((killed / "stats").glob("shard_*.safetensors"))
    assert 2 <= len(done) < 6 and not (killed / "bank.safetensors").exists()  # really interrupted
    assert main([*args, "--out", str(killed)]) == 0
    a, b = _bank_tensors(clean / "bank.safetensors"), _bank_tensors(killed / "bank.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((killed / "metrics.json").read_text())["summary"]
    assert summary["resumed_shards"] == len(done)


@pytest.mark.slow
def test_torchrun_two_processes_equals_one(tmp_path):
    """The same job under torchrun with 1 and 2 processes (gloo on CPU). Both runs use one
    thread per process so the activations are computed identically; only the order in which
    float64 statistics are summed differs."""
    args = ["--scenes", "16", "--shard-size", "4", *SMALL]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name, nproc in (("single", "1"), ("double", "2")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               nproc, "-m", "training.fit", *args, "--out", str(tmp_path / name)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = tmp_path / "single", tmp_path / "double"
    a, b = _bank_tensors(single / "bank.safetensors"), _bank_tensors(double / "bank.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    ma = {(r["property"], r["layer"], r["step"], r["metric"]): r["value"]
          for r in json.loads((single / "metrics.json").read_text())["rows"]}
    mb = json.loads((double / "metrics.json").read_text())
    assert mb["summary"]["world_size"] == 2
    for r in mb["rows"]:
        want = ma[(r["property"], r["layer"], r["step"], r["metric"])]
        assert (math.isnan(want) and math.isnan(r["value"])) or abs(want - r["value"]) < 1e-4


def test_reference_method_trains_logits(tmp_path, tiny):
    out = tmp_path / "ref"
    assert main(["--scenes", "8", "--method", "reference", "--epochs", "2", "--out", str(out),
                 "--properties", "foreground,depth", *SMALL]) == 0
    bank = ProbeBank.load(out / "bank.safetensors", tiny)
    assert bank.probe("foreground", "dec4.1", 2).sigmoid and bank.probe("foreground", "dec4.1", 2).fit["method"] == "reference"
    assert not bank.has("shading", "dec4.1", 2)


def test_generated_mode_with_label_files_and_a_depth_model(tmp_path, tiny, dpt_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n# comment\na blue car\na dog\n")
    labels = tmp_path / "labels"
    (labels / "foreground").mkdir(parents=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(3):
        Image.fromarray((rng.random((128, 128)) > 0.7).astype(np.uint8) * 255).save(labels / "foreground" / f"{i}.png")
    out = tmp_path / "gen"
    rc = main(["--mode", "generated", "--prompts", str(prompts), "--test-prompts", str(prompts), "--base-seed", "10",
               "--labels", f"files:{labels}", "--labels", f"dpt:{dpt_dir}", "--properties", "foreground,depth",
               "--val-every", "3", "--shard-size", "2", "--steps", "2", "--layers", "dec4.0", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    bank = ProbeBank.load(out / "bank.safetensors", tiny)
    assert bank.properties == ["depth", "foreground"] or set(bank.properties) == {"foreground", "depth"}
    assert bank.label_sources["mode"] == "generated"


@pytest.mark.parametrize(("args", "message"), [
    (["--properties", "foreground,albedo"], "unknown property 'albedo'"),
    (["--layers", "dec9"], "unknown layer 'dec9'"),
    (["--mode", "generated", "--prompts", "/no/such.csv"], "/no/such.csv: prompt file not found"),
    (["--mode", "generated", "--prompts", "PROMPTS", "--test-prompts", "PROMPTS"], "needs at least one label source"),
    (["--mode", "generated", "--prompts", "PROMPTS", "--test-prompts", "PROMPTS", "--labels", "magic:x"],
     "'magic:x' is not dpt:PATH_OR_ID or files:DIR"),
    (["--scenes", "1"], "--scenes must be"),
    (["--steps", "0"], "--steps: Input should be greater than or equal to 1"),
    (["--method", "ridge", "--recipe", "capstone-shading"], "--method ridge contradicts --recipe capstone-shading"),
    (["--lr", "0.1"], "--lr / --epochs: only for the reference method"),
    (["--method", "reference", "--lr", "-1"], "--lr must be > 0"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    args = [str(prompts) if a == "PROMPTS" else a for a in args]
    assert main([*args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_out_folder_of_another_job_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--scenes", "6", "--out", str(out), *SMALL]) == 0
    before = (out / "bank.safetensors").read_bytes()
    assert main(["--scenes", "6", "--out", str(out), *SMALL[:2], "--layers", "mid.0", *SMALL[4:]]) == 2
    assert "holds another job (layers" in capsys.readouterr().err
    assert (out / "bank.safetensors").read_bytes() == before


def test_study_protocol_job_records_and_applies_the_studys_choices(tmp_path, tiny):
    """--protocol study: the study's probe recipe (two-class mask head, nn.Linear init, fixed
    depth units), its mask rule and prompt encoding, LMS on its timesteps; all recorded in
    job.json and the bank; RMSE also in the study's normalised units (item 8)."""
    from PIL import Image

    from ldmprobe.protocol import STUDY_DEPTH_STD

    prompts = tmp_path / "p.csv"
    prompts.write_text("prompts,seeds,prompt_inds\na red apple,1,11\na blue car,2,12\na dog,3,13\n"
                       "a green cup,4,14\n", encoding="utf-8")
    labels = tmp_path / "labels"
    (labels / "foreground").mkdir(parents=True)
    (labels / "depth").mkdir()
    rng = np.random.default_rng(0)
    for i in range(11, 15):
        Image.fromarray((rng.random((128, 128)) * 255 * (rng.random((128, 128)) > 0.5)).astype(np.uint8)).save(
            labels / "foreground" / f"{i}.png")
        np.save(labels / "depth" / f"{i}.npy", (10 + 20 * rng.random((128, 128))).astype(np.float32))
    out = tmp_path / "study"
    assert main(["--protocol", "study", "--mode", "generated", "--prompts", str(prompts), "--test-prompts",
                 str(prompts), "--labels", f"files:{labels}", "--properties", "foreground,depth", "--epochs", "1",
                 "--steps", "2", "--layers", "dec4.0", "--shard-size", "2", "--out", str(out), "--no-progress"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert (job["protocol"], job["recipe"], job["method"]) == ("study", "reference", "reference")
    opts = job["options"]
    assert (opts["mask_threshold"], opts["prompt_encoding"], opts["label_norm"]) == (0, "iso-8859-1", "study")
    assert opts["depth_norm"] == "none" and "depth_norm" not in job["source"]  # MiDaS's values, as the study
    assert opts["upsample"] == "nearest"  # each layer pixel a block, as the study
    assert (opts["mask_head"], opts["probe_init"], opts["lr"], opts["epochs"]) == ("two-class", "linear-default",
                                                                                   1e-3, 1)
    assert job["timesteps"] == [999.0, 0.0] and job["timestep_spacing"] == "linspace"
    bank = ProbeBank.load(out / "bank.safetensors", tiny)
    assert bank.extra["protocol"] == "study" and bank.extra["timesteps"] == job["timesteps"]
    assert bank.upsample == "nearest"
    assert bank.fit == {"method": "reference", "recipe": "reference", "protocol": "study"}
    fg, depth = bank.probe("foreground", "dec4.0", 1), bank.probe("depth", "dec4.0", 1)
    assert fg.sigmoid and fg.fit["mask_head"] == "two-class" and depth.fit["label_norm"] == "study"
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    rmse = {(r["layer"], r["step"]): r["value"] for r in rows if r["property"] == "depth" and r["metric"] == "rmse"}
    study = {(r["layer"], r["step"]): r["value"] for r in rows
             if r["property"] == "depth" and r["metric"] == "rmse_study"}
    assert rmse.keys() == study.keys() and len(rmse) == 3  # dec4.0 × 2 steps + the baseline
    for key, value in rmse.items():
        assert study[key] == pytest.approx(value / STUDY_DEPTH_STD, rel=1e-4)


def test_job_on_a_leading_folder_fits_at_the_studys_timesteps(tmp_path, leading_folder):
    """Item 2 for the jobs: a folder saying "leading" still gets the study's LMS timesteps,
    recorded exactly in job.json and the bank; --timestep-spacing config follows the folder."""
    base = ["--model", str(leading_folder), "--scenes", "4", "--test-scenes", "1", "--steps", "3", "--layers", "mid.0",
            "--properties", "depth", "--val-every", "2", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "pinned")]) == 0
    assert main([*base, "--timestep-spacing", "config", "--out", str(tmp_path / "folder")]) == 0
    pinned, folder = (ProbeBank.load(tmp_path / name / "bank.safetensors").extra for name in ("pinned", "folder"))
    assert pinned["timesteps"] == [999.0, 499.5, 0.0] and pinned["timestep_spacing"] == "linspace"
    assert folder["timesteps"] == [667.0, 334.0, 1.0] and folder["timestep_spacing"] == "leading"


def test_capstone_shading_recipe_and_the_report_names_it(tmp_path, tiny):
    """Item 5: --recipe capstone-shading fits shading on dec4.0 only with Adam lr 1e-2 on the
    capstone's 500/117 split; the report says which recipe produced its figures."""
    from PIL import Image

    from training.prompts import named_split
    from training.report import heatmap_figure, load_run
    from training.report import main as report_main

    train, test = named_split("capstone-shading", "train")[:2], named_split("capstone-shading", "test")[:2]
    labels = tmp_path / "labels"
    (labels / "shading").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for item in (*train, *test):
        Image.fromarray((rng.random((128, 128)) * 255).astype(np.uint8)).save(labels / "shading" / f"{item.id}.png")
    out = tmp_path / "capstone"
    assert main(["--recipe", "capstone-shading", "--mode", "generated", "--limit", "2", "--labels", f"files:{labels}",
                 "--epochs", "1", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert (job["recipe"], job["layers"], job["properties"]) == ("capstone-shading", ["dec4.0"], ["shading"])
    assert job["options"]["lr"] == 1e-2 and job["options"]["split"] == "capstone-shading"
    bank = ProbeBank.load(out / "bank.safetensors", tiny)
    assert bank.layers == ["dec4.0"] and bank.properties == ["shading"]
    assert bank.probe("shading", "dec4.0", 1).fit["lr"] == 1e-2 and bank.split["train"] == 2
    assert report_main(["--run", str(out), "--no-figure4"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["recipe"] == "capstone-shading" and "lr 1e-2" in report["recipe_description"]
    title = heatmap_figure(load_run(out), "shading").axes[0].get_title()
    assert "recipe: capstone-shading" in title


def test_rmse_is_also_reported_in_the_studys_normalised_units():
    """Item 8: beside raw RMSE, RMSE after the study's fixed depth normalisation
    (x − 15.740597) / 9.281932, per image (computed here in float64 with numpy)."""
    from training.fit import per_image_metrics

    rng = np.random.default_rng(3)
    target = rng.uniform(2, 40, (3, 8, 8))
    pred = target + rng.normal(0, 4, (3, 8, 8))
    got = per_image_metrics(torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32),
                            "continuous")
    norm = lambda x: (x - 15.740597) / 9.281932  # noqa: E731
    want_study = np.sqrt(((norm(pred) - norm(target)) ** 2).mean(axis=(1, 2)))
    want_raw = np.sqrt(((pred - target) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(got["rmse_study"].numpy(), want_study, rtol=1e-5)
    np.testing.assert_allclose(got["rmse"].numpy(), want_raw, rtol=1e-5)


def test_world_choice_puts_any_model_on_the_scenes_models_scenes(tiny):
    """--world scenes renders the shipped scenes model's world for any model (the random contrast on the
    same scenes); auto is the model's own world (none for tiny: the full renderer)."""
    from ldmprobe.models import SCENES_DIR
    from training.fit import _world

    shipped = json.loads((SCENES_DIR / "world.json").read_text())["render_options"]
    assert _world("scenes", tiny) == shipped and shipped["mist"] > 0
    assert _world("auto", tiny) is None and _world("full", tiny) is None
