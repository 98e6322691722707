"""Policies whose backups could not come back are refused before the first backup (issue 13).

Real directories, symlinks and modes on disk, and the CLI run as an operator would.
"""

from __future__ import annotations

import os
import posixpath
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sovbackupd import config
from sovbackupd.config import files
from sovbackupd.config.models import RESERVED_ARCHIVE_NAMES, Policy
from sovbackupd.errors import ConfigError, ExitCode
from tests.conftest import (
    Sandbox,
    backup_files,
    make_database,
    policy_data,
    require_tool,
    run_cli,
    write_policy,
)
from tests.integration.test_daemon import (
    DaemonProcess,
    NotifySocket,
    daemon_policy,
    daily_far_away,
    notify_socket,
    start_daemon,
)

__all__ = ["notify_socket", "start_daemon"]  # the daemon tests' fixtures, used here too


def check_config(policy: Path, env: dict[str, str] | None = None) -> list[str]:
    """Run check-config on *policy*; return its error lines, asserting it exited 78."""
    result = run_cli("check-config", config=policy, env=env)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr_lines


def test_backup_dir_in_a_symlinked_data_dir_is_refused_at_check_config_and_start(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A data dir linked to /srv/x with backup_dir /srv/x/backups: the same trap, resolved."""
    real = tmp_path / "srv" / "x"
    real.mkdir(parents=True)
    (sandbox.app / "linked").symlink_to(real)
    dirs = [str(sandbox.app / "linked")]
    data = policy_data(sandbox, None, backup_dir=str(real / "backups"))
    policy = write_policy(tmp_path / "policy.yaml", {**data, "sources": {"dirs": dirs}})
    expected = (
        f"{policy}:1: backup_dir: backup_dir {real}/backups is inside sources.dirs[0] "
        f"{sandbox.app}/linked (resolved: {real}): every backup would archive the earlier "
        "ones, and restoring it would delete the newer ones"
    )
    assert expected in check_config(policy)[-1]
    started = run_cli("run", config=policy, timeout=60)
    assert started.returncode == ExitCode.CONFIG
    assert expected in started.stderr_lines[-1]
    assert not (real / "backups").exists()


def test_data_dir_that_is_a_symlink_into_another_is_refused(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A link to data/nested is data/nested: archived twice, and no full restore fits both."""
    (sandbox.app / "alias").symlink_to(sandbox.app / "data" / "nested")
    dirs = [str(sandbox.app / "data"), str(sandbox.app / "alias")]
    data = policy_data(sandbox, None)
    policy = write_policy(tmp_path / "policy.yaml", {**data, "sources": {"dirs": dirs}})
    (line,) = check_config(policy)
    assert line.endswith(
        f"sources.dirs[1]: sources.dirs[1] {sandbox.app}/alias (resolved: "
        f"{sandbox.app}/data/nested) is inside sources.dirs[0] {sandbox.app}/data: it would "
        "be archived twice and no full restore could put it back"
    )


def test_sqlite_and_config_files_inside_a_data_dir_are_refused(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Each would be archived twice, and every backup discarded at its read-back."""
    (sandbox.app / "data" / "app.env").write_text("A=1\n")
    data = policy_data(sandbox, None)
    data["sources"]["dirs"] = [str(sandbox.app / "mcp_data"), str(sandbox.app / "data")]
    data["sources"]["config"] = [str(sandbox.app / "data" / "app.env")]
    inner_db = sandbox.app / "data" / "inner.db"
    make_database(inner_db)
    data["sources"]["sqlite"] = [str(inner_db)]
    policy = write_policy(tmp_path / "policy.yaml", data)
    lines = check_config(policy)
    for key, path in (("sqlite", inner_db), ("config", sandbox.app / "data" / "app.env")):
        expected = (
            f"sources.{key}[0] {path} is inside sources.dirs[1] {sandbox.app}/data: it would "
            "be archived twice and no full restore could put it back"
        )
        assert any(expected in line for line in lines), lines
    result = run_cli("backup", config=policy)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert not sandbox.backup_dir.exists()


def test_backup_dir_that_is_a_symlink_to_var_tmp_is_refused(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Where backup_dir really lies counts: a link to /var/tmp is /var/tmp."""
    link = tmp_path / "backups-link"
    link.symlink_to("/var/tmp")
    policy = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, backup_dir=str(link))
    )
    first, mode = check_config(policy)  # and /var/tmp is 1777
    assert f"backup_dir: must not be {link} (resolved: /var/tmp): it is world-writable" in first
    assert "is world-writable (mode 1777)" in mode


