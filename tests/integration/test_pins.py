"""Manual backups and pins through the real CLI: what stays, what goes, and what it says."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sovbackupd.redis_server import free_port
from sovbackupd.store import PIN_LIMIT_BYTES
from tests.conftest import CliResult, Sandbox, policy_data, run_cli, write_policy
from tests.integration.test_daemon import (
    EVERY_4_SECONDS,
    DaemonProcess,
    NotifySocket,
    notify_socket,
    start_daemon,
)
from tests.integration.test_retention import write_backup

__all__ = ["notify_socket", "start_daemon"]  # fixtures, used by name

DAILY_1 = {"daily": {"schedule": "0 2 * * *", "keep": 1}}


def cli_ok(*arguments: str, config: Path) -> CliResult:
    """Run the CLI and insist that it succeeded."""
    result = run_cli(*arguments, config=config)
    assert result.returncode == 0, result.stderr
    return result


def listed(config: Path) -> dict[str, dict[str, Any]]:
    """Return `list --json` rows by backup name."""
    return {row["name"]: row for row in json.loads(cli_ok("list", "--json", config=config).stdout)}


def history(sandbox: Sandbox, *days_ago: int) -> list[str]:
    """Write small daily backups made *days_ago* days before now; return their names."""
    sandbox.backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.now(UTC).replace(microsecond=0)
    return [write_backup(sandbox.backup_dir, now - timedelta(days=days), b"x") for days in days_ago]


def daily_1(tmp_path: Path, sandbox: Sandbox, **retention: Any) -> Path:
    """Write a policy that keeps one backup a day, with *retention* settings."""
    data = policy_data(sandbox, None, tiers=DAILY_1, retention=retention)
    return write_policy(tmp_path / "policy.yaml", data)


def test_backup_then_backup_keeps_both_manual_backups(tmp_path: Path, sandbox: Sandbox) -> None:
    """Two manual backups in one day both stay, and `list` says the first is manual."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    history(sandbox, 1)
    first = cli_ok("backup", config=config).stdout.strip()
    second = run_cli("backup", config=config)
    assert second.returncode == 0, second.stderr
    assert second.stderr_lines == [], "nothing was deleted, nothing to say"
    rows = listed(config)
    assert rows[first]["kept_by"][0].startswith("manual (until ")
    assert rows[second.stdout.strip()]["kept_by"]


def test_backup_prints_what_retention_deleted(tmp_path: Path, sandbox: Sandbox) -> None:
    """Each archive retention removes after `backup` is one line on stderr; stdout is the name."""
    config = daily_1(tmp_path, sandbox)
    old = history(sandbox, 3, 2)
    result = cli_ok("backup", config=config)
    assert result.stdout.strip() not in old
    assert result.stdout.count("\n") == 1
    assert result.stderr_lines == [f"sovbackupd: retention deleted {name}" for name in old]


def test_a_held_retention_is_one_readable_warning_line(tmp_path: Path, sandbox: Sandbox) -> None:
    """A collapsed backup's hold reads `sovbackupd: warning: retention held...`, not JSON."""
    config = daily_1(tmp_path, sandbox)
    now = datetime.now(UTC).replace(microsecond=0)
    sandbox.backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    big = [
        write_backup(sandbox.backup_dir, now - timedelta(days=days), os.urandom(4 << 20))
        for days in (3, 2)
    ]
    result = cli_ok("backup", "--tier", "daily", config=config)
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("sovbackupd: warning: retention held, nothing deleted: the newest")
    rows = listed(config)
    assert all(rows[name]["kept_by"] == [] for name in big)
    assert not any(rows[name]["to_be_pruned"] for name in big)
    table = cli_ok("list", config=config)
    assert "(to be pruned)" not in table.stdout
    assert "retention is held" in table.stdout
    assert table.stderr_lines == [line]


