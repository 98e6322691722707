"""The long-running daemon: lifecycle, signals, reload and watchdog.

The only module that imports sdnotify. The main thread waits for signals and pings the
watchdog; APScheduler's threads run the backups through :func:`sovbackupd.backup.run`,
the same code path as ``sovbackupd backup``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import sdnotify
import structlog
from prometheus_client import CollectorRegistry

from sovbackupd import (
    backup,
    config,
    exposition,
    replicate,
    restore,
    retention,
    scheduler,
    tierstate,
)
from sovbackupd.config.models import Policy
from sovbackupd.errors import AbortedError, ConfigError, SovbackupdError
from sovbackupd.metrics import Metrics
from sovbackupd.store import Store, StoredBackup
from sovbackupd.tierstate import TierRecord

log = structlog.get_logger("sovbackupd.daemon")
STATUS_SECONDS = 30.0  # how often STATUS= and next-run metrics are refreshed at the least
HEARTBEAT_SECONDS = 5.0
ABORT_WAIT_SECONDS = 60.0  # after cancelling a backup, how long its cleanup may take
TEST_RESTORE_JOB = "test-restore"
WAKE_READ_BYTES = 65536


def _schedules(policy: Policy) -> dict[str, str]:
    return {
        name: tier.schedule
        for name, tier in policy.tiers.configured().items()
        if tier.schedule is not None
    }


def _tier_records(policy: Policy, stored: Sequence[StoredBackup]) -> dict[str, TierRecord]:
    """Return each tier's last attempt and success: the state file, completed by *stored*."""
    heads = [head for backup in stored if (head := backup.head()) is not None]
    return tierstate.known(policy.backup_dir, heads, datetime.now(UTC))


def _listen_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Waker:
    """Wakes the main loop from a signal handler or another thread, taking no lock.

    A ``threading.Event`` cannot be set from a signal handler: the handler runs in the
    main thread, and when the signal lands while that thread is inside the Event's own
    lock (in ``wait()`` or ``clear()``), ``set()`` waits for that lock for ever. A storm
    of SIGHUPs did that to the daemon. A byte written to a socket pair takes no lock.
    """

    def __init__(self) -> None:
        """Open the socket pair, both ends non-blocking."""
        self._reader, self._writer = socket.socketpair()
        for end in (self._reader, self._writer):
            end.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._reader, select.POLLIN)

    def wake(self) -> None:
        """Make the current or next :meth:`wait` return at once."""
        # A full buffer holds wake-ups enough: the loop wakes all the same.
        with contextlib.suppress(BlockingIOError):
            self._writer.send(b"x")

    def wait(self, timeout: float) -> None:
        """Return after *timeout* seconds, or as soon as :meth:`wake` was called."""
        if self._poller.poll(timeout * 1000):
            # One read, not a drain: a flood of signals cannot keep the loop here. A
            # wake-up left over only makes the next wait return at once.
            with contextlib.suppress(BlockingIOError):
                self._reader.recv(WAKE_READ_BYTES)


