"""Restore: a stored backup verified, extracted beside its destinations, swapped into place.

The archive's bytes are checked against their sidecar first. One streaming pass then
extracts every selected member into a staging directory beside its destination, checking
each member against the manifest (name, type, size, mode, sha256) and refusing what a
hostile archive could use to write elsewhere: absolute or ``..`` paths, hard links,
devices, members that pass through a symlink. Symlinks themselves come back as they were
archived, whatever they point to, as tar restores them.
Only when the whole archive has passed does anything live change: a pre-restore safety
backup, the policy's stop commands, one atomic rename (an exchange, for directories) per
component, then the start commands. A swap that fails puts back what was already swapped.
Each destination's directory is opened once (:mod:`sovbackupd.fsat`), following no link,
and staging, swap and cleanup all go through that descriptor and the staging one: a
name swapped for a symlink meanwhile is refused, never followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import decimal
import errno
import hashlib
import itertools
import os
import shutil
import sqlite3
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Literal

import structlog
from pydantic import Field

from sovbackupd import (
    archive,
    auth,
    backup,
    fsat,
    hooks,
    redis_server,
    statefile,
    targets,
    tree,
    untrusted,
)
from sovbackupd.config.layout import quoted
from sovbackupd.config.models import (
    STOP_ORDER,
    ComponentCommands,
    Gpg,
    Hooks,
    Policy,
    RedisSource,
    SourcePath,
    Sources,
)
from sovbackupd.errors import (
    AbortedError,
    ArchiveError,
    AuthError,
    RestoreError,
    SovbackupdError,
    UnsafePathError,
    UsageError,
)
from sovbackupd.manifest import (
    FULL_LIMIT_BYTES,
    INFO_NAME,
    MANIFEST_NAME,
    SAFETY_TIER,
    DatabaseDetails,
    FileEntry,
    Manifest,
    ManifestError,
    RedisDetails,
    parse_manifest,
)
from sovbackupd.metrics import Metrics
from sovbackupd.sources import files, sqlite
from sovbackupd.sources.redis import RedisSource as RedisReader
from sovbackupd.sources.sqlite import WAL_FILES
from sovbackupd.store import Store, StoredBackup, human_size
from sovbackupd.wording import plural

log = structlog.get_logger("sovbackupd.restore")

Component = Literal["redis", "sqlite", "config", "data"]
COMPONENTS: tuple[Component, ...] = ("redis", "sqlite", "config", "data")
STAGING_PREFIX = ".sovbackupd-restore-"
AOF_DIR_NAME = "appendonlydir"
LEGACY_AOF_NAME = "appendonly.aof"
RDB_NAME = "redis_dump.rdb"
CONFIG_DIR = "config"
MAX_LINK_HOPS = fsat.MAX_LINK_HOPS
SETID_BITS = stat.S_ISUID | stat.S_ISGID
_KINDS = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink"}
_TYPE_NAMES = {
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.CONTTYPE: "contiguous file",
}


@dataclass
class Unit:
    """One thing put back atomically: a file, or a directory with everything below it."""

    component: Component
    arcname: str
    """Its path in the archive, below the top directory (``config/.env``, ``data``)."""
    kind: Literal["file", "dir"]
    destination: Path
    staged: Path
    """Where it is extracted first: inside a staging directory beside *destination*."""
    entries: list[FileEntry] = field(default_factory=list)
    owner: tuple[int, int] | None = None
    """Owner forced on the whole unit (the live Redis files' owner), else the manifest's."""
    aof_base: str | None = None
    """Set on an AOF directory made from the restored RDB: its files' base name."""
    links: list[fsat.Link] = field(default_factory=list)
    """The symlinks met on the way from the policy's path to *destination*."""
    anchor: _Anchor | None = field(default=None, repr=False, compare=False)
    """The open parent and staging directories, from extraction to cleanup."""
    seen: tuple[str, tuple[int, int] | None] = ("absent", None)
    """What *destination* was when the plan was made: its kind and its identity."""
    tree: tuple[int, int] | None = None
    """The identity of the staged directory, once swapped into place."""

    @property
    def work(self) -> Path:
        """Return the staged path through the open staging directory, once it is open."""
        if self.anchor is None:
            return self.staged
        return fsat.anchored(self.anchor.staging, self.staged.name)

    def member_path(self, arcname: str) -> Path:
        """Return where the member *arcname* of this unit is staged."""
        if arcname == self.arcname:
            return self.work
        return self.work / arcname[len(self.arcname) + 1 :]

    @property
    def file_count(self) -> int:
        """Return how many regular files the unit holds."""
        return sum(entry.type == "file" for entry in self.entries)


@dataclass(frozen=True)
class Plan:
    """Everything a restore will do, decided before anything is written."""

    backup: StoredBackup
    manifest: Manifest
    manifest_sha256: str
    """Of the full manifest as read (beside, or decrypted): the one inside must match it."""
    archive_sha256: str
    """What the archive must hash to: as its record vouched for it, else its sidecar."""
    units: list[Unit]
    live: bool
    """False with ``--to``: nothing outside that directory is touched."""
    safety_sources: Sources | None
    """What the pre-restore safety backup captures; None when it is skipped."""
    safety_note: str
    stop: list[list[str]]
    start: list[list[str]]
    redis_running: bool
    redis_where: str | None
    exclude: tuple[str, ...] = ()
    """The policy's excludes: files they match are carried over from live directories."""
    refusal: str | None = None
    """Why the restore must not go ahead (Redis runs and nothing would stop it)."""
    encryption: Gpg | None = None
    """How to decrypt the archive, when it is encrypted."""
    notes: tuple[str, ...] = ()
    """What the operator should know but need not act on (symlinks pointing outside)."""
    to: Path | None = None
    """The ``--to`` directory (or a drill's scratch), resolved; None for a live restore."""
    authenticated: bool = True
    """False for a backup trusted with --trust-unsigned: no owners, no setuid from it."""
    keep_setuid: bool = False
    """``--keep-setuid``: files keep the setuid/setgid bits the archive gives them."""

    @property
    def staging_dirs(self) -> list[Path]:
        """Return the staging directories, one per destination directory."""
        return sorted({unit.staged.parent for unit in self.units})

    def _decrypt_step(self) -> list[str]:
        if self.encryption is None or not archive.encrypted(self.backup.path):
            return []
        how = "the secret key" if self.encryption.recipients else "the passphrase"
        return [f"decrypt it with gpg and {how}, checking its integrity at the end"]

    def steps(self) -> list[str]:
        """Describe each step in order, as a runbook a person could follow."""
        name = self.backup.path.name
        steps = [
            f"verify {name} against {archive.sidecar_path(self.backup.path).name} (sha256)",
            *self._decrypt_step(),
            f"extract {plural(sum(unit.file_count for unit in self.units), 'file')} "
            f"({human_size(_unit_bytes(self.units))}) into "
            + ", ".join(str(path) for path in self.staging_dirs)
            + ", checking every member against the manifest",
        ]
        if not self.authenticated and os.geteuid() == 0:
            steps.append(
                "leave every file owned by root: the backup is not authenticated, so the "
                "owners it names are not restored"
            )
        if self.live:
            steps.append(
                f"safety backup labelled {SAFETY_TIER}: {self.safety_note}"
                if self.safety_sources is not None
                else f"no safety backup: {self.safety_note}"
            )
        steps.extend(f"run restore.stop: {' '.join(argv)}" for argv in self.stop)
        if self.live and self.redis_where is not None:
            steps.append(f"check that Redis at {self.redis_where} no longer answers")
        for unit in self.units:
            steps.extend(_swap_steps(unit))
        steps.extend(f"run restore.start: {' '.join(argv)}" for argv in self.start)
        steps.append("remove the staging directories and the replaced data")
        return steps


@dataclass(frozen=True)
class RestoreResult:
    """What a restore put back."""

    name: str
    units: list[Unit]
    files: int
    bytes: int
    safety_backup: str | None
    duration_seconds: float
    start_failure: str | None = None
    """How a restore.start command failed after the data was put in place; None if all ran."""


def _unit_bytes(units: list[Unit]) -> int:
    return sum(entry.size for unit in units for entry in unit.entries)


def _swap_steps(unit: Unit) -> list[str]:
    steps = []
    if unit.component == "sqlite":
        steps.append(
            "remove " + ", ".join(f"{unit.destination}{end}" for end in WAL_FILES) + " if present"
        )
    what = "directory" if unit.kind == "dir" else "file"
    how = f" (made from {RDB_NAME}, so Redis loads it)" if unit.aof_base else ""
    owner = f", owner {unit.owner[0]}:{unit.owner[1]}" if unit.owner else ""
    steps.append(f"replace {what} {unit.destination} with {unit.arcname}{how}{owner}")
    if unit.component == "data":
        steps.append(
            f"move into the new {unit.destination} what the policy's excludes left out of "
            "backups (no backup holds it)"
        )
    return steps


def load_manifest(stored: StoredBackup, encryption: Gpg | None = None) -> Manifest:
    """Return the full manifest of *stored*, validated as restore and drills need it.

    See :func:`read_manifest`; raise ArchiveError when it is unusable.
    """
    return read_manifest(stored, encryption)[0]


def read_manifest(
    stored: StoredBackup, encryption: Gpg | None = None, signed: Mapping[str, str] | None = None
) -> tuple[Manifest, str]:
    """Return the full manifest of backup *stored* and the sha256 of its bytes.

    *signed* is what the backup's record vouched for (:func:`auth.vouched`): each file is
    read once and parsed from the bytes compared with it, so a file swapped after the
    check is refused (AuthError) rather than trusted.

    It is the copy beside the archive, or, when that is the head of an encrypted backup,
    the encrypted copy decrypted (into memory) with *encryption*. Every field is checked
    against its bounds, and every entry's path, origin and unit as :func:`plan` checks
    them: a manifest that passes here restores without a crash. Needs no policy, so a
    backup can read its own manifest back before committing it. Raise ArchiveError, one
    line naming the backup and the field, when it is unusable (CryptoError when the
    encrypted copy does not decrypt).
    """
    path = archive.manifest_path(stored.path)
    signed = signed or {}
    beside, data = _beside(stored, signed)
    if not beside.is_head:
        return beside, hashlib.sha256(data).hexdigest()
    if not archive.encrypted(stored.path):
        raise ArchiveError(
            f"backup {stored.name}: {path.name} is the head of an encrypted backup, "
            f"but {stored.path.name} is not encrypted"
        )
    sealed = archive.encrypted_manifest_path(stored.path).name
    try:
        data = archive.read_encrypted_manifest(stored.path, encryption, signed.get(sealed))
    except AuthError as error:
        raise AuthError(f"backup {stored.name}: {error}") from None
    full = validated(data, stored.name)
    if full.is_head or full.head() != beside:
        # The head must be this manifest's: an old head beside a newer archive would list
        # and be pruned as another backup.
        raise ArchiveError(
            f"backup {stored.name}: {path.name} is not the head of the manifest in "
            f"{archive.encrypted_manifest_path(stored.path).name}"
        )
    return full, hashlib.sha256(data).hexdigest()


def _beside(stored: StoredBackup, signed: Mapping[str, str]) -> tuple[Manifest, bytes]:
    """Return the manifest beside *stored*, validated, and its bytes (FULL_LIMIT_BYTES at most).

    Raise ArchiveError, one line naming the backup, when it is missing or unusable, and
    AuthError when its bytes are not the ones *signed* lists (see :func:`read_manifest`).
    """
    path = archive.manifest_path(stored.path)
    try:
        with untrusted.open_regular(path) as handle:
            data = handle.read(FULL_LIMIT_BYTES + 1)
    except FileNotFoundError:
        raise ArchiveError(f"backup {stored.name}: {path.name} is missing") from None
    except OSError as error:
        raise ArchiveError(
            f"backup {stored.name}: {path.name} is unreadable: {error.strerror}"
        ) from None
    except ValueError as error:  # a FIFO
        raise ArchiveError(f"backup {stored.name}: {path.name} is unusable: {error}") from None
    if len(data) > FULL_LIMIT_BYTES:
        raise ArchiveError(
            f"backup {stored.name}: {path.name} is unusable: larger than "
            f"{FULL_LIMIT_BYTES >> 20} MiB"
        )
    if path.name in signed and hashlib.sha256(data).hexdigest() != signed[path.name]:
        raise AuthError(
            f"backup {stored.name}: {path.name} changed after its authentication was checked"
        )
    return validated(data, stored.name), data


def validated(data: bytes, name: str) -> Manifest:
    """Return the manifest of backup *name* that *data* holds, checked as restore reads it.

    Raise ArchiveError, one line naming the backup and the field, when it is unusable.
    """
    try:
        manifest = parse_manifest(data)
    except ManifestError as error:
        raise ArchiveError(f"backup {name}: {error}") from None
    if manifest.id != name:
        # A copy renamed to look newer (or older): it would restore another backup's data
        # under this name, and retention would keep it for a date it does not hold.
        raise ArchiveError(
            f"backup {name}: manifest field id: {manifest.id!r} is another backup's name"
        )
    if not auth.in_second(manifest.created, name):
        raise ArchiveError(
            f"backup {name}: manifest field created: {manifest.created.isoformat()} is not "
            "the time its name holds (a copy of another backup)"
        )
    _groups(manifest)
    return manifest


def load_head(stored: StoredBackup, signed: Mapping[str, str] | None = None) -> Manifest:
    """Return the manifest beside *stored* as restore would read it, without decrypting.

    For an encrypted backup's head, the encrypted full manifest must be there too (a
    regular file); what it holds is checked only by what decrypts it. Raise ArchiveError,
    or AuthError when the bytes read are not those *signed* lists (:func:`read_manifest`).
    """
    beside, _ = _beside(stored, signed or {})
    if beside.is_head:
        encrypted_copy = archive.encrypted_manifest_path(stored.path)
        try:
            untrusted.open_regular(encrypted_copy).close()
        except (OSError, ValueError):
            raise ArchiveError(
                f"backup {stored.name}: {encrypted_copy.name} is missing or not a file: the "
                f"head beside {stored.path.name} says its manifest is encrypted there"
            ) from None
    return beside


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and "\0" not in path and all(part not in ("", ".", "..") for part in parts)


def _stays_inside(path: str, links: dict[str, str], root: str) -> bool:
    """Tell whether the symlink at *path* resolves inside the tree *root*.

    The walk follows the tree's other symlinks (*links*: path -> target), as the kernel
    would once they exist, so that a chain such as ``a -> b/..`` with ``b -> ..`` cannot
    climb out one harmless-looking step at a time.
    """
    floor = len(root.split("/"))
    current = path.split("/")[:-1]
    remaining = links[path].split("/")
    hops = 0
    while remaining:
        part = remaining.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if len(current) <= floor:
                return False
            current.pop()
            continue
        current.append(part)
        target = links.get("/".join(current))
        if target is not None:
            hops += 1
            if hops > MAX_LINK_HOPS or not target or target.startswith("/"):
                return False
            current.pop()
            remaining = target.split("/") + remaining
    return True


def _outside_links(unit: Unit) -> list[FileEntry]:
    """Return the symlinks of *unit* that lead outside it (absolute ones always do)."""
    links = {entry.path: entry.link or "" for entry in unit.entries if entry.type == "symlink"}
    return [
        entry
        for entry in unit.entries
        if entry.type == "symlink"
        and (
            not entry.link
            or entry.link.startswith("/")
            or not _stays_inside(entry.path, links, unit.arcname)
        )
    ]


NOTES_SHOWN = 10


def _link_notes(units: list[Unit]) -> list[str]:
    """Say which restored symlinks point outside their component: restored as they are."""
    outside = [(unit, entry) for unit in units for entry in _outside_links(unit)]
    notes = [
        f"{quoted(entry.path)} -> {quoted(entry.link or '')} points outside "
        f"{quoted(unit.arcname)}; restored as a link"
        for unit, entry in outside[:NOTES_SHOWN]
    ]
    if len(outside) > NOTES_SHOWN:
        notes.append(f"{plural(len(outside) - NOTES_SHOWN, 'more symlink')} point outside too")
    return notes


def _component_of(entry: FileEntry) -> tuple[Component, str] | None:
    """Return the component of *entry* and the arcname of the unit it belongs to."""
    head = entry.path.split("/", 1)[0]
    if head in (RDB_NAME, AOF_DIR_NAME, LEGACY_AOF_NAME):
        return "redis", head
    if head == CONFIG_DIR:
        return ("config", entry.path) if entry.path != CONFIG_DIR else None
    return ("sqlite" if entry.type == "file" and "/" not in entry.path else "data"), head


def _allowed_origins(policy: Policy, component: Component) -> set[str]:
    """Return the live paths the policy backs up for *component*."""
    configured = policy.sources
    match component:
        case "redis":
            redis_config = configured.redis
            if redis_config is None:
                return set()
            found = {str(redis_config.rdb_path)}
            if redis_config.aof_dir is not None:
                found |= {str(redis_config.aof_dir), str(redis_config.aof_dir / LEGACY_AOF_NAME)}
            return found
        case "sqlite":
            return {str(entry.path) for entry in configured.sqlite}
        case "config":
            return {str(entry.path) for entry in configured.config}
        case "data":
            return {str(entry.path) for entry in configured.dirs}


def _destination(origin: str | None, arcname: str, to: Path | None) -> Path:
    if origin is None or not origin.startswith("/") or not _safe_relative(origin[1:]):
        raise ArchiveError(f"{arcname} has no usable original path ({origin!r}) in the manifest")
    return to / origin[1:] if to is not None else Path(origin)


@dataclass(frozen=True)
class _Group:
    """The manifest's entries of one future unit, before any policy is applied."""

    component: Component
    arcname: str
    origin: str
    entries: list[FileEntry]


def _groups(manifest: Manifest) -> list[_Group]:
    """Group the manifest's entries into units; check each name, origin and nesting.

    Needs no policy: what is refused here is refused whatever restores the backup.
    """
    groups: dict[str, _Group] = {}
    listed: set[str] = set()
    for entry in manifest.files:
        if not _safe_relative(entry.path):
            raise ArchiveError(f"{manifest.id}: manifest entry {entry.path!r} is not a safe path")
        if entry.path in listed:
            # One member, two descriptions: which one restore checked would be a guess.
            raise ArchiveError(
                f"{manifest.id}: {quoted(entry.path)} is listed twice in the manifest"
            )
        listed.add(entry.path)
        found = _component_of(entry)
        if found is None:
            continue
        component, root = found
        group = groups.get(root)
        if group is None:
            if entry.path != root:
                raise ArchiveError(
                    f"{manifest.id}: {quoted(entry.path)} comes before its directory"
                )
            if entry.type == "symlink":
                raise ArchiveError(
                    f"{manifest.id}: {quoted(root)} is a symlink, not a file or directory"
                )
            _destination(entry.origin, root, None)
            group = _Group(component, root, entry.origin or "", [])
            groups[root] = group
        group.entries.append(entry)
    _check_not_nested(manifest, list(groups.values()))
    return list(groups.values())


def _check_not_nested(manifest: Manifest, groups: list[_Group]) -> None:
    """Refuse two units of which one would be put back inside the other.

    The inner one would be staged in, and swapped into, a tree the outer swap replaces,
    and through a symlink of the outer one it could land anywhere.
    """
    by_origin = sorted(groups, key=lambda group: group.origin.split("/"))
    for outer, inner in itertools.pairwise(by_origin):
        if inner.origin == outer.origin or inner.origin.startswith(f"{outer.origin}/"):
            raise ArchiveError(
                f"{manifest.id}: {quoted(inner.arcname)} ({quoted(inner.origin)}) would be "
                f"restored inside {quoted(outer.arcname)} ({quoted(outer.origin)}): restore "
                "them one at a time with --only"
            )


def _units(manifest: Manifest, only: set[Component], to: Path | None, policy: Policy) -> list[Unit]:
    """Return the units of the *only* components, with their destinations and staging."""
    units: list[Unit] = []
    for group in _groups(manifest):
        destination = _destination(group.origin, group.arcname, to)
        links: list[fsat.Link] = []
        if to is None and group.component in only:
            if str(destination) not in _allowed_origins(policy, group.component):
                raise RestoreError(
                    f"{manifest.id} puts {group.arcname} back to {destination}, which the "
                    "policy does not back up; restore it with --to DIR and move it by hand"
                )
            # A symlinked .env or data dir (or one below a symlinked dir) was backed up by
            # content: the links stay, what they lead to is restored.
            destination, links = fsat.resolve(destination)
        kind: Literal["file", "dir"] = "dir" if group.entries[0].type == "dir" else "file"
        staged = destination.parent / f"{STAGING_PREFIX}{manifest.id}" / f"{len(units)}"
        units.append(Unit(group.component, group.arcname, kind, destination, staged, links=links))
        units[-1].entries.extend(group.entries)
    return [unit for unit in units if unit.component in only]


def check_restorable(manifest: Manifest, policy: Policy) -> None:
    """Raise as a live restore of all of *manifest* would, before it touched anything.

    Each unit must go back to a path the policy backs up; a backup checks its own
    manifest with this before it commits.
    """
    _units(manifest, set(COMPONENTS), None, policy)


def _redis_files_owner(unit: Unit) -> tuple[int, int] | None:
    """Return the owner of the live Redis file or, failing that, of its directory."""
    for candidate in (unit.destination, unit.destination.parent):
        try:
            status = candidate.lstat()
        except FileNotFoundError:
            continue
        return status.st_uid, status.st_gid
    return None


def _live_aof(redis_config: RedisSource) -> tuple[Path, str] | None:
    """Return the live AOF directory and its base name, when the server keeps one."""
    directory = redis_config.aof_dir or redis_config.rdb_path.parent / AOF_DIR_NAME
    manifests = sorted(directory.glob("*.manifest")) if directory.is_dir() else []
    if not manifests:
        return None
    return directory, manifests[0].name.removesuffix(".manifest")


def _with_aof_from_rdb(units: list[Unit], policy: Policy, manifest: Manifest) -> list[Unit]:
    """Add an AOF directory made from the RDB when the live server would load an old AOF.

    Redis 7 with ``appendonly yes`` loads its AOF and ignores the RDB: a lone restored RDB
    would come up as the old (or an empty) dataset. A directory whose manifest lists the
    restored RDB as its base file makes the server load exactly the restored data.
    """
    redis_config = policy.sources.redis
    names = {unit.arcname for unit in units}
    if redis_config is None or RDB_NAME not in names or names & {AOF_DIR_NAME, LEGACY_AOF_NAME}:
        return units
    if (redis_config.rdb_path.parent / LEGACY_AOF_NAME).exists():
        raise RestoreError(
            f"{redis_config.rdb_path.parent / LEGACY_AOF_NAME} exists and {manifest.id} holds "
            "no AOF: Redis would load the old AOF instead of the restored RDB; move it away "
            "(or set appendonly no) and restore again"
        )
    live = _live_aof(redis_config)
    if live is None:
        return units
    directory, base = live
    # Staged beside its own destination: every swap is a rename within one opened directory.
    staged = directory.parent / f"{STAGING_PREFIX}{manifest.id}" / f"{len(units)}"
    aof_unit = Unit("redis", AOF_DIR_NAME, "dir", directory, staged, aof_base=base)
    return [*units, aof_unit]


def _redis_answers(redis_config: RedisSource) -> bool:
    return RedisReader(redis_config).answers()


def _safety_sources(policy: Policy, units: list[Unit], redis_running: bool) -> Sources | None:
    """Return the sources a pre-restore safety backup captures: what exists of each unit.

    Every path is optional, since a disaster recovery restores onto a bare server; Redis
    is captured from its files when it is not running.
    """
    configured = policy.sources
    components = {unit.component for unit in units}
    # The policy's paths, as the manifest recorded them: a symlinked source's destination
    # is where its link leads, and the safety backup captures it through the link.
    origins = {unit.entries[0].origin for unit in units if unit.entries}

    def existing(entries: list[SourcePath]) -> list[SourcePath]:
        return [
            SourcePath(path=entry.path, optional=True)
            for entry in entries
            if str(entry.path) in origins and entry.path.exists()
        ]

    redis_config = configured.redis if "redis" in components else None
    if redis_config is not None and not (redis_running or redis_config.rdb_path.exists()):
        redis_config = None
    sqlite = existing(configured.sqlite) if "sqlite" in components else []
    config = existing(configured.config) if "config" in components else []
    dirs = existing(configured.dirs) if "data" in components else []
    if redis_config is None and not (sqlite or config or dirs):
        return None
    return configured.model_copy(
        update={"redis": redis_config, "sqlite": sqlite, "config": config, "dirs": dirs}
    )


def service_commands(
    configured: list[list[str]] | ComponentCommands,
    components: Collection[Component],
    stage: Literal["stop", "start"],
) -> list[list[str]]:
    """Return the restore.stop or restore.start commands of a live restore of *components*.

    A list of commands runs whole, in its order, whatever is restored. A mapping by
    component gives the commands of the restored components only, each distinct argv
    once (where it first comes): for stop in :data:`STOP_ORDER`, data's first and Redis's
    last, so that the application stops before the Redis it uses; for start the reverse.
    """
    if isinstance(configured, list):
        return [list(argv) for argv in configured]
    order = STOP_ORDER if stage == "stop" else STOP_ORDER[::-1]
    chosen: list[list[str]] = []
    for component in order:
        if component in components:
            chosen.extend(list(argv) for argv in configured.of(component) if argv not in chosen)
    return chosen


def _live_paths(policy: Policy) -> list[Path]:
    """Return every path a live restore or a backup writes: sources and backup_dir."""
    configured = policy.sources
    paths = [policy.backup_dir]
    paths += [entry.path for entry in (*configured.sqlite, *configured.config, *configured.dirs)]
    if configured.redis is not None:
        paths.append(configured.redis.rdb_path)
        if configured.redis.aof_dir is not None:
            paths.append(configured.redis.aof_dir)
    return paths


def _identity(path: Path) -> tuple[int, int] | None:
    """Return the identity of what *path* leads to, None when there is nothing."""
    try:
        return fsat.identity(path.stat())
    except OSError:
        return None


def _identities(path: Path) -> set[tuple[int, int]]:
    """Return the identities of *path* and of every directory above it that exists."""
    return {found for found in map(_identity, (path, *path.parents)) if found is not None}


def check_target_dir(policy: Policy, to: Path) -> Path:
    """Return ``--to`` *to* resolved; refuse one that would make the restore a live one.

    ``/`` (or what resolves to it) puts every file back where it came from, and a DIR
    that contains, equals or lies inside a live path replaces or mixes with live data,
    with no confirmation, no safety backup and no ``restore.stop``. Directories are
    compared by name and by identity (device and inode): a bind mount of ``/`` or of a
    live path is the same directory under another name. Raise UsageError.
    """
    resolved = Path(os.path.realpath(to))
    itself = _identity(resolved)
    if resolved == Path("/") or (itself is not None and itself == _identity(Path("/"))):
        raise UsageError(
            f"--to {to} is the root directory: that is a live restore; run restore "
            "without --to (it asks, stops the services and takes a safety backup)"
        )
    above = _identities(resolved)
    for live in _live_paths(policy):
        live_itself, live_above = _identity(live), _identities(live)
        for candidate in dict.fromkeys((live, Path(os.path.realpath(live)))):
            if candidate == resolved or (itself is not None and itself == live_itself):
                how = "is"
            elif resolved in candidate.parents or (itself is not None and itself in live_above):
                how = "contains"
            elif candidate in resolved.parents or (
                live_itself is not None and live_itself in above
            ):
                how = "lies inside"
            else:
                continue
            raise UsageError(
                f"--to {to} {how} the live path {live}: choose a directory apart from "
                "the policy's sources and backup_dir"
            )
    return resolved


def _lstat(path: Path) -> os.stat_result | None:
    """Return the lstat of *path*, None when nothing (or no directory on its way) is there."""
    try:
        return path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _owner_of(path: Path) -> int:
    """Return the owner of *path*, or of its nearest existing directory when it is missing."""
    for candidate in (path, *path.parents):
        try:
            return candidate.lstat().st_uid
        except FileNotFoundError:
            continue
    return 0


def _check_links(units: list[Unit]) -> list[str]:
    """Refuse a symlink on a destination's way that leads into someone else's files.

    Whoever owns the directory holding a link could have made it: root's restore follows
    it only when that owner is root, or owns what the link leads to. Return one note per
    link followed, saying which link leads where.
    """
    notes = []
    for unit in units:
        for link in unit.links:
            holder = _owner_of(link.path.parent)
            owner = _owner_of(link.target)
            if holder not in (0, owner):
                raise UnsafePathError(
                    f"{link.path} -> {link.target}: the link's directory belongs to uid "
                    f"{holder} and its target to uid {owner}; restore replaces nothing "
                    "through a link into another user's files (make the link's directory "
                    "root's, or chown the target to its owner)"
                )
            notes.append(
                f"{unit.component} {link.path} -> {link.target}: the link stays, "
                "what it leads to is replaced"
            )
    return notes


def _setid_notes(units: list[Unit], keep_setuid: bool, authenticated: bool) -> list[str]:
    """Say which files carry setuid/setgid bits in the archive, and what becomes of them."""
    marked = [
        entry.path
        for unit in units
        for entry in unit.entries
        if entry.type == "file" and entry.mode & SETID_BITS
    ]
    if not marked:
        return []
    shown = ", ".join(quoted(path) for path in marked[:NOTES_SHOWN])
    more = f" and {len(marked) - NOTES_SHOWN} more" if len(marked) > NOTES_SHOWN else ""
    if keep_setuid and not authenticated:
        return [
            f"setuid/setgid bits dropped, --keep-setuid notwithstanding: the backup is not "
            f"authenticated: {shown}{more}"
        ]
    if keep_setuid:
        return [f"setuid/setgid bits kept (--keep-setuid): {shown}{more}"]
    return [f"setuid/setgid bits dropped (--keep-setuid keeps them): {shown}{more}"]


def plan(
    policy: Policy,
    stored: StoredBackup,
    *,
    only: set[Component] | None = None,
    to: Path | None = None,
    safety_backup: bool = True,
    keep_setuid: bool = False,
    scratch: bool = False,
    trust_unsigned: bool = False,
) -> Plan:
    """Decide every step of restoring *stored*; touch nothing.

    A restore that must not happen (Redis answers and the policy has no stop commands)
    gets a ``refusal``, which :func:`run` raises. Raise AuthError when *stored* is not
    authenticated by the policy's key (unsigned or foreign-key backups pass with
    *trust_unsigned*, as ``authenticated=False``; a failing record never does),
    RestoreError when a destination is one the policy does not back up or lies through
    another user's symlink, UsageError for a *to* that overlaps live paths (not checked
    for a drill's own *scratch*), and ArchiveError when the manifest describes something
    unsafe.
    """
    if to is not None:
        to = Path(os.path.realpath(to)) if scratch else check_target_dir(policy, to)
    status, signed = auth.vouched(stored.path, stored.name, auth.policy_key(policy))
    if status is not auth.Status.AUTHENTICATED and not trust_unsigned:
        raise AuthError(auth.refusal(stored.name, status))
    if archive.encrypted(stored.path) and policy.gpg is None:
        raise RestoreError(
            f"{stored.path.name} is encrypted: set encryption.gpg in the policy "
            "(passphrase_file, or secret_keys_file on the recovery machine)"
        )
    authenticated = status is auth.Status.AUTHENTICATED
    manifest, manifest_sha256 = read_manifest(stored, policy.gpg, signed)
    selected = only or set(COMPONENTS)
    units = _units(manifest, selected, to, policy)
    if not units:
        wanted = ", ".join(sorted(selected))
        raise RestoreError(f"{manifest.id} holds nothing of {wanted}")
    live = to is None
    link_notes = _check_links(units)
    redis_config = policy.sources.redis
    restoring_redis = any(unit.component == "redis" for unit in units)
    redis_running = False
    refusal = None
    if live and restoring_redis:
        assert redis_config is not None  # noqa: S101 (_units allows redis only when configured)
        units = _with_aof_from_rdb(units, policy, manifest)
        for unit in units:
            if unit.component == "redis":
                unit.owner = _redis_files_owner(unit)
        redis_running = _redis_answers(redis_config)
        if redis_running and not service_commands(policy.restore.stop, {"redis"}, "stop"):
            keys = (
                ("restore.stop", "restore.start")
                if isinstance(policy.restore.stop, list)
                else ("restore.stop.redis", "restore.start.redis")
            )
            refusal = (
                f"redis at {RedisReader(redis_config).where} is running: stop it first, or "
                f"set {keys[0]} and {keys[1]} in the policy (e.g. [systemctl, stop, "
                "redis-server]) so that restore stops and starts it"
            )
    for unit in units:
        found = _lstat(unit.destination)
        unit.seen = (fsat.kind(found), fsat.identity(found) if found is not None else None)
    restored = {unit.component for unit in units}
    safety_sources = None
    if not live:
        note = f"everything lands under {to}"
    elif not safety_backup:
        note = "--no-safety-backup"
    else:
        safety_sources = _safety_sources(policy, units, redis_running)
        note = (
            "nothing live exists yet to save"
            if safety_sources is None
            else "what is live now of " + ", ".join(sorted({unit.component for unit in units}))
        )
    return Plan(
        backup=stored,
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        archive_sha256=signed.get(stored.path.name) or archive.read_sidecar(stored.path),
        units=units,
        live=live,
        safety_sources=safety_sources,
        safety_note=note,
        stop=service_commands(policy.restore.stop, restored, "stop") if live else [],
        start=service_commands(policy.restore.start, restored, "start") if live else [],
        redis_running=redis_running,
        redis_where=RedisReader(redis_config).where
        if live and restoring_redis and redis_config is not None
        else None,
        exclude=tuple(policy.sources.exclude),
        refusal=refusal,
        encryption=policy.gpg,
        notes=(*link_notes, *_link_notes(units), *_setid_notes(units, keep_setuid, authenticated)),
        to=to,
        keep_setuid=keep_setuid,
        authenticated=authenticated,
    )


# --- extraction -------------------------------------------------------------------------


class _Extraction:
    """One streaming pass over the archive: every member checked, selected ones staged."""

    def __init__(self, plan: Plan, cancel: threading.Event | None) -> None:
        self._plan = plan
        self._cancel = cancel
        self._top = plan.manifest.id
        self._expected = {entry.path: entry for entry in plan.manifest.files}
        self._owners: dict[str, Unit] = {}
        for unit in plan.units:
            if unit.aof_base is None:
                self._owners[unit.arcname] = unit
        self._seen: set[str] = set()
        self._symlinks: set[str] = set()
        self._directories: list[tuple[Path, FileEntry, Unit, int]] = []
        self._links: list[tuple[Path, FileEntry, Unit, int]] = []
        self.inside: str | None = None
        """The sha256 of the manifest inside the archive."""
        self.files = 0
        self.bytes = 0

    def _unit_of(self, relative: str) -> Unit | None:
        head = relative.split("/", 1)[0]
        if head == CONFIG_DIR:
            return self._owners.get(relative)
        return self._owners.get(head)

    def _relative(self, info: tarfile.TarInfo) -> str | None:
        """Return the member's path below the top directory; refuse any other name."""
        name = info.name.rstrip("/") if info.isdir() else info.name
        if name == self._top:
            return None
        if not name.startswith(f"{self._top}/") or not _safe_relative(name):
            archive_name = self._plan.backup.path.name
            raise ArchiveError(f"{archive_name}: member {name!r} is outside {self._top}/")
        return name[len(self._top) + 1 :]

    def _through_symlink(self, relative: str) -> bool:
        parts = relative.split("/")
        return any("/".join(parts[:depth]) in self._symlinks for depth in range(1, len(parts)))

    def run(self, tar: tarfile.TarFile) -> None:
        """Check and stage every member of *tar*; raise ArchiveError at the first problem."""
        archive_name = self._plan.backup.path.name
        for info in tar:
            if self._cancel is not None and self._cancel.is_set():
                raise AbortedError(f"restore of {archive_name} aborted")
            relative = self._relative(info)
            if relative is None:
                continue
            kind = _KINDS.get(info.type)
            if kind is None:
                what = _TYPE_NAMES.get(info.type, f"member of type {info.type!r}")
                raise ArchiveError(f"{archive_name}: {quoted(relative)} is a {what}: refused")
            if relative in (MANIFEST_NAME, INFO_NAME) and kind == "file":
                extracted = tar.extractfile(info)
                digest = archive.stream_sha256(extracted) if extracted is not None else None
                if relative == MANIFEST_NAME:
                    self.inside = digest
                continue
            self._member(tar, info, kind, self._entry(info, kind, relative))
        missing = sorted(set(self._expected) - self._seen)
        if missing:
            raise ArchiveError(f"{archive_name}: {quoted(missing[0])} is missing from the archive")
        if self.inside is None:
            raise ArchiveError(f"{archive_name}: no {MANIFEST_NAME} inside")

    def _entry(self, info: tarfile.TarInfo, kind: str, relative: str) -> FileEntry:
        """Return the manifest entry of a member after checking the member matches it."""
        archive_name = self._plan.backup.path.name
        entry = self._expected.get(relative)
        if entry is None:
            raise ArchiveError(f"{archive_name}: {quoted(relative)} is not in the manifest")
        if relative in self._seen:
            raise ArchiveError(f"{archive_name}: {quoted(relative)} appears twice")
        if self._through_symlink(relative):
            raise ArchiveError(f"{archive_name}: {quoted(relative)} lies below a symlink: refused")
        _mtime_ns(info)  # a member not restored this time is still refused for it
        link = info.linkname if kind == "symlink" else ""
        if (kind, info.size, info.mode & 0o7777, link) != (
            entry.type,
            entry.size,
            entry.mode,
            entry.link or "",
        ):
            raise ArchiveError(f"{archive_name}: {quoted(relative)} differs from the manifest")
        self._seen.add(relative)
        return entry

    def _member(
        self, tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str, entry: FileEntry
    ) -> None:
        """Stage one checked member, or only hash it when its component is not restored."""
        unit = self._unit_of(entry.path)
        target = unit.member_path(entry.path) if unit is not None else None
        if kind == "symlink":
            self._symlinks.add(entry.path)
        if kind == "file":
            self._file(tar, info, entry, target, unit)
        elif target is not None and unit is not None:
            if kind == "dir":
                _mkdir(target, entry.path)
                self._directories.append((target, entry, unit, _mtime_ns(info)))
            else:
                self._links.append((target, entry, unit, _mtime_ns(info)))

    def _file(
        self,
        tar: tarfile.TarFile,
        info: tarfile.TarInfo,
        entry: FileEntry,
        target: Path | None,
        unit: Unit | None,
    ) -> None:
        extracted = tar.extractfile(info)
        if extracted is None:
            raise ArchiveError(f"member {quoted(entry.path)} cannot be read")
        if target is None or unit is None:
            digest = archive.stream_sha256(extracted)
        else:
            digest = _write_file(extracted, target, entry, sparse=info.sparse is not None)
            _set_metadata(target, entry, unit, _mtime_ns(info), self._plan)
            self.files += 1
            self.bytes += entry.size
        if digest != entry.sha256:
            raise ArchiveError(
                f"{self._plan.backup.path.name}: {quoted(entry.path)} does not match its sha256"
            )

    def finish(self) -> None:
        """Create the symlinks, then give directories their modes and times, deepest first."""
        for target, entry, unit, mtime_ns in self._links:
            target.symlink_to(entry.link or "")
            _set_metadata(target, entry, unit, mtime_ns, self._plan)
        for target, entry, unit, mtime_ns in sorted(
            self._directories, key=lambda item: len(item[0].parts), reverse=True
        ):
            _set_metadata(target, entry, unit, mtime_ns, self._plan)


def _mkdir(path: Path, relative: str) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise ArchiveError(f"{quoted(relative)} appears twice in the archive") from None
    except FileNotFoundError:
        raise ArchiveError(
            f"{quoted(relative)} comes before its directory in the archive"
        ) from None


def _write_file(source: IO[bytes], target: Path, entry: FileEntry, *, sparse: bool) -> str:
    """Write *source* to the new file *target*, never following or replacing anything.

    A *sparse* member (archived with its holes) gets holes again where its chunks are
    all zeros, so that a 200 GiB sparse file does not come back as 200 GiB on disk.
    Return the sha256 of what was written.
    """
    try:
        descriptor = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileNotFoundError:
        raise ArchiveError(
            f"{quoted(entry.path)} comes before its directory in the archive"
        ) from None
    except FileExistsError:
        raise ArchiveError(f"{quoted(entry.path)} appears twice in the archive") from None
    digest = hashlib.sha256()
    # No fsync per file: one syncfs() per staging filesystem before the swap (see
    # _sync_staging) costs a fraction of thousands of fsyncs.
    with open(descriptor, "wb", buffering=0, closefd=True) as out:  # noqa: PTH123 (an fd)
        while chunk := source.read(archive.CHUNK_BYTES):
            digest.update(chunk)
            if sparse and chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        if sparse:
            out.truncate()  # a file that ends in a hole still gets its full size
    return digest.hexdigest()


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """Return the exact mtime of a member in nanoseconds: its pax record's, else ustar's.

    tarfile parses the pax mtime as a float, which is some 200 ns off today and can round
    ``.999999999`` up into the next second; the record's decimal text is exact.
    """
    text = info.pax_headers.get("mtime", str(info.mtime))
    try:
        exact = int(decimal.Decimal(text).scaleb(9))
    except (ArithmeticError, ValueError):  # "nan", "inf", not a number: a hostile header
        raise ArchiveError(
            f"member {quoted(info.name)}: its mtime {text[:40]!r} is no time"
        ) from None
    return min(max(exact, -(2**63)), 2**63 - 1)  # a hostile header's: what utime takes


def _owner(entry: FileEntry, unit: Unit, plan: Plan) -> tuple[int, int] | None:
    """Return the owner *entry* gets; None leaves it the restoring user's.

    Only root can give files away, and only an authenticated archive may say to whom;
    the Redis files take their live owner, which comes from the server, not the archive.
    """
    if os.geteuid() != 0:
        return None
    if unit.owner is not None:
        return unit.owner
    return (entry.uid, entry.gid) if plan.authenticated else None


def _mode(entry: FileEntry, plan: Plan) -> int:
    """Return the mode *entry* gets: a file's setuid/setgid bits only with --keep-setuid.

    Only an authenticated archive keeps them: an unsigned one (--trust-unsigned) could
    come from anyone. A directory keeps its setgid bit: it makes new files inherit the
    group, no privilege.
    """
    if entry.type == "file" and not (plan.keep_setuid and plan.authenticated):
        return entry.mode & ~SETID_BITS
    return entry.mode


def _set_metadata(path: Path, entry: FileEntry, unit: Unit, mtime_ns: int, plan: Plan) -> None:
    """Give *path* its owner (see :func:`_owner`), mode and *mtime_ns*, following no link."""
    owner = _owner(entry, unit, plan)
    if owner is not None:
        os.lchown(path, *owner)
    if entry.type != "symlink":
        os.chmod(path, _mode(entry, plan))  # noqa: PTH101 (Path.chmod follows no differently; kept beside lchown)
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


@contextmanager
def _opened(stored: StoredBackup) -> Iterator[BinaryIO]:
    try:
        with stored.path.open("rb") as handle:
            yield handle
    except FileNotFoundError:
        raise ArchiveError(f"{stored.path} has vanished") from None


def _check_digest(handle: BinaryIO, stored: StoredBackup, expected: str) -> None:
    """Hash the archive in *handle* and rewind it; raise ArchiveError unless it is *expected*."""
    digest = hashlib.sha256()
    while chunk := handle.read(archive.CHUNK_BYTES):
        digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ArchiveError(f"{stored.path.name}: checksum mismatch, the archive is damaged")
    handle.seek(0)


def _synthesize_aof(plan: Plan) -> None:
    """Stage the AOF directories made from the RDB: the RDB as their one base file."""
    for unit in plan.units:
        base = unit.aof_base
        if base is None:
            continue
        source = next(other for other in plan.units if other.arcname == RDB_NAME)
        unit.work.mkdir(mode=0o755)
        shutil.copyfile(source.work, unit.work / f"{base}.1.base.rdb")
        archive.write_atomically(
            unit.work / f"{base}.manifest", f"file {base}.1.base.rdb seq 1 type b\n".encode()
        )
        for path in (unit.work, *unit.work.iterdir()):
            if os.geteuid() == 0 and unit.owner is not None:
                os.lchown(path, *unit.owner)


def extract(plan: Plan, cancel: threading.Event | None = None) -> tuple[int, int]:
    """Verify the archive and stage the plan's units; return (files, bytes) staged.

    On any failure the staging directories are removed and ArchiveError is raised
    (AbortedError once *cancel* is set); nothing outside them was written.
    """
    _open_anchors(plan)
    try:
        with _opened(plan.backup) as handle:
            _check_digest(handle, plan.backup, plan.archive_sha256)
            extraction = _stream(plan, handle, cancel)
        _check_inside_manifest(plan, extraction.inside)
        _synthesize_aof(plan)
        _sync_staging(plan)
    except BaseException:
        cleanup(plan)
        raise
    return extraction.files, extraction.bytes


@dataclass
class _Anchor:
    """One destination directory opened for a restore, and the staging directory in it.

    Everything the restore does there, from staging to the swap and the cleanup, goes
    through these descriptors: a name swapped for a symlink meanwhile leads nowhere.
    """

    parent: fsat.Opened
    staging: int
    name: str
    identity: tuple[int, int]
    shown: Path

    def check(self) -> None:
        """Refuse when the staging directory's name no longer holds the one opened."""
        found = fsat.lstat_at(self.parent.descriptor, self.name)
        if found is None or fsat.identity(found) != self.identity:
            raise UnsafePathError(
                f"{self.shown} changed since the restore opened it (now "
                f"{fsat.kind(found)}): nothing was replaced"
            )


def _open_parent(plan: Plan, directory: Path) -> fsat.Opened:
    """Open *directory* (the staging directories' parent), creating what is missing.

    A live destination was resolved by the plan and is opened from ``/`` following no
    link; below ``--to DIR`` nothing is followed either (openat2 RESOLVE_IN_ROOT).
    """
    if plan.to is None:
        return fsat.open_dir(directory, create=True)
    root = fsat.open_dir(plan.to, create=True)
    try:
        below = fsat.open_below(
            root.descriptor, str(directory.relative_to(plan.to)), str(plan.to), create=True
        )
    except BaseException:
        root.remove_created()
        root.close()
        raise
    below.created[:0] = root.created  # removed innermost first: DIR's own parents last
    root.created = []
    root.close()
    return below


def _anchor(plan: Plan, directory: Path) -> _Anchor:
    """Open the parent of the staging *directory*, clear stale staging there, make it anew."""
    parent = _open_parent(plan, directory.parent)
    try:
        for stale in fsat.anchored(parent.descriptor).iterdir():
            if stale.name.startswith(STAGING_PREFIX) and _removed(stale):
                log.info("restore.leftover_removed", path=str(directory.parent / stale.name))
        staging = fsat.make_dir(parent.descriptor, directory.name)
    except BaseException:
        parent.remove_created()
        parent.close()
        raise
    return _Anchor(parent, staging, directory.name, fsat.identity(os.fstat(staging)), directory)


def _open_anchors(plan: Plan) -> None:
    """Open every staging directory's parent and make the staging directory in it.

    Each destination must still be what the plan saw: a link or another directory put
    in its place meanwhile (during the confirmation prompt, say) is refused here, before
    the safety backup reads anything. Raise UnsafePathError for that or for a link on the
    way, RestoreError for what cannot be made.
    """
    anchors: dict[Path, _Anchor] = {}
    try:
        for directory in plan.staging_dirs:
            anchors[directory] = _anchor(plan, directory)
    except OSError as error:
        _close_anchors(list(anchors.values()), removed=True)
        raise RestoreError(f"cannot create {error.filename}: {error.strerror}") from error
    except BaseException:
        _close_anchors(list(anchors.values()), removed=True)
        raise
    try:
        for unit in plan.units:
            unit.anchor = anchors[unit.staged.parent]
            _check_unchanged(unit)
    except BaseException:
        _close_anchors(list(anchors.values()), removed=True)
        raise


def _stream(plan: Plan, handle: BinaryIO, cancel: threading.Event | None) -> _Extraction:
    """Check every member of the opened archive and stage the plan's units; return the pass.

    The symlinks and the directories' modes are set too (:meth:`_Extraction.finish`), so
    that a disk that fills or a chown refused there is the same one error line.
    """
    extraction = _Extraction(plan, cancel)
    try:
        with ExitStack() as stack:
            stream = stack.enter_context(
                archive.readable(handle, plan.backup.path, plan.encryption)
            )
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))
            extraction.run(tar)
        extraction.finish()
    except archive.UNREADABLE as error:
        raise ArchiveError(f"{plan.backup.path.name}: unreadable archive: {error}") from error
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = ", ".join(str(path.parent) for path in plan.staging_dirs)
            raise RestoreError(
                f"no space left in {where} to stage {plan.backup.path.name}"
            ) from error
        raise ArchiveError(f"{plan.backup.path.name}: cannot restore: {error}") from error
    return extraction


