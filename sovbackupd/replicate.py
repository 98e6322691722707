"""Off-site copies: every remote brought up to date with the local backups, then pruned.

One pass per remote lists what the remote holds, uploads each local backup it lacks
(newest first: archive, manifest, then the sidecar that marks it complete, each verified
on arrival), then applies the local GFS decision to the remote's complete backups, by
name. A remote that fails is reported and caught up on the next pass; it never fails the
local backup, which is already committed when a pass starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from sovbackupd import archive, auth, fsat, retention, targets
from sovbackupd import policy as gfs
from sovbackupd.config.models import Policy, Remote
from sovbackupd.errors import (
    AbortedError,
    ArchiveError,
    AuthError,
    NotFoundError,
    SovbackupdError,
    TransientTargetError,
)
from sovbackupd.manifest import MANUAL_TIER, Manifest, read_head
from sovbackupd.metrics import Metrics
from sovbackupd.store import Store, StoredBackup
from sovbackupd.verify import check
from sovbackupd.wording import plural

log = structlog.get_logger("sovbackupd.replicate")


@dataclass
class RemoteReport:
    """What one pass did on one remote."""

    remote: str
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    held: str | None = None
    """Why pruning was held (the size guard), when it was."""

    @property
    def ok(self) -> bool:
        """Tell whether every upload went through."""
        return not self.failures


def remote_config(policy: Policy, name: str) -> Remote:
    """Return the policy's remote called *name*."""
    for config in policy.remotes:
        if config.name == name:
            return config
    known = ", ".join(config.name for config in policy.remotes) or "none configured"
    raise NotFoundError(f"no remote named {name!r} in the policy (remotes: {known})")


def _replicated(backup: StoredBackup) -> bool:
    """Tell whether *backup* goes off-site: every backup but a restore's safety backup."""
    head = backup.head()
    return head is not None and not head.safety


def prune(
    target: targets.Target, decided: retention.Plan, held: list[targets.RemoteBackup]
) -> list[str]:
    """Delete from *target* the *held* backups that the plan *decided* drops.

    The plan (:func:`retention.remote_plan`) counts only complete backups (sidecar and
    manifest there, so verified on arrival) and never drops an incomplete one, which is
    left for the next upload to finish, nor a pinned one; while it is held, nothing goes.
    """
    doomed = set(decided.doomed)
    deleted = []
    for backup in held:
        if backup.name in doomed:
            targets.delete_backup(target, backup.archive.name)
            deleted.append(backup.name)
            log.info("remote.deleted", remote=target.name, backup=backup.name)
    return deleted


def _upload_missing(
    target: targets.Target,
    local: list[StoredBackup],
    complete: set[str],
    report: RemoteReport,
    *,
    metrics: Metrics | None,
    cancel: threading.Event | None,
) -> None:
    """Upload the local backups *target* lacks, newest first.

    A transient error (the remote is down, retried already) ends the pass; a permanent
    one (a local archive that no longer matches its sidecar) skips that backup only.
    """
    for backup in reversed(local):
        if cancel is not None and cancel.is_set():
            raise AbortedError(f"copying to {target.name} stopped: shutting down")
        if backup.name in complete or not _replicated(backup):
            continue
        try:
            targets.upload_backup(target, backup.path)
        except FileNotFoundError:
            continue  # pruned locally since the listing
        except TransientTargetError as error:
            _failed(report, backup, error, metrics)
            raise
        except SovbackupdError as error:
            _failed(report, backup, error, metrics)
            continue
        report.uploaded.append(backup.name)
        log.info("remote.uploaded", remote=target.name, backup=backup.name)
        if metrics is not None:
            metrics.remote_uploaded(target.name, ok=True)


def _whole(copy: targets.RemoteBackup, backup_dir: Path) -> bool:
    """Tell whether a remote *copy* is complete and holds every file its local backup has.

    A copy that lacks the encrypted manifest its local backup in *backup_dir* has (lost
    or deleted there) could not be restored: it is uploaded again.
    """
    if not copy.complete:
        return False
    return copy.encrypted_manifest is not None or not os.path.lexists(
        archive.encrypted_manifest_path(backup_dir / copy.archive.name)
    )


