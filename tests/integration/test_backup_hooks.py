"""Hooks run around every backup, whoever starts it; a failing before_backup hook stops it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import Sandbox, backup_files, policy_data, run_cli, write_policy

DUMP_ENV = (
    "import json, os, sys; "
    "open(sys.argv[1], 'a').write(json.dumps({k: v for k, v in os.environ.items() "
    "if k.startswith('SOVBACKUPD_')}) + '\\n')"
)


def env_hook(record: Path) -> list[str]:
    return [sys.executable, "-c", DUMP_ENV, str(record)]


def recorded(record: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_hooks_see_the_stage_tiers_and_backup(tmp_path: Path, sandbox: Sandbox) -> None:
    """before_backup and after_backup hooks run in order with the backup's details."""
    record = tmp_path / "hooks.jsonl"
    hooks = {"before_backup": [env_hook(record)], "after_backup": [env_hook(record)]}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))
    result = run_cli("backup", "--tier", "daily", config=policy)
    assert result.returncode == 0, result.stderr
    before, after = recorded(record)
    assert before == {"SOVBACKUPD_STAGE": "before_backup", "SOVBACKUPD_TIERS": "daily"}
    assert after["SOVBACKUPD_STAGE"] == "after_backup"
    assert after["SOVBACKUPD_RESULT"] == "success"
    assert after["SOVBACKUPD_BACKUP"] == result.stdout.strip()
    assert Path(after["SOVBACKUPD_ARCHIVE"]).is_file()


def test_failing_before_hook_stops_the_backup_and_runs_on_failure(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A before_backup hook exiting 3 fails the backup with one line; on_failure hooks run."""
    record = tmp_path / "hooks.jsonl"
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    hooks = {"before_backup": [failing], "on_failure": [env_hook(record)]}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))
    result = run_cli("backup", config=policy)
    assert result.returncode == 1
    assert len(result.stderr_lines) == 1, result.stderr
    assert "before_backup hook" in result.stderr_lines[0]
    assert "exited 3" in result.stderr_lines[0]
    assert not [name for name in backup_files(sandbox.backup_dir) if "backup_" in name]
    (failure,) = recorded(record)
    assert failure["SOVBACKUPD_RESULT"] == "failure"
    assert "exited 3" in failure["SOVBACKUPD_ERROR"]
