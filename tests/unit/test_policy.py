"""GFS retention as a pure function: restic's forget rules plus the safety rules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sovbackupd import policy
from sovbackupd.config.models import Policy
from sovbackupd.policy import UNLIMITED, Candidate, Duration, Pin, Rules

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2030, 1, 1, tzinfo=UTC)
"""When the hand-worked decisions are made: after every timeline, with no pin or manual backup."""


def utc(text: str) -> datetime:
    """Return the UTC time written as ``YYYY-MM-DD HH:MM[:SS]``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def candidate(moment: datetime, *, ok: bool = True) -> Candidate:
    """Return a backup named the way archives are named, from its UTC time."""
    stamp = moment.astimezone(UTC)
    return Candidate(name=f"sovereigncore_backup_{stamp:%Y%m%d_%H%M%S}", time=stamp, ok=ok)


def timeline(*texts: str) -> list[Candidate]:
    """Return successful backups at the given UTC times."""
    return [candidate(utc(text)) for text in texts]


def daily_backups(first: date, last: date, hour: int = 2) -> list[Candidate]:
    """Return one successful backup a day at *hour* UTC from *first* to *last*."""
    days = (last - first).days + 1
    return [
        candidate(
            datetime.combine(first + timedelta(days=offset), datetime.min.time(), UTC)
            + timedelta(hours=hour)
        )
        for offset in range(days)
    ]


def kept(
    candidates: Sequence[Candidate], rules: Rules, timezone: ZoneInfo | None = None
) -> list[str]:
    """Return the kept backups' UTC times as ``YYYY-MM-DD HH:MM:SS``, newest first."""
    decisions = policy.decide(candidates, rules, timezone or ZoneInfo("UTC"), now=NOW)
    return [f"{d.time.astimezone(UTC):%Y-%m-%d %H:%M:%S}" for d in decisions if d.keep]


def reasons_by_time(
    candidates: Sequence[Candidate], rules: Rules, timezone: ZoneInfo | None = None
) -> dict[str, tuple[str, ...]]:
    """Return every backup's reasons, keyed by its UTC time."""
    decisions = policy.decide(candidates, rules, timezone or ZoneInfo("UTC"), now=NOW)
    return {f"{d.time.astimezone(UTC):%Y-%m-%d %H:%M:%S}": d.reasons for d in decisions}


def times(*texts: str) -> list[str]:
    """Normalise ``YYYY-MM-DD HH:MM`` times to the form kept() returns."""
    return [f"{utc(text):%Y-%m-%d %H:%M:%S}" for text in texts]


# --- period rules -------------------------------------------------------------------------


def test_hourly_rule_keeps_newest_backup_of_each_hour() -> None:
    """Hourly 3 keeps the newest backup of each of the three newest hours."""
    backups = timeline(
        "2026-01-02 10:00", "2026-01-02 10:30",
        "2026-01-02 11:00", "2026-01-02 11:30",
        "2026-01-02 12:00", "2026-01-02 12:30",
        "2026-01-02 13:00", "2026-01-02 13:30",
    )  # fmt: skip
    assert kept(backups, Rules(hourly=3)) == times(
        "2026-01-02 13:30", "2026-01-02 12:30", "2026-01-02 11:30"
    )
    reasons = reasons_by_time(backups, Rules(hourly=3))
    assert reasons[times("2026-01-02 12:30")[0]] == ("hourly 2026-01-02 12:00",)
    assert reasons[times("2026-01-02 10:00")[0]] == ()


def test_daily_rule_keeps_newest_backup_of_each_day() -> None:
    """Daily 2 keeps the last backup of the two newest days and deletes the rest."""
    backups = timeline(
        "2026-01-01 02:00", "2026-01-01 14:00",
        "2026-01-02 02:00", "2026-01-02 14:00",
        "2026-01-03 02:00", "2026-01-03 14:00",
    )  # fmt: skip
    assert kept(backups, Rules(daily=2)) == times("2026-01-03 14:00", "2026-01-02 14:00")


def test_several_backups_in_one_hour_keep_only_the_newest() -> None:
    """Backups in the same hour share one hourly period; the newest of them is kept."""
    backups = timeline(
        "2026-01-02 12:30",
        "2026-01-02 13:10", "2026-01-02 13:50",
        "2026-01-02 14:00", "2026-01-02 14:20", "2026-01-02 14:40",
    )  # fmt: skip
    assert kept(backups, Rules(hourly=2)) == times("2026-01-02 14:40", "2026-01-02 13:50")


