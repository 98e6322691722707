"""The daemon as systemd runs it: a real process, a notify socket, /metrics and signals."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sovbackupd import __version__, config, scheduler, tierstate
from sovbackupd import policy as gfs
from sovbackupd.config.models import Policy
from sovbackupd.manifest import Manifest
from sovbackupd.redis_server import free_port
from sovbackupd.tierstate import TierRecord
from tests.conftest import (
    RedisServer,
    Sandbox,
    SqliteLock,
    backup_files,
    policy_data,
    run_cli,
    write_policy,
)

WAIT_SECONDS = 20.0  # the longest any single expected thing may take to happen
WATCHDOG_USEC = 1_000_000
NEXT_RUN = "sovbackupd_next_run_timestamp_seconds"
EVERY_2_SECONDS = "*/2 * * * * *"
EVERY_4_SECONDS = "*/4 * * * * *"
NEW_YEAR = "0 0 1 1 *"
SLOW_DATA_FILES = 3
SLOW_DATA_FILE_BYTES = 64 << 20
ARCHIVE_STARTED_BYTES = 4 << 20

# Every metric DESIGN.md names: its type and its label names.
DESIGN_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "last_success_timestamp_seconds": ("gauge", frozenset({"tier"})),
    "last_attempt_timestamp_seconds": ("gauge", frozenset({"tier"})),
    "last_backup_size_bytes": ("gauge", frozenset()),
    "last_backup_duration_seconds": ("gauge", frozenset()),
    "backup_duration_seconds": ("histogram", frozenset()),
    "backups_total": ("counter", frozenset({"result"})),
    "backup_in_progress": ("gauge", frozenset()),
    "disk_free_bytes": ("gauge", frozenset({"path"})),
    "disk_total_bytes": ("gauge", frozenset({"path"})),
    "backups_stored": ("gauge", frozenset({"location"})),
    "backups_stored_bytes": ("gauge", frozenset({"location"})),
    "retention_deleted_total": ("counter", frozenset()),
    "remote_last_success_timestamp_seconds": ("gauge", frozenset({"remote"})),
    "remote_uploads_total": ("counter", frozenset({"remote", "result"})),
    "restore_test_last_success_timestamp_seconds": ("gauge", frozenset()),
    "restore_test_last_result": ("gauge", frozenset()),
    "config_last_reload_success": ("gauge", frozenset()),
    "config_last_reload_timestamp_seconds": ("gauge", frozenset()),
    "next_run_timestamp_seconds": ("gauge", frozenset({"tier"})),
    "build_info": ("gauge", frozenset({"version"})),
}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll *condition* until it holds; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram: its KEY=VALUE lines and when it arrived."""

    received: float
    fields: dict[str, str]


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self._changed = threading.Condition()
        self._messages: list[Notification] = []
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed:
            try:
                datagram = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = datagram.decode().splitlines()
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            with self._changed:
                self._messages.append(Notification(time.time(), fields))
                self._changed.notify_all()

    def messages(self, start: int = 0) -> list[Notification]:
        """Return the datagrams received so far, from index *start*."""
        with self._changed:
            return self._messages[start:]

    def mark(self) -> int:
        """Return the index the next datagram will have."""
        with self._changed:
            return len(self._messages)

    def wait_for(
        self, predicate: Callable[[Notification], bool], what: str, start: int = 0
    ) -> tuple[int, Notification]:
        """Return the index and the first datagram from *start* on that satisfies *predicate*."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self._changed:
            while True:
                for index in range(start, len(self._messages)):
                    if predicate(self._messages[index]):
                        return index, self._messages[index]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    received = [message.fields for message in self._messages[start:]]
                    pytest.fail(f"no sd_notify {what} arrived; got {received}")
                self._changed.wait(remaining)

    def close(self) -> None:
        """Stop collecting and close the socket."""
        self._closed = True
        self._thread.join(5)
        self._socket.close()


def has(key: str, value: str | None = None) -> Callable[[Notification], bool]:
    """Return a predicate: the datagram carries *key* (with *value*, when given)."""
    return lambda message: key in message.fields and value in (None, message.fields[key])


@dataclass
class DaemonProcess:
    """``sovbackupd run`` in a subprocess; its stdout JSON events collected by a thread."""

    process: subprocess.Popen[str]
    stderr_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False  # stdout reached its end: the daemon is gone, every event is in

    def read_stdout(self) -> None:
        """Collect every stdout line until the pipe closes, so that it never fills."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "<not json>", "line": line}
            with self.changed:
                self.events.append(event)
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def mark(self) -> int:
        """Return the index the next event will have."""
        with self.changed:
            return len(self.events)

    def named(self, name: str, start: int = 0, **fields: object) -> list[dict[str, Any]]:
        """Return the events called *name* with *fields*, from index *start* on."""
        with self.changed:
            return [
                event
                for event in self.events[start:]
                if event.get("event") == name
                and all(event.get(key) == value for key, value in fields.items())
            ]

    def index_of(self, event: dict[str, Any]) -> int:
        """Return the position of *event* in the log."""
        with self.changed:
            return next(index for index, seen in enumerate(self.events) if seen is event)

    def wait_for(self, name: str, start: int = 0, **fields: object) -> dict[str, Any]:
        """Return the first event called *name* with *fields* from *start* on; wait for it."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self.changed:
            while True:
                found = self.named(name, start, **fields)
                if found:
                    return found[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    pytest.fail(
                        f"no {name} {fields} event (daemon exit code {self.process.poll()}); "
                        f"events: {[event.get('event') for event in self.events]}; "
                        f"stderr: {self.stderr()[-2000:]}"
                    )
                self.changed.wait(min(remaining, 0.2))

    def wait_for_backups(self, count: int, start: int = 0) -> list[dict[str, Any]]:
        """Wait until *count* successful backups have finished since *start*; return them."""
        while len(found := self.named("backup.finished", start, result="success")) < count:
            self.wait_for("backup.finished", self.index_of(found[-1]) + 1 if found else start)
        return found

    def send(self, signum: int) -> None:
        """Send *signum* to the daemon."""
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = WAIT_SECONDS) -> int:
        """Wait for the daemon to exit; return its exit code."""
        return self.process.wait(timeout)

    def stderr(self) -> str:
        """Return what the daemon wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A systemd notify socket in tmp_path, collecting datagrams in a thread."""
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


@pytest.fixture
def start_daemon(
    tmp_path: Path, notify_socket: NotifySocket
) -> Iterator[Callable[[Path], DaemonProcess]]:
    """Start ``sovbackupd run`` under a fake systemd; stop every daemon afterwards."""
    started: list[tuple[DaemonProcess, IO[str], threading.Thread]] = []

    def start(policy: Path) -> DaemonProcess:
        environment = {
            key: value
            for key, value in os.environ.items()
            if key not in {"BACKUP_DIR", "RETENTION_DAYS", "REMOTE_BACKUP_PATH"}
        }
        environment |= {
            "NOTIFY_SOCKET": str(notify_socket.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "PYTHONUNBUFFERED": "1",
        }
        stderr_path = tmp_path / f"daemon-{len(started)}.stderr"
        stderr = stderr_path.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "sovbackupd", "--config", str(policy), "run"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=environment,
        )
        daemon = DaemonProcess(process, stderr_path)
        reader = threading.Thread(target=daemon.read_stdout, daemon=True)
        reader.start()
        started.append((daemon, stderr, reader))
        return daemon

    yield start
    for daemon, stderr, reader in started:
        if daemon.process.poll() is None:
            daemon.process.terminate()
            try:
                daemon.process.wait(10)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
        reader.join(5)
        stderr.close()


@dataclass(frozen=True)
class Scrape:
    """One read of /metrics: the exposition text and its parsed families."""

    taken: float
    text: str
    families: list[Metric]

    def value(self, name: str, **labels: str) -> float:
        """Return the sample *name* whose labels are exactly *labels*."""
        for family in self.families:
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise AssertionError(f"/metrics has no sample {name}{labels}")

    def labels(self, name: str) -> list[dict[str, str]]:
        """Return the label sets of every sample called *name*."""
        return [
            sample.labels
            for family in self.families
            for sample in family.samples
            if sample.name == name
        ]

    def family(self, name: str) -> Metric:
        """Return the family *name* (counters without their ``_total``)."""
        return next(family for family in self.families if family.name == name)


def scrape(listen: str) -> Scrape:
    """Read and parse the daemon's /metrics."""
    taken = time.time()
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    return Scrape(taken, text, list(text_string_to_metric_families(text)))


