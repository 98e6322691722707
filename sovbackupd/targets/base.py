"""What every remote offers the backup engine: the Target Protocol and its values."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sovbackupd.archive import CHUNK_BYTES
from sovbackupd.errors import TargetError, TransientTargetError
from sovbackupd.fsat import PARTIAL_SUFFIX

# Remote names are single path components of the backup directory's own names, so no
# target needs to quote or escape them (and none can be a temp file or a dotfile).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteObject:
    """A file stored on a remote under its final name.

    *sha256* is known after an upload or a download, and from ``stat`` where the store
    keeps it beside the object (S3 and GCS metadata); otherwise it is None.
    """

    name: str
    size: int
    sha256: str | None = None


Listing = list[RemoteObject]


class Target(Protocol):
    """A place off the server that holds copies of backups: a flat set of named files.

    Contract:

    - **Atomic.** An object appears under its final name only when it is complete and
      verified: the remote's size and checksum of what it stored match the local file
      (and *sha256*, when given). Until then it lives under a temp name that
      :meth:`list` never shows, or inside an upload that the store has not committed.
      A failed upload leaves nothing under the final name; a stale temp file may stay
      and is overwritten by the next upload of that name. Where the store commits
      before it can be checked (an S3-compatible store that ignores checksums), the
      check right after deletes a bad object again, and the sidecar-last rule keeps the
      backup incomplete meanwhile.
    - **Idempotent.** Uploading a name again replaces it with the same bytes and is
      safe after any failure; deleting a missing name succeeds. The retrying wrapper
      relies on this.
    - **Errors.** :class:`~sovbackupd.errors.TransientTargetError` when the remote is
      unreachable, times out, drops the connection, or garbles bytes on the way (a later
      attempt may succeed); :class:`~sovbackupd.errors.TargetError` when an operator has
      to act (bad credentials, an unknown host key, a missing bucket, a local file that
      does not match *sha256*). :meth:`download` of a missing name raises
      :class:`~sovbackupd.errors.NotFoundError`. Messages name the remote.
    - **Flat.** Names match :data:`NAME_PATTERN`; the target maps them onto its
      directory or key prefix. A backup is the objects of
      :func:`sovbackupd.targets.backup_files`, uploaded archive, manifests, then sidecar
      last (the sidecar marks the backup complete) and deleted sidecar first: see
      :func:`sovbackupd.targets.upload_backup`.
    - Implementations do not retry; :class:`~sovbackupd.targets.retry.RetryingTarget`
      does, around any of them.
    """

    @property
    def name(self) -> str:
        """Return the remote's name from the policy (the metrics' remote label)."""
        ...

    def upload(
        self, local_path: Path, remote_name: str, *, sha256: str | None = None
    ) -> RemoteObject:
        """Copy *local_path* to *remote_name*, verified, replacing any object of that name.

        *sha256* is the digest the caller recorded for the file (its sidecar's); the
        upload fails without taking the final name when the file does not match it.
        Return what is stored, with its sha256.
        """
        ...

    def download(self, remote_name: str, local_path: Path) -> RemoteObject:
        """Copy *remote_name* to *local_path* atomically (temp name, fsync, rename).

        The size and whatever checksum the store offers are verified; the caller checks
        the archive against its sidecar. Return what was written, with its sha256.
        """
        ...

    def list(self) -> Listing:
        """Return every object under its final name, sorted by name."""
        ...

    def stat(self, remote_name: str) -> RemoteObject | None:
        """Return the object called *remote_name*, or None when there is none."""
        ...

    def delete(self, remote_name: str) -> None:
        """Remove *remote_name* (and any temp file of it); a missing name is fine."""
        ...


def check_name(remote: str, remote_name: str, sha256: str | None = None) -> None:
    """Refuse a *remote_name* that is not a plain file name, or a malformed *sha256*."""
    if not NAME_PATTERN.match(remote_name) or remote_name.endswith(PARTIAL_SUFFIX):
        raise TargetError(f"remote {remote}: {remote_name!r} is not a valid object name")
    if sha256 is not None and not SHA256_PATTERN.match(sha256):
        raise TargetError(f"remote {remote}: {sha256!r} is not a sha256 hex digest")


def local_size(remote: str, path: Path) -> int:
    """Return the size of the local file *path*, as a TargetError when it is unreadable."""
    try:
        return path.stat().st_size
    except OSError as error:
        raise TargetError(f"remote {remote}: cannot read {path}: {error.strerror}") from error


def file_sha256(remote: str, path: Path) -> str:
    """Return the sha256 of the local file *path*."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError as error:
        raise TargetError(f"remote {remote}: cannot read {path}: {error.strerror}") from error
    return digest.hexdigest()


def check_local_digest(remote: str, path: Path, actual: str, expected: str | None) -> None:
    """Refuse to upload *path* when its bytes (*actual*) differ from its recorded sha256."""
    if expected is not None and actual != expected:
        raise TargetError(
            f"remote {remote}: {path} does not match its recorded sha256 "
            f"(expected {expected}, read {actual}); it changed or is damaged, not uploaded"
        )


def check_arrival(
    remote: str, remote_name: str, arrived: tuple[int, str], stored: tuple[int, str | None]
) -> None:
    """Refuse a download whose (size, sha256) differs from what the remote stores.

    A stored sha256 of None (an object uploaded by another tool) checks the size only.
    """
    (size, digest), (stored_size, stored_digest) = arrived, stored
    if size != stored_size or stored_digest not in (None, digest):
        raise TransientTargetError(
            f"remote {remote}: {remote_name} arrived with {size} bytes and sha256 {digest}, "
            f"not {stored_size} bytes and {stored_digest}: damaged on the way"
        )
