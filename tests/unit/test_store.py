"""The backup directory: names, listing, leftovers and the writers' lock."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sovbackupd import archive
from sovbackupd.errors import ArchiveError, LockedError, NotFoundError
from sovbackupd.manifest import SAFETY_TIER, Manifest, write_manifest
from sovbackupd.policy import Pin
from sovbackupd.store import PIN_LIMIT_BYTES, PIN_SUFFIX, PinFile, Store, backup_name, read_pin
from tests.integration.test_retention import write_backup

PREFIX = "sovereigncore_backup"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store over an existing, empty backup directory."""
    result = Store(tmp_path / "backups", PREFIX)
    result.ensure()
    return result


def touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(b"x" * 10)


def names_in(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


def test_backup_name_is_prefix_and_utc_timestamp() -> None:
    """Names are <prefix>_YYYYMMDD_HHMMSS in UTC, whatever zone the moment carries."""
    assert (
        backup_name(PREFIX, datetime(2026, 1, 2, 14, 0, 0, tzinfo=UTC))
        == "sovereigncore_backup_20260102_140000"
    )
    plus_one = timezone(timedelta(hours=1))
    assert (
        backup_name(PREFIX, datetime(2026, 1, 2, 15, 0, 7, 999_999, tzinfo=plus_one))
        == "sovereigncore_backup_20260102_140007"
    )
    minus_five = timezone(timedelta(hours=-5))
    assert (
        backup_name("x", datetime(2025, 12, 31, 22, 30, tzinfo=minus_five)) == "x_20260101_033000"
    )


def test_backups_lists_every_archive_suffix_oldest_first(store: Store) -> None:
    """.tar.gz, .tar.zst, .tar and their .gpg forms are backups, listed by time."""
    touch(
        store.directory,
        f"{PREFIX}_20260105_000000.tar.gz.gpg",
        f"{PREFIX}_20260101_000000.tar.gz",
        f"{PREFIX}_20260104_000000.tar",
        f"{PREFIX}_20260102_000000.tar.zst",
        f"{PREFIX}_20260103_000000.tar.zst.gpg",
        f"{PREFIX}_20260106_000000.tar.gpg",
    )
    backups = store.backups()
    assert [backup.path.name for backup in backups] == [
        f"{PREFIX}_20260101_000000.tar.gz",
        f"{PREFIX}_20260102_000000.tar.zst",
        f"{PREFIX}_20260103_000000.tar.zst.gpg",
        f"{PREFIX}_20260104_000000.tar",
        f"{PREFIX}_20260105_000000.tar.gz.gpg",
        f"{PREFIX}_20260106_000000.tar.gpg",
    ]
    assert backups[0].name == f"{PREFIX}_20260101_000000"
    assert backups[0].created == datetime(2026, 1, 1, tzinfo=UTC)
    assert backups[0].size == 10
    assert backups[0].path == store.directory / f"{PREFIX}_20260101_000000.tar.gz"


def test_backups_ignores_foreign_files_and_sidecars(store: Store) -> None:
    """Only this prefix's complete archives are listed; notes, sidecars and temp files are not."""
    touch(
        store.directory,
        f"{PREFIX}_20260101_000000.tar.gz",
        f"{PREFIX}_20260101_000000.tar.gz.sha256",
        f"{PREFIX}_20260101_000000.manifest.json",
        f"{PREFIX}_20260102_000000.tar.gz.partial",
        f"{PREFIX}_notes.txt",
        f"{PREFIX}_20260103_000000.txt",
        f"{PREFIX}_2026010_000000.tar.gz",
        f"{PREFIX}_20260104_000000.tar.bz2",
        f"{PREFIX}_20260104_000000.tar.gz.bak",
        "other_backup_20260101_000000.tar.gz",
        f"x{PREFIX}_20260101_000000.tar.gz",
        "README",
    )
    (store.directory / f"{PREFIX}_20260105_000000.d").mkdir()
    assert [backup.path.name for backup in store.backups()] == [f"{PREFIX}_20260101_000000.tar.gz"]


def test_prefix_with_regex_characters_is_matched_literally(tmp_path: Path) -> None:
    """A prefix such as a.b matches only itself, not axb."""
    store = Store(tmp_path, "a.b")
    touch(tmp_path, "a.b_20260101_000000.tar.gz", "axb_20260101_000000.tar.gz")
    assert [backup.path.name for backup in store.backups()] == ["a.b_20260101_000000.tar.gz"]


def test_backups_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    """A backup_dir that does not exist yet holds no backups."""
    assert Store(tmp_path / "absent", PREFIX).backups() == []


def test_find_and_latest_look_backups_up_by_name(store: Store) -> None:
    """find() takes a name with or without suffix; latest() is the newest."""
    touch(store.directory, f"{PREFIX}_20260101_000000.tar.gz", f"{PREFIX}_20260102_000000.tar")
    assert store.find(f"{PREFIX}_20260101_000000").path.name.endswith(".tar.gz")
    assert store.find(f"{PREFIX}_20260102_000000.tar").name == f"{PREFIX}_20260102_000000"
    assert store.latest().name == f"{PREFIX}_20260102_000000"
    with pytest.raises(NotFoundError, match="no backup named"):
        store.find(f"{PREFIX}_20260103_000000")


def test_latest_of_an_empty_directory_is_not_found(store: Store) -> None:
    """latest() with no backups is a NotFoundError, not an IndexError."""
    with pytest.raises(NotFoundError, match="no backups"):
        store.latest()


BackupKind = Literal["backup", "safety", "unreadable"]


def write_head(directory: Path, name: str, kind: BackupKind) -> None:
    """Write an archive *name* and the manifest beside it: a tier's, a safety one, or junk."""
    (directory / f"{name}.tar.gz").write_bytes(b"x" * 10)
    path = archive.manifest_path(directory / f"{name}.tar.gz")
    if kind == "unreadable":
        path.write_bytes(b"not json")
        return
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    head = Manifest(
        id=name,
        created=moment,
        finished=moment,
        tiers=[SAFETY_TIER] if kind == "safety" else ["daily"],
        host="host",
        tool_version="0",
        compression="gzip",
        sources=[],
        file_count=0,
        file_bytes=0,
    )
    with path.open("wb") as out:
        write_manifest(head, [], out)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["backup", "safety", "unreadable"]), min_size=1, max_size=8))
