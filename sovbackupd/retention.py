"""Carry out the retention decision of policy.py: prune, dry-run, and the size guard.

The decision is pure (policy.py); this module reads the backup directory, applies the
size guard, and deletes what the decision says — archive first, then its sidecars, so a
crash in between leaves only orphaned sidecars, which the next run removes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import structlog

from sovbackupd import policy as gfs
from sovbackupd.archive import fsync_dir, manifest_path, sidecar_path
from sovbackupd.config.models import Policy
from sovbackupd.manifest import SAFETY_TIER
from sovbackupd.metrics import Metrics
from sovbackupd.store import Store, StoredBackup

log = structlog.get_logger("sovbackupd.retention")


@dataclass(frozen=True)
class Outcome:
    """What a prune decided and did."""

    decisions: list[gfs.Decision]
    deleted: list[str] = field(default_factory=list)
    held: str | None = None  # why nothing was deleted, when the size guard held it
    dry_run: bool = False


def candidates(stored: list[StoredBackup]) -> list[gfs.Candidate]:
    """Describe *stored* backups for the decision.

    A backup counts as successful and verified when its checksum sidecar and manifest
    are there and readable: both are written before the archive takes its final name.
    Re-hashing every archive on each prune would read the whole history; ``verify
    --all`` and the test restores do that on their own schedule.
    """
    found = []
    for backup in stored:
        head = backup.head()
        found.append(
            gfs.Candidate(
                name=backup.name,
                time=backup.created,
                ok=sidecar_path(backup.path).is_file() and head is not None,
                safety=head is not None and head.tiers == [SAFETY_TIER],
            )
        )
    return found


def size_guard(
    policy: Policy, stored: list[StoredBackup], found: list[gfs.Candidate]
) -> str | None:
    """Return why pruning must wait when the newest backup collapsed in size, else None.

    Safety backups (*found* tells which) hold only what a restore replaced: they are left
    out of the comparison.
    """
    guard = policy.retention.size_guard
    safety = {candidate.name for candidate in found if candidate.safety}
    sizes = [backup.size for backup in stored if backup.name not in safety]
    if len(sizes) < 2:
        return None
    newest, earlier = sizes[-1], sizes[-1 - guard.window : -1]
    median = statistics.median(earlier)
    if newest < guard.ratio * median:
        return (
            f"the newest backup ({newest} bytes) is under {guard.ratio:g} x the median of "
            f"the {len(earlier)} before it ({median:.0f} bytes): a source may have collapsed"
        )
    return None


def _delete(backup: StoredBackup) -> None:
    backup.path.unlink(missing_ok=True)
    sidecar_path(backup.path).unlink(missing_ok=True)
    manifest_path(backup.path).unlink(missing_ok=True)


def apply(
    store: Store, policy: Policy, *, dry_run: bool, metrics: Metrics | None = None
) -> Outcome:
    """Decide and (unless *dry_run*) delete; the caller holds the store's lock."""
    stored = store.backups()
    found = candidates(stored)
    decisions = gfs.decide(found, gfs.Rules.from_policy(policy), policy.zone)
    held = size_guard(policy, stored, found)
    if metrics is not None:
        metrics.retention_held.set(1 if held else 0)
    if held is not None:
        log.warning("retention.held", reason=held)
        return Outcome(decisions, held=held, dry_run=dry_run)
    doomed = {decision.name for decision in decisions if not decision.keep}
    if dry_run:
        return Outcome(decisions, sorted(doomed), dry_run=True)
    deleted = []
    for backup in stored:
        if backup.name in doomed:
            _delete(backup)
            deleted.append(backup.name)
            log.info("retention.deleted", backup=backup.name)
            if metrics is not None:
                metrics.retention_deleted.inc()
    if deleted:
        fsync_dir(store.directory)
    if metrics is not None:
        metrics.set_local(store.backups())
    return Outcome(decisions, deleted)


def prune(policy: Policy, *, dry_run: bool, metrics: Metrics | None = None) -> Outcome:
    """Apply retention to the backup directory under its lock."""
    store = Store(policy.backup_dir, policy.name_prefix)
    with store.lock():
        return apply(store, policy, dry_run=dry_run, metrics=metrics)
