"""Hooks: real processes, their environment, failures, bounds and output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sovbackupd import hooks

ENV = {
    "SOVBACKUPD_BACKUP": "sovereigncore_backup_20260102_140000",
    "SOVBACKUPD_TIERS": "daily,weekly",
    "SOVBACKUPD_RESULT": "success",
    "SOVBACKUPD_ERROR": "",
    "SOVBACKUPD_ARCHIVE": "/var/backups/x.tar.gz",
}


def python(code: str, *arguments: str) -> list[str]:
    return [sys.executable, "-c", code, *arguments]


def exits(code: int) -> list[str]:
    return python(f"import sys; print('exiting {code}'); sys.exit({code})")


def touches(path: Path) -> list[str]:
    return python("import pathlib, sys; pathlib.Path(sys.argv[1]).touch()", str(path))


def is_running(pid: int) -> bool:
    """Return whether *pid* runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in {"Z", "X"}


def wait_for_file(path: Path, seconds: float = 10) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.02)
    pytest.fail(f"{path} was not written")


@pytest.fixture
def pids_to_kill() -> Iterator[list[int]]:
    """Pids that a test leaves behind on purpose; killed afterwards if still there."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_hook_succeeds_and_sees_the_backup_environment(tmp_path: Path) -> None:
    """A hook runs with this process's environment, the caller's variables and its stage."""
    dump = tmp_path / "env.json"
    hook = python(
        "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))", str(dump)
    )
    results = hooks.run("after_backup", [hook], 10, ENV, stop_on_failure=False)
    [result] = results
    assert result.ok
    assert result.returncode == 0
    assert not result.timed_out
    assert result.error is None
    assert result.argv == tuple(hook)
    seen = json.loads(dump.read_text())
    assert {key: seen[key] for key in ENV} == ENV
    assert seen["SOVBACKUPD_STAGE"] == "after_backup"
    assert seen["PATH"] == os.environ["PATH"]


def test_hook_runs_without_a_shell_and_reads_nothing_from_stdin(tmp_path: Path) -> None:
    """Shell syntax in an argument reaches the hook untouched, and stdin is empty."""
    dump = tmp_path / "seen.json"
    hook = python(
        "import json, sys; json.dump([sys.argv[2], sys.stdin.read()], open(sys.argv[1], 'w'))",
        str(dump),
        "$HOME; echo `id` > /tmp/x",
    )
    [result] = hooks.run("before_backup", [hook], 10, {}, stop_on_failure=True)
    assert result.ok
    assert json.loads(dump.read_text()) == ["$HOME; echo `id` > /tmp/x", ""]


def test_failing_hook_stops_the_later_hooks_when_asked(tmp_path: Path) -> None:
    """With stop_on_failure the hooks after one that exits 3 do not run."""
    marker = tmp_path / "ran"
    results = hooks.run(
        "before_backup", [exits(0), exits(3), touches(marker)], 10, {}, stop_on_failure=True
    )
    assert [result.returncode for result in results] == [0, 3]
    assert [result.ok for result in results] == [True, False]
    assert "exiting 3" in results[1].output_tail
    assert not marker.exists()


def test_failing_hook_does_not_stop_the_later_hooks_by_default(tmp_path: Path) -> None:
    """Without stop_on_failure every hook runs, whatever the earlier ones returned."""
    marker = tmp_path / "ran"
    results = hooks.run("on_failure", [exits(3), touches(marker)], 10, {}, stop_on_failure=False)
    assert [result.returncode for result in results] == [3, 0]
    assert marker.exists()


def test_hook_that_hangs_is_killed_at_the_bound() -> None:
    """A hook still running at its bound is killed and reported as timed out."""
    started = time.monotonic()
    [result] = hooks.run("before_backup", [["sleep", "60"]], 0.5, {}, stop_on_failure=True)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert result.returncode is None
    assert not result.ok
    # Killed, not finished: no return code. Only a lower bound on time, which load cannot
    # break: it ran at least until its bound.
    assert result.duration_seconds >= 0.5
    assert elapsed >= 0.5


def test_hook_that_hangs_is_killed_with_its_children_at_the_bound(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    """The whole process group goes at the bound, including a child in the background."""
    pid_file = tmp_path / "child.pid"
    hook = python(
        "import pathlib, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "pathlib.Path(sys.argv[1]).write_text(str(child.pid))\n"
        "time.sleep(60)\n",
        str(pid_file),
    )
    started = time.monotonic()
    [result] = hooks.run("before_backup", [hook], 0.5, {}, stop_on_failure=True)
    elapsed = time.monotonic() - started
    child = int(pid_file.read_text())
    pids_to_kill.append(child)
    assert result.timed_out
    assert result.returncode is None
    assert elapsed >= 0.5
    assert not is_running(child)


def test_hook_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook that traps SIGTERM gets SIGKILL once the grace is over."""
    monkeypatch.setattr(hooks, "KILL_GRACE_SECONDS", 0.5)
    ready = tmp_path / "ready"
    hook = python(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).write_text('x')\n"
        "time.sleep(60)\n",
        str(ready),
    )
    started = time.monotonic()
    [result] = hooks.run("before_backup", [hook], 0.5, {}, stop_on_failure=True)
    assert ready.exists()
    assert result.timed_out
    assert time.monotonic() - started >= 1.0  # the bound, then the grace before SIGKILL


