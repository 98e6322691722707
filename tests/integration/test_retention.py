"""Pruning a real backup directory: three years of archives, dry run, then the real thing."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sovbackupd import __version__, archive, auth, retention
from sovbackupd import policy as gfs
from sovbackupd.config import parse
from sovbackupd.manifest import Manifest
from sovbackupd.metrics import Metrics
from sovbackupd.sources.base import Member, SourceReport
from sovbackupd.store import Store, backup_name
from tests.conftest import (
    Sandbox,
    backup_files,
    key_file,
    policy_data,
    run_cli,
    stored_files,
    write_policy,
)

PREFIX = "sovereigncore_backup"
START = datetime(2023, 11, 20, 2, 0, tzinfo=UTC)


def write_backup(backup_dir: Path, moment: datetime, payload: bytes) -> str:
    """Write one archive as sovbackupd would have at *moment* (the real writer)."""
    name = backup_name(PREFIX, moment)
    data = backup_dir.parent / "retention-data"  # a data dir, its directory entry first
    data.mkdir(exist_ok=True)
    source = data / "payload.bin"
    source.write_bytes(payload)
    path = backup_dir / f"{name}.tar.gz"
    report = SourceReport("data", "dirs")
    with archive.Writer(path, "gzip", name) as writer:
        writer.add(Member.from_stat("data", data, data.stat()), report)
        member = Member.from_stat(
            "data/payload.bin", source, source.stat(), lambda: source.open("rb")
        )
        writer.add(member, report)
        head = Manifest(
            id=name,
            created=moment,
            finished=moment + timedelta(seconds=5),
            tiers=["daily"],
            host=socket.gethostname(),
            tool_version=__version__,
            compression="gzip",
            sources=[],
            file_count=writer.file_count,
            file_bytes=writer.file_bytes,
        )
        writer.commit(head)
    # Signed as the daemon signs, with the key of the test's policy (see key_file).
    key_path = key_file(backup_dir.parent)
    key = auth.load_key(key_path) or auth.create_key(key_path)
    auth.write(path, name, moment, ["daily"], key)
    source.unlink()
    return name


def retention_policy(tmp_path: Path, sandbox: Sandbox) -> Path:
    tiers = {
        "daily": {"schedule": "0 2 * * *", "keep": 7},
        "weekly": {"schedule": "0 3 * * 0", "keep": 4},
        "monthly": {"schedule": "0 4 1 * *", "keep": 6},
        "yearly": {"keep": 3},
    }
    return write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, tiers=tiers))


def three_years(backup_dir: Path) -> list[str]:
    backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return [
        write_backup(backup_dir, START + timedelta(days=4 * step, hours=step % 5), os.urandom(4096))
        for step in range(275)
    ]


def prune(policy: Path, *flags: str) -> dict[str, Any]:
    result = run_cli("prune", "--json", *flags, config=policy)
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


def test_prune_dry_run_lists_then_prune_deletes_exactly_the_decision(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Dry run deletes nothing and names what prune then deletes, sidecars and all."""
    policy_path = retention_policy(tmp_path, sandbox)
    names = three_years(sandbox.backup_dir)
    policy = parse(policy_path.read_text(), "policy.yaml", {})
    stored = Store(sandbox.backup_dir, PREFIX).backups()
    expected = sorted(
        decision.name
        for decision in gfs.decide(
            [gfs.Candidate(item.name, item.created, ok=True) for item in stored],
            gfs.Rules.from_policy(policy),
            policy.zone,
            now=datetime.now(UTC),
        )
        if not decision.keep
    )
    before = backup_files(sandbox.backup_dir)

    planned = prune(policy_path, "--dry-run")
    assert planned["dry_run"] is True
    assert planned["held"] is None
    assert sorted(planned["deleted"]) == expected
    assert backup_files(sandbox.backup_dir) == before
    assert len(expected) > 200, "three years of backups mostly rotate away"
    assert names[-1] not in expected

    done = prune(policy_path)
    assert sorted(done["deleted"]) == expected
    left = backup_files(sandbox.backup_dir)
    kept = sorted(set(names) - set(expected))
    assert left == set().union(*(stored_files(name) for name in kept))
    assert run_cli("verify", "--all", config=policy_path).returncode == 0
    assert prune(policy_path)["deleted"] == [], "a second prune deletes nothing"


def test_collapsed_newest_backup_holds_pruning(tmp_path: Path, sandbox: Sandbox) -> None:
    """A newest backup far smaller than its predecessors deletes nothing and says why."""
    policy_path = retention_policy(tmp_path, sandbox)
    names = three_years(sandbox.backup_dir)
    collapsed = START + timedelta(days=1100)  # after the series, and before now
    write_backup(sandbox.backup_dir, collapsed, b"")
    result = run_cli("prune", config=policy_path)
    assert result.returncode == 0, result.stderr
    assert "retention held" in result.stderr
    assert result.stdout == ""
    left = {entry.name for entry in sandbox.backup_dir.iterdir() if entry.name.endswith(".tar.gz")}
    assert {f"{name}.tar.gz" for name in names} <= left
    assert prune(policy_path)["held"] is not None


