"""State files beside the backups: a damaged or planted one is logged and ignored."""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sovbackupd import config, restore, statefile
from sovbackupd.config.models import Policy
from sovbackupd.restore import DRILL_STATE_NAME, DrillState

GOOD: dict[str, Any] = {
    "backup": "sovereigncore_backup_20260102_140000",
    "ok": True,
    "finished": 1.5e9,
}


def policy_for(backup_dir: Path) -> Policy:
    return config.parse(f"backup_dir: {backup_dir}\nsources: {{dirs: [/srv]}}\n", "p.yaml", {})


def ignored(events: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [event for event in events if event["event"] == "state.ignored"]


CORRUPT = {
    "a word for a time": json.dumps({**GOOD, "last_success": "yesterday"}).encode(),
    "not JSON": b"{last_success: yesterday",
    "a list": b"[1, 2, 3]",
    "a string for a boolean": json.dumps({**GOOD, "ok": "no", "last_success": None}).encode(),
    "a negative time": json.dumps({**GOOD, "finished": -1, "last_success": None}).encode(),
    "a missing field": json.dumps({"backup": "x"}).encode(),
    "too large": json.dumps({**GOOD, "last_success": None}).encode() + b" " * (1 << 20),
    "deeply nested": b"[" * 100_000,
    "binary": b"\x00\xff" * 100,
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_drill_state_is_ignored_with_one_warning_naming_the_file(
    tmp_path: Path, name: str
) -> None:
    """A damaged .sovbackupd-test-restore.json reads as no drill yet, and says so once."""
    path = tmp_path / DRILL_STATE_NAME
    path.write_bytes(CORRUPT[name])
    with capture_logs() as events:
        assert restore.last_drill(policy_for(tmp_path)) is None
    (warning,) = ignored(events)
    assert warning["log_level"] == "warning"
    assert warning["path"] == str(path)
    assert warning["reason"]


def test_a_fifo_in_place_of_a_state_file_is_ignored_without_blocking(tmp_path: Path) -> None:
    """A FIFO would block a plain open() forever; it is refused as not a regular file."""
    path = tmp_path / DRILL_STATE_NAME
    os.mkfifo(path)
    with capture_logs() as events:
        assert restore.last_drill(policy_for(tmp_path)) is None
    assert [event["reason"] for event in ignored(events)] == ["not a regular file"]


def test_a_directory_in_place_of_a_state_file_is_ignored(tmp_path: Path) -> None:
    """A directory where the state file belongs is logged and ignored."""
    (tmp_path / DRILL_STATE_NAME).mkdir()
    with capture_logs() as events:
        assert restore.last_drill(policy_for(tmp_path)) is None
    assert len(ignored(events)) == 1


def test_a_missing_state_file_is_no_state_and_no_warning(tmp_path: Path) -> None:
    """No file yet is the normal first start: nothing to warn about."""
    with capture_logs() as events:
        assert restore.last_drill(policy_for(tmp_path)) is None
    assert ignored(events) == []


def test_a_state_written_is_read_back_equal(tmp_path: Path) -> None:
    """write() then read() returns the same state, and the file is private (0600)."""
    state = DrillState(**GOOD, last_success=1.5e9)
    path = tmp_path / DRILL_STATE_NAME
    statefile.write(path, state)
    assert statefile.read(path, DrillState) == state
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_state_from_a_newer_version_with_more_keys_still_reads(tmp_path: Path) -> None:
    """Unknown keys are ignored, so a downgrade does not lose the last drill."""
    path = tmp_path / DRILL_STATE_NAME
    path.write_text(json.dumps({**GOOD, "last_success": None, "added_later": [1]}))
    assert statefile.read(path, DrillState) == DrillState(**GOOD, last_success=None)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_read_as_a_state_or_none(tmp_path: Path, data: bytes) -> None:
    """Invariant: read() returns a valid state or None for any bytes; it never raises."""
    path = tmp_path / DRILL_STATE_NAME
    path.write_bytes(data)
    state = statefile.read(path, DrillState)
    assert state is None or isinstance(state, DrillState)