@pytest.mark.parametrize(
    ("policy_dir", "env"),
    [("/", {}), ("/srv/backups", {"BACKUP_DIR": "/tmp"})],
)
def test_check_config_refuses_root_and_tmp_as_backup_dir(
    tmp_path: Path, sandbox: Sandbox, policy_dir: str, env: dict[str, str]
) -> None:
    """backup_dir: / and BACKUP_DIR=/tmp fail check-config with exit 78 and one line."""
    policy = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, backup_dir=policy_dir)
    )
    (line,) = check_config(policy, env)
    assert "must not be /" in line


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o775, 0o770], ids=lambda mode: f"{mode:04o}")
def test_backup_dir_others_can_write_is_refused_and_never_chmoded(
    tmp_path: Path, sandbox: Sandbox, mode: int
) -> None:
    """A shared backup_dir fails check-config and backup with exit 78; its mode stays."""
    sandbox.backup_dir.mkdir()
    sandbox.backup_dir.chmod(mode)
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    others = "world" if mode & 0o002 else "group"
    expected = f"backup_dir {sandbox.backup_dir} is {others}-writable (mode {mode:04o})"
    assert expected in check_config(policy)[-1]
    for command in (("backup",), ("prune",)):
        result = run_cli(*command, config=policy)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert expected in result.stderr_lines[-1]
        assert "Traceback" not in result.stderr
    assert stat.S_IMODE(sandbox.backup_dir.stat().st_mode) == mode
    assert backup_files(sandbox.backup_dir) == set()


def test_backup_dir_of_another_non_root_user_is_refused_unless_root_runs(
    tmp_path: Path,
) -> None:
    """Its owner could replace the backups; root may use the service user's directory."""
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    os.chown(directory, 4242, 4242)
    problem = files.unsafe_backup_dir(directory, euid=1000)
    assert problem == (
        f"backup_dir {directory} belongs to uid 4242, not to uid 1000 that runs sovbackupd: "
        "its owner could delete or replace its backups"
    )
    assert files.unsafe_backup_dir(directory, euid=4242) is None
    assert files.unsafe_backup_dir(directory, euid=0) is None
    os.chown(directory, 0, 0)
    assert files.unsafe_backup_dir(directory, euid=1000) is None


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "missing"])
def test_backup_dir_in_a_directory_others_can_write_is_refused(
    tmp_path: Path, sandbox: Sandbox, exists: bool
) -> None:
    """Anyone could rename it away and plant their own backups: refused, never created."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    backup_dir = shared / "backups"
    if exists:
        backup_dir.mkdir(mode=0o700)
    data = policy_data(sandbox, None, backup_dir=str(backup_dir))
    policy = write_policy(tmp_path / "policy.yaml", data)
    expected = (
        f"backup_dir {backup_dir} lies in {shared}, which others can write (mode 0777): they "
        f"could rename {backup_dir} away and plant their own backups"
    )
    assert expected in check_config(policy)[-1]
    result = run_cli("backup", config=policy)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr_lines[-1]
    assert backup_dir.exists() == exists
    assert not exists or backup_files(backup_dir) == set()


def test_backup_dir_another_user_made_in_a_sticky_shared_directory_is_refused_for_root(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """/tmp/x made by another user before the first backup: theirs to empty or forge."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    planted = sticky / "backups"
    planted.mkdir(mode=0o700)
    os.chown(planted, 4242, 4242)
    data = policy_data(sandbox, None, backup_dir=str(planted))
    policy = write_policy(tmp_path / "policy.yaml", data)
    expected = (
        f"backup_dir {planted}: {planted} belongs to uid 4242 in {sticky}, which anyone can "
        "write (mode 1777): its owner could delete or replace the backups"
    )
    assert files.unsafe_backup_dir(planted, euid=0) is not None
    assert expected in check_config(policy)[-1]
    result = run_cli("backup", config=policy)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert expected in result.stderr_lines[-1]
    assert list(planted.iterdir()) == []
    os.chown(planted, 0, 0)  # root's own directory there: the sticky bit keeps it root's
    assert files.unsafe_backup_dir(planted, euid=0) is None