def verify_members(
    stored: StoredBackup, encryption: Gpg | None = None, signed: Mapping[str, str] | None = None
) -> Manifest:
    """Check every member of *stored* exactly as a restore of all of it would; write nothing.

    The full manifest is read as restore reads it (decrypted, for an encrypted backup
    whose head lies beside it), each member checked
    against it (names, types, symlinks above it, duplicates, mtimes, sha256), and the
    manifest inside compared with it byte for byte: ``verify --deep`` passes no archive
    that restore or test-restore would refuse. With *signed* (:func:`auth.vouched`), the
    bytes read are those the record vouched for (AuthError otherwise). Return the
    manifest; raise ArchiveError (CryptoError for an archive that does not decrypt) at
    the first problem.
    """
    manifest, manifest_sha256 = read_manifest(stored, encryption, signed)
    vouched = (signed or {}).get(stored.path.name)
    checking = Plan(
        backup=stored,
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        archive_sha256=vouched or archive.read_sidecar(stored.path),
        units=[],
        live=False,
        safety_sources=None,
        safety_note="",
        stop=[],
        start=[],
        redis_running=False,
        redis_where=None,
        encryption=encryption,
    )
    with _opened(stored) as handle:
        extraction = _stream(checking, handle, None)
    _check_inside_manifest(checking, extraction.inside)
    return manifest


