"""Fault-injection suite: each test records what it injected; the session prints the table."""
from __future__ import annotations

import pytest

_RECORDS: list[dict] = []


@pytest.fixture
def record():
    def add(fault: str, runs_completed: int, samples_lost: int, outputs_differing: int) -> None:
        _RECORDS.append({"fault": fault, "runs_completed": runs_completed, "samples_lost": samples_lost,
                         "outputs_differing": outputs_differing})
    return add


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return
    w = terminalreporter
    w.section("reliability: faults injected")
    w.line(f"{'fault':<70}{'runs done':>10}{'lost':>7}{'differ':>8}")
    for r in _RECORDS:
        w.line(f"{r['fault']:<70}{r['runs_completed']:>10}{r['samples_lost']:>7}{r['outputs_differing']:>8}")
    w.line(f"{'total':<70}{sum(r['runs_completed'] for r in _RECORDS):>10}"
           f"{sum(r['samples_lost'] for r in _RECORDS):>7}{sum(r['outputs_differing'] for r in _RECORDS):>8}")