def test_seed_policy_over_two_years_of_daily_backups() -> None:
    """Daily 30, weekly 12, monthly 12, yearly 7 over 2024-2025 keeps exactly 49 backups."""
    backups = daily_backups(date(2024, 1, 1), date(2025, 12, 31))
    assert len(backups) == 731
    rules = Rules(daily=30, weekly=12, monthly=12, yearly=7)
    at_two = [f"{day} 02:00" for day in (
        # daily: 2025-12-02 .. 2025-12-31
        *(f"2025-12-{d:02d}" for d in range(31, 1, -1)),
        # weekly beyond the dailies: the Sundays; 2025-12-31 is in 2026-W01
        "2025-11-30", "2025-11-23", "2025-11-16", "2025-11-09", "2025-11-02",
        "2025-10-26", "2025-10-19",
        # monthly beyond those: the last day of each month
        "2025-10-31", "2025-09-30", "2025-08-31", "2025-07-31", "2025-06-30",
        "2025-05-31", "2025-04-30", "2025-03-31", "2025-02-28", "2025-01-31",
        # yearly: 2024's last day, then the oldest while 5 years of budget are left
        "2024-12-31", "2024-01-01",
    )]  # fmt: skip
    expected = sorted(times(*at_two), reverse=True)
    assert kept(backups, rules) == expected
    assert len(expected) == 49

    reasons = reasons_by_time(backups, rules)
    assert reasons[times("2025-12-31 02:00")[0]] == (
        "daily 2025-12-31",
        "weekly 2026-W01",
        "monthly 2025-12",
        "yearly 2025",
        "newest successful backup",
    )
    assert reasons[times("2025-12-02 02:00")[0]] == ("daily 2025-12-02",)
    assert reasons[times("2025-12-01 02:00")[0]] == ()  # day 31: past the daily budget
    assert reasons[times("2025-10-19 02:00")[0]] == ("weekly 2025-W42",)
    assert reasons[times("2025-10-12 02:00")[0]] == ()  # week 13
    assert reasons[times("2025-01-31 02:00")[0]] == ("monthly 2025-01",)
    assert reasons[times("2024-12-31 02:00")[0]] == ("yearly 2024",)
    assert reasons[times("2024-01-01 02:00")[0]] == ("oldest yearly 2024",)
    assert reasons[times("2024-01-02 02:00")[0]] == ()


def test_irregular_gaps_count_only_periods_that_have_a_backup() -> None:
    """With the server off for weeks, daily 5 reaches back past the gap to older days."""
    backups = timeline(
        "2026-01-03 02:00",
        "2026-01-04 02:00", "2026-01-04 20:00",
        "2026-01-05 02:00",
        # off for six weeks
        "2026-02-19 02:00", "2026-02-20 02:00",
        "2026-03-01 02:00", "2026-03-01 09:00",
    )  # fmt: skip
    assert kept(backups, Rules(daily=5)) == times(
        "2026-03-01 09:00",
        "2026-02-20 02:00",
        "2026-02-19 02:00",
        "2026-01-05 02:00",
        "2026-01-04 20:00",
    )
    # ISO weeks with a backup: 2026-W09 (Mar 1), W08 (Feb 19-20), W01 (Jan 3-4), W02 (Jan 5).
    assert kept(backups, Rules(weekly=3)) == times(
        "2026-03-01 09:00", "2026-02-20 02:00", "2026-01-05 02:00"
    )


def test_period_boundaries_at_midnight_belong_to_the_new_period() -> None:
    """00:00:00 starts a new day and month; 23:59:59 is still the old one."""
    backups = timeline("2026-01-31 12:00:00", "2026-01-31 23:59:59", "2026-02-01 00:00:00")
    assert kept(backups, Rules(daily=2)) == times("2026-02-01 00:00:00", "2026-01-31 23:59:59")
    assert kept(backups, Rules(monthly=1)) == times("2026-02-01 00:00:00")
    reasons = reasons_by_time(backups, Rules(monthly=2))
    assert reasons[times("2026-01-31 23:59:59")[0]] == ("monthly 2026-01",)
    assert reasons[times("2026-01-31 12:00:00")[0]] == ()


def test_iso_week_53_spans_the_year_boundary() -> None:
    """2026-12-28 .. 2027-01-03 is one ISO week, 2026-W53; years stay calendar years."""
    backups = timeline(
        "2026-12-27 02:00",  # Sunday, 2026-W52
        "2026-12-28 02:00",  # Monday, 2026-W53
        "2026-12-31 02:00",  # Thursday, 2026-W53
        "2027-01-01 02:00",  # Friday, still 2026-W53
        "2027-01-03 02:00",  # Sunday, last day of 2026-W53
        "2027-01-04 02:00",  # Monday, 2027-W01
    )
    assert kept(backups, Rules(weekly=3)) == times(
        "2027-01-04 02:00", "2027-01-03 02:00", "2026-12-27 02:00"
    )
    reasons = reasons_by_time(backups, Rules(weekly=3))
    assert reasons[times("2027-01-03 02:00")[0]] == ("weekly 2026-W53",)
    assert kept(backups, Rules(yearly=2)) == times("2027-01-04 02:00", "2026-12-31 02:00")


