"""SIGTERM during a backup unwinds it: no archive, no temp file, a clear line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Sandbox, backup_files, policy_data, write_policy

BIG_FILES = 4
BIG_FILE_BYTES = 64 << 20
STARTED_BYTES = 8 << 20


def partial_bytes(backup_dir: Path) -> int:
    """Return the size of the archive being written, 0 before it exists."""
    partials = list(backup_dir.glob("*.partial")) if backup_dir.exists() else []
    return sum(path.stat().st_size for path in partials if path.exists())


@pytest.mark.slow
def test_sigterm_mid_backup_leaves_nothing_behind(tmp_path: Path, sandbox: Sandbox) -> None:
    """A SIGTERM while the archive is being written removes the partial file and exits 130."""
    big = sandbox.app / "data" / "big"
    big.mkdir()
    for number in range(BIG_FILES):
        with (big / f"blob-{number}.bin").open("wb") as handle:
            for _ in range(BIG_FILE_BYTES >> 20):
                handle.write(os.urandom(1 << 20))  # incompressible: the archive grows slowly
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, compression="zstd"))
    process = subprocess.Popen(
        [sys.executable, "-m", "sovbackupd", "--config", str(policy), "backup"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while partial_bytes(sandbox.backup_dir) < STARTED_BYTES:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stdout == ""
    assert [line for line in stderr.splitlines() if line] == [
        "sovbackupd: interrupted; nothing was left half-written"
    ]
    assert backup_files(sandbox.backup_dir) == set()