def _sync_staging(plan: Plan) -> None:
    """Make every staged file durable before anything is swapped: syncfs(2) per directory.

    Raise RestoreError when the filesystem reports a write error.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for anchor in _anchors(plan):
        descriptor = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=anchor.staging)
        try:
            if libc.syncfs(descriptor) != 0:
                code = ctypes.get_errno()
                raise RestoreError(f"cannot flush {anchor.shown} to disk: {os.strerror(code)}")
        finally:
            os.close(descriptor)


def _anchors(plan: Plan) -> list[_Anchor]:
    """Return the plan's open staging directories, each once."""
    found = {id(unit.anchor): unit.anchor for unit in plan.units if unit.anchor is not None}
    return list(found.values())


def _check_inside_manifest(plan: Plan, inside: str | None) -> None:
    """Compare the manifest inside with the one read, which a backup writes byte for byte."""
    if inside != plan.manifest_sha256:
        raise ArchiveError(
            f"{plan.backup.path.name}: the manifest inside differs from the one beside it"
        )


def _removed(path: Path) -> bool:
    return tree.remove_or_warn(path, "restore.leftover_kept")


def _close_anchors(anchors: list[_Anchor], *, removed: bool) -> None:
    """Empty and remove each staging directory through its descriptor; close it all.

    The staging directory's name is removed only while it still holds the directory
    opened; with *removed*, so are the directories the restore created on the way.
    """
    # The last one opened first: the first one made the directories the others share.
    for anchor in sorted(anchors, key=lambda anchor: anchor.shown, reverse=True):
        try:
            for staged in fsat.anchored(anchor.staging).iterdir():
                _removed(staged)
            found = fsat.lstat_at(anchor.parent.descriptor, anchor.name)
            if found is not None and fsat.identity(found) == anchor.identity:
                os.rmdir(anchor.name, dir_fd=anchor.parent.descriptor)
            else:
                log.info("restore.staging_moved", path=str(anchor.shown))
        except OSError as error:
            log.warning("restore.leftover_kept", path=str(anchor.shown), error=error.strerror)
        os.close(anchor.staging)
        if removed:
            anchor.parent.remove_created()
        anchor.parent.close()


