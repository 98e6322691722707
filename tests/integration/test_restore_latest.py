"""`--latest` never means a restore's pre-restore safety backup, which stays reachable by name.

A safety backup holds only what one restore replaced (the state being thrown away): a
`restore --latest` retried after a partial restore, a drill or a verify of "the newest"
must all mean the newest real backup. Real CLI runs on a real sandbox; the remote case
against moto's S3 server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sovbackupd import config, restore, targets
from sovbackupd.store import Store
from tests.conftest import Sandbox, policy_data, run_cli, write_policy
from tests.integration.test_remotes import PREFIX, remote_backups, s3_remote
from tests.integration.test_restore import backup_now
from tests.remotes import MotoServer, s3_bucket

GOOD_ENV = "SECRET_KEY=abc\nREDIS_URL=redis://localhost\n"
BAD_ENV = "SECRET_KEY=broken\n"


def restore_leaving_a_safety_backup(config_path: Path, name: str, *only: str) -> str:
    """Restore *name* live (optionally --only); return the safety backup it took."""
    argv = ["restore", name, "--yes", *(["--only", ",".join(only)] if only else [])]
    result = run_cli(*argv, config=config_path)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("safety backup of what was replaced: ")[1].split()[0]


def test_after_a_data_only_restore_latest_still_means_the_newest_real_backup(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """restore, test-restore and verify --latest pick the real backup, not the newer safety one."""
    config_path = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config_path)
    (sandbox.app / "data" / "notes.txt").write_text("changed after the backup\n")
    safety = restore_leaving_a_safety_backup(config_path, name, "data")
    assert safety > name  # named by time: the safety backup is the newest archive

    planned = run_cli("restore", "--latest", "--dry-run", config=config_path)
    drilled = run_cli("test-restore", "--latest", config=config_path)
    verified = run_cli("verify", "--latest", config=config_path)
    by_default = run_cli("test-restore", config=config_path)

    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.startswith(f"sovbackupd restore {name} would")
    assert drilled.returncode == 0, drilled.stderr
    assert f"test restore of {name} passed" in drilled.stdout
    state = json.loads((sandbox.backup_dir / restore.DRILL_STATE_NAME).read_text())
    assert state["backup"] == name
    assert verified.stdout.splitlines() == [f"{name}: ok (authenticated)"]
    assert f"test restore of {name} passed" in by_default.stdout


def test_retried_latest_config_restore_puts_the_good_config_back_not_the_replaced_one(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The issue's case: the safety backup holds the bad .env; --latest must not bring it back."""
    config_path = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config_path)
    (sandbox.app / ".env").write_text(BAD_ENV)
    restore_leaving_a_safety_backup(config_path, name)
    (sandbox.app / ".env").write_text(BAD_ENV)  # broken again, say by a deploy

    result = run_cli(
        "restore", "--latest", "--only", "config", "--yes", "--no-safety-backup",
        config=config_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"restored {name}: ")
    assert (sandbox.app / ".env").read_text() == GOOD_ENV


def test_a_safety_backup_is_reached_by_name_and_marked_in_list(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Both list forms mark the safety backup; restore and test-restore take it by name."""
    config_path = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config_path)
    (sandbox.app / ".env").write_text(BAD_ENV)
    safety = restore_leaving_a_safety_backup(config_path, name, "config")

    listed = json.loads(run_cli("list", "--json", config=config_path).stdout)
    table = run_cli("list", config=config_path).stdout.splitlines()
    undo = run_cli("restore", safety, "--yes", "--no-safety-backup", config=config_path)
    drilled = run_cli("test-restore", safety, config=config_path)

    assert [(row["name"], row["safety"]) for row in listed] == [(safety, True), (name, False)]
    assert table[0].split()[3] == "KIND"
    assert [line.split()[3] for line in table[1:]] == ["safety", "backup"]
    assert undo.returncode == 0, undo.stderr
    assert (sandbox.app / ".env").read_text() == BAD_ENV
    assert f"test restore of {safety} passed" in drilled.stdout


def test_latest_with_only_safety_backups_is_refused_naming_the_newest(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """With the real backups pruned or lost, --latest says why it chooses none, exit 1."""
    config_path = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config_path)
    safety = restore_leaving_a_safety_backup(config_path, name, "config")
    for path in targets.backup_files(sandbox.backup_dir / f"{name}.tar.gz"):
        path.unlink()

    result = run_cli("restore", "--latest", "--dry-run", config=config_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"sovbackupd: error: {sandbox.backup_dir} holds only 1 pre-restore safety backup, "
        f"which --latest never chooses: name one (the newest is {safety})"
    ]


def test_the_daemons_drill_of_the_newest_backup_skips_the_safety_backup(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """restore.drill without a name, as the daemon's schedule calls it, drills the real backup."""
    config_path = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = backup_now(config_path)
    restore_leaving_a_safety_backup(config_path, name, "data")

    report = restore.drill(config.load(config_path, {}))

    assert (report.name, report.ok) == (name, True)
    assert restore.last_drill(config.load(config_path, {})) is not None


@pytest.mark.usefixtures("aws_environment")
def test_restore_latest_from_s3_skips_a_safety_backup_on_the_remote(
    tmp_path: Path, sandbox: Sandbox, moto_server: MotoServer
) -> None:
    """The README's disaster line picks the newest real backup even if a safety one got there.

    sovbackupd uploads no safety backup, but a bucket filled by an older version, a copy
    of backup_dir or another tool may hold one, newer than every real backup.
    """
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    config_path = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry])
    )
    name = backup_now(config_path)
    safety = restore_leaving_a_safety_backup(config_path, name, "config")
    targets.upload_backup(target, Store(sandbox.backup_dir, PREFIX).find(safety).path)
    assert remote_backups(target) == {name: True, safety: True}
    for stored in Store(sandbox.backup_dir, PREFIX).backups():
        for path in targets.backup_files(stored.path):
            path.unlink()
    (sandbox.app / ".env").write_text(BAD_ENV)

    planned = run_cli("restore", "--latest", "--from", "s3", "--dry-run", config=config_path)
    verified = run_cli("verify", "--remote", "s3", config=config_path)
    result = run_cli(
        "restore", "--latest", "--from", "s3", "--only", "config", "--yes", config=config_path
    )

    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.startswith(f"sovbackupd restore {name} would")
    assert verified.stdout.splitlines() == [f"{name}: ok on s3"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"restored {name}: ")
    assert (sandbox.app / ".env").read_text() == GOOD_ENV
