"""SQLite databases: consistent copies through the online backup API, checked before use."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovbackupd.config.models import SourcePath
from sovbackupd.errors import SourceError
from sovbackupd.sources.base import Member, SourceReport
from sovbackupd.sources.sqlite import SqliteSource
from tests.conftest import make_database


def source_of(*paths: Path | SourcePath) -> SqliteSource:
    entries = [path if isinstance(path, SourcePath) else SourcePath(path=path) for path in paths]
    return SqliteSource(entries, timeout=5.0)


def capture(source: SqliteSource, staging: Path) -> tuple[list[Member], SourceReport]:
    report = SourceReport("sqlite", "sqlite")
    return list(source.members(staging, report)), report


def rows_in(database: Path, table: str) -> int:
    connection = sqlite3.connect(database)
    try:
        count: int = connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]  # noqa: S608 (test table names)
    finally:
        connection.close()
    return count


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def wal_writer(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """A WAL database with committed rows still only in its -wal file, writer still open."""
    database = tmp_path / "live" / "sovereign_rekor.db"
    database.parent.mkdir()
    make_database(database)
    connection = sqlite3.connect(database)
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.executemany("INSERT INTO entries (body) VALUES (?)", [("in wal",)] * 25)
    connection.commit()
    yield database, connection
    connection.close()


def test_copy_of_a_wal_database_includes_wal_content_and_passes_integrity_check(
    wal_writer: tuple[Path, sqlite3.Connection], staging: Path, tmp_path: Path
) -> None:
    """Rows committed only to the WAL are in the copy, which integrity_check accepts."""
    database, _ = wal_writer
    wal = database.with_name(database.name + "-wal")
    assert wal.stat().st_size > 0, "the fixture's rows must still be in the WAL"
    report = SourceReport("sqlite", "sqlite")
    members = source_of(database).members(staging, report)
    member = next(members)
    assert member.arcname == "sovereign_rekor.db"
    assert member.origin == str(database)
    assert member.opener is not None
    restored = tmp_path / "restored.db"
    with member.opener() as handle:
        restored.write_bytes(handle.read())
    members.close()
    assert rows_in(restored, "entries") == 525
    details = report.details["databases"][str(database)]
    assert details["integrity"] == "ok"
    assert details["page_count"] == restored.stat().st_size // details["page_size"]
    assert details["rows"] == {"entries": 525, "odd name": 1}


def test_row_counts_cover_tables_whose_names_need_quoting(tmp_path: Path, staging: Path) -> None:
    """Tables named with spaces, quotes or keywords are counted like any other."""
    database = tmp_path / "odd.db"
    connection = sqlite3.connect(database)
    for table in ("odd name", 'with "quotes"', "select", "ünïcode"):
        quoted = '"' + table.replace('"', '""') + '"'
        connection.execute(f"CREATE TABLE {quoted} (x)")
        connection.execute(f"INSERT INTO {quoted} VALUES (1), (2)")  # noqa: S608 (test table names)
    connection.commit()
    connection.close()
    _, report = capture(source_of(database), staging)
    assert report.details["databases"][str(database)]["rows"] == {
        "odd name": 2,
        'with "quotes"': 2,
        "select": 2,
        "ünïcode": 2,
    }


def test_file_that_is_not_a_database_fails_with_source_error(tmp_path: Path, staging: Path) -> None:
    """A file of garbage where the database should be is a SourceError naming it."""
    database = tmp_path / "garbage.db"
    database.write_bytes(b"this is not an sqlite database\n" * 200)
    with pytest.raises(SourceError, match=re.escape(str(database))):
        capture(source_of(database), staging)
    assert list(staging.iterdir()) == []


def test_database_with_damaged_pages_fails_with_source_error(tmp_path: Path, staging: Path) -> None:
    """A database whose pages are damaged fails the check and is not archived."""
    database = tmp_path / "damaged.db"
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
    connection.execute("CREATE INDEX t_body ON t (body)")
    rows = [(f"row {number}" * 20,) for number in range(2000)]
    connection.executemany("INSERT INTO t (body) VALUES (?)", rows)
    connection.commit()
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    data = bytearray(database.read_bytes())
    for page in (3, 7, 11):
        start = page * page_size + 8
        data[start : start + 200] = b"\xa5" * 200
    database.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=re.escape("damaged.db")):
        capture(source_of(database), staging)
    assert list(staging.iterdir()) == []


def test_staging_copy_is_removed_once_the_generator_finishes(
    wal_writer: tuple[Path, sqlite3.Connection], staging: Path
) -> None:
    """While a member is current its copy exists in staging; afterwards nothing is left."""
    database, _ = wal_writer
    members = source_of(database).members(staging, SourceReport("sqlite", "sqlite"))
    next(members)
    assert [path.name for path in staging.iterdir()] == ["sqlite-sovereign_rekor.db"]
    assert list(members) == []
    assert list(staging.iterdir()) == []


def test_staging_copy_is_removed_when_the_generator_is_closed_early(
    tmp_path: Path, staging: Path
) -> None:
    """Closing the generator after the first of two databases leaves no copy behind."""
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    make_database(first, rows=10)
    make_database(second, rows=10)
    report = SourceReport("sqlite", "sqlite")
    members = source_of(first, second).members(staging, report)
    assert next(members).arcname == "first.db"
    members.close()
    assert list(staging.iterdir()) == []
    assert list(report.details["databases"]) == [str(first)]


def test_each_database_is_archived_under_its_basename(tmp_path: Path, staging: Path) -> None:
    """Several databases give one member each, named by basename, in policy order."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_database(tmp_path / "b" / "zeta.db", rows=3)
    make_database(tmp_path / "a" / "alpha.db", rows=4)
    members, report = capture(
        source_of(tmp_path / "b" / "zeta.db", tmp_path / "a" / "alpha.db"), staging
    )
    assert [member.arcname for member in members] == ["zeta.db", "alpha.db"]
    rows = {path: value["rows"]["entries"] for path, value in report.details["databases"].items()}
    assert rows == {str(tmp_path / "b" / "zeta.db"): 3, str(tmp_path / "a" / "alpha.db"): 4}


