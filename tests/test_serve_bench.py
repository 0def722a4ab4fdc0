"""bench/serve.py --quick sets itself up (fits the bank it is pointed at when the file is
missing, builds the archives, starts two TorchServes) and prints ONE strict JSON line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ldmprobe.jsonout import loads_strict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(2000)  # the bench's own deadline (1500 s) fires first and stops its servers
def test_serve_bench_quick_fits_its_bank_and_prints_one_strict_line(tmp_path):
    bank = tmp_path / "tiny-bank" / "bank.safetensors"  # not there yet: the bench fits it
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--bank", str(bank),
                           "--timeout", "1500"], cwd=ROOT, capture_output=True, text=True, timeout=1900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert bank.is_file() and "fitting a probe bank" in done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout[-2000:]  # the fit job's own line went to stderr
    out = loads_strict(lines[0])
    assert out["bench"] == "serve" and out["quick"] is True and out["errors"] == 0
    assert out["requests"]["batch_on"] == {"c1": 4, "c8": 16}  # 2 rounds of 2 + 8 timed requests
    assert out["cold_start_error"] == "skipped (--no-cold)" and out["worker_start_s"]["cold_cache"] is None
    # each batching variant's gain is its c8 throughput over batch_off's, from the same run's figures
    thr = out["throughput_rps"]
    assert set(out["batching_throughput_gain"]) == {"batch_on", "batch_on_fast"}
    for name, gain in out["batching_throughput_gain"].items():
        assert thr[name]["c8"] > 0 and gain == pytest.approx(thr[name]["c8"] / thr["batch_off"]["c8"], abs=2e-3)
