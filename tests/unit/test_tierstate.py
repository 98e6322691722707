"""The tiers' state file: the pure updates, the merge with the archives, and hostile files."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sovbackupd import tierstate
from sovbackupd.manifest import SAFETY_TIER, Manifest
from sovbackupd.tierstate import TierRecord

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TIERS = ("hourly", "daily", "weekly", "monthly", "yearly", "manual")

moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2026, 11, 30), timezones=st.just(UTC)
)
records = st.dictionaries(
    st.sampled_from(TIERS),
    st.builds(TierRecord, last_attempt=st.none() | moments, last_success=st.none() | moments),
)
labels = st.lists(st.sampled_from((*TIERS, SAFETY_TIER)), min_size=1, max_size=3, unique=True)


def head(tiers: list[str], created: datetime, seconds: int = 30) -> Manifest:
    """Return the manifest of a backup of *tiers* made at *created*."""
    return Manifest(
        id=f"sovereigncore_backup_{created:%Y%m%d_%H%M%S}",
        created=created,
        finished=created + timedelta(seconds=seconds),
        tiers=tiers,
        host="test",
        tool_version="0",
        compression="gzip",
        sources=[],
        file_count=0,
        file_bytes=0,
    )


@given(records, labels, moments)
def test_a_success_sets_exactly_its_tiers_and_keeps_their_attempts(
    before: dict[str, TierRecord], tiers: list[str], moment: datetime
) -> None:
    """Invariant: succeeded() moves only the labelled tiers' last_success, never a safety one."""
    after = tierstate.succeeded(before, tiers, moment)
    for tier in TIERS:
        if tier in tiers:
            assert after[tier].last_success == moment
            assert after[tier].last_attempt == before.get(tier, TierRecord()).last_attempt
        else:
            assert after.get(tier) == before.get(tier)
    assert SAFETY_TIER not in after


@given(records, labels, moments)
def test_an_attempt_sets_exactly_its_tiers_and_keeps_their_successes(
    before: dict[str, TierRecord], tiers: list[str], moment: datetime
) -> None:
    """Invariant: attempted() moves only the labelled tiers' last_attempt."""
    after = tierstate.attempted(before, tiers, moment)
    for tier in TIERS:
        if tier in tiers:
            assert after[tier].last_attempt == moment
            assert after[tier].last_success == before.get(tier, TierRecord()).last_success
        else:
            assert after.get(tier) == before.get(tier)


@given(records, st.lists(st.tuples(labels, moments), max_size=8))
def test_merge_never_goes_back_behind_the_state_or_an_archive(
    state: dict[str, TierRecord], backups: list[tuple[list[str], datetime]]
) -> None:
    """Invariant: each merged time is the latest of the state's and the archives' for its tier."""
    heads = [head(tiers, created) for tiers, created in backups]
    merged = tierstate.merged(state, heads)
    for tier in TIERS:
        finished = [entry.finished for entry in heads if tier in entry.tiers]
        created = [entry.created for entry in heads if tier in entry.tiers]
        recorded = state.get(tier, TierRecord())
        successes = [*finished, *([recorded.last_success] if recorded.last_success else [])]
        attempts = [*created, *([recorded.last_attempt] if recorded.last_attempt else [])]
        got = merged.get(tier, TierRecord())
        assert got.last_success == (max(successes) if successes else None)
        assert got.last_attempt == (max(attempts) if attempts else None)
    assert SAFETY_TIER not in merged


@given(records)
def test_a_rendered_state_parses_back_to_the_same_records(state: dict[str, TierRecord]) -> None:
    """Invariant: parse(render(records)) == records."""
    assert tierstate.parse(tierstate.render(state), NOW) == state


@settings(max_examples=300)
@given(st.binary(max_size=512) | st.text(max_size=512).map(str.encode))
def test_any_bytes_either_parse_or_are_refused_with_a_value_error(data: bytes) -> None:
    """Invariant: parse() returns valid records or raises ValueError; nothing else escapes."""
    try:
        tierstate.parse(data, NOW)
    except ValueError as error:
        assert str(error)


def write_state(directory: Path, content: object) -> None:
    """Write *content* as the state file (JSON unless already bytes)."""
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (directory / tierstate.STATE_NAME).write_bytes(data)


HOSTILE = {
    "not json": b"{",
    "a word for a time": {"format_version": 1, "tiers": {"daily": {"last_success": "yesterday"}}},
    "a naive time": {"format_version": 1, "tiers": {"daily": {"last_success": "2026-01-01T02:00"}}},
    "a time in the future": {
        "format_version": 1,
        "tiers": {"daily": {"last_success": "2099-01-01T00:00:00Z"}},
    },
    "an unknown key": {"format_version": 1, "tiers": {}, "extra": 1},
    "another version": {"format_version": 2, "tiers": {}},
    "a bad tier name": {"format_version": 1, "tiers": {"../x": {}}},
    "too many tiers": {"format_version": 1, "tiers": {f"t{n}": {} for n in range(100)}},
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "a huge number": b'{"format_version": ' + b"9" * 5000 + b"}",
    "too large": b" " * (tierstate.MAX_BYTES + 1) + b"{}",
}


