"""Operator hooks: argv lists run around a backup, without a shell, each within a bound.

Each hook runs in its own session (process group), without the capability the systemd
unit grants the daemon (:mod:`sovbackupd.privileges`), with stdin on /dev/null and stdout
and stderr combined into one pipe, of which only the last few kilobytes are kept: a hook
may print gigabytes without costing memory or disk. At its bound, when the run is
cancelled, and on every other way out of the wait (Ctrl-C's KeyboardInterrupt, the CLI's
SIGTERM exception) the whole group gets SIGTERM, then SIGKILL after
:data:`KILL_GRACE_SECONDS`, so a hook cannot leave a stray ``sleep`` or ``pg_dump``
behind. Its own session keeps it from the terminal's Ctrl-C, which is why sovbackupd must
end it itself. A hook that exits in time may leave
background processes running on purpose; they are not killed, and their output is
drained and discarded until they close it.

A failing hook never raises: :func:`run` returns a :class:`HookResult` for it, and the
caller decides (a failing ``before_backup`` hook fails the backup).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import structlog

from sovbackupd import privileges

log = structlog.get_logger("sovbackupd.hooks")

KILL_GRACE_SECONDS = 5.0
"""After SIGTERM at the bound, how long the hook's process group has before SIGKILL."""
OUTPUT_DRAIN_SECONDS = 1.0
"""After a hook exits, how long to wait for output still held by its background children."""
OUTPUT_TAIL_CHARS = 2000
_TAIL_BYTES = OUTPUT_TAIL_CHARS * 4  # the most UTF-8 needs for that many characters
_READ_BYTES = 64 * 1024
_POLL_SECONDS = 0.02
_CANCEL_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class HookResult:
    """How one hook ended."""

    argv: tuple[str, ...]
    returncode: int | None  # None when it could not start or was killed at its bound
    timed_out: bool
    duration_seconds: float
    output_tail: str  # the last OUTPUT_TAIL_CHARS of stdout and stderr combined, for logs
    error: str | None = None  # why it could not start, e.g. "not found: /usr/bin/x"
    cancelled: bool = False  # killed because the run was cancelled

    @property
    def ok(self) -> bool:
        """Return whether the hook ran and exited 0."""
        return self.returncode == 0

    @property
    def failure(self) -> str:
        """Say how the hook failed, for a one-line error."""
        if self.cancelled:
            return f"cancelled after {self.duration_seconds:.0f}s"
        if self.timed_out:
            return f"timed out after {self.duration_seconds:.0f}s"
        return self.error or f"exited {self.returncode}"


class _TailReader:
    """Read a pipe to its end on a thread, keeping only the last bytes.

    The thread reads the raw descriptor and never closes the stream: a daemon thread that
    holds a buffered stream's lock when the interpreter exits (a Ctrl-C unwinding past the
    hook) makes the exit abort with "could not acquire lock ... at interpreter shutdown".
    :meth:`wait` closes it, once the thread has let go of it.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="hook-output", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        descriptor = self._stream.fileno()
        while chunk := os.read(descriptor, _READ_BYTES):
            with self._lock:
                self._tail += chunk
                del self._tail[:-_TAIL_BYTES]

    def wait(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for the end of the output; close the pipe if it came.

        A pipe still held open by a process that left the hook's group stays open (its
        reader is blocked on it) until the interpreter exits.
        """
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._stream.close()

    def text(self) -> str:
        """Return the output kept so far, decoded, at most OUTPUT_TAIL_CHARS long."""
        with self._lock:
            kept = bytes(self._tail)
        return kept.decode(errors="replace")[-OUTPUT_TAIL_CHARS:]


def group_members(group: int) -> list[int]:
    """Return the pids of process group *group* that still run (zombies do not count).

    Read from /proc: kill() succeeds on zombies, and orphaned zombies linger where PID 1
    does not reap (containers).
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == group and fields[0] not in {"Z", "X"}:
            members.append(int(entry.name))
    return members


def _group_has_live_members(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").is_dir() or bool(group_members(group))


def _signal_group(group: int, signal_number: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal_number)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Terminate the process group led by *process*; SIGKILL it after the grace."""
    group = process.pid  # start_new_session made the hook the leader of its own group
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while time.monotonic() < deadline:
        # Reap the leader first: while it is an unreaped zombie the group looks alive.
        if process.poll() is not None and not _group_has_live_members(group):
            return
        time.sleep(_POLL_SECONDS)
    _signal_group(group, signal.SIGKILL)
    # Past SIGKILL only a process stuck in the kernel (D state) remains; do not hang on it.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE_SECONDS)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the hook's group on the way out of an exception, even if a second one comes."""
    try:
        _kill_group(process)
    except BaseException:
        # A second Ctrl-C during the grace: no more patience, but no survivor either.
        _signal_group(process.pid, signal.SIGKILL)
        raise


def _wait(
    process: subprocess.Popen[bytes], timeout: float, cancel: threading.Event | None
) -> tuple[int | None, Literal["timed out", "cancelled"] | None]:
    """Wait for the hook; return its exit code, or None and why it must be stopped."""
    if cancel is None:
        try:
            return process.wait(timeout), None
        except subprocess.TimeoutExpired:
            return None, "timed out"
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if cancel.is_set():
            return None, "cancelled"
        with contextlib.suppress(subprocess.TimeoutExpired):
            return process.wait(min(remaining, _CANCEL_POLL_SECONDS)), None
    return None, "timed out"


