"""The local backup directory: names, listing, the writers' lock, pins, and leftovers."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from sovbackupd import crypto, tree
from sovbackupd import policy as gfs
from sovbackupd.archive import (
    AUTH_SUFFIX,
    MANIFEST_SUFFIX,
    SIDECAR_SUFFIX,
    auth_path,
    encrypted_manifest_path,
    manifest_path,
    write_atomically,
)
from sovbackupd.config import files
from sovbackupd.errors import (
    ConfigError,
    DiskSpaceError,
    LockedError,
    NotFoundError,
    SovbackupdError,
)
from sovbackupd.fsat import PARTIAL_SUFFIX, fsync_dir
from sovbackupd.manifest import Manifest, read_full, read_head
from sovbackupd.wording import plural

log = structlog.get_logger("sovbackupd.store")

LOCK_NAME = ".sovbackupd.lock"
STAGING_NAME = ".staging"
TIMESTAMP_FORMAT = "%Y%m%d_%H%M%S"
ARCHIVE_SUFFIX_PATTERN = r"\.tar(?:\.gz|\.zst)?(?:\.gpg)?"
PIN_SUFFIX = ".pin.json"
PIN_LIMIT_BYTES = 4096
"""A pin file is a few dozen bytes; anything larger is not one of ours."""


class PinFile(BaseModel):
    """``<name>.pin.json`` beside an archive: the operator keeps that backup until released."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = 1
    backup: str
    pinned_at: AwareDatetime
    until: AwareDatetime | None = None


@dataclass(frozen=True)
class StoredBackup:
    """An archive under its final name in the backup directory."""

    name: str
    path: Path
    created: datetime
    size: int

    def manifest(self) -> Manifest | None:
        """Return the manifest kept beside the archive, None when missing or unreadable."""
        try:
            return read_full(manifest_path(self.path))
        except (OSError, ValueError):
            return None  # ValidationError is a ValueError

    def head(self) -> Manifest | None:
        """Return the manifest beside the archive without its file list (cheap to read)."""
        try:
            return read_head(manifest_path(self.path))
        except (OSError, ValueError):
            return None  # ValidationError and JSONDecodeError are ValueErrors


def _holder(descriptor: int) -> str:
    """Describe the lock's holder: the pid it wrote, if that process still runs."""
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    if not text.isdigit():
        return "pid unknown"
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return "pid unknown"
    except PermissionError:
        pass  # it runs, as another user
    return f"pid {text}"


def backup_name(prefix: str, moment: datetime) -> str:
    """Return the archive name for a backup started at *moment*."""
    return f"{prefix}_{moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)}"