def scrape_when_up(listen: str) -> Scrape:
    """Scrape /metrics, retrying while the endpoint is not listening yet."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            return scrape(listen)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def settled_scrape(
    daemon: DaemonProcess, listen: str, backup_dir: Path
) -> tuple[Scrape, list[Path]]:
    """Scrape right after a backup, with the archives on disk, while no backup runs."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        daemon.wait_for("backup.finished", daemon.mark())
        first = scrape(listen)
        archives = sorted(backup_dir.glob("*.tar.gz"))
        second = scrape(listen)
        quiet = first.value("sovbackupd_backup_in_progress") == 0
        quiet &= second.value("sovbackupd_backup_in_progress") == 0
        # The daemon refreshes next-run just after logging backup.finished: let it catch up.
        next_runs = [sample.value for sample in first.family(NEXT_RUN).samples]
        quiet &= bool(next_runs) and min(next_runs) > first.taken
        counted = first.value("sovbackupd_backups_total", result="success")
        if quiet and counted == second.value("sovbackupd_backups_total", result="success"):
            return first, archives
    pytest.fail("no quiet moment between backups to compare /metrics with the disk")


def manifests(backup_dir: Path) -> list[dict[str, Any]]:
    """Return the ``<name>.manifest.json`` beside each archive, oldest first."""
    return [json.loads(path.read_text()) for path in sorted(backup_dir.glob("*.manifest.json"))]


def timestamp(iso: str) -> float:
    """Return the POSIX time of an ISO 8601 string."""
    return datetime.fromisoformat(iso).timestamp()


def daemon_policy(
    tmp_path: Path,
    sandbox: Sandbox,
    redis: RedisServer | None,
    tiers: dict[str, str],
    name: str = "policy.yaml",
    **overrides: Any,
) -> tuple[Path, str]:
    """Write a policy scheduling *tiers* with metrics on a free port; return it and the port."""
    listen = f"127.0.0.1:{free_port()}"
    data = policy_data(
        sandbox,
        redis,
        tiers={tier: {"schedule": schedule, "keep": 100} for tier, schedule in tiers.items()},
        metrics={"listen": listen},
        **{"retention": {"keep_last": 1000}, **overrides},  # seconds-apart backups: prune none
    )
    return write_policy(tmp_path / name, data), listen


def rewrite(policy: Path, **changes: Any) -> None:
    """Change top-level keys of the policy file *policy* in place."""
    data = yaml.safe_load(policy.read_text())
    data.update(changes)
    write_policy(policy, data)


def far_from_now(hours: int = 12) -> datetime:
    """Return a UTC moment *hours* away, for schedules that must not fire during a test."""
    return datetime.now(UTC) + timedelta(hours=hours)


def daily_far_away() -> str:
    """Return a daily cron line whose next run is about 12 hours away."""
    return f"0 {far_from_now().hour} * * *"


def hourly_far_away() -> str:
    """Return an hourly cron line whose next run is about 30 minutes away."""
    return f"{(datetime.now(UTC).minute + 30) % 60} * * * *"


