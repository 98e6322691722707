"""One backup run: sources -> archive -> checksums, under the directory's lock.

The CLI and the daemon both call :func:`run`: there is one code path for a backup,
whoever starts it.
"""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

import structlog

from sovbackupd import (
    __version__,
    archive,
    auth,
    crypto,
    hooks,
    notify,
    retention,
    sources,
    tierstate,
)
from sovbackupd import policy as gfs
from sovbackupd.config import files, layout
from sovbackupd.config.models import Policy
from sovbackupd.errors import (
    AbortedError,
    ArchiveError,
    ConfigError,
    HookError,
    SovbackupdError,
)
from sovbackupd.manifest import INFO_NAME, MANIFEST_NAME, MANUAL_TIER, Manifest, SourceResult
from sovbackupd.metrics import Metrics
from sovbackupd.sources import Estimate, SourceReport
from sovbackupd.store import Store, StoredBackup, check_free_space, human_size

log = structlog.get_logger("sovbackupd.backup")
SPACE_MARGIN_BYTES = 1 << 20  # manifest, sidecars and tar padding beyond the estimate
HISTORY_BACKUPS = 5  # the newest backups whose compression ratio predicts the next one's
RATIO_SAFETY = 1.5  # data compresses worse than last time: room for 50% more than the ratio
MIN_RATIO = 0.01  # no history claims more than 100:1, however absurd its manifest


@dataclass(frozen=True)
class BackupResult:
    """A committed backup."""

    name: str
    path: Path
    size: int
    sha256: str
    duration_seconds: float
    manifest: Manifest  # without its files: they can be many; read them from the archive
    retention: retention.Outcome | None = None
    """What the retention after this backup did; None when it failed (logged)."""

    @property
    def warnings(self) -> list[str]:
        """Return every warning the sources reported."""
        return [warning for source in self.manifest.sources for warning in source.warnings]


def describe(manifest: Manifest, archive_name: str, file_count: int, file_bytes: int) -> str:
    """Return backup_info.txt: the backup explained to a person holding only the archive."""
    lines = [
        "SovereignCore backup made by sovbackupd",
        "",
        f"Name:     {manifest.id}",
        f"Created:  {manifest.created.isoformat()}",
        f"Finished: {manifest.finished.isoformat()}",
        f"Host:     {manifest.host}",
        f"Tiers:    {', '.join(manifest.tiers)}",
        f"Tool:     sovbackupd {manifest.tool_version}",
        f"Files:    {file_count}, {human_size(file_bytes)} before compression "
        f"({manifest.compression})",
        "",
        "Sources:",
    ]
    for source in manifest.sources:
        details = ", ".join(
            f"{key}={value}" for key, value in source.details.items() if value not in ({}, [])
        )
        lines.append(f"  {source.name:<8} {details or 'ok'}")
        lines.extend(f"    warning: {warning}" for warning in source.warnings)
    lines += [
        "",
        "Restore:",
        f"  sovbackupd restore {manifest.id}",
        f"  or by hand: tar -xf {archive_name}, then copy {manifest.id}/redis_dump.rdb",
        f"  and {manifest.id}/<database>.db into place, and directories with cp -a,",
        "  dotfiles included (config/* would skip .env):",
        f"  cp -a {manifest.id}/config/. /opt/sovereigncore/",
        "",
        f"Every file's origin, size, mode and sha256 are in {MANIFEST_NAME}.",
    ]
    return "\n".join(lines) + "\n"


def _preflight(built: Sequence[sources.Source]) -> Estimate:
    total = Estimate(0)
    for source in built:
        total += source.preflight()
    return total


def compression_ratio(store: Store, archive_suffix: str) -> float | None:
    """Return the highest stored/source size ratio of the newest backups, None without any.

    Only the HISTORY_BACKUPS newest backups stored like the next one (same compression
    and encryption, from the archive's suffix) count. Their manifests are untrusted: one
    that is unreadable or whose numbers make no ratio is skipped, and the ratio is kept within
    [MIN_RATIO, 1], so no manifest can make the estimate zero, negative or worse than
    the uncompressed size.
    """
    alike = [stored for stored in store.backups() if stored.path.name.endswith(archive_suffix)]
    ratios: list[float] = []
    for stored in alike[-HISTORY_BACKUPS:]:
        head = stored.head()
        if head is None or head.file_bytes <= 0 or stored.size <= 0:
            continue
        ratios.append(min(max(stored.size / head.file_bytes, MIN_RATIO), 1.0))
    return max(ratios) if ratios else None