def test_autumn_dst_change_in_berlin_uses_local_days_and_hours() -> None:
    """On 2026-10-25 Berlin repeats 02:00-03:00; both 02:30s fall in one local hour and day."""
    backups = [
        candidate(datetime(2026, 10, 24, 2, 30, tzinfo=BERLIN)),  # CEST, 00:30 UTC
        candidate(datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN)),  # CEST, 00:30 UTC
        candidate(datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN)),  # CET, 01:30 UTC
        candidate(datetime(2026, 10, 26, 2, 30, tzinfo=BERLIN)),  # CET, 01:30 UTC
    ]
    assert [c.time.strftime("%H:%M") for c in backups] == ["00:30", "00:30", "01:30", "01:30"]
    assert kept(backups, Rules(daily=3), BERLIN) == times(
        "2026-10-26 01:30", "2026-10-25 01:30", "2026-10-24 00:30"
    )
    reasons = reasons_by_time(backups, Rules(hourly=2), BERLIN)
    assert reasons[times("2026-10-25 01:30")[0]] == ("hourly 2026-10-25 02:00",)
    assert reasons[times("2026-10-25 00:30")[0]] == ()  # same local hour, older


def test_periods_follow_the_policy_timezone_not_utc() -> None:
    """23:30 UTC on June 30 is already July 1 in Berlin, so it is July's backup there."""
    backups = timeline("2026-06-15 12:00", "2026-06-30 23:30", "2026-07-15 12:00")
    assert kept(backups, Rules(monthly=2)) == times("2026-07-15 12:00", "2026-06-30 23:30")
    assert kept(backups, Rules(monthly=2), BERLIN) == times("2026-07-15 12:00", "2026-06-15 12:00")


def test_spring_dst_change_in_berlin_keeps_distinct_local_days() -> None:
    """Across 2026-03-29 (a 23-hour day) each local day keeps its newest backup."""
    backups = timeline(
        "2026-03-27 23:30",  # 2026-03-28 00:30 CET
        "2026-03-28 22:30",  # 2026-03-28 23:30 CET
        "2026-03-28 23:30",  # 2026-03-29 00:30 CET
        "2026-03-29 21:30",  # 2026-03-29 23:30 CEST
        "2026-03-29 22:30",  # 2026-03-30 00:30 CEST
    )
    assert kept(backups, Rules(daily=3), BERLIN) == times(
        "2026-03-29 22:30", "2026-03-29 21:30", "2026-03-28 22:30"
    )


def test_oldest_backup_is_kept_while_a_rule_is_short_of_its_count() -> None:
    """Daily 7 over three days keeps each day's newest and, budget left, the oldest too."""
    backups = timeline(
        "2026-01-01 02:00", "2026-01-01 14:00",
        "2026-01-02 02:00", "2026-01-02 14:00",
        "2026-01-03 02:00", "2026-01-03 14:00",
    )  # fmt: skip
    reasons = reasons_by_time(backups, Rules(daily=7))
    assert kept(backups, Rules(daily=7)) == times(
        "2026-01-03 14:00", "2026-01-02 14:00", "2026-01-01 14:00", "2026-01-01 02:00"
    )
    assert reasons[times("2026-01-01 02:00")[0]] == ("oldest daily 2026-01-01",)


def test_oldest_backup_is_deleted_when_the_count_is_used_up() -> None:
    """Daily 3 over exactly three days has no budget left for the oldest backup."""
    backups = timeline(
        "2026-01-01 02:00", "2026-01-01 14:00",
        "2026-01-02 14:00", "2026-01-03 14:00",
    )  # fmt: skip
    assert kept(backups, Rules(daily=3)) == times(
        "2026-01-03 14:00", "2026-01-02 14:00", "2026-01-01 14:00"
    )


def test_a_backup_kept_by_several_rules_lists_every_reason() -> None:
    """The newest backup names each rule that keeps it."""
    backups = timeline("2026-01-01 02:00", "2026-01-02 02:00")
    rules = Rules(last=1, daily=1, within=Duration(days=1))
    assert reasons_by_time(backups, rules)[times("2026-01-02 02:00")[0]] == (
        "daily 2026-01-02",
        "last 1 of 1",
        "within 1d",
        "newest successful backup",
    )


# --- keep-last, keep-within, unlimited, no rules ------------------------------------------


def test_keep_last_keeps_the_newest_backups_whatever_their_time() -> None:
    """keep_last 3 keeps the three newest backups, even within one hour."""
    backups = timeline(
        "2026-01-01 02:00", "2026-01-02 02:00", "2026-01-02 02:10", "2026-01-02 02:20"
    )
    assert kept(backups, Rules(last=3)) == times(
        "2026-01-02 02:20", "2026-01-02 02:10", "2026-01-02 02:00"
    )
    assert reasons_by_time(backups, Rules(last=3))[times("2026-01-02 02:00")[0]] == ("last 3 of 3",)


