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


def _jobs() -> list[str]:
    """The training jobs: modules with a command line (argparse + __main__) and runnable packages."""
    mods = [f"training.{p.stem}" for p in (ROOT / "training").glob("*.py")
            if "argparse" in (text := p.read_text()) and "__main__" in text]
    pkgs = [f"training.{p.parent.name}" for p in (ROOT / "training").glob("*/__main__.py")]
    return sorted(mods + pkgs)


JOBS = _jobs()
# training/scenes.py is the lead's file: its --max-objects and --no-progress lack help for now
# (strict: this fails once they have it, so the mark is removed then).
PENDING: dict[str, str] = {}  # job → why its help is not complete yet (strict xfail)


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


def subcommands(text: str) -> list[str]:
    """The {a,b,c} subcommands listed under positional arguments, if any."""
    m = re.search(r"^positional arguments:\n  \{([\w,-]+)\}", text, re.M)
    return m.group(1).split(",") if m else []


def _required(text: str) -> set[str]:
    """Options shown without brackets in the usage (required ones: no default to state)."""
    usage = text.split("\n\n")[0]
    flags = {m.group(1) for m in re.finditer(r"(?<![\[\w-])(--[\w-]+)", usage)}
    return {f for f in flags if f"[{f}" not in usage and f"| {f}" not in usage}  # not optional, nor in a group


def _check(text: str) -> None:
    entries = {k: v for k, v in options_help(text).items() if k != "-h, --help"}
    missing = [k for k, v in entries.items() if not v]
    assert not missing, f"options without help: {missing}"
    required = _required(text)
    silent = [k for k, v in entries.items() if not re.search(r"\bdefault\b|\brequired\b", v, re.I)
              and not any(flag.strip(",") in required for flag in k.split())]
    assert not silent, f"help that does not state the default: {silent}"


def test_required_options_are_read_from_the_usage():
    usage = "usage: x [-h] --run RUN [--out OUT]\n         [--a A | --b B]\n         --to TO\n\nopts"
    assert _required(usage) == {"--run", "--to"}
    assert subcommands("usage: x\n\npositional arguments:\n  {train,ship}\n") == ["train", "ship"]


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_help_states_defaults(bench):
    text = _help([str(ROOT / "bench" / bench)])
    assert options_help(text).keys() - {"-h, --help"}, text
    _check(text)


@pytest.mark.parametrize("job", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=PENDING[k]))
                                 if k in PENDING else k for k in JOBS])
def test_job_help_states_defaults(job):
    text = _help(["-m", job])
    subs = subcommands(text)
    assert subs or options_help(text).keys() - {"-h, --help"}, text
    _check(text)
    for sub in subs:
        _check(_help(["-m", job, sub]))