def space_needed(estimate: Estimate, ratio: float | None) -> int:
    """Return the bytes a backup of *estimate* may need on disk.

    With a *ratio* from history, the archive is expected at that ratio plus a safety
    margin; without one, at the worst case: uncompressed. Staged copies are never
    compressed.
    """
    archived = estimate.archived_bytes
    if ratio is not None:
        archived = min(archived, math.ceil(archived * ratio * RATIO_SAFETY))
    return archived + estimate.staged_bytes + SPACE_MARGIN_BYTES


def _hooks(
    stage: str,
    policy: Policy,
    env: dict[str, str],
    metrics: Metrics | None,
    cancel: threading.Event | None = None,
) -> list[hooks.HookResult]:
    commands = getattr(policy.hooks, stage)
    results = hooks.run(
        stage,
        commands,
        policy.hooks.timeout_seconds,
        env,
        stop_on_failure=stage == "before_backup",
        cancel=cancel,
    )
    if metrics is not None:
        for result in results:
            metrics.hook_ran(stage, result.ok)
    return results


def _notify(
    policy: Policy,
    event: Literal["success", "failure"],
    payload: dict[str, object],
    metrics: Metrics | None,
) -> None:
    for delivery in notify.send(policy.notify, event, payload):
        if metrics is not None:
            metrics.notified(delivery.ok)


def _before_hooks(
    policy: Policy, env: dict[str, str], metrics: Metrics | None, cancel: threading.Event | None
) -> None:
    """Run the before_backup hooks; raise HookError at the first that fails.

    Setting *cancel* kills the running hook and raises AbortedError.
    """
    for result in _hooks("before_backup", policy, env, metrics, cancel):
        if result.cancelled:
            raise AbortedError(f"backup cancelled during before_backup hook {result.argv[0]}")
        if not result.ok:
            raise HookError(f"before_backup hook {' '.join(result.argv)} failed: {result.failure}")


def run(
    policy: Policy,
    tiers: Sequence[str] = (MANUAL_TIER,),
    *,
    on_progress: archive.ProgressCallback | None = None,
    on_estimate: archive.ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    metrics: Metrics | None = None,
    redis_offline: bool = False,
    pin: gfs.Pin | None = None,
    on_committed: Callable[[str], None] | None = None,
) -> BackupResult:
    """Back up every source of *policy* into one new archive labelled with *tiers*.

    The policy's hooks run around it (a failing before_backup hook fails the backup) and
    its webhooks hear the result. Raise a SovbackupdError subclass on failure; then no
    new archive, sidecar or temp file is left behind. Setting *cancel* aborts the run the
    same way. *metrics*, when given (the daemon's), records the attempt and its result.
    *redis_offline* archives a stopped Redis server's files (a restore's safety backup).
    *pin* pins the new backup before retention runs; a pin that cannot be written fails
    the run, though the archive stays (the error names it). *on_committed* hears the
    new backup's name as soon as it is complete, before the after_backup hooks and the
    webhooks: whatever interrupts those, the caller can say that the backup exists.
    """
    started = time.monotonic()
    if metrics is not None:
        metrics.backup_started(tiers)
    env = {"SOVBACKUPD_TIERS": ",".join(tiers)}
    payload: dict[str, object] = {
        "event": "backup.finished",
        "host": socket.gethostname(),
        "tiers": list(tiers),
    }
    try:
        _before_hooks(policy, env, metrics, cancel)
        result = _run(
            policy,
            tiers,
            on_progress=on_progress,
            on_estimate=on_estimate,
            cancel=cancel,
            metrics=metrics,
            started=started,
            redis_offline=redis_offline,
            pin=pin,
        )
    except Exception as error:
        if metrics is not None:
            metrics.backup_failed()
        log.info(
            "backup.finished",
            result="failure",
            tiers=list(tiers),
            error=str(error),
            duration_seconds=round(time.monotonic() - started, 3),
        )
        env.update(SOVBACKUPD_RESULT="failure", SOVBACKUPD_ERROR=str(error))
        _hooks("on_failure", policy, env, metrics)
        _notify(policy, "failure", {**payload, "result": "failure", "error": str(error)}, metrics)
        raise
    if on_committed is not None:
        on_committed(result.name)
    if metrics is not None:
        metrics.backup_succeeded(result.manifest, result.size, result.duration_seconds)
        metrics.set_local(Store(policy.backup_dir, policy.name_prefix).backups())
        metrics.refresh_disk(policy.backup_dir)
    log.info(
        "backup.finished",
        result="success",
        backup=result.name,
        tiers=list(tiers),
        size=result.size,
        duration_seconds=round(result.duration_seconds, 3),
        warnings=len(result.warnings),
    )
    env.update(
        SOVBACKUPD_RESULT="success",
        SOVBACKUPD_BACKUP=result.name,
        SOVBACKUPD_ARCHIVE=str(result.path),
    )
    _hooks("after_backup", policy, env, metrics)
    _notify(
        policy,
        "success",
        {
            **payload,
            "result": "success",
            "backup": result.name,
            "size": result.size,
            "duration_seconds": round(result.duration_seconds, 3),
            "warnings": len(result.warnings),
        },
        metrics,
    )
    return result