def test_latest_is_the_newest_backup_that_is_not_a_safety_backup(kinds: list[BackupKind]) -> None:
    """latest() is the newest backup whose manifest does not say pre-restore, else NotFound.

    Invariant: a safety backup is never --latest's choice, and no backup newer than the
    choice is anything but a safety backup; a manifest that cannot be read is chosen, not
    passed over (its own error then says why), so older data is never chosen quietly.
    """
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory), PREFIX)
        names = [f"{PREFIX}_2026010{day}_000000" for day in range(1, len(kinds) + 1)]
        for name, kind in zip(names, kinds, strict=True):
            write_head(Path(directory), name, kind)
        chosen = [name for name, kind in zip(names, kinds, strict=True) if kind != "safety"]
        if chosen:
            assert store.latest().name == chosen[-1]
        else:
            with pytest.raises(NotFoundError, match="which --latest never chooses"):
                store.latest()


def test_clean_leftovers_removes_partials_staging_and_orphans(store: Store) -> None:
    """Partial files, the staging directory and sidecars of missing archives are removed."""
    complete = f"{PREFIX}_20260101_000000"
    killed = f"{PREFIX}_20260102_000000"
    touch(
        store.directory,
        f"{complete}.tar.gz",
        f"{complete}.tar.gz.sha256",
        f"{complete}.manifest.json",
        f"{killed}.tar.gz.partial",
        f"{killed}.tar.gz.sha256",
        f"{killed}.tar.gz.sha256.partial",
        f"{killed}.manifest.json",
        f"{killed}.manifest.json.partial",
        f"{killed}.manifest.json.gpg",
        f"{killed}.manifest.json.gpg.partial",
        f"{PREFIX}_20260103_000000.tar.zst.gpg.sha256",
    )
    (store.directory / ".staging" / killed / "aof").mkdir(parents=True)
    (store.directory / ".staging" / killed / "aof" / "appendonly.aof").write_bytes(b"*1\r\n")
    removed = store.clean_leftovers()
    assert names_in(store.directory) == {
        f"{complete}.tar.gz",
        f"{complete}.tar.gz.sha256",
        f"{complete}.manifest.json",
    }
    assert {path.name for path in removed} == {
        f"{killed}.tar.gz.partial",
        f"{killed}.tar.gz.sha256",
        f"{killed}.tar.gz.sha256.partial",
        f"{killed}.manifest.json",
        f"{killed}.manifest.json.partial",
        f"{killed}.manifest.json.gpg",
        f"{killed}.manifest.json.gpg.partial",
        f"{PREFIX}_20260103_000000.tar.zst.gpg.sha256",
        ".staging",
    }


