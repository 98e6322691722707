"""Cron expressions: crontab's meaning on top of APScheduler 3's CronTrigger."""

from __future__ import annotations

import io
import logging
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import structlog

from sovbackupd import logging as sovlogging
from sovbackupd import scheduler

# A Thursday, so that every weekday is still ahead within the next week.
THURSDAY = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)


def fire_times(expression: str, count: int = 1, start: datetime = THURSDAY) -> list[datetime]:
    """Return the next *count* fire times of *expression* at or after *start*."""
    trigger = scheduler.parse_cron(expression, "UTC")
    times: list[datetime] = []
    previous: datetime | None = None
    moment = start
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, moment)
        assert fire is not None
        times.append(fire)
        previous = fire
        moment = fire + timedelta(microseconds=1)
    return times


def weekdays(expression: str, count: int = 7) -> list[str]:
    """Return the weekday names of the next *count* fire times."""
    return [moment.strftime("%a") for moment in fire_times(expression, count)]


@pytest.mark.parametrize("expression", ["0 3 * * 0", "0 3 * * 7", "0 3 * * sun", "0 3 * * SUN"])
def test_day_of_week_zero_and_seven_mean_sunday(expression: str) -> None:
    """Crontab's 0 and 7 are Sunday, although APScheduler 3 counts from Monday = 0."""
    assert fire_times(expression) == [datetime(2026, 1, 4, 3, 0, tzinfo=UTC)]
    assert weekdays(expression, 3) == ["Sun", "Sun", "Sun"]


def test_day_of_week_one_means_monday() -> None:
    """Crontab's 1 is Monday."""
    assert fire_times("30 1 * * 1") == [datetime(2026, 1, 5, 1, 30, tzinfo=UTC)]


def test_day_of_week_ranges_lists_and_steps_follow_crontab() -> None:
    """Ranges, lists and steps in the day-of-week field count from Sunday = 0."""
    assert weekdays("0 3 * * 1-5") == ["Thu", "Fri", "Mon", "Tue", "Wed", "Thu", "Fri"]
    assert weekdays("0 3 * * 0,6", 4) == ["Sat", "Sun", "Sat", "Sun"]
    assert weekdays("0 3 * * 5-7", 4) == ["Fri", "Sat", "Sun", "Fri"]
    assert weekdays("0 3 * * */2", 4) == ["Thu", "Sat", "Sun", "Tue"]
    assert weekdays("0 3 * * 1-5/2", 4) == ["Fri", "Mon", "Wed", "Fri"]
    assert weekdays("0 3 * * 0-7", 7) == ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]
    assert weekdays("0 3 * * 1,3-4", 3) == ["Thu", "Mon", "Wed"]


def test_day_of_week_range_ending_and_starting_at_seven_is_sunday() -> None:
    """7-7 is Sunday only, as 7 alone is."""
    assert weekdays("0 3 * * 7-7", 2) == ["Sun", "Sun"]


def test_day_names_and_month_names_are_accepted() -> None:
    """Three-letter day and month names work in any case."""
    assert weekdays("0 3 * * mon-fri", 3) == ["Thu", "Fri", "Mon"]
    assert weekdays("0 3 * * Sat,SUN", 2) == ["Sat", "Sun"]
    assert fire_times("0 4 1 feb,jul *", 2) == [
        datetime(2026, 2, 1, 4, 0, tzinfo=UTC),
        datetime(2026, 7, 1, 4, 0, tzinfo=UTC),
    ]


def test_minute_hour_and_day_fields_take_steps_ranges_and_lists() -> None:
    """The other fields keep crontab's syntax: */15, 8-10, 1,15."""
    assert fire_times("*/15 * * * *", 3) == [
        datetime(2026, 1, 1, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 15, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 30, tzinfo=UTC),
    ]
    assert [moment.hour for moment in fire_times("0 8-10 * * *", 4)] == [8, 9, 10, 8]
    assert [moment.day for moment in fire_times("0 0 1,15 * *", 3)] == [1, 15, 1]


def test_seed_schedules_fire_when_the_seed_crontab_would() -> None:
    """The tiers of the documented example policy fire at the documented moments."""
    assert fire_times("0 * * * *", 2, THURSDAY + timedelta(minutes=1)) == [
        datetime(2026, 1, 1, 1, 0, tzinfo=UTC),
        datetime(2026, 1, 1, 2, 0, tzinfo=UTC),
    ]
    assert fire_times("0 2 * * *") == [datetime(2026, 1, 1, 2, 0, tzinfo=UTC)]
    assert fire_times("0 4 1 * *", 2, THURSDAY + timedelta(days=1)) == [
        datetime(2026, 2, 1, 4, 0, tzinfo=UTC),
        datetime(2026, 3, 1, 4, 0, tzinfo=UTC),
    ]


