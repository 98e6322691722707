"""The daemon under a fake systemd, restarted across kills, and watched all along.

Each start of ``sovbackupd run`` is an :class:`Instance`: its JSON events (collected by
the integration suite's :class:`DaemonProcess`), its RSS and fd samples, and its
``backups_total{result="failure"}`` scrapes. Daemons run in their own process group with
a marker in their environment, so that a kill takes their children along (as systemd's
cgroup does) and anything they leave behind can be found afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sovbackupd.store import Store
from tests.integration.test_daemon import WATCHDOG_USEC, DaemonProcess, NotifySocket, scrape

SAMPLE_SECONDS = 2.0
READY_SECONDS = 60.0
STOP_SECONDS = 120.0  # SIGTERM lets a running backup finish: bounded by the policy's grace
BACKUPS_TOTAL = "sovbackupd_backups_total"
# The seed's variables that override a policy: the soak runs on its own policy alone.
OVERRIDE_ENVIRONMENT = ("BACKUP_DIR", "RETENTION_DAYS", "REMOTE_BACKUP_PATH", "SOVBACKUPD_CONFIG")
DAEMON_MARK = "SOVBACKUPD_SOAK_DAEMON"
CLI_MARK = "SOVBACKUPD_SOAK_CLI"


class HarnessError(Exception):
    """The harness could not drive the daemon as planned."""


def clean_environment(**extra: str) -> dict[str, str]:
    """Return our environment without sovbackupd's overrides, plus *extra*."""
    environment = {
        key: value for key, value in os.environ.items() if key not in OVERRIDE_ENVIRONMENT
    }
    environment.update(extra)
    return environment


def event_time(event: dict[str, Any]) -> float:
    """Return the POSIX time of a structlog event's ISO timestamp (0 when it has none)."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return 0.0
    return datetime.fromisoformat(stamp).timestamp()


def wait_event(
    process: DaemonProcess, name: str, start: int, timeout: float, **fields: object
) -> dict[str, Any] | None:
    """Return the first event *name* with *fields* from index *start* on, None on timeout."""
    deadline = time.monotonic() + timeout
    with process.changed:
        while True:
            found = process.named(name, start, **fields)
            if found:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.closed:
                return None
            process.changed.wait(min(remaining, 0.2))


@dataclass(frozen=True)
class Sample:
    """One look at a daemon process."""

    taken: float
    rss_kib: int
    fds: int


@dataclass(frozen=True)
class FailureScrape:
    """``backups_total{result="failure"}`` as /metrics showed it between *t0* and *t1*."""

    t0: float
    t1: float
    failures: float
    successes: float
    terminal: bool  # the instance's last scrape, taken while no failure could be in flight


@dataclass
class Instance:
    """One run of ``sovbackupd run``, from start to kill, SIGTERM or its own exit."""

    number: int
    daemon: DaemonProcess
    stderr_file: IO[str]
    reader: threading.Thread
    started: float
    ended: float | None = None
    ending: str | None = None  # "kill -9", "SIGTERM", or "exited by itself"
    exit_code: int | None = None
    samples: list[Sample] = field(default_factory=list)
    scrapes: list[FailureScrape] = field(default_factory=list)
    watchdog_pings: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """Return the daemon's pid."""
        return self.daemon.process.pid

    def alive(self) -> bool:
        """Tell whether the daemon process still runs."""
        return self.daemon.process.poll() is None

    def events(self) -> list[dict[str, Any]]:
        """Return a copy of the events so far."""
        with self.daemon.changed:
            return list(self.daemon.events)

    def lifetime(self) -> float:
        """Return how long the instance ran (so far)."""
        return (self.ended or time.time()) - self.started