def test_prune_dry_run_says_when_nothing_would_go(tmp_path: Path, sandbox: Sandbox) -> None:
    """`prune --dry-run` with nothing to delete says so instead of printing nothing."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    history(sandbox, 2, 1)
    for flags in (("--dry-run",), ()):
        result = cli_ok("prune", *flags, config=config)
        assert result.stdout == "nothing to prune: 2 of 2 backups kept\n"


def test_pinned_backups_stay_until_unpinned(tmp_path: Path, sandbox: Sandbox) -> None:
    """`backup --pin`, `pin` and `--keep-until` hold backups against retention until unpin."""
    config = daily_1(tmp_path, sandbox, manual_keep="0h")
    old, dated = history(sandbox, 3, 2)
    assert cli_ok("pin", old, config=config).stdout == (
        f"pinned {old}: retention keeps it until it is unpinned\n"
    )
    cli_ok("pin", dated, "--until", "30d", config=config)
    pinned = cli_ok("backup", "--pin", config=config).stdout.strip()
    kept = cli_ok("backup", "--keep-until", "2999-01-01", config=config).stdout.strip()
    cli_ok("backup", config=config)
    rows = listed(config)
    assert rows[old]["kept_by"] == ["pinned"]
    assert rows[dated]["kept_by"][0].startswith("pinned until ")
    assert rows[pinned]["kept_by"] == ["pinned"]
    assert rows[kept]["kept_by"] == ["pinned until 2999-01-01 00:00 UTC"]

    assert cli_ok("unpin", old, config=config).stdout.startswith(f"unpinned {old}")
    assert cli_ok("unpin", old, config=config).stdout == f"{old} was not pinned\n"
    assert cli_ok("prune", config=config).stdout == f"deleted {old}\n"
    assert not (sandbox.backup_dir / f"{old}.pin.json").exists()
    assert set(listed(config)) >= {dated, pinned, kept}


@pytest.mark.parametrize(
    "damage",
    ["not json", "wrong schema", "another backup", "too large", "fifo", "directory"],
)
def test_an_unreadable_pin_keeps_its_backup_and_says_so(
    tmp_path: Path, sandbox: Sandbox, damage: str
) -> None:
    """A damaged pin file keeps the backup, with one warning naming the file; never a hang."""
    config = daily_1(tmp_path, sandbox, manual_keep="0h")
    (old,) = history(sandbox, 2)
    pin = sandbox.backup_dir / f"{old}.pin.json"
    if damage == "fifo":
        os.mkfifo(pin)
    elif damage == "directory":
        pin.mkdir()
    else:
        pin.write_text(
            {
                "not json": "{",
                "wrong schema": json.dumps({"backup": old, "pinned_at": "yesterday"}),
                "another backup": '{"backup": "x", "pinned_at": "2026-01-01T00:00:00Z"}',
                "too large": " " * (PIN_LIMIT_BYTES + 1),
            }[damage]
        )
    for command in (("backup",), ("prune",), ("prune", "--dry-run"), ("list",)):
        result = run_cli(*command, config=config, timeout=60)
        assert result.returncode == 0, result.stderr
        if command[0] == "prune":
            assert result.stdout.startswith("nothing to prune")
        assert len(result.stderr_lines) == 1, result.stderr
        assert result.stderr_lines[0].startswith(f"sovbackupd: warning: pin of {old} unreadable")
        assert str(pin) in result.stderr_lines[0]
    assert listed(config)[old]["kept_by"] == ["pinned (pin file unreadable)"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("backup", "--keep-until", "yesterday"), "is not a time"),
        (("backup", "--keep-until", "2001-01-01"), "is not in the future"),
        (("pin", "NAME", "--until", "1m"), "is not a time"),
        (("backup", "--pin", "--keep-until", "30d"), "not allowed with argument"),
    ],
)
def test_a_pin_end_that_cannot_be_used_is_a_usage_error(
    tmp_path: Path, sandbox: Sandbox, arguments: tuple[str, ...], message: str
) -> None:
    """A bad --keep-until or --until exits 2 with one line, before any backup is made."""
    config = daily_1(tmp_path, sandbox)
    (name,) = history(sandbox, 1)
    result = run_cli(*(name if word == "NAME" else word for word in arguments), config=config)
    assert result.returncode == 2
    assert message in result.stderr_lines[-1]
    assert "Traceback" not in result.stderr
    assert list(listed(config)) == [name]


def test_pin_and_unpin_of_an_unknown_backup_fail_cleanly(tmp_path: Path, sandbox: Sandbox) -> None:
    """Pinning or unpinning a name that is not there exits 1 with one line naming it."""
    config = daily_1(tmp_path, sandbox)
    history(sandbox, 1)
    for command in ("pin", "unpin"):
        result = run_cli(command, "sovereigncore_backup_20000101_000000", config=config)
        assert result.returncode == 1
        assert result.stderr_lines == [
            "sovbackupd: error: no backup named 'sovereigncore_backup_20000101_000000' in "
            f"{sandbox.backup_dir}"
        ]


def test_the_daemons_retention_honours_pins_and_warns_of_damaged_ones(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """After each scheduled backup the daemon prunes around pins, damaged ones included."""
    listen = f"127.0.0.1:{free_port()}"
    data = policy_data(
        sandbox,
        None,
        tiers={"hourly": {"schedule": EVERY_4_SECONDS, "keep": 1}},
        retention={"manual_keep": "0h"},
        metrics={"listen": listen},
    )
    config = write_policy(tmp_path / "policy.yaml", data)
    pinned, damaged = history(sandbox, 3, 2)
    cli_ok("pin", pinned, config=config)
    (sandbox.backup_dir / f"{damaged}.pin.json").write_text("{")

    daemon = start_daemon(config)
    first, second = (event["backup"] for event in daemon.wait_for_backups(2))
    warning = daemon.wait_for("retention.pin_unreadable", backup=damaged)
    assert warning["level"] == "warning"
    assert str(sandbox.backup_dir / f"{damaged}.pin.json") in warning["problem"]
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    names = set(listed(config))
    assert {pinned, damaged, second} <= names
    assert first not in names, "retention ran: the hourly rule keeps one"


def test_pin_never_writes_through_a_planted_symlink(tmp_path: Path, sandbox: Sandbox) -> None:
    """A symlink planted at the pin's temp name is not followed: its target stays intact."""
    config = daily_1(tmp_path, sandbox)
    (name,) = history(sandbox, 1)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (sandbox.backup_dir / f"{name}.pin.json.partial").symlink_to(victim)
    cli_ok("pin", name, config=config)
    assert victim.read_text() == "precious\n"
    pin = sandbox.backup_dir / f"{name}.pin.json"
    assert not pin.is_symlink()
    assert listed(config)[name]["kept_by"][-1] == "pinned"