def _describe(remote: str, error: Exception) -> str:
    """Return *error* as one line that names *remote* once."""
    text = str(error)
    return text if text.startswith(f"remote {remote}") else f"remote {remote}: {text}"


def _failed(
    report: RemoteReport, backup: StoredBackup | None, error: Exception, metrics: Metrics | None
) -> None:
    """Record a failed upload (or, with no *backup*, a pass that could not even start).

    Logged at info: the caller reports the failures of a pass once, as a warning.
    """
    report.failures.append(_describe(report.remote, error))
    log.info(
        "remote.upload_failed",
        remote=report.remote,
        backup=backup.name if backup is not None else None,
        error=str(error),
    )
    if metrics is not None:
        metrics.remote_uploaded(report.remote, ok=False)


def sync(
    policy: Policy,
    config: Remote,
    *,
    metrics: Metrics | None = None,
    cancel: threading.Event | None = None,
) -> RemoteReport:
    """Bring the remote *config* up to date with the local backups, then prune it.

    Setting *cancel* stops the pass between two uploads.
    """
    report = RemoteReport(config.name)
    store = Store(policy.backup_dir, policy.name_prefix)
    target = targets.build_target(config)
    try:
        listed = targets.list_backups(target.list(), policy.name_prefix)
        local = store.backups()
        complete = {backup.name for backup in listed if _whole(backup, policy.backup_dir)}
        _upload_missing(target, local, complete, report, metrics=metrics, cancel=cancel)
        listed = targets.list_backups(target.list(), policy.name_prefix)
        decided = _plan(policy, target, listed, datetime.now(UTC))
        for name, why in decided.unauthenticated.items():
            log.warning("retention.unauthenticated", remote=config.name, backup=name, reason=why)
        report.held = decided.held
        report.deleted = prune(target, decided, listed)
        listed = [backup for backup in listed if backup.name not in report.deleted]
    except SovbackupdError as error:
        if not report.failures:
            # The listing or a deletion failed: the remote cannot take this pass's copies,
            # which counts as a failed upload, so that the alerts see a remote that is down.
            _failed(report, None, error, metrics)
        return report
    if metrics is not None:
        kept = [backup for backup in listed if backup.complete]
        metrics.set_stored(config.name, len(kept), sum(backup.archive.size for backup in kept))
        if report.ok:
            metrics.remote_synced(config.name)
    log.info(
        "remote.synced",
        remote=config.name,
        uploaded=len(report.uploaded),
        deleted=len(report.deleted),
        failures=len(report.failures),
    )
    return report


def run(
    policy: Policy, *, metrics: Metrics | None = None, cancel: threading.Event | None = None
) -> list[RemoteReport]:
    """Sync every remote of *policy*, one after the other; return what each pass did."""
    return [sync(policy, config, metrics=metrics, cancel=cancel) for config in policy.remotes]


def listing(
    policy: Policy, name: str, now: datetime
) -> tuple[list[targets.RemoteBackup], retention.Plan]:
    """Return the backups the remote *name* holds, oldest first, and retention's plan at *now*."""
    target = targets.build_target(remote_config(policy, name))
    held = targets.list_backups(target.list(), policy.name_prefix)
    return held, _plan(policy, target, held, now)


def _plan(
    policy: Policy, target: targets.Target, held: list[targets.RemoteBackup], now: datetime
) -> retention.Plan:
    """Decide at *now* what retention keeps of the copies *target* holds."""
    store = Store(policy.backup_dir, policy.name_prefix)
    local = store.backups()
    manual = _manual_copies(policy, target, held, {backup.name for backup in local}, now)
    records = _records(target, held, auth.policy_key(policy))
    return retention.remote_plan(
        policy, held, local, store.pins(), now, records=records, manual_copies=manual
    )


