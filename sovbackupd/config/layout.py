"""Where the policy's paths lie relative to each other: layouts no backup could restore.

A backup directory inside a data directory archives every earlier backup into each new
one, and a restore of that directory wipes the newer backups; a data directory inside
another is archived twice, and no full restore can put both back; a backup directory on
``/tmp`` or ``/run`` is cleaned or lost at boot. These rules refuse such layouts.

They compare paths as the policy writes them (the models do, needing no disk) and, at
check-config, start and reload, once more after resolving symlinks, since ``data ->
/srv/x`` with ``backup_dir: /srv/x/backups`` is the same trap.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sovbackupd.config.models import Sources

Location = tuple[str | int, ...]

# Directories of the system itself: a backup_dir there mixes archives with the OS's own
# files, or (/tmp, /var/tmp) with files anyone may create and the system cleans.
_SYSTEM_DIRS = {
    Path("/"): "the root directory",
    **{
        Path(name): "a system directory"
        for name in ("/bin", "/boot", "/etc", "/sbin", "/usr", "/var")
    },
    Path("/tmp"): "world-writable and cleaned by the system",  # noqa: S108 (refused, not used)
    Path("/var/tmp"): "world-writable and cleaned by the system",  # noqa: S108 (refused, not used)
}
# Nothing below these is storage: kernel file systems, and /run's tmpfs, lost at boot.
_NOT_STORAGE = {
    Path("/proc"): "a kernel file system, not storage",
    Path("/sys"): "a kernel file system, not storage",
    Path("/dev"): "device nodes and shared memory, not storage",
    Path("/run"): "tmpfs, emptied at every boot",
}
SUGGESTED_BACKUP_DIR = "/var/backups/sovereigncore"


def shown(path: Path) -> str:
    """Return *path* for a message, quoted when a control character is in it.

    A newline in a path would split the message and could forge a line of its own.
    """
    return quoted(str(path))


def quoted(text: str) -> str:
    """Return *text* (a name, a link target) for a message, quoted when it is not printable.

    An escape sequence in it would drive the operator's terminal; a newline would forge a
    line. A text that needs no quoting comes back as it is.
    """
    return text if text.isprintable() else repr(text)


def lexical(path: Path) -> Path:
    """Return absolute *path* without ``.``, ``..`` or repeated slashes, as text alone says.

    ``//tmp`` is ``/tmp`` on Linux, though POSIX lets pathlib keep the two slashes.
    """
    return Path("/" + os.path.normpath(path).lstrip("/"))


def dotted(location: Location) -> str:
    """Return *location* as the operator writes the key: ``sources.dirs[1]``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def system_dir(path: Path) -> str | None:
    """Return why *path* (absolute, normalized) cannot be a backup_dir, None when it can."""
    if (reason := _SYSTEM_DIRS.get(path)) is not None:
        return reason
    if len(path.parts) == 2 and path.name.startswith("lib"):  # /lib, /lib32, /lib64, /libx32
        return "a system directory"
    for root, reason in _NOT_STORAGE.items():
        if path == root or root in path.parents:
            return reason
    return None


def backup_dir_refusal(path: Path, resolved: Path | None = None) -> str | None:
    """Return why *path* may not be a backup_dir by where it lies, None when it may.

    With *resolved*, that is where *path* really lies once its symlinks are followed.
    """
    where = lexical(resolved if resolved is not None else path)
    reason = system_dir(where)
    if reason is None:
        return None
    real = f" (resolved: {shown(where)})" if where != lexical(path) else ""
    return (
        f"must not be {shown(path)}{real}: it is {reason}; use a directory of its own, "
        f"e.g. {SUGGESTED_BACKUP_DIR}"
    )


@dataclass(frozen=True)
class Placed:
    """One path of the policy, with its key and whether everything below it is archived."""

    location: Location
    path: Path
    is_tree: bool

    @property
    def key(self) -> str:
        """Return the key as the operator writes it: ``sources.dirs[1]``."""
        return dotted(self.location)


def placed(sources: Sources) -> list[Placed]:
    """Return every source path of *sources*, in the order the policy lists them."""
    found: list[Placed] = []
    if sources.redis is not None:
        found.append(Placed(("sources", "redis", "rdb_path"), sources.redis.rdb_path, False))
        if sources.redis.aof_dir is not None:
            # Only its AOF files are read; a backup_dir there is odd but not archived.
            found.append(Placed(("sources", "redis", "aof_dir"), sources.redis.aof_dir, False))
    for key, is_tree in (("sqlite", False), ("config", False), ("dirs", True)):
        for index, entry in enumerate(getattr(sources, key)):
            found.append(Placed(("sources", key, index), entry.path, is_tree))
    return found


def _as(entry: Placed, path: Path) -> str:
    """Name *entry* and its path, and what it resolves to when that differs."""
    resolved = "" if path == lexical(entry.path) else f" (resolved: {shown(path)})"
    return f"{entry.key} {shown(entry.path)}{resolved}"


def _relation(inner: Path, outer: Path) -> str | None:
    """Return how *inner* lies in *outer* as words, None when it does not."""
    if inner == outer:
        return "is the same path as"
    return "is inside" if outer in inner.parents else None


def overlaps(
    backup_dir: Path, sources: Sources, resolve: Callable[[Path], Path] = lexical
) -> Iterator[tuple[Location, str]]:
    """Yield each pair of paths whose backups could not be restored, with one key of the pair.

    *resolve* maps each path to what is compared: :func:`lexical` for the text of the
    policy, a symlink-resolving one at check time.
    """
    store = Placed(("backup_dir",), backup_dir, True)
    store_path = resolve(backup_dir)
    entries = [(entry, resolve(entry.path)) for entry in placed(sources)]
    for entry, path in entries:
        if entry.is_tree and (relation := _relation(store_path, path)):
            yield (
                store.location,
                (
                    f"{_as(store, store_path)} {relation} {_as(entry, path)}: every backup would "
                    "archive the earlier ones, and restoring it would delete the newer ones"
                ),
            )
        elif relation := _relation(path, store_path):
            yield (
                entry.location,
                (
                    f"{_as(entry, path)} {relation} {_as(store, store_path)}: backups would "
                    "archive their own directory, and retention and cleanup delete files there"
                ),
            )
    trees = [(entry, path) for entry, path in entries if entry.is_tree]
    for later, (entry, path) in enumerate(trees):
        for other, other_path in trees[:later]:
            relation = _relation(path, other_path) or (
                "contains" if _relation(other_path, path) else None
            )
            if relation is not None:
                yield (
                    entry.location,
                    (
                        f"{_as(entry, path)} {relation} {_as(other, other_path)}: it would be "
                        "archived twice and no full restore could put it back"
                    ),
                )
    for entry, path in entries:
        if entry.is_tree:
            continue
        for tree, tree_path in trees:
            if relation := _relation(path, tree_path):
                yield (
                    entry.location,
                    (
                        f"{_as(entry, path)} {relation} {_as(tree, tree_path)}: it would be "
                        "archived twice and no full restore could put it back; restore "
                        "refuses a file inside a data dir"
                    ),
                )
