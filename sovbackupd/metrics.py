"""Every Prometheus metric of sovbackupd, on a registry the caller injects.

Names are the contract in DESIGN.md (prefix ``sovbackupd_``); alerts and dashboards key
on them. Each labelled series is created as soon as its label value is known, so an
alert on a missing series never fires just because nothing happened yet.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sovbackupd import __version__
from sovbackupd.manifest import Manifest
from sovbackupd.store import StoredBackup
from sovbackupd.tierstate import TierRecord

PREFIX = "sovbackupd"
LOCAL = "local"
RESULTS = ("success", "failure")
HOOK_STAGES = ("before_backup", "after_backup", "on_failure")
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)


class Metrics:
    """The daemon's metrics and the few ways they change."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Create every metric on *registry*."""

        def gauge(name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, help_text, labels, namespace=PREFIX, registry=registry)

        def counter(name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, help_text, labels, namespace=PREFIX, registry=registry)

        self.registry = registry
        self._scheduled: set[str] = set()
        self.last_success = gauge(
            "last_success_timestamp_seconds",
            "When the last successful backup of each tier finished (0: never).",
            ["tier"],
        )
        self.last_attempt = gauge(
            "last_attempt_timestamp_seconds",
            "When a backup of each tier last started, whatever its result.",
            ["tier"],
        )
        self.last_size = gauge("last_backup_size_bytes", "Size of the newest successful archive.")
        self.last_duration = gauge(
            "last_backup_duration_seconds", "How long the newest successful backup took."
        )
        self.duration = Histogram(
            "backup_duration_seconds",
            "How long successful backups take.",
            namespace=PREFIX,
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self.backups = counter("backups_total", "Backups attempted, by result.", ["result"])
        self.in_progress = gauge("backup_in_progress", "1 while a backup runs.")
        self.disk_free = gauge("disk_free_bytes", "Free bytes on the backup disk.", ["path"])
        self.disk_total = gauge("disk_total_bytes", "Size of the backup disk.", ["path"])
        self.stored = gauge("backups_stored", "Backups kept, by location.", ["location"])
        self.stored_bytes = gauge(
            "backups_stored_bytes", "Bytes of the backups kept, by location.", ["location"]
        )
        self.retention_deleted = counter("retention_deleted_total", "Backups deleted by retention.")
        self.retention_held = gauge(
            "retention_held",
            "1 while the size guard holds retention (the newest backup collapsed in size).",
        )
        self.remote_last_success = gauge(
            "remote_last_success_timestamp_seconds",
            "When each remote last received a verified copy.",
            ["remote"],
        )
        self.remote_uploads = counter(
            "remote_uploads_total", "Uploads to remotes, by result.", ["remote", "result"]
        )
        self.restore_test_last_success = gauge(
            "restore_test_last_success_timestamp_seconds",
            "When a test restore last passed (0: never).",
        )
        self.restore_test_last_result = gauge(
            "restore_test_last_result",
            "1 if the last test restore passed, 0 if it failed, NaN before the first.",
        )
        self.restore_test_last_result.set(math.nan)
        self.reload_success = gauge(
            "config_last_reload_success", "1 if the last policy (re)load was valid, else 0."
        )
        self.reload_time = gauge(
            "config_last_reload_timestamp_seconds", "When the policy was last (re)loaded."
        )
        self.next_run = gauge("next_run_timestamp_seconds", "When each tier runs next.", ["tier"])
        self.tier_interval = gauge(
            "tier_interval_seconds",
            "Longest gap between two scheduled runs of each tier (the missed-backup yardstick).",
            ["tier"],
        )
        self.build_info = gauge("build_info", "The running version (always 1).", ["version"])
        self.hook_runs = counter(
            "hook_runs_total", "Hook commands run, by stage and result.", ["stage", "result"]
        )
        self.notifications = counter(
            "notifications_total", "Webhook deliveries, by result.", ["result"]
        )
        self.build_info.labels(version=__version__).set(1)
        for result in RESULTS:
            self.backups.labels(result=result)
            self.notifications.labels(result=result)
            for stage in HOOK_STAGES:
                self.hook_runs.labels(stage=stage, result=result)
        self.stored.labels(location=LOCAL)
        self.stored_bytes.labels(location=LOCAL)

    def declare_tiers(self, tiers: Iterable[str]) -> None:
        """Create the series of each scheduled tier, so alerts see them from the start.

        A tier a reload removed loses its next-run and interval series: left behind, its
        time would soon lie in the past and look like a missed run. The interval series
        appears only once the scheduler has computed it: at zero it would make any backup
        look missed.
        """
        scheduled = set(tiers)
        for tier in self._scheduled - scheduled:
            self.next_run.remove(tier)
            self.tier_interval.remove(tier)
        for tier in scheduled:
            self.last_success.labels(tier=tier)
            self.last_attempt.labels(tier=tier)
            self.next_run.labels(tier=tier)
        self._scheduled = scheduled

    def backup_started(self, tiers: Iterable[str]) -> None:
        """Record that a backup of *tiers* started now."""
        now = time.time()
        for tier in tiers:
            self.last_attempt.labels(tier=tier).set(now)
        self.in_progress.set(1)

    def backup_failed(self) -> None:
        """Record a failed backup."""
        self.in_progress.set(0)
        self.backups.labels(result="failure").inc()

    def backup_succeeded(self, manifest: Manifest, size: int, duration_seconds: float) -> None:
        """Record a committed backup described by *manifest*."""
        self.in_progress.set(0)
        self.backups.labels(result="success").inc()
        self.duration.observe(duration_seconds)
        self._newest(manifest, size)

    def _newest(self, manifest: Manifest, size: int) -> None:
        finished = manifest.finished.timestamp()
        for tier in manifest.tiers:
            self.last_success.labels(tier=tier).set(finished)
        self._sized(manifest, size)

    def _sized(self, manifest: Manifest, size: int) -> None:
        self.last_size.set(size)
        self.last_duration.set((manifest.finished - manifest.created).total_seconds())

    def rebuild(self, backups: Sequence[StoredBackup], tiers: Mapping[str, TierRecord]) -> None:
        """Set the last-attempt, last-success and stored metrics from the backup directory.

        *tiers* are the tiers' times as :func:`sovbackupd.tierstate.known` tells them: not
        the archives' labels alone, which retention deletes by period. A restarted daemon
        thereby reports what it reported before, and never fires a false "missed backup"
        alert.
        """
        for tier, record in tiers.items():
            if record.last_attempt is not None:
                self.last_attempt.labels(tier=tier).set(record.last_attempt.timestamp())
            if record.last_success is not None:
                self.last_success.labels(tier=tier).set(record.last_success.timestamp())
        for backup in reversed(backups):
            head = backup.head()
            # A restore's safety backup holds only what it replaced: not a tier's backup.
            if head is not None and not head.safety:
                self._sized(head, backup.size)
                break
        self.set_local(backups)

    def set_local(self, backups: Sequence[StoredBackup]) -> None:
        """Set how many backups the backup directory holds, and their bytes."""
        self.set_stored(LOCAL, len(backups), sum(backup.size for backup in backups))

    def set_stored(self, location: str, count: int, size: int) -> None:
        """Set how many backups *location* holds, and their bytes."""
        self.stored.labels(location=location).set(count)
        self.stored_bytes.labels(location=location).set(size)

    def declare_remotes(self, names: Iterable[str]) -> None:
        """Create each remote's series at zero, so that increase() sees its first failure."""
        for name in names:
            for result in RESULTS:
                self.remote_uploads.labels(remote=name, result=result)
            self.remote_last_success.labels(remote=name)

    def remote_uploaded(self, remote: str, ok: bool) -> None:
        """Count one backup uploaded to *remote* (archive, manifest, sidecar), or not."""
        self.remote_uploads.labels(remote=remote, result="success" if ok else "failure").inc()

    def remote_synced(self, remote: str) -> None:
        """Record that *remote* now holds a verified copy of every local backup."""
        self.remote_last_success.labels(remote=remote).set(time.time())

    def refresh_disk(self, path: Path) -> None:
        """Measure the disk holding *path*."""
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            return  # the directory is created with the first backup; nothing to measure yet
        self.disk_free.labels(path=str(path)).set(usage.free)
        self.disk_total.labels(path=str(path)).set(usage.total)

    def reloaded(self, success: bool) -> None:
        """Record a policy load or reload."""
        self.reload_success.set(1 if success else 0)
        self.reload_time.set(time.time())

    def restore_tested(self, ok: bool, last_success: float | None) -> None:
        """Record a test restore's result and when one last passed (None: never)."""
        self.restore_test_last_result.set(1 if ok else 0)
        if last_success is not None:
            self.restore_test_last_success.set(last_success)

    def hook_ran(self, stage: str, ok: bool) -> None:
        """Count one hook command."""
        self.hook_runs.labels(stage=stage, result="success" if ok else "failure").inc()

    def notified(self, ok: bool) -> None:
        """Count one webhook delivery."""
        self.notifications.labels(result="success" if ok else "failure").inc()
