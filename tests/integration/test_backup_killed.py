"""``kill -9`` in the middle of a large archive: nothing looks complete, the next run cleans up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sovbackupd import fsat
from sovbackupd.errors import ExitCode
from sovbackupd.store import STAGING_NAME
from tests.conftest import (
    RedisServer,
    Sandbox,
    backup_files,
    policy_data,
    run_cli,
    stored_files,
    write_policy,
)

MiB = 1 << 20
BIG_FILES = 8
BIG_FILE_BYTES = 40 * MiB  # 320 MiB of incompressible data in all
KILL_AFTER_BYTES = 32 * MiB
WAIT_SECONDS = 60.0
PARTIAL_NAME = re.compile(r"^sovereigncore_backup_\d{8}_\d{6}\.tar\.gz\.partial$")


def partial_size(backup_dir: Path) -> int:
    """Return the size of the ``*.partial`` archive in *backup_dir*, 0 while there is none."""
    for name in backup_files(backup_dir):
        if name.endswith(fsat.PARTIAL_SUFFIX):
            try:
                return (backup_dir / name).stat().st_size
            except FileNotFoundError:
                return 0
    return 0


@pytest.mark.slow
def test_backup_killed_mid_archive_leaves_temp_files_that_the_next_backup_removes(
    sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """A SIGKILLed backup leaves only .partial and .staging; the next one removes them."""
    big = sandbox.app / "data" / "big"
    big.mkdir()
    for number in range(BIG_FILES):
        (big / f"blob-{number}.bin").write_bytes(os.urandom(BIG_FILE_BYTES))
    policy = write_policy(sandbox.root / "policy.yaml", policy_data(sandbox, redis_server))
    process = subprocess.Popen(
        [sys.executable, "-m", "sovbackupd", "--config", str(policy), "backup"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while partial_size(sandbox.backup_dir) < KILL_AFTER_BYTES:
            assert process.poll() is None, (
                "the backup ended before the kill",
                process.communicate(),
            )
            assert time.monotonic() < deadline, "the partial archive did not grow"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=WAIT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == -signal.SIGKILL

    left = backup_files(sandbox.backup_dir)
    (partial,) = [name for name in left if name.endswith(fsat.PARTIAL_SUFFIX)]
    assert PARTIAL_NAME.match(partial), partial
    assert left == {partial, STAGING_NAME}, "a file appeared under a final name"
    listed = run_cli("list", "--json", config=policy)
    assert listed.returncode == ExitCode.OK, listed.stderr
    assert listed.stdout.strip() == "[]"

    result = run_cli("backup", config=policy)

    assert result.returncode == ExitCode.OK, result.stderr
    assert result.stderr_lines == []
    name = result.stdout.strip()
    assert backup_files(sandbox.backup_dir) == stored_files(name)
    verified = run_cli("verify", "--deep", name, config=policy)
    assert verified.returncode == ExitCode.OK, verified.stderr
    assert verified.stdout.strip() == f"{name}: ok (deep, authenticated)"