class Store:
    """The backup directory of one policy, and the files in it that sovbackupd owns.

    Only names matching ``<prefix>_YYYYMMDD_HHMMSS`` plus an archive suffix (and their
    sidecars and ``.partial`` temp files) are ever listed, cleaned or deleted.
    """

    def __init__(self, directory: Path, prefix: str) -> None:
        """Manage the backups named *prefix*_... in *directory*."""
        self.directory = directory
        self.prefix = prefix
        stamp = r"(?P<stamp>\d{8}_\d{6})"
        self._archive = re.compile(
            rf"^(?P<name>{re.escape(prefix)}_{stamp})(?P<suffix>{ARCHIVE_SUFFIX_PATTERN})$"
        )
        self._owned = re.compile(
            rf"^{re.escape(prefix)}_{stamp}(?:{ARCHIVE_SUFFIX_PATTERN}(?:{re.escape(SIDECAR_SUFFIX)})?"
            rf"|{re.escape(MANIFEST_SUFFIX)}(?:{re.escape(crypto.SUFFIX)})?|{re.escape(AUTH_SUFFIX)}"
            rf"|{re.escape(PIN_SUFFIX)})"
            rf"(?:{re.escape(PARTIAL_SUFFIX)})?$"
        )
        self._pin = re.compile(rf"^(?P<name>{re.escape(prefix)}_{stamp}){re.escape(PIN_SUFFIX)}$")

    def ensure(self) -> None:
        """Create the directory 0700 if it is missing; refuse one that others can write.

        An existing directory keeps its mode: 0750 or 0755 are safe (the archives inside
        are 0600), and a group- or world-writable one is refused rather than chmod'ed,
        since whatever else uses it would break; so is one in a directory others can write
        (see :func:`sovbackupd.config.files.unsafe_backup_dir`), created or not.
        """
        if (unsafe := files.unsafe_backup_dir(self.directory)) is not None:
            raise ConfigError(unsafe)
        try:
            self.directory.mkdir(mode=0o700, parents=True)
            self.directory.chmod(0o700)  # whatever the umask
        except FileExistsError:  # perhaps made since the check, by someone else
            if (unsafe := files.unsafe_backup_dir(self.directory)) is not None:
                raise ConfigError(unsafe) from None
        except OSError as error:
            raise SovbackupdError(
                f"backup_dir {self.directory} cannot be created: {error.strerror}"
            ) from error

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's writer lock, shared by the daemon and the CLI.

        Raise LockedError at once when another process holds it.
        """
        self.ensure()
        descriptor = self._open_lock(self.directory / LOCK_NAME)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(
                    f"another sovbackupd ({_holder(descriptor)}) is writing to "
                    f"{self.directory}; try again when it is done"
                ) from None
            with contextlib.suppress(OSError):  # a read-only lock file still locks
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(descriptor)

    def _open_lock(self, path: Path) -> int:
        """Open (or create) the lock file, whoever made it.

        The daemon runs as its own user while an operator may run the CLI as root: a lock
        file root creates is handed to the directory's owner, and one we cannot write is
        opened read-only, which flock accepts just the same.
        """
        # Never follow a link, never block: the directory is the service user's, and a
        # `.sovbackupd.lock` -> /etc/shadow would have root truncate, write and chown it.
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o600)
            except PermissionError:
                descriptor = os.open(path, os.O_RDONLY | flags)
        except OSError as error:
            reason = "it is a symlink" if error.errno == errno.ELOOP else error.strerror
            raise SovbackupdError(f"cannot open the lock {path}: {reason}") from error
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise SovbackupdError(f"cannot open the lock {path}: it is not a regular file")
        owner = self.directory.stat()
        if os.geteuid() == 0 and os.fstat(descriptor).st_uid != owner.st_uid:
            os.fchown(descriptor, owner.st_uid, owner.st_gid)
        return descriptor

    def staging(self, name: str) -> Path:
        """Create and return a private staging directory for backup *name*."""
        path = self.directory / STAGING_NAME / name
        path.mkdir(mode=0o700, parents=True)
        return path

    def clean_leftovers(self) -> list[Path]:
        """Remove what a killed run left: partial files, staging, orphaned sidecars.

        Pin files stay even without their archive: a pin also holds the remotes' copies.
        Call only while holding the lock. Return what was removed. A staging tree that
        cannot be removed (not ours to change) is one warning, never a failed run.
        """
        removed: list[Path] = []
        finals = {backup.path.name for backup in self.backups()}
        bases = {
            beside(self.directory / name).name
            for name in finals
            for beside in (manifest_path, encrypted_manifest_path, auth_path)
        }
        for entry in self.directory.iterdir():
            if not self._owned.match(entry.name):
                continue
            orphan_sidecar = entry.name.endswith(SIDECAR_SUFFIX) and (
                entry.name.removesuffix(SIDECAR_SUFFIX) not in finals
            )
            orphan_manifest = (
                entry.name.endswith(
                    (MANIFEST_SUFFIX, f"{MANIFEST_SUFFIX}{crypto.SUFFIX}", AUTH_SUFFIX)
                )
                and entry.name not in bases
            )
            leftover = entry.name.endswith(PARTIAL_SUFFIX) or orphan_sidecar or orphan_manifest
            # A directory or an immutable file under our name: removed as far as it can
            # be, else one warning; a symlink is removed, never followed.
            if leftover and tree.remove_or_warn(entry, "store.leftover_kept"):
                removed.append(entry)
        staging = self.directory / STAGING_NAME
        if os.path.lexists(staging) and tree.remove_or_warn(staging, "store.leftover_kept"):
            removed.append(staging)
        return removed

    def backups(self) -> list[StoredBackup]:
        """Return the archives in the directory, oldest first."""
        found = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        except OSError as error:
            raise SovbackupdError(
                f"backup_dir {self.directory} cannot be read: {error.strerror}"
            ) from error
        for entry in entries:
            match = self._archive.match(entry.name)
            if match is None:
                continue
            try:
                created = datetime.strptime(match["stamp"], TIMESTAMP_FORMAT)
            except ValueError:
                continue  # month 13, hour 99: planted, and not a name sovbackupd writes
            try:
                status = entry.stat()
            except FileNotFoundError:
                continue  # deleted by a concurrent prune
            if not stat.S_ISREG(status.st_mode):
                continue  # a FIFO would block verify; a directory is not an archive
            found.append(
                StoredBackup(match["name"], entry, created.replace(tzinfo=UTC), status.st_size)
            )
        return sorted(found, key=lambda backup: (backup.created, backup.name))

    def find(self, name: str) -> StoredBackup:
        """Return the backup called *name* (with or without its suffix)."""
        for backup in self.backups():
            if name in (backup.name, backup.path.name):
                return backup
        raise NotFoundError(f"no backup named {name!r} in {self.directory}")

    def latest(self) -> StoredBackup:
        """Return the newest backup that is not a restore's safety backup: ``--latest``.

        A safety backup holds only what one restore replaced, so it is reached by name
        only. A backup whose manifest cannot be read is not passed over: choosing it fails
        with its own error, where passing it over would quietly choose older data.
        """
        backups = self.backups()
        if not backups:
            raise NotFoundError(f"no backups in {self.directory}")
        for backup in reversed(backups):
            head = backup.head()
            if head is None or not head.safety:
                return backup
        raise NotFoundError(
            f"{self.directory} holds only {plural(len(backups), 'pre-restore safety backup')}, "
            f"which --latest never chooses: name one (the newest is {backups[-1].name})"
        )

    def pin_path(self, name: str) -> Path:
        """Return where the pin of backup *name* lives."""
        return self.directory / f"{name}{PIN_SUFFIX}"

    def pins(self) -> dict[str, gfs.Pin]:
        """Return every pin in the directory by backup name, its archive here or not.

        A pin file that cannot be read or is not one of ours still pins its backup (keeping
        too much is the safe side) and carries the problem for the caller to report.
        """
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise SovbackupdError(
                f"backup_dir {self.directory} cannot be read: {error.strerror}"
            ) from error
        found = {}
        for entry in entries:
            match = self._pin.match(entry.name)
            if match is not None:
                found[match["name"]] = read_pin(entry, match["name"])
        return found

    def pin(self, name: str, until: datetime | None, now: datetime) -> StoredBackup:
        """Pin backup *name* (kept until *until*, or until unpinned); return it.

        Call while holding the lock, so that no prune decides between the write and the
        rename. Pinning again replaces the pin's end.
        """
        backup = self.find(name)
        record = PinFile(backup=backup.name, pinned_at=now, until=until)
        path = self.pin_path(backup.name)
        try:
            # Root's pin goes to the directory's owner: the daemon's user must read it.
            directory = self.directory.stat()
            owner = (directory.st_uid, directory.st_gid) if os.geteuid() == 0 else None
            data = record.model_dump_json(indent=1).encode() + b"\n"
            write_atomically(path, data, owner=owner)
            fsync_dir(self.directory)
        except OSError as error:
            raise SovbackupdError(f"cannot write the pin {path}: {error.strerror}") from error
        return backup

    def unpin(self, name: str) -> bool:
        """Remove the pin of backup *name* (with or without its suffix); return whether it had one.

        Raise NotFoundError when there is neither such a backup nor a pin by that name.
        """
        match = self._archive.match(name)
        plain = match["name"] if match is not None else name
        if not self._pin.match(f"{plain}{PIN_SUFFIX}"):  # a bare name: no path leads out
            raise NotFoundError(f"no backup named {name!r} in {self.directory}")
        path = self.pin_path(plain)
        try:
            path.unlink()
        except FileNotFoundError:
            self.find(plain)
            return False
        except OSError as error:
            raise SovbackupdError(f"cannot remove the pin {path}: {error.strerror}") from error
        fsync_dir(self.directory)
        return True

    def free_name(self, moment: datetime) -> tuple[str, datetime]:
        """Return a name no backup has, waiting for the next second if *moment*'s is taken."""
        taken = {backup.name for backup in self.backups()}
        name = backup_name(self.prefix, moment)
        while name in taken:
            time.sleep(1.0 - (time.time() % 1.0) + 0.001)
            moment = datetime.now(UTC)
            name = backup_name(self.prefix, moment)
        return name, moment