def cleanup(plan: Plan) -> None:
    """Remove the plan's staging directories (and the replaced data moved into them).

    Directories the restore created for a destination are removed too, where empty: a
    refused restore leaves none behind.
    """
    _close_anchors(_anchors(plan), removed=True)
    for unit in plan.units:
        unit.anchor = None


# --- the swap -----------------------------------------------------------------------------


@dataclass
class _Swapped:
    """How to undo one swap."""

    undo: Callable[[], None]


def _check_unchanged(unit: Unit) -> None:
    """Refuse when the destination or the staging directory is not what was planned and opened.

    Between the plan and the swap the stop commands ran, and whoever can write the
    destination's directory had time too: a directory swapped for a symlink (or another
    directory) would move the restored tree, or whatever the link leads to, elsewhere.
    """
    assert unit.anchor is not None  # noqa: S101 (extract anchors every unit before the swap)
    unit.anchor.check()
    found = fsat.lstat_at(unit.anchor.parent.descriptor, unit.destination.name)
    now = fsat.kind(found)
    was, identity = unit.seen
    now_identity = fsat.identity(found) if found is not None else None
    if now != was or (now == "a directory" and now_identity != identity):
        raise UnsafePathError(
            f"{unit.destination} changed since the restore opened it (was {was}, now {now}"
            f"{', another one' if now == was else ''}): nothing of it was replaced"
        )


