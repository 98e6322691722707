"""The command line: argument parsing, and one call into the core per command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sovbackupd import __version__, auth, backup, config, replicate, restore, retention, verify
from sovbackupd import logging as sovlogging
from sovbackupd import policy as gfs
from sovbackupd.config.models import TIER_NAMES, Policy
from sovbackupd.errors import ConfigError, ExitCode, RestoreError, SovbackupdError, UsageError
from sovbackupd.manifest import MANUAL_TIER
from sovbackupd.progress import ProgressBar
from sovbackupd.store import Store, StoredBackup, human_size
from sovbackupd.wording import plural

Command = Callable[[argparse.Namespace, Policy], int]
LATEST_HELP = "the newest backup that is not a pre-restore safety backup"


def _warn(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"sovbackupd: warning: {line}", file=sys.stderr)


def _pin_end(text: str, policy: Policy, now: datetime) -> datetime:
    """Return the end of a pin given as a duration from *now* (30d) or an ISO 8601 time.

    A time without an offset is in the policy's time zone. Raise UsageError when the text
    is neither, or the end is not in the future.
    """
    try:
        end = gfs.parse_duration(text).after(now, policy.zone)
    except ValueError:
        try:
            end = datetime.fromisoformat(text.strip())
        except ValueError:
            raise UsageError(
                f"{text!r} is not a time: give a duration in y, M, d, h (e.g. 30d) or an "
                "ISO 8601 date or time (e.g. 2027-01-31 or 2027-01-31T18:00+01:00)"
            ) from None
        if end.utcoffset() is None:
            end = end.replace(tzinfo=policy.zone)
    if end <= now:
        raise UsageError(f"{text!r} is not in the future: a pin must end later than now")
    return end


def _requested_pin(arguments: argparse.Namespace, policy: Policy) -> gfs.Pin | None:
    if arguments.keep_until is not None:
        return gfs.Pin(until=_pin_end(arguments.keep_until, policy, datetime.now(UTC)))
    return gfs.Pin() if arguments.pin else None


def _backup(arguments: argparse.Namespace, policy: Policy) -> int:
    tiers = arguments.tier or [MANUAL_TIER]
    pin = _requested_pin(arguments, policy)
    progress = ProgressBar(sys.stderr)
    committed: list[str] = []

    def on_committed(name: str) -> None:
        progress.finish()
        print(name, flush=True)
        committed.append(name)

    try:
        try:
            result = backup.run(
                policy,
                tiers,
                on_progress=progress if progress.enabled else None,
                on_estimate=progress.set_total,
                pin=pin,
                on_committed=on_committed,
            )
        finally:
            if not committed:
                progress.finish()
        _warn(result.warnings)
        if result.retention is not None:
            for name in result.retention.deleted:
                print(f"sovbackupd: retention deleted {name}", file=sys.stderr)
            _warn(result.retention.plan.warnings)
        # The backup is committed: a remote that fails is reported, and caught up next time.
        for report in replicate.run(policy):
            for name in report.deleted:
                print(
                    f"sovbackupd: retention deleted {name} from remote {report.remote}",
                    file=sys.stderr,
                )
            _warn(report.failures)
    except (KeyboardInterrupt, Terminated):
        if not committed:
            raise
        # Past the commit (after_backup hooks, webhooks, remote copies) the backup exists:
        # "nothing was left half-written" would tell the operator that none was made.
        print(
            f"sovbackupd: interrupted after backup {committed[0]} was complete; it is kept, "
            "but its after_backup hooks, webhooks or remote copies may not have run",
            file=sys.stderr,
        )
        return 130
    return ExitCode.OK


def _pin(arguments: argparse.Namespace, policy: Policy) -> int:
    now = datetime.now(UTC)
    until = None if arguments.until is None else _pin_end(arguments.until, policy, now)
    store = Store(policy.backup_dir, policy.name_prefix)
    with store.lock():
        pinned = store.pin(arguments.name, until, now)
    end = "it is unpinned" if until is None else gfs.format_time(until, policy.zone)
    print(f"pinned {pinned.name}: retention keeps it until {end}")
    return ExitCode.OK


def _unpin(arguments: argparse.Namespace, policy: Policy) -> int:
    store = Store(policy.backup_dir, policy.name_prefix)
    with store.lock():
        had_pin = store.unpin(arguments.name)
    if had_pin:
        print(f"unpinned {arguments.name}: retention decides on it again from the next prune")
    else:
        print(f"{arguments.name} was not pinned")
    return ExitCode.OK


def _kept_by(decision: gfs.Decision, held: str | None) -> str:
    """Return the KEPT BY cell: the reasons, or what happens to a backup no rule keeps."""
    if decision.reasons:
        return ", ".join(decision.reasons)
    return "(no rule keeps it; retention is held)" if held else "(to be pruned)"


def _summary(stored: StoredBackup, decision: gfs.Decision, held: str | None) -> dict[str, object]:
    manifest = stored.head()
    return {
        "name": stored.name,
        "path": str(stored.path),
        "created": stored.created.isoformat(),
        "size": stored.size,
        "tiers": manifest.tiers if manifest else [],
        "compression": manifest.compression if manifest else None,
        "files": manifest.file_count if manifest else None,
        # An encrypted backup's head keeps its warnings (they name files) encrypted.
        "warnings": sum(len(source.warnings) for source in manifest.sources)
        if manifest and not manifest.is_head
        else None,
        "safety": manifest.safety if manifest else False,
        "kept_by": list(decision.reasons),
        "to_be_pruned": not decision.keep and held is None,
    }


def _list_remote(arguments: argparse.Namespace, policy: Policy) -> int:
    held, decided = replicate.listing(policy, arguments.remote, datetime.now(UTC))
    decisions = {decision.name: decision for decision in decided.decisions}
    _warn(decided.warnings)
    rows = [
        {
            "name": item.name,
            "remote": arguments.remote,
            "object": item.archive.name,
            "created": item.created.isoformat(),
            "size": item.archive.size,
            "complete": item.complete,
            "kept_by": list(decisions[item.name].reasons),
            "to_be_pruned": not decisions[item.name].keep and decided.held is None,
        }
        for item in reversed(held)
    ]
    if arguments.json:
        print(json.dumps(rows, indent=1))
        return ExitCode.OK
    if not rows:
        print(f"no backups on remote {arguments.remote}", file=sys.stderr)
        return ExitCode.OK
    print(f"{'NAME':<40} {'CREATED':<25} {'SIZE':>10} {'STATE':<10}  KEPT BY")
    for item in reversed(held):
        created = item.created.astimezone(policy.zone).isoformat()
        state = "complete" if item.complete else "incomplete"
        kept_by = _kept_by(decisions[item.name], decided.held)
        size = human_size(item.archive.size)
        print(f"{item.name:<40} {created:<25} {size:>10} {state:<10}  {kept_by}")
    return ExitCode.OK


def _list(arguments: argparse.Namespace, policy: Policy) -> int:
    if arguments.remote:
        return _list_remote(arguments, policy)
    store = Store(policy.backup_dir, policy.name_prefix)
    stored = store.backups()
    decided = retention.plan(policy, stored, store.pins(), datetime.now(UTC))
    decisions = {decision.name: decision for decision in decided.decisions}
    _warn(decided.warnings)
    rows = [_summary(item, decisions[item.name], decided.held) for item in reversed(stored)]
    if arguments.json:
        print(json.dumps(rows, indent=1))
        return ExitCode.OK
    if not rows:
        print(f"no backups in {policy.backup_dir}", file=sys.stderr)
        return ExitCode.OK
    print(
        f"{'NAME':<40} {'CREATED':<25} {'TIERS':<14} {'KIND':<6} {'SIZE':>10} {'FILES':>7}  KEPT BY"
    )
    for item, row in zip(reversed(stored), rows, strict=True):
        created = item.created.astimezone(policy.zone).isoformat()
        tiers = ",".join(row["tiers"]) or "?"  # type: ignore[arg-type]  # a list[str] built above
        kind = "safety" if row["safety"] else "backup"
        files = "?" if row["files"] is None else row["files"]
        kept_by = _kept_by(decisions[item.name], decided.held)
        print(
            f"{item.name:<40} {created:<25} {tiers:<14} {kind:<6} {human_size(item.size):>10} "
            f"{files:>7}  {kept_by}"
        )
    return ExitCode.OK


def _prune(arguments: argparse.Namespace, policy: Policy) -> int:
    outcome = retention.prune(policy, dry_run=arguments.dry_run)
    if arguments.json:
        print(
            json.dumps(
                {
                    "dry_run": outcome.dry_run,
                    "held": outcome.held,
                    "deleted": outcome.deleted,
                    "kept": [
                        {"name": decision.name, "reasons": list(decision.reasons)}
                        for decision in outcome.decisions
                        if decision.keep
                    ],
                },
                indent=1,
            )
        )
    else:
        verb = "would delete" if outcome.dry_run else "deleted"
        for name in outcome.deleted:
            print(f"{verb} {name}")
        if not outcome.deleted and outcome.held is None:
            count = len(outcome.decisions)
            print(f"nothing to prune: {count} of {count} backups kept")
    _warn(outcome.plan.warnings)
    return ExitCode.OK


_SPAN = re.compile(r"^(\d+)([hdw])$")
_SPAN_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
MAX_SPAN = timedelta(weeks=5200)
"""The longest --every or --span: a century, where retention's periods still mean something."""
MAX_SIMULATED_TIMES = 100_000
"""The most backup times simulate takes (over eleven years hourly), so that it ends soon."""
_MAX_TIME_LINE_CHARS = 64  # an ISO 8601 time with microseconds and offset is 32


