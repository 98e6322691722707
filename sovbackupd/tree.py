"""Remove a restored or left-over tree: following no symlink, needing no CAP_DAC_OVERRIDE.

A restored tree holds what the backup held: 0555 and 0000 directories, read-only files,
symlinks to anywhere. ``shutil.rmtree`` needs CAP_DAC_OVERRIDE to empty a 0555 directory
and cannot even list a 0000 one, and the systemd unit runs without it. :func:`remove`
makes each directory u+rwx before it removes its entries, and opens every directory
relative to its parent's descriptor with ``O_NOFOLLOW``, so a symlink (or a directory
swapped for one meanwhile) is removed as a link and never entered; a mount point
below the top is never entered either.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("sovbackupd.tree")

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OWNER_ALL = stat.S_IRWXU


@dataclass
class _Frame:
    """A directory being emptied: its descriptor, its name in its parent, what is left."""

    parent: int
    name: str
    descriptor: int
    names: list[str]


def _open_writable(parent: int, name: str) -> int:
    """Open the directory *name* below *parent* and give its owner rwx; never follow a link."""
    try:
        descriptor = os.open(name, _OPEN_DIR, dir_fd=parent)
    except PermissionError:
        # A 0000 directory cannot be opened for reading without CAP_DAC_READ_SEARCH; an
        # O_PATH descriptor needs no permission, and chmod through /proc/self/fd acts on
        # the directory it holds, not on whatever the name points to by then.
        handle = os.open(
            name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
        )
        try:
            os.chmod(f"/proc/self/fd/{handle}", _OWNER_ALL)  # noqa: PTH101 (a descriptor's path)
        finally:
            os.close(handle)
        descriptor = os.open(name, _OPEN_DIR, dir_fd=parent)
    try:
        mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
        if mode & _OWNER_ALL != _OWNER_ALL:
            os.fchmod(descriptor, mode | _OWNER_ALL)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _mount_of(descriptor: int) -> tuple[int, str]:
    """Return the device and the mount id of the open *descriptor*.

    A bind mount of a directory on the same file system has the same st_dev: only the
    mount id (``/proc/self/fdinfo``) tells it apart; "" when /proc does not say.
    """
    device = os.fstat(descriptor).st_dev
    try:
        with open(f"/proc/self/fdinfo/{descriptor}", encoding="ascii") as info:  # noqa: PTH123
            found = [line for line in info if line.startswith("mnt_id:")]
    except (OSError, ValueError):
        return device, ""
    return device, found[0].split(":", 1)[1].strip() if found else ""


def _descend(
    parent: int, name: str, stack: list[_Frame], mount: tuple[int, str] | None = None
) -> tuple[int, str] | None:
    """Remove *name* below *parent* if it is no directory, else push it onto *stack*.

    A directory on another mount than *mount* (a mount point, a bind mount) is not
    entered: what is mounted there is not part of the tree, as with ``rm
    --one-file-system``. Return the mount of *name* when it is a directory.
    """
    if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
        os.unlink(name, dir_fd=parent)
        return None
    # Checked on a descriptor that needs no permission, before any chmod: the mounted
    # directory is not ours to make writable either.
    handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        found = _mount_of(handle)
    finally:
        os.close(handle)
    if mount is not None and found != mount:
        raise OSError(errno.EXDEV, "a mount point: not entered", name)
    descriptor = _open_writable(parent, name)
    try:
        names = os.listdir(descriptor)  # noqa: PTH208 (a descriptor: pathlib takes none)
    except BaseException:
        os.close(descriptor)
        raise
    stack.append(_Frame(parent, name, descriptor, names))
    return found


def remove(path: Path) -> OSError | None:
    """Remove *path* (a file, a symlink, or a directory and all below it) as far as possible.

    Nothing is followed: a symlink anywhere in the tree is removed, never entered. What
    cannot be removed is left and the walk goes on. Return the first error met, None when
    *path* is gone (or never was). The walk keeps one descriptor per level, not a stack
    frame, so a deep tree cannot exhaust Python's recursion limit.
    """
    try:
        top = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        return error
    first: OSError | None = None
    stack: list[_Frame] = []
    try:
        try:
            mount = _descend(top, path.name, stack)
        except FileNotFoundError:
            return None
        except OSError as error:
            return error
        while stack:
            frame = stack[-1]
            if frame.names:
                try:
                    _descend(frame.descriptor, frame.names.pop(), stack, mount)
                except FileNotFoundError:
                    continue
                except OSError as error:
                    first = first or error
                continue
            stack.pop()
            os.close(frame.descriptor)
            try:
                os.rmdir(frame.name, dir_fd=frame.parent)
            except FileNotFoundError:
                continue
            except OSError as error:
                first = first or error
    finally:
        for frame in stack:
            os.close(frame.descriptor)
        os.close(top)
    return first


def remove_or_warn(path: Path, kept_event: str) -> bool:
    """Remove the tree *path*; log *kept_event* as a warning and return False if some stays."""
    problem = remove(path)
    if problem is not None:
        log.warning(kept_event, path=str(path), entry=str(problem.filename), error=problem.strerror)
    return problem is None
