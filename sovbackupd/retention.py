"""Carry out the retention decision of policy.py: prune, dry-run, and the size guard.

The decision is pure (policy.py); this module reads the backup directory (archives,
manifests, pins), reads the clock, applies the size guard, and deletes what the decision
says — archive first, then its sidecars, so a crash in between leaves only orphaned
sidecars, which the next run removes. The same decision prunes the remotes
(replicate.py), with the local pins and manual labels applied to their copies by name.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from sovbackupd import auth, targets
from sovbackupd import policy as gfs
from sovbackupd.archive import encrypted_manifest_path, sidecar_path
from sovbackupd.config.models import Policy
from sovbackupd.errors import ArchiveError
from sovbackupd.fsat import fsync_dir
from sovbackupd.manifest import MANUAL_TIER
from sovbackupd.metrics import Metrics
from sovbackupd.store import Store, StoredBackup

log = structlog.get_logger("sovbackupd.retention")


@dataclass(frozen=True)
class Plan:
    """What retention decides now, before anything is deleted."""

    decisions: list[gfs.Decision]
    held: str | None = None
    """Why nothing may be deleted (the size guard), when it holds."""
    pin_problems: dict[str, str] = field(default_factory=dict)
    """Backup name -> why its pin file could not be read (the backup is kept)."""
    unauthenticated: dict[str, str] = field(default_factory=dict)
    """Backup name -> why it is taken for a forgery: never counted, never deleted."""

    @property
    def doomed(self) -> list[str]:
        """Return the names to delete, oldest first: none while retention is held."""
        if self.held is not None:
            return []
        return [decision.name for decision in reversed(self.decisions) if not decision.keep]

    @property
    def warnings(self) -> list[str]:
        """Return what an operator should hear about this plan, one line each."""
        lines = [
            f"pin of {name} unreadable, so it is kept: {why}"
            for name, why in self.pin_problems.items()
        ]
        lines.extend(
            f"{name} is not authenticated, so it is kept for the operator and never counted: {why}"
            for name, why in self.unauthenticated.items()
        )
        if self.held is not None:
            lines.append(f"retention held, nothing deleted: {self.held}")
        return lines


@dataclass(frozen=True)
class Outcome:
    """What a prune decided and did."""

    plan: Plan
    deleted: list[str] = field(default_factory=list)
    """Deleted (or, in a dry run, to be deleted), oldest first."""
    dry_run: bool = False

    @property
    def decisions(self) -> list[gfs.Decision]:
        """Return the decision for every backup, newest first."""
        return self.plan.decisions

    @property
    def held(self) -> str | None:
        """Return why nothing was deleted, when the size guard held it."""
        return self.plan.held


def unauthenticated(stored: Sequence[StoredBackup], key: auth.Key | None) -> dict[str, str]:
    """Return name -> why, for the *stored* backups that retention must take for forgeries.

    A backup whose record fails (a bad MAC, a replay, a changed file) is one. So is an
    unsigned or foreign-key backup dated after the oldest one *key* authenticates: every
    backup made since the key exists is signed. Older unsigned backups (made before the
    upgrade) are not: retention treats them as it always did.
    """
    checked: dict[str, auth.Status | str] = {}
    for backup in stored:
        try:
            checked[backup.name] = auth.check(backup.path, backup.name, key)
        except ArchiveError as error:  # AuthError too
            checked[backup.name] = str(error)
    return suspected([(backup.name, backup.created) for backup in stored], checked)


def suspected(
    dated: Sequence[tuple[str, datetime]], checked: Mapping[str, auth.Status | str]
) -> dict[str, str]:
    """Return name -> why, for the backups (name, created; oldest first) to take for forgeries.

    *checked* holds what each record's check found, or why it failed: a failure is a
    suspect, and so is an unsigned or foreign-key backup newer than the oldest
    authenticated one (see :func:`unauthenticated`).
    """
    found = {name: why for name, why in checked.items() if isinstance(why, str)}
    signed = [
        (name, created) for name, created in dated if checked.get(name) is auth.Status.AUTHENTICATED
    ]
    if not signed:
        return found
    oldest, since = signed[0]
    for name, created in dated:
        status = checked.get(name, auth.Status.UNSIGNED)
        if status in (auth.Status.UNSIGNED, auth.Status.FOREIGN) and created > since:
            assert isinstance(status, auth.Status)  # noqa: S101 (a failure is a str)
            found[name] = (
                f"{status.value}, yet newer than {oldest}, the oldest authenticated backup"
            )
    return found


def candidates(
    stored: Sequence[StoredBackup],
    pins: Mapping[str, gfs.Pin] | None = None,
    forged: Collection[str] = (),
) -> list[gfs.Candidate]:
    """Describe *stored* backups for the decision, with their *pins*.

    A backup counts as successful and verified when its checksum sidecar and manifest
    are there and readable (and, beside a head, the encrypted manifest): all are written
    before the archive takes its final name. It is not among *forged* (see
    :func:`unauthenticated`). Re-hashing every archive on each prune would read the whole
    history; ``verify --all`` and the test restores do that on their own schedule.
    """
    found = []
    pinned = pins or {}
    for backup in stored:
        head = backup.head()
        found.append(
            gfs.Candidate(
                name=backup.name,
                time=backup.created,
                ok=sidecar_path(backup.path).is_file()
                and head is not None
                and (not head.is_head or encrypted_manifest_path(backup.path).is_file())
                and backup.name not in forged,
                safety=head is not None and head.safety,
                manual=head is not None and MANUAL_TIER in head.tiers,
                pin=pinned.get(backup.name),
            )
        )
    return found


def size_guard(
    policy: Policy,
    stored: Sequence[StoredBackup],
    found: Sequence[gfs.Candidate],
    now: datetime,
) -> str | None:
    """Return why pruning must wait when the newest backup collapsed in size, else None.

    Safety backups (*found* tells which) hold only what a restore replaced, and backups
    dated after *now* are not the newest made (the clock stepped back): both are left out
    of the comparison.
    """
    guard = policy.retention.size_guard
    safety = {candidate.name for candidate in found if candidate.safety}
    sizes = [
        backup.size for backup in stored if backup.name not in safety and backup.created <= now
    ]
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


def _problems(pins: Mapping[str, gfs.Pin]) -> dict[str, str]:
    return {name: pin.problem for name, pin in pins.items() if pin.problem is not None}


def plan(
    policy: Policy, stored: Sequence[StoredBackup], pins: Mapping[str, gfs.Pin], now: datetime
) -> Plan:
    """Decide what retention keeps of the local *stored* backups at *now*, and why."""
    forged = unauthenticated(stored, auth.policy_key(policy))
    found = candidates(stored, pins, forged)
    decisions = gfs.decide(found, gfs.Rules.from_policy(policy), policy.zone, now=now)
    return Plan(decisions, size_guard(policy, stored, found, now), _problems(pins), forged)


def remote_plan(
    policy: Policy,
    held: Sequence[targets.RemoteBackup],
    local: Sequence[StoredBackup],
    pins: Mapping[str, gfs.Pin],
    now: datetime,
    *,
    records: Mapping[str, auth.Status | str],
    manual_copies: Collection[str] = (),
) -> Plan:
    """Decide what retention keeps of a remote's *held* backups at *now*.

    Only complete copies count or may be deleted, and none that is taken for a forgery:
    its local backup is (:func:`unauthenticated`), or its record on the remote, as
    *records* found it (a copy without one is unsigned), is (:func:`suspected`): another
    server's copies in a shared bucket neither count for our rules nor get deleted. A
    copy is manual when its local backup is or it is among *manual_copies* (the remote's
    manifest says so), and pinned when backup_dir holds a pin by its name; the size
    guard is the local one, as the copies are of the local backups.
    """
    forged = unauthenticated(local, auth.policy_key(policy))
    forged.update(suspected([(backup.name, backup.created) for backup in held], records))
    local_found = candidates(local)
    manual = {candidate.name for candidate in local_found if candidate.manual}
    manual.update(manual_copies)
    found = [
        gfs.Candidate(
            name=backup.name,
            time=backup.created,
            ok=backup.complete and backup.name not in forged,
            manual=backup.name in manual,
            pin=pins.get(backup.name),
        )
        for backup in held
    ]
    decisions = gfs.decide(found, gfs.Rules.from_policy(policy), policy.zone, now=now)
    names = {backup.name for backup in held}
    problems = {name: why for name, why in _problems(pins).items() if name in names}
    suspects = {name: why for name, why in forged.items() if name in names}
    return Plan(decisions, size_guard(policy, local, local_found, now), problems, suspects)


def _delete(store: Store, backup: StoredBackup) -> None:
    # The archive first: a crash after it leaves only orphans, which the next run removes.
    for path in targets.backup_files(backup.path):
        path.unlink(missing_ok=True)
    store.pin_path(backup.name).unlink(missing_ok=True)  # a pin that ran out


def apply(
    store: Store,
    policy: Policy,
    *,
    dry_run: bool,
    metrics: Metrics | None = None,
    now: datetime | None = None,
) -> Outcome:
    """Decide at *now* (the clock's by default) and, unless *dry_run*, delete.

    The caller holds the store's lock.
    """
    stored = store.backups()
    pins = store.pins()
    moment = now or datetime.now(UTC)
    decided = plan(policy, stored, pins, moment)
    for name, why in decided.unauthenticated.items():
        log.warning("retention.unauthenticated", backup=name, reason=why)
    if metrics is not None:
        metrics.retention_held.set(1 if decided.held else 0)
    if dry_run:
        return Outcome(decided, decided.doomed, dry_run=True)
    doomed = set(decided.doomed)
    deleted = []
    for backup in stored:
        if backup.name in doomed:
            _delete(store, backup)
            deleted.append(backup.name)
            log.info("retention.deleted", backup=backup.name)
            if metrics is not None:
                metrics.retention_deleted.inc()
    # A pin outlives its hand-deleted archive to hold the remote copies; once it has run
    # out it holds nothing anywhere, and nothing else would ever remove it.
    here = {backup.name for backup in stored}
    spent = [name for name, pin in pins.items() if name not in here and not pin.holds(moment)]
    for name in spent:
        store.pin_path(name).unlink(missing_ok=True)
        log.info("retention.pin_removed", backup=name)
    if deleted or spent:
        fsync_dir(store.directory)
    if metrics is not None:
        metrics.set_local(store.backups())
    return Outcome(decided, deleted)


def prune(policy: Policy, *, dry_run: bool, metrics: Metrics | None = None) -> Outcome:
    """Apply retention to the backup directory under its lock."""
    store = Store(policy.backup_dir, policy.name_prefix)
    with store.lock():
        return apply(store, policy, dry_run=dry_run, metrics=metrics)