def _check_layout(policy: Policy) -> None:
    """Refuse to back up when the layout on disk no longer holds; raise ConfigError.

    check-config, start and reload checked it, but a data dir replaced since by a link
    into backup_dir (or a CLI backup, which skips those checks) would archive every
    earlier backup and its own ``.partial`` into the new one.
    """
    if problems := files.unrestorable(policy):
        lines = tuple(f"{layout.dotted(location)}: {message}" for location, message in problems)
        raise ConfigError(lines[0], lines)


def _retain(store: Store, policy: Policy, metrics: Metrics | None) -> retention.Outcome | None:
    """Apply retention after a committed backup; its failure never fails the backup."""
    try:
        return retention.apply(store, policy, dry_run=False, metrics=metrics)
    except (OSError, SovbackupdError) as error:
        log.warning("retention.failed", error=str(error))
        return None


def _run(
    policy: Policy,
    tiers: Sequence[str],
    *,
    on_progress: archive.ProgressCallback | None,
    on_estimate: archive.ProgressCallback | None,
    cancel: threading.Event | None,
    metrics: Metrics | None,
    started: float,
    redis_offline: bool,
    pin: gfs.Pin | None,
) -> BackupResult:
    store = Store(policy.backup_dir, policy.name_prefix)
    with store.lock():
        tierstate.record_attempt(policy.backup_dir, tiers, datetime.now(UTC))
        _check_layout(policy)
        key = auth.signing_key(policy)  # a key file refused or lost fails before the work
        for leftover in store.clean_leftovers():
            log.info("store.leftover_removed", path=str(leftover))
        built = sources.build_all(
            policy.sources, redis_offline=redis_offline, backup_dir=policy.backup_dir
        )
        estimate = _preflight(built)
        ratio = compression_ratio(store, policy.archive_suffix)
        needed = space_needed(estimate, ratio)
        check_free_space(policy.backup_dir, needed)
        if on_estimate is not None:
            on_estimate(estimate.read_bytes)
        name, created = store.free_name(datetime.now(UTC))
        bound = log.bind(backup=name, tiers=list(tiers))
        bound.info(
            "backup.started",
            estimated_bytes=estimate.archived_bytes,
            compression_ratio=None if ratio is None else round(ratio, 4),
            space_needed_bytes=needed,
        )
        path = policy.backup_dir / f"{name}{policy.archive_suffix}"
        staging = store.staging(name)
        try:
            with archive.Writer(
                path,
                policy.compression,
                name,
                on_progress=on_progress,
                cancel=cancel,
                encryption=policy.gpg,
            ) as writer:
                reports = []
                for source in built:
                    report = SourceReport(source.component, source.name)
                    with closing(source.members(staging, report)) as members:
                        for member in members:
                            writer.add(member, report)
                    reports.append(report)
                    bound.info("source.captured", source=source.name, warnings=len(report.warnings))
                # The total was a guess: end the count on what was read, so it shows 100%.
                if on_estimate is not None:
                    on_estimate(writer.read_bytes)
                if on_progress is not None:
                    on_progress(writer.read_bytes)
                head = Manifest(
                    id=name,
                    created=created,
                    finished=datetime.now(UTC),
                    tiers=list(tiers),
                    host=socket.gethostname(),
                    tool_version=__version__,
                    compression=policy.compression,
                    sources=[
                        SourceResult(
                            component=report.component,
                            name=report.name,
                            details=report.details,
                            warnings=report.warnings,
                        )
                        for report in reports
                    ],
                    file_count=writer.file_count,
                    file_bytes=writer.file_bytes,
                )
                info = describe(head, path.name, writer.file_count, writer.file_bytes)
                # Names in warnings come quoted; a name that is not UTF-8 anywhere else keeps
                # its bytes rather than failing the backup.
                writer.add_bytes(INFO_NAME, info.encode("utf-8", "surrogateescape"), time.time())
                stored = StoredBackup(name, path, created, 0)
                sha256 = writer.commit(
                    head, lambda written: _read_back(policy, stored, written, key)
                )
            tierstate.record_success(policy.backup_dir, tiers, head.finished)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not any(staging.parent.iterdir()):
                staging.parent.rmdir()
        if pin is not None:
            _pin(store, name, pin)
        outcome = _retain(store, policy, metrics)
    return BackupResult(
        name=name,
        path=path,
        size=path.stat().st_size,
        sha256=sha256,
        duration_seconds=time.monotonic() - started,
        manifest=head,
        retention=outcome,
    )


