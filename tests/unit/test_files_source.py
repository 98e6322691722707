"""Config files and data directories: walk order, symlinks, excludes, special files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sovbackupd import archive
from sovbackupd.config.models import SourcePath
from sovbackupd.errors import SourceError
from sovbackupd.manifest import Manifest
from sovbackupd.sources.base import Component, Member, SourceReport
from sovbackupd.sources.files import FilesSource
from tests.conftest import Sandbox


def source_of(
    component: Component, paths: Iterable[Path | SourcePath], exclude: Iterable[str] = ()
) -> FilesSource:
    entries = [path if isinstance(path, SourcePath) else SourcePath(path=path) for path in paths]
    return FilesSource(component, entries, list(exclude))


def capture(source: FilesSource, staging: Path) -> tuple[list[Member], SourceReport]:
    report = SourceReport(source.component, source.name)
    return list(source.members(staging, report)), report


def arcnames(members: Iterable[Member]) -> list[str]:
    return [member.arcname for member in members]


def read_member(member: Member) -> bytes:
    assert member.opener is not None
    with member.opener() as handle:
        return handle.read()


TREE: dict[str, str | None] = {
    "b.txt": "b",
    "a": None,
    "a/z.txt": "z",
    "a/y": None,
    "a/y/deep.txt": "deep",
    "c": None,
    "c/x.txt": "x",
    "A.txt": "A",
}


def make_tree(root: Path, order: Iterable[str]) -> None:
    """Create TREE under *root* (None marks a directory), creating entries in *order*."""
    root.mkdir(parents=True)
    for name in order:
        content = TREE[name]
        if content is None:
            (root / name).mkdir()
        else:
            (root / name).write_text(content)


def test_directories_are_walked_in_a_stable_order(tmp_path: Path) -> None:
    """The same tree gives the same member order whatever order it was created in."""
    forward = ["b.txt", "a", "a/z.txt", "a/y", "a/y/deep.txt", "c", "c/x.txt", "A.txt"]
    backward = ["c", "A.txt", "a", "a/y", "c/x.txt", "a/y/deep.txt", "b.txt", "a/z.txt"]
    make_tree(tmp_path / "one" / "data", forward)
    make_tree(tmp_path / "two" / "data", backward)
    first, _ = capture(source_of("data", [tmp_path / "one" / "data"]), tmp_path)
    second, _ = capture(source_of("data", [tmp_path / "two" / "data"]), tmp_path)
    assert arcnames(first) == arcnames(second)
    names = arcnames(first)
    assert sorted(names) == sorted(["data", *(f"data/{name}" for name in forward)])
    assert names[0] == "data"
    for position, name in enumerate(names):
        parent = name.rpartition("/")[0]
        if parent:
            assert names.index(parent) < position, f"{name} came before its directory"
    top_level = [name for name in names if name.count("/") == 1]
    assert top_level == ["data/A.txt", "data/a", "data/b.txt", "data/c"]


def test_data_members_carry_kind_mode_and_origin(sandbox: Sandbox, tmp_path: Path) -> None:
    """Each member says what it is, where it came from and its permission bits."""
    data = sandbox.app / "data"
    (data / "notes.txt").chmod(0o640)
    members, report = capture(source_of("data", [data]), tmp_path)
    by_name = {member.arcname: member for member in members}
    notes = by_name["data/notes.txt"]
    assert notes.kind == "file"
    assert notes.origin == str(data / "notes.txt")
    assert notes.mode == 0o640
    assert notes.mtime == 1_600_000_000.5
    assert read_member(notes) == (data / "notes.txt").read_bytes()
    assert by_name["data"].kind == "dir"
    assert by_name["data/nested/deeper"].kind == "dir"
    assert by_name["data/nested/deeper"].opener is None
    assert report.warnings == []


def test_symlinks_in_data_dirs_stay_symlinks(sandbox: Sandbox, tmp_path: Path) -> None:
    """A symlink inside a data dir is archived as a link, with its target, not followed."""
    data = sandbox.app / "data"
    (data / "outside").symlink_to("/etc/passwd")
    (data / "dangling").symlink_to("nowhere")
    (data / "dirlink").symlink_to("nested")
    members, _ = capture(source_of("data", [data]), tmp_path)
    by_name = {member.arcname: member for member in members}
    assert by_name["data/link-to-notes"].kind == "symlink"
    assert by_name["data/link-to-notes"].linkname == "notes.txt"
    assert by_name["data/link-to-notes"].opener is None
    assert by_name["data/outside"].linkname == "/etc/passwd"
    assert by_name["data/dangling"].linkname == "nowhere"
    assert by_name["data/dirlink"].kind == "symlink"
    assert not any(name.startswith("data/dirlink/") for name in by_name)


def test_excludes_match_names_and_relative_paths(sandbox: Sandbox, tmp_path: Path) -> None:
    """A pattern matching an entry's name or its path below the data dir leaves it out."""
    data = sandbox.app / "data"
    (data / "nested" / "keep.tmp.txt").write_text("kept")
    (data / "nested" / "cache").mkdir()
    (data / "nested" / "cache" / "big.bin").write_bytes(b"0" * 100)
    source = source_of("data", [data], ["*.tmp", "nested/cache"])
    members, _ = capture(source, tmp_path)
    names = arcnames(members)
    assert "data/scratch.tmp" not in names
    assert "data/nested/cache" not in names
    assert "data/nested/cache/big.bin" not in names
    assert "data/nested/keep.tmp.txt" in names
    assert "data/nested/deeper/blob.bin" in names