def _records(
    target: targets.Target, held: list[targets.RemoteBackup], key: auth.Key | None
) -> dict[str, auth.Status | str]:
    """Check the record of each complete copy on *target*: its status, or why it fails.

    Only the record is read (a few hundred bytes each), never the files it lists: what
    retention needs to tell our copies from another key's and from forgeries. A copy
    without a record is left out (unsigned).
    """
    checked: dict[str, auth.Status | str] = {}
    with tempfile.TemporaryDirectory(prefix="sovbackupd-records-") as scratch:
        path = Path(scratch) / "record.json"
        for backup in held:
            if backup.auth is None or not backup.complete:
                continue
            if backup.auth.size > auth.RECORD_LIMIT_BYTES:
                checked[backup.name] = (
                    f"backup {backup.name}: {backup.auth.name} is over "
                    f"{auth.RECORD_LIMIT_BYTES} bytes"
                )
                continue
            target.download(backup.auth.name, path)
            with path.open("rb") as handle:  # bounded: the remote may serve more than it listed
                data = handle.read(auth.RECORD_LIMIT_BYTES + 1)
            try:
                checked[backup.name] = auth.check_record(data, backup.auth.name, backup.name, key)
            except AuthError as error:
                checked[backup.name] = str(error)
    return checked


def _manual_copies(
    policy: Policy,
    target: targets.Target,
    held: list[targets.RemoteBackup],
    here: set[str],
    now: datetime,
) -> set[str]:
    """Return the copies that backup_dir lacks and whose manifest on *target* says manual.

    A hand-deleted or rebuilt backup_dir cannot say which copies are manual; their
    manifests can. Only copies young enough for ``manual_keep`` to hold them are read,
    and a manifest that does not parse leaves its copy to the rules.
    """
    window = gfs.Rules.from_policy(policy).manual_within
    if window is None:
        return set()
    manual = set()
    with tempfile.TemporaryDirectory(prefix="sovbackupd-manifests-") as scratch:
        for backup in held:
            young = now < window.after(backup.created, policy.zone)
            if backup.manifest is None or backup.name in here or not young:
                continue
            head = _remote_head(target, backup, Path(scratch))
            if head is not None and MANUAL_TIER in head.tiers:
                manual.add(backup.name)
    return manual


def _remote_head(
    target: targets.Target, backup: targets.RemoteBackup, scratch: Path
) -> Manifest | None:
    """Download the manifest of *backup* into *scratch*; return its head, None if unreadable."""
    if backup.manifest is None:
        return None
    path = scratch / "manifest.json"
    target.download(backup.manifest.name, path)
    try:
        return read_head(path)
    except (OSError, ValueError):
        log.info("remote.manifest_unreadable", remote=target.name, backup=backup.name)
        return None


def _pick(
    target: targets.Target, held: list[targets.RemoteBackup], name: str | None
) -> targets.RemoteBackup:
    """Return the complete backup called *name* on *target*; without a name, ``--latest``'s.

    That is the newest one that is not a pre-restore safety backup, as for a local
    ``--latest``: its manifest says so, read newest first until one is not. One whose
    manifest does not parse is chosen, and fails with its own error.
    """
    complete = [backup for backup in held if backup.complete]
    if name is not None:
        for backup in complete:
            if name in (backup.name, backup.archive.name):
                return backup
        raise NotFoundError(f"remote {target.name} holds no complete backup named {name!r}")
    if not complete:
        raise NotFoundError(f"remote {target.name} holds no complete backup")
    with tempfile.TemporaryDirectory(prefix="sovbackupd-manifests-") as scratch:
        for backup in reversed(complete):
            head = _remote_head(target, backup, Path(scratch))
            if head is None or not head.safety:
                return backup
    raise NotFoundError(
        f"remote {target.name} holds only "
        f"{plural(len(complete), 'pre-restore safety backup')}, which --latest never "
        f"chooses: name one (the newest is {complete[-1].name})"
    )


def fetch(policy: Policy, remote: str, name: str | None) -> StoredBackup:
    """Download backup *name* (by default ``--latest``'s) from *remote* into the backup dir.

    Its files land in staging first and are checked against the sidecar and its
    record (a forgery raises AuthError there and never reaches backup_dir, nor replaces
    a damaged local copy); the archive takes its final name last, as a backup made here
    would. A backup already here whose checksum holds is not downloaded again.
    """
    config = remote_config(policy, remote)
    target = targets.build_target(config)
    chosen = _pick(target, targets.list_backups(target.list(), policy.name_prefix), name)
    store = Store(policy.backup_dir, policy.name_prefix)
    with store.lock():
        present = next((item for item in store.backups() if item.name == chosen.name), None)
        if present is not None:
            try:
                archive.verify_checksum(present.path)
            except ArchiveError:
                log.warning("remote.local_copy_damaged", backup=present.name)
            else:
                return present
        staging = store.staging(f"fetch-{chosen.name}")
        try:
            files = _download(target, chosen, staging)
            archive.verify_checksum(files[0])
            auth.check(files[0], chosen.name, auth.policy_key(policy))
            for path in (*files[1:], files[0]):
                path.replace(policy.backup_dir / path.name)
            fsat.fsync_dir(policy.backup_dir)
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)
    log.info("remote.fetched", remote=remote, backup=chosen.name)
    return store.find(chosen.name)


