"""Hooks run around every backup, whoever starts it; a failing before_backup hook stops it."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sovbackupd import backup, config
from sovbackupd.errors import AbortedError
from sovbackupd.hooks import group_members
from tests.conftest import Sandbox, backup_files, policy_data, run_cli, write_policy

DUMP_ENV = (
    "import json, os, sys; "
    "open(sys.argv[1], 'a').write(json.dumps({k: v for k, v in os.environ.items() "
    "if k.startswith('SOVBACKUPD_')}) + '\\n')"
)


def env_hook(record: Path) -> list[str]:
    return [sys.executable, "-c", DUMP_ENV, str(record)]


def recorded(record: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_hooks_see_the_stage_tiers_and_backup(tmp_path: Path, sandbox: Sandbox) -> None:
    """before_backup and after_backup hooks run in order with the backup's details."""
    record = tmp_path / "hooks.jsonl"
    hooks = {"before_backup": [env_hook(record)], "after_backup": [env_hook(record)]}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))
    result = run_cli("backup", "--tier", "daily", config=policy)
    assert result.returncode == 0, result.stderr
    before, after = recorded(record)
    assert before == {"SOVBACKUPD_STAGE": "before_backup", "SOVBACKUPD_TIERS": "daily"}
    assert after["SOVBACKUPD_STAGE"] == "after_backup"
    assert after["SOVBACKUPD_RESULT"] == "success"
    assert after["SOVBACKUPD_BACKUP"] == result.stdout.strip()
    assert Path(after["SOVBACKUPD_ARCHIVE"]).is_file()