def _read_back(
    policy: Policy, stored: StoredBackup, written: IO[bytes], key: auth.Key | None
) -> None:
    """Read the manifest of *stored* back from disk as restore does, then sign it with *key*.

    Restore's own reader parses the manifest beside the archive (decrypting the full one
    of an encrypted backup) and restore's own rules check every entry (a safe name, under
    its component, put back where the policy backs up), so that a backup which restore
    would refuse fails here, before the archive takes its name and before retention
    counts it. A server that holds only public keys cannot decrypt its own backups: it
    checks the head on disk and the plaintext *written* into gpg. Raise ArchiveError
    naming the backup. Only a manifest that reads back is signed, so the record vouches
    for what restore reads. Without a *key* the policy's is created here: a backup that
    fails creates none.
    """
    # restore imports this module (its safety backup is a backup).
    from sovbackupd import restore  # noqa: PLC0415

    try:
        if policy.gpg is not None and not crypto.can_decrypt(policy.gpg):
            restore.load_head(stored)
            manifest = restore.validated(written.read(), stored.name)
        else:
            manifest = restore.load_manifest(stored, policy.gpg)
        restore.check_restorable(manifest, policy)
    except SovbackupdError as error:
        # Restore's messages start with the backup's name, which this one leads with.
        reason = str(error).removeprefix(f"backup {stored.name}: ").removeprefix(f"{stored.name}: ")
        raise ArchiveError(
            f"backup {stored.name} was discarded: its manifest does not read back as "
            f"restorable: {reason}"
        ) from error
    signer = key or auth.ensure_key(policy)
    auth.write(stored.path, stored.name, manifest.created, manifest.tiers, signer)


def _pin(store: Store, name: str, pin: gfs.Pin) -> None:
    """Pin the committed backup *name*; on failure say that the backup itself is there."""
    try:
        store.pin(name, pin.until, datetime.now(UTC))
    except SovbackupdError as error:
        raise SovbackupdError(
            f"backup {name} was made but not pinned ({error}); pin it with: sovbackupd pin {name}"
        ) from error