def test_keep_within_keeps_backups_strictly_after_newest_minus_duration() -> None:
    """Within 2d of 2026-01-10 12:00 keeps what is after 2026-01-08 12:00, not at it."""
    backups = timeline(
        "2026-01-08 11:59:59", "2026-01-08 12:00:00", "2026-01-08 12:00:01", "2026-01-10 12:00"
    )
    assert kept(backups, Rules(within=policy.parse_duration("2d"))) == times(
        "2026-01-10 12:00:00", "2026-01-08 12:00:01"
    )


def test_keep_within_months_overflow_like_go_add_date() -> None:
    """One month before 2026-03-31 is Go's "February 31", i.e. 2026-03-03."""
    backups = timeline(
        "2026-02-28 12:00", "2026-03-03 12:00", "2026-03-03 13:00", "2026-03-31 12:00"
    )
    assert kept(backups, Rules(within=Duration(months=1))) == times(
        "2026-03-31 12:00", "2026-03-03 13:00"
    )


def test_keep_within_counts_from_the_newest_successful_backup() -> None:
    """A newer unverified backup does not move the keep-within window."""
    backups = [
        *timeline("2026-01-01 00:00", "2026-01-02 00:00", "2026-01-03 00:00"),
        candidate(utc("2026-01-09 00:00"), ok=False),
    ]
    assert kept(backups, Rules(within=Duration(days=1, hours=1))) == times(
        "2026-01-09 00:00", "2026-01-03 00:00", "2026-01-02 00:00"
    )


def test_unlimited_keeps_every_period_and_the_oldest() -> None:
    """Daily unlimited keeps the newest of every day plus the oldest backup."""
    backups = timeline(
        "2026-01-01 02:00", "2026-01-01 14:00", "2026-01-02 02:00", "2026-01-02 14:00"
    )
    assert kept(backups, Rules(daily=UNLIMITED)) == times(
        "2026-01-02 14:00", "2026-01-01 14:00", "2026-01-01 02:00"
    )
    assert kept(backups, Rules(last=UNLIMITED)) == kept(backups, Rules())


def test_no_rules_keeps_every_backup() -> None:
    """With no rule at all nothing is deleted, as restic's forget without a policy."""
    backups = daily_backups(date(2026, 1, 1), date(2026, 1, 10))
    decisions = policy.decide(backups, Rules(daily=0, within=Duration()), UTC, now=NOW)
    assert all(d.keep for d in decisions)
    assert decisions[-1].reasons == ("no retention rule",)
    assert decisions[0].reasons == ("no retention rule", "newest successful backup")


# --- safety rules -------------------------------------------------------------------------


def test_unverified_backups_are_never_deleted_and_never_count() -> None:
    """An unverified backup is kept and does not use up a day of the daily rule."""
    backups = [
        *timeline("2026-01-01 02:00", "2026-01-02 02:00", "2026-01-03 02:00"),
        candidate(utc("2026-01-04 02:00"), ok=False),
        candidate(utc("2025-12-01 02:00"), ok=False),
    ]
    reasons = reasons_by_time(backups, Rules(daily=2))
    assert kept(backups, Rules(daily=2)) == times(
        "2026-01-04 02:00", "2026-01-03 02:00", "2026-01-02 02:00", "2025-12-01 02:00"
    )
    assert reasons[times("2026-01-04 02:00")[0]] == ("unverified: never deleted by retention",)
    assert reasons[times("2026-01-03 02:00")[0]] == (
        "daily 2026-01-03",
        "newest successful backup",
    )


def test_newest_successful_backup_is_kept_without_any_matching_rule() -> None:
    """Even a rule that keeps nothing (within 1h of itself) keeps the newest backup."""
    backups = timeline("2026-01-01 02:00", "2026-01-02 02:00")
    assert kept(backups, Rules(within=Duration(hours=1))) == times("2026-01-02 02:00")


def test_only_unverified_backups_are_all_kept() -> None:
    """Without a successful backup nothing is deleted."""
    backups = [candidate(utc("2026-01-01 02:00"), ok=False)]
    assert kept(backups, Rules(daily=1)) == times("2026-01-01 02:00")
    assert policy.decide([], Rules(daily=1), UTC, now=NOW) == []


def test_decisions_are_newest_first_whatever_the_input_order() -> None:
    """The result lists every candidate once, newest first."""
    backups = timeline("2026-01-02 02:00", "2026-01-03 02:00", "2026-01-01 02:00")
    decisions = policy.decide(backups, Rules(daily=1), UTC, now=NOW)
    assert [d.time for d in decisions] == sorted((c.time for c in backups), reverse=True)


