"""The guide's manual recovery, run as written against a real archive, brings back everything."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import (
    RedisServer,
    Sandbox,
    policy_data,
    require_tool,
    run_cli,
    write_policy,
)

GUIDE = Path(__file__).parents[2] / "docs" / "restore.md"
SECTION = "## Manual recovery still works"
# Commands that need the real system; the shims log their arguments and succeed.
SHIMS = {
    "sudo": 'exec "$@"',
    "systemctl": 'echo "systemctl $*" >> "$SHIM_LOG"',
    "chown": 'echo "chown $*" >> "$SHIM_LOG"',
}


def guide_commands() -> str:
    """Return the bash block of the guide's manual recovery section."""
    text = GUIDE.read_text()
    section = text[text.index(SECTION) :]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"{GUIDE.name} has no bash block under {SECTION!r}"
    return match.group(1)


def install_shims(directory: Path) -> None:
    directory.mkdir()
    for name, body in SHIMS.items():
        shim = directory / name
        shim.write_text(f"#!/bin/sh\n{body}\n")
        shim.chmod(0o755)


def test_guide_manual_recovery_restores_dotfiles_and_every_component(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """Every cp of the guide's block, run by bash, brings back .env, the RDB, db and dirs."""
    require_tool("bash")
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, redis_server))
    made = run_cli("backup", config=config)
    assert made.returncode == 0, made.stderr
    name = made.stdout.split()[0]

    live = tmp_path / "live"
    # The guide's paths, and a stand-in for each under the test's temp dir.
    stand_ins = {
        "/var/backups/sovereigncore": sandbox.backup_dir,
        "/opt/sovereigncore": live / "app",
        "/var/lib/redis": live / "redis",
        "/var/tmp": tmp_path / "scratch",
    }
    for directory in stand_ins.values():
        directory.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "mcp_data", "memory"):
        (live / "app" / sub).mkdir()
    script = guide_commands().replace("sovereigncore_backup_TIMESTAMP", name)
    for path, stand_in in stand_ins.items():
        script = script.replace(path, str(stand_in))
    assert "cp " in script
    install_shims(tmp_path / "bin")
    environment = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "SHIM_LOG": str(tmp_path / "shim.log"),
    }
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], check=True, env=environment, cwd=tmp_path
    )

    app = live / "app"
    assert (app / ".env").read_bytes() == (sandbox.app / ".env").read_bytes()
    assert (app / ".env").stat().st_mode & 0o777 == 0o600
    assert (app / "redis.conf").read_bytes() == (sandbox.app / "redis.conf").read_bytes()
    assert (live / "redis" / "dump.rdb").read_bytes()[:5] == b"REDIS"
    assert (app / "sovereign_rekor.db").read_bytes()[:16] == b"SQLite format 3\0"
    blob = Path("data") / "nested" / "deeper" / "blob.bin"
    assert (app / blob).read_bytes() == (sandbox.app / blob).read_bytes()
    assert (app / "mcp_data" / "state.json").read_text() == '{"a": 1}'
    assert (app / "memory" / "memory.md").read_text() == "# remembered\n"
    info = (stand_ins["/var/tmp"] / name / "backup_info.txt").read_text()
    assert f"cp -a {name}/config/. " in info, "the archive's own guide copies dotfiles too"
    log = (tmp_path / "shim.log").read_text()
    assert "systemctl stop" in log
    assert "systemctl start" in log
