"""Restore round trips on a real sandbox server: files, a real redis-server, real SQLite."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sovbackupd.errors import ExitCode
from tests.conftest import (
    RedisServer,
    Sandbox,
    policy_data,
    require_tool,
    run_cli,
    write_policy,
)

TreeState = dict[str, tuple[str, int, float, str]]


def tree_state(root: Path, paths: list[Path]) -> TreeState:
    """Describe every file, directory and symlink under *paths*: type, mode, mtime, content."""
    state: TreeState = {}

    def describe(path: Path) -> None:
        status = path.lstat()
        relative = str(path.relative_to(root))
        if stat.S_ISLNK(status.st_mode):
            state[relative] = ("symlink", 0, status.st_mtime, str(path.readlink()))
        elif stat.S_ISDIR(status.st_mode):
            state[relative] = ("dir", stat.S_IMODE(status.st_mode), status.st_mtime, "")
            for child in sorted(path.iterdir()):
                describe(child)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[relative] = ("file", stat.S_IMODE(status.st_mode), status.st_mtime, digest)

    for path in paths:
        if os.path.lexists(path):
            describe(path)
    return state


def assert_same_tree(actual: TreeState, expected: TreeState) -> None:
    assert actual.keys() == expected.keys()
    for name, (kind, mode, mtime, content) in expected.items():
        got_kind, got_mode, got_mtime, got_content = actual[name]
        assert (got_kind, got_mode, got_content) == (kind, mode, content), name
        assert got_mtime == pytest.approx(mtime, abs=1e-6), name


def rows(database: Path) -> dict[str, int]:
    connection = sqlite3.connect(database)
    try:
        tables = [
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        return {
            table: connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]  # noqa: S608 (table names of the test's own database)
            for table in tables
        }
    finally:
        connection.close()


def keys(server: RedisServer) -> dict[int, dict[bytes | str, object]]:
    """Every key of databases 0 and 3 with its DUMP serialisation (value and type)."""
    found: dict[int, dict[bytes | str, object]] = {}
    for db in (0, 3):
        client = server.client(db)
        found[db] = {key: client.dump(key) for key in client.keys("*")}
    return found


def redis_argv(server: RedisServer, *extra: str) -> list[str]:
    """The argv that starts *server* again as a daemon, as `systemctl start` would."""
    return [
        require_tool("redis-server"),
        "--port", str(server.port),
        "--bind", "127.0.0.1",
        "--dir", str(server.directory),
        "--daemonize", "yes",
        "--logfile", str(server.directory / "redis.log"),
        "--pidfile", str(server.directory / "redis.pid"),
        "--save", "3600 1",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def restart_commands() -> Iterator[Callable[..., dict[str, Any]]]:
    """restore.stop/start for a test's redis-server; shuts a restarted server down at the end."""
    servers: list[RedisServer] = []

    def commands(server: RedisServer, *extra: str) -> dict[str, Any]:
        servers.append(server)
        cli = require_tool("redis-cli")
        return {
            "stop": [[cli, "-p", str(server.port), "shutdown"]],  # saves, as systemctl stop does
            "start": [redis_argv(server, *extra)],
        }

    yield commands
    for server in servers:
        subprocess.run(
            ["redis-cli", "-p", str(server.port), "shutdown", "nosave"],
            capture_output=True,
            check=False,
        )


def backup_now(config: Path) -> str:
    result = run_cli("backup", config=config)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def damage(sandbox: Sandbox, server: RedisServer | None) -> None:
    """Delete keys, drop a table, edit config, remove and add files."""
    if server is not None:
        server.client().delete(*[f"key:{number}" for number in range(50)])
        server.client(3).set("other-db", "changed")
    connection = sqlite3.connect(sandbox.database)
    connection.execute("DROP TABLE entries")
    connection.commit()
    connection.close()
    (sandbox.app / ".env").write_text("SECRET_KEY=wrong\n")
    (sandbox.app / "data" / "notes.txt").unlink()
    (sandbox.app / "data" / "nested" / "deeper" / "blob.bin").write_bytes(b"overwritten")
    (sandbox.app / "memory" / "new.md").write_text("written after the backup\n")


def live_paths(sandbox: Sandbox) -> list[Path]:
    return [*sandbox.config_files, *sandbox.data_dirs]


