"""SQLite databases, copied with the online backup API and checked before archiving."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Generator
from functools import partial
from pathlib import Path

from sovbackupd.config.models import SourcePath
from sovbackupd.errors import DiskSpaceError, SourceError
from sovbackupd.sources.base import Component, Estimate, Member, SourceReport
from sovbackupd.sources.files import MEMBER_OVERHEAD_BYTES, open_nofollow

WAL_FILES = ("-wal", "-shm")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def inspect(database: Path) -> dict[str, object]:
    """Check *database* with ``PRAGMA integrity_check``; return its page and row counts.

    Raise SourceError when the check finds anything wrong. The connection is read-write
    (but never creates the file) so that, being the last one, it folds a WAL back into
    the database file on close and removes the ``-wal`` and ``-shm`` files.
    """
    connection = sqlite3.connect(f"{database.absolute().as_uri()}?mode=rw", uri=True)
    try:
        # A report row can span lines, and the error must stay on one line.
        problems = [
            line
            for (row,) in connection.execute("PRAGMA integrity_check")
            for line in str(row).splitlines()
            if not line.startswith("*** ")  # "*** in database main ***" headings
        ]
        if problems != ["ok"]:
            raise SourceError(
                f"sqlite copy of {database.name} fails integrity_check: {'; '.join(problems[:3])}"
            )
        page_count = connection.execute("PRAGMA page_count").fetchone()[0]
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        rows = {
            table: connection.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()[0]  # noqa: S608 (identifier quoted above)
            for table in tables
        }
    finally:
        connection.close()
    return {"page_count": page_count, "page_size": page_size, "integrity": "ok", "rows": rows}


class SqliteSource:
    """Each database is copied with the online backup API into staging, as one snapshot.

    The copy is taken in a single step (all pages under one read transaction), so writers
    in other processes neither corrupt it nor restart it; WAL content is included. A lock
    held longer than *timeout* fails the backup instead of hanging it.
    """

    def __init__(self, entries: list[SourcePath], timeout: float) -> None:
        """Back up the databases *entries*, waiting at most *timeout* seconds for locks."""
        self._entries = entries
        self._timeout = timeout

    @property
    def component(self) -> Component:
        """Return "sqlite"."""
        return "sqlite"

    @property
    def name(self) -> str:
        """Return "sqlite"."""
        return "sqlite"

    def _exists(self, entry: SourcePath) -> bool:
        if entry.path.is_file():
            return True
        if entry.optional and not entry.path.exists():
            return False
        problem = "is not a regular file" if entry.path.exists() else "does not exist"
        raise SourceError(f"sqlite database {entry.path} {problem} (sources.sqlite)")

    def preflight(self) -> Estimate:
        """Check every database exists; its size is staged, archived and read."""
        read = members = 0
        for entry in self._entries:
            if self._exists(entry):
                read += entry.path.stat().st_size
                wal = entry.path.with_name(entry.path.name + WAL_FILES[0])
                if wal.exists():
                    read += wal.stat().st_size
                members += 1
        total = read + members * MEMBER_OVERHEAD_BYTES
        return Estimate(archived_bytes=total, staged_bytes=total, read_bytes=read)

    def _copy(self, database: Path, copy: Path) -> None:
        deadline = time.monotonic() + self._timeout

        def give_up_when_late(status: int, remaining: int, total: int) -> None:
            del status, remaining, total
            if time.monotonic() > deadline:
                raise TimeoutError

        # as_uri() percent-encodes: a raw "#" or "?" in the path would cut it short.
        uri = f"{database.absolute().as_uri()}?mode=ro"
        source = sqlite3.connect(uri, uri=True, timeout=self._timeout)
        target = sqlite3.connect(copy)
        try:
            source.backup(target, pages=-1, progress=give_up_when_late)
        except TimeoutError:
            raise SourceError(
                f"sqlite database {database} stayed locked for more than {self._timeout:g}s"
            ) from None
        except sqlite3.Error as error:
            if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise DiskSpaceError(
                    f"no space left on {copy.parent} while copying sqlite database {database}"
                ) from error
            raise SourceError(f"sqlite database {database} cannot be copied: {error}") from error
        finally:
            target.close()
            source.close()

    def members(self, staging: Path, report: SourceReport) -> Generator[Member]:
        """Copy, check and yield each database under its basename."""
        databases: dict[str, object] = {}
        report.details["databases"] = databases
        for entry in self._entries:
            if not self._exists(entry):
                report.warnings.append(f"{entry.path}: optional and missing, not archived")
                continue
            copy = staging / f"sqlite-{entry.path.name}"
            try:
                self._copy(entry.path, copy)
                try:
                    databases[str(entry.path)] = inspect(copy)
                except sqlite3.DatabaseError as error:  # damage the check cannot even read
                    raise SourceError(
                        f"sqlite database {entry.path} fails integrity_check: {error}"
                    ) from None
                except SourceError as error:  # it names the copy; name the live file too
                    raise SourceError(f"sqlite database {entry.path}: {error}") from None
                yield Member.from_stat(
                    entry.path.name,
                    entry.path,
                    entry.path.stat(),
                    partial(open_nofollow, str(copy)),
                )
            finally:
                for leftover in (copy, *(copy.with_name(copy.name + end) for end in WAL_FILES)):
                    leftover.unlink(missing_ok=True)