@dataclass
class Daemons:
    """The succession of daemon instances serving one policy."""

    root: Path
    policy: Path
    listen: str
    notify: NotifySocket
    mark: str
    instances: list[Instance] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    problems: list[str] = field(default_factory=list)

    @property
    def current(self) -> Instance:
        """Return the newest instance."""
        return self.instances[-1]

    def start(self) -> Instance:
        """Start a daemon; return once it has logged daemon.started."""
        environment = clean_environment(
            NOTIFY_SOCKET=str(self.notify.path),
            WATCHDOG_USEC=str(WATCHDOG_USEC),
            PYTHONUNBUFFERED="1",
            **{DAEMON_MARK: self.mark},
        )
        with self.lock:
            number = len(self.instances)
            stderr_path = self.root / f"daemon-{number}.stderr"
            stderr_file = stderr_path.open("w")
            process = subprocess.Popen(
                [sys.executable, "-m", "sovbackupd", "--config", str(self.policy), "run"],
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                text=True,
                env=environment,
                start_new_session=True,  # its own group: a kill takes its children too
            )
            daemon = DaemonProcess(process, stderr_path)
            reader = threading.Thread(target=daemon.read_stdout, daemon=True)
            reader.start()
            instance = Instance(number, daemon, stderr_file, reader, time.time())
            self.instances.append(instance)
        if wait_event(daemon, "daemon.started", 0, READY_SECONDS) is None:
            raise HarnessError(
                f"daemon {number} did not start (exit code {process.poll()}): "
                f"{daemon.stderr()[-2000:]}"
            )
        return instance

    def scrape_failures(self, instance: Instance, terminal: bool) -> FailureScrape | None:
        """Scrape the instance's backup counters; None when /metrics does not answer."""
        t0 = time.time()
        try:
            metrics = scrape(self.listen)
            failures = metrics.value(BACKUPS_TOTAL, result="failure")
            successes = metrics.value(BACKUPS_TOTAL, result="success")
        except (OSError, urllib.error.URLError, AssertionError):
            return None
        taken = FailureScrape(t0, time.time(), failures, successes, terminal)
        instance.scrapes.append(taken)
        return taken

    def sample(self) -> None:
        """Record the current daemon's RSS, open fds and failure counter."""
        with self.lock:
            if not self.instances:
                return
            instance = self.current
            if not instance.alive():
                return
            try:
                status = Path(f"/proc/{instance.pid}/status").read_text()
                fds = len(os.listdir(f"/proc/{instance.pid}/fd"))  # noqa: PTH208 (a count is all we need)
            except (FileNotFoundError, ProcessLookupError):
                return
            rss = next(
                (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")),
                None,
            )
            if rss is not None:
                instance.samples.append(Sample(time.time(), rss, fds))
            self.scrape_failures(instance, terminal=False)

    def kill(self, instance: Instance) -> None:
        """SIGKILL the daemon's whole process group, as systemd kills a crashed unit's cgroup."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(instance.pid, signal.SIGKILL)
        instance.daemon.process.wait()
        self._ended(instance, "kill -9")

    def terminate(self, instance: Instance) -> int:
        """SIGTERM the daemon and wait for it to exit; return its exit code."""
        instance.daemon.send(signal.SIGTERM)
        try:
            code = instance.daemon.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.problems.append(
                f"daemon {instance.number} did not exit {STOP_SECONDS:g}s after SIGTERM"
            )
            self.kill(instance)
            instance.ending = "SIGTERM, then kill -9"
            return -signal.SIGKILL
        self._ended(instance, "SIGTERM")
        return code

    def _ended(self, instance: Instance, how: str) -> None:
        instance.reader.join(30)
        instance.ended = time.time()
        instance.ending = how
        instance.exit_code = instance.daemon.process.returncode
        pings = [
            message.received
            for message in self.notify.messages()
            if message.fields.get("WATCHDOG") == "1"
            and instance.started <= message.received <= instance.ended
        ]
        instance.watchdog_pings = pings
        # Kept beside the soak's files for a post-mortem: pytest keeps its last temp dirs.
        with (self.root / f"daemon-{instance.number}.jsonl").open("w") as log:
            log.writelines(json.dumps(event) + "\n" for event in instance.events())

    def reap_unexpected(self) -> Instance | None:
        """Notice a daemon that exited without being told to; return it."""
        with self.lock:
            if not self.instances:
                return None
            instance = self.current
            if instance.ended is None and not instance.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(instance.pid, signal.SIGKILL)  # its children, if any are left
                self._ended(instance, "exited by itself")
                return instance
            return None

    def close(self) -> None:
        """Kill whatever still runs and close the logs."""
        for instance in self.instances:
            if instance.ended is None:
                self.kill(instance)
                instance.ending = "killed at teardown"
            instance.stderr_file.close()


class Sampler:
    """Every SAMPLE_SECONDS: the daemon's RSS, fds and counters, and the archives on disk."""

    def __init__(self, daemons: Daemons, store: Store) -> None:
        """Watch *daemons* and the backups in *store*."""
        self._daemons = daemons
        self._store = store
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._daemons.sample()
            with contextlib.suppress(Exception):  # the directory may be mid-change
                self.seen.update(backup.name for backup in self._store.backups())


@dataclass(frozen=True)
class CliRun:
    """One sovbackupd command run by the soak, concurrently with the daemon or after it."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    started: float
    duration: float

    @property
    def command(self) -> str:
        """Return the subcommand and its arguments."""
        return " ".join(self.argv)


def cli_environment(mark: str) -> dict[str, str]:
    """Return the environment of the soak's CLI runs, marked so that leftovers are found."""
    return clean_environment(**{CLI_MARK: mark})


def start_cli(policy: Path, mark: str, *argv: str) -> tuple[subprocess.Popen[str], float]:
    """Start ``sovbackupd --config POLICY ARGV`` in the background."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sovbackupd", "--config", str(policy), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_environment(mark),
    )
    return process, time.time()


def finish_cli(
    process: subprocess.Popen[str], started: float, argv: tuple[str, ...], timeout: float = 300
) -> CliRun:
    """Wait for a command started by :func:`start_cli`; return what it did."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n(soak: killed after {timeout:g}s)"
    return CliRun(argv, process.returncode, stdout, stderr, started, time.time() - started)


def run_cli(policy: Path, mark: str, *argv: str, timeout: float = 300) -> CliRun:
    """Run one sovbackupd command and wait for it."""
    process, started = start_cli(policy, mark, *argv)
    return finish_cli(process, started, tuple(argv), timeout)


@dataclass(frozen=True)
class ProcessInfo:
    """A process found in /proc."""

    pid: int
    name: str
    cmdline: str
    cwd: str | None

    def __str__(self) -> str:
        """Describe the process for a violation message."""
        return f"pid {self.pid} ({self.name}, cwd {self.cwd}): {self.cmdline[:200]}"


def _describe(pid: int) -> ProcessInfo | None:
    base = Path(f"/proc/{pid}")
    try:
        name = (base / "comm").read_text().strip()
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        cwd: str | None = str((base / "cwd").readlink())
    except OSError:
        cwd = None
    return ProcessInfo(pid, name, cmdline.strip(), cwd)


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def marked_processes(key: str, value: str) -> list[ProcessInfo]:
    """Return the live processes whose environment carries *key*=*value* (not zombies)."""
    wanted = f"{key}={value}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if wanted in environment and state != "Z":
            described = _describe(pid)
            if described is not None:
                found.append(described)
    return found


def redis_processes_under(root: Path, exclude: set[int]) -> list[ProcessInfo]:
    """Return the redis-server processes (and their forks) whose cwd is under *root*."""
    found = []
    for pid in _pids():
        if pid in exclude:
            continue
        try:
            executable = Path(f"/proc/{pid}/exe").readlink().name
        except OSError:
            continue
        if not executable.startswith("redis-"):
            continue
        described = _describe(pid)
        cwd = described.cwd if described is not None else None
        if described is not None and cwd is not None and Path(cwd).is_relative_to(root):
            found.append(described)
    return found
