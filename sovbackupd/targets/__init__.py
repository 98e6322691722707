"""Targets: one module per kind of remote, behind the Protocol in base.py.

A backup on a remote is the files it has locally (:func:`backup_files`): the archive,
its manifest (for an encrypted backup, the encrypted full manifest and the plaintext
head), its authentication record and its ``.sha256`` sidecar. The sidecar goes up last
and comes down first, so a remote backup whose sidecar is there was uploaded whole and
verified: :func:`list_backups` calls only those complete. A backup uploaded before
authentication existed has no record: it is complete, but unsigned.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import assert_never

from sovbackupd import archive
from sovbackupd.config.models import GcsRemote, Remote, RsyncRemote, S3Remote
from sovbackupd.errors import ArchiveError
from sovbackupd.manifest import read_head
from sovbackupd.store import ARCHIVE_SUFFIX_PATTERN, TIMESTAMP_FORMAT
from sovbackupd.targets.base import Listing, RemoteObject, Target
from sovbackupd.targets.retry import Backoff, RetryingTarget

DEFAULT_BACKOFF = Backoff()


def build_target(config: Remote, *, backoff: Backoff | None = DEFAULT_BACKOFF) -> Target:
    """Return the target that *config* describes, retrying as *backoff* says (None: not)."""
    # boto3 and google-cloud-storage take half a second to import: only a policy with
    # such a remote makes the CLI pay for it.
    target: Target
    match config:
        case RsyncRemote():
            from sovbackupd.targets.rsync import RsyncTarget  # noqa: PLC0415

            target = RsyncTarget(config)
        case S3Remote():
            from sovbackupd.targets.s3 import S3Target  # noqa: PLC0415

            target = S3Target(config)
        case GcsRemote():
            from sovbackupd.targets.gcs import GcsTarget  # noqa: PLC0415

            target = GcsTarget(config)
        case _:
            assert_never(config)
    return target if backoff is None else RetryingTarget(target, backoff)


def backup_files(archive_path: Path) -> tuple[Path, ...]:
    """Return the backup's files in upload order: archive, manifest(s), auth record, sidecar.

    The one list of what a backup consists of: upload, download, delete and retention
    all read it. An encrypted archive's full manifest, ``<name>.manifest.json.gpg``, comes
    before the head beside it; backups made before heads existed lack it (their manifest
    is whole), and those made before authentication lack the record: the files that may
    be missing are skipped by those that copy them. Only the sidecar is last.
    """
    extra = (
        (archive.encrypted_manifest_path(archive_path),) if archive.encrypted(archive_path) else ()
    )
    return (
        archive_path,
        *extra,
        archive.manifest_path(archive_path),
        archive.auth_path(archive_path),
        archive.sidecar_path(archive_path),
    )


def _present(archive_path: Path) -> list[Path]:
    """Return the local files of the backup of *archive_path*, in upload order.

    A record missing is an unsigned backup's (made before authentication). Raise
    ArchiveError when its head says the manifest is encrypted and that file is missing:
    such a backup cannot be restored, here or from a copy.
    """
    files = list(backup_files(archive_path))
    record = archive.auth_path(archive_path)
    if not os.path.lexists(record):
        files.remove(record)
    encrypted_copy = archive.encrypted_manifest_path(archive_path)
    if encrypted_copy in files and not os.path.lexists(encrypted_copy):
        try:
            is_head = read_head(archive.manifest_path(archive_path)).is_head
        except (OSError, ValueError):
            is_head = False  # missing or unreadable: uploading the manifest itself says so
        if is_head:
            raise ArchiveError(
                f"{archive_path.name}: {encrypted_copy.name} is missing: the head beside it "
                "says its manifest is encrypted there"
            )
        files.remove(encrypted_copy)
    return files


def upload_backup(target: Target, archive_path: Path) -> list[RemoteObject]:
    """Copy the backup of *archive_path* to *target*: every file it has, the sidecar last.

    The archive is verified against the digest its sidecar records. The remote sidecar
    is removed first, so that a backup being uploaded again is incomplete on the remote
    until every file is verified there once more. A file that a backup made before
    authentication does not have (its record) is skipped.
    """
    archive_file, *between, sidecar = _present(archive_path)
    digest = archive.read_sidecar(archive_file)
    target.delete(sidecar.name)
    return [
        target.upload(archive_file, archive_file.name, sha256=digest),
        *(target.upload(path, path.name) for path in between),
        target.upload(sidecar, sidecar.name),
    ]


def delete_backup(target: Target, archive_name: str) -> None:
    """Delete the backup whose archive is *archive_name* from *target*: sidecar first."""
    *others, sidecar = backup_files(Path(archive_name))
    for path in (sidecar, *others):
        target.delete(path.name)


@dataclass(frozen=True)
class RemoteBackup:
    """A backup as a remote holds it: its archive, and whether it is complete there."""

    name: str
    created: datetime
    archive: RemoteObject
    manifest: RemoteObject | None
    sidecar: RemoteObject | None
    encrypted_manifest: RemoteObject | None = None
    """The full manifest of an encrypted backup; None for one made before heads existed."""
    auth: RemoteObject | None = None
    """Its authentication record; None for a backup uploaded before authentication."""

    @property
    def complete(self) -> bool:
        """Tell whether every file arrived and was verified (the sidecar came last)."""
        return self.sidecar is not None and self.manifest is not None

    def holds(self, path: Path) -> bool:
        """Tell whether the remote holds the file of this backup named as *path* is."""
        held = (self.archive, self.encrypted_manifest, self.manifest, self.auth, self.sidecar)
        return any(item is not None and item.name == path.name for item in held)


def list_backups(listing: Listing, prefix: str) -> list[RemoteBackup]:
    """Group a remote's *listing* into the backups named *prefix*_..., oldest first."""
    pattern = re.compile(
        rf"^(?P<name>{re.escape(prefix)}_(?P<stamp>\d{{8}}_\d{{6}}))(?:{ARCHIVE_SUFFIX_PATTERN})$"
    )
    by_name = {stored.name: stored for stored in listing}
    found = []
    for stored in listing:
        match = pattern.match(stored.name)
        if match is None:
            continue
        path = Path(stored.name)
        found.append(
            RemoteBackup(
                name=match["name"],
                created=datetime.strptime(match["stamp"], TIMESTAMP_FORMAT).replace(tzinfo=UTC),
                archive=stored,
                manifest=by_name.get(archive.manifest_path(path).name),
                sidecar=by_name.get(archive.sidecar_path(path).name),
                encrypted_manifest=by_name.get(archive.encrypted_manifest_path(path).name)
                if archive.encrypted(path)
                else None,
                auth=by_name.get(archive.auth_path(path).name),
            )
        )
    return sorted(found, key=lambda backup: (backup.created, backup.name))


__all__ = [
    "Backoff",
    "Listing",
    "RemoteBackup",
    "RemoteObject",
    "RetryingTarget",
    "Target",
    "backup_files",
    "build_target",
    "delete_backup",
    "list_backups",
    "upload_backup",
]
