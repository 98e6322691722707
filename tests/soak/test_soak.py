"""Soak: the real daemon on a seconds-level schedule, under load and faults, then invariants.

One module-scoped run (``runner.run``) drives a real redis-server, SQLite and data
directories under write load, the daemon under a fake systemd with a seeded fault
schedule, then a last clean run and SIGTERM. Each test below checks one invariant of that
run, so each violation is reported on its own; the terminal summary prints the report.
CI runs the short default; by hand: ``pytest tests/soak --soak-seconds 3600``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
from _pytest.terminal import TerminalReporter

from tests.soak import outcome, runner

pytestmark = [pytest.mark.soak, pytest.mark.root]


@dataclass(frozen=True)
class Soak:
    """The soak run and the violations each invariant found in it."""

    run: runner.SoakRun
    results: dict[str, list[str]]

    def assert_holds(self, check: outcome.Check) -> None:
        """Fail with every violation *check* found, and the seed to replay it."""
        violations = self.results[check.__name__]
        assert not violations, f"seed {self.run.seed}:\n" + "\n".join(violations)


def _seed(config: pytest.Config) -> int:
    chosen = config.getoption("--soak-seed")
    if chosen is not None:
        return int(chosen)
    if text := os.environ.get(runner.SEED_ENV):
        return int(text)
    return random.SystemRandom().randrange(1 << 31)


@pytest.fixture(scope="module")
def soak(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Soak:
    """Run the soak once for the module; check every invariant; keep the report."""
    seconds = float(request.config.getoption("--soak-seconds"))
    seed = _seed(request.config)
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    if isinstance(terminal, TerminalReporter):
        terminal.write_line(f"\nsoak: seed {seed}, {seconds:g}s of faults")
    run = runner.run(tmp_path_factory.mktemp("soak"), seconds, seed)
    results = outcome.check_all(run)
    text = outcome.report(run, results)
    request.config.stash[outcome.REPORT] = text
    (run.layout.root / "report.txt").write_text(text + "\n")
    return Soak(run, results)


def test_every_final_archive_verifies_deeply_and_verify_all_reports_the_corrupted_one(
    soak: Soak,
) -> None:
    """Every archive under a final name passes verify --deep but the one the soak damaged."""
    soak.assert_holds(outcome.archives_verify)


def test_no_partial_or_staging_is_left_after_the_last_clean_run(soak: Soak) -> None:
    """After the faults a backup succeeds; one running at SIGTERM finishes; nothing half-made."""
    soak.assert_holds(outcome.clean_after_last_run)


def test_retention_keeps_exactly_what_policy_decide_computes(soak: Soak) -> None:
    """The disk holds what policy.decide keeps, of the final store and of every backup made."""
    soak.assert_holds(outcome.retention_exact)


def test_newest_backup_restores_and_passes_test_restore(soak: Soak) -> None:
    """Restore --latest --to DIR brings the newest backup back and test-restore passes it."""
    soak.assert_holds(outcome.newest_restores)


def test_every_failed_backup_is_counted_in_metrics_and_logged(soak: Soak) -> None:
    """backups_total{result="failure"}, summed over restarts, matches the failure events."""
    soak.assert_holds(outcome.failures_counted)


def test_daemon_rss_and_open_fds_do_not_grow(soak: Soak) -> None:
    """The longest-lived daemon ends with the RSS and fds it had after warm-up, within slack."""
    soak.assert_holds(outcome.resources_flat)


def test_no_child_process_or_redis_server_is_left_behind(soak: Soak) -> None:
    """After SIGTERM and the CLI checks no descendant or stray redis-server still runs."""
    soak.assert_holds(outcome.nothing_left_running)


def test_daemon_never_crashes_or_stalls_and_exits_0_on_sigterm(soak: Soak) -> None:
    """No daemon exits by itself, logs an error or traceback, or stops its watchdog pings."""
    soak.assert_holds(outcome.daemon_healthy)


def test_cli_backup_and_prune_beside_the_daemon_succeed_or_exit_75(soak: Soak) -> None:
    """Concurrent CLI commands either run or report the lock in one line with exit 75."""
    soak.assert_holds(outcome.cli_beside_daemon)


def test_every_fault_kind_was_injected_and_one_archive_corrupted(soak: Soak) -> None:
    """The schedule ran every kind of fault at least once and corrupted exactly one archive."""
    soak.assert_holds(outcome.faults_injected)


def test_sighup_reloads_a_valid_policy_and_refuses_an_invalid_one(soak: Soak) -> None:
    """Reloads show in the log and in config_last_reload_success; a bad policy changes nothing."""
    soak.assert_holds(outcome.reloads_behave)


def test_every_error_the_faults_provoke_names_what_failed_and_where(soak: Soak) -> None:
    """Errors in the daemon's log and on the CLI are complete: no empty or None parts."""
    soak.assert_holds(outcome.errors_say_what_and_where)