def _swap(unit: Unit) -> _Swapped:
    """Put *unit* in place; return how to undo it. The replaced data ends up staged.

    Every step is relative to the open destination and staging directories.
    """
    _check_unchanged(unit)
    assert unit.anchor is not None  # noqa: S101 (checked by _check_unchanged)
    parent, staging = unit.anchor.parent.descriptor, unit.anchor.staging
    name, staged = unit.destination.name, unit.staged.name
    old = _replaced(unit).name
    moved: list[tuple[str, str]] = []
    if unit.component == "sqlite":
        for end in WAL_FILES:
            if fsat.lstat_at(parent, name + end) is not None:
                os.rename(name + end, old + end, src_dir_fd=parent, dst_dir_fd=staging)
                moved.append((old + end, name + end))
    existed = unit.seen[0] != "absent"

    def put_back_moved() -> None:
        for aside, original in moved:
            os.rename(aside, original, src_dir_fd=staging, dst_dir_fd=parent)

    if unit.kind == "dir":
        if existed and unit.seen[0] != "a directory":
            raise RestoreError(f"{unit.destination} exists and is not a directory")
        unit.tree = fsat.identity(os.stat(staged, dir_fd=staging, follow_symlinks=False))
        if existed and fsat.exchange(staging, staged, parent, name):

            def undo_exchange() -> None:
                os.rename(old, staged, src_dir_fd=staging, dst_dir_fd=staging)
                fsat.exchange(staging, staged, parent, name)
                put_back_moved()

            replaced = fsat.lstat_at(staging, staged)
            if replaced is None or fsat.identity(replaced) != unit.seen[1]:
                # Swapped between the check and the exchange: put it back untouched.
                fsat.exchange(staging, staged, parent, name)
                put_back_moved()
                raise UnsafePathError(
                    f"{unit.destination} changed since the restore opened it (while it was "
                    "swapped): nothing of it was replaced"
                )
            # The old tree, out of the way of a second exchange.
            os.rename(staged, old, src_dir_fd=staging, dst_dir_fd=staging)
            return _Swapped(undo_exchange)
        if existed:
            os.rename(name, old, src_dir_fd=parent, dst_dir_fd=staging)
        os.rename(staged, name, src_dir_fd=staging, dst_dir_fd=parent)
    else:
        if existed:
            try:
                os.link(name, old, src_dir_fd=parent, dst_dir_fd=staging, follow_symlinks=False)
            except OSError:
                os.rename(name, old, src_dir_fd=parent, dst_dir_fd=staging)
        os.replace(staged, name, src_dir_fd=staging, dst_dir_fd=parent)

    def undo() -> None:
        if unit.kind == "dir":
            os.rename(name, staged, src_dir_fd=parent, dst_dir_fd=staging)
        if existed:
            os.replace(old, name, src_dir_fd=staging, dst_dir_fd=parent)
        elif unit.kind == "file":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
        put_back_moved()

    return _Swapped(undo)


