"""restore.stop/start by component, with a real redis-server: only what is restored is stopped.

The stop command of Redis here does not save (`shutdown nosave`, as `kill -9` or a unit
without a save on stop would): a restore that stopped Redis needlessly loses every key
written since its last save.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import RedisServer, Sandbox, policy_data, require_tool, run_cli, write_policy
from tests.integration.test_restore import backup_now, restart_commands, rows

# A fixture of test_restore.py, requested by name below.
__all__ = ["restart_commands"]

RECORD = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


def recorder(log: Path, what: str) -> list[str]:
    """Return the argv of a command that appends *what* to *log*: a service's stand-in."""
    return [sys.executable, "-c", RECORD, str(log), what]


def nosave_stop(server: RedisServer) -> list[str]:
    return [require_tool("redis-cli"), "-p", str(server.port), "shutdown", "nosave"]


def run_id(server: RedisServer) -> str:
    """Return the id of the running redis-server process: a restarted one has a new id."""
    return str(server.client().info("server")["run_id"])


def damage_database(database: Path) -> None:
    connection = sqlite3.connect(database)
    connection.execute("DELETE FROM entries")
    connection.commit()
    connection.close()


def test_only_sqlite_with_a_mapping_leaves_redis_running_and_its_new_keys_alone(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """--only sqlite runs sqlite's stop/start only: the same Redis process keeps every key."""
    log = tmp_path / "services.log"
    restart = restart_commands(redis_server)
    stop = {"redis": [nosave_stop(redis_server)], "sqlite": [recorder(log, "stop app")]}
    start = {"redis": restart["start"], "sqlite": [recorder(log, "start app")]}
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore={"stop": stop, "start": start}),
    )
    name = backup_now(config)
    before = run_id(redis_server)
    redis_server.client().set("written-after-the-backup", "kept")
    damage_database(sandbox.database)

    result = run_cli("restore", name, "--only", "sqlite", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert rows(sandbox.database) == {"entries": 500, "odd name": 1}
    assert log.read_text().splitlines() == ["stop app", "start app"]
    assert run_id(redis_server) == before
    assert redis_server.client().get("written-after-the-backup") == b"kept"
    redis_server.client().set("written-after-the-restore", "kept")
    assert redis_server.client().get("written-after-the-restore") == b"kept"


def test_a_full_restore_with_a_mapping_stops_the_app_once_then_redis_and_starts_in_reverse(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """The app's command, given for sqlite, config and data, runs once; Redis stops last."""
    log = tmp_path / "services.log"
    restart = restart_commands(redis_server)
    app = ("sqlite", "config", "data")
    stop = {
        "redis": [recorder(log, "stop redis"), *restart["stop"]],
        **{component: [recorder(log, "stop app")] for component in app},
    }
    start = {
        "redis": [recorder(log, "start redis"), *restart["start"]],
        **{component: [recorder(log, "start app")] for component in app},
    }
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore={"stop": stop, "start": start}),
    )
    name = backup_now(config)
    redis_server.client().flushall()
    damage_database(sandbox.database)

    dry = run_cli("restore", name, "--dry-run", config=config)
    result = run_cli("restore", name, "--yes", "--no-safety-backup", config=config)

    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["stop app", "stop redis", "start redis", "start app"]
    assert redis_server.client().get("key:1") == b"value 1"
    assert rows(sandbox.database) == {"entries": 500, "odd name": 1}
    steps = [line.split(". ", 1)[1] for line in dry.stdout.splitlines()[1:]]
    assert [step for step in steps if step.startswith("run restore.")] == [
        f"run restore.stop: {' '.join(stop['data'][0])}",
        *(f"run restore.stop: {' '.join(argv)}" for argv in stop["redis"]),
        *(f"run restore.start: {' '.join(argv)}" for argv in start["redis"]),
        f"run restore.start: {' '.join(start['data'][0])}",
    ]


def test_the_list_form_still_stops_and_starts_everything_for_an_only_sqlite_restore(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
) -> None:
    """A list of commands keeps its meaning: all of them, in order, around any live restore."""
    log = tmp_path / "services.log"
    restart = restart_commands(redis_server)
    stop = [recorder(log, "stop app"), *restart["stop"]]
    start = [*restart["start"], recorder(log, "start app")]
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore={"stop": stop, "start": start}),
    )
    name = backup_now(config)
    before = run_id(redis_server)
    damage_database(sandbox.database)

    result = run_cli("restore", name, "--only", "sqlite", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["stop app", "start app"]
    assert run_id(redis_server) != before
    assert rows(sandbox.database) == {"entries": 500, "odd name": 1}


def test_restoring_redis_with_a_mapping_that_cannot_stop_it_is_refused(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """Redis restored while it runs and the mapping has no redis command: refused, untouched."""
    log = tmp_path / "services.log"
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, restore={"stop": {"sqlite": [recorder(log, "x")]}}),
    )
    name = backup_now(config)
    redis_server.client().set("written-after-the-backup", "kept")

    result = run_cli("restore", name, "--only", "redis", "--yes", config=config)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"sovbackupd: error: redis at {redis_server.url} is running: stop it first, or set "
        "restore.stop.redis and restore.start.redis in the policy (e.g. [systemctl, stop, "
        "redis-server]) so that restore stops and starts it"
    ]
    assert not log.exists()
    assert redis_server.client().get("written-after-the-backup") == b"kept"
