"""Strict JSON output: the helper, and the training jobs' stdout lines read by a parser that
refuses NaN / Infinity (the fit job's baselines have undefined Spearman scores)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmprobe.jsonout import dumps, loads_strict, print_line, sanitize

ROOT = Path(__file__).resolve().parents[1]


def strict_lines(stdout: str) -> list:
    """Every non-empty stdout line parsed strictly (a non-JSON line fails too)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return [loads_strict(line) for line in lines]


def test_sanitize_and_dumps():
    obj = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": torch.tensor(0.25)},
           "e": torch.tensor(math.nan), "f": "NaN", "g": None, "h": True, "i": 3}
    want = {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": 0.25}, "e": None, "f": "NaN", "g": None,
            "h": True, "i": 3}
    assert sanitize(obj) == want
    assert loads_strict(dumps(obj)) == want
    np = pytest.importorskip("numpy")
    assert sanitize({"x": np.float32(0.5), "y": np.float64("nan")}) == {"x": 0.5, "y": None}


def test_print_line_is_one_strict_line():
    buf = io.StringIO()
    print_line({"x": float("nan"), "y": [1, 2]}, file=buf)
    assert buf.getvalue() == '{"x": null, "y": [1, 2]}\n'


def test_loads_strict_refuses_non_finite():
    for text in ('{"x": NaN}', "[Infinity]", "-Infinity"):
        with pytest.raises(ValueError, match="not strict JSON"):
            loads_strict(text)
    assert json.loads('{"x": NaN}')["x"] != 0  # what the default parser would have let through


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_fit_and_report_jobs_print_strict_json(tmp_path):
    """The fit job on a tiny configuration (5 scenes, one layer, 2 steps): its line has the
    baselines' undefined depth / shading Spearman, which must come out as null, not NaN."""
    out = tmp_path / "run"
    done = _run(["-m", "training.fit", "--scenes", "5", "--test-scenes", "2", "--layers", "dec4.0", "--steps", "2",
                 "--out", str(out), "--no-progress"])
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = strict_lines(done.stdout)
    assert line["bank"].endswith("bank.safetensors") and "baselines" in line and "best" in line
    assert line["baselines"]["depth/spearman"] is None  # undefined (a constant baseline): null, not NaN
    assert line["baselines"]["depth/rmse"] > 0
    done = _run(["-m", "training.report", "--run", str(out), "--no-figure4"])
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = strict_lines(done.stdout)
    assert line["report"].endswith("report.json")
