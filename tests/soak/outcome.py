"""The soak's invariants, each a function returning its violations, and the printed report."""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from sovbackupd import policy as gfs
from sovbackupd.errors import ExitCode
from sovbackupd.store import TIMESTAMP_FORMAT
from tests.soak import faults
from tests.soak.harness import CliRun, Instance, Sample, event_time
from tests.soak.runner import PREFIX, SoakRun

REPORT = pytest.StashKey[str]()  # the printed report, kept for the terminal summary

MiB = 1 << 20
# The daemon's RSS climbs for its first minute or so (first backups and drills, a malloc
# arena per thread), then stays flat: compare only what comes after.
WARMUP_SECONDS = 45.0
MIN_SAMPLES = 9  # three per third, at least
RSS_SLACK_KIB = 20 << 10
FD_SLACK = 10
LOG_SLACK_SECONDS = 5.0  # a failure counted in /metrics is logged right after: this late at most
WATCHDOG_GAP_SECONDS = 30.0  # half of the unit's WatchdogSec=60s
ALLOWED_ERRORS = {"config.reload_failed"}  # the one error-level event a soak provokes on purpose
CAUSES = (
    ("another sovbackupd", "backup_dir locked by another writer"),
    ("stayed locked", "sqlite locked longer than sqlite_timeout_seconds"),
    ("is unreachable", "redis unreachable"),
    ("BGSAVE", "redis BGSAVE did not complete"),
    ("not enough space", "disk full (refused before writing)"),
    ("no space left", "disk full (while writing)"),
    ("disk is full", "disk full (while copying SQLite)"),
    ("aborted", "aborted (timeout or shutdown)"),
)


def cause(error: str) -> str:
    """Return the cause of a failed backup, from its error message."""
    for needle, label in CAUSES:
        if needle.lower() in error.lower():
            return label
    return re.sub(r"\d+", "N", re.sub(r"/\S+", "<path>", error))[:120]


def failure_events(instance: Instance) -> list[dict[str, Any]]:
    """Return the backup.finished result=failure events of *instance*."""
    return instance.daemon.named("backup.finished", result="failure")