def test_failing_before_hook_stops_the_backup_and_runs_on_failure(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A before_backup hook exiting 3 fails the backup with one line; on_failure hooks run."""
    record = tmp_path / "hooks.jsonl"
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    hooks = {"before_backup": [failing], "on_failure": [env_hook(record)]}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))
    result = run_cli("backup", config=policy)
    assert result.returncode == 1
    assert len(result.stderr_lines) == 1, result.stderr
    assert "before_backup hook" in result.stderr_lines[0]
    assert "exited 3" in result.stderr_lines[0]
    assert not [name for name in backup_files(sandbox.backup_dir) if "backup_" in name]
    (failure,) = recorded(record)
    assert failure["SOVBACKUPD_RESULT"] == "failure"
    assert "exited 3" in failure["SOVBACKUPD_ERROR"]


def survivors(group: int) -> list[int]:
    """Return the group's live members once they are gone, or after a bounded number of polls."""
    for _ in range(500):  # the kill's grace is 5 s, polled every 20 ms
        if not (members := group_members(group)):
            return members
        time.sleep(0.02)
    return group_members(group)


@dataclass
class Interrupted:
    """What `sovbackupd backup`, signalled while a hook ran, left behind."""

    returncode: int
    stdout: str
    stderr: str
    survivors: list[int]  # the hook's process group members still alive


def interrupt_backup_in_hook(
    policy: Path, pids: Path, ready: Callable[[str], bool], signum: signal.Signals
) -> Interrupted:
    """Run a CLI backup, send *signum* once the hook's *pids* file is *ready*, and wait.

    The hook writes its own pid (its process group's id) first in *pids*.
    """
    # A runner started in the background (nohup, `cmd &` without job control) ignores
    # SIGINT, and its children inherit that: give the CLI the terminal's default, as an
    # operator's shell would, so that SIGINT is the operator's Ctrl-C.
    cli = subprocess.Popen(
        [sys.executable, "-m", "sovbackupd", "--config", str(policy), "backup"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 (no threads run here)
    )
    group = 0
    try:
        for _ in range(3000):  # bounded: until the hook has written what it was told to
            if ready(pids.read_text() if pids.exists() else ""):
                break
            assert cli.poll() is None, cli.communicate()
            time.sleep(0.02)
        else:
            pytest.fail(f"the hook never got ready: {pids}")
        group = int(pids.read_text().split()[0])
        cli.send_signal(signum)
        stdout, stderr = cli.communicate(timeout=60)
        return Interrupted(cli.returncode, stdout, stderr, survivors(group))
    finally:
        cli.kill()
        cli.wait()
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_cli_backup_kills_the_before_hook_and_its_children(
    tmp_path: Path, sandbox: Sandbox, signum: signal.Signals
) -> None:
    """SIGINT (or SIGTERM) to `sovbackupd backup` ends the hook's whole process group with it."""
    pids = tmp_path / "hook.pids"
    # The hook's shell writes its pid (its own group's id), then waits on a grandchild.
    script = f"echo $$ > {pids}; sleep 300 & echo $! >> {pids}; wait"
    hooks = {"before_backup": [["sh", "-c", script]], "timeout_seconds": 600}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))

    def started(text: str) -> bool:
        """Both pids are written, and both run in the hook's group (its id is the first)."""
        written = [int(pid) for pid in text.split()]
        return len(written) == 2 and set(group_members(written[0])) >= set(written)

    result = interrupt_backup_in_hook(policy, pids, started, signum)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert result.survivors == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_while_a_timed_out_hook_is_given_its_grace_still_kills_its_group(
    tmp_path: Path, sandbox: Sandbox, signum: signal.Signals
) -> None:
    """A hook past its bound that ignores SIGTERM is not left behind by an impatient Ctrl-C.

    At the bound the group gets SIGTERM and a grace before SIGKILL; an operator who
    presses Ctrl-C during that grace must not leave the hook running, reparented to PID 1.
    """
    pids = tmp_path / "hook.pids"
    script = f"echo $$ > {pids}; trap 'echo term >> {pids}' TERM; while :; do sleep 0.1; done"
    hooks = {"before_backup": [["sh", "-c", script]], "timeout_seconds": 0.5}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))
    result = interrupt_backup_in_hook(policy, pids, lambda text: "term" in text, signum)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert result.survivors == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_after_hook_says_the_backup_is_complete(
    tmp_path: Path, sandbox: Sandbox, signum: signal.Signals
) -> None:
    """Interrupted in after_backup, the CLI said "nothing was left half-written" and no name.

    The backup is committed by then: an operator (or a script) told nothing was made
    takes another, or worse, a risky change without knowing one exists. Say which
    backup is complete and kept, print its name as a success does, and end the hook.
    """
    pids = tmp_path / "hook.pids"
    script = f"echo $$ > {pids}; sleep 300 & wait"
    hooks = {"after_backup": [["sh", "-c", script]], "timeout_seconds": 600}
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))
    result = interrupt_backup_in_hook(policy, pids, lambda text: bool(text.strip()), signum)
    assert result.survivors == []
    stdout, stderr = result.stdout, result.stderr
    [archive_name] = [name for name in backup_files(sandbox.backup_dir) if name.endswith(".tar.gz")]
    name = archive_name.removesuffix(".tar.gz")
    assert result.returncode == 130, stderr
    assert stdout.strip() == name
    [line] = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("sovbackupd: interrupted after backup ")
    assert name in line
    assert "half-written" not in line


def test_cancelling_a_backup_during_its_before_hook_aborts_it_and_kills_the_hook(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The daemon's cancel (shutdown, time bound) ends the hook's group; the backup is aborted."""
    pids = tmp_path / "hook.pids"
    script = f"echo $$ > {pids}; sleep 600 & echo $! >> {pids}; wait"
    hooks = {"before_backup": [["sh", "-c", script]], "timeout_seconds": 600}
    policy = config.load(
        write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, hooks=hooks))
    )
    cancel = threading.Event()
    raised: list[BaseException] = []

    def run_backup() -> None:
        try:
            backup.run(policy, ["daily"], cancel=cancel)
        except AbortedError as error:
            raised.append(error)

    runner = threading.Thread(target=run_backup)
    runner.start()
    group = 0
    try:
        for _ in range(1500):  # bounded: until the hook has written both pids
            if pids.exists() and len(pids.read_text().split()) == 2:
                break
            time.sleep(0.02)
        group = int(pids.read_text().split()[0])
        cancel.set()
        runner.join(60)
        assert not runner.is_alive()
        assert [type(error) for error in raised] == [AbortedError]
        assert "before_backup hook sh" in str(raised[0])
        assert survivors(group) == []
        assert not [name for name in backup_files(sandbox.backup_dir) if "backup_" in name]
    finally:
        cancel.set()
        runner.join(60)
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
