"""The systemd unit: systemd-analyze accepts it and rates it, and it keeps the daemon's contract.

systemd is not PID 1 here (nor in CI), so ``systemd-analyze verify`` runs offline against a
throwaway root: the host's own unit tree (for sysinit.target and friends) plus the
executables the install docs put in place. A broken copy of the unit must make the same
helper report problems, which proves the check really runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sovbackupd import daemon
from sovbackupd.config.loader import DEFAULT_PATH
from sovbackupd.config.reference import EXAMPLE
from sovbackupd.errors import ExitCode
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "sovbackupd.service"
UNIT_NAME = UNIT.name
DOCS = REPO / "docs" / "systemd.md"
EXPOSURE_LIMIT = 2.5
HOST_UNITS = Path("/usr/lib/systemd/system")  # the systemd package's own units
# What docs/systemd.md installs, as the unit's Exec lines name it.
INSTALLED_COMMAND = f"/usr/local/bin/sovbackupd --config {DEFAULT_PATH} run"
TIMESPAN_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Directive:
    """One ``Key=value`` line of a unit file."""

    section: str
    key: str
    value: str
    line_number: int
    commented_above: bool  # the line just above is a comment


def read_unit(text: str) -> list[Directive]:
    """Parse unit-file *text* into its directives, in order (keys may repeat)."""
    directives: list[Directive] = []
    section = ""
    previous = ""
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, separator, value = line.partition("=")
            assert separator, f"{UNIT_NAME}:{line_number}: not a Key=value line: {raw!r}"
            commented = previous.startswith(("#", ";"))
            directives.append(
                Directive(section, key.strip(), value.strip(), line_number, commented)
            )
        previous = line
    return directives


def values(directives: list[Directive], section: str, key: str) -> list[str]:
    """Return every value of *key* in *section*, in order."""
    return [item.value for item in directives if item.section == section and item.key == key]


def single(directives: list[Directive], section: str, key: str) -> str:
    """Return the one value of *key* in *section*; fail if it is absent or repeated."""
    found = values(directives, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times, expected once"
    return found[0]


def seconds(timespan: str) -> float:
    """Return a systemd time span such as ``60s``, ``7min`` or ``1min 30s`` in seconds."""
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan)
    assert parts, f"not a time span: {timespan!r}"
    for number, unit in parts:
        assert unit in TIMESPAN_UNITS or not unit, f"unknown time unit in {timespan!r}"
        total += float(number) * TIMESPAN_UNITS.get(unit, 1.0)
    return total


@pytest.fixture
def unit() -> list[Directive]:
    """The directives of systemd/sovbackupd.service."""
    return read_unit(UNIT.read_text())


def analyze_environment() -> dict[str, str]:
    """Return an environment in which systemd-analyze prints plain, complete text."""
    environment = dict(os.environ)
    environment.update(
        {"SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    )
    return environment


def offline_root(directory: Path) -> Path:
    """Lay out a root in which ``verify`` can load the unit without a running systemd.

    It holds a copy of the host's unit tree (the targets the unit depends on) and the
    executables named by the unit where the install docs put them: the installed
    sovbackupd entry point at /usr/local/bin and the real kill(1) at /usr/bin, with /bin
    a symlink to usr/bin as on Debian 12.
    """
    if not (HOST_UNITS / "multi-user.target").exists():
        pytest.fail(f"{HOST_UNITS} lacks multi-user.target; install the systemd package")
    root = directory / "root"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/bin").mkdir()
    (root / "bin").symlink_to("usr/bin")
    entry_point = Path(sys.executable).parent / "sovbackupd"
    assert entry_point.exists(), f"{entry_point} missing: install the package (tools/setup)"
    shutil.copy2(entry_point, root / "usr/local/bin/sovbackupd")
    shutil.copy2(require_tool("kill"), root / "usr/bin/kill")
    return root


def verify(unit_text: str, directory: Path) -> str:
    """Install *unit_text* as sovbackupd.service in an offline root; return what verify printed."""
    analyze = require_tool("systemd-analyze")
    root = offline_root(directory)
    (root / "etc/systemd/system" / UNIT_NAME).write_text(unit_text)
    completed = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", "--recursive-errors=no", UNIT_NAME],
        capture_output=True,
        text=True,
        env=analyze_environment(),
        timeout=60,
        check=False,
    )
    return (completed.stdout + completed.stderr).strip()


def exposure(unit_file: Path) -> float:
    """Return the overall exposure level ``systemd-analyze security`` gives *unit_file*."""
    analyze = require_tool("systemd-analyze")
    completed = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit_file)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=analyze_environment(),
        timeout=60,
        check=False,
    )
    output = completed.stdout + completed.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, f"no exposure level in the output:\n{output}"
    return float(match.group(1))


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """systemd-analyze verify, run offline on the unit, prints nothing at all."""
    assert verify(UNIT.read_text(), tmp_path) == ""


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        pytest.param(
            ("Type=notify", "Type=notify\nWatchdogSecs=60s"),
            "Unknown key 'WatchdogSecs'",
            id="unknown-directive",
        ),
        pytest.param(
            ("Type=notify", "Type=notifyy"),
            "Failed to parse service type",
            id="bad-value",
        ),
        pytest.param(
            ("ExecStart=/usr/local/bin/", "ExecStart=/usr/bin/"),
            "/usr/bin/sovbackupd is not executable",
            id="binary-not-where-installed",
        ),
    ],
)
def test_verify_reports_a_broken_unit(
    tmp_path: Path, broken: tuple[str, str], expected: str
) -> None:
    """The verify helper really checks: a broken copy of the unit makes it report the fault."""
    text = UNIT.read_text()
    old, new = broken
    assert old in text
    assert expected in verify(text.replace(old, new, 1), tmp_path)


def test_security_exposure_is_at_most_the_limit() -> None:
    """systemd-analyze security rates the unit's exposure at 2.5 or better."""
    assert exposure(UNIT) <= EXPOSURE_LIMIT