def test_excluding_a_directory_leaves_out_everything_below_it(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """An excluded directory is not descended into."""
    members, _ = capture(source_of("data", [sandbox.app / "data"], ["deeper"]), tmp_path)
    assert not any("deeper" in name for name in arcnames(members))
    assert "data/nested" in arcnames(members)


def test_fifo_in_a_data_dir_is_skipped_with_a_warning(sandbox: Sandbox, tmp_path: Path) -> None:
    """A FIFO is never opened (that would block); it is skipped and reported."""
    data = sandbox.app / "data"
    fifo = data / "pipe"
    os.mkfifo(fifo)
    members, report = capture(source_of("data", [data]), tmp_path)
    assert "data/pipe" not in arcnames(members)
    assert report.warnings == [f"{fifo}: special file (FIFO, socket or device) skipped"]
    assert report.details["skipped_special"] == [str(fifo)]


def test_config_files_go_under_config_by_basename(sandbox: Sandbox, tmp_path: Path) -> None:
    """Config files are archived as config/<basename>, preceded by the config/ directory."""
    members, report = capture(source_of("config", sandbox.config_files), tmp_path)
    assert arcnames(members) == ["config", "config/.env", "config/redis.conf"]
    env = members[1]
    assert env.origin == str(sandbox.app / ".env")
    assert env.mode == 0o600
    assert read_member(env) == (sandbox.app / ".env").read_bytes()
    assert report.details["missing_optional"] == []


def test_symlinked_config_file_is_archived_by_content(sandbox: Sandbox, tmp_path: Path) -> None:
    """A config path that is a symlink is followed: its target's bytes are archived."""
    real = sandbox.root / "etc" / "real.env"
    real.parent.mkdir()
    real.write_text("TOKEN=from-the-target\n")
    link = sandbox.app / "linked.env"
    link.symlink_to(real)
    members, _ = capture(source_of("config", [link]), tmp_path)
    member = members[1]
    assert member.arcname == "config/linked.env"
    assert member.kind == "file"
    assert member.origin == str(link)
    assert read_member(member) == b"TOKEN=from-the-target\n"


def test_symlinked_config_file_goes_into_the_archive(sandbox: Sandbox, tmp_path: Path) -> None:
    """The archive writer can read a symlinked config file's content."""
    real = sandbox.root / "real.conf"
    real.write_text("port 6379\n")
    link = sandbox.app / "linked.conf"
    link.symlink_to(real)
    report = SourceReport("config", "config")
    path = tmp_path / "out.tar"
    with archive.Writer(path, "none", "top") as writer:
        for member in source_of("config", [link]).members(tmp_path, report):
            writer.add(member, report)
        entries = {entry.path: entry for entry in writer.entries}
    assert entries["config/linked.conf"].size == len("port 6379\n")


def test_missing_required_path_fails_with_source_error(tmp_path: Path) -> None:
    """A configured path that does not exist fails preflight and capture, naming it."""
    missing = tmp_path / "gone"
    for component in ("config", "data"):
        source = source_of(component, [missing])
        with pytest.raises(SourceError, match=f"{missing} does not exist"):
            source.preflight()
        with pytest.raises(SourceError, match="optional: true"):
            capture(source, tmp_path)


def test_missing_optional_path_is_recorded_not_fatal(sandbox: Sandbox, tmp_path: Path) -> None:
    """An optional path that is missing is noted in the report and skipped."""
    missing = sandbox.app / "extra.conf"
    source = source_of("config", [sandbox.app / ".env", SourcePath(path=missing, optional=True)])
    assert source.preflight().archived_bytes > 0
    members, report = capture(source, tmp_path)
    assert arcnames(members) == ["config", "config/.env"]
    assert report.details["missing_optional"] == [str(missing)]
    assert report.warnings == [f"{missing}: optional and missing, not archived"]


def test_file_given_as_a_data_dir_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    """sources.dirs takes directories: a file there is a SourceError."""
    source = source_of("data", [sandbox.app / ".env"])
    with pytest.raises(SourceError, match="is not a directory"):
        source.preflight()
    with pytest.raises(SourceError, match="is not a directory"):
        capture(source, tmp_path)


def test_directory_given_as_a_config_file_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    """sources.config takes files: a directory there is a SourceError."""
    source = source_of("config", [sandbox.app / "data"])
    with pytest.raises(SourceError, match="is a directory"):
        source.preflight()
    with pytest.raises(SourceError, match="is a directory"):
        capture(source, tmp_path)


def test_fifo_given_as_a_config_file_is_refused(tmp_path: Path) -> None:
    """A config path that is not a regular file is refused before it is opened."""
    fifo = tmp_path / "pipe.conf"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file"):
        source_of("config", [fifo]).preflight()


def head_manifest() -> Manifest:
    moment = datetime(2026, 1, 2, tzinfo=UTC)
    return Manifest(
        id="top",
        created=moment,
        finished=moment,
        tiers=["manual"],
        host="test-host",
        tool_version="0.0.0",
        compression="none",
        sources=[],
        file_count=0,
        file_bytes=0,
    )


def regular_file_bytes(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            status = (Path(directory) / name).lstat()
            if stat.S_ISREG(status.st_mode):
                total += status.st_size
    return total


def test_preflight_estimate_covers_every_regular_file(sandbox: Sandbox) -> None:
    """The estimate is at least the bytes of the files that will be archived."""
    dirs = source_of("data", sandbox.data_dirs)
    assert dirs.preflight().archived_bytes >= sum(
        regular_file_bytes(path) for path in sandbox.data_dirs
    )
    configs = source_of("config", sandbox.config_files)
    assert configs.preflight().archived_bytes >= sum(
        path.stat().st_size for path in sandbox.config_files
    )
    assert dirs.preflight().staged_bytes == 0


def test_preflight_estimate_bounds_the_archive(sandbox: Sandbox, tmp_path: Path) -> None:
    """An uncompressed archive of the sources is no larger than their estimate."""
    sources = [
        source_of("config", sandbox.config_files),
        source_of("data", sandbox.data_dirs, ["*.tmp"]),
    ]
    path = tmp_path / "estimate.tar"
    with archive.Writer(path, "none", "top") as writer:
        for source in sources:
            report = SourceReport(source.component, source.name)
            for member in source.members(tmp_path, report):
                writer.add(member, report)
        writer.commit(head_manifest())
    estimate = sum(source.preflight().archived_bytes for source in sources)
    manifest_size = archive.manifest_path(path).stat().st_size
    assert path.stat().st_size <= estimate + manifest_size + 2 * archive.RECORD


def test_preflight_applies_excludes(sandbox: Sandbox) -> None:
    """Excluded files do not count towards the estimate."""
    data = sandbox.app / "data"
    (data / "huge.tmp").write_bytes(b"\0" * 5_000_000)
    with_huge = source_of("data", [data]).preflight().archived_bytes
    without = source_of("data", [data], ["*.tmp"]).preflight().archived_bytes
    assert with_huge - without >= 5_000_000
