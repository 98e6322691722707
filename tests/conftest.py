"""Fixtures that start real services: redis-server per test, SQLite files, a sandbox tree."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from sovbackupd import archive, auth, fsat, tierstate
from sovbackupd import redis_server as redis_process
from sovbackupd.errors import SovbackupdError


def require_tool(name: str) -> str:
    """Return the path of *name*; a missing tool fails the test (CI must install it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run the README's test command to install it")
    return path


RedisServer = redis_process.RedisProcess
free_port = redis_process.free_port


def start_redis(directory: Path, *extra: str, password: str | None = None) -> RedisServer:
    """Start redis-server in *directory* on a free port, RDB persistence on."""
    require_tool("redis-server")
    try:
        return redis_process.start(directory, "--save", "3600 1", *extra, password=password)
    except SovbackupdError as error:
        log = (directory / "redis.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"{error}: {log}")


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers for this test; stop them all afterwards."""
    started: list[RedisServer] = []

    def factory(*extra: str, name: str = "redis", password: str | None = None) -> RedisServer:
        server = start_redis(tmp_path / name, *extra, password=password)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A redis-server with RDB persistence on and a few keys in two databases."""
    server = redis_factory()
    client = server.client()
    client.mset({f"key:{number}": f"value {number}" for number in range(100)})
    client.hset("hash", mapping={"a": "1", "b": "2"})
    client.set("expiring", "soon", ex=3600)
    server.client(db=3).set("other-db", "x")
    return server


@dataclass
class Sandbox:
    """A SovereignCore server laid out under one temp dir."""

    root: Path
    app: Path
    backup_dir: Path
    database: Path

    @property
    def config_files(self) -> list[Path]:
        return [self.app / ".env", self.app / "redis.conf"]

    @property
    def data_dirs(self) -> list[Path]:
        return [self.app / "data", self.app / "mcp_data", self.app / "memory"]


def make_database(path: Path, rows: int = 500) -> None:
    """Create a WAL-mode SQLite database with two tables."""
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, body TEXT)")
    connection.execute("CREATE TABLE 'odd name' (x)")
    connection.executemany(
        "INSERT INTO entries (body) VALUES (?)", [(f"entry {n} " * 5,) for n in range(rows)]
    )
    connection.execute("INSERT INTO 'odd name' VALUES (1)")
    connection.commit()
    connection.close()


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    """An /opt/sovereigncore look-alike: .env, redis.conf, a WAL database, three data dirs."""
    app = tmp_path / "opt" / "sovereigncore"
    (app / "data" / "nested" / "deeper").mkdir(parents=True)
    (app / "mcp_data").mkdir()
    (app / "memory").mkdir()
    (app / ".env").write_text("SECRET_KEY=abc\nREDIS_URL=redis://localhost\n")
    (app / ".env").chmod(0o600)
    (app / "redis.conf").write_text("port 6379\nsave 3600 1\n")
    (app / "data" / "nested" / "deeper" / "blob.bin").write_bytes(os.urandom(300_000))
    (app / "data" / "notes.txt").write_text("hello\n" * 1000)
    (app / "data" / "scratch.tmp").write_text("excluded")
    (app / "data" / "link-to-notes").symlink_to("notes.txt")
    (app / "mcp_data" / "state.json").write_text('{"a": 1}')
    (app / "memory" / "memory.md").write_text("# remembered\n")
    os.utime(app / "data" / "notes.txt", (1_600_000_000.5, 1_600_000_000.5))
    database = app / "sovereign_rekor.db"
    make_database(database)
    backup_dir = tmp_path / "backups"
    return Sandbox(tmp_path, app, backup_dir, database)


def key_file(root: Path) -> Path:
    """Return the authentication key file of a test's policy: in its temp dir, never /var/lib."""
    return root / "auth.key"


def resign(archive_path: Path, root: Path) -> None:
    """Sign the backup at *archive_path* again with the key of the test under *root*.

    For tests that rewrite a backup as the key's holder could, to reach the checks that
    stand behind authentication (a tampered stream, a hostile member).
    """
    record = json.loads(archive.auth_path(archive_path).read_text())
    key = auth.load_key(key_file(root))
    assert key is not None, "the test's first backup creates the key"
    created = datetime.fromisoformat(record["created"])
    auth.write(archive_path, record["backup"], created, record["tiers"], key)


def policy_data(
    sandbox: Sandbox, redis_server: RedisServer | None, **overrides: Any
) -> dict[str, Any]:
    """Return a policy for *sandbox* (and *redis_server*), with top-level *overrides*."""
    sources: dict[str, Any] = {
        "sqlite": [str(sandbox.database)],
        "config": [str(path) for path in sandbox.config_files],
        "dirs": [str(path) for path in sandbox.data_dirs],
        "exclude": ["*.tmp"],
    }
    if redis_server is not None:
        sources["redis"] = {"url": redis_server.url, "rdb_path": str(redis_server.rdb_path)}
    data: dict[str, Any] = {
        "backup_dir": str(sandbox.backup_dir),
        "sources": sources,
        "tiers": {"daily": {"schedule": "0 2 * * *", "keep": 30}},
        "authentication": {"key_file": str(key_file(sandbox.root))},
    }
    data.update(overrides)
    return data


def write_policy(path: Path, data: dict[str, Any]) -> Path:
    """Write *data* as a YAML policy file at *path*."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass(frozen=True)
class CliResult:
    """What one run of the sovbackupd command printed and returned."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(
    *arguments: str,
    config: Path | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run ``python -m sovbackupd`` as a separate process, as an operator would."""
    argv = [sys.executable, "-m", "sovbackupd"]
    if config is not None:
        argv += ["--config", str(config)]
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in {"BACKUP_DIR", "RETENTION_DAYS", "REMOTE_BACKUP_PATH", "SOVBACKUPD_CONFIG"}
    }
    environment.update(env or {})
    completed = subprocess.run(
        [*argv, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        check=False,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def stored_files(name: str) -> set[str]:
    """Return the files one committed gzip backup *name* consists of."""
    return {
        f"{name}.tar.gz",
        f"{name}.tar.gz.sha256",
        f"{name}.manifest.json",
        f"{name}.auth.json",
    }


def backup_files(backup_dir: Path) -> set[str]:
    """Return the names in *backup_dir*, without the lock file and the tiers' state file.

    The state file's own temp name is left out too: it exists for the instant of a write,
    and the next write replaces it.
    """
    if not backup_dir.exists():
        return set()
    state = tierstate.STATE_NAME
    bookkeeping = {".sovbackupd.lock", state, f"{state}{fsat.PARTIAL_SUFFIX}"}
    return {entry.name for entry in backup_dir.iterdir() if entry.name not in bookkeeping}


@dataclass
class SqliteLock:
    """Another process holding an EXCLUSIVE transaction on a rollback-journal database."""

    process: subprocess.Popen[str]

    def release(self) -> None:
        """End the transaction and let the process exit."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(30)


LOCKER_SCRIPT = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
connection.execute("ROLLBACK")
"""


@pytest.fixture
def lock_sqlite() -> Iterator[Callable[[Path], SqliteLock]]:
    """Hold a database EXCLUSIVE from another process, so a backup waits inside SQLite."""
    locks: list[SqliteLock] = []

    def lock(database: Path) -> SqliteLock:
        # In WAL mode an EXCLUSIVE transaction does not block readers; in rollback mode it does.
        connection = sqlite3.connect(database)
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.close()
        process = subprocess.Popen(
            [sys.executable, "-c", LOCKER_SCRIPT, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        held = SqliteLock(process)
        locks.append(held)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "locked"
        return held

    yield lock
    for held in locks:
        held.release()