def _run_commands(stage: str, commands: list[list[str]], timeout: float) -> None:
    for result in hooks.run(stage, commands, timeout, {}, stop_on_failure=True):
        if not result.ok:
            raise RestoreError(f"{stage} command {' '.join(result.argv)} failed: {result.failure}")


def swap(plan: Plan) -> None:
    """Put every staged unit in place, in order; on a failure undo those already swapped."""
    done: list[_Swapped] = []
    try:
        for unit in plan.units:
            done.append(_swap(unit))
            log.info("restore.swapped", component=unit.component, destination=str(unit.destination))
    except UnsafePathError as error:
        for swapped in reversed(done):
            swapped.undo()
        if not done:
            raise
        raise UnsafePathError(f"{error}; what was already swapped has been put back") from error
    except OSError as error:
        for swapped in reversed(done):
            swapped.undo()
        raise RestoreError(
            f"cannot put {error.filename or 'a component'} in place: {error.strerror}; "
            "what was already swapped has been put back"
        ) from error
    for anchor in _anchors(plan):
        fsat.fsync_at(anchor.parent.descriptor)
    for unit in plan.units:
        if unit.component == "data":
            _carry_excluded(unit, plan.exclude)


def _replaced(unit: Unit) -> Path:
    """Return where the swap left the data *unit* replaced."""
    return unit.staged.with_name(unit.staged.name + ".old")