def test_restore_brings_back_files_keys_and_rows_after_damage(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """After damage everywhere, restore gives back identical files, modes, mtimes, keys, rows."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore=restart_commands(redis_server)),
    )
    files_before = tree_state(sandbox.root, live_paths(sandbox))
    keys_before = keys(redis_server)
    rows_before = rows(sandbox.database)
    name = backup_now(config)
    damage(sandbox, redis_server)

    result = run_cli("restore", name, "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert f"restored {name}" in result.stdout
    assert_same_tree(tree_state(sandbox.root, live_paths(sandbox)), files_before)
    assert rows(sandbox.database) == rows_before
    assert keys(redis_server) == keys_before
    leftovers = list(sandbox.root.rglob(".sovbackupd-restore-*"))
    assert leftovers == []


def component_states(sandbox: Sandbox, server: RedisServer | None) -> dict[str, object]:
    """Each component's state, to tell which ones a restore changed."""
    state: dict[str, object] = {
        "config": tree_state(sandbox.root, sandbox.config_files),
        "data": tree_state(sandbox.root, sandbox.data_dirs),
        "sqlite": rows(sandbox.database),
    }
    if server is not None:
        state["redis"] = keys(server)
    return state


@pytest.mark.parametrize("component", ["redis", "sqlite", "config", "data"])
def test_only_restores_that_component_alone(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
    component: str,
) -> None:
    """--only X brings X back and leaves every other component as damaged as it was."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore=restart_commands(redis_server)),
    )
    before = component_states(sandbox, redis_server)
    name = backup_now(config)
    damage(sandbox, redis_server)
    damaged = component_states(sandbox, redis_server)

    result = run_cli("restore", name, "--only", component, "--yes", config=config)

    assert result.returncode == 0, result.stderr
    after = component_states(sandbox, redis_server)
    for each in before:
        expected = before[each] if each == component else damaged[each]
        if each in ("config", "data"):
            assert_same_tree(after[each], expected)  # type: ignore[arg-type]  # a TreeState
        else:
            assert after[each] == expected, each


def test_restore_to_dir_reroots_every_path_and_touches_nothing_live(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """--to DIR puts each file at DIR/<original path>, with Redis still running untouched."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, redis_server))
    before = tree_state(sandbox.root, live_paths(sandbox))
    name = backup_now(config)
    damage(sandbox, redis_server)
    damaged = tree_state(sandbox.root, live_paths(sandbox))
    target = tmp_path / "restored"

    result = run_cli("restore", name, "--to", str(target), config=config)

    assert result.returncode == 0, result.stderr
    assert tree_state(sandbox.root, live_paths(sandbox)) == damaged
    rerooted = target / str(sandbox.root).lstrip("/")
    expected = {key: value for key, value in before.items() if not key.endswith(".tmp")}
    assert_same_tree(tree_state(rerooted, live_paths_under(rerooted, sandbox)), expected)
    assert (target / str(redis_server.rdb_path).lstrip("/")).read_bytes()[:5] == b"REDIS"
    assert rows(target / str(sandbox.database).lstrip("/")) == rows_of_backup(sandbox)
    assert redis_server.client().ping()


def live_paths_under(root: Path, sandbox: Sandbox) -> list[Path]:
    return [root / path.relative_to(sandbox.root) for path in live_paths(sandbox)]


def rows_of_backup(sandbox: Sandbox) -> dict[str, int]:
    del sandbox
    return {"entries": 500, "odd name": 1}


def test_restore_refuses_while_redis_answers_without_a_stop_command(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """With Redis running and no restore.stop, restore names the problem and changes nothing."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, redis_server))
    name = backup_now(config)
    damage(sandbox, redis_server)
    damaged = component_states(sandbox, redis_server)

    result = run_cli("restore", name, "--yes", config=config)

    assert result.returncode == 1
    assert result.stderr_lines == [
        f"sovbackupd: error: redis at {redis_server.url} is running: stop it first, or set "
        "restore.stop and restore.start in the policy (e.g. [systemctl, stop, redis-server]) "
        "so that restore stops and starts it"
    ]
    assert component_states(sandbox, redis_server) == damaged
    assert [path.name for path in sandbox.backup_dir.glob("*.tar.gz")] == [f"{name}.tar.gz"]
    dry = run_cli("restore", name, "--dry-run", config=config)
    assert dry.returncode == 1
    assert f"replace file {redis_server.rdb_path} with redis_dump.rdb" in dry.stdout
    assert dry.stderr_lines == result.stderr_lines


def test_restore_of_the_other_components_goes_ahead_while_redis_runs(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """--only sqlite,config,data needs no Redis stop: Redis keeps running, untouched."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, redis_server))
    before = component_states(sandbox, redis_server)
    name = backup_now(config)
    damage(sandbox, redis_server)
    damaged_keys = keys(redis_server)

    result = run_cli("restore", name, "--only", "sqlite,config,data", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert keys(redis_server) == damaged_keys
    assert rows(sandbox.database) == before["sqlite"]


def test_redis7_with_aof_comes_back_with_its_data(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_factory: Callable[..., RedisServer],
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """With appendonly yes and aof_dir set, the restored server loads the archived AOF."""
    server = redis_factory("--appendonly", "yes")
    server.client().mset({f"aof:{number}": str(number) for number in range(200)})
    data = policy_data(sandbox, server, restore=restart_commands(server, "--appendonly", "yes"))
    data["sources"]["redis"]["aof_dir"] = str(server.aof_dir)
    config = write_policy(tmp_path / "policy.yaml", data)
    before = keys(server)
    name = backup_now(config)
    server.client().flushall()
    server.client().set("after-backup", "1")

    result = run_cli("restore", name, "--only", "redis", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert keys(server) == before
    assert server.client().dbsize() == 200


def test_lone_rdb_restored_onto_an_aof_server_loads_instead_of_the_old_aof(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_factory: Callable[..., RedisServer],
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """A backup without AOF restored to a server with appendonly yes comes up with its data.

    Redis 7 would load its old AOF (or start empty) and ignore a restored dump.rdb; restore
    makes an AOF directory whose base is the restored RDB.
    """
    server = redis_factory("--appendonly", "yes")
    server.client().mset({f"rdb:{number}": str(number) for number in range(50)})
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, server, restore=restart_commands(server, "--appendonly", "yes")),
    )
    before = keys(server)
    name = backup_now(config)
    server.client().flushall()

    dry = run_cli("restore", name, "--only", "redis", "--dry-run", config=config)
    result = run_cli("restore", name, "--only", "redis", "--yes", config=config)

    assert f"replace directory {server.aof_dir} with appendonlydir (made from" in dry.stdout
    assert result.returncode == 0, result.stderr
    assert keys(server) == before


def test_safety_backup_restores_the_state_before_the_restore(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """The pre-restore backup, restored in turn, gives back exactly what the restore replaced."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore=restart_commands(redis_server)),
    )
    name = backup_now(config)
    damage(sandbox, redis_server)
    damaged = component_states(sandbox, redis_server)

    result = run_cli("restore", name, "--yes", config=config)
    assert result.returncode == 0, result.stderr
    safety = result.stdout.split("safety backup of what was replaced: ")[1].split()[0]
    listed = json.loads(run_cli("list", "--json", config=config).stdout)
    entry = next(row for row in listed if row["name"] == safety)
    assert entry["tiers"] == ["pre-restore"]
    assert entry["kept_by"] == ["pre-restore safety backup, within 7d"]

    undo = run_cli("restore", safety, "--yes", "--no-safety-backup", config=config)

    assert undo.returncode == 0, undo.stderr
    after = component_states(sandbox, redis_server)
    assert after["sqlite"] == damaged["sqlite"]
    assert after["redis"] == damaged["redis"]
    assert_same_tree(after["config"], damaged["config"])  # type: ignore[arg-type]  # TreeState
    assert_same_tree(after["data"], damaged["data"])  # type: ignore[arg-type]  # TreeState


def test_dry_run_prints_the_runbook_and_changes_nothing(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """--dry-run lists verify, staging, safety backup, stop, each replace, start; no change."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore=restart_commands(redis_server)),
    )
    name = backup_now(config)
    damage(sandbox, redis_server)
    damaged = component_states(sandbox, redis_server)
    stored = sorted(path.name for path in sandbox.backup_dir.iterdir())

    result = run_cli("restore", name, "--dry-run", config=config)

    assert result.returncode == 0, result.stderr
    steps = result.stdout.splitlines()[1:]
    assert steps[0].endswith(f"verify {name}.tar.gz against {name}.tar.gz.sha256 (sha256)")
    assert "safety backup labelled pre-restore" in steps[2]
    assert "run restore.stop:" in steps[3]
    assert any(f"replace file {redis_server.rdb_path} with redis_dump.rdb" in s for s in steps)
    assert any(f"replace directory {sandbox.app / 'data'} with data" in s for s in steps)
    assert any(f"{sandbox.database}-wal" in s for s in steps)
    assert "run restore.start:" in steps[-2]
    assert component_states(sandbox, redis_server) == damaged
    assert sorted(path.name for path in sandbox.backup_dir.iterdir()) == stored


def test_live_restore_without_yes_is_refused_off_a_terminal(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Scripts must say --yes: without it, nothing live is replaced."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config)
    damage(sandbox, None)
    damaged = component_states(sandbox, None)

    result = run_cli("restore", name, config=config)

    assert result.returncode == 1
    assert "pass --yes to confirm" in result.stderr
    assert component_states(sandbox, None) == damaged


def test_sqlite_restore_removes_stale_wal_and_shm(tmp_path: Path, sandbox: Sandbox) -> None:
    """A -wal left by the damaged database is not replayed onto the restored one."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config)
    writer = sqlite3.connect(sandbox.database)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("DELETE FROM entries")
    writer.commit()
    wal = sandbox.database.with_name(sandbox.database.name + "-wal")
    stale = wal.read_bytes()
    assert stale
    writer.close()  # the last close checkpoints and removes the -wal: put the stale one back
    wal.write_bytes(stale)

    result = run_cli("restore", name, "--only", "sqlite", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert not wal.exists()
    assert rows(sandbox.database) == {"entries": 500, "odd name": 1}


def test_files_the_excludes_leave_out_survive_a_data_restore(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A data dir is swapped whole, but excluded files (in no backup) are carried over."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config)
    cache = sandbox.app / "data" / "nested" / "cache.tmp"
    cache.write_text("made after the backup, excluded")
    (sandbox.app / "data" / "notes.txt").unlink()

    result = run_cli("restore", name, "--only", "data", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert cache.read_text() == "made after the backup, excluded"
    assert (sandbox.app / "data" / "scratch.tmp").read_text() == "excluded"
    assert (sandbox.app / "data" / "notes.txt").exists()


def test_symlinked_config_file_and_data_dir_keep_their_links(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A .env or data dir that is a symlink stays one; what it points to is restored."""
    elsewhere = tmp_path / "mnt" / "data"
    elsewhere.parent.mkdir()
    (sandbox.app / "data").rename(elsewhere)
    (sandbox.app / "data").symlink_to(elsewhere)
    secrets = tmp_path / "secrets.env"
    (sandbox.app / ".env").rename(secrets)
    (sandbox.app / ".env").symlink_to(secrets)
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config)
    secrets.write_text("SECRET_KEY=wrong\n")
    (elsewhere / "notes.txt").unlink()

    result = run_cli("restore", name, "--only", "config,data", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert (sandbox.app / ".env").is_symlink()
    assert (sandbox.app / "data").is_symlink()
    assert secrets.read_text() == "SECRET_KEY=abc\nREDIS_URL=redis://localhost\n"
    assert (elsewhere / "notes.txt").read_text() == "hello\n" * 1000


def test_restore_killed_mid_extraction_leaves_live_data_alone_and_the_next_one_cleans_up(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Killed while staging: the live tree is untouched; the next restore succeeds, clean."""
    big = sandbox.app / "data" / "big"
    big.mkdir()
    for number in range(40):
        (big / f"{number}.bin").write_bytes(os.urandom(2 << 20))
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config)
    (sandbox.app / "data" / "notes.txt").write_text("changed after the backup\n")
    damaged = tree_state(sandbox.root, live_paths(sandbox))
    staging = sandbox.app / f".sovbackupd-restore-{name}"

    process = subprocess.Popen(
        [sys.executable, "-m", "sovbackupd", "--config", str(config), "restore", name,
         "--yes", "--no-safety-backup"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(staging.rglob("*.bin")) and time.monotonic() < deadline:
        assert process.poll() is None, "the restore finished before it could be killed"
        time.sleep(0.005)
    process.kill()
    process.wait()

    assert tree_state(sandbox.root, live_paths(sandbox)) == damaged
    again = run_cli("restore", name, "--yes", "--no-safety-backup", config=config)
    assert again.returncode == 0, again.stderr
    assert (sandbox.app / "data" / "notes.txt").read_text() == "hello\n" * 1000
    assert list(sandbox.root.rglob(".sovbackupd-restore-*")) == []


def test_failing_start_command_says_the_data_is_restored_and_names_the_command(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A restore.start failing after the swap: data restored, one line naming it, exit 69."""
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, None, restore={"start": [failing, ["true"], ["true"]]}),
    )
    before = tree_state(sandbox.root, live_paths(sandbox))
    name = backup_now(config)
    damage(sandbox, None)

    result = run_cli("restore", name, "--yes", "--no-safety-backup", config=config)

    assert result.returncode == ExitCode.NOT_STARTED
    assert result.stdout.startswith(f"restored {name}: ")
    assert result.stderr_lines == [
        f"sovbackupd: {name} is restored, but restore.start command '{' '.join(failing)}' "
        "failed (exited 3); 2 later start commands did not run: start the services by hand"
    ]
    assert_same_tree(tree_state(sandbox.root, live_paths(sandbox)), before)


def test_dry_run_of_a_single_file_says_file_not_files(tmp_path: Path, sandbox: Sandbox) -> None:
    """Counts of one read in the singular: "extract 1 file", "restored ...: 1 file"."""
    (sandbox.app / "redis.conf").unlink()
    data = policy_data(sandbox, None)
    data["sources"]["config"] = [str(sandbox.app / ".env")]
    config = write_policy(tmp_path / "policy.yaml", data)
    name = backup_now(config)

    planned = run_cli("restore", name, "--only", "config", "--dry-run", config=config)
    restored = run_cli(
        "restore", name, "--only", "config", "--to", str(tmp_path / "to"), config=config
    )

    assert planned.returncode == 0, planned.stderr
    assert any(" extract 1 file (" in line for line in planned.stdout.splitlines())
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"restored {name}: 1 file, ")