def test_naive_times_and_repeated_names_are_rejected() -> None:
    """A naive time or a name given twice is a caller bug, not a retention decision."""
    naive = Candidate(name="a", time=datetime(2026, 1, 1), ok=True)
    with pytest.raises(ValueError, match="naive"):
        policy.decide([naive], Rules(), UTC, now=NOW)
    twice = timeline("2026-01-01 02:00") * 2
    with pytest.raises(ValueError, match="twice"):
        policy.decide(twice, Rules(), UTC, now=NOW)


# --- durations and rules from the policy --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1y2M3d4h", Duration(years=1, months=2, days=3, hours=4)),
        ("7d", Duration(days=7)),
        ("36h", Duration(hours=36)),
        ("4h1y", Duration(years=1, hours=4)),
        (" 2M ", Duration(months=2)),
    ],
)
def test_parse_duration_reads_restic_style_durations(text: str, expected: Duration) -> None:
    """Durations are numbers with y, M, d, h units in any order."""
    assert policy.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "1m", "1w", "-1d", "1d2d", "1.5d", "1d 2h"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    """Anything but number-unit pairs with y, M, d, h, each once, is a ValueError."""
    with pytest.raises(ValueError, match="duration"):
        policy.parse_duration(text)


def test_duration_prints_as_the_policy_writes_it() -> None:
    """str() gives back the compact form."""
    assert str(policy.parse_duration("4h1y2M")) == "1y2M4h"


def test_rules_reject_negative_counts_other_than_unlimited() -> None:
    """Only None, 0.. and UNLIMITED are counts."""
    with pytest.raises(ValueError, match="daily"):
        Rules(daily=-2)


def test_rules_from_policy_map_tiers_and_retention(tmp_path: Path) -> None:
    """tiers.*.keep, keep_last and keep_within become rules; keep 0 and absent tiers are off."""
    loaded = Policy.model_validate(
        {
            "sources": {"dirs": [str(tmp_path)]},
            "tiers": {
                "hourly": {"keep": 0},
                "daily": {"keep": 30},
                "weekly": {"keep": 12},
                "yearly": {"keep": "unlimited"},
            },
            "retention": {"keep_last": 3, "keep_within": "1y2M"},
        }
    )
    assert Rules.from_policy(loaded) == Rules(
        last=3,
        daily=30,
        weekly=12,
        yearly=UNLIMITED,
        within=Duration(years=1, months=2),
        safety_within=Duration(days=7),
        manual_within=Duration(days=7),
    )
    bare = Policy.model_validate({"sources": {"dirs": [str(tmp_path)]}})
    assert Rules.from_policy(bare).is_empty
    no_manual = Policy.model_validate(
        {"sources": {"dirs": [str(tmp_path)]}, "retention": {"manual_keep": "0d"}}
    )
    assert Rules.from_policy(no_manual).manual_within is None
    assert str(Rules(daily=30, yearly=UNLIMITED, within=Duration(days=7))) == (
        "keep 30 daily, all yearly, within 7d of the newest"
    )


def test_safety_backups_stay_out_of_the_tiers_and_expire_after_safety_within() -> None:
    """A pre-restore backup neither fills a period nor displaces one; it goes after 7d."""
    day = datetime(2026, 3, 10, 12, tzinfo=UTC)
    candidates = [
        Candidate("daily-old", day - timedelta(days=1), ok=True),
        Candidate("safety-old", day - timedelta(days=9), ok=True, safety=True),
        Candidate("daily", day, ok=True),
        Candidate("safety", day + timedelta(hours=1), ok=True, safety=True),
    ]
    rules = Rules(daily=2, safety_within=Duration(days=7))
    decisions = {
        decision.name: decision for decision in policy.decide(candidates, rules, UTC, now=NOW)
    }
    assert decisions["daily"].reasons == ("daily 2026-03-10", policy.REASON_NEWEST)
    assert decisions["daily-old"].reasons == ("daily 2026-03-09",)
    assert decisions["safety"].reasons == ("pre-restore safety backup, within 7d",)
    assert not decisions["safety-old"].keep


def test_safety_backups_are_kept_when_no_rule_is_set() -> None:
    """With no retention rule at all, nothing is deleted, safety backups included."""
    moment = datetime(2026, 3, 10, tzinfo=UTC)
    candidates = [
        Candidate("safety", moment - timedelta(days=400), ok=True, safety=True),
        Candidate("regular", moment, ok=True),
    ]
    assert all(decision.keep for decision in policy.decide(candidates, Rules(), UTC, now=NOW))


# --- manual backups and pins --------------------------------------------------------------


