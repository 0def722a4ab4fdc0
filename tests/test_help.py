"""Every option of the training jobs and benches has a help line that states its default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
JOBS = ["training.fit", "training.report"]
# training/scenes.py is the lead's file: its --max-objects and --no-progress lack help for now
# (strict: this fails once they have it, so the mark is removed then).
PENDING = {"training.scenes": "scenes.py's --max-objects / --no-progress have no help yet (the lead's file)"}


def options_help(text: str) -> dict[str, str]:
    """{option strings: help text} from argparse's --help output (wrapped lines joined)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current and re.match(r"^\s{3,}\S", line):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


def test_options_help_parser():
    text = ("usage: x [-h] [--a A]\n\noptions:\n  -h, --help   show this help message and exit\n"
            "  --alpha-long-name ALPHA_LONG_NAME\n               first line\n               (default: 3)\n"
            "  --b B        b help (default: x)\n  --flag\n")
    assert options_help(text) == {"-h, --help": "show this help message and exit",
                                  "--alpha-long-name ALPHA_LONG_NAME": "first line (default: 3)",
                                  "--b B": "b help (default: x)", "--flag": ""}


def _help(args: list[str]) -> str:
    env = dict(os.environ, COLUMNS="100", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _check(text: str) -> None:
    entries = {k: v for k, v in options_help(text).items() if k != "-h, --help"}
    assert entries, text
    missing = [k for k, v in entries.items() if not v]
    assert not missing, f"options without help: {missing}"
    silent = [k for k, v in entries.items() if not re.search(r"\bdefault\b|\brequired\b", v, re.I)]
    assert not silent, f"help that does not state the default: {silent}"


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_help_states_defaults(bench):
    _check(_help([str(ROOT / "bench" / bench)]))


@pytest.mark.parametrize("job", JOBS + [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=v))
                                        for k, v in PENDING.items()])
def test_job_help_states_defaults(job):
    _check(_help(["-m", job]))