def test_a_partial_that_is_a_directory_is_removed_not_a_crash(store: Store) -> None:
    """A directory (or a tree) under a partial's name is removed as a leftover, not IsADirectory."""
    partial = store.directory / f"{PREFIX}_20260102_000000.tar.gz.partial"
    (partial / "sealed").mkdir(parents=True)
    (partial / "sealed" / "file").write_bytes(b"x")
    (partial / "sealed").chmod(0o555)
    link = store.directory / f"{PREFIX}_20260102_000000.manifest.json.partial"
    link.symlink_to(store.directory / "kept")
    (store.directory / "kept").write_bytes(b"kept")

    removed = store.clean_leftovers()

    assert {path.name for path in removed} == {partial.name, link.name}
    assert names_in(store.directory) == {"kept"}


def test_a_partial_that_cannot_be_removed_is_one_warning_not_a_crash(store: Store) -> None:
    """An immutable partial file stays, logged as kept; the rest is cleaned all the same."""
    chattr = shutil.which("chattr")
    if chattr is None or os.geteuid() != 0:
        pytest.skip("needs chattr and root")
    stuck = store.directory / f"{PREFIX}_20260102_000000.tar.gz.partial"
    stuck.write_bytes(b"x")
    other = store.directory / f"{PREFIX}_20260103_000000.tar.gz.partial"
    other.write_bytes(b"x")
    if subprocess.run([chattr, "+i", str(stuck)], check=False).returncode != 0:
        pytest.skip("the file system takes no immutable flag")
    try:
        with capture_logs() as events:
            removed = store.clean_leftovers()
    finally:
        subprocess.run([chattr, "-i", str(stuck)], check=True)

    assert [path.name for path in removed] == [other.name]
    assert names_in(store.directory) == {stuck.name}
    kept = [event for event in events if event["event"] == "store.leftover_kept"]
    assert [event["path"] for event in kept] == [str(stuck)]


def test_clean_leftovers_never_touches_foreign_files_or_backups(store: Store) -> None:
    """Files sovbackupd does not own, and complete backups of any kind, stay."""
    kept = {
        f"{PREFIX}_20260101_000000.tar.gz",
        f"{PREFIX}_20260102_000000.tar.zst.gpg",
        f"{PREFIX}_20260102_000000.tar.zst.gpg.sha256",
        f"{PREFIX}_20260102_000000.manifest.json",
        f"{PREFIX}_20260102_000000.manifest.json.gpg",
        f"{PREFIX}_notes.txt",
        f"{PREFIX}_notes.partial",
        f"{PREFIX}_20260103_000000.txt.partial",
        "other_20260104_000000.tar.gz.partial",
        "other_20260104_000000.tar.gz.sha256",
        "important.partial",
        "manual-copy.sha256",
    }
    touch(store.directory, *kept)
    (store.directory / "keep-me").mkdir()
    assert store.clean_leftovers() == []
    assert names_in(store.directory) == kept | {"keep-me"}


def test_clean_leftovers_in_a_clean_directory_removes_nothing(store: Store) -> None:
    """With nothing left over, nothing is removed and the lock file stays."""
    with store.lock():
        assert store.clean_leftovers() == []
        assert names_in(store.directory) == {".sovbackupd.lock"}


def test_ensure_creates_the_directory_private(tmp_path: Path) -> None:
    """backup_dir is created 0700, parents included."""
    directory = tmp_path / "deep" / "backups"
    Store(directory, PREFIX).ensure()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o700, 0o750, 0o755])
def test_ensure_keeps_the_mode_of_an_existing_private_directory(tmp_path: Path, mode: int) -> None:
    """0750 and 0755 stay as the operator set them: the archives inside are 0600."""
    directory = tmp_path / "backups"
    directory.mkdir()
    directory.chmod(mode)
    Store(directory, PREFIX).ensure()
    assert stat.S_IMODE(directory.stat().st_mode) == mode


def test_lock_creates_the_directory_private(tmp_path: Path) -> None:
    """Taking the lock on a new backup_dir creates it 0700 with a 0600 lock file."""
    store = Store(tmp_path / "backups", PREFIX)
    with store.lock():
        assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
        lock_file = store.directory / ".sovbackupd.lock"
        assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600


def test_staging_is_private_and_per_backup(store: Store) -> None:
    """staging() makes a 0700 directory for one backup under .staging."""
    path = store.staging(f"{PREFIX}_20260101_000000")
    assert path == store.directory / ".staging" / f"{PREFIX}_20260101_000000"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


