"""Configuration files and data directories, walked and streamed as they are."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

from sovbackupd.config.layout import shown
from sovbackupd.config.models import SourcePath
from sovbackupd.errors import ConfigError, SourceError
from sovbackupd.sources.base import Component, Estimate, Member, SourceReport

# Room each member takes besides its data: a header block, a PAX block, padding.
MEMBER_OVERHEAD_BYTES = 2048
# Restore writes each member by a path longer than its own: staged beside its destination
# (.sovbackupd-restore-<name>/<n>/), below --to DIR, or below backup_dir/.staging/ in a
# drill. A deeper path would back up and then fail every restore with ENAMETOOLONG.
RESTORE_HEADROOM_BYTES = 1024
RESTORABLE_PATH_BYTES = 4095 - RESTORE_HEADROOM_BYTES


def stored_bytes(status: os.stat_result) -> int:
    """Return the bytes the archive reads of a regular file: its data, holes left out."""
    return min(status.st_size, status.st_blocks * 512)


def open_nofollow(path: str) -> BinaryIO:
    """Open *path* for reading without following a symlink that replaced it meanwhile."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(descriptor, "rb", buffering=0)  # reads are large; skip a buffer copy


def _opener(path: str) -> Callable[[], BinaryIO]:
    return partial(open_nofollow, path)


@dataclass(frozen=True)
class _Walk:
    """One directory tree, walked in a stable order with the excludes applied."""

    root: Path
    exclude: tuple[str, ...]
    backup_dir: Path | None = None
    """Refused wherever it turns up: a bind mount or a link swapped in after the checks."""

    def excluded(self, name: str, relative: str) -> bool:
        return any(
            fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(relative, pattern)
            for pattern in self.exclude
        )

    def entries(
        self, report: SourceReport | None, left_out: list[str] | None = None
    ) -> Iterator[tuple[str, str, os.stat_result]]:
        """Yield (relative path, path, lstat) below the root, parents before children.

        The relative paths the excludes leave out are appended to *left_out*, if given.
        Paths stay strings from os.scandir: pathlib's parsing would cost more than the
        lstat itself on a tree of small files.
        """
        pending = [""]
        root = str(self.root)
        store = _identity(self.backup_dir)
        if store is not None:
            with contextlib.suppress(OSError):  # a missing root: the scan below reports it
                self._refuse_store(root, self.root.stat(), store)
        while pending:
            relative_dir = pending.pop()
            directory = f"{root}/{relative_dir}" if relative_dir else root
            try:
                with os.scandir(directory) as scan:
                    found = sorted(scan, key=lambda entry: entry.name)
            except FileNotFoundError:
                if report is not None:
                    report.warnings.append(f"{shown(Path(directory))}: vanished while being read")
                continue
            except OSError as error:
                raise SourceError(
                    f"cannot read directory {shown(Path(directory))}: {error.strerror}"
                ) from error
            subdirs = []
            for entry in found:
                relative = f"{relative_dir}/{entry.name}" if relative_dir else entry.name
                if self.exclude and self.excluded(entry.name, relative):
                    if left_out is not None:
                        left_out.append(relative)
                    continue
                status = _lstat(entry, report)
                if status is None:
                    continue
                if stat.S_ISDIR(status.st_mode):
                    if store is not None:
                        self._refuse_store(entry.path, status, store)
                    subdirs.append(relative)
                yield relative, entry.path, status
            pending.extend(reversed(subdirs))

    def _refuse_store(self, path: str, status: os.stat_result, store: tuple[int, int]) -> None:
        """Raise ConfigError when the directory *path* (its stat *status*) is backup_dir."""
        if (status.st_dev, status.st_ino) == store:
            raise ConfigError(
                f"{shown(Path(path))} is backup_dir {shown(self.backup_dir or Path())} (a bind "
                "mount or a link): every backup would archive the earlier ones, and restoring "
                "it would delete the newer ones; exclude it or move backup_dir"
            )