def _span(text: str) -> timedelta:
    match = _SPAN.match(text)
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count and h, d or w, e.g. 6h or 400d")
    count, unit = int(match[1]), _SPAN_UNITS[match[2]]
    if count > MAX_SPAN / unit:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_SPAN.days // 7}w")
    return count * unit


def _time_lines(source: str) -> list[str]:
    """Return the lines of *source* ('-' for stdin), read within a bound."""
    limit = MAX_SIMULATED_TIMES * _MAX_TIME_LINE_CHARS
    try:
        with (
            contextlib.nullcontext(sys.stdin)
            if source == "-"
            else Path(source).open(encoding="utf-8") as stream
        ):
            text = stream.read(limit + 1)
    except OSError as error:
        raise SovbackupdError(f"cannot read {source}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SovbackupdError(f"{source}: not UTF-8 text") from None
    lines = text.splitlines()
    if len(text) > limit or sum(bool(line.strip()) for line in lines) > MAX_SIMULATED_TIMES:
        raise SovbackupdError(f"{source}: more than {MAX_SIMULATED_TIMES} times to simulate")
    return lines


def _offset_time(text: str) -> datetime:
    """Parse an ISO 8601 time with an offset; raise ValueError saying what is wrong."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("not an ISO 8601 time") from None
    if moment.utcoffset() is None:
        raise ValueError("the time needs an offset")
    return moment


def _aware_time(text: str) -> datetime:
    try:
        return _offset_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def _simulated_times(arguments: argparse.Namespace, policy: Policy) -> list[tuple[str, datetime]]:
    if arguments.source is None:
        count = arguments.span // arguments.every
        if count >= MAX_SIMULATED_TIMES:
            raise UsageError(
                f"--span and --every make {count + 1} backup times, simulate takes at most "
                f"{MAX_SIMULATED_TIMES}: a longer --every or a shorter --span"
            )
        end = arguments.end or datetime.now(policy.zone).replace(minute=0, second=0, microsecond=0)
        moments = [end - step * arguments.every for step in range(count, -1, -1)]
        return [(moment.isoformat(), moment) for moment in moments]
    times = []
    for number, line in enumerate(_time_lines(arguments.source), 1):
        if not line.strip():
            continue
        try:
            moment = _offset_time(line)
        except ValueError as error:
            raise SovbackupdError(f"{arguments.source}:{number}: {error}") from None
        times.append((line.strip(), moment))
    return times


def _simulate(arguments: argparse.Namespace, policy: Policy) -> int:
    times = _simulated_times(arguments, policy)
    given = {f"t{index}": text for index, (text, _) in enumerate(times)}
    # Decided as of the newest time at the latest: a series may be laid out in the future.
    now = max([datetime.now(UTC), *(moment for _, moment in times)])
    decisions = gfs.decide(
        [gfs.Candidate(f"t{index}", moment, ok=True) for index, (_, moment) in enumerate(times)],
        gfs.Rules.from_policy(policy),
        policy.zone,
        now=now,
    )
    rows = [
        {"time": given[item.name], "keep": item.keep, "reasons": list(item.reasons)}
        for item in sorted(decisions, key=lambda item: item.time)
    ]
    if arguments.json:
        print(json.dumps(rows, indent=1))
        return ExitCode.OK
    for row in rows:
        mark = "keep  " if row["keep"] else "delete"
        print(f"{mark} {row['time']}  {', '.join(row['reasons'])}")  # type: ignore[arg-type]  # list[str]
    per_rule: dict[str, int] = {}
    for item in decisions:
        for reason in item.reasons:
            rule = reason.split()[0]
            per_rule[rule] = per_rule.get(rule, 0) + 1
    kept = sum(item.keep for item in decisions)
    summary = ", ".join(f"{rule} {count}" for rule, count in sorted(per_rule.items()))
    print(f"{kept} of {len(decisions)} kept ({summary})")
    return ExitCode.OK


def _verify_remote(arguments: argparse.Namespace, policy: Policy) -> int:
    verdicts = replicate.verify(
        policy,
        arguments.remote,
        arguments.name,
        every=arguments.all,
        deep=arguments.deep,
        trust_unsigned=arguments.trust_unsigned,
    )
    if arguments.json:
        print(json.dumps([asdict(verdict) for verdict in verdicts], indent=1))
    else:
        for verdict in verdicts:
            if verdict.ok:
                print(
                    f"{verdict.name}: ok on {arguments.remote}{' (deep)' if verdict.deep else ''}"
                )
            else:
                print(f"sovbackupd: error: {verdict.problem}", file=sys.stderr)
    return ExitCode.OK if all(verdict.ok for verdict in verdicts) else ExitCode.FAILURE


def _verify(arguments: argparse.Namespace, policy: Policy) -> int:
    if arguments.remote:
        return _verify_remote(arguments, policy)
    store = Store(policy.backup_dir, policy.name_prefix)
    if arguments.all:
        targets = store.backups()[::-1]  # newest first, as list shows them
    elif arguments.name:
        targets = [store.find(arguments.name)]
    else:
        targets = [store.latest()]
    key = auth.policy_key(policy)
    verdicts = [
        verify.check(
            item, arguments.deep, policy.gpg, key=key, trust_unsigned=arguments.trust_unsigned
        )
        for item in targets
    ]
    if arguments.json:
        print(json.dumps([asdict(verdict) for verdict in verdicts], indent=1))
    else:
        for verdict in verdicts:
            if verdict.ok:
                how = ", ".join([*(["deep"] if verdict.deep else []), str(verdict.authentication)])
                print(f"{verdict.name}: ok ({how})")
            else:
                print(f"sovbackupd: error: {verdict.problem}", file=sys.stderr)
    return ExitCode.OK if all(verdict.ok for verdict in verdicts) else ExitCode.FAILURE


def _components(text: str) -> set[restore.Component]:
    chosen: set[restore.Component] = set()
    for word in text.split(","):
        component = next((known for known in restore.COMPONENTS if known == word.strip()), None)
        if component is None:
            raise argparse.ArgumentTypeError(
                f"{word.strip()!r}: choose from {','.join(restore.COMPONENTS)}"
            )
        chosen.add(component)
    return chosen


def _chosen(arguments: argparse.Namespace, policy: Policy) -> StoredBackup:
    source = getattr(arguments, "source", None)
    if source is not None:
        return replicate.fetch(policy, source, arguments.name)
    store = Store(policy.backup_dir, policy.name_prefix)
    return store.find(arguments.name) if arguments.name else store.latest()


def _confirmed(plan: restore.Plan) -> bool:
    """Ask on the terminal before live data is replaced."""
    print(f"Restoring {plan.manifest.id} replaces live data:", file=sys.stderr)
    for number, step in enumerate(plan.steps(), 1):
        print(f"{number:>3}. {step}", file=sys.stderr)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    answer = input("Go ahead? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _restore(arguments: argparse.Namespace, policy: Policy) -> int:
    plan = restore.plan(
        policy,
        _chosen(arguments, policy),
        only=arguments.only,
        to=arguments.to.absolute() if arguments.to else None,
        safety_backup=not arguments.no_safety_backup,
        keep_setuid=arguments.keep_setuid,
        trust_unsigned=arguments.trust_unsigned,
    )
    if arguments.dry_run:
        print(f"sovbackupd restore {plan.manifest.id} would, changing nothing now:")
        for number, step in enumerate(plan.steps(), 1):
            print(f"{number:>3}. {step}")
        for note in plan.notes:
            print(f"note: {note}")
        if plan.refusal is not None:
            raise RestoreError(plan.refusal)
        return ExitCode.OK
    if plan.refusal is not None:
        raise RestoreError(plan.refusal)
    if plan.live and not arguments.yes:
        if not sys.stdin.isatty():
            raise SovbackupdError(
                "restore replaces live data: pass --yes to confirm (--dry-run shows the steps)"
            )
        if not _confirmed(plan):
            print("sovbackupd: restore cancelled, nothing was changed", file=sys.stderr)
            return ExitCode.FAILURE
    result = restore.run(policy, plan)
    print(f"restored {result.name}: {plural(result.files, 'file')}, {human_size(result.bytes)}")
    for unit in result.units:
        print(f"  {unit.component:<7} {unit.destination}")
    for note in plan.notes:
        print(f"note: {note}")
    if result.safety_backup is not None:
        print(
            f"safety backup of what was replaced: {result.safety_backup} "
            f"(undo: sovbackupd restore {result.safety_backup} --yes)"
        )
    if result.start_failure is not None:
        print(
            f"sovbackupd: {result.name} is restored, but {result.start_failure}: "
            "start the services by hand",
            file=sys.stderr,
        )
        return ExitCode.NOT_STARTED
    return ExitCode.OK


def _test_restore(arguments: argparse.Namespace, policy: Policy) -> int:
    name = _chosen(arguments, policy).name
    report = restore.drill(policy, name, trust_unsigned=arguments.trust_unsigned)
    if arguments.json:
        print(json.dumps(asdict(report), indent=1))
    else:
        for check in report.checks:
            print(f"{'ok  ' if check.ok else 'FAIL'} {check.what}: {check.detail}")
        verdict = "passed" if report.ok else "FAILED"
        print(f"test restore of {report.name} {verdict} in {report.duration_seconds:.1f}s")
    return ExitCode.OK if report.ok else ExitCode.FAILURE


def _check_config(arguments: argparse.Namespace, policy: Policy) -> int:
    del arguments
    print(config.render(policy), end="")
    path = auth.key_path(policy)
    key = auth.load_key(path)
    # A YAML comment: the output still parses as the policy.
    if key is None:
        print(f"# authentication key: {path} (missing: the first backup creates it)")
    else:
        print(f"# authentication key: {path} (id {key.id})")
    return ExitCode.OK


def _key(arguments: argparse.Namespace, policy: Policy) -> int:
    path = auth.key_path(policy)
    if arguments.key == "init":
        key = auth.create_key(path)
        print(f"created authentication key {path} (id {key.id}); {auth.ESCROW}")
        return ExitCode.OK
    found = auth.load_key(path)
    if found is None:
        raise ConfigError(
            f"authentication key {path} does not exist: create it with sovbackupd key init"
        )
    print(found.id)
    return ExitCode.OK


def _run(arguments: argparse.Namespace) -> int:
    # Imported here: the daemon's libraries cost every one-shot command ~0.1 s to load.
    from sovbackupd import daemon  # noqa: PLC0415

    sovlogging.configure(
        sys.stdout, logging.DEBUG if arguments.verbose else logging.INFO, arguments.log_format
    )
    return daemon.run(arguments.config or config.default_path())


def _demo(arguments: argparse.Namespace) -> int:
    from sovbackupd import demo  # noqa: PLC0415 (as for _run)

    root = (arguments.dir or Path(tempfile.mkdtemp(prefix="sovbackupd-demo-"))).resolve()
    writer = sovlogging.configure(
        sys.stdout, logging.INFO, arguments.log_format, shorten=(str(root), "$SANDBOX")
    )
    # Its own lines go through the log's writer: never glued to a log line mid-write.
    return demo.run(root, writer.line, arguments.seconds)


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """Add the options taken before the command and after it.

    An option left out leaves no value behind (SUPPRESS), so a command's parser never
    overwrites what was given before the command; the top parser sets the defaults.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"policy file (default: ${config.loader.CONFIG_ENV} or {config.loader.DEFAULT_PATH})",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log progress to stderr",
    )
    parser.add_argument(
        "--log-format",
        choices=sovlogging.LOG_FORMATS,
        default=argparse.SUPPRESS,
        help="json (one object per line) or console (for people); default: console on a "
        "terminal, json elsewhere (journald)",
    )


