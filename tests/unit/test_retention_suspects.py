"""Which backups retention takes for forgeries, from what their records' checks found."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from sovbackupd import auth, retention

START = datetime(2026, 1, 1, tzinfo=UTC)
OUTCOMES: list[auth.Status | str] = [*auth.Status, "backup x: the MAC does not match"]


@given(st.lists(st.sampled_from(OUTCOMES), max_size=12))
def test_suspects_are_failures_and_unvouched_backups_newer_than_the_oldest_signed(
    outcomes: list[auth.Status | str],
) -> None:
    """Suspects are exactly the failures and the unvouched backups after the oldest signed.

    Invariant: a backup is a suspect exactly when its record failed, or it is unsigned
    or foreign-key yet newer than the oldest authenticated backup; an authenticated one
    never is, and without any authenticated backup only failures are.
    """
    dated = [(f"b{index}", START + timedelta(hours=index)) for index in range(len(outcomes))]
    checked = {name: outcome for (name, _), outcome in zip(dated, outcomes, strict=True)}

    found = retention.suspected(dated, checked)

    signed = [
        index for index, outcome in enumerate(outcomes) if outcome is auth.Status.AUTHENTICATED
    ]
    expected = set()
    for index, outcome in enumerate(outcomes):
        unvouched = outcome in (auth.Status.UNSIGNED, auth.Status.FOREIGN)
        if isinstance(outcome, str) or (unvouched and signed and index > signed[0]):
            expected.add(f"b{index}")
    assert set(found) == expected
    for name, why in found.items():
        outcome = checked[name]
        assert why == outcome if isinstance(outcome, str) else f"b{signed[0]}" in why


def test_a_backup_missing_from_the_checks_counts_as_unsigned() -> None:
    """A remote copy without a record is not in *checked*: unsigned, so suspect if newer."""
    dated = [
        ("old", START),
        ("signed", START + timedelta(hours=1)),
        ("late", START + timedelta(hours=2)),
    ]
    found = retention.suspected(dated, {"signed": auth.Status.AUTHENTICATED})
    assert list(found) == ["late"]
    assert found["late"].startswith("unsigned, yet newer than signed")