def test_backup_applies_retention_after_it_commits(tmp_path: Path, sandbox: Sandbox) -> None:
    """With daily keep 1, each daily backup prunes the one before it, and says so."""
    tiers = {"daily": {"schedule": "0 2 * * *", "keep": 1}}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, tiers=tiers))
    results = [run_cli("backup", "--tier", "daily", config=policy) for _ in range(3)]
    names = [result.stdout.strip() for result in results]
    rows = json.loads(run_cli("list", "--json", config=policy).stdout)
    assert [row["name"] for row in rows] == [names[-1]]
    assert rows[0]["kept_by"][0].startswith("daily ")
    assert results[2].stderr_lines == [f"sovbackupd: retention deleted {names[1]}"]


def test_retention_simulate_previews_a_policy(tmp_path: Path, sandbox: Sandbox) -> None:
    """Simulate reads ISO times and says which the policy keeps, and why."""
    tiers = {"daily": {"schedule": "0 2 * * *", "keep": 2}}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, tiers=tiers))
    times = tmp_path / "times.txt"
    times.write_text(
        "2026-01-01T02:00:00+00:00\n2026-01-02T02:00:00+00:00\n"
        "2026-01-03T01:00:00+00:00\n2026-01-03T02:00:00+00:00\n"
    )
    result = run_cli("retention", "simulate", "--from", str(times), "--json", config=policy)
    assert result.returncode == 0, result.stderr
    rows = {row["time"]: row for row in json.loads(result.stdout)}
    assert rows["2026-01-03T02:00:00+00:00"]["keep"] is True
    assert rows["2026-01-02T02:00:00+00:00"]["keep"] is True
    assert rows["2026-01-03T01:00:00+00:00"]["keep"] is False
    assert rows["2026-01-01T02:00:00+00:00"]["keep"] is False
    assert rows["2026-01-02T02:00:00+00:00"]["reasons"] == ["daily 2026-01-02"]
    series = run_cli("retention", "simulate", "--every", "6h", "--span", "30d", config=policy)
    assert series.returncode == 0, series.stderr
    assert series.stdout.splitlines()[-1].startswith("2 of 121 kept")
    future = ("--every", "1d", "--span", "3d", "--end", "2099-01-01T02:00+00:00")
    later = run_cli("retention", "simulate", *future, config=policy)
    assert later.returncode == 0, later.stderr
    assert later.stdout.splitlines()[-1] == "2 of 4 kept (daily 2, newest 1)", "as of its end"


def test_prune_counts_deletions_and_holds_in_metrics(tmp_path: Path, sandbox: Sandbox) -> None:
    """retention_deleted_total counts deletions; a collapsed backup sets retention_held."""
    policy = parse(retention_policy(tmp_path, sandbox).read_text(), "policy.yaml", {})
    three_years(sandbox.backup_dir)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    outcome = retention.prune(policy, dry_run=False, metrics=metrics)
    assert registry.get_sample_value("sovbackupd_retention_deleted_total") == len(outcome.deleted)
    kept = len(Store(sandbox.backup_dir, PREFIX).backups())
    assert registry.get_sample_value("sovbackupd_backups_stored", {"location": "local"}) == kept
    assert registry.get_sample_value("sovbackupd_retention_held") == 0
    collapsed = START + timedelta(days=1100)  # after the series, and before now
    write_backup(sandbox.backup_dir, collapsed, b"")
    assert retention.prune(policy, dry_run=False, metrics=metrics).held is not None
    assert registry.get_sample_value("sovbackupd_retention_held") == 1


@pytest.mark.parametrize("future_size", [1, 300_000], ids=["tiny", "as-large"])
def test_a_backup_dated_in_the_future_never_costs_the_backup_just_made(
    tmp_path: Path, sandbox: Sandbox, future_size: int
) -> None:
    """After the clock stepped back, `backup` keeps what it made and the future-dated backup.

    A tiny future-dated backup does not set off the size guard either: the backup just made
    is the one compared with its predecessors.
    """
    tiers = {"daily": {"schedule": "0 2 * * *", "keep": 1}}
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, tiers=tiers))
    sandbox.backup_dir.mkdir(mode=0o700, parents=True)
    payload = os.urandom(future_size)
    future = write_backup(sandbox.backup_dir, datetime.now(UTC) + timedelta(days=2), payload)
    made = run_cli("backup", "--tier", "daily", config=config)
    assert made.returncode == 0, made.stderr
    assert made.stderr == ""
    rows = json.loads(run_cli("list", "--json", config=config).stdout)
    kept_by = {row["name"]: row["kept_by"] for row in rows}
    assert set(kept_by) == {future, made.stdout.strip()}
    assert kept_by[future] == [gfs.REASON_FUTURE]
    assert "newest successful backup" in kept_by[made.stdout.strip()]