class _CommandParser(argparse.ArgumentParser):
    """The parser of one command (and of its own commands): it takes the global options too."""

    def __init__(self, **kwargs: Any) -> None:  # noqa: ANN401 (argparse's keywords, passed on)
        super().__init__(**kwargs)
        _add_global_options(self)


def _add_restore_commands(commands: argparse._SubParsersAction[_CommandParser]) -> None:
    restore_parser = commands.add_parser(
        "restore", help="put a backup back in place (verified first; a safety backup before)"
    )
    chosen = restore_parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("name", nargs="?", help="the backup to restore")
    chosen.add_argument("--latest", action="store_true", help=LATEST_HELP)
    restore_parser.add_argument(
        "--only",
        type=_components,
        metavar="LIST",
        help=f"restore only these components (comma-separated: {','.join(restore.COMPONENTS)})",
    )
    restore_parser.add_argument(
        "--from",
        dest="source",
        metavar="REMOTE",
        help="download the backup from this remote first (disaster recovery)",
    )
    restore_parser.add_argument(
        "--to",
        type=Path,
        metavar="DIR",
        help="re-root every original path under DIR, touching nothing live",
    )
    restore_parser.add_argument(
        "--dry-run", action="store_true", help="print the steps it would take, change nothing"
    )
    restore_parser.add_argument(
        "--yes", action="store_true", help="replace live data without asking"
    )
    restore_parser.add_argument(
        "--no-safety-backup",
        action="store_true",
        help="skip the pre-restore backup of the live data being replaced",
    )
    restore_parser.add_argument(
        "--keep-setuid",
        action="store_true",
        help=(
            "give files the setuid/setgid bits an authenticated archive names "
            "(dropped by default, and always from an unsigned one)"
        ),
    )
    restore_parser.add_argument(
        "--allow-outside-symlinks",
        action="store_true",
        help="deprecated, has no effect: every symlink is restored as a link, as tar does",
    )
    restore_parser.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="accept a backup without authentication record, or signed with another key "
        "(never one whose record fails): files restored without owners or setuid bits",
    )
    restore_parser.set_defaults(handler=_restore)

    drill_parser = commands.add_parser(
        "test-restore", help="restore a backup into scratch space and check every component"
    )
    drilled = drill_parser.add_mutually_exclusive_group()
    drilled.add_argument("name", nargs="?", help="the backup to test")
    drilled.add_argument("--latest", action="store_true", help=f"{LATEST_HELP} (default)")
    drill_parser.add_argument("--json", action="store_true", help="print JSON")
    drill_parser.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="test a backup without authentication record, or signed with another key",
    )
    drill_parser.set_defaults(handler=_test_restore)


