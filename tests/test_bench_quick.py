"""bench/capture.py, probe_heads.py and classify.py run with --quick and print ONE strict JSON
line (NaN / Infinity refused). fit.py, intervene.py and serve.py have their own smoke tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldmprobe.jsonout import loads_strict

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "capture": ("capture_overhead", "speedup_vs_hooks", "step_ms", "max_abs_diff_vs_hooks"),
    "probe_heads": ("speedup_vs_reference", "batched_ms", "max_abs_diff_vs_reference", "fraction_of_unet_step"),
    "classify": ("tiny_decoder_cost_ratio", "batched_speedup", "batched_max_abs_prob_diff", "flop_ratio"),
}


@pytest.mark.slow
@pytest.mark.parametrize("bench", sorted(KEYS))
def test_bench_quick_prints_one_strict_json_line(bench):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{bench}.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout[-2000:]
    out = loads_strict(lines[0])
    assert out["bench"] == bench and out["quick"] is True
    for key in KEYS[bench]:
        assert key in out, key
    if bench == "capture":
        assert out["rounds"] == 1 and out["calls_per_round"] == 1 and out["max_abs_diff_vs_hooks"] < 1e-3
    if bench == "probe_heads":
        assert out["fraction_of_unet_step"] is None and out["repeats"] == 3  # --quick skips the SD U-Net step
        assert out["max_abs_diff_vs_reference"] < 1e-4
    if bench == "classify":
        assert out["image_size"] == 64 and out["steps"] == 3 and out["batched_max_abs_prob_diff"] < 1e-4
