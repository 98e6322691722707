"""The fault schedule: seeded, every kind at least once, one corrupted archive.

Faults run one after the other; each leaves things as it found them (Redis up, the disk
freed, SQLite unlocked, the valid policy loaded, a daemon running), so that the next one
starts from a working server, as in production between two incidents.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sovbackupd.archive import sidecar_path
from sovbackupd.errors import ExitCode
from sovbackupd.store import Store
from tests.integration.test_daemon import scrape
from tests.soak.harness import CliRun, Daemons, finish_cli, run_cli, start_cli, wait_event
from tests.soak.services import Load, RedisService, SqliteLock, Tmpfs

REDIS_KILL = "redis killed mid-BGSAVE"
REDIS_STOP = "redis stopped, then started"
SQLITE_LOCK = "sqlite locked EXCLUSIVE"
DISK_FULL = "backup disk filled, then freed"
SIGHUP_VALID = "SIGHUP with a changed valid policy"
SIGHUP_INVALID = "SIGHUP with an invalid policy, then the valid one"
DAEMON_KILL = "daemon kill -9, then restarted"
CLI_CONCURRENT = "CLI backup and prune beside the daemon"
CORRUPT = "stored archive corrupted"
REPEATABLE = (
    REDIS_KILL,
    REDIS_STOP,
    SQLITE_LOCK,
    DISK_FULL,
    SIGHUP_VALID,
    SIGHUP_INVALID,
    DAEMON_KILL,
    CLI_CONCURRENT,
)
ALL_KINDS = (*REPEATABLE, CORRUPT)
# Rough seconds each fault takes, gap after it included: how many fit in the soak.
ESTIMATES = {
    REDIS_KILL: 8.0,
    REDIS_STOP: 10.0,
    SQLITE_LOCK: 9.0,
    DISK_FULL: 10.0,
    SIGHUP_VALID: 4.0,
    SIGHUP_INVALID: 9.0,
    DAEMON_KILL: 10.0,
    CLI_CONCURRENT: 8.0,
    CORRUPT: 3.0,
}
KILLS_PER_SECONDS = 100.0  # at most one kill -9 per this many seconds: instances live long
SHORT_SOAK_SECONDS = 300.0
EARLY_POSITIONS = 3
EVENT_SECONDS = 20.0  # longest wait for an event that the schedule makes due in seconds
DISK_LEFT_BYTES = 16 << 10
CORRUPTED_BYTES = 64
GAP_SECONDS = (1.0, 4.0)


def plan(rng: random.Random, seconds: float) -> list[str]:
    """Return the faults in order: every kind once (shuffled), then repeats.

    The repeats would take about twice *seconds*: the soak stops drawing from them when its
    time is up, however long each fault really took.
    """
    mandatory = list(ALL_KINDS)
    rng.shuffle(mandatory)
    if seconds < SHORT_SOAK_SECONDS:
        # The daemon started after the kill must outlive its memory warm-up by a good margin
        # for the RSS and fd trend (invariant 6): in a short soak the kill comes early.
        mandatory.remove(DAEMON_KILL)
        mandatory.insert(rng.randrange(EARLY_POSITIONS), DAEMON_KILL)
    budget = 2 * seconds - sum(ESTIMATES[kind] for kind in mandatory)
    kills = 1
    extras: list[str] = []
    while budget > 0:
        kind = rng.choice(REPEATABLE)
        if kind == DAEMON_KILL:
            if kills >= max(1, int(seconds // KILLS_PER_SECONDS)):
                continue
            kills += 1
        extras.append(kind)
        budget -= ESTIMATES[kind]
    return mandatory + extras


@dataclass
class PolicyFile:
    """The daemon's policy file: valid variants that differ only in schedules, or broken."""

    path: Path
    base: dict[str, Any]
    variant: int = 0

    def data(self, variant: int) -> dict[str, Any]:
        """Return valid variant *variant*: retention rules never change, schedules do."""
        data = copy.deepcopy(self.base)
        if variant == 1:
            data["tiers"]["hourly"]["schedule"] = "*/4 * * * * *"
            data["sources"]["exclude"] = ["*.tmp", "*.log"]
            data["test_restore"] = {"schedule": "*/17 * * * * *"}
        return data

    def write_valid(self, variant: int) -> None:
        """Write valid variant *variant* atomically."""
        self.variant = variant
        self._write(self.data(variant))

    def write_invalid(self) -> None:
        """Write a policy with an unknown key and a negative keep count."""
        data = self.data(self.variant)
        data["tiers"]["hourly"]["keep"] = -3
        data["retention_days"] = 7
        self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        temporary = self.path.with_name(self.path.name + ".new")
        temporary.write_text(yaml.safe_dump(data, sort_keys=False))
        temporary.replace(self.path)