def read_pin(path: Path, name: str) -> gfs.Pin:
    """Read the pin file *path* of backup *name*, as untrusted input.

    Never raise and never block: a file that is not a regular file, too large, not our
    JSON, or about another backup gives a pin with its ``problem`` set, which holds the
    backup for ever, as a pin without an end would.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        return gfs.Pin(problem=f"{path}: {error.strerror}")
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return gfs.Pin(problem=f"{path}: not a regular file")
        data = os.read(descriptor, PIN_LIMIT_BYTES + 1)
    except OSError as error:
        return gfs.Pin(problem=f"{path}: {error.strerror}")
    finally:
        os.close(descriptor)
    if len(data) > PIN_LIMIT_BYTES:
        return gfs.Pin(problem=f"{path}: larger than {PIN_LIMIT_BYTES} bytes")
    try:
        record = PinFile.model_validate_json(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        return gfs.Pin(problem=f"{path}: {where}: {first['msg']}")
    if record.backup != name or record.format_version != 1:
        return gfs.Pin(problem=f"{path}: not a version 1 pin of {name}")
    return gfs.Pin(until=record.until)


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse a backup that the disk holding *directory* cannot take."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough space in {directory}: the backup needs about {human_size(needed)} "
            f"and {human_size(free)} is free"
        )


def human_size(size: float) -> str:
    """Format *size* bytes for people (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
