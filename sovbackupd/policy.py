"""Which backups GFS retention keeps, and why: a pure function of the backups and the rules.

The semantics are restic's ``forget --keep-last/hourly/daily/weekly/monthly/yearly/within``
(``ApplyPolicy`` in restic's ``internal/data/snapshot_policy.go``, 0.16 and later), with
safety rules on top: a backup that did not verify is never deleted and never counts, the
newest successful backup is always kept, a pinned backup stays until its pin is released or
runs out, and a manual backup stays for ``manual_within`` after it was made. Nothing here
reads a clock, a file or the network (the caller passes ``now``); ``retention.py`` carries
the decision out. See docs/retention.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from sovbackupd.config.models import Policy, Tier

UNLIMITED: Final = -1
"""A count that keeps every period, as restic's ``--keep-daily -1``."""

EARLIEST: Final = datetime(1, 1, 2, tzinfo=UTC)
LATEST: Final = datetime(9999, 12, 30, tzinfo=UTC)
"""The range of times that every zone can show: ends beyond it are clamped to it."""

REASON_NO_RULE: Final = "no retention rule"
REASON_NEWEST: Final = "newest successful backup"
REASON_UNVERIFIED: Final = "unverified: never deleted by retention"
REASON_PINNED: Final = "pinned"
REASON_PIN_UNREADABLE: Final = "pinned (pin file unreadable)"
REASON_FUTURE: Final = "dated after now (the clock went back?): kept until then"

_DURATION_UNITS: Final = {"y": "years", "M": "months", "d": "days", "h": "hours"}
_DURATION_SHAPE: Final = re.compile(r"(?:\d+[yMdh])+")
_DURATION_PART: Final = re.compile(r"(\d+)([yMdh])")


@dataclass(frozen=True)
class Duration:
    """A calendar duration as restic's --keep-within takes it: years, months, days, hours."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        """Reject negative parts."""
        if min(self.years, self.months, self.days, self.hours) < 0:
            raise ValueError(f"duration parts must be >= 0, not {self!r}")

    @property
    def is_zero(self) -> bool:
        """Return whether every part is zero (restic treats that as no rule)."""
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        """Return the duration as the policy writes it, e.g. ``1y2M3d4h``."""
        parts = [
            f"{value}{unit}"
            for value, unit in (
                (self.years, "y"),
                (self.months, "M"),
                (self.days, "d"),
                (self.hours, "h"),
            )
            if value
        ]
        return "".join(parts) or "0h"

    def before(self, moment: datetime, timezone: tzinfo) -> datetime:
        """Return *moment* minus this duration, with Go's ``AddDate`` arithmetic.

        Years, months and days move the wall-clock date in *timezone* and overflow the way
        Go's ``time.Date`` normalises (one month before March 31 is "February 31", that is
        March 3 in a common year); hours are then subtracted as elapsed time. A duration
        reaching back past year 1 gives the earliest representable time.
        """
        return self._shift(moment, timezone, -1)

    def after(self, moment: datetime, timezone: tzinfo) -> datetime:
        """Return *moment* plus this duration, the same arithmetic as :meth:`before`.

        A duration reaching past the end of year 9999 gives LATEST.
        """
        return min(self._shift(moment, timezone, 1), LATEST)

    def _shift(self, moment: datetime, timezone: tzinfo, sign: int) -> datetime:
        local = moment.astimezone(timezone)
        month_index = (local.year + sign * self.years) * 12 + (local.month - 1) + sign * self.months
        year, month = divmod(month_index, 12)
        try:
            day = date(year, month + 1, 1) + timedelta(days=local.day - 1 + sign * self.days)
            wall = datetime.combine(day, local.time(), tzinfo=timezone)
            return wall.astimezone(UTC) + sign * timedelta(hours=self.hours)
        except (ValueError, OverflowError):
            # Past the calendar's ends: every backup is within the duration.
            return datetime.min.replace(tzinfo=UTC) if sign < 0 else LATEST


def parse_duration(text: str) -> Duration:
    """Parse a --keep-within duration such as ``1y2M3d4h`` (M is months; no minutes).

    Raise ValueError on anything else: an empty string, unknown or repeated units, signs.
    """
    compact = text.strip()
    if not _DURATION_SHAPE.fullmatch(compact):
        hint = " (months are M; there are no minutes)" if "m" in compact else ""
        raise ValueError(
            f"invalid duration {text!r}: expected numbers with units y, M, d, h "
            f"such as 1y2M3d4h{hint}"
        )
    parts: dict[str, int] = {}
    for number, unit in _DURATION_PART.findall(compact):
        field = _DURATION_UNITS[unit]
        if field in parts:
            raise ValueError(f"invalid duration {text!r}: unit {unit!r} appears twice")
        parts[field] = int(number)
    return Duration(**parts)


@dataclass(frozen=True)
class Pin:
    """An operator's hold on one backup: it is kept until released, or until *until*."""

    until: datetime | None = None
    """When the pin runs out (timezone-aware); None holds it until ``unpin``."""
    problem: str | None = None
    """Why the pin file could not be read; such a pin holds the backup like a plain pin."""

    def __post_init__(self) -> None:
        """Reject a naive *until*: a pin's end must be a point in time."""
        if self.until is not None and self.until.utcoffset() is None:
            raise ValueError(f"a pin's end needs a time zone, not {self.until}")

    def holds(self, now: datetime) -> bool:
        """Return whether the pin still keeps its backup at *now*."""
        return self.until is None or now < self.until