def test_exposure_check_tells_a_bare_unit_from_the_hardened_one(tmp_path: Path) -> None:
    """The service without its hardening rates worse than the limit: the check discriminates."""
    bare = tmp_path / UNIT_NAME
    bare.write_text(
        f"[Service]\nType=notify\nExecStart={INSTALLED_COMMAND}\nUser=sovbackupd\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    assert exposure(bare) > EXPOSURE_LIMIT


def test_docs_quote_the_measured_exposure() -> None:
    """docs/systemd.md states the exposure level that systemd-analyze measures today."""
    measured = f"{exposure(UNIT):.1f}"
    assert f"exposure level {measured}" in " ".join(DOCS.read_text().split())


def test_unit_is_a_notify_service_with_a_watchdog_and_hup_reload(unit: list[Directive]) -> None:
    """Type=notify from the daemon only, a watchdog, reload by SIGHUP (no ReloadSignal=, 253)."""
    assert single(unit, "Service", "Type") == "notify"
    assert single(unit, "Service", "NotifyAccess") == "main"
    # The daemon withholds its ping once its heartbeat is 3 beats late; a shorter watchdog
    # would kill it for a hiccup rather than a hang.
    assert seconds(single(unit, "Service", "WatchdogSec")) > 3 * daemon.HEARTBEAT_SECONDS
    assert single(unit, "Service", "ExecReload").split() == ["/bin/kill", "-HUP", "$MAINPID"]
    assert not values(unit, "Service", "ReloadSignal")


def test_unit_runs_the_installed_daemon_with_the_default_policy(unit: list[Directive]) -> None:
    """ExecStart runs `sovbackupd --config <default policy> run` where the docs install it."""
    assert single(unit, "Service", "ExecStart") == INSTALLED_COMMAND


def test_unit_does_not_restart_loop_on_a_bad_policy(unit: list[Directive]) -> None:
    """Crashes restart; the config-error exit code (78) does not."""
    assert single(unit, "Service", "Restart") == "on-failure"
    prevented = " ".join(values(unit, "Service", "RestartPreventExitStatus")).split()
    assert str(int(ExitCode.CONFIG)) in prevented


def test_unit_waits_longer_than_the_daemon_lets_a_backup_finish(unit: list[Directive]) -> None:
    """TimeoutStopSec outlasts the default shutdown grace plus an aborted backup's cleanup."""
    daemon_stop = EXAMPLE.daemon.shutdown_grace_seconds + daemon.ABORT_WAIT_SECONDS
    assert seconds(single(unit, "Service", "TimeoutStopSec")) > daemon_stop
    assert single(unit, "Service", "KillMode") == "mixed"


def test_unit_runs_as_a_static_user_with_only_the_read_capability(unit: list[Directive]) -> None:
    """A named non-root user and group, and CAP_DAC_READ_SEARCH as the one capability."""
    user = single(unit, "Service", "User")
    assert user not in {"root", "0", ""}
    assert single(unit, "Service", "Group") not in {"root", "0", ""}
    assert values(unit, "Service", "DynamicUser") in ([], ["no"])
    assert single(unit, "Service", "AmbientCapabilities") == "CAP_DAC_READ_SEARCH"
    assert single(unit, "Service", "CapabilityBoundingSet") == "CAP_DAC_READ_SEARCH"
    assert single(unit, "Service", "NoNewPrivileges") == "yes"


def test_unit_can_write_only_to_the_example_backup_dir(unit: list[Directive]) -> None:
    """ProtectSystem=strict, and ReadWritePaths names the example policy's backup_dir."""
    assert single(unit, "Service", "ProtectSystem") == "strict"
    writable = " ".join(values(unit, "Service", "ReadWritePaths")).split()
    assert writable == [str(EXAMPLE.backup_dir)]


def test_every_unit_directive_has_a_comment_above_it(unit: list[Directive]) -> None:
    """Each Key=value line of the unit is preceded by a comment saying why."""
    bare = [f"line {item.line_number}: {item.key}" for item in unit if not item.commented_above]
    assert bare == []


def test_unit_starts_with_the_system(unit: list[Directive]) -> None:
    """Enabling the unit starts it with multi-user.target."""
    assert single(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_bounds_the_memory_and_tasks_of_the_service(unit: list[Directive]) -> None:
    """MemoryMax= and TasksMax= are finite: a runaway hook or leak stops inside the service."""
    memory = single(unit, "Service", "MemoryMax")
    assert re.fullmatch(r"\d+[KMG]", memory), memory
    tasks = int(single(unit, "Service", "TasksMax"))
    assert 0 < tasks < 4096


def test_unit_lets_the_daemon_drop_a_hooks_inheritable_capabilities(unit: list[Directive]) -> None:
    """capset, removed with @privileged, is allowed again after it (hooks are exec'd without it)."""
    filters = values(unit, "Service", "SystemCallFilter")
    removed = next(index for index, entry in enumerate(filters) if "~@privileged" in entry.split())
    assert "capset" in " ".join(filters[removed + 1 :]).split()
