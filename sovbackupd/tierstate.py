"""Each tier's last attempt and last success, kept beside the backups across restarts.

GFS retention keeps backups by period, not by label: the 02:00 ``daily`` backup is deleted
once a later hourly one stands for its day, and the Sunday ``weekly`` and the 1st's
``monthly`` likewise. The labels of the archives left on disk therefore cannot say when a
tier last ran; :data:`STATE_NAME` in ``backup_dir`` does. A backup records its attempt when
it starts and its success when it commits, under the backup directory's lock.

The file is untrusted input: it is read bounded (:data:`MAX_BYTES`) and validated, and a
bad one is one warning, after which the archives' labels are the only source. The
pure functions :func:`attempted`, :func:`succeeded` and :func:`merged` hold the logic.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import structlog
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from sovbackupd import archive, fsat, statefile
from sovbackupd.manifest import SAFETY_TIER, Manifest

log = structlog.get_logger("sovbackupd.tierstate")

STATE_NAME = ".sovbackupd-tiers.json"
MAX_BYTES = 64 * 1024
"""A state file larger than this is refused unread: a handful of tiers needs under 2 KiB."""
MAX_TIERS = 64

TierLabel = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


class TierRecord(BaseModel):
    """When one tier's backup last started and last committed (None: not known)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    last_attempt: AwareDatetime | None = None
    last_success: AwareDatetime | None = None


class _StateFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = 1
    tiers: dict[TierLabel, TierRecord] = Field(default_factory=dict, max_length=MAX_TIERS)


Records = Mapping[str, TierRecord]


def _later(first: datetime | None, second: datetime | None) -> datetime | None:
    if first is None or second is None:
        return first or second
    return max(first, second)


def _tracked(tiers: Iterable[str]) -> list[str]:
    # A restore's safety backup holds only what it replaced: it is no tier's backup.
    return [tier for tier in tiers if tier != SAFETY_TIER]


def attempted(records: Records, tiers: Iterable[str], moment: datetime) -> dict[str, TierRecord]:
    """Return *records* with *tiers* marked as attempted at *moment*; the rest unchanged."""
    updated = dict(records)
    for tier in _tracked(tiers):
        previous = updated.get(tier, TierRecord())
        updated[tier] = previous.model_copy(update={"last_attempt": moment})
    return updated


def succeeded(records: Records, tiers: Iterable[str], moment: datetime) -> dict[str, TierRecord]:
    """Return *records* with *tiers* marked as having succeeded at *moment*; the rest unchanged."""
    updated = dict(records)
    for tier in _tracked(tiers):
        previous = updated.get(tier, TierRecord())
        updated[tier] = previous.model_copy(update={"last_success": moment})
    return updated


def merged(records: Records, heads: Iterable[Manifest]) -> dict[str, TierRecord]:
    """Return *records* completed by the archives whose manifests are *heads*.

    An archive proves its tiers were attempted when it was created and succeeded when it
    finished; each time kept is the later of the state's and the archives'. So a missing
    or older state file (a backup made by a version that kept none) never hides a backup
    on disk, and a state file never goes back behind one.
    """
    result = dict(records)
    for head in heads:
        for tier in _tracked(head.tiers):
            previous = result.get(tier, TierRecord())
            result[tier] = TierRecord(
                last_attempt=_later(previous.last_attempt, head.created),
                last_success=_later(previous.last_success, head.finished),
            )
    return result


def _validated(data: bytes) -> dict[str, TierRecord]:
    if len(data) > MAX_BYTES:
        raise ValueError(f"larger than {MAX_BYTES} bytes")
    try:
        state = _StateFile.model_validate_json(data)
    except ValidationError as error:
        raise ValueError(statefile.first_problem(error)) from error
    return dict(state.tiers)


