"""Test-restore drills on real backups: a real redis-server, real SQLite, real archives.

Corrupted archives are made consistent again (member sha256 and size in both manifests,
the sidecar) so that only the drill's own checks of the restored data can catch them.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sovbackupd import config, restore
from sovbackupd.config.models import Policy
from sovbackupd.metrics import Metrics
from tests.conftest import (
    CliResult,
    RedisServer,
    Sandbox,
    policy_data,
    require_tool,
    run_cli,
    write_policy,
)
from tests.integration.test_daemon import (
    EVERY_2_SECONDS,
    NEW_YEAR,
    DaemonProcess,
    daemon_policy,
    daily_far_away,
    notify_socket,  # noqa: F401 (a fixture start_daemon needs, found by its name)
    rewrite,
    scrape,
    start_daemon,  # noqa: F401 (a fixture, found by its name)
)
from tests.integration.test_restore_hostile import ArchiveEditor

RESULT = "sovbackupd_restore_test_last_result"
LAST_SUCCESS = "sovbackupd_restore_test_last_success_timestamp_seconds"
RDB = "redis_dump.rdb"
DATABASE = "sovereign_rekor.db"


def write_config(
    tmp_path: Path, sandbox: Sandbox, server: RedisServer | None, **redis: Any
) -> tuple[Path, Policy]:
    """Write the sandbox's policy (with *redis* added to its redis source); load it too."""
    data = policy_data(sandbox, server)
    if redis:
        data["sources"]["redis"].update(redis)
    path = write_policy(tmp_path / "policy.yaml", data)
    return path, config.load(path, {})


def backup_now(config_path: Path, sandbox: Sandbox) -> ArchiveEditor:
    """Back up with the CLI; return the new archive opened for rewriting, signed when saved."""
    result = run_cli("backup", config=config_path)
    assert result.returncode == 0, result.stderr
    return ArchiveEditor(sandbox.backup_dir / f"{result.stdout.strip()}.tar.gz", sandbox.root)


def redis_servers_under(root: Path) -> set[int]:
    """Return the pids of the redis-servers whose working directory lies below *root*.

    redis-server rewrites its command line (its title), so its ``--dir`` is read from its
    working directory; one whose directory was removed still shows the old path.
    """
    found = set()
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            command = (process / "cmdline").read_bytes()
            cwd = str((process / "cwd").readlink())
        except OSError:
            continue
        if b"redis-server" in command.split(b"\0", 1)[0] and cwd.startswith(f"{root}/"):
            found.add(int(process.name))
    return found


def assert_cleaned_up(policy: Policy, tmp_path: Path, servers_before: set[int]) -> None:
    """Assert the drill left no scratch directory and no redis-server of its own."""
    assert not (policy.backup_dir / ".staging").exists()
    assert list(tmp_path.rglob(".sovbackupd-restore-*")) == []
    assert redis_servers_under(tmp_path) <= servers_before


def checks_by_name(report: restore.DrillReport) -> dict[str, restore.Check]:
    return {check.what: check for check in report.checks}


def recorded_drill(policy: Policy) -> dict[str, Any]:
    """Return the drill state file, after checking last_drill() reads the same."""
    recorded: dict[str, Any] = json.loads(
        (policy.backup_dir / restore.DRILL_STATE_NAME).read_text()
    )
    state = restore.last_drill(policy)
    assert state is not None
    read_back = (state.backup, state.ok, state.finished, state.last_success)
    assert read_back == (
        recorded["backup"],
        recorded["ok"],
        recorded["finished"],
        recorded["last_success"],
    )
    return recorded


def new_metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def flip_middle_bytes(data: bytes) -> bytes:
    """Return *data* with 16 bytes in its middle inverted."""
    middle = len(data) // 2
    flipped = bytes(byte ^ 0xFF for byte in data[middle : middle + 16])
    return data[:middle] + flipped + data[middle + 16 :]