def test_hook_that_leaves_a_background_child_does_not_hold_up_the_run(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    """A hook that exits in time returns promptly even though its child keeps the output open."""
    pid_file = tmp_path / "child.pid"
    hook = ["sh", "-c", 'echo started; sleep 30 & echo $! > "$1"', "hook", str(pid_file)]
    [result] = hooks.run("after_backup", [hook], 10, {}, stop_on_failure=False)
    child = int(wait_for_file(pid_file))
    pids_to_kill.append(child)
    assert result.ok
    assert "started" in result.output_tail
    # Returned while the child, which holds the output pipe for 30 s, still runs: the run
    # did not wait for the pipe to close.
    assert is_running(child), "a hook that finished in time keeps its background processes"


def test_missing_executable_is_a_result_with_an_error(tmp_path: Path) -> None:
    """An argv whose program does not exist gives a failed result, not an exception."""
    missing = str(tmp_path / "no-such-hook")
    marker = tmp_path / "ran"
    results = hooks.run("before_backup", [[missing], touches(marker)], 10, {}, stop_on_failure=True)
    [result] = results
    assert not result.ok
    assert result.returncode is None
    assert not result.timed_out
    assert result.error == f"not found: {missing}"
    assert not marker.exists()


def test_non_executable_file_is_a_result_with_an_error(tmp_path: Path) -> None:
    """A hook file without the execute bit gives a failed result, not an exception."""
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    [result] = hooks.run("before_backup", [[str(script)]], 10, {}, stop_on_failure=True)
    assert not result.ok
    assert result.error == f"not executable: {script}"


def test_a_script_whose_interpreter_is_missing_is_not_called_missing(tmp_path: Path) -> None:
    """The kernel says ENOENT for a missing #! interpreter too: "not found: <the hook>" misleads.

    The operator sees the file right there; the error must point at its first line.
    """
    script = tmp_path / "hook.sh"
    script.write_text("#!/no/such/interpreter\nexit 0\n")
    script.chmod(0o755)
    [result] = hooks.run("before_backup", [[str(script)]], 10, {}, stop_on_failure=True)
    assert result.error == f"cannot start {script}: its interpreter (#! line) was not found"


def test_a_directory_as_the_hook_is_called_a_directory(tmp_path: Path) -> None:
    """A directory has the execute bit: "not executable" would send the operator to chmod."""
    [result] = hooks.run("before_backup", [[str(tmp_path)]], 10, {}, stop_on_failure=True)
    assert result.error == f"cannot start {tmp_path}: it is a directory"


def test_unusable_argument_is_a_result_with_an_error() -> None:
    """An argv with a NUL byte, which exec cannot take, fails without an exception."""
    [result] = hooks.run("on_failure", [["echo", "a\0b"]], 10, {}, stop_on_failure=False)
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("cannot start echo: ")


def test_hook_printing_50_megabytes_keeps_only_the_tail() -> None:
    """Output is read as it comes and only its last characters are kept."""
    hook = python(
        "import sys\n"
        "line = b'x' * 1023 + b'\\n'\n"
        "for _ in range(50 * 1024): sys.stdout.buffer.write(line)\n"
        "sys.stderr.write('the end\\n')\n"
    )
    tracemalloc.start()
    try:
        [result] = hooks.run("after_backup", [hook], 60, {}, stop_on_failure=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok
    assert len(result.output_tail) <= hooks.OUTPUT_TAIL_CHARS
    assert result.output_tail.endswith("the end\n")
    assert peak < 5 * 1024 * 1024


def test_hook_events_name_the_stage_and_the_outcome() -> None:
    """Each hook logs hook.finished or hook.failed; skipped hooks log hook.skipped."""
    with capture_logs() as events:
        hooks.run("before_backup", [exits(0), exits(3), exits(0)], 10, {}, stop_on_failure=True)
    assert [(event["event"], event["log_level"]) for event in events] == [
        ("hook.finished", "info"),
        ("hook.failed", "info"),  # the caller reports it: it fails the backup
        ("hook.skipped", "info"),
    ]
    finished, failed, skipped = events
    assert finished["stage"] == "before_backup"
    assert finished["returncode"] == 0
    assert finished["timed_out"] is False
    assert "output_tail" not in finished
    assert failed["argv"] == exits(3)
    assert failed["returncode"] == 3
    assert "exiting 3" in failed["output_tail"]
    assert isinstance(failed["duration_seconds"], float)
    assert skipped["argv"] == exits(0)


def test_failing_hook_without_stop_on_failure_logs_a_warning() -> None:
    """After a backup nobody else reports a failing hook, so it is a warning."""
    with capture_logs() as events:
        hooks.run("after_backup", [exits(3)], 10, {}, stop_on_failure=False)
    assert [(event["event"], event["log_level"]) for event in events] == [
        ("hook.failed", "warning")
    ]


def test_cancel_kills_the_running_hook_with_its_children_and_skips_the_rest(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    """Setting cancel ends the running hook's group at once; later hooks do not run."""
    pid_file = tmp_path / "child.pid"
    hook = python(
        "import pathlib, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        "pathlib.Path(sys.argv[1]).write_text(str(child.pid))\n"
        "time.sleep(600)\n",
        str(pid_file),
    )
    later = tmp_path / "later"
    cancel = threading.Event()
    results: list[hooks.HookResult] = []
    runner = threading.Thread(
        target=lambda: results.extend(
            hooks.run(
                "before_backup",
                [hook, touches(later)],
                600,
                {},
                stop_on_failure=False,
                cancel=cancel,
            )
        )
    )
    runner.start()
    child = int(wait_for_file(pid_file))
    pids_to_kill.append(child)
    cancel.set()
    runner.join(60)
    assert not runner.is_alive()
    [result] = results
    assert result.cancelled
    assert not result.timed_out
    assert result.returncode is None
    assert "cancelled" in result.failure
    assert not is_running(child)
    assert not later.exists()


def capabilities(status: str) -> dict[str, int]:
    """Return the Cap* sets of a /proc/PID/status text, as integers."""
    return {
        name: int(value, 16)
        for name, _, value in (line.partition(":\t") for line in status.splitlines())
        if name.startswith("Cap")
    }


CAPABILITY_PROBE = """
import json, sys
from sovbackupd import hooks
status = open('/proc/self/status').read()
[result] = hooks.run(
    'before_backup',
    [[sys.executable, '-c', 'print(open("/proc/self/status").read())']],
    60,
    {},
    stop_on_failure=True,
)
print(json.dumps({'daemon': status, 'hook': result.output_tail, 'ok': result.ok}))
"""
CAP_DAC_READ_SEARCH = 1 << 2


@pytest.mark.root
def test_hook_does_not_inherit_the_ambient_capability_the_unit_grants() -> None:
    """Under AmbientCapabilities=CAP_DAC_READ_SEARCH as a system user, a hook gets no capability."""
    if os.geteuid() != 0:
        pytest.fail("this test starts a process with an ambient capability: run it as root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is not installed")
    # What the unit does: a non-root user holding the capability in its ambient set.
    probe = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--",
            sys.executable,
            "-c",
            CAPABILITY_PROBE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(probe.stdout.splitlines()[-1])
    daemon, hook = capabilities(report["daemon"]), capabilities(report["hook"])
    assert report["ok"]
    assert daemon["CapAmb"] == daemon["CapEff"] == CAP_DAC_READ_SEARCH
    assert hook["CapEff"] == hook["CapPrm"] == hook["CapAmb"] == hook["CapInh"] == 0