def _add_pin_options(backup_parser: argparse.ArgumentParser) -> None:
    held = backup_parser.add_mutually_exclusive_group()
    held.add_argument(
        "--pin", action="store_true", help="keep this backup until `sovbackupd unpin NAME`"
    )
    held.add_argument(
        "--keep-until",
        metavar="TIME",
        help="keep this backup until TIME: a duration (30d, 1M) or an ISO 8601 date or time",
    )


def _add_pin_commands(commands: argparse._SubParsersAction[_CommandParser]) -> None:
    pin_parser = commands.add_parser(
        "pin", help="keep a backup whatever retention says, until unpinned or TIME"
    )
    pin_parser.add_argument("name", help="the backup to keep")
    pin_parser.add_argument(
        "--until",
        metavar="TIME",
        help="release it at TIME: a duration (30d, 1M) or an ISO 8601 date or time",
    )
    pin_parser.set_defaults(handler=_pin)
    unpin_parser = commands.add_parser("unpin", help="release a pinned backup to retention")
    unpin_parser.add_argument("name", help="the pinned backup")
    unpin_parser.set_defaults(handler=_unpin)


def _add_key_commands(commands: argparse._SubParsersAction[_CommandParser]) -> None:
    key_parser = commands.add_parser("key", help="the key that authenticates every backup")
    key_commands = key_parser.add_subparsers(dest="key", required=True)
    key_commands.add_parser("init", help="create the key file (refuses to replace one)")
    key_commands.add_parser("id", help="print the key's id (first 16 hex digits of its sha256)")
    key_parser.set_defaults(handler=_key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovbackupd", description="Backups of a SovereignCore server."
    )
    _add_global_options(parser)
    parser.set_defaults(config=None, verbose=False, log_format=None)
    parser.add_argument("--version", action="version", version=f"sovbackupd {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    run_parser = commands.add_parser("run", help="run the daemon (systemd Type=notify)")
    run_parser.set_defaults(handler=None, standalone=_run)

    backup_parser = commands.add_parser("backup", help="make one backup now")
    backup_parser.add_argument(
        "--tier",
        action="append",
        choices=[*TIER_NAMES, MANUAL_TIER],
        help="label the backup with this tier (repeatable; default: manual)",
    )
    _add_pin_options(backup_parser)
    backup_parser.set_defaults(handler=_backup)

    list_parser = commands.add_parser("list", help="list the backups, newest first")
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    list_parser.add_argument("--remote", metavar="NAME", help="list what this remote holds")
    list_parser.set_defaults(handler=_list)
    _add_pin_commands(commands)

    verify_parser = commands.add_parser("verify", help="check backups against their checksums")
    which = verify_parser.add_mutually_exclusive_group()
    which.add_argument("name", nargs="?", help="the backup to verify")
    which.add_argument("--latest", action="store_true", help=f"{LATEST_HELP} (default)")
    which.add_argument("--all", action="store_true", help="every backup")
    verify_parser.add_argument(
        "--deep", action="store_true", help="also check every member against the manifest"
    )
    verify_parser.add_argument("--json", action="store_true", help="print JSON")
    verify_parser.add_argument(
        "--remote",
        metavar="NAME",
        help="verify the copies on this remote (--deep downloads them to scratch space)",
    )
    verify_parser.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="pass a backup without authentication record, or signed with another key",
    )
    verify_parser.set_defaults(handler=_verify)

    _add_restore_commands(commands)

    prune_parser = commands.add_parser("prune", help="apply GFS retention now")
    prune_parser.add_argument("--dry-run", action="store_true", help="only say what would go")
    prune_parser.add_argument("--json", action="store_true", help="print JSON")
    prune_parser.set_defaults(handler=_prune)

    retention_parser = commands.add_parser("retention", help="preview retention")
    retention_commands = retention_parser.add_subparsers(dest="retention", required=True)
    simulate = retention_commands.add_parser(
        "simulate", help="which of a list of backup times the policy would keep, and why"
    )
    simulate.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="ISO 8601 times with offsets, one per line ('-' for stdin)",
    )
    simulate.add_argument("--every", type=_span, default=_span("1d"), help="series step (1d)")
    simulate.add_argument("--span", type=_span, default=_span("400d"), help="series length")
    simulate.add_argument(
        "--end", type=_aware_time, help="the series' newest time (default: this hour)"
    )
    simulate.add_argument("--json", action="store_true", help="print JSON")
    simulate.set_defaults(handler=_simulate)

    check_parser = commands.add_parser(
        "check-config",
        help="validate the policy and the files it names; print it as it takes effect",
    )
    check_parser.set_defaults(handler=_check_config)
    _add_key_commands(commands)

    demo_parser = commands.add_parser(
        "demo", help="run the daemon with the example policy on a sandbox server"
    )
    demo_parser.add_argument(
        "--seconds", type=float, help="stop after this long (default: run until Ctrl-C)"
    )
    demo_parser.add_argument(
        "--dir", type=Path, help="where to lay out the sandbox (default: a new temp dir)"
    )
    demo_parser.set_defaults(handler=None, standalone=_demo)
    return parser