class Daemon:
    """One policy file, scheduled, observed and reloadable."""

    def __init__(self, config_path: Path, policy: Policy, registry: CollectorRegistry) -> None:
        """Serve *policy*, loaded from *config_path*, with metrics on *registry*."""
        self._config_path = config_path
        self._policy = policy
        self._metrics = Metrics(registry)
        self._registry = registry
        self._notifier = sdnotify.SystemdNotifier()
        self._wake = Waker()
        self._stop_requested = False
        self._reload_requested = False
        self._idle = threading.Event()  # set while no backup runs
        self._idle.set()
        self._cancel: threading.Event | None = None
        self._work = threading.Lock()  # backups and test restores take turns
        self._replicating = threading.Lock()  # one pass over the remotes at a time
        self._shutdown = threading.Event()  # stops a pass over the remotes between uploads
        self._heartbeat = time.monotonic()
        self._scheduler = scheduler.Scheduler(self._backup, policy.zone)

    def _notify(self, *lines: str) -> None:
        self._notifier.notify("\n".join(lines))

    def _exclusive(self, work: Callable[[Policy, threading.Event], object], crashed: str) -> None:
        """Run *work* alone, cancellable by shutdown and bounded by the backup timeout.

        Backups and test restores take turns: both hold the backup directory's lock.
        """
        with self._work:
            policy = self._policy  # a reload during the run does not change this run
            cancel = threading.Event()
            bound = threading.Timer(policy.daemon.backup_timeout_seconds, cancel.set)
            bound.daemon = True
            self._cancel = cancel
            self._idle.clear()
            if self._stop_requested:
                # SIGTERM came between the scheduler's last look and now; the shutdown may
                # already have seen us idle, so starting would escape its grace.
                self._idle.set()
                return
            bound.start()
            try:
                work(policy, cancel)
            except SovbackupdError:
                pass  # the core logged its summary event with the error and counted it
            except Exception:
                log.exception(crashed)
            finally:
                bound.cancel()
                self._cancel = None
                self._idle.set()
                self._wake.wake()  # refresh STATUS= and the next-run metrics now

    def _backup(self, tiers: list[str]) -> None:
        """Run one backup of *tiers*, then copy it off-site on another worker."""
        self._exclusive(
            lambda policy, cancel: self._backup_and_report(policy, tiers, cancel),
            "backup.crashed",
        )
        if self._policy.remotes and not self._stop_requested:
            self._scheduler.submit(self._replicate)

    def _backup_and_report(self, policy: Policy, tiers: list[str], cancel: threading.Event) -> None:
        """Run the backup; log as warnings what its retention could not do."""
        result = backup.run(policy, tiers, cancel=cancel, metrics=self._metrics)
        if result.retention is None:
            return  # retention.failed is logged
        decided = result.retention.plan
        if decided.held is not None:
            log.warning("retention.held", reason=decided.held)
        for name, problem in decided.pin_problems.items():
            log.warning("retention.pin_unreadable", backup=name, problem=problem)

    def _replicate(self) -> None:
        """Bring every remote up to date; passes queue up rather than overlap."""
        with self._replicating:
            try:
                reports = replicate.run(self._policy, metrics=self._metrics, cancel=self._shutdown)
            except SovbackupdError as error:
                log.info("remote.pass_stopped", reason=str(error))
                return
            except Exception:
                log.exception("remote.crashed")
                return
        for report in reports:
            if not report.ok:
                log.warning("remote.pass_failed", remote=report.remote, failures=report.failures)

    def _test_restore(self) -> None:
        """Run the scheduled test restore of the newest backup."""
        self._exclusive(self._drill, "test_restore.crashed")

    def _drill(self, policy: Policy, cancel: threading.Event) -> None:
        """Test-restore the newest backup; whatever stops it but a shutdown is a failed drill.

        The failed-test-restore alert keys on restore_test_last_result: a drill that
        cannot find a backup, take the lock or run at all must set it to 0, not leave it.
        """
        try:
            restore.drill(policy, cancel=cancel, metrics=self._metrics)
        except AbortedError:
            raise
        except Exception as error:  # recorded as the drill's failure, with its message
            restore.record_failure(policy, None, error, self._metrics)

    def _refresh(self) -> None:
        """Update next-run metrics and STATUS=, and ping the watchdog if all is well."""
        next_runs = self._scheduler.next_runs()
        for tier, moment in next_runs.items():
            self._metrics.next_run.labels(tier=tier).set(moment.timestamp() if moment else 0)
        for tier, gap in self._scheduler.intervals().items():
            if gap is None:
                self._metrics.tier_interval.remove(tier)
            else:
                self._metrics.tier_interval.labels(tier=tier).set(gap.total_seconds())
        upcoming = sorted((moment, tier) for tier, moment in next_runs.items() if moment)
        if not self._idle.is_set():
            status = "backup running"
        elif upcoming:
            first = upcoming[0][0]
            tiers = ",".join(tier for moment, tier in upcoming if moment == first)
            status = f"next backup: {tiers} at {first.isoformat()}"
        else:
            status = "no tier is scheduled"
        self._notify(f"STATUS={status}")

    def _watchdog(self) -> None:
        """Ping the watchdog only while the scheduler runs and its housekeeping thread beats."""
        beating = time.monotonic() - self._heartbeat < 3 * HEARTBEAT_SECONDS
        if self._scheduler.alive() and beating:
            self._notify("WATCHDOG=1")
        else:
            log.error("daemon.unhealthy", scheduler_alive=self._scheduler.alive(), beating=beating)

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()

    def _housekeeping(self) -> None:
        self._metrics.refresh_disk(self._policy.backup_dir)

    def _reload(self) -> None:
        """Load the policy file again and serve it; on any failure keep the old policy.

        A reload never stops the daemon: whatever goes wrong, from an invalid file to a
        bug, is logged as ``config.reload_failed`` and the running policy stays.
        """
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        try:
            self._apply(config.load(self._config_path, check_files=True))
        except ConfigError as error:
            self._reload_failed(list(error.problems or (str(error),)))
        except SovbackupdError as error:  # the new backup_dir cannot be read, say
            self._reload_failed([str(error)])
        except Exception as error:
            # A bug rather than a bad file: log its traceback, and go on serving.
            self._reload_failed([f"unexpected {type(error).__name__}: {error}"], exc_info=True)
        else:
            self._metrics.reloaded(success=True)
            log.info("config.reloaded", path=str(self._config_path))
        self._refresh()  # before READY=1: then STATUS= and next-run metrics show the new policy
        self._notify("READY=1")

    def _reload_failed(self, problems: list[str], *, exc_info: bool = False) -> None:
        self._metrics.reloaded(success=False)
        log.error(
            "config.reload_failed",
            path=str(self._config_path),
            problems=problems,
            exc_info=exc_info,
        )

    def _apply(self, policy: Policy) -> None:
        """Make *policy* the daemon's: its metrics from disk, then its schedules.

        The disk is read first, so that a backup_dir that cannot be read fails the reload
        before anything was rescheduled.
        """
        if policy.metrics.listen != self._policy.metrics.listen:
            log.warning("config.restart_needed", key="metrics.listen")
        self._metrics_from_disk(policy)
        self._scheduler.reschedule(_schedules(policy), policy.zone)
        self._scheduler.cron(policy.test_restore.schedule, self._test_restore, TEST_RESTORE_JOB)
        self._policy = policy

    def _metrics_from_disk(self, policy: Policy) -> dict[str, TierRecord]:
        """Declare the policy's series and set what the backup directory already says.

        The size guard is read from disk too: a restart must not clear a held retention.
        Everything is read before any metric changes. Return the tiers' last attempts and
        successes read on the way.
        """
        stored = Store(policy.backup_dir, policy.name_prefix).backups()
        records = _tier_records(policy, stored)
        held = retention.size_guard(policy, stored, retention.candidates(stored), datetime.now(UTC))
        self._metrics.declare_tiers(_schedules(policy))
        self._metrics.declare_remotes(remote.name for remote in policy.remotes)
        self._metrics.rebuild(stored, records)
        self._metrics.retention_held.set(1 if held else 0)
        return records

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = True
        self._wake.wake()

    def serve(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code."""
        policy = self._policy
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self._metrics.reloaded(success=True)
        records = self._metrics_from_disk(policy)
        self._metrics.refresh_disk(policy.backup_dir)
        previous = restore.last_drill(policy)
        if previous is not None:
            self._metrics.restore_tested(previous.ok, previous.last_success)
        server = None
        if policy.metrics.listen is not None:
            host, port = _listen_address(policy.metrics.listen)
            try:
                server = exposition.MetricsServer(self._registry, host, port)
            except OSError as error:
                raise SovbackupdError(
                    f"cannot serve metrics on {policy.metrics.listen}: {error.strerror}"
                ) from error
        if server is not None:
            server.start()
        self._scheduler.start(
            _schedules(policy),
            {tier: record.last_success for tier, record in records.items()},
            scheduler.Timing(policy.workers, policy.daemon.misfire_grace_seconds),
        )
        self._scheduler.cron(policy.test_restore.schedule, self._test_restore, TEST_RESTORE_JOB)
        if policy.remotes:
            self._scheduler.submit(self._replicate)  # uploads what a stopped daemon missed
        self._scheduler.every(HEARTBEAT_SECONDS, self._beat, "heartbeat")
        self._scheduler.every(policy.daemon.disk_refresh_seconds, self._housekeeping, "disk")
        log.info("daemon.started", config=str(self._config_path), metrics=policy.metrics.listen)
        self._refresh()  # before READY=1: then STATUS= and next-run metrics are already there
        self._notify("READY=1")
        try:
            self._loop()
        finally:
            self._notify("STOPPING=1")
            log.info("daemon.stopping")
            self._shutdown.set()
            self._scheduler.shutdown()
            self._finish_running_backup()
            if server is not None:
                server.shutdown()
        log.info("daemon.stopped")
        return 0

    def _loop(self) -> None:
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        interval = STATUS_SECONDS
        if watchdog_usec:
            interval = min(interval, watchdog_usec / 2_000_000)
        while not self._stop_requested:
            self._wake.wait(interval)
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            else:
                self._refresh()
            if watchdog_usec:
                self._watchdog()

    def _finish_running_backup(self) -> None:
        """Give a running backup its grace to finish, then abort it cleanly."""
        grace = self._policy.daemon.shutdown_grace_seconds
        if self._idle.is_set():
            return
        log.info("daemon.waiting_for_backup", grace_seconds=grace)
        self._notify(f"STATUS=stopping: waiting {grace:g}s at most for the running backup")
        if self._idle.wait(grace):
            return
        cancel = self._cancel
        if cancel is not None:
            log.warning("backup.aborting", reason="shutdown grace exceeded")
            cancel.set()
        self._idle.wait(ABORT_WAIT_SECONDS)


def run(config_path: Path) -> int:
    """Load the policy at *config_path* and serve it until stopped; return the exit code."""
    policy = config.load(config_path, check_files=True)
    return Daemon(config_path, policy, CollectorRegistry()).serve()