@dataclass(frozen=True)
class Candidate:
    """A backup that retention may keep or delete."""

    name: str
    """Archive name, e.g. ``sovereigncore_backup_20260102_140000``."""
    time: datetime
    """When the backup was made; timezone-aware."""
    ok: bool
    """A successful backup that verified; only these can be kept by a rule, or deleted."""
    safety: bool = False
    """A restore's pre-restore safety backup: outside the tiers, kept for ``safety_within``."""
    manual: bool = False
    """Taken by hand (the ``manual`` tier): kept for ``manual_within`` after it was made."""
    pin: Pin | None = None
    """The operator's pin on this backup, if any."""


@dataclass(frozen=True)
class Rules:
    """restic's forget rules: None (or 0) turns a rule off, UNLIMITED keeps every period."""

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None
    within: Duration | None = None
    safety_within: Duration | None = None
    """How long after the newest backup a pre-restore safety backup is kept."""
    manual_within: Duration | None = None
    """How long after it was made a manual backup is kept, whatever the other rules say."""

    def __post_init__(self) -> None:
        """Reject counts that are neither None, >= 0, nor UNLIMITED."""
        for label, count in self._counts():
            if count is None:
                continue
            if isinstance(count, bool) or not isinstance(count, int):
                raise TypeError(f"{label} must be an int or None, not {count!r}")
            if count < 0 and count != UNLIMITED:
                raise ValueError(f"{label} must be >= 0 or UNLIMITED ({UNLIMITED}), not {count}")

    def _counts(self) -> tuple[tuple[str, int | None], ...]:
        return (
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        )

    @property
    def is_empty(self) -> bool:
        """Return whether no rule is on (then every backup is kept)."""
        counts_off = all(not count for _, count in self._counts())
        return counts_off and (self.within is None or self.within.is_zero)

    def __str__(self) -> str:
        """Describe the rules for logs, e.g. ``keep 30 daily, 12 weekly, within 7d``."""
        words = [
            f"{'all' if count == UNLIMITED else count} {'latest' if label == 'last' else label}"
            for label, count in self._counts()
            if count
        ]
        if self.within is not None and not self.within.is_zero:
            words.append(f"within {self.within} of the newest")
        return "keep " + ", ".join(words) if words else "keep everything (no retention rule)"

    @classmethod
    def from_policy(cls, policy: Policy) -> Rules:
        """Build the rules from tiers.*.keep and retention.keep_last / keep_within / manual_keep.

        A tier that is absent or has ``keep: 0`` is off; ``keep: unlimited`` is UNLIMITED.
        Raise ValueError when a duration is not valid.
        """
        tiers = policy.tiers
        retention = policy.retention
        within = parse_duration(retention.keep_within) if retention.keep_within else None
        safety_within = parse_duration(policy.restore.safety_keep)
        manual_within = parse_duration(retention.manual_keep)
        return cls(
            last=retention.keep_last or None,
            hourly=_tier_count(tiers.hourly),
            daily=_tier_count(tiers.daily),
            weekly=_tier_count(tiers.weekly),
            monthly=_tier_count(tiers.monthly),
            yearly=_tier_count(tiers.yearly),
            within=None if within is None or within.is_zero else within,
            safety_within=None if safety_within.is_zero else safety_within,
            manual_within=None if manual_within.is_zero else manual_within,
        )


