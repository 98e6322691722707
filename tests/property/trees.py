"""Trees as the file system holds them: names as bytes, read back for comparison."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """What a restore must give back of one path: type, mode, mtime, owner, content or link."""

    kind: str
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    content: bytes | None
    """The sha256 of a file's bytes, a symlink's target; None for directories."""


def _describe(path: bytes, status: os.stat_result) -> Node:
    mode = status.st_mode
    if stat.S_ISLNK(mode):
        kind, content = "symlink", os.readlink(path)  # noqa: PTH115 (bytes paths: pathlib takes text)
    elif stat.S_ISDIR(mode):
        kind, content = "dir", None
    elif not stat.S_ISREG(mode):
        kind, content = "special", None  # a FIFO: opening it would block
    else:
        kind = "file"
        digest = hashlib.sha256()
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(descriptor, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        content = digest.digest()
    return Node(kind, stat.S_IMODE(mode), status.st_mtime_ns, status.st_uid, status.st_gid, content)


def snapshot(root: bytes) -> dict[bytes, Node]:
    """Return every path below *root* (relative, as bytes) and the root itself (``b""``)."""
    found = {b"": _describe(root, os.lstat(root))}
    pending = [b""]
    while pending:
        relative = pending.pop()
        directory = root + b"/" + relative if relative else root
        for entry in os.scandir(directory):
            child = relative + b"/" + entry.name if relative else entry.name
            status = entry.stat(follow_symlinks=False)
            found[child] = _describe(entry.path, status)
            if stat.S_ISDIR(status.st_mode):
                pending.append(child)
    return found
