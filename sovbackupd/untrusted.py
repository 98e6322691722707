"""Open a file that anyone but sovbackupd may have put there: never block on it.

A FIFO blocks ``open()`` until a writer comes, and ``/dev/zero`` never ends, so a plain
``path.open()`` of a planted state file, a manifest, or a passphrase file that an operator
pointed at a pipe hangs the daemon's start, a reload or a backup. :func:`open_regular`
opens without blocking and refuses anything but a regular file; callers bound their reads.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotRegularError(ValueError):
    """The path is a FIFO, a device, a socket or a directory, not a regular file."""


def open_regular(path: Path, *, follow_symlinks: bool = False) -> BinaryIO:
    """Open the regular file *path* for reading, without blocking.

    Raise OSError when it cannot be opened (ELOOP for a symlink unless *follow_symlinks*),
    and :class:`NotRegularError` when it is not a regular file.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    descriptor = os.open(path, flags)
    try:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            # O_NONBLOCK means nothing to a regular file's reads; clear it for children.
            os.set_blocking(descriptor, True)
            return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    os.close(descriptor)
    raise NotRegularError("not a regular file")