def test_a_reload_refuses_a_backup_dir_made_shared_or_linked_into_a_data_dir(
    tmp_path: Path,
    sandbox: Sandbox,
    notify_socket: NotifySocket,
    start_daemon: Callable[[Path], DaemonProcess],
) -> None:
    """SIGHUP checks the layout on disk again: the old policy stays, nothing is chmod'ed."""
    policy, _ = daemon_policy(tmp_path, sandbox, None, {"daily": daily_far_away()})
    daemon = start_daemon(policy)
    daemon.wait_for_backups(1)
    sandbox.backup_dir.chmod(0o1777)
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    failed = daemon.wait_for("config.reload_failed", mark)
    assert f"backup_dir {sandbox.backup_dir} is world-writable (mode 1777)" in failed["problems"][0]
    assert stat.S_IMODE(sandbox.backup_dir.stat().st_mode) == 0o1777

    sandbox.backup_dir.chmod(0o700)
    linked = sandbox.app / "archive"
    linked.symlink_to(sandbox.backup_dir)
    data = yaml.safe_load(policy.read_text())
    data["sources"]["dirs"].append(str(linked))
    policy.write_text(yaml.safe_dump(data))
    line = policy.read_text().splitlines().index(f"backup_dir: {sandbox.backup_dir}") + 1
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    failed = daemon.wait_for("config.reload_failed", mark)
    assert failed["problems"] == [
        f"{policy}:{line}: backup_dir: backup_dir {sandbox.backup_dir} is the same path as "
        f"sources.dirs[3] {linked} (resolved: {sandbox.backup_dir}): every backup would "
        "archive the earlier ones, and restoring it would delete the newer ones"
    ]
    assert daemon.process.poll() is None


@pytest.mark.parametrize("how", ["data_dir_linked", "linked_into_backup_dir"])
def test_a_data_dir_turned_into_a_link_to_backup_dir_fails_the_next_backup(
    tmp_path: Path, sandbox: Sandbox, how: str
) -> None:
    """Every backup checks the layout on disk again: no archive holds the earlier ones."""
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    assert run_cli("backup", config=policy).returncode == ExitCode.OK
    before = backup_files(sandbox.backup_dir)
    memory = sandbox.app / "memory"
    for child in memory.iterdir():
        child.unlink()
    memory.rmdir()
    if how == "data_dir_linked":
        memory.symlink_to(sandbox.backup_dir)
        resolved = sandbox.backup_dir
        relation = "is the same path as"
    else:  # a link to a directory inside backup_dir: its backups would archive themselves
        (sandbox.backup_dir / "memory").mkdir()
        memory.symlink_to(sandbox.backup_dir / "memory")
        resolved = sandbox.backup_dir / "memory"
        relation = "is inside"
    result = run_cli("backup", config=policy)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    index = [str(path) for path in sandbox.data_dirs].index(str(memory))
    if how == "data_dir_linked":
        expected = (
            f"backup_dir: backup_dir {sandbox.backup_dir} {relation} sources.dirs[{index}] "
            f"{memory} (resolved: {resolved})"
        )
    else:
        expected = (
            f"sources.dirs[{index}]: sources.dirs[{index}] {memory} (resolved: {resolved}) "
            f"{relation} backup_dir {sandbox.backup_dir}"
        )
    assert expected in result.stderr_lines[0], result.stderr
    after = backup_files(sandbox.backup_dir) - {"memory"}
    assert after == before


