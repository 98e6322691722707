"""The README's first command: the daemon on the example policy against a sandbox."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli


def test_demo_runs_the_daemon_and_leaves_verified_backups(tmp_path: Path) -> None:
    """The demo lays out a server, runs the daemon a while, and its backups verify."""
    result = run_cli("demo", "--dir", str(tmp_path), "--seconds", "12", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "each verified member by member" in result.stdout
    for check in ("archive", "sqlite sovereign_rekor.db", "redis rdb"):
        assert f"test restore: ok {check}: " in result.stdout, result.stdout
    assert "/metrics" in result.stdout
    landed = [
        json.loads(line)
        for line in result.stdout.splitlines()
        if line.startswith("{") and '"backup.finished"' in line
    ]
    assert landed, "backups are shown as they land"
    assert all(event["result"] == "success" for event in landed)
    assert all(event["warnings"] == 0 for event in landed), "the sandbox has every file named"
    policy = tmp_path / "policy.yaml"
    rows = json.loads(run_cli("list", "--json", config=policy).stdout)
    # Retention runs after each backup: within one hour the example policy keeps the
    # newest and the oldest backup of the hour, so a middle one may already be pruned.
    assert rows
    assert {row["name"] for row in rows} <= {event["backup"] for event in landed}
    assert rows[0]["name"] == landed[-1]["backup"]
    archive = Path(rows[0]["path"])
    listing = subprocess.run(
        ["tar", "-tzf", str(archive)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert f"{rows[0]['name']}/redis_dump.rdb" in listing
    assert not any(line.endswith(".tmp") for line in listing)
    assert run_cli("verify", "--deep", "--all", config=policy).returncode == 0
    started = re.search(r"redis-server on 127\.0\.0\.1:(\d+)", result.stdout)
    assert started is not None, result.stdout
    port = int(started[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_demo_on_a_terminal_shows_short_lines_with_the_sandbox_abbreviated(tmp_path: Path) -> None:
    """--log-format console (a terminal's default) writes no JSON and says $SANDBOX for paths."""
    result = run_cli(
        "--log-format", "console", "demo", "--dir", str(tmp_path), "--seconds", "4", timeout=120
    )
    assert result.returncode == 0, result.stderr
    log_lines = [line for line in result.stdout.splitlines() if " [info" in line]
    assert any("backup.finished" in line for line in log_lines), result.stdout
    assert not any(line.startswith("{") for line in result.stdout.splitlines())
    assert all(str(tmp_path) not in line for line in log_lines)
    assert any("$SANDBOX/" in line for line in log_lines)