class Terminated(Exception):
    """SIGTERM arrived: unwind, so that context managers remove partial files."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    del frame
    raise Terminated(signal.Signals(signum).name)


def _dispatch(argv: Sequence[str] | None) -> int:
    arguments = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    sovlogging.configure(
        sys.stderr, logging.INFO if arguments.verbose else logging.WARNING, arguments.log_format
    )
    handler: Command | None = arguments.handler
    try:
        if handler is None:
            standalone: Callable[[argparse.Namespace], int] = arguments.standalone
            return standalone(arguments)
        # check-config also vouches that a backup would find its files; other commands
        # (list, restore on a recovery machine) need not have them.
        check_files = handler is _check_config
        policy = config.load(arguments.config or config.default_path(), check_files=check_files)
        return handler(arguments, policy)
    except ConfigError as error:
        for problem in error.problems or (str(error),):
            print(f"sovbackupd: config error: {problem}", file=sys.stderr)
        return error.exit_code
    except SovbackupdError as error:
        print(f"sovbackupd: error: {error}", file=sys.stderr)
        return error.exit_code
    except (KeyboardInterrupt, Terminated):
        print("sovbackupd: interrupted; nothing was left half-written", file=sys.stderr)
        return ExitCode.INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    try:
        try:
            return _dispatch(argv)
        finally:
            # Flushed here, where a closed pipe can be handled, not at interpreter exit
            # (also after argparse's --help, which exits through SystemExit).
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (list | head -1): say nothing more, as a SIGPIPE'd tool would.
        # Python flushes stdout again at exit; /dev/null takes what is left in its buffer.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.CLOSED_PIPE