def _present(records: Records, now: datetime) -> tuple[dict[str, TierRecord], list[str]]:
    """Return *records* without their times after *now*, and a note for each time dropped.

    Only the future time goes, not the file: a clock stepped back (NTP correcting a fast
    clock) puts the last backup's times ahead of now, and dropping every tier's record for
    that would bring back the catch-ups and false alerts the file exists to prevent.
    """
    kept: dict[str, TierRecord] = {}
    dropped: list[str] = []
    for tier, record in records.items():
        update: dict[str, datetime | None] = {}
        for field_name in ("last_attempt", "last_success"):
            moment = getattr(record, field_name)
            if moment is not None and moment > now:
                update[field_name] = None
                dropped.append(f"tiers.{tier}.{field_name}: {moment.isoformat()} is in the future")
        kept[tier] = record.model_copy(update=update) if update else record
    return kept, dropped


def parse(data: bytes, now: datetime) -> dict[str, TierRecord]:
    """Return the records in the state file's *data*; raise ValueError naming the problem.

    A time after *now* is left out (that time only): it would suppress a tier's catch-up
    until then.
    """
    return _present(_validated(data), now)[0]


def render(records: Records) -> bytes:
    """Return the state file's bytes for *records*."""
    return _StateFile(tiers=dict(records)).model_dump_json(indent=1).encode() + b"\n"


def read(directory: Path, now: datetime) -> dict[str, TierRecord]:
    """Return the records kept in *directory*; none when the file is missing or bad.

    A bad file (unreadable, too large, not valid) is logged as one ``tierstate.ignored``
    warning naming it and why; a time in the future is left out alone, with the same
    warning, and the file's other times are kept.
    """
    path = directory / STATE_NAME
    try:
        records = _validated(statefile.read_bounded(path, MAX_BYTES))
    except FileNotFoundError:
        return {}
    except OSError as error:
        log.warning("tierstate.ignored", path=str(path), reason=error.strerror or str(error))
        return {}
    except ValueError as error:
        log.warning("tierstate.ignored", path=str(path), reason=str(error))
        return {}
    kept, dropped = _present(records, now)
    if dropped:
        log.warning("tierstate.ignored", path=str(path), reason="; ".join(dropped))
    return kept


def write(directory: Path, records: Records) -> None:
    """Replace the state file in *directory* with *records*: temp file, fsync, rename, fsync.

    Written by root (a manual backup), the file is given to the directory's owner, as the
    lock file is, so that the service user can replace it later.
    """
    path = directory / STATE_NAME
    archive.write_atomically(path, render(records))
    owner = directory.stat()
    if os.geteuid() == 0 and path.stat().st_uid != owner.st_uid:
        # Not following a link: one swapped in after the rename must not pass on its target.
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
    fsat.fsync_dir(directory)


def _update(directory: Path, tiers: Iterable[str], moment: datetime, success: bool) -> None:
    tiers = _tracked(tiers)
    if not tiers:
        return
    records = read(directory, datetime.now(UTC))
    change = succeeded if success else attempted
    try:
        write(directory, change(records, tiers, moment))
    except OSError as error:
        # The backup itself is unharmed; only a restart's catch-up may then run it again.
        log.warning(
            "tierstate.unsaved",
            path=str(directory / STATE_NAME),
            error=error.strerror or str(error),
        )


def record_attempt(directory: Path, tiers: Iterable[str], moment: datetime) -> None:
    """Record in *directory* that a backup of *tiers* started at *moment*.

    Call under the backup directory's lock; a failed write is a warning, never an error.
    """
    _update(directory, tiers, moment, success=False)


def record_success(directory: Path, tiers: Iterable[str], moment: datetime) -> None:
    """Record in *directory* that a backup of *tiers* committed at *moment*.

    Call under the backup directory's lock; a failed write is a warning, never an error.
    """
    _update(directory, tiers, moment, success=True)


def known(directory: Path, heads: Iterable[Manifest], now: datetime) -> dict[str, TierRecord]:
    """Return each tier's last attempt and success: the state file, completed by *heads*."""
    return merged(read(directory, now), heads)
