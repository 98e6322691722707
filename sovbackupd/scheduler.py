"""Cron parsing on APScheduler 3.x: the only module that imports apscheduler."""

from __future__ import annotations

from datetime import tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

_CRON_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = ("minute", "hour", "day", "month", "day_of_week")


def _cron_day(token: str) -> int:
    """Return the crontab day number (0 = Sunday) of a number or a name."""
    lowered = token.lower()
    if lowered in _CRON_DAY_NAMES:
        return _CRON_DAY_NAMES.index(lowered)
    if not token.isdigit() or int(token) > 7:
        raise ValueError(f"bad day of week {token!r}")
    return int(token) % 7


def _day_of_week(field: str) -> str:
    """Translate a crontab day-of-week field into APScheduler's terms.

    APScheduler 3.x counts weekdays from Monday = 0, crontab from Sunday = 0 (and 7), so
    ``0 3 * * 0`` would fire on Mondays if passed through. The field is expanded into an
    explicit list of day names, which both agree on.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"bad step in day of week {part!r}")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first_text, last_text = span.split("-", 1)
            first, last = _cron_day(first_text), _cron_day(last_text)
            if first_text == "7":  # 7-7 is Sunday alone, 7-1 runs backwards
                first = 7
            if last_text == "7":
                last = 7
        else:
            first = last = _cron_day(span)
        if last < first:
            raise ValueError(f"day of week range {span!r} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_CRON_DAY_NAMES[day] for day in sorted(days))


def parse_cron(expression: str, timezone: tzinfo | str) -> BaseTrigger:
    """Return the trigger for a 5-field crontab line, or 6 fields with seconds first.

    As in crontab, when both day-of-month and day-of-week are restricted the job runs on
    days matching either (APScheduler alone would need both).
    """
    fields = expression.split()
    if len(fields) == 5:
        seconds = "0"
    elif len(fields) == 6:
        seconds, fields = fields[0], fields[1:]
    else:
        raise ValueError(f"cron expression {expression!r} needs 5 fields (or 6 with seconds)")
    values = dict(zip(_FIELDS, fields, strict=True))
    values["day_of_week"] = _day_of_week(values["day_of_week"])
    if values["day"] != "*" and values["day_of_week"] != "*":
        by_date = CronTrigger(second=seconds, timezone=timezone, **{**values, "day_of_week": "*"})
        by_weekday = CronTrigger(second=seconds, timezone=timezone, **{**values, "day": "*"})
        return OrTrigger([by_date, by_weekday])
    return CronTrigger(second=seconds, timezone=timezone, **values)
