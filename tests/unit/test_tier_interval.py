"""A tier's nominal interval, the yardstick of the missed-backup alert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from sovbackupd import scheduler
from sovbackupd.metrics import Metrics

# A Thursday: the year ahead holds every month length, weekends and both DST changes.
THURSDAY = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
INTERVAL = "sovbackupd_tier_interval_seconds"


def interval(expression: str, timezone: str = "UTC", now: datetime = THURSDAY) -> timedelta | None:
    return scheduler.interval(scheduler.parse_cron(expression, timezone), now)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("0 * * * *", timedelta(hours=1)),
        ("*/15 * * * *", timedelta(minutes=15)),
        ("0 2 * * *", timedelta(days=1)),
        ("0 3 * * 0", timedelta(weeks=1)),
        ("*/2 * * * * *", timedelta(seconds=2)),
        ("* * * * * *", timedelta(seconds=1)),
    ],
)
def test_regular_schedule_interval_is_its_period(expression: str, expected: timedelta) -> None:
    """A schedule firing at a steady pace has that pace as its interval."""
    assert interval(expression) == expected


def test_monthly_schedule_interval_is_the_longest_month() -> None:
    """The 1st of every month is 31 days apart at most, so a 28-day February never alerts."""
    assert interval("0 4 1 * *") == timedelta(days=31)


def test_business_hours_schedule_interval_spans_the_weekend() -> None:
    """Hourly on weekdays 9-17: the quiet stretch from Friday 17:00 to Monday 09:00 counts."""
    assert interval("0 9-17 * * 1-5") == timedelta(hours=64)


def test_day_of_month_or_weekday_schedule_interval_is_the_longest_gap_between_either() -> None:
    """Crontab's either-day rule: the 1st or any Monday leaves at most a week between runs."""
    assert interval("0 4 1 * 1") == timedelta(weeks=1)


def test_daily_schedule_across_the_autumn_dst_change_gives_25_hours() -> None:
    """In a zone with DST, the day the clocks go back is the longest gap of a daily run."""
    assert interval("0 12 * * *", "Europe/Berlin") == timedelta(hours=25)
    assert interval("0 12 * * *", "UTC") == timedelta(hours=24)


def test_schedule_that_does_not_fire_within_a_year_has_no_interval() -> None:
    """February 29th next fires in 2028: no nominal interval, so no missed-backup alert."""
    assert interval("0 0 29 2 *") is None


def test_interval_looks_ahead_from_now() -> None:
    """Within a year of its next run, the leap-day schedule's gap is the four years after."""
    assert interval("0 0 29 2 *", now=datetime(2027, 3, 1, tzinfo=UTC)) == timedelta(days=1461)


def test_tier_intervals_maps_each_tier_to_its_interval() -> None:
    """Every tier of a policy gets the interval of its own trigger."""
    triggers = scheduler.tier_triggers(
        {"hourly": "0 * * * *", "daily": "0 2 * * *"}, ZoneInfo("UTC")
    )
    assert scheduler.tier_intervals(triggers, THURSDAY) == {
        "hourly": timedelta(hours=1),
        "daily": timedelta(days=1),
    }


def test_reload_that_drops_a_tier_removes_its_interval_series() -> None:
    """A tier no longer scheduled stops exporting an interval the alert would still use."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.declare_tiers(["hourly", "daily"])
    assert registry.get_sample_value(INTERVAL, {"tier": "hourly"}) is None  # not yet computed
    metrics.tier_interval.labels(tier="hourly").set(3600)
    metrics.tier_interval.labels(tier="daily").set(86400)
    metrics.declare_tiers(["daily"])
    assert registry.get_sample_value(INTERVAL, {"tier": "hourly"}) is None
    assert registry.get_sample_value(INTERVAL, {"tier": "daily"}) == 86400
