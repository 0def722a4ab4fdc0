"""bench/intervene.py --quick runs end to end and prints one strict JSON line with its keys."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCENE_BANK_STEPS

from ldmprobe.jsonout import loads_strict

ROOT = Path(__file__).resolve().parents[1]


def test_bench_intervene_smoke(scene_bank):
    args = ["--quick", "--steps", str(SCENE_BANK_STEPS), "--bank", str(scene_bank), "--dx", "24"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "intervene.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    out = loads_strict(lines[0])
    for key in ("speedup_vs_reference", "speedup_vs_reference_eager", "dice_to_target", "dice_baseline",
                "optimise_ms", "final_loss_max_rel_diff", "end_to_end"):
        assert key in out, key
    ms = out["optimise_ms"]  # the ratios are the medians measured side by side in this run
    assert out["speedup_vs_reference"] == pytest.approx(ms["reference"] / ms["batched_compiled"], rel=0.05, abs=0.01)
    assert out["speedup_vs_reference_eager"] == pytest.approx(ms["reference"] / ms["batched_eager"], rel=0.05, abs=0.01)
    assert max(out["final_loss_max_rel_diff"].values()) < 1e-3  # equal final loss
    assert out["layer_shapes"]["dec4.0"] == [16, 16, 320]  # SD v1.4 channels at 128 px
    e2e = out["end_to_end"]
    assert e2e["edit"]["layers"] == 9
    assert e2e["intervention_vs_generation"] == pytest.approx(e2e["intervention_s"] / e2e["generation_s"], rel=0.02,
                                                              abs=0.01)
    assert e2e["representation"]["rmse_to_target"] < e2e["representation"]["rmse_baseline"]


def test_bench_intervene_fits_its_own_bank_quietly(capsys):
    """Without --bank the bench fits one; the job's JSON line goes to stderr, so the bench's
    stdout stays ONE line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_intervene", ROOT / "bench" / "intervene.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path, source = bench.fitted_bank(None, 2, None)
    assert path.is_file() and "12 rendered scenes" in source
    captured = capsys.readouterr()
    assert captured.out == "" and '"bank"' in captured.err
