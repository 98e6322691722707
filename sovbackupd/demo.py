"""``sovbackupd demo``: the daemon on the shipped example policy, against a sandbox.

It lays out a small SovereignCore server under a directory (a redis-server child with
data, a WAL SQLite database, .env and redis.conf, the three data directories), re-roots
the example policy onto it with tiers every few seconds, and runs the real daemon in the
foreground until Ctrl-C, then verifies every backup it made.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from sovbackupd import auth, daemon, redis_server, restore, verify
from sovbackupd.config import reference, render
from sovbackupd.config.models import Policy
from sovbackupd.errors import SovbackupdError
from sovbackupd.store import Store
from sovbackupd.wording import plural


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


DEMO_CONFIG_FILES = {
    "prometheus.yml": "scrape_configs: [{job_name: sovereigncore}]\n",
    "alertmanager.yml": "route: {receiver: ops}\nreceivers: [{name: ops}]\n",
    "alerts.yml": "groups: []\n",
    "docker-compose.yml": "services: {}\n",
    "gunicorn.conf.py": "workers = 2\n",
}


def _lay_out(root: Path) -> None:
    app = root / "opt" / "sovereigncore"
    for directory in (app / "data" / "uploads", app / "mcp_data", app / "memory"):
        directory.mkdir(parents=True, exist_ok=True)
    (app / ".env").write_text("SOVEREIGN_SECRET=demo-only\nREDIS_URL=redis://127.0.0.1\n")
    (app / ".env").chmod(0o600)
    (app / "redis.conf").write_text("save 3600 1\ndir /var/lib/redis\n")
    (app / "users.acl").write_text("user backup on +bgsave +lastsave +info +ping\n")
    # Every config file the example names exists here, so no backup warns of a missing one.
    for name, text in DEMO_CONFIG_FILES.items():
        (app / name).write_text(text)
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


DEMO_SCHEDULES = {"hourly": "*/10 * * * * *", "daily": "*/30 * * * * *"}


def _rerooted(root: Path, port: int | None) -> Policy:
    """Return the example policy moved under *root*, on a schedule of seconds."""

    def move(value: Any) -> Any:  # noqa: ANN401 (walks the policy's JSON form)
        if isinstance(value, str) and value.startswith("/"):
            return str(root) + value
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        if isinstance(value, list):
            return [move(item) for item in value]
        return value

    data = move(reference.EXAMPLE.model_dump(mode="json"))
    if port is None:
        data["sources"]["redis"] = None
    else:
        data["sources"]["redis"].update(
            url=f"redis://127.0.0.1:{port}/0", username=None, password_file=None
        )
    data["notify"] = []  # the example's ping URLs are placeholders
    data["remotes"] = []  # so is its backup server
    data["tiers"] = {
        tier: {"schedule": DEMO_SCHEDULES.get(tier), "keep": settings["keep"]}
        for tier, settings in data["tiers"].items()
        if settings is not None
    }
    data["metrics"] = {"listen": f"127.0.0.1:{redis_server.free_port()}"}
    data["daemon"]["shutdown_grace_seconds"] = 30
    return Policy.model_validate(data)


def run(root: Path, say: Callable[[str], None], seconds: float | None) -> int:
    """Lay out a sandbox server under *root* and run the daemon on it.

    Run for *seconds*, or until Ctrl-C; then verify every backup it made and return the
    daemon's exit code. Every child (redis-server) is stopped on the way out.
    """
    root.mkdir(parents=True, exist_ok=True)
    _lay_out(root)
    redis_dir = root / "var" / "lib" / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        port = None
        if shutil.which("redis-server") is not None:
            port = stack.enter_context(_redis_server(redis_dir))
        policy = _rerooted(root, port)
        # The key's StateDirectory, as systemd would create it for the service.
        policy.authentication.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        policy_path = root / "policy.yaml"
        policy_path.write_text(render(policy))
        say(f"sandbox server under {root} ($SANDBOX in log lines on a terminal)")
        say(f"redis-server on 127.0.0.1:{port}" if port else "no redis-server: Redis left out")
        say(f"policy {policy_path}: the shipped example, tiers every few seconds")
        say(f"metrics: http://{policy.metrics.listen}/metrics")
        say("backups land below; stop with Ctrl-C" if seconds is None else f"running {seconds:g}s")
        if seconds is not None:
            timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()
            stack.callback(timer.cancel)
        code = daemon.Daemon(policy_path, policy, CollectorRegistry()).serve()
    stored = Store(policy.backup_dir, policy.name_prefix).backups()
    key = auth.policy_key(policy)
    for item in stored:
        verdict = verify.check(item, deep=True, key=key)
        if not verdict.ok:
            raise SovbackupdError(f"demo backup failed verification: {verdict.problem}")
    say(f"{plural(len(stored), 'backup')} in {policy.backup_dir}, each verified member by member")
    if stored:
        drilled = restore.drill(policy)
        for check in drilled.checks:
            say(f"test restore: {'ok' if check.ok else 'FAILED'} {check.what}: {check.detail}")
        if not drilled.ok:
            raise SovbackupdError(f"demo backup {drilled.name} failed its test restore")
    say(f"try: sovbackupd --config {policy_path} list")
    return code