def test_a_manual_backup_a_minute_before_another_is_kept_for_manual_within() -> None:
    """backup; backup: the hourly bucket keeps the second, manual_within keeps the first."""
    history = candidate(utc("2026-03-09 02:00"))
    first = replace(candidate(utc("2026-03-10 14:00")), manual=True)
    second = replace(candidate(utc("2026-03-10 14:01")), manual=True)
    timeline = [history, first, second]
    rules = Rules(hourly=24, daily=7, manual_within=Duration(days=7))
    decisions = policy.decide(timeline, rules, UTC, now=utc("2026-03-10 14:02"))
    by_name = {decision.name: decision for decision in decisions}
    assert by_name[first.name].reasons == ("manual (until 2026-03-17 14:00 UTC)",)
    assert by_name[second.name].keep
    without = policy.decide(timeline, replace(rules, manual_within=None), UTC, now=NOW)
    assert not next(d for d in without if d.name == first.name).keep, "what the window prevents"


def test_a_manual_backup_follows_the_rules_once_manual_within_has_passed() -> None:
    """After manual_within only the tiers' rules can keep a manual backup."""
    first = replace(candidate(utc("2026-03-10 14:00")), manual=True)
    second = candidate(utc("2026-03-10 14:30"))
    rules = Rules(hourly=1, manual_within=Duration(days=7))
    still = policy.decide([first, second], rules, UTC, now=utc("2026-03-17 13:59"))
    assert [decision.keep for decision in still] == [True, True]
    later = policy.decide([first, second], rules, UTC, now=utc("2026-03-17 14:00"))
    assert [decision.keep for decision in later] == [True, False]


def test_a_pinned_backup_is_kept_until_its_pin_ends() -> None:
    """A pin keeps what no rule keeps; one with an end stops keeping at that end."""
    end = utc("2026-04-01 00:00")
    old = replace(candidate(utc("2026-01-01 02:00")), pin=Pin())
    dated = replace(candidate(utc("2026-01-02 02:00")), pin=Pin(until=end))
    newest = candidate(utc("2026-03-10 02:00"))
    rules = Rules(daily=1)
    before = {d.name: d for d in policy.decide([old, dated, newest], rules, BERLIN, now=NOW)}
    assert before[old.name].reasons == (policy.REASON_PINNED,)
    assert not before[dated.name].keep, "NOW is after the pin's end"
    during = policy.decide([old, dated, newest], rules, BERLIN, now=end - timedelta(minutes=1))
    assert during[1].reasons == ("pinned until 2026-04-01 02:00 CEST",)


def test_an_unreadable_pin_keeps_its_backup_for_ever() -> None:
    """A pin whose file could not be read holds like a pin without an end."""
    broken = replace(candidate(utc("2026-01-01 02:00")), pin=Pin(problem="not JSON"))
    newest = candidate(utc("2026-03-10 02:00"))
    decisions = policy.decide([broken, newest], Rules(daily=1), UTC, now=NOW)
    assert decisions[1].reasons == (policy.REASON_PIN_UNREADABLE,)


def test_a_pin_on_an_unverified_backup_is_named_beside_the_unverified_reason() -> None:
    """Unverified backups stay anyway; their pin still shows."""
    pinned = replace(candidate(utc("2026-01-01 02:00"), ok=False), pin=Pin())
    decisions = policy.decide([pinned], Rules(daily=1), UTC, now=NOW)
    assert decisions[0].reasons == (policy.REASON_UNVERIFIED, policy.REASON_PINNED)


def test_naive_now_and_naive_pin_ends_are_rejected() -> None:
    """The decision's now and a pin's end are points in time."""
    with pytest.raises(ValueError, match="aware now"):
        policy.decide([], Rules(), UTC, now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="time zone"):
        Pin(until=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("start", "duration", "expected"),
    [
        ("2026-01-31 10:00", Duration(months=1), "2026-03-03 10:00"),
        ("2026-03-10 14:00", Duration(days=7), "2026-03-17 14:00"),
        ("2026-03-10 14:00", Duration(years=1, hours=36), "2027-03-12 02:00"),
    ],
)
def test_duration_after_adds_like_go_add_date(
    start: str, duration: Duration, expected: str
) -> None:
    """after() mirrors before(): calendar steps overflow as Go's time.Date, then hours."""
    assert duration.after(utc(start), UTC) == utc(expected)


def test_duration_after_past_the_calendar_gives_the_latest_time() -> None:
    """A duration reaching past year 9999 does not raise: it ends at LATEST."""
    assert Duration(years=9000).after(utc("2026-01-01 00:00"), UTC) == policy.LATEST


