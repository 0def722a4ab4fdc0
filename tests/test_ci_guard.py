"""The CI skip guard (tests/ci_guard.py) on planted skips: a skipped test and a module skipped at
collection (as tests/test_kernels.py is when triton cannot be imported) fail the run under
CI=true and stay skips otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PLANTED = {
    "test_skips_inside.py": "import pytest\n\ndef test_kernel():\n    pytest.skip('no toolchain')\n\n"
                            "def test_other():\n    assert True\n",
    "test_skips_module.py": "import pytest\n\npytest.importorskip('a_module_that_is_not_there')\n\n"
                            "def test_kernel():\n    assert True\n",
}


def run(tmp_path: Path, ci: str | None, names=tuple(PLANTED)) -> subprocess.CompletedProcess:
    for name in names:
        (tmp_path / name).write_text(PLANTED[name])
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(HERE)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_guard", "-q", "-rA", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_skip_fails_the_run_in_ci(tmp_path, ci):
    done = run(tmp_path, ci, ["test_skips_inside.py"])
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed" in done.stdout, done.stdout
    assert "test_kernel was skipped under CI=true (Skipped: no toolchain)" in done.stdout


def test_a_module_skipped_at_collection_stops_the_run_in_ci(tmp_path):
    done = run(tmp_path, "true")
    assert done.returncode == 2, done.stdout  # a collection error: pytest stops before running anything
    assert "Interrupted: 1 error during collection" in done.stdout, done.stdout
    assert "test_skips_module.py was skipped under CI=true" in done.stdout and "a_module_that_is_not_there" in done.stdout


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_a_skip_stays_a_skip_elsewhere(tmp_path, ci):
    done = run(tmp_path, ci)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout, done.stdout
