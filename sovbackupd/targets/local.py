"""A directory on a mounted disk or share: the simplest target, and the contract's reference."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import structlog

from sovbackupd.archive import CHUNK_BYTES
from sovbackupd.errors import NotFoundError, TargetError, TransientTargetError
from sovbackupd.fsat import PARTIAL_SUFFIX, fsync_dir
from sovbackupd.targets.base import (
    NAME_PATTERN,
    Listing,
    RemoteObject,
    check_local_digest,
    check_name,
)

log = structlog.get_logger("sovbackupd.targets")


def _copy(source_path: Path, destination: Path) -> tuple[int, str]:
    """Copy *source_path* to *destination* (0600, fsynced); return its size and sha256."""
    digest = hashlib.sha256()
    size = 0
    with source_path.open("rb") as source:
        descriptor = os.open(
            destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(descriptor, "wb") as handle:
            while chunk := source.read(CHUNK_BYTES):
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    return size, digest.hexdigest()


class LocalTarget:
    """Copies in *directory*, which must exist: a missing one is an unmounted disk.

    That makes a missing directory a transient error, so a disk mounted later (or an
    NFS share back online) picks up where the copies stopped.
    """

    def __init__(self, name: str, directory: Path) -> None:
        """Keep the copies of remote *name* in *directory*."""
        self._name = name
        self.directory = directory

    @property
    def name(self) -> str:
        """Return the remote's name."""
        return self._name

    def _check_directory(self) -> None:
        if not self.directory.is_dir():
            raise TransientTargetError(
                f"remote {self.name}: directory {self.directory} does not exist (not mounted?)"
            )

    def upload(
        self, local_path: Path, remote_name: str, *, sha256: str | None = None
    ) -> RemoteObject:
        """Copy *local_path* to *remote_name* through a temp name, hashing what is written."""
        check_name(self.name, remote_name, sha256)
        self._check_directory()
        started = time.monotonic()
        final = self.directory / remote_name
        partial = final.with_name(remote_name + PARTIAL_SUFFIX)
        try:
            size, digest = _copy(local_path, partial)
            check_local_digest(self.name, local_path, digest, sha256)
            partial.replace(final)
            fsync_dir(self.directory)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise TargetError(
                f"remote {self.name}: cannot copy {local_path} to {final}: {error.strerror}"
            ) from error
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        stored = RemoteObject(remote_name, size, digest)
        log.info(
            "target.uploaded",
            target=self.name,
            object=remote_name,
            size=size,
            duration_seconds=round(time.monotonic() - started, 3),
        )
        return stored

    def download(self, remote_name: str, local_path: Path) -> RemoteObject:
        """Copy *remote_name* to *local_path* through a temp name."""
        check_name(self.name, remote_name)
        self._check_directory()
        source_path = self.directory / remote_name
        partial = local_path.with_name(local_path.name + PARTIAL_SUFFIX)
        try:
            size, digest = _copy(source_path, partial)
            partial.replace(local_path)
        except FileNotFoundError as error:
            partial.unlink(missing_ok=True)
            if error.filename == str(source_path):
                raise NotFoundError(f"remote {self.name}: no object {remote_name!r}") from None
            raise TargetError(f"remote {self.name}: cannot write {local_path}") from error
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise TargetError(
                f"remote {self.name}: cannot copy {remote_name} to {local_path}: {error.strerror}"
            ) from error
        log.info("target.downloaded", target=self.name, object=remote_name, size=size)
        return RemoteObject(remote_name, size, digest)

    def list(self) -> Listing:
        """Return the files under their final names."""
        self._check_directory()
        found = []
        for entry in self.directory.iterdir():
            if not NAME_PATTERN.match(entry.name) or entry.name.endswith(PARTIAL_SUFFIX):
                continue
            try:
                if entry.is_file():
                    found.append(RemoteObject(entry.name, entry.stat().st_size))
            except FileNotFoundError:
                continue  # deleted meanwhile
        return sorted(found, key=lambda stored: stored.name)

    def stat(self, remote_name: str) -> RemoteObject | None:
        """Return *remote_name*'s size, or None when it is missing."""
        check_name(self.name, remote_name)
        self._check_directory()
        try:
            return RemoteObject(remote_name, (self.directory / remote_name).stat().st_size)
        except FileNotFoundError:
            return None

    def delete(self, remote_name: str) -> None:
        """Remove *remote_name* and its temp file."""
        check_name(self.name, remote_name)
        self._check_directory()
        for path in (self.directory / remote_name, self.directory / (remote_name + PARTIAL_SUFFIX)):
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                raise TargetError(
                    f"remote {self.name}: cannot delete {path}: {error.strerror}"
                ) from error
        fsync_dir(self.directory)
        log.info("target.deleted", target=self.name, object=remote_name)