@pytest.mark.parametrize("name", ["rekor#1.db", "what?.db", "100%25.db", "with space.db"])
def test_database_paths_with_uri_characters_are_copied_faithfully(
    tmp_path: Path, staging: Path, name: str
) -> None:
    """#, ?, % and spaces in a path name the database itself; nothing is created beside it."""
    live = tmp_path / "live"
    live.mkdir()
    database = live / name
    make_database(database, rows=7)
    _, report = capture(source_of(database), staging)
    assert report.details["databases"][str(database)]["rows"] == {"entries": 7, "odd name": 1}
    assert {path.name for path in live.iterdir()} <= {name, f"{name}-wal", f"{name}-shm"}


def test_missing_database_fails_unless_optional(tmp_path: Path, staging: Path) -> None:
    """A missing database is a SourceError; an optional one is skipped with a warning."""
    missing = tmp_path / "absent.db"
    with pytest.raises(SourceError, match=re.escape("absent.db does not exist")):
        source_of(missing).preflight()
    with pytest.raises(SourceError, match=re.escape("absent.db does not exist")):
        capture(source_of(missing), staging)
    members, report = capture(source_of(SourcePath(path=missing, optional=True)), staging)
    assert members == []
    assert report.warnings == [f"{missing}: optional and missing, not archived"]


def test_directory_given_as_a_database_is_refused(tmp_path: Path) -> None:
    """A directory in sources.sqlite is a SourceError."""
    with pytest.raises(SourceError, match="is not a regular file"):
        source_of(tmp_path).preflight()


def test_preflight_counts_the_database_and_its_wal(
    wal_writer: tuple[Path, sqlite3.Connection],
) -> None:
    """The estimate covers the main file and the WAL, staged and archived alike."""
    database, _ = wal_writer
    wal = database.with_name(database.name + "-wal")
    estimate = source_of(database).preflight()
    assert estimate.archived_bytes >= database.stat().st_size + wal.stat().st_size
    assert estimate.staged_bytes == estimate.archived_bytes


def test_capture_leaves_the_live_database_unchanged(tmp_path: Path, staging: Path) -> None:
    """Backing up never writes to the database file itself."""
    database = tmp_path / "live.db"
    make_database(database, rows=50)
    before = database.read_bytes()
    capture(source_of(database), staging)
    assert database.read_bytes() == before