def test_each_bad_state_file_is_one_warning_and_falls_back_to_the_archives(
    tmp_path: Path,
) -> None:
    """A corrupt, hostile or oversized file is ignored with one warning naming it and why."""
    backup = head(["daily"], NOW - timedelta(hours=10))
    for what, content in HOSTILE.items():
        write_state(tmp_path, content)
        with capture_logs() as events:
            known = tierstate.known(tmp_path, [backup], NOW)
        assert known == {
            "daily": TierRecord(last_attempt=backup.created, last_success=backup.finished)
        }, what
        [warning] = events
        assert warning["event"] == "tierstate.ignored", what
        assert warning["log_level"] == "warning"
        assert warning["path"] == str(tmp_path / tierstate.STATE_NAME)
        assert warning["reason"], what


def test_recorded_times_survive_the_archives_that_showed_them(tmp_path: Path) -> None:
    """An attempt and a success written to disk are read back once their archive is gone."""
    started, finished = NOW - timedelta(days=2), NOW - timedelta(days=2) + timedelta(minutes=1)
    tierstate.record_attempt(tmp_path, ["weekly", "hourly"], started)
    tierstate.record_success(tmp_path, ["weekly", "hourly"], finished)
    tierstate.record_attempt(tmp_path, ["hourly"], NOW - timedelta(minutes=5))
    assert tierstate.known(tmp_path, [], NOW) == {
        "weekly": TierRecord(last_attempt=started, last_success=finished),
        "hourly": TierRecord(last_attempt=NOW - timedelta(minutes=5), last_success=finished),
    }
    assert list(tmp_path.iterdir()) == [tmp_path / tierstate.STATE_NAME]
    assert (tmp_path / tierstate.STATE_NAME).stat().st_mode & 0o777 == 0o600


def test_a_fifo_or_symlink_planted_as_the_state_file_is_one_warning_and_never_blocks(
    tmp_path: Path,
) -> None:
    """A FIFO (which would block a plain open) or a symlink in its place is ignored at once."""
    path = tmp_path / tierstate.STATE_NAME
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"format_version": 1, "tiers": {}}))
    plants: dict[str, Callable[[], None]] = {
        "fifo": lambda: os.mkfifo(path),
        "symlink": lambda: path.symlink_to(elsewhere),
    }
    for what, plant in plants.items():
        plant()
        result: list[dict[str, TierRecord]] = []

        def read(found: list[dict[str, TierRecord]] = result) -> None:
            found.append(tierstate.read(tmp_path, NOW))

        with capture_logs() as events:
            reader = threading.Thread(target=read)
            reader.start()
            reader.join(60)
            if reader.is_alive():  # unblock the reader before failing, so the run ends
                with path.open("w"):
                    pass
                reader.join()
                pytest.fail(f"reading a {what} as the state file blocked")
        assert result == [{}], what
        [warning] = events
        assert warning["event"] == "tierstate.ignored", what
        path.unlink()


def test_a_clock_stepped_back_drops_only_the_times_now_in_the_future(tmp_path: Path) -> None:
    """A time ahead of now (NTP stepped a fast clock back) costs that time, not every tier's.

    The next backup rewrites the file from what it read: ignoring the whole file there
    would wipe the daily, weekly and monthly records, and the next restart would run their
    catch-ups again.
    """
    now = datetime.now(UTC)
    ahead = now + timedelta(minutes=10)  # the hourly that committed before the step back
    day, week = now - timedelta(days=1), now - timedelta(days=3)
    older = {
        "daily": TierRecord(last_attempt=day, last_success=day),
        "weekly": TierRecord(last_attempt=week, last_success=week),
    }
    kept = {**older, "hourly": TierRecord(last_attempt=ahead, last_success=ahead)}
    (tmp_path / tierstate.STATE_NAME).write_bytes(tierstate.render(kept))
    with capture_logs() as events:
        assert tierstate.known(tmp_path, [], now) == {**older, "hourly": TierRecord()}
    [warning] = events
    assert warning["event"] == "tierstate.ignored"
    assert "tiers.hourly.last_success" in warning["reason"]
    with capture_logs():
        tierstate.record_attempt(tmp_path, ["hourly"], now)
    assert tierstate.known(tmp_path, [], now) == {**older, "hourly": TierRecord(last_attempt=now)}


def test_a_symlink_planted_at_the_temp_name_is_never_written_through(tmp_path: Path) -> None:
    """`.sovbackupd-tiers.json.partial` -> /etc/shadow must not truncate the target.

    The backup directory is the service user's; a manual backup runs as root. Whoever
    can write the directory must not get root to overwrite a file elsewhere.
    """
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / f"{tierstate.STATE_NAME}.partial").symlink_to(victim)
    tierstate.record_success(backups, ["daily"], NOW)
    assert victim.read_text() == "precious\n"
    assert tierstate.known(backups, [], NOW) == {"daily": TierRecord(last_success=NOW)}
    assert not (backups / f"{tierstate.STATE_NAME}.partial").exists()