def test_ends_at_the_calendars_edge_are_shown_in_any_zone() -> None:
    """A pin or manual window ending near year 9999 is a reason, not an OverflowError."""
    far = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-12)))
    pinned = replace(candidate(utc("2026-01-01 02:00")), pin=Pin(until=far))
    manual = replace(candidate(utc("2026-01-02 02:00")), manual=True)
    rules = Rules(daily=1, manual_within=Duration(years=9000))
    decisions = policy.decide([pinned, manual], rules, ZoneInfo("Pacific/Kiritimati"), now=NOW)
    assert decisions[0].reasons[-1] == "manual (until 9999-12-30 14:00 +14)"
    assert decisions[1].reasons == ("pinned until 9999-12-30 14:00 +14",)


# --- properties ---------------------------------------------------------------------------

START = datetime(2024, 1, 1, tzinfo=UTC)
counts = st.one_of(st.none(), st.integers(0, 6), st.just(UNLIMITED))
rules_strategy = st.builds(
    Rules,
    last=counts,
    hourly=counts,
    daily=counts,
    weekly=counts,
    monthly=counts,
    yearly=counts,
    within=st.one_of(
        st.none(),
        st.builds(
            Duration,
            years=st.integers(0, 1),
            months=st.integers(0, 3),
            days=st.integers(0, 40),
            hours=st.integers(0, 48),
        ),
    ),
)
timezones = st.sampled_from([ZoneInfo("UTC"), BERLIN, ZoneInfo("America/New_York")])


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    """Draw up to 40 backups over about two years, some of them unverified."""
    offsets = draw(st.sets(st.integers(0, 2 * 365 * 24 * 4), max_size=40))
    return [
        candidate(START + timedelta(minutes=15 * offset), ok=draw(st.booleans()) or offset % 7 > 0)
        for offset in offsets
    ]


def kept_names(decisions: Iterable[policy.Decision]) -> set[str]:
    return {d.name for d in decisions if d.keep}


@settings(max_examples=300, deadline=None)
@given(candidate_lists(), rules_strategy, timezones)
def test_applying_the_decision_twice_deletes_nothing_more(
    candidates: list[Candidate], rules: Rules, timezone: ZoneInfo
) -> None:
    """Deciding again over the survivors keeps every survivor."""
    survivors_names = kept_names(policy.decide(candidates, rules, timezone, now=NOW))
    survivors = [c for c in candidates if c.name in survivors_names]
    assert kept_names(policy.decide(survivors, rules, timezone, now=NOW)) == survivors_names


@settings(max_examples=300, deadline=None)
@given(
    candidate_lists(),
    rules_strategy,
    timezones,
    st.sampled_from(["last", "hourly", "daily", "weekly", "monthly", "yearly"]),
    st.integers(1, 5),
)
def test_raising_a_count_never_deletes_more(
    candidates: list[Candidate], rules: Rules, timezone: ZoneInfo, field: str, extra: int
) -> None:
    """A larger count (or UNLIMITED) keeps a superset of what the smaller one kept."""
    current: int | None = getattr(rules, field)
    # No rule at all keeps everything, so turning the first rule on is not "raising" a count.
    assume(current != UNLIMITED and not rules.is_empty)
    before = kept_names(policy.decide(candidates, rules, timezone, now=NOW))
    for raised in ((current or 0) + extra, UNLIMITED):
        bigger = Rules(**{**rules.__dict__, field: raised})
        assert before <= kept_names(policy.decide(candidates, bigger, timezone, now=NOW))


@settings(max_examples=300, deadline=None)
@given(candidate_lists(), rules_strategy, timezones)
def test_safety_rules_hold_for_any_timeline(
    candidates: list[Candidate], rules: Rules, timezone: ZoneInfo
) -> None:
    """Newest ok kept, unverified kept, every kept backup has a reason, deleted ones none."""
    decisions = policy.decide(candidates, rules, timezone, now=NOW)
    assert len(decisions) == len(candidates)
    by_name = {c.name: c for c in candidates}
    successful = sorted((c for c in candidates if c.ok), key=lambda c: c.time)
    if successful:
        newest = next(d for d in decisions if d.name == successful[-1].name)
        assert newest.keep
        assert "newest successful backup" in newest.reasons
    for decision in decisions:
        assert decision.keep == bool(decision.reasons)
        if not by_name[decision.name].ok:
            assert decision.keep
            assert decision.reasons == ("unverified: never deleted by retention",)
    assert [d.time for d in decisions] == sorted((d.time for d in decisions), reverse=True)


@settings(max_examples=200, deadline=None)
@given(candidate_lists(), rules_strategy, timezones)
def test_no_more_periods_are_kept_than_the_counts_allow(
    candidates: list[Candidate], rules: Rules, timezone: ZoneInfo
) -> None:
    """Each count rule keeps at most its count of backups, the oldest one included."""
    decisions = policy.decide(candidates, rules, timezone, now=NOW)
    for label in ("hourly", "daily", "weekly", "monthly", "yearly"):
        count: int | None = getattr(rules, label)
        if not count or count == UNLIMITED:
            continue
        by_rule = [
            d
            for d in decisions
            if any(r.startswith((f"{label} ", f"oldest {label} ")) for r in d.reasons)
        ]
        assert len(by_rule) <= count


