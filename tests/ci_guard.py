"""Under CI=true a skipped test fails the run.

Every test file of this suite tests a part the README names (the Triton kernel, the services,
the jobs…), and CI is the only place where a missing dependency or toolchain would otherwise
turn a claim into a quiet "s" in the summary. Locally a skip stays a skip (-ra lists it).

tests/conftest.py imports these hooks; tests/test_ci_guard.py runs them on a planted skip.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = f"{what} was skipped under CI=true ({_reason(report.longrepr)}): in CI a skip is a failure"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:  # e.g. a module-level pytest.importorskip("triton")
        _fail(report, collector.nodeid)
