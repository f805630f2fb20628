"""Make the repository importable without installing it (tests and spawned ranks alike), and
under MEGATRON_FSAM_STRICT_SKIPS=1 (tests/run.sh) fail the session on any skip that is not
GPU-only: a missing package or Megatron-LM copy must not leave CI green with tests unrun."""

import os
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

GPU_ONLY = "needs a CUDA device"  # how every GPU-only skip's reason starts
STRICT = os.environ.get("MEGATRON_FSAM_STRICT_SKIPS") == "1"
_unexpected: list[str] = []


def _skip_reason(report: pytest.TestReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(GPU_ONLY):
            _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _unexpected:
        verdict = "fail the run" if STRICT else "would fail tests/run.sh"
        terminalreporter.section(f"{len(_unexpected)} skips that are not GPU-only ({verdict})")
        for line in _unexpected:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if STRICT and _unexpected and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