class _SignalsHeld:
    """Hold SIGINT and SIGTERM while a hook starts; :meth:`release` raises what came.

    A signal inside ``Popen()`` (the child already runs, its pid not yet returned) would
    unwind with no process to kill: the hook would outlive the CLI. Only the main thread
    receives signals; elsewhere (the daemon's workers) nothing is held.
    """

    def __init__(self) -> None:
        self._pending: list[int] = []
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._hold)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._pending.append(signum)

    def release(self) -> None:
        """Restore the handlers, then deliver the signals that arrived meanwhile."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        pending, self._pending = self._pending, []
        for signum in pending:
            signal.raise_signal(signum)


def _start_error(argv: Sequence[str], error: OSError | ValueError) -> str:
    program = argv[0]
    # exec's errno names the wrong culprit twice: ENOENT for a script whose #! interpreter
    # is missing, EACCES for a directory (which has the execute bit).
    found = program if "/" in program else shutil.which(program)
    if isinstance(error, FileNotFoundError):
        if found is not None and Path(found).is_file():
            return f"cannot start {program}: its interpreter (#! line) was not found"
        return f"not found: {program}"
    if isinstance(error, PermissionError):
        if found is not None and Path(found).is_dir():
            return f"cannot start {program}: it is a directory"
        return f"not executable: {program}"
    if isinstance(error, OSError) and error.strerror:
        return f"cannot start {argv[0]}: {error.strerror}"
    return f"cannot start {argv[0]}: {error}"


def _run_one(
    argv: Sequence[str],
    timeout: float,
    environment: Mapping[str, str],
    cancel: threading.Event | None,
) -> HookResult:
    started = time.monotonic()
    if not argv:
        return HookResult((), None, False, 0.0, "", error="empty command")
    held = _SignalsHeld()
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(environment),
            start_new_session=True,
            preexec_fn=privileges.drop_for_exec(),  # noqa: PLW1509 (two syscalls, prepared before fork)
        )
    except (subprocess.SubprocessError, OSError, ValueError) as error:
        # SubprocessError: raised in the child by the capability drop; ValueError: a NUL
        # byte in argv or env.
        held.release()
        problem = (
            f"cannot start {argv[0]}: its capabilities could not be dropped"
            if isinstance(error, subprocess.SubprocessError)
            else _start_error(argv, error)
        )
        return HookResult(tuple(argv), None, False, time.monotonic() - started, "", error=problem)
    except BaseException:
        held.release()
        raise
    output: _TailReader | None = None
    try:
        held.release()  # a Ctrl-C during the start is raised here, where the group is known
        assert process.stdout is not None  # noqa: S101 (stdout=PIPE above)
        output = _TailReader(process.stdout)
        returncode, stopped = _wait(process, timeout, cancel)
    except BaseException:
        _stop_group(process)
        if output is not None:
            output.wait(OUTPUT_DRAIN_SECONDS)
        raise
    if stopped is not None:
        _stop_group(process)  # a Ctrl-C during the grace must not leave the group running
    output.wait(OUTPUT_DRAIN_SECONDS)
    return HookResult(
        tuple(argv),
        returncode,
        stopped == "timed out",
        time.monotonic() - started,
        output.text(),
        cancelled=stopped == "cancelled",
    )


def run(
    stage: str,
    commands: Sequence[Sequence[str]],
    timeout: float,
    env: Mapping[str, str],
    *,
    stop_on_failure: bool,
    cancel: threading.Event | None = None,
) -> list[HookResult]:
    """Run each argv of *commands* in order, each killed after *timeout* seconds.

    A hook sees this process's environment plus *env* and ``SOVBACKUPD_STAGE=stage``.
    With *stop_on_failure* the first hook that fails (non-zero exit, killed, or not
    startable) ends the run and the later ones are skipped; otherwise all run. Return one
    result per hook that ran, in order; never raise for a hook's failure.

    Setting *cancel* kills the running hook (and its group) as its bound would, and the
    later hooks do not run. Any exception while a hook runs (KeyboardInterrupt included)
    kills its group before it propagates.
    """
    environment = {**os.environ, **env, "SOVBACKUPD_STAGE": stage}
    results: list[HookResult] = []
    for index, argv in enumerate(commands):
        if cancel is not None and cancel.is_set():
            for skipped in commands[index:]:
                log.info("hook.skipped", stage=stage, argv=list(skipped))
            break
        result = _run_one(argv, timeout, environment, cancel)
        results.append(result)
        fields = {
            "stage": stage,
            "argv": list(result.argv),
            "returncode": result.returncode,
            "timed_out": result.timed_out,
            "cancelled": result.cancelled,
            "duration_seconds": round(result.duration_seconds, 3),
        }
        if result.ok:
            log.info("hook.finished", **fields)
            continue
        # With stop_on_failure the caller fails the whole run and reports it: a warning too
        # would say the same thing twice on the operator's terminal.
        level = log.info if stop_on_failure else log.warning
        level("hook.failed", **fields, error=result.error, output_tail=result.output_tail)
        if stop_on_failure:
            for skipped in commands[index + 1 :]:
                log.info("hook.skipped", stage=stage, argv=list(skipped))
            break
    return results