def test_six_fields_put_seconds_first() -> None:
    """A 6-field expression reads seconds, minute, hour, day, month, day of week."""
    assert fire_times("30 15 3 * * 0") == [datetime(2026, 1, 4, 3, 15, 30, tzinfo=UTC)]
    assert fire_times("*/20 0 0 * * *", 3) == [
        datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 20, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 40, tzinfo=UTC),
    ]


def test_five_fields_fire_on_the_whole_minute() -> None:
    """A 5-field expression fires at second 0, like cron."""
    assert fire_times("5 3 * * *") == [datetime(2026, 1, 1, 3, 5, 0, tzinfo=UTC)]


def test_schedules_follow_the_given_time_zone() -> None:
    """A trigger built for a zone fires at that zone's wall-clock time."""
    berlin = ZoneInfo("Europe/Berlin")
    trigger = scheduler.parse_cron("0 2 * * *", berlin)
    fire = trigger.get_next_fire_time(None, THURSDAY)
    assert fire == datetime(2026, 1, 1, 2, 0, tzinfo=berlin)
    assert fire is not None
    assert fire.astimezone(UTC) == datetime(2026, 1, 1, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "expression", ["", "0 3 * *", "* * * *", "0 0 3 * * * *", "@daily", "0 3 * * 0 2026 x"]
)
def test_wrong_field_counts_are_rejected(expression: str) -> None:
    """Only 5 fields, or 6 with seconds first, are cron expressions."""
    with pytest.raises(ValueError, match="needs 5 fields"):
        scheduler.parse_cron(expression, "UTC")


@pytest.mark.parametrize("expression", ["0 3 * * 5-1", "0 3 * * sat-mon", "0 3 * * 7-1"])
def test_backwards_day_of_week_ranges_are_rejected(expression: str) -> None:
    """A day-of-week range that runs backwards is an error, not a silent wrap-around."""
    with pytest.raises(ValueError, match="runs backwards"):
        scheduler.parse_cron(expression, "UTC")


@pytest.mark.parametrize("expression", ["0 5-3 * * *", "30-10 * * * *", "0 0 20-10 * *"])
def test_backwards_ranges_in_other_fields_are_rejected(expression: str) -> None:
    """A minute, hour or day range that runs backwards is an error."""
    with pytest.raises(ValueError, match="minimum value in a range"):
        scheduler.parse_cron(expression, "UTC")


@pytest.mark.parametrize(
    "expression",
    ["0 3 * * 8", "0 3 * * funday", "0 3 * * */0", "60 * * * *", "0 24 * * *", "0 0 32 * *"],
)
def test_out_of_range_values_are_rejected(expression: str) -> None:
    """Values outside a field's range, unknown names and zero steps are errors."""
    with pytest.raises(ValueError):  # APScheduler words each problem differently
        scheduler.parse_cron(expression, "UTC")


def test_restricted_day_of_month_and_day_of_week_fire_on_either() -> None:
    """`0 3 1 * 1` fires on the 1st of each month and on every Monday, as in crontab."""
    assert fire_times("0 3 1 * 1", 2) == [
        datetime(2026, 1, 1, 3, 0, tzinfo=UTC),
        datetime(2026, 1, 5, 3, 0, tzinfo=UTC),
    ]


def test_a_busy_dispatcher_is_no_warning_and_its_skipped_ticks_are_served_after() -> None:
    """While a backup runs, the trigger's skipped ticks log nothing and are served after it."""
    # The skip is observed through APScheduler's own event (its listener API), so that the
    # test waits for the skip to happen instead of for a time.
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES  # noqa: PLC0415 (test only)

    stream = io.StringIO()
    sovlogging.configure(stream)
    skipped = threading.Event()
    release = threading.Event()
    runs: list[list[str]] = []

    def run_tiers(tiers: list[str]) -> None:
        runs.append(tiers)
        if len(runs) == 1:
            release.wait(60)

    schedule = scheduler.Scheduler(run_tiers, UTC)
    try:
        schedule.start(
            {"hourly": "* * * * * *"},
            {"hourly": datetime.now(UTC)},
            scheduler.Timing(workers=2, misfire_grace_seconds=60),
        )
        schedule._scheduler.add_listener(  # type: ignore[union-attr]  # started above
            lambda event: skipped.set(), EVENT_JOB_MAX_INSTANCES
        )
        assert skipped.wait(60), "the every-second trigger never found the dispatcher busy"
        release.set()
        for _ in range(600):  # the dispatcher loops on after the first backup
            if len(runs) > 1:
                break
            threading.Event().wait(0.1)
    finally:
        release.set()
        schedule.shutdown()
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    assert len(runs) > 1
    assert "maximum number of running instances" not in stream.getvalue()
