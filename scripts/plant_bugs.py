"""Plant one bug of each kind the suite claims to catch, run the tests that claim it, report.

Each mutant is a one-line edit of a committed file (the bug) and the tests that must fail on it.
They run one at a time in a throw-away git worktree of HEAD (this checkout is never touched; the
venv and the inductor cache are shared), the edit undone before the next. Prints one JSON line
per mutant — {"mutant", "file", "tests", "caught": the tests failed, "failed": which, "wall_s"} —
and exits 1 if any mutant survived. A mutant whose edit no longer applies (the code moved) is
reported `"applied": false` and counts as a survivor: update the mutant, do not drop it.

    .venv/bin/python scripts/plant_bugs.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("probe_wrong_cfg_half", "probe service captures both CFG halves and reads row i: the unconditional half",
           "ldmprobe/serve/probe.py", "pad_to=padded, keep_padding=self.batch_invariant)",
           'pad_to=padded, keep_padding=self.batch_invariant, half="both")',
           ("tests/test_serve.py::test_served_maps_equal_the_librarys",)),
    Mutant("probe_wrong_bank_step", "probe service applies step 1's probes at step 0",
           "ldmprobe/serve/probe.py", "j = active[0][1].bank_steps[step.index]  #",
           "j = active[0][1].bank_steps[step.index] if step.index else 1  #",
           ("tests/test_serve.py::test_served_maps_equal_the_librarys",)),
    Mutant("classify_wrong_decode", "classify service decodes the predicted x0 when asked for the latents",
           "ldmprobe/serve/classify.py", "decode=first.decode,", 'decode="x0",',
           ("tests/test_serve_classify.py::test_served_generation_equals_the_librarys",)),
    Mutant("intervene_one_iteration_short", "intervene service runs one Adam iteration fewer than asked",
           "ldmprobe/serve/intervene.py", "job.request.seed, job.spec, job.request.settings())",
           "job.request.seed, __import__('dataclasses').replace(job.spec, iterations=job.spec.iterations - 1), "
           "job.request.settings())",
           ("tests/test_serve_intervene.py::test_served_intervention_equals_the_librarys",)),
    Mutant("intervene_zero_shift_shortcut", "the optimiser skips its loop when the target is the row's own output",
           "ldmprobe/intervene/optimisation.py", "for k in range(1, int(iterations) + 1):",
           "for k in range(1, (0 if all(m.own is not None for m in members) else int(iterations)) + 1):",
           ("tests/test_intervene.py::test_zero_shift_leaves_the_image_unchanged",)),
    Mutant("intervene_circular_measure", "the next step's representation is read from the optimiser's tensors",
           "ldmprobe/intervene/run.py", "unedited, {la: acts[la][1] for la in layers})\n            if index in steps:",
           "unedited, {la: edit_record[3][la] for la in layers})\n            if index in steps:",
           ("tests/test_intervene.py::test_representation_on_a_fresh_forward_pass",)),
    Mutant("serve_returns_before_ready", "make serve returns before the workers are ready",
           "scripts/serve.sh", 'wait_ready "$pid" || { stop; return 1; }', "true",
           ("tests/test_make_serve.py",)),
    Mutant("bench_extra_stdout_line", "a bench prints a progress line on stdout beside its JSON line",
           "bench/probe_heads.py", "def main() -> None:\n", 'def main() -> None:\n    print("probe heads: starting")\n',
           ("tests/test_bench_quick.py::test_bench_quick_prints_one_strict_json_line[probe_heads]",)),
    Mutant("ci_guard_off", "the CI guard no longer sees CI=true (skips pass silently)",
           "tests/ci_guard.py", 'return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")',
           "return False", ("tests/test_ci_guard.py",)),
)


def worktree() -> Path:
    """A detached worktree of HEAD beside nothing of ours, the venv linked in."""
    path = Path(tempfile.mkdtemp(prefix="ldmprobe-mutants-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), "HEAD"], cwd=ROOT, check=True,
                   capture_output=True)
    (path / ".venv").symlink_to(ROOT / ".venv")
    return path


def run_mutant(tree: Path, m: Mutant) -> dict:
    target = tree / m.file
    text = target.read_text()
    record = {"mutant": m.name, "what": m.what, "file": m.file, "tests": list(m.tests)}
    if text.count(m.old) != 1:
        return record | {"applied": False, "caught": False, "failed": [], "wall_s": 0.0}
    target.write_text(text.replace(m.old, m.new))
    env = os.environ | {"PYTHONPATH": str(tree), "CI": "true", "HF_HUB_OFFLINE": "1",
                        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                                                  str(ROOT / ".cache" / "inductor"))}
    started = time.monotonic()
    try:
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-x", *m.tests], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        target.write_text(text)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)))
    return record | {"applied": True, "caught": done.returncode != 0 and bool(failed), "failed": failed,
                     "pytest_rc": done.returncode, "wall_s": round(time.monotonic() - started, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run these mutants only (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit (default: off)")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.what} ({m.file}) → {' '.join(m.tests)}")
        return 0
    if not chosen:
        p.error(f"--only: no such mutant; known: {', '.join(m.name for m in MUTANTS)}")
    tree = worktree()
    survivors = 0
    try:
        for m in chosen:
            record = run_mutant(tree, m)
            survivors += not record["caught"]
            print(json.dumps(record), flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
