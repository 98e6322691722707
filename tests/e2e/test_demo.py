"""The README's first command: the demo backs up a sandbox server with the example policy."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import run_cli


def test_demo_backs_up_and_verifies_a_sandbox_server(tmp_path: Path) -> None:
    """The demo lays out a server, backs it up, verifies it, and leaves a usable policy."""
    result = run_cli("demo", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "verified every member against the manifest" in result.stdout
    policy = tmp_path / "policy.yaml"
    listed = run_cli("list", "--json", config=policy)
    assert listed.returncode == 0, listed.stderr
    archives = list((tmp_path / "var" / "backups" / "sovereigncore").glob("*.tar.gz"))
    assert len(archives) == 1
    listing = subprocess.run(
        ["tar", "-tzf", str(archives[0])], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    name = archives[0].name.removesuffix(".tar.gz")
    assert f"{name}/redis_dump.rdb" in listing
    assert f"{name}/config/.env" in listing
    assert not any(line.endswith(".tmp") for line in listing)
    assert run_cli("verify", "--deep", "--latest", config=policy).returncode == 0
