"""Failure paths of ``sovbackupd backup``, against a real redis-server, SQLite and disks.

Every refused or failed backup must print exactly one line on stderr naming what failed
and where, exit with its code from the table in errors.py, and leave the backup
directory as it found it: no new archive, no ``*.partial``, no ``.staging``, no
sidecar, and the backups made before it unchanged and still passing ``verify --deep``.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from sovbackupd import archive, backup, config, fsat
from sovbackupd.config.models import SourcePath
from sovbackupd.errors import ArchiveError, DiskSpaceError, ExitCode
from sovbackupd.manifest import Manifest
from sovbackupd.metrics import Metrics
from sovbackupd.sources.base import Member, SourceReport
from sovbackupd.sources.files import open_nofollow
from sovbackupd.sources.sqlite import SqliteSource
from sovbackupd.store import LOCK_NAME, STAGING_NAME
from tests.conftest import (
    CliResult,
    RedisServer,
    Sandbox,
    SqliteLock,
    backup_files,
    free_port,
    make_database,
    policy_data,
    require_tool,
    run_cli,
    stored_files,
    write_policy,
)

MiB = 1 << 20
WAIT_SECONDS = 30.0

Mount = Callable[[Path, str], Path]


def snapshot(backup_dir: Path) -> dict[str, str]:
    """Return each name in *backup_dir* (lock file aside) with the sha256 of its content."""
    return {
        name: archive.file_sha256(backup_dir / name) if (backup_dir / name).is_file() else "dir"
        for name in backup_files(backup_dir)
    }


def leftovers(backup_dir: Path) -> list[str]:
    """Return the temp files and staging a run may leave behind in *backup_dir*."""
    return sorted(
        name
        for name in backup_files(backup_dir)
        if name.endswith(fsat.PARTIAL_SUFFIX) or name == STAGING_NAME
    )


@dataclass(frozen=True)
class GoodBackup:
    """A backup made before the failing run, and what its directory held then."""

    policy: Path
    backup_dir: Path
    name: str
    contents: dict[str, str]

    def assert_untouched(self) -> None:
        """Check that nothing appeared, vanished or changed, and every backup verifies deeply."""
        assert backup_files(self.backup_dir) == set(self.contents)
        assert leftovers(self.backup_dir) == []
        assert snapshot(self.backup_dir) == self.contents
        verified = run_cli("verify", "--deep", "--all", config=self.policy)
        assert verified.returncode == ExitCode.OK, verified.stderr
        assert verified.stdout.splitlines() == [f"{self.name}: ok (deep, authenticated)"]


def make_good_backup(sandbox: Sandbox) -> GoodBackup:
    """Back up *sandbox* (without Redis) successfully and record the directory's state."""
    policy = write_policy(sandbox.root / "good.yaml", policy_data(sandbox, None))
    result = run_cli("backup", config=policy)
    assert result.returncode == ExitCode.OK, result.stderr
    name = result.stdout.strip()
    contents = snapshot(sandbox.backup_dir)
    assert stored_files(name) == set(contents)
    return GoodBackup(policy, sandbox.backup_dir, name, contents)


@pytest.fixture
def good_backup(sandbox: Sandbox) -> GoodBackup:
    """One successful backup of the sandbox, already in its backup_dir."""
    return make_good_backup(sandbox)