pins = st.one_of(
    st.none(),
    st.just(Pin()),
    st.just(Pin(problem="unreadable")),
    st.builds(
        lambda hours: Pin(until=START + timedelta(hours=hours)), st.integers(0, 3 * 365 * 24)
    ),
)
manual_windows = st.one_of(st.none(), st.builds(Duration, hours=st.integers(1, 40 * 24)))


@st.composite
def marked_timelines(draw: st.DrawFn) -> tuple[list[Candidate], Rules, datetime]:
    """Draw a timeline with manual and pinned backups, rules with a manual window, and a now.

    The manual window is in hours only, so that "younger than" is plain elapsed time in
    every zone; now is at or after the newest backup, up to 400 days later.
    """
    drawn = [
        replace(c, manual=draw(st.booleans()), pin=draw(pins)) for c in draw(candidate_lists())
    ]
    rules = replace(draw(rules_strategy), manual_within=draw(manual_windows))
    newest = max((c.time for c in drawn), default=START)
    return drawn, rules, newest + timedelta(hours=draw(st.integers(0, 400 * 24)))


@settings(max_examples=300, deadline=None)
@given(marked_timelines(), timezones)
def test_a_pinned_backup_is_never_deleted(
    marked: tuple[list[Candidate], Rules, datetime], timezone: ZoneInfo
) -> None:
    """A pinned backup is never in the delete set, whatever the timeline and policy.

    That is: a pin without an end, an unreadable pin, and a pin whose end is after now.
    """
    candidates, rules, now = marked
    deleted = {d.name for d in policy.decide(candidates, rules, timezone, now=now) if not d.keep}
    for c in candidates:
        if c.pin is not None and (c.pin.problem or c.pin.until is None or now < c.pin.until):
            assert c.name not in deleted


@settings(max_examples=300, deadline=None)
@given(marked_timelines(), timezones)
def test_a_manual_backup_younger_than_manual_within_is_never_deleted(
    marked: tuple[list[Candidate], Rules, datetime], timezone: ZoneInfo
) -> None:
    """A manual backup younger than manual_keep is never deleted."""
    candidates, rules, now = marked
    assume(rules.manual_within is not None)
    assert rules.manual_within is not None
    window = timedelta(hours=rules.manual_within.hours)
    deleted = {d.name for d in policy.decide(candidates, rules, timezone, now=now) if not d.keep}
    for c in candidates:
        if c.manual and now - c.time < window:
            assert c.name not in deleted


@settings(max_examples=300, deadline=None)
@given(marked_timelines(), timezones)
def test_the_newest_backup_is_never_deleted(
    marked: tuple[list[Candidate], Rules, datetime], timezone: ZoneInfo
) -> None:
    """The newest backup is never deleted, and no unverified one, pins and manual or not."""
    candidates, rules, now = marked
    decisions = policy.decide(candidates, rules, timezone, now=now)
    if decisions:
        assert decisions[0].keep
    unverified = {c.name for c in candidates if not c.ok}
    assert all(d.keep for d in decisions if d.name in unverified)
    assert all(d.keep == bool(d.reasons) for d in decisions)


@settings(max_examples=200, deadline=None)
@given(marked_timelines(), timezones)
def test_pins_and_manual_windows_only_ever_keep_more(
    marked: tuple[list[Candidate], Rules, datetime], timezone: ZoneInfo
) -> None:
    """Removing every pin and the manual window keeps a subset: they never cost a backup."""
    candidates, rules, now = marked
    plain = [replace(c, pin=None, manual=False) for c in candidates]
    without = kept_names(
        policy.decide(plain, replace(rules, manual_within=None), timezone, now=now)
    )
    assert without <= kept_names(policy.decide(candidates, rules, timezone, now=now))


@settings(max_examples=200, deadline=None)
@given(candidate_lists(), rules_strategy, timezones, st.integers(0, 2 * 365 * 24 * 4))
def test_backups_dated_after_now_are_kept_and_take_no_rules_place(
    candidates: list[Candidate], rules: Rules, timezone: ZoneInfo, offset: int
) -> None:
    """Backups dated after now are kept and change nothing about the others.

    Invariant: at any *now*, the decision on the backups dated before it is the one made
    without the later ones (a clock that stepped back costs no real backup).
    """
    now = START + timedelta(minutes=15 * offset)
    present = [c for c in candidates if c.time <= now]
    decided = {d.name: d for d in policy.decide(candidates, rules, timezone, now=now)}
    alone = {d.name: d for d in policy.decide(present, rules, timezone, now=now)}
    for c in candidates:
        if c.time > now:
            assert decided[c.name].keep
        else:
            assert decided[c.name] == alone[c.name]
