"""Schedules on APScheduler 3.x: the only module that imports apscheduler.

One dispatcher job runs on the union of the tiers' cron triggers. Each time it fires it
asks :func:`due_tiers` which tiers have a scheduled time they have not handled yet, and
makes one backup labelled with all of them; then it asks again, so tiers that came due
while a long backup ran are not lost. At start the same question, asked against the last
successful backup of each tier on disk, is the catch-up of missed runs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

log = structlog.get_logger("sovbackupd.scheduler")

# Triggers start in the past so that they can name scheduled times before they were made.
_SINCE = datetime(2000, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)
_PROBE_YEARS = "2000-2008"  # three leap years, and every date of the others
DISPATCHER = "dispatcher"
CONTROL = "control"  # the executor of housekeeping jobs, never starved by long backups
# How far interval() looks ahead: a year covers every calendar pattern (weekends, short
# months, DST); the cap keeps a schedule of every few seconds cheap.
_INTERVAL_HORIZON = timedelta(days=366)
_INTERVAL_FIRES = 1000

_SKIPPED = 'Execution of job "%s" skipped: maximum number of running instances'


def _quiet_busy_dispatcher(record: logging.LogRecord) -> bool:
    """Drop APScheduler's warning that the dispatcher is busy; pass every other record.

    While a backup runs, the dispatcher job is still running it, so each tick of its trigger
    is "skipped: maximum number of running instances reached". That is expected, not a
    fault: when the backup ends the running dispatcher asks again which tiers are due, so
    the skipped tick is served then.
    """
    job = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return not (
        isinstance(record.msg, str)
        and record.msg.startswith(_SKIPPED)
        and getattr(job, "id", None) == DISPATCHER
    )


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
    common = {"second": seconds, "timezone": timezone, "start_date": _SINCE}
    if values["day"] != "*" and values["day_of_week"] != "*":
        by_date = CronTrigger(**common, **{**values, "day_of_week": "*"})
        by_weekday = CronTrigger(**common, **{**values, "day": "*"})
        return OrTrigger([by_date, by_weekday])
    # Only the date fields can make a schedule that never fires (February 31): any weekday
    # comes within a week. APScheduler would search to year 9999 for it, at every look;
    # years 2000-2008 hold every month's every day, February 29 included, in a millisecond.
    probe = CronTrigger(**{**common, "timezone": UTC}, **values, year=_PROBE_YEARS)
    if probe.get_next_fire_time(None, _SINCE) is None:
        raise ValueError(f"cron expression {expression!r} never fires: no month has that day")
    return CronTrigger(**common, **values)


def interval(trigger: BaseTrigger, now: datetime) -> timedelta | None:
    """Return the longest gap between two consecutive fire times of *trigger* after *now*.

    This is the nominal interval of a tier ("0 * * * *" gives an hour), which the
    missed-backup alert scales, so a policy change needs no rule edit. The longest gap,
    not the next one, so that an irregular schedule ("0 9-17 * * 1-5", "0 4 1 * *", a
    daily run across a DST change) never looks missed over its quiet stretch. It looks
    ahead a year, or a thousand fire times for schedules that fire that often. None if
    the trigger fires fewer than twice from *now* on.
    """
    horizon = now + _INTERVAL_HORIZON
    longest: timedelta | None = None
    previous = trigger.get_next_fire_time(None, now)
    for _ in range(_INTERVAL_FIRES):
        if previous is None or previous > horizon:
            break
        upcoming = trigger.get_next_fire_time(None, previous + _TICK)
        if upcoming is None:
            break
        # In UTC: aware datetimes sharing a zone subtract as wall clocks, blind to DST.
        gap = upcoming.astimezone(UTC) - previous.astimezone(UTC)
        if longest is None or gap > longest:
            longest = gap
        previous = upcoming
    return longest


def due_tiers(
    triggers: Mapping[str, BaseTrigger], handled: Mapping[str, datetime | None], now: datetime
) -> list[str]:
    """Return the tiers that have a scheduled time after the one they last handled.

    *handled* maps a tier to when it last ran (at start: its last successful backup on
    disk); a tier that never ran is due at once, so a new server gets its first backup
    without waiting for the schedule.
    """
    due = []
    for tier, trigger in triggers.items():
        last = handled.get(tier)
        if last is None:
            due.append(tier)
            continue
        upcoming = trigger.get_next_fire_time(None, last + _TICK)
        if upcoming is not None and upcoming <= now:
            due.append(tier)
    return due


def tier_triggers(schedules: Mapping[str, str], timezone: tzinfo) -> dict[str, BaseTrigger]:
    """Return the trigger of each tier from its cron *schedules*."""
    return {tier: parse_cron(schedule, timezone) for tier, schedule in schedules.items()}


def tier_intervals(
    triggers: Mapping[str, BaseTrigger], now: datetime
) -> dict[str, timedelta | None]:
    """Return the nominal :func:`interval` of each tier's trigger, looking ahead from *now*."""
    return {tier: interval(trigger, now) for tier, trigger in triggers.items()}


@dataclass(frozen=True)
class Timing:
    """How the scheduler treats late and overlapping runs."""

    workers: int
    misfire_grace_seconds: float