def _download(target: targets.Target, backup: targets.RemoteBackup, into: Path) -> list[Path]:
    """Download the files *target* holds of *backup* into *into*; return them, archive first.

    Raise ArchiveError when the head says the manifest is encrypted and the remote lacks
    that file: the copy cannot be restored.
    """
    files = [
        path for path in targets.backup_files(into / backup.archive.name) if backup.holds(path)
    ]
    for path in files:
        target.download(path.name, path)
    manifest = archive.manifest_path(files[0])
    encrypted_copy = archive.encrypted_manifest_path(files[0])
    if manifest in files and encrypted_copy not in files:
        try:
            is_head = read_head(manifest).is_head
        except (OSError, ValueError):
            is_head = False  # restore names what is wrong with it
        if is_head:
            raise ArchiveError(
                f"remote {target.name}: {backup.name} is incomplete: {encrypted_copy.name} "
                "is missing, and the head says its manifest is encrypted there"
            )
    return files


@dataclass(frozen=True)
class RemoteVerdict:
    """The outcome of verifying one backup on a remote."""

    name: str
    ok: bool
    deep: bool
    problem: str | None = None


def verify(
    policy: Policy,
    remote: str,
    name: str | None,
    *,
    every: bool,
    deep: bool,
    trust_unsigned: bool = False,
) -> list[RemoteVerdict]:
    """Verify backups on *remote*: complete there, and their recorded sha256 the sidecar's.

    With *every*, all of them, newest first as ``list`` shows them. With *deep* each
    backup is downloaded to scratch space, its record checked (an unsigned one passes
    only with *trust_unsigned*) and verified member by member (decrypted first when
    encrypted), then removed.
    """
    config = remote_config(policy, remote)
    target = targets.build_target(config)
    held = targets.list_backups(target.list(), policy.name_prefix)
    chosen = held[::-1] if every else [_pick(target, held, name)]
    return [_verify_one(policy, target, backup, deep, trust_unsigned) for backup in chosen]


def _verify_one(
    policy: Policy,
    target: targets.Target,
    backup: targets.RemoteBackup,
    deep: bool,
    trust_unsigned: bool,
) -> RemoteVerdict:
    if not backup.complete:
        problem = f"{backup.archive.name}: incomplete on {target.name} (no sidecar or manifest)"
        return RemoteVerdict(backup.name, ok=False, deep=deep, problem=problem)
    store = Store(policy.backup_dir, policy.name_prefix)
    store.ensure()
    scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=policy.backup_dir))
    try:
        files = list(targets.backup_files(scratch / backup.archive.name))
        if deep:
            files = _download(target, backup, scratch)
        else:
            target.download(files[-1].name, files[-1])  # the sidecar
        recorded = backup.archive.sha256
        if not deep and recorded is not None and recorded != archive.read_sidecar(files[0]):
            problem = f"{backup.archive.name}: the remote's sha256 differs from its sidecar"
            return RemoteVerdict(backup.name, ok=False, deep=deep, problem=problem)
        if deep:
            stored = StoredBackup(backup.name, files[0], backup.created, backup.archive.size)
            verdict = check(
                stored,
                deep=True,
                encryption=policy.gpg,
                key=auth.policy_key(policy),
                trust_unsigned=trust_unsigned,
            )
            return RemoteVerdict(backup.name, verdict.ok, deep, verdict.problem)
    except SovbackupdError as error:
        return RemoteVerdict(backup.name, ok=False, deep=deep, problem=str(error))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return RemoteVerdict(backup.name, ok=True, deep=deep)
