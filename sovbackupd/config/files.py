"""The files a policy names, checked on disk: a separate step from validating the models.

Validation (:mod:`sovbackupd.config.models`) is pure, so that the example policy, the
generated reference and the tests can build policies naming paths this machine does not
have. :func:`missing` is the step that looks at the disk; ``check-config``, the daemon's
start and every reload run it, so that a file a backup would fail on is a config error
before the first backup, not a failed backup hours later. :func:`unrestorable` is the
same step for the layout: the model's path rules again after symlinks are resolved, and
the backup directory's owner and mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from sovbackupd.config import layout
from sovbackupd.config.layout import shown
from sovbackupd.config.models import Policy

Location = layout.Location
Kind = Literal["file", "directory"]

_GPG_FILES = (
    "passphrase_file",
    "public_keys_file",
    "secret_keys_file",
    "secret_key_passphrase_file",
)
_REMOTE_FILES = ("identity_file", "known_hosts_file", "credentials_file")


def _needed(policy: Policy) -> list[tuple[Location, Path, Kind]]:
    """Return every path the policy needs present, with its key and what it must be."""
    sources = policy.sources
    needed: list[tuple[Location, Path, Kind]] = []
    if sources.redis is not None and sources.redis.password_file is not None:
        needed.append((("sources", "redis", "password_file"), sources.redis.password_file, "file"))
    # rdb_path and aof_dir are left out: Redis creates them, and a new server may not
    # have saved yet; the backup's BGSAVE writes the RDB before it is read.
    lists: tuple[tuple[str, Kind], ...] = (
        ("sqlite", "file"),
        ("config", "file"),
        ("dirs", "directory"),
    )
    for key, kind in lists:
        for index, entry in enumerate(getattr(sources, key)):
            if not entry.optional:
                needed.append((("sources", key, index), entry.path, kind))
    if policy.gpg is not None:
        for key in _GPG_FILES:
            if (path := getattr(policy.gpg, key)) is not None:
                needed.append((("encryption", "gpg", key), path, "file"))
    for index, remote in enumerate(policy.remotes):
        for key in _REMOTE_FILES:
            if (path := getattr(remote, key, None)) is not None:
                needed.append((("remotes", index, key), path, "file"))
    return needed


def _problem(path: Path, kind: Kind, optional_allowed: bool) -> str | None:
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        hint = " (optional: true allows that)" if optional_allowed else ""
        return f"{shown(path)} does not exist{hint}"
    except PermissionError:
        return None  # not ours to see: the daemon may run as a user who can
    except OSError as error:
        return f"{shown(path)} cannot be checked: {error.strerror}"
    is_kind = stat.S_ISDIR(mode) if kind == "directory" else stat.S_ISREG(mode)
    return None if is_kind else f"{shown(path)} is not a {kind}"


def missing(policy: Policy) -> list[tuple[Location, str]]:
    """Return each file or directory *policy* needs that is absent or of the wrong kind.

    Each problem comes with the key that names the path. Optional sources may be absent;
    a path this user may not look at is taken on trust, since the daemon may run as
    another user.
    """
    problems = []
    for location, path, kind in _needed(policy):
        # A source entry (sources.<list>[i]) may be marked optional; other files may not.
        optional_allowed = location[0] == "sources" and isinstance(location[-1], int)
        if (problem := _problem(path, kind, optional_allowed)) is not None:
            problems.append((location, problem))
    return problems


def _resolved(path: Path) -> Path:
    """Return *path* with its symlinks resolved, as far as they exist; lexical on a loop."""
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop: the backup reports it on its own
        return layout.lexical(path)


def unsafe_backup_dir(path: Path, euid: int | None = None) -> str | None:
    """Return why the directory *path* may not hold backups, None when it may.

    Refused: a directory others can write (group or world, sticky or not), since they could
    delete or replace archives; for a user other than root (*euid*, by default the running
    one), a directory another non-root user owns; and, existing or not, a path through a
    directory others can write: without the sticky bit they could rename the backup_dir
    (or a parent) away and plant their own, and with it a directory there that another
    user made is theirs (``/tmp/x`` made before the daemon first ran). A path that is no
    directory is left to the code that creates or opens it.
    """
    euid = os.geteuid() if euid is None else euid
    if (shared := _shared_parent(path, euid)) is not None:
        return shared
    try:
        status = path.stat()
    except OSError:
        return None
    if not stat.S_ISDIR(status.st_mode):
        return None
    mode = stat.S_IMODE(status.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        others = "world" if mode & stat.S_IWOTH else "group"
        return (
            f"backup_dir {shown(path)} is {others}-writable (mode {mode:04o}): others could "
            "delete or replace its backups; make it 0700 (chmod 0700) or choose another one"
        )
    if euid != 0 and status.st_uid not in (0, euid):
        return (
            f"backup_dir {shown(path)} belongs to uid {status.st_uid}, not to uid {euid} "
            "that runs sovbackupd: its owner could delete or replace its backups"
        )
    return None


def _shared_parent(path: Path, euid: int) -> str | None:
    """Return why a directory on the way to *path* lets others replace it, None if none does."""
    child = _resolved(path)
    for parent in child.parents:
        try:
            mode = stat.S_IMODE(parent.stat().st_mode)
        except OSError:  # not there yet: created with the backup_dir, ours alone
            child = parent
            continue
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            if not mode & stat.S_ISVTX:
                return (
                    f"backup_dir {shown(path)} lies in {shown(parent)}, which others can write "
                    f"(mode {mode:04o}): they could rename {shown(child)} away and plant "
                    f"their own backups; use a directory of its own, e.g. "
                    f"{layout.SUGGESTED_BACKUP_DIR}"
                )
            try:
                owner = child.lstat().st_uid
            except OSError:
                owner = euid  # not there yet: made by us when the first backup runs
            if owner not in (0, euid):
                return (
                    f"backup_dir {shown(path)}: {shown(child)} belongs to uid {owner} in "
                    f"{shown(parent)}, which anyone can write (mode {mode:04o}): its owner "
                    "could delete or replace the backups; use a directory of its own, e.g. "
                    f"{layout.SUGGESTED_BACKUP_DIR}"
                )
        child = parent
    return None


def unrestorable(policy: Policy) -> list[tuple[Location, str]]:
    """Return each reason the backups of *policy* could not be restored, found on disk.

    The model's layout rules once more with symlinks resolved, and the backup directory's
    safety: where it really lies, and who else may write it.
    """
    backup_dir = _resolved(policy.backup_dir)
    problems = list(layout.overlaps(policy.backup_dir, policy.sources, _resolved))
    if (refusal := layout.backup_dir_refusal(policy.backup_dir, backup_dir)) is not None:
        problems.append((("backup_dir",), refusal))
    if (unsafe := unsafe_backup_dir(policy.backup_dir)) is not None:
        problems.append((("backup_dir",), unsafe))
    return problems
