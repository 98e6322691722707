"""The soak suite's options, its time limit, and its report in the terminal summary.

``--soak-seconds`` and ``--soak-seed`` are known when pytest is pointed at this
directory (``pytest tests/soak --soak-seconds 3600``); a plain ``pytest`` (CI) runs the
short default.
"""

from __future__ import annotations

import pytest
from _pytest.terminal import TerminalReporter

from tests.soak.outcome import REPORT
from tests.soak.runner import DEFAULT_SECONDS, SEED_ENV

# Beyond the fault phase: start-up, the last clean run, verify --deep, restore, test-restore.
ALLOWANCE_SECONDS = 300.0


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add --soak-seconds and --soak-seed."""
    group = parser.getgroup("soak", "soak and fault-injection suite (tests/soak)")
    group.addoption(
        "--soak-seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"how long the soak injects faults (default {DEFAULT_SECONDS:g}; e.g. 3600 by hand)",
    )
    group.addoption(
        "--soak-seed",
        type=int,
        default=None,
        help=f"seed of the fault schedule (default: ${SEED_ENV}, else a random one, printed)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give the soak's tests a time limit that grows with --soak-seconds."""
    seconds = float(config.getoption("--soak-seconds"))
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(seconds + ALLOWANCE_SECONDS))


def pytest_terminal_summary(terminalreporter: TerminalReporter, config: pytest.Config) -> None:
    """Print the soak's report after the tests, whatever their outcome."""
    text = config.stash.get(REPORT, None)
    if text is not None:
        terminalreporter.write_sep("=", "soak report")
        terminalreporter.write_line(text)