def backup_time(name: str) -> datetime:
    """Return when backup *name* was made, from its name."""
    return datetime.strptime(name[len(PREFIX) + 1 :], TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def _verdicts(run: CliRun | None, label: str, problems: list[str]) -> dict[str, dict[str, Any]]:
    if run is None:
        problems.append(f"{label} did not run")
        return {}
    try:
        verdicts = json.loads(run.stdout)
    except ValueError:
        problems.append(f"{label} printed no JSON (exit {run.returncode}): {run.stderr.strip()}")
        return {}
    return {verdict["name"]: verdict for verdict in verdicts}


# 1 ------------------------------------------------------------------------------------


def archives_verify(run: SoakRun) -> list[str]:
    """Every final archive passes verify --deep but the corrupted one, which --all reports."""
    problems: list[str] = []
    names = {backup.name for backup in run.stored}
    corrupted = run.faults.corrupted
    if corrupted is None:
        problems.append("no archive was corrupted, so verify --all had nothing to report")
    elif corrupted not in names:
        problems.append(f"the corrupted archive {corrupted} is no longer on disk")
    for label, result in (
        ("verify --all", run.verify_all),
        ("verify --all --deep", run.verify_deep),
    ):
        verdicts = _verdicts(result, label, problems)
        if not verdicts:
            continue
        if set(verdicts) != names:
            problems.append(f"{label} checked {sorted(verdicts)}; the disk holds {sorted(names)}")
        for name, verdict in sorted(verdicts.items()):
            if name != corrupted and not verdict["ok"]:
                problems.append(f"{label}: {name} fails: {verdict['problem']}")
        if corrupted in verdicts and verdicts[corrupted]["ok"]:
            problems.append(f"{label} passes the corrupted archive {corrupted}")
        wanted = ExitCode.FAILURE if corrupted in verdicts else ExitCode.OK
        if result is not None and result.returncode != wanted:
            problems.append(f"{label} exited {result.returncode}, not {wanted}")
    return problems


# 2 ------------------------------------------------------------------------------------


def clean_after_last_run(run: SoakRun) -> list[str]:
    """No *.partial, .staging or orphan after the last clean run and a SIGTERM mid-backup."""
    problems = [f"left in the backup disk after SIGTERM: {name}" for name in run.leftovers]
    if run.final_backup is None:
        problems.append("no scheduled backup succeeded in the last clean run")
    running = run.running_at_sigterm
    if running is None:
        problems.append("no backup started after the last clean one, to be running at SIGTERM")
    elif run.instances:
        daemon = run.instances[-1].daemon
        finished = daemon.named("backup.finished", daemon.index_of(running))
        stopped = daemon.named("daemon.stopped")
        if not finished or finished[0].get("result") != "success":
            outcome = finished[0] if finished else "no backup.finished"
            problems.append(f"the backup running at SIGTERM did not succeed: {outcome}")
        elif not stopped or daemon.index_of(stopped[0]) < daemon.index_of(finished[0]):
            problems.append("the daemon stopped before the backup running at SIGTERM finished")
    return problems


# 3 ------------------------------------------------------------------------------------


def _held(run: SoakRun) -> str:
    held = [
        event.get("reason", "")
        for instance in run.instances
        for event in instance.daemon.named("retention.held")
    ]
    return f" (retention.held {len(held)} times: {held[-1]})" if held else ""


def committed(run: SoakRun) -> set[str]:
    """Return every backup known to have been committed during the soak."""
    names = set(run.seen) | {backup.name for backup in run.stored}
    for instance in run.instances:
        names.update(
            str(event["backup"])
            for event in instance.daemon.named("backup.finished", result="success")
        )
    for cli in run.faults.cli_runs:
        if cli.argv[0] == "backup" and cli.returncode == 0:
            names.add(cli.stdout.strip().splitlines()[0])
    return names


def retention_exact(run: SoakRun) -> list[str]:
    """The disk holds exactly what policy.decide keeps, of the store and of all history."""
    problems: list[str] = []
    policy = run.final_policy
    if policy is None:
        return ["the final policy was not loaded"]
    rules = gfs.Rules.from_policy(policy)
    found = run.candidates
    on_disk = {backup.name for backup in run.stored}
    problems.extend(
        f"{candidate.name} is on disk without its sidecar or manifest"
        for candidate in found
        if not candidate.ok
    )
    decided = gfs.decide(found, rules, policy.zone, now=datetime.now(UTC))
    problems.extend(
        f"{decision.name} is on disk but policy.decide deletes it{_held(run)}"
        for decision in decided
        if not decision.keep
    )
    history = [gfs.Candidate(name, backup_time(name), ok=True) for name in committed(run)]
    kept = {
        decision.name
        for decision in gfs.decide(history, rules, policy.zone, now=datetime.now(UTC))
        if decision.keep
    }
    problems.extend(
        f"{name} was deleted, yet policy.decide over all {len(history)} committed backups keeps it"
        for name in sorted(kept - on_disk)
    )
    problems.extend(
        f"{name} is kept, yet policy.decide over all {len(history)} committed backups deletes "
        f"it{_held(run)}"
        for name in sorted(on_disk - kept)
    )
    return problems


# 4 ------------------------------------------------------------------------------------


def newest_restores(run: SoakRun) -> list[str]:
    """Restore --latest --to DIR brings the newest backup back, and test-restore passes it."""
    if run.newest is None:
        return ["no backup on disk to restore"]
    problems = []
    restore = run.restore
    if restore is None or restore.returncode != 0:
        problems.append(
            f"restore --latest --to failed: {restore.stderr.strip() if restore else ''}"
        )
    elif f"restored {run.newest}" not in restore.stdout:
        problems.append(f"restore --latest did not restore {run.newest}: {restore.stdout.strip()}")
    problems.extend(run.restored_problems)
    drill = run.drill
    if drill is None:
        return [*problems, "test-restore did not run"]
    try:
        report = json.loads(drill.stdout)
    except ValueError:
        return [
            *problems,
            f"test-restore printed no JSON (exit {drill.returncode}): {drill.stderr}",
        ]
    if drill.returncode != 0 or not report.get("ok"):
        failed = [check for check in report.get("checks", []) if not check.get("ok")]
        problems.append(f"test-restore of {report.get('name')} failed: {failed}")
    if report.get("name") != run.newest:
        problems.append(f"test-restore --latest drilled {report.get('name')}, not {run.newest}")
    return problems


# 5 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureTally:
    """Failed backups as /metrics counted them and as the logs tell them."""

    logged: int
    scraped: int  # summed over instances: each one's exact last scrape
    logged_by_then: int  # the failures each instance had logged by that scrape
    after: int  # failures logged after an instance's last scrape (before its kill or stop)


def failure_tally(run: SoakRun) -> FailureTally:
    """Sum the failure counter's last exact scrape of each instance, and the log's count."""
    logged = scraped = by_then = 0
    for instance in run.instances:
        times = [event_time(event) for event in failure_events(instance)]
        logged += len(times)
        terminal = [scrape for scrape in instance.scrapes if scrape.terminal]
        last = terminal[-1] if terminal else (instance.scrapes[-1] if instance.scrapes else None)
        if last is not None:
            scraped += int(last.failures)
            by_then += sum(moment <= last.t1 for moment in times)
    return FailureTally(logged, scraped, by_then, logged - by_then)


def failures_counted(run: SoakRun) -> list[str]:
    """Each failed backup is a backup.finished failure event with its error, and is counted."""
    problems: list[str] = []
    for instance in run.instances:
        events = failure_events(instance)
        times = [event_time(event) for event in events]
        problems.extend(
            f"daemon {instance.number}: a failure event without an error: {event}"
            for event in events
            if not event.get("error")
        )
        for scrape in instance.scrapes:
            before = sum(moment < scrape.t0 for moment in times)
            soon_after = sum(moment <= scrape.t1 + LOG_SLACK_SECONDS for moment in times)
            if not before <= scrape.failures <= soon_after:
                problems.append(
                    f"daemon {instance.number}: /metrics counted {scrape.failures:g} failures at "
                    f"{scrape.t0:.3f}, the log has {before} before and {soon_after} by "
                    f"{LOG_SLACK_SECONDS:g}s after"
                )
        terminal = [scrape for scrape in instance.scrapes if scrape.terminal]
        if terminal:
            last = terminal[-1]
            logged = sum(moment <= last.t1 for moment in times)
            if last.failures != logged:
                problems.append(
                    f"daemon {instance.number} ({instance.ending}): its last /metrics before the "
                    f"end counted {last.failures:g} failures, its log {logged} by then"
                )
        elif instance.ending in {"kill -9", "SIGTERM"}:
            problems.append(
                f"daemon {instance.number}: no exact /metrics scrape before its {instance.ending}"
            )
    tally = failure_tally(run)
    if tally.scraped != tally.logged_by_then:
        problems.append(
            f"summed over daemons, /metrics counted {tally.scraped} failures and the logs "
            f"{tally.logged_by_then} ({tally.after} more logged after the last scrapes)"
        )
    return problems


# 6 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """The daemon's memory and descriptors over the longest-lived instance."""

    instance: int
    lifetime: float
    samples: int
    rss_first_kib: float
    rss_last_kib: float
    fds_first: float
    fds_last: float
    peak_rss_kib: int
    peak_fds: int
    trajectory: list[tuple[float, float]]  # (seconds since start, RSS MiB), a dozen points


def resources(run: SoakRun) -> Resources | None:
    """Return the first-third and last-third medians of the longest-lived instance."""
    every = [sample for instance in run.instances for sample in instance.samples]
    if not every:
        return None

    def settled(instance: Instance) -> list[Sample]:
        return [s for s in instance.samples if s.taken >= instance.started + WARMUP_SECONDS]

    longest = max(run.instances, key=lambda instance: len(settled(instance)))
    samples = settled(longest)
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    return Resources(
        instance=longest.number,
        lifetime=longest.lifetime(),
        samples=len(samples),
        rss_first_kib=statistics.median(s.rss_kib for s in first) if first else 0,
        rss_last_kib=statistics.median(s.rss_kib for s in last) if last else 0,
        fds_first=statistics.median(s.fds for s in first) if first else 0,
        fds_last=statistics.median(s.fds for s in last) if last else 0,
        peak_rss_kib=max(sample.rss_kib for sample in every),
        peak_fds=max(sample.fds for sample in every),
        trajectory=[
            (sample.taken - longest.started, sample.rss_kib / 1024)
            for sample in longest.samples[:: max(1, len(longest.samples) // 12)]
        ],
    )


def resources_flat(run: SoakRun) -> list[str]:
    """The daemon's RSS and open fds do not grow over its longest run (bounded slack)."""
    figures = resources(run)
    if figures is None:
        return ["no RSS or fd sample of any daemon"]
    if figures.samples < MIN_SAMPLES:
        return [
            f"daemon {figures.instance} has {figures.samples} samples after warm-up, "
            f"{MIN_SAMPLES} needed: run the soak longer"
        ]
    problems = []
    growth = figures.rss_last_kib - figures.rss_first_kib
    if growth > RSS_SLACK_KIB:
        problems.append(
            f"daemon {figures.instance}: RSS grew from {figures.rss_first_kib / 1024:.1f} MiB "
            f"to {figures.rss_last_kib / 1024:.1f} MiB (slack {RSS_SLACK_KIB >> 10} MiB)"
        )
    if figures.fds_last - figures.fds_first > FD_SLACK:
        problems.append(
            f"daemon {figures.instance}: open fds grew from {figures.fds_first:g} to "
            f"{figures.fds_last:g} (slack {FD_SLACK})"
        )
    return problems


# 7 ------------------------------------------------------------------------------------


def nothing_left_running(run: SoakRun) -> list[str]:
    """No child of the daemon or the CLI, and no stray redis-server, outlives them."""
    return [
        *(f"after the daemon's SIGTERM, its descendant runs: {p}" for p in run.daemon_leftovers),
        *(f"after the daemon's SIGTERM, a redis process runs: {p}" for p in run.redis_after_daemon),
        *(f"after the CLI commands, their descendant runs: {p}" for p in run.cli_leftovers),
        *(f"after the CLI commands, a redis process runs: {p}" for p in run.redis_after_cli),
        *(
            f"after the soak's redis stopped, a redis process runs: {p}"
            for p in run.redis_after_stop
        ),
    ]


# 8 ------------------------------------------------------------------------------------


def watchdog_gap(instance: Instance) -> float:
    """Return the longest silence between WATCHDOG=1 pings of *instance* (0 with < 2 pings)."""
    pings = instance.watchdog_pings
    return max((later - earlier for earlier, later in itertools.pairwise(pings)), default=0.0)


def daemon_healthy(run: SoakRun) -> list[str]:
    """No daemon crashed, logged an error or traceback, or missed its watchdog; SIGTERM exits 0."""
    problems = list(run.daemons.problems)
    for instance in run.instances:
        label = f"daemon {instance.number}"
        if not instance.daemon.named("daemon.started"):
            problems.append(
                f"{label} never logged daemon.started: {instance.daemon.stderr()[-500:]}"
            )
        if instance.ending == "exited by itself":
            problems.append(
                f"{label} exited by itself with code {instance.exit_code}: "
                f"{instance.daemon.stderr()[-500:]}"
            )
        for event in instance.events():
            name = event.get("event")
            if name == "<not json>":
                problems.append(f"{label} wrote a line that is not JSON: {event.get('line')!r}")
            elif event.get("level") in {"error", "critical"} and name not in ALLOWED_ERRORS:
                problems.append(f"{label} logged {name}: {json.dumps(event)[:600]}")
        if "Traceback" in instance.daemon.stderr():
            problems.append(f"{label} printed a traceback: {instance.daemon.stderr()[-800:]}")
        if (gap := watchdog_gap(instance)) > WATCHDOG_GAP_SECONDS:
            problems.append(f"{label} sent no WATCHDOG=1 for {gap:.1f}s")
    last = run.instances[-1] if run.instances else None
    if last is None or last.ending != "SIGTERM" or run.final_exit_code != 0:
        problems.append(
            f"the last daemon ended by {last.ending if last else None} with exit code "
            f"{run.final_exit_code}, not SIGTERM and 0"
        )
    elif not last.daemon.named("daemon.stopped"):
        problems.append("the last daemon did not log daemon.stopped")
    return problems


# 9 ------------------------------------------------------------------------------------


def cli_beside_daemon(run: SoakRun) -> list[str]:
    """CLI backup and prune beside the daemon succeed or exit 75 with one clear error line."""
    problems = []
    if not run.faults.cli_runs:
        problems.append("no CLI command ran beside the daemon")
    for cli in run.faults.cli_runs:
        lines = [line for line in cli.stderr.splitlines() if line.strip()]
        if cli.returncode not in {ExitCode.OK, ExitCode.TEMPFAIL}:
            problems.append(f"{cli.command} exited {cli.returncode}: {cli.stderr.strip()[-500:]}")
        elif cli.returncode == ExitCode.TEMPFAIL and (
            len(lines) != 1 or not lines[0].startswith("sovbackupd: error: another sovbackupd")
        ):
            problems.append(f"{cli.command} exited 75 without one lock error line: {lines}")
        elif cli.returncode == ExitCode.OK and cli.argv[0] == "backup":
            name = cli.stdout.strip()
            if not re.fullmatch(rf"{PREFIX}_\d{{8}}_\d{{6}}", name):
                problems.append(f"{cli.command} exited 0 but printed {name!r}, not a backup name")
        if "Traceback" in cli.stderr:
            problems.append(f"{cli.command} printed a traceback: {cli.stderr[-800:]}")
    return problems


# 10 -----------------------------------------------------------------------------------


def faults_injected(run: SoakRun) -> list[str]:
    """Every kind of fault ran at least once as planned, the corruption exactly once."""
    problems = list(run.faults.problems)
    done = Counter(
        record.kind
        for record in run.faults.records
        if not record.detail.startswith("harness error")
    )
    problems.extend(f"no {kind} fault was injected" for kind in faults.ALL_KINDS if not done[kind])
    if done[faults.CORRUPT] != 1:
        problems.append(f"{done[faults.CORRUPT]} archives corrupted, not exactly one")
    return problems


# 11 -----------------------------------------------------------------------------------


def reloads_behave(run: SoakRun) -> list[str]:
    """A valid policy is reloaded and an invalid one refused, each visible in log and metric."""
    return list(run.faults.observations)


# 12 -----------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"(?<![\w'\"])None(?![\w'\"])")


def error_messages(run: SoakRun) -> list[tuple[str, str]]:
    """Return every error the daemon logged and the CLI printed, with where it came from."""
    found: list[tuple[str, str]] = []
    for instance in run.instances:
        label = f"daemon {instance.number}"
        found.extend(
            (f"{label} backup.finished", str(event.get("error")))
            for event in failure_events(instance)
        )
        for event in instance.daemon.named("test_restore.finished"):
            found.extend(
                (f"{label} test_restore.finished", str(problem))
                for problem in event.get("problems", [])
            )
    final = [run.verify_all, run.verify_deep, run.restore, run.drill]
    for cli in [*run.faults.cli_runs, *run.faults.full_disk_drills, *filter(None, final)]:
        lines = [*cli.stderr.splitlines(), *cli.stdout.splitlines()]
        found.extend(
            (f"sovbackupd {cli.command}", line)
            for line in lines
            if line.startswith(("sovbackupd: error:", "FAIL "))
        )
    return found


def errors_say_what_and_where(run: SoakRun) -> list[str]:
    """Every error the faults provoke names what failed and where: no empty or None parts."""
    problems = [
        f"{source}: {message!r}"
        for source, message in error_messages(run)
        if not message.strip() or PLACEHOLDER.search(message)
    ]
    if not run.faults.full_disk_drills:
        problems.append("no test-restore ran while the backup disk was full")
    return problems


Check = Callable[[SoakRun], list[str]]
INVARIANTS: tuple[tuple[str, Check], ...] = (
    ("1 every archive verifies, the corrupted one is reported", archives_verify),
    ("2 nothing partial after the last clean run", clean_after_last_run),
    ("3 retention holds exactly policy.decide's set", retention_exact),
    ("4 the newest backup restores and passes test-restore", newest_restores),
    ("5 every failure is counted in /metrics and logged", failures_counted),
    ("6 RSS and open fds do not grow", resources_flat),
    ("7 no child or redis-server is left behind", nothing_left_running),
    ("8 the daemon stays healthy and exits 0 on SIGTERM", daemon_healthy),
    ("9 CLI beside the daemon: success or exit 75", cli_beside_daemon),
    ("10 every fault kind injected, the corruption once", faults_injected),
    ("11 SIGHUP reloads a valid policy, refuses an invalid one", reloads_behave),
    ("12 every error names what failed and where", errors_say_what_and_where),
)


def check_all(run: SoakRun) -> dict[str, list[str]]:
    """Evaluate every invariant, by check name; a check that crashes reports it as a violation."""
    results = {}
    for _, check in INVARIANTS:
        try:
            results[check.__name__] = check(run)
        except Exception as error:  # one broken check must not hide the others
            results[check.__name__] = [f"the check itself failed: {type(error).__name__}: {error}"]
    return results


# --- the report ---------------------------------------------------------------------


def _backups_section(run: SoakRun) -> list[str]:
    succeeded = failed = interrupted = 0
    causes: Counter[str] = Counter()
    for instance in run.instances:
        finished = instance.daemon.named("backup.finished")
        succeeded += sum(event.get("result") == "success" for event in finished)
        for event in failure_events(instance):
            failed += 1
            causes[cause(str(event.get("error", "")))] += 1
        backups = [
            event
            for event in instance.events()
            if event.get("event") in {"backup.started", "backup.finished"}
        ]
        if instance.ending == "kill -9" and backups and backups[-1]["event"] == "backup.started":
            interrupted += 1
    lines = [
        f"daemon backups: attempted {succeeded + failed + interrupted}, succeeded {succeeded}, "
        f"failed {failed}, cut short by kill -9 {interrupted}"
    ]
    lines.extend(f"    {count:4d}  {label}" for label, count in causes.most_common())
    commands: dict[str, Counter[int]] = {}
    for cli in run.faults.cli_runs:
        commands.setdefault(cli.command, Counter())[cli.returncode] += 1
    for command, codes in sorted(commands.items()):
        spread = ", ".join(f"exit {code}: {count}" for code, count in sorted(codes.items()))
        lines.append(f"CLI {command}: {sum(codes.values())} run(s) ({spread})")
    drills = [
        event
        for instance in run.instances
        for event in instance.daemon.named("test_restore.finished")
    ]
    passed = sum(event.get("result") == "success" for event in drills)
    lines.append(f"daemon test restores: {passed} passed, {len(drills) - passed} failed")
    lines.extend(
        f"    failed: {event.get('backup')}: {event.get('problems')}"
        for event in drills
        if event.get("result") != "success"
    )
    deleted = sum(len(instance.daemon.named("retention.deleted")) for instance in run.instances)
    held = sum(len(instance.daemon.named("retention.held")) for instance in run.instances)
    lines.append(
        f"retention: {deleted} archives deleted by the daemon, held {held} times; "
        f"{len(run.stored)} archives at the end, {len(committed(run))} committed in all"
    )
    tally = failure_tally(run)
    lines.append(
        f"failure metric: {tally.scraped} summed over the daemons' last scrapes, "
        f"{tally.logged_by_then} logged by then, {tally.after} logged after, {tally.logged} in all"
    )
    return lines


def report(run: SoakRun, results: dict[str, list[str]]) -> str:
    """Return the soak's summary: seed, faults, backups by cause, resources, invariants."""
    lines = [
        f"seed {run.seed} (again: --soak-seed {run.seed} or SOVBACKUPD_SOAK_SEED={run.seed}); "
        f"faults for {run.fault_phase_seconds:.0f}s (asked {run.seconds:g}s), "
        f"{run.total_seconds:.0f}s in all",
        f"faults injected: {len(run.faults.records)}",
    ]
    kinds = Counter(record.kind for record in run.faults.records)
    lines.extend(f"    {count:4d}  {kind}" for kind, count in kinds.most_common())
    began = run.instances[0].started if run.instances else 0.0
    lines.extend(
        f"    +{record.started - began:6.1f}s {record.kind}: {record.detail}"
        for record in run.faults.records
    )
    lines.append(f"corrupted archive: {run.faults.corrupted}")
    lines.extend(_backups_section(run))
    lines.append(
        "daemons: "
        + "; ".join(
            f"#{instance.number} {instance.lifetime():.0f}s, {instance.ending}"
            for instance in run.instances
        )
    )
    figures = resources(run)
    if figures is not None:
        lines.append(
            f"resources of daemon #{figures.instance} ({figures.lifetime:.0f}s, {figures.samples} "
            f"samples after {WARMUP_SECONDS:g}s warm-up): RSS median "
            f"{figures.rss_first_kib / 1024:.1f} -> {figures.rss_last_kib / 1024:.1f} MiB "
            f"(slack {RSS_SLACK_KIB >> 10}), fds "
            f"{figures.fds_first:g} -> {figures.fds_last:g} (slack {FD_SLACK}); peak RSS "
            f"{figures.peak_rss_kib / 1024:.1f} MiB, peak fds {figures.peak_fds}"
        )
        lines.append(
            "    RSS over its life: "
            + ", ".join(f"{moment:.0f}s {rss:.0f}" for moment, rss in figures.trajectory)
        )
    gaps = [watchdog_gap(instance) for instance in run.instances]
    lines.append(f"watchdog: longest silence {max(gaps, default=0.0):.1f}s")
    lines.append(
        "loads: "
        + "; ".join(
            f"{load.name} {load.operations} writes, {load.errors} refused"
            + (
                f", {len(load.unexpected)} unexpected ({load.unexpected[-1]})"
                if load.unexpected
                else ""
            )
            for load in run.loads
        )
    )
    lines.append("invariants:")
    for label, check in INVARIANTS:
        violations = results[check.__name__]
        lines.append(f"    {'ok    ' if not violations else 'FAILED'} {label}")
        lines.extend(f"           - {violation}" for violation in violations[:10])
    return "\n".join(lines)
