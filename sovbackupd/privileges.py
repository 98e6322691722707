"""Keep the daemon's one capability away from the operator's hooks.

The systemd unit grants ``CAP_DAC_READ_SEARCH`` through ``AmbientCapabilities=``: the
ambient set passes it on across ``execve()``, which redis-check-rdb needs (it reopens the
Redis dump through ``/dev/fd``). A hook is the operator's own program and needs nothing of
the kind, so :func:`drop_for_exec` clears the ambient and the inheritable sets in the
child between ``fork()`` and ``execve()``; the daemon itself keeps the capability.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path

_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
_STATUS = Path("/proc/self/status")


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _set(field: str) -> int:
    """Return the capability set *field* (CapInh, CapAmb...) of this process, 0 if unknown."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.strip(), 16)
    return 0


def drop_for_exec() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that clears the ambient and inheritable capability sets.

    Return None when both are already empty (the CLI as root, or any unprivileged run),
    so that the common case forks without a Python callback. Everything the callback
    needs (libc's functions, the new sets) is prepared here in the parent: in the child,
    between fork and exec, it only makes two system calls, and raises OSError if either
    fails, so that a hook never starts with the capability.
    """
    if not _set("CapAmb") and not _set("CapInh"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    capget, capset = libc.capget, libc.capset
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for part in data:
        part.inheritable = 0

    def drop() -> None:
        if prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot clear the ambient capabilities")
        if capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "cannot clear the inheritable capabilities")

    return drop