HOLDER = textwrap.dedent(
    """\
    import sys
    from pathlib import Path
    from sovbackupd.store import Store

    with Store(Path(sys.argv[1]), "sovereigncore_backup").lock():
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


@pytest.fixture
def held_lock(store: Store) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store's lock until the test ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_lock_refuses_a_second_holder_and_names_the_first(
    store: Store, held_lock: subprocess.Popen[str]
) -> None:
    """While another process holds the lock, taking it fails at once naming its pid."""
    with pytest.raises(LockedError, match=rf"\(pid {held_lock.pid}\)") as caught, store.lock():
        pytest.fail("the lock was taken twice")
    assert caught.value.exit_code == 75
    assert str(store.directory) in str(caught.value)


def test_lock_is_free_again_once_the_holder_exits(
    store: Store, held_lock: subprocess.Popen[str]
) -> None:
    """A holder that exits (or dies) releases the lock; the pid it left is replaced."""
    assert held_lock.stdin is not None
    held_lock.stdin.close()
    held_lock.wait(timeout=10)
    with store.lock():
        lock_file = store.directory / ".sovbackupd.lock"
        assert lock_file.read_text() == f"{os.getpid()}\n"


def test_free_name_returns_the_moments_name_when_free(store: Store) -> None:
    """An untaken moment gives its own name and the moment itself."""
    moment = datetime(2026, 1, 2, 14, 0, 0, tzinfo=UTC)
    assert store.free_name(moment) == (f"{PREFIX}_20260102_140000", moment)


def test_free_name_does_not_reuse_a_taken_name(store: Store) -> None:
    """When a backup already has this second's name, a later second is used."""
    moment = datetime.now(UTC)
    taken = backup_name(PREFIX, moment)
    touch(store.directory, f"{taken}.tar.zst.gpg")
    name, named_at = store.free_name(moment)
    assert name != taken
    assert name == backup_name(PREFIX, named_at)
    assert named_at > moment
    assert name > taken


def test_lock_file_made_by_root_goes_to_the_directory_owner(tmp_path: Path) -> None:
    """A root CLI run leaves a lock the daemon's user can still take (as root here)."""
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    os.chown(directory, 4321, 4321)
    store = Store(directory, "sovereigncore_backup")
    with store.lock():
        pass
    assert (directory / ".sovbackupd.lock").stat().st_uid == 4321


def test_head_reads_a_manifest_without_its_files(tmp_path: Path) -> None:
    """The head of a real manifest parses from the bytes before its file list."""
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    name = write_backup(directory, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), b"x" * 100)
    stored = Store(directory, "sovereigncore_backup").find(name)
    head = stored.head()
    full = stored.manifest()
    assert head is not None
    assert full is not None
    assert [entry.path for entry in full.files] == ["data", "data/payload.bin"]
    assert head == full.model_copy(update={"files": []})


# --- pins ---------------------------------------------------------------------------------

PINNED = f"{PREFIX}_20260101_000000"


def test_pin_writes_a_private_pin_that_reads_back_and_unpin_removes_it(store: Store) -> None:
    """A pin round-trips with its end; unpin removes it and says whether there was one."""
    touch(store.directory, f"{PINNED}.tar.gz")
    end = datetime(2027, 1, 1, tzinfo=UTC)
    store.pin(f"{PINNED}.tar.gz", end, datetime(2026, 6, 1, tzinfo=UTC))
    path = store.pin_path(PINNED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.pins() == {PINNED: Pin(until=end)}
    assert store.unpin(PINNED) is True
    assert store.unpin(PINNED) is False
    assert store.pins() == {}
    with pytest.raises(NotFoundError, match="no backup named"):
        store.pin(f"{PREFIX}_20990101_000000", None, datetime(2026, 6, 1, tzinfo=UTC))
    with pytest.raises(NotFoundError, match="no backup named"):
        store.unpin("../../etc/passwd")


def test_a_pin_without_its_archive_still_pins_and_is_no_leftover(store: Store) -> None:
    """Pins outlive a hand-deleted archive (they hold the remote copies), through cleaning."""
    touch(store.directory, f"{PINNED}.tar.gz")
    store.pin(PINNED, None, datetime(2026, 6, 1, tzinfo=UTC))
    (store.directory / f"{PINNED}.tar.gz").unlink()
    touch(store.directory, f"{PINNED}{PIN_SUFFIX}.partial")
    store.clean_leftovers()
    assert names_in(store.directory) == {f"{PINNED}{PIN_SUFFIX}"}
    assert store.pins() == {PINNED: Pin()}
    assert store.unpin(PINNED) is True


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=PIN_LIMIT_BYTES + 64))
def test_reading_any_bytes_as_a_pin_never_raises_and_always_pins(data: bytes) -> None:
    """Whatever bytes a pin file holds, reading it never raises and its backup stays pinned.

    Either the bytes are a valid pin of that backup, or the pin carries a problem, which
    holds the backup for ever.
    """
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"{PINNED}{PIN_SUFFIX}"
        path.write_bytes(data)
        pin = read_pin(path, PINNED)
    valid = pin.problem is None
    if valid:
        record = PinFile.model_validate_json(data)
        assert record.backup == PINNED
        assert pin.until == record.until
    else:
        assert str(path) in (pin.problem or "")
        assert pin.holds(datetime.max.replace(tzinfo=UTC))