@pytest.fixture
def bind_mount() -> Iterator[Callable[[Path, Path], None]]:
    """Bind-mount a directory onto another (needs root); unmount them all afterwards."""
    mount_binary = require_tool("mount")
    umount_binary = require_tool("umount")
    mounted: list[Path] = []

    def mount(source: Path, target: Path) -> None:
        completed = subprocess.run(
            [mount_binary, "--bind", str(source), str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            pytest.fail(f"cannot bind-mount {source} on {target} (CI runs as root): {completed}")
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run([umount_binary, str(target)], check=True)


def test_backup_dir_bind_mounted_inside_a_data_dir_fails_the_backup(
    tmp_path: Path, sandbox: Sandbox, bind_mount: Callable[[Path, Path], None]
) -> None:
    """No path check sees a bind mount; the walk knows backup_dir by its inode and stops."""
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    assert run_cli("backup", config=policy).returncode == ExitCode.OK
    before = backup_files(sandbox.backup_dir)
    mount_point = sandbox.app / "data" / "nested" / "archive"
    mount_point.mkdir()
    bind_mount(sandbox.backup_dir, mount_point)
    assert run_cli("check-config", config=policy).returncode == ExitCode.OK  # blind to it
    result = run_cli("backup", config=policy)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr_lines == [
        f"sovbackupd: config error: {mount_point} is backup_dir {sandbox.backup_dir} (a bind "
        "mount or a link): every backup would archive the earlier ones, and restoring it "
        "would delete the newer ones; exclude it or move backup_dir"
    ]
    assert backup_files(sandbox.backup_dir) == before


def test_config_files_named_like_top_level_entries_back_up_and_restore(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """config/config and config/manifest.json meet nothing at the top of the archive."""
    etc = sandbox.app / "etc"
    etc.mkdir()
    named = {etc / "config": "SELINUX=enforcing\n", sandbox.app / "manifest.json": '{"a": 1}\n'}
    for path, text in named.items():
        path.write_text(text)
    data = policy_data(sandbox, None)
    data["sources"]["config"] += [str(path) for path in named]
    policy = write_policy(tmp_path / "policy.yaml", data)
    backup = run_cli("backup", config=policy)
    assert backup.returncode == 0, backup.stderr
    target = tmp_path / "restored"

    restored = run_cli("restore", backup.stdout.strip(), "--to", str(target), config=policy)

    assert restored.returncode == 0, restored.stderr
    for path, text in named.items():
        assert (target / str(path).lstrip("/")).read_text() == text


# The property: accepted exactly when an independent oracle finds no overlap or collision.

SEGMENTS = ("a", "b", "c", "d", "la", "lb", "lc", "data", "config")
FILE_NAMES = (".env", "redis.conf", "app.db", "data", "config")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a directory holding a/b, c, and links la -> a, lb -> /.../a/b, lc -> c/d."""
    root = tmp_path_factory.mktemp("layout")
    for name in ("a", "a/b", "c"):
        (root / name).mkdir(mode=0o700)
        (root / name).chmod(0o700)
    (root / "la").symlink_to("a")
    (root / "lb").symlink_to(root / "a" / "b")
    (root / "lc").symlink_to("c/d")  # dangling: a source may be optional and absent
    return root


def relative_dirs(min_size: int = 1) -> st.SearchStrategy[list[str]]:
    """Return relative directory paths of up to three segments, as lists of segments.

    The first segment is most often a real directory or a link, so that paths meet.
    """
    tail = st.lists(st.sampled_from(SEGMENTS), max_size=2)
    first = st.lists(st.sampled_from(("a", "c", "la", "lb", "lc")), min_size=min_size, max_size=1)
    return st.builds(lambda head, rest: head + rest if head else [], first, tail)


def written(root: Path, segments: list[str], slash: bool) -> str:
    """Return the path as a policy might write it, perhaps with a trailing slash."""
    return str(root.joinpath(*segments)) + ("/" if slash else "")


layouts = st.fixed_dictionaries(
    {
        "backup_dir": st.tuples(relative_dirs(), st.booleans()),
        "dirs": st.lists(st.tuples(relative_dirs(), st.booleans()), min_size=1, max_size=4),
        "config": st.lists(st.tuples(relative_dirs(0), st.sampled_from(FILE_NAMES)), max_size=3),
        "sqlite": st.lists(st.tuples(relative_dirs(0), st.sampled_from(FILE_NAMES)), max_size=2),
    }
)


def contains(outer: str, inner: str) -> bool:
    """Whether *inner* is *outer* or below it, by os.path.commonpath."""
    return posixpath.commonpath([outer, inner]) == outer


def oracle(backup_dir: str, dirs: list[str], files_: list[str]) -> bool:
    """Return whether the layout overlaps, by the issue's rules, in one view of the paths."""
    if any(contains(directory, backup_dir) for directory in dirs):
        return True
    if any(contains(backup_dir, source) for source in [*dirs, *files_]):
        return True
    if any(contains(directory, source) for directory in dirs for source in files_):
        return True
    return any(
        contains(first, second) or contains(second, first)
        for index, first in enumerate(dirs)
        for second in dirs[index + 1 :]
    )


def collides(dirs: list[str], sqlite: list[str], config_files: list[str]) -> bool:
    """Whether two sources would take one archive name, or one a reserved name."""
    tops = [posixpath.basename(posixpath.normpath(path)) for path in [*dirs, *sqlite]]
    configs = [posixpath.basename(path) for path in config_files]
    return (
        len(set(tops)) < len(tops)
        or bool(set(tops) & RESERVED_ARCHIVE_NAMES)
        or len(set(configs)) < len(configs)
    )


def archive_names(policy: Policy) -> list[str]:
    """Return the archive path each source of *policy* takes."""
    sources = policy.sources
    return [
        *(entry.path.name for entry in [*sources.dirs, *sources.sqlite]),
        *(f"config/{entry.path.name}" for entry in sources.config),
    ]


@settings(max_examples=500, deadline=None)
@given(layout=layouts)
def test_a_layout_is_accepted_iff_nothing_overlaps_or_collides(
    tree: Path, layout: dict[str, Any]
) -> None:
    """Invariant: a policy passes check-config exactly when no two of its paths overlap.

    Overlap (backup_dir in a data dir, any source in backup_dir, a data dir in another) is
    judged by an oracle on os.path.commonpath, both as written and with symlinks resolved,
    and so are archive-name collisions; an accepted policy's sources have unique names.
    """
    backup_dir = written(tree, *layout["backup_dir"])
    dirs = [written(tree, segments, slash) for segments, slash in layout["dirs"]]
    config_files = [str(tree.joinpath(*parent, name)) for parent, name in layout["config"]]
    sqlite = [str(tree.joinpath(*parent, name)) for parent, name in layout["sqlite"]]
    data = {
        "backup_dir": backup_dir,
        "sources": {
            key: [{"path": path, "optional": True} for path in paths]
            for key, paths in (("dirs", dirs), ("config", config_files), ("sqlite", sqlite))
        },
    }
    overlapping = [
        oracle(view(backup_dir), [view(p) for p in dirs], [view(p) for p in config_files + sqlite])
        for view in (posixpath.normpath, posixpath.realpath)
    ]
    refused = collides(dirs, sqlite, config_files) or any(overlapping)
    event("refused" if refused else "accepted")
    if overlapping == [False, True]:
        event("overlap seen only through symlinks")
    try:
        policy = config.parse(yaml.safe_dump(data), "policy.yaml", {}, check_files=True)
    except ConfigError as error:
        assert refused, error.problems
        assert error.exit_code == ExitCode.CONFIG
        assert all("\n" not in problem for problem in error.problems)
        return
    assert not refused, data
    names = archive_names(policy)
    assert len(set(names)) == len(names)