def _tier_count(tier: Tier | None) -> int | None:
    if tier is None or tier.keep == 0:
        return None
    if tier.keep == "unlimited":
        return UNLIMITED
    return tier.keep


@dataclass(frozen=True)
class Decision:
    """What retention does with one backup, and why."""

    name: str
    time: datetime
    keep: bool
    reasons: tuple[str, ...]
    """Every rule that keeps the backup, e.g. ``daily 2026-01-02``; empty when deleted."""


def _hour(moment: datetime) -> str:
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} {moment.hour:02d}:00"


def _day(moment: datetime) -> str:
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"


def _iso_week(moment: datetime) -> str:
    year, week, _ = moment.isocalendar()
    return f"{year:04d}-W{week:02d}"


def _month(moment: datetime) -> str:
    return f"{moment.year:04d}-{moment.month:02d}"


def _year(moment: datetime) -> str:
    return f"{moment.year:04d}"


# The period rules in restic's order; each names the period of a time in the policy's zone.
_PERIOD_RULES: Final[tuple[tuple[str, Callable[[datetime], str]], ...]] = (
    ("hourly", _hour),
    ("daily", _day),
    ("weekly", _iso_week),
    ("monthly", _month),
    ("yearly", _year),
)


def _period_rule(
    label: str,
    count: int,
    period_of: Callable[[datetime], str],
    successful: Sequence[Candidate],
    timezone: tzinfo,
) -> dict[str, str]:
    """Return name -> reason for the backups one count rule keeps (restic's bucket walk).

    *successful* is newest first. The newest backup of each new period is kept while the
    rule has budget; when the walk reaches the oldest backup with budget left, the oldest is
    kept too, even if its period already has a newer one ("oldest daily ...").
    """
    kept: dict[str, str] = {}
    budget = count
    previous: str | None = None
    oldest_index = len(successful) - 1
    for index, candidate in enumerate(successful):
        if budget == 0:
            break
        period = period_of(candidate.time.astimezone(timezone))
        if period == previous and index != oldest_index:
            continue
        kept[candidate.name] = (
            f"oldest {label} {period}" if period == previous else f"{label} {period}"
        )
        previous = period
        if budget != UNLIMITED:
            budget -= 1
    return kept


def _last_rule(count: int, successful: Sequence[Candidate]) -> dict[str, str]:
    """Return name -> reason for the newest *count* backups (every backup is its own period)."""
    limit = len(successful) if count == UNLIMITED else count
    of = "all" if count == UNLIMITED else str(count)
    return {
        candidate.name: f"last {position} of {of}"
        for position, candidate in enumerate(successful[:limit], start=1)
    }


def _within_rule(
    within: Duration, successful: Sequence[Candidate], timezone: tzinfo
) -> dict[str, str]:
    """Return name -> reason for backups strictly after newest minus *within*."""
    threshold = within.before(successful[0].time, timezone)
    return {
        candidate.name: f"within {within}" for candidate in successful if candidate.time > threshold
    }


def _check(candidates: Sequence[Candidate], now: datetime) -> None:
    if now.utcoffset() is None:
        raise ValueError(f"the decision needs an aware now, not {now}")
    names: set[str] = set()
    for candidate in candidates:
        if candidate.time.tzinfo is None or candidate.time.utcoffset() is None:
            raise ValueError(f"backup {candidate.name!r} has a naive time {candidate.time}")
        if candidate.name in names:
            raise ValueError(f"backup {candidate.name!r} appears twice")
        names.add(candidate.name)