@pytest.mark.parametrize(
    "planted", [b"[" * 100_000, b'{"id": ' * 50_000, b"[1, 2]", b"not json", b"\xff\xfe"]
)
def test_a_planted_manifest_beside_an_archive_reads_as_unreadable(
    store: Store, planted: bytes
) -> None:
    """Invariant: any manifest bytes give a head or None, never an exception (daemon start)."""
    name = backup_name(PREFIX, datetime(2026, 1, 2, tzinfo=UTC))
    touch(store.directory, f"{name}.tar.gz")
    (store.directory / f"{name}.manifest.json").write_bytes(planted)
    (stored,) = store.backups()
    assert stored.head() is None
    assert stored.manifest() is None


def test_a_pin_root_writes_belongs_to_the_directorys_owner(store: Store) -> None:
    """`sudo sovbackupd pin` leaves a pin the daemon's user (who owns backup_dir) can read."""
    if os.geteuid() != 0:
        pytest.skip("only root can hand a file to another user (the behaviour under test)")
    touch(store.directory, f"{PINNED}.tar.gz")
    os.chown(store.directory, 65534, 65534)
    store.pin(PINNED, None, datetime(2026, 6, 1, tzinfo=UTC))
    owner = store.pin_path(PINNED).stat()
    assert (owner.st_uid, owner.st_gid) == (65534, 65534)
    assert stat.S_IMODE(owner.st_mode) == 0o600


def test_a_fifo_planted_as_a_manifest_reads_as_unreadable_without_blocking(store: Store) -> None:
    """A FIFO in a manifest's place blocked head() (the daemon's start) and manifest() on open."""
    name = backup_name(PREFIX, datetime(2026, 1, 2, tzinfo=UTC))
    touch(store.directory, f"{name}.tar.gz")
    fifo = store.directory / f"{name}.manifest.json"
    os.mkfifo(fifo)
    (stored,) = store.backups()
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.extend([stored.head(), stored.manifest()]))
    reader.start()
    reader.join(60)
    if reader.is_alive():  # unblock the reader before failing, so that the run ends
        for _ in range(2):
            with fifo.open("w"):
                pass
        reader.join()
        pytest.fail("reading a FIFO planted as a manifest blocked")
    assert found == [None, None]


def test_a_fifo_planted_as_a_checksum_sidecar_is_unreadable_without_blocking(
    store: Store,
) -> None:
    """A FIFO in the sidecar's place blocked verify (and the daemon's remote pass) on open."""
    name = backup_name(PREFIX, datetime(2026, 1, 2, tzinfo=UTC))
    touch(store.directory, f"{name}.tar.gz")
    fifo = store.directory / f"{name}.tar.gz.sha256"
    os.mkfifo(fifo)
    (stored,) = store.backups()
    raised: list[BaseException] = []

    def read() -> None:
        try:
            archive.read_sidecar(stored.path)
        except ArchiveError as error:
            raised.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(60)
    if reader.is_alive():  # unblock the reader before failing, so that the run ends
        with fifo.open("w"):
            pass
        reader.join()
        pytest.fail("reading a FIFO planted as a checksum sidecar blocked")
    assert [str(error) for error in raised] == [f"{name}.tar.gz: checksum sidecar is unreadable"]


def test_planted_names_that_are_no_archive_of_ours_are_not_listed(store: Store) -> None:
    """Month 13 raised ValueError in every listing (list, each backup, the daemon's start)."""
    good = backup_name(PREFIX, datetime(2026, 1, 2, tzinfo=UTC))
    touch(store.directory, f"{good}.tar.gz", f"{PREFIX}_20261399_999999.tar.gz")
    os.mkfifo(store.directory / f"{PREFIX}_20260103_000000.tar.gz")
    (store.directory / f"{PREFIX}_20260104_000000.tar.gz").mkdir()
    assert [backup.name for backup in store.backups()] == [good]