def assert_refused(result: CliResult, code: ExitCode, *needles: str) -> str:
    """Check *result* exited with *code* and one stderr line naming every needle; return it."""
    assert result.returncode == code, result
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("sovbackupd: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert result.stdout == ""
    return line


def policy_file(sandbox: Sandbox, data: dict[str, Any], name: str = "policy.yaml") -> Path:
    """Write the failing run's policy *data* beside the sandbox."""
    return write_policy(sandbox.root / name, data)


def wait_for(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    """Poll *condition* until it holds; fail the test naming *what* after *seconds*."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g}s waiting for {what}")
        time.sleep(0.01)


def wait_for_partial(backup_dir: Path, what: str) -> None:
    """Wait until a run's archive is open: its ``.partial``, not the ``.staging`` made first."""
    wait_for(
        lambda: any(name.endswith(fsat.PARTIAL_SUFFIX) for name in leftovers(backup_dir)), what
    )


def start_backup(policy: Path) -> subprocess.Popen[str]:
    """Start ``sovbackupd backup`` in the background, as a second operator or cron would."""
    return subprocess.Popen(
        [sys.executable, "-m", "sovbackupd", "--config", str(policy), "backup"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> None:
    """Kill *process* if a failed assertion left it running."""
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture
def mount_tmpfs() -> Iterator[Mount]:
    """Mount small tmpfs filesystems (needs root); unmount them all afterwards."""
    mount_binary = require_tool("mount")
    umount_binary = require_tool("umount")
    mounted: list[Path] = []

    def mount(directory: Path, size: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        completed = subprocess.run(
            [mount_binary, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            pytest.fail(
                f"cannot mount a {size} tmpfs on {directory} (these tests run as root in CI): "
                f"{completed.stderr.strip()}"
            )
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run([umount_binary, str(directory)], check=True)


def test_backup_refuses_when_redis_is_unreachable(
    sandbox: Sandbox, good_backup: GoodBackup
) -> None:
    """A Redis URL that nothing listens on fails the backup with one line naming the URL."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    data = policy_data(sandbox, None)
    data["sources"]["redis"] = {"url": url, "rdb_path": str(sandbox.root / "dump.rdb")}
    result = run_cli("backup", config=policy_file(sandbox, data))
    assert_refused(result, ExitCode.FAILURE, url, "unreachable")
    good_backup.assert_untouched()


def test_backup_refuses_a_wrong_redis_password(
    sandbox: Sandbox,
    good_backup: GoodBackup,
    redis_factory: Callable[..., RedisServer],
) -> None:
    """A wrong password_file is refused by Redis; the line names the URL, never a password."""
    server = redis_factory(password="the-right-secret")  # noqa: S106 (a throwaway test server)
    password_file = sandbox.root / "redis-password"
    password_file.write_text("a-wrong-secret\n")
    data = policy_data(sandbox, server)
    data["sources"]["redis"]["password_file"] = str(password_file)
    result = run_cli("backup", config=policy_file(sandbox, data))
    line = assert_refused(
        result,
        ExitCode.FAILURE,
        server.url,
        f"refused the credentials (user default, password from sources.redis.password_file "
        f"{password_file})",
    )
    assert "secret" not in line
    good_backup.assert_untouched()


ASKS_FOR_THE_SETTING = (
    "requires a password and the policy gives none: set sources.redis.password_file "
    "(a file whose first line is the password) and, for an ACL user, sources.redis.username"
)


def test_backup_without_credentials_says_redis_requires_a_password_and_where_to_set_it(
    sandbox: Sandbox, good_backup: GoodBackup, redis_factory: Callable[..., RedisServer]
) -> None:
    """A server with requirepass, no credentials in the policy: the line names the setting."""
    server = redis_factory(password="the-secret")  # noqa: S106 (a throwaway test server)
    result = run_cli("backup", config=policy_file(sandbox, policy_data(sandbox, server)))
    line = assert_refused(result, ExitCode.FAILURE, server.url, ASKS_FOR_THE_SETTING)
    assert "HELLO" not in line
    good_backup.assert_untouched()


def test_backup_as_an_acl_user_without_a_password_says_which_setting_gives_it(
    sandbox: Sandbox, good_backup: GoodBackup, redis_factory: Callable[..., RedisServer]
) -> None:
    """An ACL username with no password_file (default user off): the same clear line."""
    server = redis_factory(password="admin-secret")  # noqa: S106 (a throwaway test server)
    admin = server.client()
    acl = ["backup", "on", ">backup-secret", "+bgsave", "+lastsave", "+info", "+ping"]
    admin.execute_command("ACL", "SETUSER", *acl)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    data = policy_data(sandbox, server)
    data["sources"]["redis"]["username"] = "backup"
    result = run_cli("backup", config=policy_file(sandbox, data))
    line = assert_refused(result, ExitCode.FAILURE, server.url, ASKS_FOR_THE_SETTING)
    assert "invalid username-password pair" not in line
    good_backup.assert_untouched()


def test_backup_refuses_when_redis_password_file_is_missing(
    sandbox: Sandbox, good_backup: GoodBackup, redis_server: RedisServer
) -> None:
    """A password_file that does not exist fails the backup with one line naming that file."""
    password_file = sandbox.root / "no-such-password"
    data = policy_data(sandbox, redis_server)
    data["sources"]["redis"]["password_file"] = str(password_file)
    result = run_cli("backup", config=policy_file(sandbox, data))
    assert_refused(result, ExitCode.FAILURE, str(password_file))
    good_backup.assert_untouched()


def test_backup_succeeds_with_a_minimal_redis_acl_user(
    sandbox: Sandbox, redis_factory: Callable[..., RedisServer]
) -> None:
    """An ACL user with only +bgsave +lastsave +info +ping and a password_file can back up."""
    server = redis_factory(password="admin-secret")  # noqa: S106 (a throwaway test server)
    admin = server.client()
    acl = ["backup", "on", ">backup-secret", "+bgsave", "+lastsave", "+info", "+ping"]
    admin.execute_command("ACL", "SETUSER", *acl)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    admin.mset({f"key:{number}": number for number in range(50)})
    limited = redis.Redis(port=server.port, username="backup", password="backup-secret")  # noqa: S106 (a throwaway test server)
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.get("key:1")  # the user really is minimal
    limited.close()
    password_file = sandbox.root / "redis-password"
    password_file.write_text("backup-secret\n")
    data = policy_data(sandbox, server)
    data["sources"]["redis"].update(username="backup", password_file=str(password_file))
    policy = policy_file(sandbox, data)

    result = run_cli("backup", config=policy)

    assert result.returncode == ExitCode.OK, result.stderr
    name = result.stdout.strip()
    manifest = Manifest.model_validate_json(
        (sandbox.backup_dir / f"{name}.manifest.json").read_bytes()
    )
    (redis_result,) = [source for source in manifest.sources if source.component == "redis"]
    assert redis_result.details["keyspace_at_save"]["db0"]["keys"] == 50
    assert redis_result.details["rdb_check"] == "ok"
    assert "redis_dump.rdb" in {entry.path for entry in manifest.files}
    verified = run_cli("verify", "--deep", name, config=policy)
    assert verified.returncode == ExitCode.OK, verified.stderr


def test_backup_fails_when_redis_bgsave_fails(
    sandbox: Sandbox,
    good_backup: GoodBackup,
    redis_factory: Callable[..., RedisServer],
) -> None:
    """A BGSAVE that Redis reports as failed fails the backup with a line about BGSAVE."""
    # nosave: with its dir gone this server could not save at SIGTERM, and would refuse to exit.
    server = redis_factory("--shutdown-on-sigterm", "nosave")
    server.client().set("key", "value")
    # With its working directory gone, the fork cannot create its temp RDB file.
    shutil.rmtree(server.directory)
    data = policy_data(sandbox, server)
    result = run_cli("backup", config=policy_file(sandbox, data))
    assert_refused(result, ExitCode.FAILURE, "BGSAVE", server.url, "failed")
    good_backup.assert_untouched()


def test_backup_refuses_a_missing_sqlite_database(
    sandbox: Sandbox, good_backup: GoodBackup
) -> None:
    """A configured SQLite database that does not exist fails with one line naming its path."""
    missing = sandbox.app / "gone.db"
    data = policy_data(sandbox, None)
    data["sources"]["sqlite"] = [str(sandbox.database), str(missing)]
    result = run_cli("backup", config=policy_file(sandbox, data))
    assert_refused(result, ExitCode.FAILURE, str(missing), "does not exist")
    good_backup.assert_untouched()


def _garbage_everywhere(database: Path) -> None:
    database.write_bytes(b"not a database " + os.urandom(64 * 1024))


def _garbage_in_schema_page(database: Path) -> None:
    with database.open("r+b") as handle:
        handle.seek(100)  # just past the file header: page 1 holds sqlite_master
        handle.write(b"\xff" * 200)


def _garbage_in_cell_pointers(database: Path) -> None:
    page_size = int.from_bytes(database.read_bytes()[16:18], "big")
    with database.open("r+b") as handle:
        # The last page is a table leaf: its cell pointers follow an 8-byte page header.
        handle.seek(database.stat().st_size - page_size + 8)
        handle.write(b"\xff" * 4)


@pytest.mark.parametrize(
    ("damage", "symptom"),
    [
        (_garbage_everywhere, "file is not a database"),
        (_garbage_in_schema_page, "fails integrity_check: "),
        # SQLite words this one differently run to run ("On tree page ...", "malformed").
        (_garbage_in_cell_pointers, "fails integrity_check: "),
    ],
    ids=["garbage-file", "damaged-schema-page", "damaged-cell-pointers"],
)
def test_backup_refuses_a_corrupt_sqlite_database(
    sandbox: Sandbox,
    good_backup: GoodBackup,
    redis_server: RedisServer,
    damage: Callable[[Path], None],
    symptom: str,
) -> None:
    """A SQLite file with garbage bytes fails the backup mid-archive, with one line naming it."""
    connection = sqlite3.connect(sandbox.database)
    connection.execute("PRAGMA journal_mode=DELETE")  # no WAL left to repair the damage
    connection.close()
    damage(sandbox.database)
    # Redis goes first, so the archive is already being written when SQLite fails.
    data = policy_data(sandbox, redis_server)
    result = run_cli("backup", config=policy_file(sandbox, data))
    assert_refused(result, ExitCode.FAILURE, f"sqlite database {sandbox.database}", symptom)
    good_backup.assert_untouched()


def test_backup_gives_up_on_a_sqlite_database_locked_too_long(
    sandbox: Sandbox,
    good_backup: GoodBackup,
    redis_server: RedisServer,
    lock_sqlite: Callable[[Path], SqliteLock],
) -> None:
    """A database held EXCLUSIVE past sqlite_timeout_seconds fails fast with a 'locked' line."""
    lock_sqlite(sandbox.database)
    data = policy_data(sandbox, redis_server)
    data["sources"]["sqlite_timeout_seconds"] = 1
    # The lock is held until the test ends: the backup returning at all means it gave up.
    result = run_cli("backup", config=policy_file(sandbox, data), timeout=WAIT_SECONDS)
    assert_refused(result, ExitCode.FAILURE, str(sandbox.database), "locked")
    good_backup.assert_untouched()


def test_backup_refuses_a_missing_config_file(sandbox: Sandbox, good_backup: GoodBackup) -> None:
    """A configured config file that does not exist fails with one line naming its path."""
    missing = sandbox.app / ".env"
    missing.unlink()
    result = run_cli("backup", config=policy_file(sandbox, policy_data(sandbox, None)))
    assert_refused(result, ExitCode.FAILURE, str(missing), "does not exist")
    good_backup.assert_untouched()


def test_backup_records_a_missing_optional_config_file_as_a_warning(sandbox: Sandbox) -> None:
    """The same missing file marked optional is skipped, and the manifest says so."""
    missing = sandbox.app / ".env"
    missing.unlink()
    data = policy_data(sandbox, None)
    data["sources"]["config"] = [
        {"path": str(missing), "optional": True},
        str(sandbox.app / "redis.conf"),
    ]
    policy = policy_file(sandbox, data)

    result = run_cli("backup", config=policy)

    assert result.returncode == ExitCode.OK, result.stderr
    name = result.stdout.strip()
    assert result.stderr_lines == [
        f"sovbackupd: warning: {missing}: optional and missing, not archived"
    ]
    manifest = Manifest.model_validate_json(
        (sandbox.backup_dir / f"{name}.manifest.json").read_bytes()
    )
    (config_result,) = [source for source in manifest.sources if source.component == "config"]
    assert config_result.warnings == [f"{missing}: optional and missing, not archived"]
    assert config_result.details["missing_optional"] == [str(missing)]
    paths = {entry.path for entry in manifest.files}
    assert "config/redis.conf" in paths
    assert "config/.env" not in paths
    verified = run_cli("verify", "--deep", name, config=policy)
    assert verified.returncode == ExitCode.OK, verified.stderr


@pytest.mark.root
def test_backup_refuses_before_writing_when_the_disk_is_too_small(
    sandbox: Sandbox, mount_tmpfs: Mount
) -> None:
    """Sources larger than the free space are refused by the preflight with exit 73."""
    mount_tmpfs(sandbox.backup_dir, "4m")
    good_backup = make_good_backup(sandbox)
    for number in range(3):
        (sandbox.app / "data" / f"big-{number}.bin").write_bytes(os.urandom(2 * MiB))
    result = run_cli("backup", config=policy_file(sandbox, policy_data(sandbox, None)))
    assert_refused(
        result, ExitCode.CANT_CREATE, f"not enough space in {sandbox.backup_dir}", "is free"
    )
    good_backup.assert_untouched()


@pytest.mark.root
def test_backup_cleans_up_when_the_disk_fills_during_the_write(
    sandbox: Sandbox, mount_tmpfs: Mount, lock_sqlite: Callable[[Path], SqliteLock]
) -> None:
    """Data that outgrows the disk after the preflight fails with exit 73 and no partial."""
    mount_tmpfs(sandbox.backup_dir, "4m")
    good_backup = make_good_backup(sandbox)
    # The backup stalls on a locked database, after its preflight and with its archive open.
    locker = lock_sqlite(sandbox.database)
    data = policy_data(sandbox, None)
    data["sources"]["sqlite_timeout_seconds"] = WAIT_SECONDS
    process = start_backup(policy_file(sandbox, data))
    try:
        wait_for_partial(sandbox.backup_dir, "the backup's .partial")
        # Meanwhile a data directory grows past the free space, then the backup resumes.
        (sandbox.app / "data" / "grown.bin").write_bytes(os.urandom(6 * MiB))
        locker.release()
        stdout, stderr = process.communicate(timeout=WAIT_SECONDS)
    finally:
        stop(process)
    assert_refused(
        CliResult(process.returncode, stdout, stderr),
        ExitCode.CANT_CREATE,
        f"no space left on {sandbox.backup_dir} while writing",
        fsat.PARTIAL_SUFFIX,
    )
    good_backup.assert_untouched()


@pytest.mark.root
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_archive_writer_raises_disk_space_error_and_removes_its_partial(
    tmp_path: Path, mount_tmpfs: Mount, compression: archive.Compression
) -> None:
    """Writer on a full disk raises DiskSpaceError, leaves no .partial and frees the space."""
    disk = mount_tmpfs(tmp_path / "small", "2m")
    big = tmp_path / "big.bin"
    # Far more than the disk and the compressor's queues hold: add() itself hits the full disk.
    big.write_bytes(os.urandom(32 * MiB))
    member = Member.from_stat("data/big.bin", big, big.stat(), partial(open_nofollow, str(big)))
    path = disk / "top.tar"
    expected = re.escape(f"no space left on {disk} while writing top.tar{fsat.PARTIAL_SUFFIX}")
    with (
        pytest.raises(DiskSpaceError, match=expected),
        archive.Writer(path, compression, "top") as writer,
    ):
        writer.add(member, SourceReport("data", "dirs"))
    assert list(disk.iterdir()) == []
    # The space is back: no handle on the deleted partial file was left open.
    assert shutil.disk_usage(disk).used == 0


def test_backup_is_refused_while_another_backup_holds_the_lock(
    sandbox: Sandbox,
    redis_server: RedisServer,
    lock_sqlite: Callable[[Path], SqliteLock],
) -> None:
    """A second backup exits 75 naming the running one; the first then completes and verifies."""
    # The first backup stalls mid-archive on a locked database, holding the directory lock.
    locker = lock_sqlite(sandbox.database)
    data = policy_data(sandbox, redis_server)
    data["sources"]["sqlite_timeout_seconds"] = WAIT_SECONDS
    policy = policy_file(sandbox, data)
    first = start_backup(policy)
    try:
        wait_for_partial(sandbox.backup_dir, "the first backup's .partial")
        during = snapshot(sandbox.backup_dir)
        assert (sandbox.backup_dir / LOCK_NAME).read_text().strip() == str(first.pid)

        second = run_cli("backup", config=policy)

        assert_refused(
            second,
            ExitCode.TEMPFAIL,
            f"another sovbackupd (pid {first.pid})",
            str(sandbox.backup_dir),
        )
        assert first.poll() is None, "the first backup did not hold the lock during the test"
        assert backup_files(sandbox.backup_dir) == set(during), "the refused run touched files"
        locker.release()
        stdout, stderr = first.communicate(timeout=WAIT_SECONDS)
    finally:
        stop(first)
    assert first.returncode == ExitCode.OK, stderr
    name = stdout.strip()
    assert leftovers(sandbox.backup_dir) == []
    assert backup_files(sandbox.backup_dir) == stored_files(name)
    verified = run_cli("verify", "--deep", name, config=policy)
    assert verified.returncode == ExitCode.OK, verified.stderr


def test_backup_refuses_a_policy_with_an_unknown_key(
    sandbox: Sandbox, good_backup: GoodBackup
) -> None:
    """An unknown key exits 78 with one line naming the key and its line in the file."""
    policy = sandbox.root / "typo.yaml"
    policy.write_text(
        f"backup_dir: {sandbox.backup_dir}\n"
        "sources:\n"
        f"  dirs: [{sandbox.app / 'data'}]\n"
        "  exclud: ['*.tmp']\n"
    )
    result = run_cli("backup", config=policy)
    assert_refused(result, ExitCode.CONFIG, f"{policy}:4:", "sources.exclud", "unknown key")
    good_backup.assert_untouched()


def test_backup_refuses_a_missing_policy_file(sandbox: Sandbox, good_backup: GoodBackup) -> None:
    """A policy path that does not exist exits 78 with one line naming the path."""
    policy = sandbox.root / "no-such-policy.yaml"
    result = run_cli("backup", config=policy)
    assert_refused(result, ExitCode.CONFIG, str(policy), "not found")
    good_backup.assert_untouched()


def test_backup_waits_for_a_bgsave_someone_else_started(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """A BGSAVE already running is waited for, then the backup takes its own snapshot."""
    client = redis_server.client()
    client.config_set("rdb-key-save-delay", "5000")  # microseconds per key: a slow save
    client.bgsave()
    assert client.info("persistence")["rdb_bgsave_in_progress"] == 1
    result = run_cli("backup", config=policy_file(sandbox, policy_data(sandbox, redis_server)))
    assert result.returncode == ExitCode.OK, result.stderr
    saves = client.info("persistence")["rdb_saves"]
    assert saves >= 2, "the backup asked for a save of its own after the running one"


@pytest.mark.root
def test_sqlite_copy_onto_a_disk_that_filled_is_a_disk_space_error(
    tmp_path: Path, mount_tmpfs: Mount
) -> None:
    """A disk that fills after the free-space check fails the SQLite copy with exit 73."""
    database = tmp_path / "big.db"
    make_database(database, rows=20_000)
    staging = mount_tmpfs(tmp_path / "staging", "256k")
    source = SqliteSource([SourcePath(path=database)], 5)

    with pytest.raises(DiskSpaceError, match=f"no space left on {staging} while copying"):
        list(source.members(staging, SourceReport("sqlite", "sqlite")))

    assert DiskSpaceError.exit_code == ExitCode.CANT_CREATE
    assert list(staging.iterdir()) == []


def test_a_symlink_planted_as_the_lock_is_refused_and_its_target_untouched(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """A lock symlink planted by the service user must not let a root CLI write through it.

    The service user owns backup_dir; root runs the CLI. A `.sovbackupd.lock` -> /etc/shadow
    had root truncate the target, write its pid into it and chown it to the service user.
    """
    victim = tmp_path / "victim"
    victim.write_text("root:$y$j9T$secret:19000:0:99999:7:::\n")
    victim.chmod(0o600)
    sandbox.backup_dir.mkdir(parents=True, exist_ok=True)
    os.chown(sandbox.backup_dir, 65534, 65534)  # the service user's, as in production
    (sandbox.backup_dir / LOCK_NAME).symlink_to(victim)
    policy = policy_file(sandbox, policy_data(sandbox, None))

    result = run_cli("backup", config=policy)

    assert victim.read_text() == "root:$y$j9T$secret:19000:0:99999:7:::\n"
    assert (victim.stat().st_uid, victim.stat().st_gid) == (0, 0)
    assert_refused(result, ExitCode.FAILURE, str(sandbox.backup_dir / LOCK_NAME), "symlink")


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_staging_name_that_is_no_directory_is_removed_and_the_backup_runs(
    sandbox: Sandbox, tmp_path: Path, planted: str
) -> None:
    """`.staging` as a symlink or a file crashed every backup with a traceback (rmtree).

    Left by anyone who can write backup_dir, it stopped all backups, the daemon's too. It
    is removed as a leftover (a link is never followed: its target stays) and the backup runs.
    """
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the backup's\n")
    sandbox.backup_dir.mkdir(parents=True, exist_ok=True)
    staging = sandbox.backup_dir / STAGING_NAME
    if planted == "symlink":
        staging.symlink_to(elsewhere)
    else:
        staging.write_text("")
    policy = policy_file(sandbox, policy_data(sandbox, None))

    result = run_cli("backup", config=policy)

    assert result.returncode == ExitCode.OK, result.stderr
    assert "Traceback" not in result.stderr
    assert [path.name for path in elsewhere.iterdir()] == ["keep"]
    assert (elsewhere / "keep").read_text() == "not the backup's\n"
    assert not staging.is_symlink()


@pytest.mark.parametrize(
    ("setting", "damage"),
    [("redis password_file", "fifo"), ("redis password_file", "not utf-8"), ("gpg", "fifo")],
)
def test_backup_refuses_a_secret_file_that_is_a_fifo_or_not_text(
    sandbox: Sandbox,
    good_backup: GoodBackup,
    redis_server: RedisServer,
    setting: str,
    damage: str,
) -> None:
    """A FIFO hung the backup on open(); a non-UTF-8 password file raised UnicodeDecodeError."""
    path = sandbox.root / "secret"
    if damage == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"\xff\xfe-not-text\n")
    data = policy_data(sandbox, redis_server)
    if setting == "gpg":
        data["encryption"] = {"gpg": {"passphrase_file": str(path)}}
    else:
        data["sources"]["redis"]["password_file"] = str(path)
    result = run_cli("backup", config=policy_file(sandbox, data), timeout=120)
    assert_refused(result, ExitCode.FAILURE, str(path))
    good_backup.assert_untouched()


# Runs the CLI with the manifest copy beside the archive damaged as it is written: the
# reader under test (restore's) stays real; only the file it reads is a fault.
DAMAGED_MANIFEST_CLI = """
import sys
from sovbackupd import archive, cli

copy = archive.copy_atomically

def damaging(source, path, **kwargs):
    if path.name.endswith(archive.MANIFEST_SUFFIX):
        source.read(100)  # what a torn write leaves: the manifest's first bytes
    copy(source, path, **kwargs)

archive.copy_atomically = damaging
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_backup_whose_manifest_does_not_read_back_fails_and_the_good_one_survives(
    sandbox: Sandbox,
) -> None:
    """A manifest that does not read back fails the backup; retention (keep 1) keeps the last one.

    Before the read-back, such a backup was committed, counted, and pruned the last backup
    that restored.
    """
    data = policy_data(sandbox, None, tiers={"daily": {"schedule": "0 2 * * *", "keep": 1}})
    policy = policy_file(sandbox, data)
    first = run_cli("backup", "--tier", "daily", config=policy)
    assert first.returncode == ExitCode.OK, first.stderr
    good = GoodBackup(
        policy, sandbox.backup_dir, first.stdout.strip(), snapshot(sandbox.backup_dir)
    )

    damaged = subprocess.run(
        [
            sys.executable,
            "-c",
            DAMAGED_MANIFEST_CLI,
            "--config",
            str(policy),
            "backup",
            "--tier",
            "daily",
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    result = CliResult(damaged.returncode, damaged.stdout, damaged.stderr)
    line = assert_refused(result, ExitCode.FAILURE, "was discarded", "manifest is not JSON")
    assert re.search(r"backup sovereigncore_backup_\d{8}_\d{6} was discarded", line), line
    assert line.count("sovereigncore_backup_") == 1, line
    good.assert_untouched()


def test_a_backup_discarded_at_its_read_back_counts_as_failed(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup whose manifest does not read back is counted and logged as a failure."""
    copy = archive.copy_atomically

    def damaging(source: Any, path: Path, **kwargs: Any) -> None:
        if path.name.endswith(archive.MANIFEST_SUFFIX):
            source.read(100)
        copy(source, path, **kwargs)

    monkeypatch.setattr(archive, "copy_atomically", damaging)
    policy = config.load(policy_file(sandbox, policy_data(sandbox, None)))
    metrics = Metrics(CollectorRegistry())

    with capture_logs() as events, pytest.raises(ArchiveError, match="was discarded"):
        backup.run(policy, ["daily"], metrics=metrics)

    (finished,) = [event for event in events if event["event"] == "backup.finished"]
    assert finished["result"] == "failure"
    assert "was discarded" in finished["error"]
    sample = metrics.registry.get_sample_value
    assert sample("sovbackupd_backups_total", {"result": "failure"}) == 1
    assert sample("sovbackupd_backups_total", {"result": "success"}) in (None, 0)
    assert leftovers(sandbox.backup_dir) == []
    assert not any(
        name.startswith("sovereigncore_backup_") for name in backup_files(sandbox.backup_dir)
    )


def test_a_source_path_with_two_leading_slashes_backs_up_and_restores(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """``//opt/...`` (pathlib keeps two leading slashes) names /opt/... and comes back.

    Its members' origins began ``//``, which restore refuses as no usable path: on main the
    backup exited 0 and every restore and test-restore of it failed; with the read-back
    alone it was a discarded backup. The policy now reads it as the root.
    """
    data = policy_data(sandbox, None)
    data["sources"]["dirs"] = ["/" + str(path) for path in sandbox.data_dirs]
    policy = policy_file(sandbox, data)

    made = run_cli("backup", config=policy)

    assert made.returncode == ExitCode.OK, made.stderr
    restored = run_cli("restore", "--latest", "--to", str(tmp_path / "out"), config=policy)
    assert restored.returncode == ExitCode.OK, restored.stderr