class Scheduler:
    """Run *run_tiers* when tiers come due, plus housekeeping jobs."""

    def __init__(self, run_tiers: Callable[[list[str]], None], timezone: tzinfo) -> None:
        """Call *run_tiers* with the due tiers; schedule in *timezone*."""
        self._run_tiers = run_tiers
        self._timezone = timezone
        self._lock = threading.Lock()
        self._triggers: dict[str, BaseTrigger] = {}
        self._handled: dict[str, datetime | None] = {}
        self._intervals: dict[str, timedelta | None] = {}
        self._scheduler: BackgroundScheduler | None = None
        self._stopped = False  # set by shutdown(): a dispatcher still looping starts nothing

    def start(
        self,
        schedules: Mapping[str, str],
        last_success: Mapping[str, datetime | None],
        timing: Timing,
    ) -> None:
        """Start with the tiers' cron *schedules*; catch up against *last_success*."""
        logging.getLogger("apscheduler.scheduler").addFilter(_quiet_busy_dispatcher)
        self._scheduler = BackgroundScheduler(
            timezone=self._timezone,
            executors={
                "default": ThreadPoolExecutor(timing.workers),
                CONTROL: ThreadPoolExecutor(1),
            },
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": math.ceil(timing.misfire_grace_seconds),
            },
        )
        with self._lock:
            self._triggers = tier_triggers(schedules, self._timezone)
            self._handled = {tier: last_success.get(tier) for tier in self._triggers}
            now = datetime.now(self._timezone)
            self._intervals = tier_intervals(self._triggers, now)
            due = due_tiers(self._triggers, self._handled, now)
        # Said even when empty: an operator (and a test) can tell "nothing missed" from
        # "not looked yet".
        log.info("schedule.catch_up", tiers=due)
        self._scheduler.start()
        self._add_dispatcher(run_now=True)

    def _add_dispatcher(self, run_now: bool) -> None:
        assert self._scheduler is not None  # noqa: S101 (start() was called)
        if not self._triggers:
            return
        extra = {"next_run_time": datetime.now(self._timezone)} if run_now else {}
        self._scheduler.add_job(
            self._dispatch,
            OrTrigger(list(self._triggers.values())),
            id=DISPATCHER,
            replace_existing=True,
            **extra,
        )

    def reschedule(self, schedules: Mapping[str, str], timezone: tzinfo) -> None:
        """Replace the tiers' schedules; a backup already running is not touched."""
        with self._lock:
            self._timezone = timezone
            triggers = tier_triggers(schedules, timezone)
            now = datetime.now(timezone)
            # A tier keeps what it handled; a new tier starts from now, not from never.
            self._handled = {tier: self._handled.get(tier, now) for tier in triggers}
            self._triggers = triggers
            self._intervals = tier_intervals(triggers, now)
        assert self._scheduler is not None  # noqa: S101 (start() was called)
        if self._triggers:
            self._add_dispatcher(run_now=False)
        elif self._scheduler.get_job(DISPATCHER) is not None:
            self._scheduler.remove_job(DISPATCHER)

    def _dispatch(self) -> None:
        while True:
            now = datetime.now(self._timezone)
            with self._lock:
                if self._stopped:
                    return
                due = due_tiers(self._triggers, self._handled, now)
                for tier in due:
                    self._handled[tier] = now
            if not due:
                return
            self._run_tiers(due)

    def cron(self, expression: str | None, job: Callable[[], None], name: str) -> None:
        """Run *job* on a worker at the times of cron *expression*; None unschedules it."""
        assert self._scheduler is not None  # noqa: S101 (start() was called)
        if expression is None:
            if self._scheduler.get_job(name) is not None:
                self._scheduler.remove_job(name)
            return
        trigger = parse_cron(expression, self._timezone)
        self._scheduler.add_job(job, trigger, id=name, replace_existing=True)

    def next_run(self, name: str) -> datetime | None:
        """Return when the job *name* runs next, None when it is not scheduled."""
        job = self._scheduler.get_job(name) if self._scheduler is not None else None
        moment: datetime | None = job.next_run_time if job is not None else None
        return moment

    def submit(self, job: Callable[[], None]) -> None:
        """Run *job* once, now, on a worker (not counted against a tier's instances)."""
        assert self._scheduler is not None  # noqa: S101 (start() was called)
        self._scheduler.add_job(job)

    def every(self, seconds: float, job: Callable[[], None], name: str) -> None:
        """Run *job* every *seconds* on the housekeeping executor."""
        assert self._scheduler is not None  # noqa: S101 (start() was called)
        self._scheduler.add_job(
            job, "interval", seconds=seconds, id=name, executor=CONTROL, replace_existing=True
        )

    def next_runs(self) -> dict[str, datetime | None]:
        """Return when each tier is scheduled next."""
        now = datetime.now(self._timezone)
        with self._lock:
            return {
                tier: trigger.get_next_fire_time(None, now)
                for tier, trigger in self._triggers.items()
            }

    def intervals(self) -> dict[str, timedelta | None]:
        """Return each tier's nominal interval, as of its last (re)scheduling."""
        with self._lock:
            return dict(self._intervals)

    def alive(self) -> bool:
        """Tell whether the scheduler is running."""
        return self._scheduler is not None and self._scheduler.state == STATE_RUNNING

    def shutdown(self) -> None:
        """Stop scheduling; a job already running goes on in its thread, starting no more."""
        with self._lock:
            self._stopped = True
        if self._scheduler is not None and self.alive():
            self._scheduler.shutdown(wait=False)
