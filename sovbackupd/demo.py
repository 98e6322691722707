"""``sovbackupd demo``: the shipped example policy, run against a sandbox server.

It lays out a small SovereignCore server under a directory (a redis-server with data, a
WAL SQLite database, .env and redis.conf, the three data directories), re-roots the
example policy onto it, and runs the real commands on it: backup, verify, list.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sovbackupd import backup, redis_server, verify
from sovbackupd.config import reference, render
from sovbackupd.config.models import Policy
from sovbackupd.errors import SovbackupdError
from sovbackupd.store import Store, human_size


@contextmanager
def _redis_server(directory: Path) -> Iterator[int]:
    """Run a throwaway redis-server with RDB persistence and some keys; yield its port."""
    server = redis_server.start(directory, "--save", "3600 1")
    try:
        client = server.client()
        client.mset({f"session:{number}": f"user {number}" for number in range(1000)})
        client.hset("config:features", mapping={"mcp": "on", "memory": "on"})
        yield server.port
    finally:
        server.stop()


def _lay_out(root: Path) -> None:
    app = root / "opt" / "sovereigncore"
    for directory in (app / "data" / "uploads", app / "mcp_data", app / "memory"):
        directory.mkdir(parents=True, exist_ok=True)
    (app / ".env").write_text("SOVEREIGN_SECRET=demo-only\nREDIS_URL=redis://127.0.0.1\n")
    (app / ".env").chmod(0o600)
    (app / "redis.conf").write_text("save 3600 1\ndir /var/lib/redis\n")
    (app / "users.acl").write_text("user backup on +bgsave +lastsave +info +ping\n")
    for number in range(200):
        (app / "data" / "uploads" / f"document-{number:03}.json").write_text(
            f'{{"id": {number}, "body": "{"lorem ipsum " * 40}"}}\n'
        )
    (app / "data" / "model.bin").write_bytes(os.urandom(2 << 20))
    (app / "mcp_data" / "tools.json").write_text('{"tools": ["search", "fetch"]}\n')
    (app / "memory" / "notes.md").write_text("# What the assistant remembers\n")
    (app / "memory" / "draft.tmp").write_text("excluded by the policy's *.tmp\n")
    database = sqlite3.connect(app / "sovereign_rekor.db")
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, body TEXT)")
    database.executemany(
        "INSERT INTO entries (body) VALUES (?)", [(f"entry {n}",) for n in range(5000)]
    )
    database.commit()
    database.close()


def _rerooted(root: Path, port: int) -> Policy:
    """Return the example policy with every path moved under *root*."""

    def move(value: Any) -> Any:  # noqa: ANN401 (walks the policy's JSON form)
        if isinstance(value, str) and value.startswith("/"):
            return str(root) + value
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        if isinstance(value, list):
            return [move(item) for item in value]
        return value

    data = move(reference.EXAMPLE.model_dump(mode="json"))
    data["sources"]["redis"].update(
        url=f"redis://127.0.0.1:{port}/0", username=None, password_file=None
    )
    data["notify"] = []  # the example's ping URLs are placeholders
    return Policy.model_validate(data)


def run(root: Path, say: Any) -> None:  # noqa: ANN401 (a print-like callable)
    """Lay out a sandbox server under *root*, back it up and verify it, narrating with *say*."""
    root.mkdir(parents=True, exist_ok=True)
    _lay_out(root)
    redis_dir = root / "var" / "lib" / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    with _redis_server(redis_dir) as port:
        policy = _rerooted(root, port)
        say(f"sandbox server under {root} (redis-server on 127.0.0.1:{port})")
        say(f"policy: the shipped example, re-rooted under {root}")
        result = backup.run(policy, ["daily"])
    say(f"backup {result.name}: {human_size(result.size)} in {result.duration_seconds:.2f}s")
    for warning in result.warnings:
        say(f"  warning: {warning}")
    stored = Store(policy.backup_dir, policy.name_prefix).find(result.name)
    verdict = verify.check(stored, deep=True)
    if not verdict.ok:
        raise SovbackupdError(f"demo backup failed verification: {verdict.problem}")
    say(f"verified every member against the manifest: {result.path}")
    say("try the seed's manual commands on it:")
    say(f"  tar -tzf {result.path}")
    say(f"  sovbackupd --config {root}/policy.yaml list")
    (root / "policy.yaml").write_text(render(policy))