def _identity(path: Path | None) -> tuple[int, int] | None:
    """Return the device and inode of the directory *path*, None when there is none."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def _lstat(entry: os.DirEntry[str], report: SourceReport | None) -> os.stat_result | None:
    """Return the lstat of *entry*, None (with a warning in *report*) when it cannot be had.

    A path longer than :data:`RESTORABLE_PATH_BYTES` is left out: no restore could put it
    back (and past PATH_MAX no path-based call reaches it).
    """
    # A character takes at most 4 bytes: most paths need no encoding to be measured.
    if (
        len(entry.path) * 4 > RESTORABLE_PATH_BYTES
        and (length := len(os.fsencode(entry.path))) > RESTORABLE_PATH_BYTES
    ):
        warning = (
            f"{shown(Path(entry.path[:200]))}...: path of {length} bytes, longer than restore "
            f"can put back ({RESTORABLE_PATH_BYTES}), not archived"
        )
    else:
        try:
            return entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            warning = f"{shown(Path(entry.path))}: vanished while being read"
        except OSError as error:
            raise SourceError(f"cannot stat {shown(Path(entry.path))}: {error.strerror}") from error
    if report is not None:
        report.warnings.append(warning)
    return None


def excluded_paths(root: Path, exclude: Sequence[str]) -> list[str]:
    """Return the paths below *root* (relative to it) that *exclude* leaves out of backups.

    An excluded directory is listed, not what lies below it.
    """
    left_out: list[str] = []
    for _ in _Walk(root, tuple(exclude)).entries(None, left_out):
        pass
    return left_out


class FilesSource:
    """Configuration files (under ``config/``) or data directories (under their basename).

    Config files are archived by content: a symlinked ``.env`` is archived as the file it
    points to, as ``cp`` would. Inside data directories, symlinks stay symlinks, FIFOs,
    sockets and devices are skipped with a warning, and excludes apply.
    """

    def __init__(
        self,
        component: Component,
        entries: list[SourcePath],
        exclude: list[str],
        backup_dir: Path | None = None,
    ) -> None:
        """Back up *entries*: config files when *component* is "config", else directories.

        A directory below them that is *backup_dir* (a bind mount, say) fails the backup.
        """
        self._component = component
        self._entries = entries
        self._exclude = tuple(exclude)
        self._backup_dir = backup_dir

    @property
    def component(self) -> Component:
        """Return "config" or "data"."""
        return self._component

    @property
    def name(self) -> str:
        """Return "config" or "dirs"."""
        return "config" if self._component == "config" else "dirs"

    def _what(self) -> str:
        return "config file" if self._component == "config" else "directory"

    def _present(self, entry: SourcePath) -> os.stat_result | None:
        """Return the stat of *entry*, None when it is optional and missing."""
        try:
            status = entry.path.stat()
        except FileNotFoundError:
            if entry.optional:
                return None
            raise SourceError(
                f"{self._what()} {entry.path} does not exist (sources.{self.name}); "
                "mark it 'optional: true' if that is expected"
            ) from None
        except OSError as error:
            raise SourceError(f"cannot stat {entry.path}: {error.strerror}") from error
        wanted_dir = self._component == "data"
        if stat.S_ISDIR(status.st_mode) != wanted_dir:
            raise SourceError(
                f"{entry.path} is {'not ' if wanted_dir else ''}a directory "
                f"(sources.{self.name} takes {'directories' if wanted_dir else 'files'})"
            )
        if not wanted_dir and not stat.S_ISREG(status.st_mode):
            raise SourceError(f"config file {entry.path} is not a regular file")
        return status

    def preflight(self) -> Estimate:
        """Check every configured path exists and sum the sizes below them.

        A sparse file counts the bytes allocated to it, not its apparent size: it is
        archived with its holes, so a 200 GiB file with 4 KiB of data adds 4 KiB.
        """
        members = 1 if self._component == "config" else 0  # config/ itself
        read = 0
        for entry in self._entries:
            status = self._present(entry)
            if status is None:
                continue
            members += 1
            if self._component == "config":
                read += stored_bytes(status)
                continue
            walk = _Walk(entry.path, self._exclude, self._backup_dir)
            for _, _, child in walk.entries(None):
                members += 1
                if stat.S_ISREG(child.st_mode):
                    read += stored_bytes(child)
        return Estimate(archived_bytes=read + members * MEMBER_OVERHEAD_BYTES, read_bytes=read)

    def members(self, staging: Path, report: SourceReport) -> Generator[Member]:
        """Yield each config file, or each directory tree, in a stable order."""
        del staging  # files are streamed straight from where they live
        missing: list[str] = []
        if self._component == "config":
            yield Member("config", "dir", None, 0o700, time.time())
        for entry in self._entries:
            status = self._present(entry)
            if status is None:
                missing.append(str(entry.path))
                report.warnings.append(f"{entry.path}: optional and missing, not archived")
                continue
            if self._component == "config":
                # Resolved: a symlinked config file is archived by content, and the
                # opener refuses to follow a symlink.
                target = str(entry.path.resolve())
                yield Member.from_stat(
                    f"config/{entry.path.name}", entry.path, status, _opener(target)
                )
            else:
                yield from self._tree(entry.path, status, report)
        report.details["missing_optional"] = missing

    def _tree(self, root: Path, status: os.stat_result, report: SourceReport) -> Generator[Member]:
        yield Member.from_stat(root.name, root, status)
        skipped: list[str] = []
        walk = _Walk(root, self._exclude, self._backup_dir)
        for relative, path, child in walk.entries(report):
            arcname = f"{root.name}/{relative}"
            mode = child.st_mode
            if stat.S_ISDIR(mode):
                yield Member.from_stat(arcname, path, child)
            elif stat.S_ISREG(mode):
                yield Member.from_stat(arcname, path, child, _opener(path))
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(path)  # noqa: PTH115 (string paths on purpose, see _Walk)
                except FileNotFoundError:
                    report.warnings.append(f"{shown(Path(path))}: vanished while being read")
                    continue
                yield Member.from_stat(arcname, path, child, linkname=target)
            else:
                skipped.append(path)
                report.warnings.append(
                    f"{shown(Path(path))}: special file (FIFO, socket or device) skipped"
                )
        report.details.setdefault("skipped_special", []).extend(skipped)