def test_test_restore_cli_passes_on_a_good_backup(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """On a good backup test-restore exits 0 and reports archive, sqlite and redis all ok."""
    config_path, policy = write_config(tmp_path, sandbox, redis_server)
    editor = backup_now(config_path, sandbox)
    servers_before = redis_servers_under(tmp_path)

    text = run_cli("test-restore", editor.top, config=config_path)
    result = run_cli("test-restore", "--latest", "--json", config=config_path)

    assert text.returncode == 0, text.stdout + text.stderr
    assert f"test restore of {editor.top} passed" in text.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["name"] == editor.top
    assert report["ok"] is True
    checks = {check["what"]: check["ok"] for check in report["checks"]}
    assert checks == {"archive": True, f"sqlite {DATABASE}": True, "redis rdb": True}
    assert_cleaned_up(policy, tmp_path, servers_before)


def test_drill_success_sets_metrics_and_is_recorded(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """A passing drill sets result 1 and the success time, and records both beside the backups."""
    config_path, policy = write_config(tmp_path, sandbox, redis_server)
    editor = backup_now(config_path, sandbox)
    servers_before = redis_servers_under(tmp_path)
    metrics = new_metrics()

    report = restore.drill(policy, editor.top, metrics=metrics)

    assert report.ok, report.checks
    assert report.name == editor.top
    assert set(checks_by_name(report)) == {"archive", f"sqlite {DATABASE}", "redis rdb"}
    assert "103 keys loaded" in checks_by_name(report)["redis rdb"].detail
    assert sample(metrics, RESULT) == 1
    assert sample(metrics, LAST_SUCCESS) == report.finished
    assert recorded_drill(policy) == {
        "backup": editor.top,
        "ok": True,
        "finished": report.finished,
        "last_success": report.finished,
    }
    assert_cleaned_up(policy, tmp_path, servers_before)


def test_drill_fails_on_a_corrupted_rdb_and_keeps_the_last_success_time(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """A corrupted RDB behind consistent checksums fails the drill; the last success time stays."""
    config_path, policy = write_config(tmp_path, sandbox, redis_server)
    editor = backup_now(config_path, sandbox)
    metrics = new_metrics()
    passed = restore.drill(policy, editor.top, metrics=metrics)
    assert passed.ok, passed.checks
    editor.replace(RDB, flip_middle_bytes(editor.content(RDB)))
    editor.save()
    servers_before = redis_servers_under(tmp_path)

    failed = restore.drill(policy, editor.top, metrics=metrics)
    cli = run_cli("test-restore", editor.top, config=config_path)

    checks = checks_by_name(failed)
    assert not failed.ok
    assert checks["archive"].ok, "the checksums were made consistent: the archive passes"
    assert checks[f"sqlite {DATABASE}"].ok
    assert not checks["redis rdb"].ok
    assert sample(metrics, RESULT) == 0
    assert sample(metrics, LAST_SUCCESS) == passed.finished
    assert cli.returncode == 1
    assert "FAIL redis rdb" in cli.stdout
    assert "Traceback" not in cli.stderr
    recorded = recorded_drill(policy)
    assert (recorded["ok"], recorded["last_success"]) == (False, passed.finished)
    restarted = new_metrics()  # a daemon started afterwards learns the last success from disk
    restore.drill(policy, editor.top, metrics=restarted)
    assert sample(restarted, RESULT) == 0
    assert sample(restarted, LAST_SUCCESS) == passed.finished
    assert_cleaned_up(policy, tmp_path, servers_before)


def test_drill_fails_when_the_rdb_holds_fewer_keys_than_the_manifest(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    redis_factory: Callable[..., RedisServer],
) -> None:
    """A valid RDB of another, smaller dataset loads but fails the manifest's key count."""
    config_path, policy = write_config(tmp_path, sandbox, redis_server)
    editor = backup_now(config_path, sandbox)
    other = redis_factory(name="other")
    other.client().mset({f"other:{number}": "x" for number in range(5)})
    other.client().save()
    editor.replace(RDB, other.rdb_path.read_bytes())
    editor.save()
    servers_before = redis_servers_under(tmp_path)

    report = restore.drill(policy, editor.top, metrics=new_metrics())

    check = checks_by_name(report)["redis rdb"]
    assert not report.ok
    assert not check.ok
    assert "5 keys loaded" in check.detail
    assert_cleaned_up(policy, tmp_path, servers_before)


def garbage_page(database: bytes) -> bytes:
    """Overwrite a page in the middle of *database* with garbage."""
    page_size = int.from_bytes(database[16:18], "big")
    start = page_size * (len(database) // page_size // 2)
    garbage = bytes(range(256)) * (page_size // 256)
    return database[:start] + garbage + database[start + page_size :]


def one_row_deleted(database: bytes, scratch: Path) -> bytes:
    """Return *database* with one row of ``entries`` deleted: sound, but one row short."""
    path = scratch / "rewritten.db"
    path.write_bytes(database)
    connection = sqlite3.connect(path)
    connection.execute("DELETE FROM entries WHERE id = 1")
    connection.commit()
    connection.close()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda data, _scratch: garbage_page(data), ""),
        (one_row_deleted, "entries: 499 rows, the manifest says 500"),
    ],
    ids=["garbage-page", "row-deleted"],
)
def test_drill_fails_on_a_corrupted_sqlite_copy(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    damage: Callable[[bytes, Path], bytes],
    detail: str,
) -> None:
    """A database copy damaged behind consistent checksums fails the sqlite check, exit 1."""
    config_path, policy = write_config(tmp_path, sandbox, redis_server)
    editor = backup_now(config_path, sandbox)
    editor.replace(DATABASE, damage(editor.content(DATABASE), tmp_path))
    editor.save()
    servers_before = redis_servers_under(tmp_path)
    metrics = new_metrics()

    report = restore.drill(policy, editor.top, metrics=metrics)
    cli = run_cli("test-restore", editor.top, "--json", config=config_path)

    checks = checks_by_name(report)
    assert not report.ok
    assert checks["archive"].ok
    assert checks["redis rdb"].ok
    assert not checks[f"sqlite {DATABASE}"].ok
    assert detail in checks[f"sqlite {DATABASE}"].detail
    assert sample(metrics, RESULT) == 0
    assert sample(metrics, LAST_SUCCESS) == 0, "no drill ever passed"
    assert cli.returncode == 1
    printed = {check["what"]: check["ok"] for check in json.loads(cli.stdout)["checks"]}
    assert printed[f"sqlite {DATABASE}"] is False
    recorded = recorded_drill(policy)
    assert (recorded["ok"], recorded["last_success"]) == (False, None)
    assert_cleaned_up(policy, tmp_path, servers_before)


def test_drill_loads_the_archived_aof_and_passes(
    tmp_path: Path, sandbox: Sandbox, redis_factory: Callable[..., RedisServer]
) -> None:
    """With appendonly on and aof_dir set, the drill loads the archived AOF too and passes."""
    server = redis_factory("--appendonly", "yes")
    server.client().mset({f"aof:{number}": f"value {number}" for number in range(50)})
    server.client(db=2).set("aof-other-db", "x")
    config_path, policy = write_config(tmp_path, sandbox, server, aof_dir=str(server.aof_dir))
    editor = backup_now(config_path, sandbox)
    assert any(entry["path"].startswith("appendonlydir/") for entry in editor.manifest["files"])
    servers_before = redis_servers_under(tmp_path)
    metrics = new_metrics()

    report = restore.drill(policy, editor.top, metrics=metrics)

    checks = checks_by_name(report)
    assert report.ok, report.checks
    assert checks["redis aof"].ok
    assert "51 keys loaded from the AOF" in checks["redis aof"].detail
    assert checks["redis rdb"].ok
    assert sample(metrics, RESULT) == 1
    assert_cleaned_up(policy, tmp_path, servers_before)


def add_stowaway(editor: ArchiveEditor) -> None:
    editor.add("data/stowaway.txt", "file", b"not listed\n", listed=False)


def uid_out_of_bounds(editor: ArchiveEditor) -> None:
    editor.entry("data/notes.txt")["uid"] = 2**40


@pytest.mark.parametrize(
    ("forge", "detail"),
    [
        (add_stowaway, "data/stowaway.txt is not in the manifest"),
        (uid_out_of_bounds, ".uid: 1099511627776"),
    ],
    ids=["member-not-in-the-manifest", "uid-out-of-bounds"],
)
def test_drill_of_a_forged_archive_fails_its_archive_check_recorded_and_cleaned_up(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    forge: Callable[[ArchiveEditor], None],
    detail: str,
) -> None:
    """A stowaway member or a uid of 2**40 fails the archive check: recorded, never raised."""
    config_path, policy = write_config(tmp_path, sandbox, redis_server)
    editor = backup_now(config_path, sandbox)
    forge(editor)
    editor.save()
    servers_before = redis_servers_under(tmp_path)
    metrics = new_metrics()

    report = restore.drill(policy, editor.top, metrics=metrics)

    assert not report.ok
    assert [check.what for check in report.checks] == ["archive"]
    assert detail in report.checks[0].detail
    assert sample(metrics, RESULT) == 0
    assert recorded_drill(policy)["ok"] is False
    assert_cleaned_up(policy, tmp_path, servers_before)


@pytest.mark.parametrize(
    "forge",
    [
        lambda editor: editor.entry("data/notes.txt").update(uid=2**40),
        lambda editor: editor.entry("data/notes.txt").update(mtime=math.nan),
        lambda editor: next(
            source for source in editor.manifest["sources"] if source["component"] == "sqlite"
        )["details"].update(databases=[]),
    ],
    ids=["uid-2**40", "mtime-nan", "databases-a-list"],
)
def test_scheduled_drill_of_a_forged_manifest_sets_the_result_to_0(
    tmp_path: Path,
    sandbox: Sandbox,
    start_daemon: Callable[[Path], DaemonProcess],  # noqa: F811 (the fixture imported above)
    forge: Callable[[ArchiveEditor], None],
) -> None:
    """The daemon's drill of a forged manifest logs one failure and exports result 0, not NaN."""
    policy, listen = daemon_policy(
        tmp_path, sandbox, None, {"daily": daily_far_away()}, test_restore={"schedule": NEW_YEAR}
    )
    daily = run_cli("backup", "--tier", "daily", config=policy)  # no catch-up at start
    assert daily.returncode == 0, daily.stderr
    editor = ArchiveEditor(sandbox.backup_dir / f"{daily.stdout.strip()}.tar.gz", sandbox.root)
    forge(editor)
    editor.save()
    rewrite(policy, test_restore={"schedule": EVERY_2_SECONDS})

    daemon = start_daemon(policy)
    drilled = daemon.wait_for("test_restore.finished")

    assert drilled["result"] == "failure", drilled
    assert drilled["backup"] == editor.top
    assert "manifest field" in drilled["problems"][0]
    assert scrape(listen).value(RESULT) == 0
    assert daemon.named("test_restore.crashed") == []
    state = json.loads((sandbox.backup_dir / restore.DRILL_STATE_NAME).read_text())
    assert state["ok"] is False


def test_scheduled_drill_with_no_backup_to_test_sets_the_result_to_0(
    tmp_path: Path,
    sandbox: Sandbox,
    start_daemon: Callable[[Path], DaemonProcess],  # noqa: F811 (the fixture imported above)
) -> None:
    """Every backup failing (a damaged database) leaves nothing to drill: result 0."""
    sandbox.database.write_bytes(b"SQLite format 3\0" + b"\xff" * 4096)
    policy, listen = daemon_policy(
        tmp_path,
        sandbox,
        None,
        {"daily": daily_far_away()},
        test_restore={"schedule": EVERY_2_SECONDS},
    )

    daemon = start_daemon(policy)
    drilled = daemon.wait_for("test_restore.finished")

    assert drilled["result"] == "failure", drilled
    assert scrape(listen).value(RESULT) == 0
    assert daemon.named("test_restore.crashed") == []


UNPRIVILEGED = ("--inh-caps=-all", "--bounding-set=-all,+dac_read_search")
"""The unit's privileges as root: no CAP_DAC_OVERRIDE, no CAP_FOWNER (see systemd/)."""


def run_unprivileged(*arguments: str, config: Path) -> CliResult:
    """Run the CLI as root without CAP_DAC_OVERRIDE and CAP_FOWNER, as the unit does."""
    argv = [require_tool("setpriv"), *UNPRIVILEGED, sys.executable, "-m", "sovbackupd"]
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"BACKUP_DIR", "RETENTION_DAYS", "REMOTE_BACKUP_PATH", "SOVBACKUPD_CONFIG"}
    }
    completed = subprocess.run(
        [*argv, "--config", str(config), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        check=False,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def test_unprivileged_drill_of_read_only_dirs_cleans_up_and_the_next_backup_runs(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Without CAP_DAC_OVERRIDE, 0555 and 0000 dirs restored by a drill are removed all the same."""
    locked = sandbox.app / "data" / "locked"
    (locked / "sealed").mkdir(parents=True)
    (locked / "read-only.txt").write_text("kept\n")
    (locked / "read-only.txt").chmod(0o444)
    (locked / "sealed").chmod(0o000)
    locked.chmod(0o555)
    config_path, _ = write_config(tmp_path, sandbox, None)
    try:
        editor = backup_now(config_path, sandbox)

        drill = run_unprivileged("test-restore", editor.top, config=config_path)
        after = run_unprivileged("backup", config=config_path)
    finally:
        locked.chmod(0o755)
        (locked / "sealed").chmod(0o755)

    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert f"test restore of {editor.top} passed" in drill.stdout
    assert not (sandbox.backup_dir / ".staging").exists()
    assert after.returncode == 0, after.stderr
    assert "Traceback" not in after.stderr


def test_a_leftover_the_unit_cannot_remove_is_one_warning_not_a_failed_backup(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A staging tree owned by someone else, 0555: the next backup warns once and succeeds."""
    config_path, _ = write_config(tmp_path, sandbox, None)
    backup_now(config_path, sandbox)
    foreign = sandbox.backup_dir / ".staging" / "test-restore-x" / "foreign"
    foreign.mkdir(parents=True)
    (foreign / "file").write_text("not ours\n")
    os.chown(foreign, 12345, 12345)
    foreign.chmod(0o555)
    try:
        result = run_unprivileged("backup", config=config_path)
    finally:
        foreign.chmod(0o755)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "store.leftover_kept" in line]
    assert len(warnings) == 1, result.stderr


def test_unprivileged_restore_that_cannot_chown_a_directory_is_one_error_line(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Root without CAP_CHOWN: a directory of another owner is one error, not a traceback.

    Directories and symlinks get their owner after every member is read: a failure there
    is reported as one during the read is, and the staging is removed.
    """
    foreign = sandbox.app / "data" / "foreign"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    config_path, _ = write_config(tmp_path, sandbox, None)
    editor = backup_now(config_path, sandbox)
    destination = tmp_path / "restored"

    result = run_unprivileged("restore", editor.top, "--to", str(destination), config=config_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert "Operation not permitted" in result.stderr_lines[0], result.stderr
    assert list(tmp_path.rglob(".sovbackupd-restore-*")) == []
