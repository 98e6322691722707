"""File-system steps relative to open directories, following no symlink on the way.

A path string is looked up again at every use, and whoever can write one of its
directories can put a symlink there between two uses. Restore, which runs as root,
therefore opens each directory it writes in once, with :func:`open_dir` or
:func:`open_below`, and does every later step relative to that descriptor: ``*at``
calls, :func:`exchange`, or paths through :func:`anchored` (``/proc/self/fd/N/...``,
which the kernel resolves from the open directory, whatever its name leads to now).
Archives, stores and remotes share :data:`PARTIAL_SUFFIX` and :func:`fsync_dir` from here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sovbackupd.config.layout import quoted
from sovbackupd.errors import UnsafePathError

PARTIAL_SUFFIX = ".partial"
"""What a file is called while it is written, before it takes its final name."""
MAX_LINK_HOPS = 40  # as the kernel's limit on symlinks followed in one lookup
OPEN_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_EXCHANGE = 2
_SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after 5.1)
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


def fsync_dir(directory: Path) -> None:
    """Make renames inside *directory* durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_at(directory: int) -> None:
    """Make renames inside the open *directory* durable (an O_PATH descriptor will do)."""
    descriptor = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def anchored(directory: int, *names: str) -> Path:
    """Return a path that resolves from the open *directory*, whatever its name is now."""
    return Path(f"/proc/self/fd/{directory}", *names)


def _check_writers(status: os.stat_result, where: str) -> None:
    """Refuse a directory anyone may write that is not sticky: anyone could plant there."""
    mode = status.st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise UnsafePathError(
            f"{where} is writable by every user and not sticky: anyone could swap what "
            f"restore writes there; fix it with chmod o-w {quoted(where)}"
        )


def _open_step(directory: int, name: str, where: str) -> int:
    """Open the directory *name* below *directory*, refusing a symlink or a non-directory."""
    try:
        return os.open(name, OPEN_PATH, dir_fd=directory)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            status = os.stat(name, dir_fd=directory, follow_symlinks=False)
            what = "a symlink" if stat.S_ISLNK(status.st_mode) else "not a directory"
            raise UnsafePathError(f"{where} is {what}: restore follows no link there") from None
        raise


@dataclass
class Opened:
    """A directory opened by a walk, and the directories the walk had to create for it."""

    descriptor: int
    created: list[tuple[int, str]] = field(default_factory=list)
    """(open parent, name) of each directory made, outermost first; the parents stay open."""

    def close(self) -> None:
        """Close the directory and the parents kept open for :meth:`remove_created`."""
        os.close(self.descriptor)
        for parent, _ in self.created:
            os.close(parent)
        self.created = []

    def remove_created(self) -> None:
        """Remove the directories the walk created, innermost first, those still empty."""
        for parent, name in reversed(self.created):
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError:
                continue  # not empty (rmdir removes no content), or gone already


def _walk(start: int, parts: list[str], shown: str, *, create: bool) -> Opened:
    """Open *parts* below *start* (which the result takes over), one name at a time."""
    opened = Opened(start)
    where = shown.rstrip("/")
    try:
        _check_writers(os.fstat(opened.descriptor), where or "/")
        for part in parts:
            where = f"{where}/{part}"
            try:
                step = _open_step(opened.descriptor, part, where)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, mode=0o755, dir_fd=opened.descriptor)
                opened.created.append((os.dup(opened.descriptor), part))
                step = _open_step(opened.descriptor, part, where)
            os.close(opened.descriptor)
            opened.descriptor = step
            _check_writers(os.fstat(step), where)
    except BaseException:
        opened.remove_created()
        opened.close()
        raise
    return opened


def open_dir(path: Path, *, create: bool = False) -> Opened:
    """Open the absolute directory *path* from ``/``, following no symlink on the way.

    Every directory on the way must be a real directory that not every user may write
    (or a sticky one, as ``/tmp``). With *create*, missing directories are made (0755).
    Raise UnsafePathError naming the component that is a link or open to anyone,
    OSError for the rest (FileNotFoundError without *create*).
    """
    parts = [part for part in path.parts[1:] if part]
    return _walk(os.open("/", OPEN_PATH), parts, "/", create=create)