@dataclass
class FaultRecord:
    """One fault as injected: when, how long, and what it did."""

    kind: str
    started: float
    duration: float = 0.0
    detail: str = ""


@dataclass
class Faults:
    """Everything a fault acts on, and what the faults recorded."""

    rng: random.Random
    daemons: Daemons
    redis: RedisService
    disk: Tmpfs
    database: Path
    policy: PolicyFile
    store: Store
    cli_mark: str
    sqlite_load: Load
    records: list[FaultRecord] = field(default_factory=list)
    cli_runs: list[CliRun] = field(default_factory=list)
    full_disk_drills: list[CliRun] = field(default_factory=list)
    corrupted: str | None = None
    problems: list[str] = field(default_factory=list)  # the harness could not do its part
    observations: list[str] = field(default_factory=list)  # a fault without its due effect

    def inject(self, kind: str) -> FaultRecord:
        """Inject one fault of *kind*; return its record."""
        injectors: dict[str, Callable[[], str]] = {
            REDIS_KILL: self._redis_kill,
            REDIS_STOP: self._redis_stop,
            SQLITE_LOCK: self._sqlite_lock,
            DISK_FULL: self._disk_full,
            SIGHUP_VALID: self._sighup_valid,
            SIGHUP_INVALID: self._sighup_invalid,
            DAEMON_KILL: self._daemon_kill,
            CLI_CONCURRENT: self._cli_concurrent,
            CORRUPT: self._corrupt,
        }
        record = FaultRecord(kind, time.time())
        try:
            record.detail = injectors[kind]()
        except Exception as error:
            record.detail = f"harness error: {type(error).__name__}: {error}"
            self.problems.append(f"{kind}: {record.detail}")
        finally:
            record.duration = time.time() - record.started
            self.records.append(record)
        return record

    # --- helpers ---------------------------------------------------------------------

    def _wait_backup_started(self) -> tuple[int, dict[str, Any] | None]:
        """Wait for the current daemon's next backup.started; return its index and event."""
        daemon = self.daemons.current.daemon
        mark = daemon.mark()
        event = wait_event(daemon, "backup.started", mark, EVENT_SECONDS)
        index = daemon.index_of(event) if event is not None else mark
        return index, event

    def _outcome_after(self, start: int) -> str:
        """Describe the first backup result the current daemon logs from *start* on."""
        event = wait_event(self.daemons.current.daemon, "backup.finished", start, EVENT_SECONDS)
        if event is None:
            return "no backup finished"
        if event.get("result") == "success":
            return "the backup succeeded"
        return f"the backup failed: {event.get('error')}"

    def _failures_since(self, start: int) -> int:
        return len(self.daemons.current.daemon.named("backup.finished", start, result="failure"))

    def _reload_success(self) -> float | None:
        try:
            return scrape(self.daemons.listen).value("sovbackupd_config_last_reload_success")
        except (OSError, urllib.error.URLError, AssertionError):
            return None

    def _sighup(self, expected: str, what: str) -> int | None:
        """Send SIGHUP; return the index of the *expected* reload event, None if none came."""
        daemon = self.daemons.current.daemon
        mark = daemon.mark()
        daemon.send(signal.SIGHUP)
        event = wait_event(daemon, expected, mark, EVENT_SECONDS)
        if event is None:
            self.observations.append(f"{what}: no {expected} event within {EVENT_SECONDS:g}s")
            return None
        wanted = 1.0 if expected == "config.reloaded" else 0.0
        # The metric is set just before the event is logged: it shows the result already.
        if (value := self._reload_success()) != wanted:
            self.observations.append(
                f"{what}: config_last_reload_success is {value} after {expected}, not {wanted:g}"
            )
        return daemon.index_of(event)

    # --- the faults ------------------------------------------------------------------

    def _redis_kill(self) -> str:
        index, started = self._wait_backup_started()
        deadline = time.monotonic() + 3.0
        saving = False
        while time.monotonic() < deadline and not (saving := self.redis.saving()):
            time.sleep(0.005)
        self.redis.kill()
        down = self.rng.uniform(0.5, 3.0)
        time.sleep(down)
        self.redis.start()
        when = "during its BGSAVE" if saving else "(no BGSAVE seen in progress)"
        name = started.get("backup") if started else "no backup"
        return f"killed {when} of {name}, restarted after {down:.1f}s; {self._outcome_after(index)}"

    def _redis_stop(self) -> str:
        mark = self.daemons.current.daemon.mark()
        self.redis.stop()
        down = self.rng.uniform(4.0, 9.0)
        time.sleep(down)
        self.redis.start()
        return f"down {down:.1f}s; {self._failures_since(mark)} backups failed meanwhile"

    def _sqlite_lock(self) -> str:
        mark = self.daemons.current.daemon.mark()
        # In WAL mode an open connection keeps a shared lock on the file, which an exclusive
        # locking-mode transaction must wait out: the writer lets go, then meets the lock.
        self.sqlite_load.suspend()
        try:
            held = SqliteLock.take(self.database)
        finally:
            self.sqlite_load.resume()
        hold = self.rng.uniform(4.0, 8.0)
        try:
            time.sleep(hold)
        finally:
            held.release()
        return f"held {hold:.1f}s; {self._failures_since(mark)} backups failed meanwhile"

    def _disk_full(self) -> str:
        during = self.rng.random() < 0.5
        mark = self.daemons.current.daemon.mark()
        if during:
            self._wait_backup_started()
        hold = self.rng.uniform(4.0, 8.0)
        began = time.monotonic()
        try:
            ballast = self.disk.fill(DISK_LEFT_BYTES)
            drill = self._drill_on_full_disk(began + hold)
            time.sleep(max(0.0, began + hold - time.monotonic()))
        finally:
            self.disk.release()
        when = "during a backup" if during else "between backups"
        drilled = (
            f"test-restore exit {drill.returncode}" if drill else "no test-restore got the lock"
        )
        return (
            f"filled {when} ({ballast >> 20} MiB ballast), freed after {hold:.1f}s; "
            f"{self._failures_since(mark)} backups failed meanwhile; {drilled}"
        )

    def _drill_on_full_disk(self, until: float) -> CliRun | None:
        """Run the CLI test-restore while the disk is full, retrying while the lock is held."""
        while time.monotonic() < until:
            drill = run_cli(self.policy.path, self.cli_mark, "test-restore", "--latest")
            if drill.returncode != ExitCode.TEMPFAIL:
                self.full_disk_drills.append(drill)
                return drill
            time.sleep(0.3)
        return None

    def _sighup_valid(self) -> str:
        variant = 1 - self.policy.variant
        self.policy.write_valid(variant)
        self._sighup("config.reloaded", "SIGHUP with a valid policy")
        return f"policy variant {variant} (schedules and excludes changed)"

    def _sighup_invalid(self) -> str:
        self.policy.write_invalid()
        try:
            refused = self._sighup("config.reload_failed", "SIGHUP with an invalid policy")
            kept_on = "unknown"
            if refused is not None:
                after = wait_event(
                    self.daemons.current.daemon, "backup.finished", refused + 1, EVENT_SECONDS
                )
                kept_on = "yes" if after is not None else "no"
                if after is None:
                    self.observations.append(
                        "SIGHUP with an invalid policy: no backup ran on the old policy "
                        f"within {EVENT_SECONDS:g}s"
                    )
        finally:
            self.policy.write_valid(self.policy.variant)
        self._sighup("config.reloaded", "SIGHUP with the valid policy again")
        return f"refused, old policy kept scheduling: {kept_on}; valid policy reloaded"

    def _daemon_kill(self) -> str:
        instance = self.daemons.current
        index, started = self._wait_backup_started()
        delay = self.rng.uniform(0.0, 0.4)  # a backup takes about half a second
        with self.daemons.lock:
            # Right after backup.started no failure can be in flight: this scrape is exact.
            self.daemons.scrape_failures(instance, terminal=started is not None)
            time.sleep(delay)
            self.daemons.kill(instance)
        finished = instance.daemon.named("backup.finished", index)
        state = "after it finished" if finished else "mid-backup"
        name = started.get("backup") if started else "no backup"
        self.daemons.start()
        return f"killed {state} ({name}, {delay:.2f}s after it started); restarted"

    def _cli_concurrent(self) -> str:
        rounds = self.rng.randint(1, 3)
        runs: list[CliRun] = []
        for _ in range(rounds):
            commands: list[tuple[str, ...]] = [("backup",), ("prune",)]
            if self.rng.random() < 0.5:
                commands.append(("backup", "--tier", "daily"))
            self.rng.shuffle(commands)
            started = []
            for argv in commands:
                started.append((start_cli(self.policy.path, self.cli_mark, *argv), argv))
                time.sleep(self.rng.uniform(0.0, 0.4))
            for (process, when), argv in started:
                runs.append(finish_cli(process, when, argv))
            time.sleep(self.rng.uniform(0.0, 1.0))
        self.cli_runs.extend(runs)
        codes = ", ".join(f"{run.command}: {run.returncode}" for run in runs)
        return f"{rounds} round(s): {codes}"

    def _corrupt(self) -> str:
        deadline = time.monotonic() + 3 * EVENT_SECONDS
        while len(backups := self.store.backups()) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("fewer than two backups to choose from")
            time.sleep(0.5)
        # The oldest backup: the weekly rule keeps it as "oldest weekly" for as long as the
        # soak runs (fewer ISO weeks than its keep count), so it stays to be found.
        oldest = backups[0]
        if not sidecar_path(oldest.path).is_file():
            raise RuntimeError(f"{oldest.path.name} has no sidecar")
        with oldest.path.open("r+b") as handle:
            offset = oldest.size // 2
            handle.seek(offset)
            original = handle.read(CORRUPTED_BYTES)
            handle.seek(offset)
            handle.write(bytes(byte ^ 0xFF for byte in original))
            handle.flush()
            os.fsync(handle.fileno())
        self.corrupted = oldest.name
        return f"flipped {len(original)} bytes at offset {offset} of {oldest.path.name}"

    # --- between faults ----------------------------------------------------------------

    def restart_if_dead(self) -> None:
        """Restart a daemon that exited without being told to, and note it."""
        # The daemon-health invariant reports the exit; the soak goes on with a new daemon.
        if self.daemons.reap_unexpected() is not None:
            self.daemons.start()

    def pause(self) -> None:
        """Wait a random gap between two faults, watching the daemon."""
        end = time.monotonic() + self.rng.uniform(*GAP_SECONDS)
        while time.monotonic() < end:
            self.restart_if_dead()
            time.sleep(0.2)
        self.restart_if_dead()