def format_time(moment: datetime, timezone: tzinfo) -> str:
    """Return *moment* for people, to the minute in *timezone* (clamped to EARLIEST..LATEST)."""
    shown = min(max(moment, EARLIEST), LATEST).astimezone(timezone)
    return shown.strftime("%Y-%m-%d %H:%M %Z")


def _pin_reason(pin: Pin, timezone: tzinfo, now: datetime) -> str | None:
    """Return why *pin* keeps its backup at *now*, or None once it has run out."""
    if pin.problem is not None:
        return REASON_PIN_UNREADABLE
    if not pin.holds(now):
        return None
    if pin.until is None:
        return REASON_PINNED
    return f"pinned until {format_time(pin.until, timezone)}"


def _held_by_operator(
    candidates: Sequence[Candidate], rules: Rules, timezone: tzinfo, now: datetime
) -> dict[str, str]:
    """Return name -> reason for the backups a pin or the manual window keeps at *now*."""
    kept: dict[str, str] = {}
    for candidate in candidates:
        reason = None if candidate.pin is None else _pin_reason(candidate.pin, timezone, now)
        if reason is None and candidate.manual and rules.manual_within is not None:
            until = rules.manual_within.after(candidate.time, timezone)
            if now < until:
                reason = f"manual (until {format_time(until, timezone)})"
        if reason is not None:
            kept[candidate.name] = reason
    return kept


def decide(
    candidates: Sequence[Candidate], rules: Rules, timezone: tzinfo, *, now: datetime
) -> list[Decision]:
    """Decide which backups to keep and why, newest first.

    Periods (hour, day, ISO week, month, year) are taken in *timezone*. Only successful
    backups (``ok``) count toward a rule or may be deleted; the newest successful backup is
    always kept; with no rule at all every backup is kept. Safety backups stay out of the
    rules: each is kept while within ``safety_within`` of the newest backup. Whatever the
    rules, a pinned backup is kept while its pin holds at *now* (a pin that could not be
    read holds for ever), and a manual backup while *now* is within ``manual_within`` of
    its time. A backup dated after *now* (the clock stepped back since it was made) is kept
    and decides nothing: the rules, the newest and the safety window are those of the
    others, so the backups made since are not pruned in its favour. Raise ValueError on a
    naive time or a repeated name.
    """
    _check(candidates, now)
    ordered = sorted(candidates, key=lambda candidate: (candidate.time, candidate.name))
    ordered.reverse()
    reasons: dict[str, list[str]] = {
        candidate.name: [] if candidate.ok else [REASON_UNVERIFIED] for candidate in ordered
    }
    future = [candidate for candidate in ordered if candidate.time > now]
    for candidate in future:
        reasons[candidate.name].append(REASON_FUTURE)
    ordered = ordered[len(future) :]
    successful = [candidate for candidate in ordered if candidate.ok and not candidate.safety]

    def grant(kept: dict[str, str]) -> None:
        for name, reason in kept.items():
            reasons[name].append(reason)

    if successful:
        for label, period_of in _PERIOD_RULES:
            count: int | None = getattr(rules, label)
            if count:
                grant(_period_rule(label, count, period_of, successful, timezone))
        if rules.last:
            grant(_last_rule(rules.last, successful))
        if rules.within is not None and not rules.within.is_zero:
            grant(_within_rule(rules.within, successful, timezone))
        if rules.is_empty:
            grant({candidate.name: REASON_NO_RULE for candidate in successful})
        grant({successful[0].name: REASON_NEWEST})
    safety = [candidate for candidate in ordered if candidate.ok and candidate.safety]
    if safety and rules.is_empty:
        grant({candidate.name: REASON_NO_RULE for candidate in safety})
    elif safety and rules.safety_within is not None:
        threshold = rules.safety_within.before(ordered[0].time, timezone)
        grant(
            {
                candidate.name: f"pre-restore safety backup, within {rules.safety_within}"
                for candidate in safety
                if candidate.time > threshold
            }
        )
    grant(_held_by_operator([*future, *ordered], rules, timezone, now))

    return [
        Decision(
            name=candidate.name,
            time=candidate.time,
            keep=bool(reasons[candidate.name]),
            reasons=tuple(reasons[candidate.name]),
        )
        for candidate in [*future, *ordered]
    ]
