"""What every source hands to the archive: members, and a report for the manifest."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

Component = Literal["redis", "sqlite", "config", "data"]
MemberKind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True)
class Member:
    """One entry of the archive, relative to its top directory (``data/x/y.bin``).

    *origin* is the absolute path it came from, which restore puts it back to. A file's
    bytes come from *opener*, called once when the archive is ready for them; the archive
    takes the size from the opened handle, so what is archived is what was read.
    *mtime_ns* is the exact mtime when it came from a stat; the archive's pax header
    carries it, and falls back to *mtime* for generated members.
    """

    arcname: str
    kind: MemberKind
    origin: str | None
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    opener: Callable[[], BinaryIO] | None = None
    mtime_ns: int | None = None

    @property
    def exact_mtime_ns(self) -> int:
        """Return the mtime in nanoseconds: the stat's own, else *mtime* converted."""
        return self.mtime_ns if self.mtime_ns is not None else round(self.mtime * 1e9)

    @classmethod
    def from_stat(
        cls,
        arcname: str,
        origin: Path | str,
        status: os.stat_result,
        opener: Callable[[], BinaryIO] | None = None,
        linkname: str = "",
    ) -> Member:
        """Describe *origin* from its lstat result *status*."""
        if stat.S_ISDIR(status.st_mode):
            kind: MemberKind = "dir"
        elif stat.S_ISLNK(status.st_mode):
            kind = "symlink"
        else:
            kind = "file"
        return cls(
            arcname=arcname,
            kind=kind,
            origin=str(origin),
            mode=stat.S_IMODE(status.st_mode),
            mtime=status.st_mtime,
            uid=status.st_uid,
            gid=status.st_gid,
            linkname=linkname,
            opener=opener,
            mtime_ns=status.st_mtime_ns,
        )


@dataclass
class SourceReport:
    """What a source says about its capture, for the manifest's per-source results."""

    component: Component
    name: str
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Source(Protocol):
    """A thing that can be captured consistently into an archive.

    Contract:

    - :meth:`preflight` runs before anything is written. It checks that the source can be
      captured (paths exist, the server answers) and returns an upper bound of the bytes
      it will add, plus what it stages on disk meanwhile and a guess of the file bytes
      it will hand over. A sparse file counts its allocated blocks, since it is archived
      with its holes. It raises
      :class:`~sovbackupd.errors.SourceError` with one clear line otherwise.
    - :meth:`members` is a generator. It yields members in archive order and may stage
      temporary copies under *staging* (private to this run, on the backup disk); it
      removes them in a ``finally`` block, so closing the generator early cleans up too.
      It fills *report* as it goes. A failure is a :class:`SourceError`; nothing is
      retried here, because a retry would hide which state was captured.
    - Sources never write outside *staging* and never change the live data.
    """

    @property
    def component(self) -> Component:
        """Return which restorable component this source belongs to."""
        ...

    @property
    def name(self) -> str:
        """Return a short, unique name for logs and the manifest."""
        ...

    def preflight(self) -> Estimate:
        """Check that the source can be captured and estimate its size."""
        ...

    def members(self, staging: Path, report: SourceReport) -> Generator[Member]:
        """Capture the source and yield its archive members."""
        ...


@dataclass(frozen=True)
class Estimate:
    """Bytes a source adds to the archive (upper bound) and stages meanwhile.

    *read_bytes* is the best guess of the file bytes the archive will read from the
    source, which is what the progress bar counts: headers and the upper bound's slack
    (Redis's used_memory against its RDB) are not in it.
    """

    archived_bytes: int
    staged_bytes: int = 0
    read_bytes: int = 0

    def __add__(self, other: Estimate) -> Estimate:
        """Add two estimates."""
        return Estimate(
            self.archived_bytes + other.archived_bytes,
            self.staged_bytes + other.staged_bytes,
            self.read_bytes + other.read_bytes,
        )
