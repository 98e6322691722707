"""The guide's table of exit codes is true: each code in it is what a real case produces."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sovbackupd.errors import ExitCode
from sovbackupd.redis_server import free_port
from sovbackupd.store import LOCK_NAME
from tests.conftest import CliResult, Sandbox, policy_data, run_cli, write_policy
from tests.integration.test_backup_failures import Mount, mount_tmpfs, wait_for
from tests.integration.test_cli import run_into_closed_pipe
from tests.integration.test_remotes import fast_retries

# Fixtures of other test modules, requested by name below.
__all__ = ["fast_retries", "mount_tmpfs"]

GUIDE = Path(__file__).parents[2] / "docs" / "index.md"
MiB = 1 << 20


def documented_codes() -> dict[int, str]:
    """Return the guide's exit-code table: each code with its row."""
    text = GUIDE.read_text()
    section = text[text.index("## Failures and exit codes") :]
    section = section[: section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    return {int(row.split(" | ")[0].removeprefix("| ")): row for row in rows}


@dataclass
class Case:
    """What a scenario may use: the sandbox, its policy data, and a few real faults."""

    sandbox: Sandbox
    tmp_path: Path
    request: pytest.FixtureRequest

    def policy(self, **overrides: Any) -> Path:
        """Write the sandbox's policy with top-level *overrides*; return its path."""
        return write_policy(
            self.tmp_path / "policy.yaml", policy_data(self.sandbox, None, **overrides)
        )

    def backup(self, config: Path) -> str:
        """Make one backup with *config*; return its name."""
        made = run_cli("backup", config=config)
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()


def success(case: Case) -> CliResult:
    return run_cli("check-config", config=case.policy())


def failure(case: Case) -> CliResult:
    config = case.policy()
    data = policy_data(case.sandbox, None)
    data["sources"]["config"].append(str(case.sandbox.app / "missing.conf"))
    return run_cli("backup", config=write_policy(config, data))


def usage(case: Case) -> CliResult:
    return run_cli("restore", config=case.policy())


def unauthenticated(case: Case) -> CliResult:
    config = case.policy()
    name = case.backup(config)
    (case.sandbox.backup_dir / f"{name}.auth.json").unlink()
    return run_cli("restore", name, "--yes", "--no-safety-backup", config=config)


def restored_not_started(case: Case) -> CliResult:
    config = case.policy(restore={"start": [[sys.executable, "-c", "raise SystemExit(1)"]]})
    name = case.backup(config)
    return run_cli("restore", name, "--yes", "--no-safety-backup", config=config)


def disk_full(case: Case) -> CliResult:
    mount: Mount = case.request.getfixturevalue("mount_tmpfs")
    mount(case.sandbox.backup_dir, "4m")
    for number in range(3):
        (case.sandbox.app / "data" / f"big-{number}.bin").write_bytes(os.urandom(2 * MiB))
    return run_cli("backup", config=case.policy())


def lock_held(case: Case) -> CliResult:
    config = case.policy()
    case.backup(config)
    descriptor = os.open(case.sandbox.backup_dir / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return run_cli("backup", config=config)
    finally:
        os.close(descriptor)


def remote_unreachable(case: Case) -> CliResult:
    case.request.getfixturevalue("fast_retries")
    remote = {"name": "off", "type": "rsync", "url": "backup@127.0.0.1:/backups"}
    config = case.policy(remotes=[{**remote, "port": free_port()}])
    return run_cli("list", "--remote", "off", config=config)


def config_error(case: Case) -> CliResult:
    return run_cli("check-config", config=case.policy(backup_dri="/typo"))


HOOK_THAT_WAITS = """
import pathlib, sys
pathlib.Path(sys.argv[1]).touch()
open(sys.argv[2]).read()
"""


def release(fifo: Path) -> None:
    """Let a hook blocked reading *fifo* end, if it still runs."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as error:
        assert error.errno == errno.ENXIO  # no reader left: the hook is gone already


def interrupted(case: Case) -> CliResult:
    # SIGTERM (what Ctrl-C does too; a test runner may ignore SIGINT) while a before_backup
    # hook runs: the CLI waits for it in Python, where the signal lands at once.
    marker, fifo = case.tmp_path / "hook-started", case.tmp_path / "hook-fifo"
    os.mkfifo(fifo)
    hook = [sys.executable, "-c", HOOK_THAT_WAITS, str(marker), str(fifo)]
    config = case.policy(hooks={"before_backup": [hook]})
    process = subprocess.Popen(
        [sys.executable, "-m", "sovbackupd", "--config", str(config), "backup"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The hook has started, and so has the thread that reads its output.
        tasks = Path(f"/proc/{process.pid}/task")
        wait_for(lambda: marker.exists() and len(list(tasks.iterdir())) > 1, "the hook")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        release(fifo)
    return CliResult(process.returncode, stdout, stderr)


def closed_pipe(case: Case) -> CliResult:
    return run_into_closed_pipe("--config", str(case.policy()), "check-config")


# Each documented code with the real cases that must produce it.
SCENARIOS: dict[int, tuple[Callable[[Case], CliResult], ...]] = {
    ExitCode.OK: (success,),
    ExitCode.FAILURE: (failure,),
    ExitCode.USAGE: (usage,),
    ExitCode.UNAUTHENTICATED: (unauthenticated,),
    ExitCode.NOT_STARTED: (restored_not_started,),
    ExitCode.CANT_CREATE: (disk_full,),
    ExitCode.TEMPFAIL: (lock_held, remote_unreachable),
    ExitCode.CONFIG: (config_error,),
    ExitCode.INTERRUPTED: (interrupted,),
    ExitCode.CLOSED_PIPE: (closed_pipe,),
}
NEEDS_ROOT = {disk_full}


def test_the_table_documents_every_exit_code_and_only_those() -> None:
    """The guide's table, errors.ExitCode and the scenarios below name the same codes."""
    assert set(documented_codes()) == {code.value for code in ExitCode} == set(SCENARIOS)


@pytest.fixture
def case(tmp_path: Path, sandbox: Sandbox, request: pytest.FixtureRequest) -> Case:
    """A fresh sandbox for one scenario."""
    return Case(sandbox, tmp_path, request)


@pytest.mark.parametrize(
    ("code", "scenario"),
    [
        pytest.param(
            code,
            scenario,
            id=f"{code}-{scenario.__name__}",
            marks=[pytest.mark.root] if scenario in NEEDS_ROOT else [],
        )
        for code, scenarios in SCENARIOS.items()
        for scenario in scenarios
    ],
)
def test_documented_exit_code_is_what_a_real_case_produces(
    case: Case, code: int, scenario: Callable[[Case], CliResult]
) -> None:
    """Each scenario exits with its documented code; failures say so in one line."""
    assert code in documented_codes()
    result = scenario(case)
    assert result.returncode == code, result
    if code in {ExitCode.OK, ExitCode.CLOSED_PIPE}:
        assert result.stderr == ""
    elif code != ExitCode.USAGE:
        assert len(result.stderr_lines) == 1, result.stderr
        assert "Traceback" not in result.stderr