def verify(policy: Path, name: str) -> None:
    """Check with the real CLI that backup *name* verifies (deeply)."""
    result = run_cli("verify", name, "--deep", "--json", config=policy, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [verdict["ok"] for verdict in json.loads(result.stdout)] == [True]


# 1. Readiness, watchdog, schedule and metrics.


def test_daemon_notifies_ready_then_status_with_next_run_and_repeated_watchdog_pings(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """READY=1 comes first, STATUS= names the next tier and time, WATCHDOG=1 keeps coming."""
    policy, _ = daemon_policy(
        tmp_path, sandbox, None, {"hourly": EVERY_2_SECONDS, "daily": daily_far_away()}
    )
    daemon = start_daemon(policy)
    ready_index, _ = notify_socket.wait_for(has("READY", "1"), "READY=1")
    daemon.wait_for("daemon.started")
    # Ready means scheduled and visible: STATUS= (and next-run metrics) come before READY=1.
    assert any("STATUS" in message.fields for message in notify_socket.messages()[:ready_index])

    pattern = re.compile(r"^next backup: (?P<tiers>[a-z,]+) at (?P<moment>\S+)$")
    _, status = notify_socket.wait_for(
        lambda message: bool(pattern.match(message.fields.get("STATUS", ""))),
        "STATUS=next backup: ...",
        ready_index,
    )
    match = pattern.match(status.fields["STATUS"])
    assert match is not None
    assert match["tiers"] == "hourly"
    moment = datetime.fromisoformat(match["moment"])
    assert moment.tzinfo is not None
    assert status.received - 0.1 < moment.timestamp() <= status.received + 2
    assert moment.second % 2 == 0
    assert moment.microsecond == 0

    pings = [ready_index]
    while len(pings) <= 4:
        index, _ = notify_socket.wait_for(has("WATCHDOG", "1"), "WATCHDOG=1", pings[-1] + 1)
        pings.append(index)
    pings = pings[1:]
    times = [notify_socket.messages(index)[0].received for index in pings]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert max(gaps) < WATCHDOG_USEC / 1_000_000, f"watchdog pings {gaps} s apart"
    assert daemon.process.poll() is None


def test_tiers_run_on_their_seconds_schedule_and_share_one_backup_when_due_together(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """Hourly every 2 s and daily every 4 s: every 4th second makes ONE backup of both."""
    policy, _ = daemon_policy(
        tmp_path, sandbox, redis_server, {"hourly": EVERY_2_SECONDS, "daily": EVERY_4_SECONDS}
    )
    daemon = start_daemon(policy)
    first = daemon.wait_for_backups(1)[0]  # the catch-up at start: neither tier ever ran
    assert first["tiers"] == ["hourly", "daily"]
    after_catch_up = daemon.index_of(first) + 1

    def scheduled() -> list[dict[str, Any]]:
        return daemon.named("backup.finished", after_catch_up)

    def both_kinds_seen() -> bool:
        kinds = {tuple(event["tiers"]) for event in scheduled()}
        return {("hourly",), ("hourly", "daily")} <= kinds and len(scheduled()) >= 3

    wait_until(both_kinds_seen, "an hourly-only and an hourly+daily scheduled backup")
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0

    assert all(event["result"] == "success" for event in daemon.named("backup.finished"))
    listed = json.loads(run_cli("list", "--json", config=policy).stdout)
    by_name = {row["name"]: row for row in listed}
    scheduled_names = [event["backup"] for event in scheduled()]
    assert set(by_name) == {first["backup"], *scheduled_names}
    for name in scheduled_names:
        created = datetime.fromisoformat(by_name[name]["created"])
        assert created.second % 2 == 0, f"{name} did not start on an even second"
        expected = ["hourly", "daily"] if created.second % 4 == 0 else ["hourly"]
        assert by_name[name]["tiers"] == expected, name
    assert not any(row["tiers"] == ["daily"] for row in listed)


def test_metrics_expose_every_design_metric_with_values_matching_the_archives(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """After scheduled backups /metrics carries every DESIGN.md metric, true to the disk."""
    started = time.time()
    policy, listen = daemon_policy(
        tmp_path, sandbox, redis_server, {"hourly": EVERY_2_SECONDS, "daily": EVERY_4_SECONDS}
    )
    daemon = start_daemon(policy)
    first = daemon.wait_for_backups(1)[0]

    def both_kinds_seen() -> bool:
        scheduled = daemon.named("backup.finished", daemon.index_of(first) + 1)
        return {("hourly",), ("hourly", "daily")} <= {tuple(event["tiers"]) for event in scheduled}

    wait_until(both_kinds_seen, "an hourly-only and an hourly+daily scheduled backup")
    metrics, archives = settled_scrape(daemon, listen, sandbox.backup_dir)

    prefix = "sovbackupd_"
    for name, (kind, label_names) in DESIGN_METRICS.items():
        assert f"# HELP {prefix}{name} " in metrics.text, name
        assert f"\n# TYPE {prefix}{name} {kind}\n" in metrics.text, name
        family = metrics.family(prefix + name.removesuffix("_total"))
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == label_names, (name, sample)
    assert metrics.labels("sovbackupd_remote_last_success_timestamp_seconds") == []
    assert metrics.labels("sovbackupd_remote_uploads_total") == []

    heads = manifests(sandbox.backup_dir)
    assert [head["id"] for head in heads] == [
        path.name.removesuffix(".tar.gz") for path in archives
    ]
    count = len(archives)
    assert metrics.value(f"{prefix}backups_total", result="success") == count
    assert metrics.value(f"{prefix}backups_total", result="failure") == 0
    assert metrics.value(f"{prefix}backup_in_progress") == 0
    assert metrics.value(f"{prefix}backup_duration_seconds_count") == count
    assert metrics.value(f"{prefix}backup_duration_seconds_sum") > 0
    assert metrics.value(f"{prefix}backup_duration_seconds_bucket", le="+Inf") == count
    newest = heads[-1]
    assert metrics.value(f"{prefix}last_backup_size_bytes") == archives[-1].stat().st_size
    assert metrics.value(f"{prefix}last_backup_duration_seconds") == pytest.approx(
        timestamp(newest["finished"]) - timestamp(newest["created"]), abs=1e-3
    )
    for tier in ("hourly", "daily"):
        last = [head for head in heads if tier in head["tiers"]][-1]
        success = metrics.value(f"{prefix}last_success_timestamp_seconds", tier=tier)
        assert success == pytest.approx(timestamp(last["finished"]), abs=1e-3), tier
        attempt = metrics.value(f"{prefix}last_attempt_timestamp_seconds", tier=tier)
        assert timestamp(last["created"]) - 5 < attempt <= timestamp(last["created"]), tier
        next_run = metrics.value(f"{prefix}next_run_timestamp_seconds", tier=tier)
        assert metrics.taken < next_run <= metrics.taken + (2 if tier == "hourly" else 4), tier
    assert metrics.value(f"{prefix}backups_stored", location="local") == count
    assert metrics.value(f"{prefix}backups_stored_bytes", location="local") == sum(
        path.stat().st_size for path in archives
    )
    disk = shutil.disk_usage(sandbox.backup_dir)
    path = str(sandbox.backup_dir)
    assert metrics.value(f"{prefix}disk_total_bytes", path=path) == disk.total
    assert 0 < metrics.value(f"{prefix}disk_free_bytes", path=path) <= disk.total
    assert metrics.value(f"{prefix}retention_deleted_total") == 0
    assert metrics.value(f"{prefix}restore_test_last_success_timestamp_seconds") == 0
    assert math.isnan(metrics.value(f"{prefix}restore_test_last_result"))
    assert metrics.value(f"{prefix}config_last_reload_success") == 1
    reloaded = metrics.value(f"{prefix}config_last_reload_timestamp_seconds")
    assert started <= reloaded <= timestamp(heads[0]["created"])
    assert metrics.value(f"{prefix}build_info", version=__version__) == 1


# 2. SIGHUP reloads.


def test_sighup_with_a_new_schedule_moves_next_run_between_reloading_and_ready(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """A valid new schedule takes effect on SIGHUP, framed by RELOADING=1 and READY=1."""
    policy, listen = daemon_policy(tmp_path, sandbox, None, {"daily": EVERY_4_SECONDS})
    daemon = start_daemon(policy)
    notify_socket.wait_for(has("READY", "1"), "READY=1")
    before = scrape_when_up(listen)
    next_run = before.value(NEXT_RUN, tier="daily")
    assert before.taken - 1 < next_run <= before.taken + 4

    rewrite(policy, tiers={"daily": {"schedule": NEW_YEAR, "keep": 100}})
    mark, notified = daemon.mark(), notify_socket.mark()
    sent_usec = time.monotonic_ns() // 1000
    daemon.send(signal.SIGHUP)
    daemon.wait_for("config.reloaded", mark)
    reloading_index, reloading = notify_socket.wait_for(
        has("RELOADING", "1"), "RELOADING=1", notified
    )
    assert sent_usec <= int(reloading.fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    ready_index, _ = notify_socket.wait_for(
        has("READY", "1"), "READY=1 after RELOADING=1", reloading_index + 1
    )
    between = notify_socket.messages(reloading_index + 1)[: ready_index - reloading_index - 1]
    assert any("STATUS" in message.fields for message in between), "no STATUS= before READY=1"

    after = scrape(listen)
    new_year = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC).timestamp()
    assert after.value(NEXT_RUN, tier="daily") == new_year
    assert after.value("sovbackupd_config_last_reload_success") == 1
    reloaded = after.value("sovbackupd_config_last_reload_timestamp_seconds")
    assert reloaded > before.value("sovbackupd_config_last_reload_timestamp_seconds")
    assert daemon.named("config.reload_failed") == []


def test_sighup_with_a_broken_policy_keeps_the_daemon_on_its_old_schedule(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """An invalid policy is logged and refused; backups go on landing every 2 s."""
    policy, listen = daemon_policy(tmp_path, sandbox, None, {"hourly": EVERY_2_SECONDS})
    daemon = start_daemon(policy)
    daemon.wait_for_backups(1)

    # Valid YAML that would stop the 2 s schedule, were it not refused for its unknown key.
    rewrite(policy, tiers={"hourly": {"schedule": NEW_YEAR, "keep": 100}}, colour="blue")
    mark, notified = daemon.mark(), notify_socket.mark()
    daemon.send(signal.SIGHUP)
    failed = daemon.wait_for("config.reload_failed", mark)
    assert any("colour" in problem for problem in failed["problems"]), failed
    assert failed["path"] == str(policy)
    reloading_index, _ = notify_socket.wait_for(has("RELOADING", "1"), "RELOADING=1", notified)
    notify_socket.wait_for(has("READY", "1"), "READY=1 after a failed reload", reloading_index + 1)

    metrics = scrape(listen)
    assert metrics.value("sovbackupd_config_last_reload_success") == 0
    next_run = metrics.value(NEXT_RUN, tier="hourly")
    assert next_run <= metrics.taken + 2
    landed = daemon.wait_for_backups(2, daemon.index_of(failed) + 1)
    assert [event["tiers"] for event in landed] == [["hourly"], ["hourly"]]
    assert daemon.process.poll() is None
    assert daemon.named("config.reloaded") == []


def test_sighup_during_a_running_backup_lets_it_finish_successfully(
    tmp_path: Path,
    sandbox: Sandbox,
    lock_sqlite: Callable[[Path], SqliteLock],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """A reload while a backup waits on a locked database does not disturb that backup."""
    policy, listen = daemon_policy(
        tmp_path,
        sandbox,
        None,
        {"daily": daily_far_away()},
        sources={"sqlite": [str(sandbox.database)], "sqlite_timeout_seconds": 60},
    )
    held = lock_sqlite(sandbox.database)
    daemon = start_daemon(policy)
    started = daemon.wait_for("backup.started")  # the catch-up: daily never ran

    rewrite(policy, tiers={"daily": {"schedule": NEW_YEAR, "keep": 100}})
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    reloaded = daemon.wait_for("config.reloaded", mark)
    assert daemon.named("backup.finished") == []
    assert scrape(listen).value("sovbackupd_backup_in_progress") == 1

    held.release()
    finished = daemon.wait_for("backup.finished")
    assert daemon.index_of(reloaded) < daemon.index_of(finished)
    assert finished["result"] == "success", finished
    assert finished["backup"] == started["backup"]
    verify(policy, finished["backup"])
    metrics = scrape(listen)
    assert metrics.value("sovbackupd_backups_total", result="success") == 1
    new_year = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC).timestamp()
    assert metrics.value(NEXT_RUN, tier="daily") == new_year


def test_a_storm_of_sighups_during_a_backup_neither_kills_nor_disturbs_the_daemon(
    tmp_path: Path,
    sandbox: Sandbox,
    lock_sqlite: Callable[[Path], SqliteLock],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """Hundreds of SIGHUPs while a backup waits coalesce into reloads; the backup succeeds."""
    policy, listen = daemon_policy(
        tmp_path,
        sandbox,
        None,
        {"daily": daily_far_away()},
        sources={"sqlite": [str(sandbox.database)], "sqlite_timeout_seconds": 120},
    )
    held = lock_sqlite(sandbox.database)
    daemon = start_daemon(policy)
    started = daemon.wait_for("backup.started")
    mark = daemon.mark()
    for _ in range(300):
        daemon.send(signal.SIGHUP)
    daemon.wait_for("config.reloaded", mark)
    held.release()
    finished = daemon.wait_for("backup.finished")
    assert finished["result"] == "success", finished
    assert finished["backup"] == started["backup"]
    assert daemon.named("config.reload_failed") == []
    assert daemon.named("backup.crashed") == []
    assert daemon.process.poll() is None
    rewrite(policy, tiers={"daily": {"schedule": NEW_YEAR, "keep": 100}})
    new_year = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC).timestamp()
    for _ in range(3):  # a reload of the storm may still have been pending: it read the old file
        mark = daemon.mark()
        daemon.send(signal.SIGHUP)
        daemon.wait_for("config.reloaded", mark)
        if scrape(listen).value(NEXT_RUN, tier="daily") == new_year:
            break
    else:
        pytest.fail("the daemon never took the new schedule after the storm")
    verify(policy, finished["backup"])


# 3. SIGTERM.


def test_sigterm_lets_a_running_backup_finish_within_the_grace_then_exits_0(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    lock_sqlite: Callable[[Path], SqliteLock],
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """STOPPING=1 at once; the backup completes and verifies; nothing else starts."""
    policy, _ = daemon_policy(
        tmp_path,
        sandbox,
        None,
        {"hourly": EVERY_2_SECONDS},
        sources={"sqlite": [str(sandbox.database)], "sqlite_timeout_seconds": 60},
        daemon={"shutdown_grace_seconds": 60},
    )
    held = lock_sqlite(sandbox.database)
    daemon = start_daemon(policy)
    started = daemon.wait_for("backup.started")
    notified = notify_socket.mark()
    # Let the 2 s schedule come due while the backup waits: it must not run after SIGTERM.
    wait_until(lambda: time.time() >= timestamp(started["timestamp"]) + 2.5, "a missed tick")
    daemon.send(signal.SIGTERM)
    stopping = daemon.wait_for("daemon.stopping")
    notify_socket.wait_for(has("STOPPING", "1"), "STOPPING=1", notified)
    daemon.wait_for("daemon.waiting_for_backup")
    assert daemon.process.poll() is None

    held.release()
    assert daemon.wait_exit() == 0
    finished = daemon.wait_for("backup.finished")
    assert finished["result"] == "success", finished
    assert finished["backup"] == started["backup"]
    assert daemon.named("backup.started", daemon.index_of(stopping)) == []
    assert daemon.named("backup.aborting") == []
    names = backup_files(sandbox.backup_dir)
    assert not any(name.endswith(".partial") for name in names)
    assert {name for name in names if name.endswith(".tar.gz")} == {f"{started['backup']}.tar.gz"}
    verify(policy, started["backup"])


def test_sigterm_past_the_grace_aborts_the_backup_leaving_no_archive(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """With no grace the backup is cancelled mid-archive: no .partial, no archive, exit 0."""
    slow = sandbox.app / "data" / "slow"
    slow.mkdir()
    for number in range(SLOW_DATA_FILES):
        with (slow / f"random-{number}.bin").open("wb") as handle:
            for _ in range(SLOW_DATA_FILE_BYTES >> 20):
                handle.write(os.urandom(1 << 20))  # incompressible: the archive grows slowly
    policy, _ = daemon_policy(
        tmp_path,
        sandbox,
        None,
        {"daily": daily_far_away()},
        daemon={"shutdown_grace_seconds": 0},
    )
    daemon = start_daemon(policy)
    started = daemon.wait_for("backup.started")
    partial = sandbox.backup_dir / f"{started['backup']}.tar.gz.partial"

    def archive_growing() -> bool:
        return partial.exists() and partial.stat().st_size >= ARCHIVE_STARTED_BYTES

    wait_until(archive_growing, "the archive to be half-written")
    notified = notify_socket.mark()
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.stderr()
    notify_socket.wait_for(has("STOPPING", "1"), "STOPPING=1", notified)

    daemon.wait_for("backup.aborting")
    finished = daemon.wait_for("backup.finished")
    assert finished["result"] == "failure"
    assert "aborted" in finished["error"]
    assert daemon.wait_for("daemon.stopped")
    assert backup_files(sandbox.backup_dir) == set()


# 4. Catch-up at start.


def test_daemon_with_no_backups_on_disk_backs_up_at_once_despite_a_distant_schedule(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """A tier that never succeeded is caught up at start, hours before its cron time."""
    policy, listen = daemon_policy(tmp_path, sandbox, redis_server, {"daily": daily_far_away()})
    daemon = start_daemon(policy)
    finished = daemon.wait_for_backups(1)[0]
    assert finished["tiers"] == ["daily"]
    verify(policy, finished["backup"])
    metrics = scrape_when_up(listen)
    next_run = metrics.value(NEXT_RUN, tier="daily")
    assert next_run > metrics.taken + 10 * 3600
    (head,) = manifests(sandbox.backup_dir)
    assert metrics.value(
        "sovbackupd_last_success_timestamp_seconds", tier="daily"
    ) == pytest.approx(timestamp(head["finished"]), abs=1e-3)


def test_catch_up_runs_only_the_tier_whose_last_backup_predates_its_previous_run(
    tmp_path: Path,
    sandbox: Sandbox,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """Hourly missed its run after the last backup and is caught up; daily is not."""
    policy, _ = daemon_policy(tmp_path, sandbox, None, {"daily": daily_far_away()})
    made = run_cli("backup", "--tier", "hourly", "--tier", "daily", config=policy)
    assert made.returncode == 0, made.stderr
    (head,) = manifests(sandbox.backup_dir)
    # A once-a-day schedule whose run fell just after that backup, before the daemon starts.
    missed = datetime.fromisoformat(head["finished"]).replace(microsecond=0) + timedelta(seconds=1)
    schedules = {
        "hourly": f"{missed.second} {missed.minute} {missed.hour} * * *",
        "daily": daily_far_away(),
    }
    policy, _ = daemon_policy(tmp_path, sandbox, None, schedules)
    wait_until(lambda: time.time() > missed.timestamp() + 0.1, "the missed run to pass")

    daemon = start_daemon(policy)
    finished = daemon.wait_for_backups(1)[0]
    assert finished["tiers"] == ["hourly"]
    assert len(manifests(sandbox.backup_dir)) == 2


def test_restarted_daemon_reports_the_same_last_success_and_stored_backups(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """The metrics are rebuilt from disk: a restart changes no last-success or stored value."""
    policy, listen = daemon_policy(
        tmp_path, sandbox, None, {"hourly": hourly_far_away(), "daily": daily_far_away()}
    )
    made = run_cli("backup", "--tier", "daily", config=policy)
    assert made.returncode == 0, made.stderr
    first = start_daemon(policy)
    caught_up = first.wait_for_backups(1)[0]
    assert caught_up["tiers"] == ["hourly"]  # daily's backup is newer than its last run
    before = scrape(listen)
    first.send(signal.SIGTERM)
    assert first.wait_exit() == 0

    notified = notify_socket.mark()
    second = start_daemon(policy)
    notify_socket.wait_for(has("READY", "1"), "READY=1 from the restarted daemon", notified)
    after = scrape_when_up(listen)

    heads = manifests(sandbox.backup_dir)
    assert len(heads) == 2
    for tier, head in zip(("daily", "hourly"), heads, strict=True):
        name = "sovbackupd_last_success_timestamp_seconds"
        assert after.value(name, tier=tier) == before.value(name, tier=tier), tier
        assert after.value(name, tier=tier) == pytest.approx(timestamp(head["finished"]), abs=1e-3)
    for name in ("sovbackupd_backups_stored", "sovbackupd_backups_stored_bytes"):
        assert after.value(name, location="local") == before.value(name, location="local")
    assert after.value("sovbackupd_backups_stored", location="local") == 2
    size = "sovbackupd_last_backup_size_bytes"
    assert after.value(size) == before.value(size) > 0
    assert second.named("backup.started") == []


def test_hanging_hook_and_dead_webhook_are_bounded_counted_and_block_no_backup(
    tmp_path: Path, sandbox: Sandbox, start_daemon: Callable[[Path], DaemonProcess]
) -> None:
    """A hanging hook is killed, a dead webhook retried and counted; backups keep landing."""
    hanging = tmp_path / "hanging-hook.pid"
    script = (
        f"import os, time; open({str(hanging)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(60)"
    )
    hook = [sys.executable, "-c", script]
    policy, listen = daemon_policy(
        tmp_path,
        sandbox,
        None,
        {"hourly": "*/2 * * * * *"},
        hooks={"after_backup": [hook], "timeout_seconds": 1},
        notify=[
            {
                "type": "webhook",
                "url": f"http://127.0.0.1:{free_port()}/ping",
                "on": ["success", "failure"],
                "retries": 1,
                "timeout_seconds": 0.5,
            }
        ],
    )
    daemon = start_daemon(policy)
    daemon.wait_for_backups(3)
    pids = [int(line) for line in hanging.read_text().split()]
    assert len(pids) >= 2, "the hook ran after each backup"
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids[:-1]), "hooks killed")
    hook_failed = daemon.wait_for("hook.failed", stage="after_backup")
    assert hook_failed["timed_out"] is True
    failed = daemon.wait_for("notify.failed")
    assert failed["attempts"] == 2
    assert "/ping" not in json.dumps(failed), "the ping URL's path may be a secret"
    metrics = scrape_when_up(listen)
    assert metrics.value("sovbackupd_hook_runs_total", stage="after_backup", result="failure") >= 2
    assert metrics.value("sovbackupd_notifications_total", result="failure") >= 1
    assert metrics.value("sovbackupd_backups_total", result="success") >= 3


def test_scheduled_test_restore_passes_sets_its_metrics_and_survives_a_restart(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """test_restore.schedule drills the newest backup; a restart reports the last result."""
    policy, listen = daemon_policy(
        tmp_path,
        sandbox,
        redis_server,
        {"daily": daily_far_away()},
        test_restore={"schedule": EVERY_2_SECONDS},
    )
    daemon = start_daemon(policy)
    daemon.wait_for_backups(1)
    drilled = daemon.wait_for("test_restore.finished")
    assert drilled["result"] == "success", drilled
    passed = scrape(listen)
    assert passed.value("sovbackupd_restore_test_last_result") == 1
    when = passed.value("sovbackupd_restore_test_last_success_timestamp_seconds")
    assert when == pytest.approx(time.time(), abs=WAIT_SECONDS)
    assert not (sandbox.backup_dir / ".staging").exists()
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0

    rewrite(policy, test_restore={"schedule": NEW_YEAR})
    notified = notify_socket.mark()
    start_daemon(policy)
    notify_socket.wait_for(has("READY", "1"), "READY=1 from the restarted daemon", notified)
    after = scrape_when_up(listen)
    assert after.value("sovbackupd_restore_test_last_result") == 1
    last = after.value("sovbackupd_restore_test_last_success_timestamp_seconds")
    assert last >= when


def test_daemon_reads_a_held_retention_from_disk_at_start(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """A collapsed newest backup on disk sets retention_held from the first scrape."""
    policy, listen = daemon_policy(tmp_path, sandbox, None, {"daily": daily_far_away()})
    for _ in range(3):
        assert run_cli("backup", config=policy).returncode == 0
    (sandbox.app / "data" / "nested" / "deeper" / "blob.bin").unlink()
    collapsed = run_cli("backup", config=policy)
    assert collapsed.returncode == 0, collapsed.stderr

    notified = notify_socket.mark()
    start_daemon(policy)
    notify_socket.wait_for(has("READY", "1"), "READY=1", notified)

    assert scrape_when_up(listen).value("sovbackupd_retention_held") == 1


# 5. Tier state across restarts under the default policy.

DEFAULT_SCHEDULES = {
    "hourly": "0 * * * *",
    "daily": "0 2 * * *",
    "weekly": "0 3 * * 0",
    "monthly": "0 4 1 * *",
}
DEFAULT_KEEPS = {"hourly": 24, "daily": 30, "weekly": 12, "monthly": 12, "yearly": 7}
RARE_TIERS = ("daily", "weekly", "monthly")
BACKUP_SECONDS = 40


@dataclass(frozen=True)
class History:
    """The backups a daemon under the default policy made since a start two days ago."""

    heads: list[Manifest]
    kept: list[Manifest]  # what GFS retention left of them

    def last(self, tier: str, heads: list[Manifest] | None = None) -> Manifest | None:
        """Return the newest backup labelled *tier* among *heads* (all of them by default)."""
        labelled = [head for head in heads or self.heads if tier in head.tiers]
        return labelled[-1] if labelled else None


def simulate_history(policy: Policy, now: datetime) -> History:
    """Replay two days of the policy's schedules from a first start, then its retention."""
    triggers = scheduler.tier_triggers(_schedules_of(policy), policy.zone)
    first = (now - timedelta(days=2)).replace(second=0, microsecond=0)
    runs: dict[datetime, list[str]] = {first: list(triggers)}  # a new server's catch-up
    for tier, trigger in triggers.items():
        moment = trigger.get_next_fire_time(None, first + timedelta(seconds=1))
        while moment is not None and moment <= now - timedelta(seconds=BACKUP_SECONDS):
            runs.setdefault(moment.astimezone(UTC), []).append(tier)
            moment = trigger.get_next_fire_time(None, moment + timedelta(seconds=1))
    heads = [
        Manifest(
            id=f"{policy.name_prefix}_{moment.astimezone(UTC):%Y%m%d_%H%M%S}",
            created=moment,
            finished=moment + timedelta(seconds=BACKUP_SECONDS),
            tiers=sorted(tiers, key=list(triggers).index),
            host="simulated",
            tool_version=__version__,
            compression="gzip",
            sources=[],
            file_count=0,
            file_bytes=0,
        )
        for moment, tiers in sorted(runs.items())
    ]
    candidates = [gfs.Candidate(head.id, head.created, ok=True) for head in heads]
    decisions = gfs.decide(candidates, gfs.Rules.from_policy(policy), policy.zone, now=now)
    kept = {decision.name for decision in decisions if decision.keep}
    return History(heads, [head for head in heads if head.id in kept])


def _schedules_of(policy: Policy) -> dict[str, str]:
    return {
        name: tier.schedule
        for name, tier in policy.tiers.configured().items()
        if tier.schedule is not None
    }


def labels_mislead(policy: Policy, history: History, now: datetime) -> bool:
    """Tell whether the kept archives' labels alone would re-run or misdate a rare tier."""
    triggers = scheduler.tier_triggers(_schedules_of(policy), policy.zone)
    from_labels = {
        tier: (head.finished if (head := history.last(tier, history.kept)) else None)
        for tier in triggers
    }
    true = {tier: head.finished for tier in triggers if (head := history.last(tier))}
    rerun = set(scheduler.due_tiers(triggers, from_labels, now)) & set(RARE_TIERS)
    misdated = any(from_labels[tier] != true.get(tier) for tier in RARE_TIERS)
    quiet = all(  # no rare tier fires while the test runs
        trigger.get_next_fire_time(None, now) > now + timedelta(minutes=10)
        for tier, trigger in triggers.items()
        if tier in RARE_TIERS
    )
    return bool(rerun) and misdated and quiet


def write_simulated_backups(backup_dir: Path, kept: list[Manifest]) -> None:
    """Lay out *kept* as committed backups: archive, checksum sidecar and manifest."""
    backup_dir.mkdir(mode=0o700, exist_ok=True)
    for head in kept:
        archive_path = backup_dir / f"{head.id}.tar.gz"
        archive_path.write_bytes(b"simulated archive\n" * 1000)
        (backup_dir / f"{head.id}.tar.gz.sha256").write_text(f"{'0' * 64}  {archive_path.name}\n")
        (backup_dir / f"{head.id}.manifest.json").write_text(head.model_dump_json())


def test_restart_two_days_into_the_default_policy_reruns_no_tier_and_keeps_last_success(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """Retention deleted the daily/weekly/monthly-labelled archives; the tier state remembers."""
    now = datetime.now(UTC)
    listen = f"127.0.0.1:{free_port()}"
    # A zone where the labels left on disk do mislead (they do unless today is both a
    # Sunday and the 1st there) and no rare tier is due within the test.
    for offset in (0, *range(-12, 15)):
        zone = f"Etc/GMT{-offset:+d}" if offset else "UTC"
        data = policy_data(
            sandbox,
            None,
            timezone=zone,
            tiers={
                tier: {
                    "keep": keep,
                    **({"schedule": DEFAULT_SCHEDULES[tier]} if tier in DEFAULT_SCHEDULES else {}),
                }
                for tier, keep in DEFAULT_KEEPS.items()
            },
            metrics={"listen": listen},
        )
        policy_path = write_policy(tmp_path / "policy.yaml", data)
        policy = config.load(policy_path)
        history = simulate_history(policy, now)
        if labels_mislead(policy, history, now):
            break
    else:
        pytest.fail("no time zone makes the archives' labels mislead; the test needs one")
    write_simulated_backups(sandbox.backup_dir, history.kept)
    records = {}
    for tier in DEFAULT_SCHEDULES:
        head = history.last(tier)
        assert head is not None
        records[tier] = TierRecord(last_attempt=head.created, last_success=head.finished)
    tierstate.write(sandbox.backup_dir, records)

    daemon = start_daemon(policy_path)
    notify_socket.wait_for(has("READY", "1"), "READY=1")
    metrics = scrape_when_up(listen)
    for tier in RARE_TIERS:
        head = history.last(tier)
        assert head is not None
        success = metrics.value("sovbackupd_last_success_timestamp_seconds", tier=tier)
        attempt = metrics.value("sovbackupd_last_attempt_timestamp_seconds", tier=tier)
        assert success == pytest.approx(head.finished.timestamp(), abs=1e-3), tier
        assert attempt == pytest.approx(head.created.timestamp(), abs=1e-3), tier
    caught_up = daemon.wait_for("schedule.catch_up")
    assert set(caught_up["tiers"]) & set(RARE_TIERS) == set()
    started = [event["tiers"] for event in daemon.named("backup.started")]
    assert all(set(tiers) <= {"hourly"} for tiers in started), started


# 6. The metrics endpoint under idle clients.

HALF_OPEN_CONNECTIONS = 1000


def thread_count(pid: int) -> int:
    """Return how many threads process *pid* runs."""
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_a_thousand_half_sent_requests_neither_grow_the_daemon_nor_block_metrics(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """Idle clients cost the daemon no thread each; /metrics answers while they hang on."""
    policy, listen = daemon_policy(tmp_path, sandbox, None, {"daily": daily_far_away()})
    made = run_cli("backup", "--tier", "daily", config=policy)  # nothing to catch up
    assert made.returncode == 0, made.stderr
    daemon = start_daemon(policy)
    notify_socket.wait_for(has("READY", "1"), "READY=1")
    scrape_when_up(listen)
    threads = thread_count(daemon.process.pid)
    host, port = listen.rsplit(":", 1)
    held = []
    try:
        for _ in range(HALF_OPEN_CONNECTIONS):
            connection = socket.create_connection((host, int(port)), timeout=30)
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            held.append(connection)
        # Served after every connection before it was accepted (accept order is FIFO).
        assert scrape(listen).value("sovbackupd_backups_stored", location="local") == 1
        assert thread_count(daemon.process.pid) <= threads + 2  # a housekeeping job, at most
    finally:
        for connection in held:
            connection.close()
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0


# 7. Hostile policies and state files: logged and refused, and the daemon lives on.


def hostile_policies(policy: Path, tmp_path: Path, sandbox: Sandbox) -> dict[str, tuple[str, str]]:
    """Return policy texts that once crashed, hung or fooled the daemon, by what they are.

    With each comes what its first problem must start with: the policy's path and line,
    or for a backup_dir that is a file, the backup_dir.
    """
    base = yaml.safe_load(policy.read_text())
    valid = policy.read_text()
    bomb = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"l{n}: &l{n} [{','.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 8)]
    http_redis = {**base, "sources": {**base["sources"], "redis": {"url": "http://cache:6379"}}}
    no_passphrase = {**base, "encryption": {"gpg": {"passphrase_file": str(tmp_path / "absent")}}}
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    texts = {
        "alias bomb": "\n".join(bomb) + "\n",
        "3000-deep nesting": "sources:\n  dirs: " + "[" * 3000 + "]" * 3000 + "\n",
        "5000-digit integer": valid + "workers: " + "9" * 5000 + "\n",
        "infinite misfire grace": valid + "daemon: {misfire_grace_seconds: .inf}\n",
        "duplicate key": valid + f"backup_dir: {tmp_path / 'elsewhere'}\n",
        "http redis url": yaml.safe_dump(http_redis),
        "missing passphrase file": yaml.safe_dump(no_passphrase),
        "missing sqlite database": valid.replace(str(sandbox.database), "/nonexistent.db"),
        "NUL in a hook's argv": valid + 'hooks: {before_backup: [["true\\0"]]}\n',
        "schedule that never fires": yaml.safe_dump(
            {**base, "tiers": {"daily": {"schedule": "0 0 31 2 *", "keep": 1}}}
        ),
        "redis url with a bad port": yaml.safe_dump(
            {**base, "sources": {**base["sources"], "redis": {"url": "redis://cache:port/0"}}}
        ),
    }
    hostile = {what: (text, f"{policy}:") for what, text in texts.items()}
    hostile["backup_dir that is a file"] = (
        yaml.safe_dump({**base, "backup_dir": str(a_file)}),
        f"backup_dir {a_file} cannot be read",
    )
    return hostile


def test_sighup_with_each_hostile_policy_is_refused_and_the_daemon_serves_on(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """Each hostile policy fails its reload as config.reload_failed; the old schedule stays.

    Alias bombs, deep nesting, huge or infinite numbers, repeated keys and missing files
    once crashed the daemon, blew up its memory or passed; now it serves on through all.
    """
    policy, listen = daemon_policy(tmp_path, sandbox, None, {"daily": daily_far_away()})
    daemon = start_daemon(policy)
    daemon.wait_for_backups(1)
    scheduled = scrape_when_up(listen).value(NEXT_RUN, tier="daily")
    valid = policy.read_text()

    for what, (text, first) in hostile_policies(policy, tmp_path, sandbox).items():
        policy.write_text(text)
        mark, notified = daemon.mark(), notify_socket.mark()
        daemon.send(signal.SIGHUP)
        failed = daemon.wait_for("config.reload_failed", mark)
        assert failed["problems"][0].startswith(first), (what, failed)
        assert "exception" not in failed, (what, failed)  # an expected failure: no traceback
        reloading, _ = notify_socket.wait_for(has("RELOADING", "1"), "RELOADING=1", notified)
        notify_socket.wait_for(has("READY", "1"), f"READY=1 after the {what}", reloading + 1)
        assert daemon.process.poll() is None, what
        metrics = scrape(listen)
        assert metrics.value("sovbackupd_config_last_reload_success") == 0, what
        assert metrics.value(NEXT_RUN, tier="daily") == scheduled, what

    # A FIFO in the policy's place blocked the reload's open(): the daemon hung for good.
    policy.unlink()
    os.mkfifo(policy)
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    failed = daemon.wait_for("config.reload_failed", mark)
    assert failed["problems"] == [f"policy file {policy} is not a regular file"], failed
    policy.unlink()

    policy.write_text(valid)
    rewrite(policy, tiers={"daily": {"schedule": NEW_YEAR, "keep": 100}})
    mark, notified = daemon.mark(), notify_socket.mark()
    daemon.send(signal.SIGHUP)
    daemon.wait_for("config.reloaded", mark)
    reloading, _ = notify_socket.wait_for(has("RELOADING", "1"), "RELOADING=1", notified)
    notify_socket.wait_for(has("READY", "1"), "READY=1 after the valid reload", reloading + 1)
    new_year = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC).timestamp()
    assert scrape(listen).value(NEXT_RUN, tier="daily") == new_year
    assert daemon.named("daemon.stopped") == []


def test_daemon_refuses_to_start_on_a_policy_naming_a_missing_file(
    tmp_path: Path, sandbox: Sandbox, start_daemon: Callable[[Path], DaemonProcess]
) -> None:
    """A missing passphrase file stops `run` at start with exit 78 and one line per problem."""
    absent = tmp_path / "passphrase"
    policy, _ = daemon_policy(
        tmp_path,
        sandbox,
        None,
        {"daily": daily_far_away()},
        encryption={"gpg": {"passphrase_file": str(absent)}},
    )
    daemon = start_daemon(policy)
    assert daemon.wait_exit() == 78
    assert daemon.stderr().splitlines() == [
        f"sovbackupd: config error: {policy}:{passphrase_line(policy)}: "
        f"encryption.gpg.passphrase_file: {absent} does not exist"
    ]
    assert list(sandbox.backup_dir.glob("*.tar*")) == []


def passphrase_line(policy: Path) -> int:
    """Return the line of the passphrase_file key in *policy*."""
    lines = policy.read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if "passphrase_file" in line)


@pytest.mark.parametrize(
    "state",
    [
        b'{"backup": "b", "ok": true, "finished": 1.0, "last_success": "yesterday"}',
        b"not json at all",
        b"[1, 2, 3]",
        b"[" * 100_000,
    ],
    ids=["a word for a time", "not json", "a list", "deeply nested"],
)
def test_daemon_starts_past_a_corrupt_test_restore_state_and_says_so(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
    state: bytes,
) -> None:
    """A damaged .sovbackupd-test-restore.json is one warning; the daemon becomes ready."""
    sandbox.backup_dir.mkdir(mode=0o700, exist_ok=True)
    path = sandbox.backup_dir / ".sovbackupd-test-restore.json"
    path.write_bytes(state)
    policy, listen = daemon_policy(tmp_path, sandbox, None, {"daily": NEW_YEAR})
    daemon = start_daemon(policy)
    notify_socket.wait_for(has("READY", "1"), "READY=1 despite the corrupt state file")
    (ignored,) = daemon.named("state.ignored")
    assert ignored["path"] == str(path)
    assert ignored["level"] == "warning"
    assert math.isnan(scrape_when_up(listen).value("sovbackupd_restore_test_last_result"))