def _carry_excluded(unit: Unit, exclude: tuple[str, ...]) -> None:
    """Move what the excludes left out of backups from the replaced tree into the new one.

    No backup holds those files (caches, temp files), so the safety backup does not
    either: dropping them with the replaced tree would lose them for good. Both trees
    are reached through descriptors: the replaced one only when it is the directory the
    swap moved (never a link), the new one only while it is the tree just swapped in.
    """
    anchor = unit.anchor
    if not exclude or anchor is None or unit.tree is None:
        return
    replaced = fsat.lstat_at(anchor.staging, _replaced(unit).name)
    if replaced is None or fsat.identity(replaced) != unit.seen[1]:
        return
    try:
        new_tree = os.open(unit.destination.name, fsat.OPEN_PATH, dir_fd=anchor.parent.descriptor)
    except OSError:
        log.warning("restore.excluded_dropped", path=str(unit.destination))
        return
    try:
        if fsat.identity(os.fstat(new_tree)) == unit.tree:
            _carry_into(
                fsat.anchored(anchor.staging, _replaced(unit).name),
                fsat.anchored(new_tree),
                exclude,
            )
        else:
            log.warning("restore.excluded_dropped", path=str(unit.destination))
    finally:
        os.close(new_tree)


def _carry_into(old: Path, new: Path, exclude: tuple[str, ...]) -> None:
    """Move the files *exclude* matches from the tree *old* into the tree *new*."""
    for relative in files.excluded_paths(old, exclude):
        target = new / relative
        if os.path.lexists(target):
            continue
        if not _real_parents(new, old, relative):
            # The backup has a symlink or a file where the excluded file's directory was:
            # following it could move the file anywhere.
            log.warning("restore.excluded_dropped", path=str(old / relative))
            continue
        restored = target.parent.stat()
        (old / relative).rename(target)
        # The directory keeps the mtime the backup gave it.
        os.utime(target.parent, ns=(restored.st_atime_ns, restored.st_mtime_ns))
        log.info("restore.excluded_kept", path=str(target))


def _real_parents(new: Path, old: Path, relative: str) -> bool:
    """Make the directories above *new*/*relative* as they were in *old*, following no link.

    Return False when one of them exists in *new* as anything but a real directory.
    """
    current = new
    for part in relative.split("/")[:-1]:
        current /= part
        try:
            status = current.lstat()
        except FileNotFoundError:
            current.mkdir(mode=0o700)
            current.chmod(stat.S_IMODE((old / current.relative_to(new)).lstat().st_mode))
            continue
        if not stat.S_ISDIR(status.st_mode):
            return False
    return True


def _check_ways(plan: Plan) -> None:
    """Refuse when a policy path no longer leads where the plan resolved it, or its end changed.

    The safety backup reads the policy's paths by name, following their links: a link
    planted (or redirected) after the plan would have it archive, as root, whatever the
    link's maker chose. Raise UnsafePathError.
    """
    for unit in plan.units:
        origin = unit.entries[0].origin if unit.entries else None
        if origin is not None:
            destination, links = fsat.resolve(Path(origin))
            if destination != unit.destination or links != unit.links:
                raise UnsafePathError(
                    f"{origin} leads to {destination} now, not to {unit.destination} as "
                    "when the restore was planned: nothing was replaced"
                )
        _check_unchanged(unit)


def _safety_backup(policy: Policy, plan: Plan) -> str | None:
    """Back up what the restore replaces; return the backup's name.

    The way to every destination is checked before and after: a safety backup taken
    while one changed could hold anything, and is deleted.
    """
    if plan.safety_sources is None:
        return None
    safety_policy = policy.model_copy(
        update={"sources": plan.safety_sources, "hooks": Hooks(), "notify": []}
    )
    _check_ways(plan)
    try:
        result = backup.run(safety_policy, [SAFETY_TIER], redis_offline=not plan.redis_running)
    except SovbackupdError as error:
        raise RestoreError(
            f"the pre-restore safety backup failed, nothing was replaced: {error} "
            "(--no-safety-backup restores without one)"
        ) from error
    try:
        _check_ways(plan)
    except UnsafePathError as error:
        for path in targets.backup_files(result.path):
            path.unlink(missing_ok=True)
        log.warning("restore.safety_backup_discarded", safety_backup=result.name)
        raise UnsafePathError(
            f"{error}; the safety backup {result.name} taken meanwhile was deleted"
        ) from error
    return result.name


def _check_redis_stopped(policy: Policy, plan: Plan) -> None:
    redis_config = policy.sources.redis
    if plan.redis_where is not None and redis_config is not None and _redis_answers(redis_config):
        raise RestoreError(
            f"redis at {plan.redis_where} still answers after restore.stop; nothing was replaced"
        )


def _stop_and_swap(policy: Policy, plan: Plan) -> str | None:
    """Run the stop commands, check Redis is down, swap; start the services again.

    Return how a start command failed once the data is in place (the later ones are not
    run), None when all succeeded: the restore itself is done and stays done.
    """
    timeout = policy.restore.timeout_seconds
    try:
        _run_commands("restore.stop", plan.stop, timeout)
        _check_redis_stopped(policy, plan)
        swap(plan)
    except BaseException:
        # Bring the services back whatever happened; the first error is the one to report.
        for result in hooks.run("restore.start", plan.start, timeout, {}, stop_on_failure=False):
            if not result.ok:
                log.error("restore.start_failed", argv=list(result.argv), error=result.failure)  # noqa: TRY400 (the failure is the command's, not a Python exception)
        raise
    results = hooks.run("restore.start", plan.start, timeout, {}, stop_on_failure=True)
    if all(result.ok for result in results):
        return None
    failed = results[-1]  # the run stops at the first failure
    skipped = len(plan.start) - len(results)
    return f"restore.start command '{' '.join(failed.argv)}' failed ({failed.failure})" + (
        f"; {plural(skipped, 'later start command')} did not run" if skipped else ""
    )


def run(policy: Policy, plan: Plan, cancel: threading.Event | None = None) -> RestoreResult:
    """Carry out *plan*: verify and stage, safety backup, stop, swap, start, clean up.

    Raise ArchiveError when the archive fails verification (nothing live was touched),
    RestoreError when a later step fails (what was swapped is put back).
    """
    if plan.refusal is not None:
        raise RestoreError(plan.refusal)
    started = time.monotonic()
    bound = log.bind(backup=plan.manifest.id, live=plan.live)
    bound.info("restore.started", units=[unit.arcname for unit in plan.units])
    files, size = extract(plan, cancel)
    try:
        safety_name = _safety_backup(policy, plan)
        if safety_name is not None:
            bound.info("restore.safety_backup", safety_backup=safety_name)
        start_failure = _stop_and_swap(policy, plan)
    finally:
        cleanup(plan)
    duration = time.monotonic() - started
    bound.info(
        "restore.finished",
        files=files,
        bytes=size,
        safety_backup=safety_name,
        duration_seconds=round(duration, 3),
        start_failure=start_failure,
    )
    return RestoreResult(
        plan.manifest.id, plan.units, files, size, safety_name, duration, start_failure
    )


# --- test restores ----------------------------------------------------------------------

DRILL_STATE_NAME = ".sovbackupd-test-restore.json"
REDIS_LOAD_SECONDS = 600.0


@dataclass(frozen=True)
class Check:
    """One thing a test restore checked."""

    what: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class DrillReport:
    """The outcome of one test restore."""

    name: str
    ok: bool
    checks: list[Check]
    finished: float
    duration_seconds: float


def _rows(count: object) -> str:
    return plural(count, "row") if isinstance(count, int) else "no such table"


def _check_sqlite(restored: Path, origin: str, expected: DatabaseDetails | None) -> Check:
    what = f"sqlite {Path(origin).name}"
    try:
        found = sqlite.inspect(restored)
    except (SovbackupdError, sqlite3.DatabaseError) as error:
        return Check(what, ok=False, detail=str(error))
    rows = found["rows"]
    assert isinstance(rows, dict)  # noqa: S101 (inspect() maps each table to its count)
    wanted_rows = expected.rows if expected is not None else {}
    if expected is None or rows != wanted_rows:
        differing = [
            f"{table}: {_rows(rows.get(table))}, the manifest says {_rows(wanted_rows.get(table))}"
            for table in sorted({*rows, *wanted_rows})
            if rows.get(table) != wanted_rows.get(table)
        ]
        return Check(what, ok=False, detail="; ".join(differing[:3]) or "row counts differ")
    return Check(
        what,
        ok=True,
        detail=f"integrity ok, {plural(sum(rows.values()), 'row')} in {plural(len(rows), 'table')}",
    )


