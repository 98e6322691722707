"""The command line as operators use it: pipes closed early, options after the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sovbackupd.errors import ExitCode
from tests.conftest import CliResult, Sandbox, policy_data, run_cli, write_policy

# Each printing command, with what it needs beyond a policy and one backup named NAME.
PRINTING_COMMANDS = (
    ("list",),
    ("list", "--json"),
    ("verify", "--all"),
    ("verify", "--all", "--json"),
    ("retention", "simulate"),
    ("retention", "simulate", "--json"),
    ("restore", "NAME", "--dry-run"),
    ("check-config",),
    ("--help",),
)


def sovbackupd(*arguments: str) -> list[str]:
    """Return the argv of ``python -m sovbackupd`` with *arguments*."""
    return [sys.executable, "-m", "sovbackupd", *arguments]


def run_into_closed_pipe(*arguments: str) -> CliResult:
    """Run the CLI with stdout a pipe whose reader has already gone: every write fails."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        completed = subprocess.run(
            sovbackupd(*arguments),
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        os.close(writer)
    return CliResult(completed.returncode, "", completed.stderr)


@pytest.fixture
def backed_up(tmp_path: Path, sandbox: Sandbox) -> tuple[Path, str]:
    """A policy for the sandbox and the name of the one backup it has made."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    made = run_cli("backup", config=config)
    assert made.returncode == 0, made.stderr
    return config, made.stdout.strip()


@pytest.mark.parametrize("command", PRINTING_COMMANDS, ids=" ".join)
def test_printing_command_exits_quietly_into_a_closed_pipe(
    backed_up: tuple[Path, str], command: tuple[str, ...]
) -> None:
    """A reader gone before the output: exit 141 or 0, nothing on stderr, no traceback."""
    config, name = backed_up
    arguments = [name if word == "NAME" else word for word in command]

    result = run_into_closed_pipe("--config", str(config), *arguments)

    assert result.stderr == ""
    assert result.returncode in {ExitCode.CLOSED_PIPE, ExitCode.OK}


def test_list_into_a_closed_pipe_exits_141(backed_up: tuple[Path, str]) -> None:
    """The code of a closed pipe is 141, as for a tool stopped by SIGPIPE."""
    config, _ = backed_up
    result = run_into_closed_pipe("--config", str(config), "list")
    assert (result.returncode, result.stderr) == (ExitCode.CLOSED_PIPE, "")


def test_reader_that_stops_after_one_line_leaves_no_traceback(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """`retention simulate | head -1` with far more output than a pipe holds: quiet, 141."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    process = subprocess.Popen(
        sovbackupd("--config", str(config), "retention", "simulate", "--every", "1h"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # as head -1 does after its line
    stderr = process.stderr.read()
    process.wait(timeout=300)

    assert first.startswith(("keep", "delete"))
    assert stderr == ""
    assert process.returncode == ExitCode.CLOSED_PIPE


def test_global_options_work_after_the_command(backed_up: tuple[Path, str]) -> None:
    """`list --config P -v` reads P, like `--config P -v list`; the last --config counts."""
    config, name = backed_up

    after = run_cli("list", "--json", "--config", str(config), "-v")
    nested = run_cli("retention", "simulate", "--config", str(config), "--span", "2d")
    overridden = run_cli("--config", "/nonexistent/policy.yaml", "list", "--config", str(config))

    assert after.returncode == 0, after.stderr
    assert [row["name"] for row in json.loads(after.stdout)] == [name]
    assert nested.returncode == 0, nested.stderr
    assert nested.stdout.splitlines()[-1].startswith("3 of 3 kept")
    assert overridden.returncode == 0, overridden.stderr
    assert overridden.stdout.splitlines()[1].startswith(name)


def test_restore_without_a_name_is_a_usage_error(backed_up: tuple[Path, str]) -> None:
    """`restore` with neither NAME nor --latest exits 2 with argparse's usage line."""
    config, _ = backed_up
    result = run_cli("restore", config=config)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr_lines[0].startswith("usage: sovbackupd restore")
    assert "one of the arguments name --latest is required" in result.stderr_lines[-1]


def test_simulate_refuses_an_unreadable_or_oversized_list_in_one_line(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A missing, binary or too long --from file, or too many steps: one line, no traceback."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    too_many = tmp_path / "times.txt"
    too_many.write_text("2026-01-01T00:00:00+00:00\n" * 100_001)
    binary = tmp_path / "times.bin"
    binary.write_bytes(b"\xff\xfe\x00" * 10)

    cases = {
        "--from=/nonexistent/times.txt": (ExitCode.FAILURE, "cannot read /nonexistent/times.txt"),
        f"--from={binary}": (ExitCode.FAILURE, f"{binary}: not UTF-8 text"),
        f"--from={too_many}": (ExitCode.FAILURE, f"{too_many}: more than 100000 times"),
        "--span=5000w": (ExitCode.USAGE, "make 840001 backup times, simulate takes at most"),
    }
    for option, (code, needle) in cases.items():
        result = run_cli("retention", "simulate", option, "--every=1h", config=config)
        assert (result.returncode, len(result.stderr_lines)) == (code, 1), result
        assert needle in result.stderr, result
        assert result.stdout == ""