def _openat2(root: int, relative: str) -> int | None:
    """Open *relative* below *root* with openat2(RESOLVE_IN_ROOT|RESOLVE_NO_SYMLINKS).

    Return None when the kernel has no openat2 (before 5.6, or a seccomp filter says no).
    """
    how = struct.pack("QQQ", OPEN_PATH, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_SYMLINKS)
    buffer = ctypes.create_string_buffer(how, len(how))
    result = int(_libc.syscall(_SYS_OPENAT2, root, os.fsencode(relative), buffer, len(how)))
    if result >= 0:
        return result
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EPERM, errno.E2BIG):
        return None
    raise OSError(code, os.strerror(code), relative)


def open_below(root: int, relative: str, shown: str, *, create: bool = False) -> Opened:
    """Open the directory *relative* below the open *root*, resolving no symlink in it.

    openat2 with ``RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS`` where the kernel has it, else
    (and to create missing directories) a walk of one ``O_NOFOLLOW`` open per name.
    *shown* is how *root* is named in errors. Raise UnsafePathError naming the first
    component that is a symlink (or open to every user).
    """
    parts = [part for part in relative.split("/") if part]
    if not parts:
        return Opened(os.dup(root))
    try:
        found = _openat2(root, "/".join(parts))
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EXDEV):
            raise
        found = None  # the walk names the component, or creates what is missing
    if found is not None:
        return Opened(found)
    return _walk(os.dup(root), parts, shown, create=create)


def identity(status: os.stat_result) -> tuple[int, int]:
    """Return what tells one file apart from every other: (device, inode)."""
    return status.st_dev, status.st_ino


def lstat_at(directory: int, name: str) -> os.stat_result | None:
    """Return the status of *name* in *directory*, not following it; None when absent."""
    try:
        return os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return None


def kind(status: os.stat_result | None) -> str:
    """Name the type of *status* as errors and plans say it."""
    if status is None:
        return "absent"
    if stat.S_ISLNK(status.st_mode):
        return "a symlink"
    return "a directory" if stat.S_ISDIR(status.st_mode) else "a file"


def make_dir(directory: int, name: str, mode: int = 0o700) -> int:
    """Create the directory *name* in *directory* (never an existing one); return it opened."""
    os.mkdir(name, mode=mode, dir_fd=directory)
    return os.open(name, OPEN_PATH, dir_fd=directory)


def exchange(first_dir: int, first: str, second_dir: int, second: str) -> bool:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE); False when the system cannot.

    Neither name is followed: a symlink there is swapped as the link it is.
    """
    function = getattr(_libc, "renameat2", None)
    if function is None:
        return False
    result = function(
        first_dir, os.fsencode(first), second_dir, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(code, os.strerror(code), second)


@dataclass(frozen=True)
class Link:
    """A symlink met while resolving a path: where it is, and what it led to."""

    path: Path
    target: Path


def resolve(path: Path) -> tuple[Path, list[Link]]:
    """Resolve the absolute *path* as the kernel would; return it and every link met.

    A missing component ends the walk: the rest is appended as it is.
    Raise UnsafePathError past :data:`MAX_LINK_HOPS` links (a loop).
    """
    links: list[Link] = []
    current = Path("/")
    remaining = list(path.parts[1:])
    while remaining:
        part = remaining.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        try:
            status = candidate.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return candidate.joinpath(*remaining), links
        if not stat.S_ISLNK(status.st_mode):
            current = candidate
            continue
        if len(links) >= MAX_LINK_HOPS:
            raise UnsafePathError(f"{path}: too many symlinks (a loop?)")
        target = str(candidate.readlink())
        if target.startswith("/"):
            current = Path("/")
        remaining = [*Path(target).parts[1 if target.startswith("/") else 0 :], *remaining]
        links.append(Link(candidate, Path(os.path.realpath(candidate))))
    return current, links