@pytest.mark.parametrize("spelling", ["../other/NAME", "ABSOLUTE"])
def test_unpin_never_reaches_outside_backup_dir(
    tmp_path: Path, sandbox: Sandbox, spelling: str
) -> None:
    """`unpin` with a path in the name refuses it and leaves another directory's pin alone."""
    config = daily_1(tmp_path, sandbox)
    history(sandbox, 1)
    other = tmp_path / "other"
    other.mkdir()
    name = write_backup(other, datetime(2026, 1, 1, tzinfo=UTC), b"x")
    foreign_pin = other / f"{name}.pin.json"
    foreign_pin.write_text("{}")
    given = str(other / name) if spelling == "ABSOLUTE" else spelling.replace("NAME", name)
    result = run_cli("unpin", given, config=config)
    assert result.returncode == 1
    assert result.stderr_lines == [
        f"sovbackupd: error: no backup named {given!r} in {sandbox.backup_dir}"
    ]
    assert foreign_pin.exists()


def test_a_run_out_pin_whose_archive_was_deleted_by_hand_goes_at_the_next_prune(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A pin outlives its hand-deleted archive while it holds, and not after it ran out."""
    config = daily_1(tmp_path, sandbox)
    history(sandbox, 1)
    gone, holding = (f"sovereigncore_backup_2026010{day}_000000" for day in (1, 2))
    for name, until in ((gone, "2026-01-01T12:00:00Z"), (holding, None)):
        record = {"backup": name, "pinned_at": "2026-01-01T00:00:00Z", "until": until}
        (sandbox.backup_dir / f"{name}.pin.json").write_text(json.dumps(record))
    cli_ok("prune", "--dry-run", config=config)
    assert (sandbox.backup_dir / f"{gone}.pin.json").exists(), "a dry run changes nothing"
    cli_ok("prune", config=config)
    assert not (sandbox.backup_dir / f"{gone}.pin.json").exists()
    assert (sandbox.backup_dir / f"{holding}.pin.json").exists()