def _loaded_keys(directory: Path, *options: str) -> int:
    """Start a throwaway redis-server on *directory*; return the keys it loaded."""
    server = redis_server.start(directory, "--save", "", *options, timeout=REDIS_LOAD_SECONDS)
    try:
        keyspace = server.client().info("keyspace")
    finally:
        server.stop()
    return sum(int(stats["keys"]) for stats in keyspace.values())


def _link_into(source: Path, directory: Path, name: str) -> None:
    """Hard-link *source* (a file or a directory's files) into *directory* as *name*."""
    target = directory / name
    if source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            os.link(child, target / child.name, follow_symlinks=False)
    else:
        os.link(source, target, follow_symlinks=False)


def _check_redis(units: list[Unit], details: RedisDetails, scratch: Path) -> list[Check]:
    """Load the restored RDB, and the AOF if archived, into throwaway servers; count keys."""
    by_name = {unit.arcname: unit for unit in units}
    checks = []
    keys = details.keys_in_rdb
    expires = details.expires_in_rdb
    persistent = keys - expires if keys is not None else None
    rdb_dir = scratch / ".redis-rdb"
    rdb_dir.mkdir()
    _link_into(by_name[RDB_NAME].destination, rdb_dir, "dump.rdb")
    try:
        loaded = _loaded_keys(rdb_dir, "--appendonly", "no", "--dbfilename", "dump.rdb")
    except SovbackupdError as error:
        checks.append(Check("redis rdb", ok=False, detail=str(error)))
    else:
        # Keys with a TTL may have expired since the backup; every other key must be there.
        if persistent is None or keys is None:
            checks.append(Check("redis rdb", ok=True, detail=f"{plural(loaded, 'key')} loaded"))
        elif persistent <= loaded <= keys:
            detail = f"{plural(loaded, 'key')} loaded of {keys} archived"
            checks.append(Check("redis rdb", ok=True, detail=detail))
        else:
            checks.append(
                Check(
                    "redis rdb",
                    ok=False,
                    detail=f"{plural(loaded, 'key')} loaded, the manifest says {keys} "
                    f"({expires} with a TTL)",
                )
            )
    aof_unit = by_name.get(AOF_DIR_NAME) or by_name.get(LEGACY_AOF_NAME)
    if aof_unit is not None:
        checks.append(_check_aof(aof_unit, scratch, persistent))
    return checks


def _check_aof(unit: Unit, scratch: Path, persistent: int | None) -> Check:
    linked = next((entry.path for entry in unit.entries if entry.type == "symlink"), None)
    if linked is not None:
        # Redis appends to its AOF files: through a link, it would write outside scratch.
        return Check("redis aof", ok=False, detail=f"{linked} is a symlink, not an AOF file")
    aof_dir = scratch / ".redis-aof"
    aof_dir.mkdir()
    _link_into(unit.destination, aof_dir, unit.arcname)
    options = (
        ("--appenddirname", AOF_DIR_NAME)
        if unit.arcname == AOF_DIR_NAME
        else ("--appendfilename", LEGACY_AOF_NAME)
    )
    try:
        loaded = _loaded_keys(aof_dir, "--appendonly", "yes", *options, "--dbfilename", "none.rdb")
    except SovbackupdError as error:
        return Check("redis aof", ok=False, detail=str(error))
    if persistent and not loaded:
        return Check("redis aof", ok=False, detail="the AOF loads as an empty database")
    return Check("redis aof", ok=True, detail=f"{plural(loaded, 'key')} loaded from the AOF")


def _drill_checks(
    policy: Policy,
    stored: StoredBackup,
    scratch: Path,
    cancel: threading.Event | None,
    trust_unsigned: bool,
) -> list[Check]:
    try:
        drill_plan = plan(
            policy,
            stored,
            to=scratch,
            safety_backup=False,
            scratch=True,
            trust_unsigned=trust_unsigned,
        )
        result = run(policy, drill_plan, cancel)
    except AbortedError:
        raise
    except SovbackupdError as error:
        return [Check("archive", ok=False, detail=str(error))]
    checks = [
        Check(
            "archive",
            ok=True,
            detail=f"{plural(result.files, 'file')} ({human_size(result.bytes)}) "
            f"{'matches' if result.files == 1 else 'match'} the manifest",
        )
    ]
    sources = {source.component: source for source in drill_plan.manifest.sources}
    sqlite_source = sources.get("sqlite")
    databases = sqlite_source.sqlite().databases if sqlite_source is not None else {}
    for unit in drill_plan.units:
        if unit.component == "sqlite":
            origin = unit.entries[0].origin or unit.arcname
            checks.append(_check_sqlite(unit.destination, origin, databases.get(origin)))
    if RDB_NAME in {unit.arcname for unit in drill_plan.units}:
        redis_source = sources.get("redis")
        redis_details = redis_source.redis() if redis_source is not None else RedisDetails()
        checks.extend(_check_redis(drill_plan.units, redis_details, scratch))
    return checks


def drill(
    policy: Policy,
    name: str | None = None,
    *,
    metrics: Metrics | None = None,
    cancel: threading.Event | None = None,
    trust_unsigned: bool = False,
) -> DrillReport:
    """Restore backup *name* into scratch space and check it all.

    Without *name*, the backup ``--latest`` means: the newest that is not a pre-restore
    safety backup (:meth:`Store.latest`), which is what the daemon's schedule drills.

    A backup that restore would refuse as unauthenticated fails the drill (unsigned and
    foreign-key ones pass the check with *trust_unsigned*).

    Every file is checked against the manifest while it is extracted; each SQLite copy
    passes ``integrity_check`` with the manifest's row counts; the RDB (and AOF) load into
    a throwaway redis-server with the keys the manifest counted. The scratch directory and
    the servers are removed in every case. The result is recorded beside the backups and,
    given *metrics*, in the restore_test metrics.
    """
    started = time.monotonic()
    store = Store(policy.backup_dir, policy.name_prefix)
    with store.lock():
        stored = store.find(name) if name else store.latest()
        checks = _drill_in_scratch(policy, store, stored, cancel, trust_unsigned)
    return _report(policy, stored.name, checks, started, metrics)


def _drill_in_scratch(
    policy: Policy,
    store: Store,
    stored: StoredBackup,
    cancel: threading.Event | None,
    trust_unsigned: bool,
) -> list[Check]:
    """Run the drill's checks in a fresh scratch directory, removed afterwards.

    Whatever goes wrong but a shutdown (a manifest out of bounds, an extraction error, a
    full disk, a bug) is a failed check: a drill that cannot run has failed.
    """
    store.clean_leftovers()
    try:
        scratch = store.staging(f"test-restore-{stored.name}")
    except OSError as error:
        return [
            Check("scratch", ok=False, detail=f"cannot create {error.filename}: {error.strerror}")
        ]
    try:
        return _drill_checks(policy, stored, scratch, cancel, trust_unsigned)
    except AbortedError:
        raise
    except Exception as error:  # recorded as the drill's failure, with its type
        return [Check("test restore", ok=False, detail=f"{type(error).__name__}: {error}")]
    finally:
        _removed(scratch.parent)


def _report(
    policy: Policy, name: str, checks: list[Check], started: float, metrics: Metrics | None
) -> DrillReport:
    """Record the drill of *name* and log its one summary event; return its report."""
    report = DrillReport(
        name=name,
        ok=all(check.ok for check in checks),
        checks=checks,
        finished=time.time(),
        duration_seconds=time.monotonic() - started,
    )
    record_drill(policy, report, metrics)
    log.info(
        "test_restore.finished",
        backup=report.name,
        result="success" if report.ok else "failure",
        problems=[f"{check.what}: {check.detail}" for check in checks if not check.ok],
        duration_seconds=round(report.duration_seconds, 3),
    )
    return report


def record_failure(
    policy: Policy, name: str | None, error: Exception, metrics: Metrics | None
) -> DrillReport:
    """Record a drill that could not even start (no backup, no lock) as a failed one."""
    check = Check("test restore", ok=False, detail=str(error) or type(error).__name__)
    return _report(policy, name or "", [check], time.monotonic(), metrics)


class DrillState(statefile.State):
    """The last test restore's result, kept beside the backups across daemon restarts."""

    backup: str = Field(max_length=255)
    ok: bool
    finished: float = Field(ge=0)
    last_success: float | None = Field(ge=0)


def record_drill(policy: Policy, report: DrillReport, metrics: Metrics | None) -> DrillState:
    """Remember the drill's result beside the backups, and set the metrics."""
    previous = last_drill(policy)
    state = DrillState(
        backup=report.name,
        ok=report.ok,
        finished=report.finished,
        last_success=report.finished
        if report.ok
        else (previous.last_success if previous else None),
    )
    path = policy.backup_dir / DRILL_STATE_NAME
    try:
        statefile.write(path, state)
    except OSError as error:
        log.warning("test_restore.state_unsaved", path=str(path), error=error.strerror)
    if metrics is not None:
        metrics.restore_tested(state.ok, state.last_success)
    return state


def last_drill(policy: Policy) -> DrillState | None:
    """Return the last recorded drill result; None when there is none or it is unusable."""
    return statefile.read(policy.backup_dir / DRILL_STATE_NAME, DrillState)
