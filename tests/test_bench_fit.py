"""bench/fit.py --quick runs end to end and prints one strict JSON line with its keys."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from ldmprobe.jsonout import loads_strict

ROOT = Path(__file__).resolve().parents[1]


def test_bench_fit_smoke():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fit.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    out = loads_strict(lines[0])
    for key in ("speedup_vs_reference", "ridge_fit_s", "reference_fit_s", "ridge_peak_mb", "reference_peak_mb",
                "memory_method", "metric_resolution", "torch", "cpu_count", "channels", "fit_steps"):
        assert key in out, key
    for method in ("ridge_metric", "reference_metric"):
        assert set(out[method]) >= {"foreground_dice", "depth_spearman", "headline"}
        assert all(math.isfinite(v) for v in out[method].values())
    assert out["quick"] is True and out["n_train"] == 5 and out["channels"] == {"dec4.0": 32}
    # the ratio is the two fits' median times measured in the same run (rounding aside)
    assert out["speedup_vs_reference"] == pytest.approx(out["reference_fit_s"] / out["ridge_fit_s"], rel=0.02, abs=0.01)
    assert out["ridge_peak_mb"] >= 0 and out["reference_peak_mb"] >= 0
