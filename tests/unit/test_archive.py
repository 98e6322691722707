"""Streaming archives: written atomically with checksums, and verified member by member."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovbackupd import archive
from sovbackupd.errors import ArchiveError, DiskSpaceError
from sovbackupd.manifest import INFO_NAME, MANIFEST_NAME, FileEntry, Manifest
from sovbackupd.sources.base import Member, MemberKind, SourceReport
from sovbackupd.sources.files import open_nofollow
from tests.conftest import require_tool

TOP = "sovereigncore_backup_20260102_140000"
SUFFIXES: dict[archive.Compression, str] = {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}
TAR_LIST_FLAGS: dict[archive.Compression, list[str]] = {
    "gzip": ["-tzf"],
    "zstd": ["--zstd", "-tf"],
    "none": ["-tf"],
}


def make_manifest(
    compression: archive.Compression, entries: list[FileEntry] | None = None
) -> Manifest:
    """Return a manifest for TOP; without *entries* it is the head that commit() completes."""
    moment = datetime(2026, 1, 2, 14, 0, tzinfo=UTC)
    files = entries or []
    return Manifest(
        id=TOP,
        created=moment,
        finished=moment,
        tiers=["manual"],
        host="test-host",
        tool_version="0.0.0",
        compression=compression,
        sources=[],
        file_count=sum(entry.type == "file" for entry in files),
        file_bytes=sum(entry.size for entry in files),
        files=files,
    )


def file_member(arcname: str, path: Path) -> Member:
    """Describe the file, directory or symlink at *path* as archive member *arcname*."""
    status = path.lstat()
    if stat.S_ISLNK(status.st_mode):
        return Member.from_stat(arcname, path, status, linkname=str(path.readlink()))
    opener = partial(open_nofollow, str(path)) if stat.S_ISREG(status.st_mode) else None
    return Member.from_stat(arcname, path, status, opener)


def write_archive(
    directory: Path,
    members: list[Member],
    compression: archive.Compression = "gzip",
    report: SourceReport | None = None,
) -> Path:
    """Write *members* the way a backup does (plus backup_info.txt) and commit."""
    path = directory / f"{TOP}{SUFFIXES[compression]}"
    report = report or SourceReport("data", "dirs")
    with archive.Writer(path, compression, TOP) as writer:
        for member in members:
            writer.add(member, report)
        writer.add_bytes(INFO_NAME, b"human readable\n", 1_700_000_000)
        writer.commit(make_manifest(compression))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small data directory: files with set modes and mtimes, a subdir, a symlink."""
    root = tmp_path / "source" / "data"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("hello\n" * 1000)
    (root / "notes.txt").chmod(0o640)
    os.utime(root / "notes.txt", (1_600_000_000.5, 1_600_000_000.5))
    (root / "sub" / "blob.bin").write_bytes(os.urandom(3 * archive.CHUNK_BYTES + 17))
    (root / "sub" / "blob.bin").chmod(0o600)
    (root / "sub").chmod(0o750)
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("notes.txt")
    return root


def tree_members(root: Path) -> list[Member]:
    return [
        file_member("data", root),
        file_member("data/empty", root / "empty"),
        file_member("data/link", root / "link"),
        file_member("data/notes.txt", root / "notes.txt"),
        file_member("data/sub", root / "sub"),
        file_member("data/sub/blob.bin", root / "sub" / "blob.bin"),
    ]


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    path = tmp_path / "backups"
    path.mkdir(mode=0o700)
    return path


def test_writer_round_trip_preserves_content_mode_mtime_and_symlinks(
    tree: Path, backup_dir: Path
) -> None:
    """Tarfile reads back the bytes, modes, link targets and sub-second (pax) mtimes."""
    path = write_archive(backup_dir, tree_members(tree))
    with tarfile.open(path, "r:gz") as tar:
        members = {info.name: info for info in tar.getmembers()}
        assert list(members) == [
            TOP,
            f"{TOP}/data",
            f"{TOP}/data/empty",
            f"{TOP}/data/link",
            f"{TOP}/data/notes.txt",
            f"{TOP}/data/sub",
            f"{TOP}/data/sub/blob.bin",
            f"{TOP}/{INFO_NAME}",
            f"{TOP}/{MANIFEST_NAME}",
        ]
        notes = members[f"{TOP}/data/notes.txt"]
        assert notes.isfile()
        assert stat.S_IMODE(notes.mode) == 0o640
        assert notes.mtime == 1_600_000_000.5
        extracted = tar.extractfile(notes)
        assert extracted is not None
        assert extracted.read() == (tree / "notes.txt").read_bytes()
        blob = tar.extractfile(members[f"{TOP}/data/sub/blob.bin"])
        assert blob is not None
        assert blob.read() == (tree / "sub" / "blob.bin").read_bytes()
        assert stat.S_IMODE(members[f"{TOP}/data/sub/blob.bin"].mode) == 0o600
        sub = members[f"{TOP}/data/sub"]
        assert sub.isdir()
        assert stat.S_IMODE(sub.mode) == 0o750
        link = members[f"{TOP}/data/link"]
        assert link.issym()
        assert link.linkname == "notes.txt"
        assert members[f"{TOP}/data/empty"].size == 0


def test_writer_records_every_member_in_its_entries(tree: Path, backup_dir: Path) -> None:
    """The writer's entries carry each member's size, mode, origin and sha256."""
    report = SourceReport("data", "dirs")
    path = backup_dir / f"{TOP}.tar.gz"
    with archive.Writer(path, "gzip", TOP) as writer:
        for member in tree_members(tree):
            writer.add(member, report)
        entries = {entry.path: entry for entry in writer.entries}
        assert writer.file_count == 3
        assert writer.file_bytes == sum(
            (tree / name).stat().st_size for name in ("empty", "notes.txt", "sub/blob.bin")
        )
    notes = entries["data/notes.txt"]
    assert notes.type == "file"
    assert notes.size == (tree / "notes.txt").stat().st_size
    assert notes.mode == 0o640
    assert notes.mtime == 1_600_000_000.5
    assert notes.origin == str(tree / "notes.txt")
    assert notes.sha256 == hashlib.sha256((tree / "notes.txt").read_bytes()).hexdigest()
    assert entries["data/link"].type == "symlink"
    assert entries["data/link"].link == "notes.txt"
    assert entries["data/link"].sha256 is None
    assert entries["data/sub"].type == "dir"
    assert report.warnings == []


def test_sidecar_passes_sha256sum_check_in_the_backup_dir(tree: Path, backup_dir: Path) -> None:
    """The .sha256 sidecar is in `sha256sum -c` format, relative to the backup dir."""
    path = write_archive(backup_dir, tree_members(tree))
    sha256sum = require_tool("sha256sum")
    result = subprocess.run(
        [sha256sum, "-c", f"{path.name}.sha256"],
        cwd=backup_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{path.name}: OK"


def test_commit_returns_the_sha256_of_the_stored_file(tree: Path, backup_dir: Path) -> None:
    """commit() returns the digest of the bytes on disk, also written to the sidecar."""
    path = backup_dir / f"{TOP}.tar.gz"
    with archive.Writer(path, "gzip", TOP) as writer:
        writer.add(file_member("data", tree), SourceReport("data", "dirs"))
        digest = writer.commit(make_manifest("gzip"))
    assert digest == archive.file_sha256(path)
    assert archive.read_sidecar(path) == digest


def test_archive_and_sidecars_are_private(tree: Path, backup_dir: Path) -> None:
    """The archive, its checksum and its manifest copy are 0600; no temp file remains."""
    path = write_archive(backup_dir, tree_members(tree))
    names = {entry.name for entry in backup_dir.iterdir()}
    assert names == {path.name, f"{path.name}.sha256", f"{TOP}.manifest.json"}
    for name in names:
        assert stat.S_IMODE((backup_dir / name).stat().st_mode) == 0o600, name


def test_manifest_copy_beside_the_archive_matches_the_one_inside(
    tree: Path, backup_dir: Path
) -> None:
    """The manifest kept beside the archive equals the one verify_members reads inside."""
    path = write_archive(backup_dir, tree_members(tree))
    beside = Manifest.model_validate_json(archive.manifest_path(path).read_bytes())
    assert archive.verify_members(path, TOP) == beside
    notes = next(entry for entry in beside.files if entry.path == "data/notes.txt")
    assert notes.mtime == 1_600_000_000.5
    assert {entry.path for entry in beside.files} == {
        "data",
        "data/empty",
        "data/link",
        "data/notes.txt",
        "data/sub",
        "data/sub/blob.bin",
    }


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_every_compression_round_trips_and_tar_lists_it(
    compression: archive.Compression, tree: Path, backup_dir: Path
) -> None:
    """gzip, zstd and uncompressed archives verify, and GNU tar lists their members."""
    path = write_archive(backup_dir, tree_members(tree), compression)
    assert path.name.endswith(SUFFIXES[compression])
    assert archive.compression_of(path) == compression
    archive.verify_checksum(path)
    manifest = archive.verify_members(path, TOP)
    assert manifest.compression == compression
    tar = require_tool("tar")
    listed = subprocess.run(
        [tar, *TAR_LIST_FLAGS[compression], str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert f"{TOP}/data/sub/blob.bin" in listed
    assert f"{TOP}/{MANIFEST_NAME}" in listed
    assert len(listed) == 9


def test_gnu_tar_extracts_what_was_written(tree: Path, backup_dir: Path, tmp_path: Path) -> None:
    """`tar -xzf` restores the bytes, the symlink and the sub-second mtime."""
    path = write_archive(backup_dir, tree_members(tree))
    target = tmp_path / "extracted"
    target.mkdir()
    subprocess.run([require_tool("tar"), "-xzf", str(path), "-C", str(target)], check=True)
    restored = target / TOP / "data"
    assert (restored / "sub" / "blob.bin").read_bytes() == (tree / "sub" / "blob.bin").read_bytes()
    assert (restored / "link").readlink() == Path("notes.txt")
    assert (restored / "notes.txt").stat().st_mtime == 1_600_000_000.5


def test_leaving_the_writer_without_commit_removes_the_partial(
    tree: Path, backup_dir: Path
) -> None:
    """An error inside the writer leaves no archive, no .partial and no sidecar."""
    path = backup_dir / f"{TOP}.tar.gz"
    with (
        pytest.raises(RuntimeError, match="source failed"),
        archive.Writer(path, "gzip", TOP) as writer,
    ):
        writer.add(file_member("data", tree), SourceReport("data", "dirs"))
        assert writer.partial.exists()
        assert writer.partial.name == f"{TOP}.tar.gz.partial"
        raise RuntimeError("source failed")
    assert list(backup_dir.iterdir()) == []


def test_writer_without_commit_and_without_error_removes_the_partial(backup_dir: Path) -> None:
    """Leaving the writer normally without commit is an abandoned archive, removed too."""
    path = backup_dir / f"{TOP}.tar.zst"
    with archive.Writer(path, "zstd", TOP):
        pass
    assert list(backup_dir.iterdir()) == []


def test_writer_refuses_to_overwrite_a_partial(backup_dir: Path) -> None:
    """A .partial that exists (another writer) is never truncated."""
    path = backup_dir / f"{TOP}.tar.gz"
    partial_path = backup_dir / f"{TOP}.tar.gz.partial"
    partial_path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError), archive.Writer(path, "gzip", TOP):
        pass
    assert partial_path.read_bytes() == b"someone else's"


class ShrinkingFile(io.FileIO):
    """A file that loses its second half once reading starts, as a truncating writer does."""

    def read(self, size: int | None = -1, /) -> bytes:
        if not getattr(self, "_truncated", False):
            self._truncated = True
            os.truncate(self.name, os.fstat(self.fileno()).st_size // 2)
        data = super().read(size)
        assert data is not None
        return data


class GrowingFile(io.FileIO):
    """A file appended to after reading starts, as a live log is."""

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        assert data is not None
        if not getattr(self, "_grown", False):
            self._grown = True
            with open(self.name, "ab") as appender:  # noqa: PTH123 (self.name is a str path)
                appender.write(b"appended while read\n")
        return data


def opener_of(kind: type[io.FileIO], path: Path) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return kind(path, "rb")

    return opener


def test_file_that_shrinks_while_read_is_padded_and_reported(
    tmp_path: Path, backup_dir: Path
) -> None:
    """A file truncated mid-read keeps its header's size (zero padded) and warns."""
    source = tmp_path / "shrinking.log"
    content = os.urandom(2 * archive.CHUNK_BYTES + 100)
    source.write_bytes(content)
    member = Member.from_stat(
        "shrinking.log", source, source.stat(), opener_of(ShrinkingFile, source)
    )
    report = SourceReport("data", "dirs")
    path = write_archive(backup_dir, [member], report=report)
    assert report.warnings == [f"{source}: shrank while read, padded with zeros"]
    expected = content[: len(content) // 2] + b"\0" * (len(content) - len(content) // 2)
    with tarfile.open(path, "r:gz") as tar:
        extracted = tar.extractfile(f"{TOP}/shrinking.log")
        assert extracted is not None
        assert extracted.read() == expected
    manifest = archive.verify_members(path, TOP)
    assert manifest.files[0].size == len(content)
    assert manifest.files[0].sha256 == hashlib.sha256(expected).hexdigest()


def test_file_that_changes_while_read_is_reported(tmp_path: Path, backup_dir: Path) -> None:
    """A file that grows while read is archived at its opening size, with a warning."""
    source = tmp_path / "live.log"
    content = b"line\n" * 1000
    source.write_bytes(content)
    member = Member.from_stat("live.log", source, source.stat(), opener_of(GrowingFile, source))
    report = SourceReport("data", "dirs")
    path = write_archive(backup_dir, [member], report=report)
    assert report.warnings == [f"{source}: changed while read"]
    with tarfile.open(path, "r:gz") as tar:
        extracted = tar.extractfile(f"{TOP}/live.log")
        assert extracted is not None
        assert extracted.read() == content
    archive.verify_members(path, TOP)


def test_file_that_vanished_before_reading_is_skipped_with_a_warning(
    tree: Path, backup_dir: Path
) -> None:
    """An opener raising FileNotFoundError skips the member and notes it in the report."""

    def vanished() -> BinaryIO:
        raise FileNotFoundError(2, "No such file or directory")

    gone = Member("data/gone.txt", "file", "/srv/data/gone.txt", 0o644, 0.0, opener=vanished)
    report = SourceReport("data", "dirs")
    path = write_archive(backup_dir, [file_member("data", tree), gone], report=report)
    assert report.warnings == ["/srv/data/gone.txt: vanished before it could be read"]
    manifest = archive.verify_members(path, TOP)
    assert [entry.path for entry in manifest.files] == ["data"]


def test_unreadable_member_fails_the_archive(backup_dir: Path) -> None:
    """An opener failing with another OSError is an ArchiveError naming the file."""

    def denied() -> BinaryIO:
        raise PermissionError(13, "Permission denied")

    member = Member("data/secret", "file", "/srv/data/secret", 0o600, 0.0, opener=denied)
    with (
        pytest.raises(ArchiveError, match="cannot read /srv/data/secret: Permission denied"),
        archive.Writer(backup_dir / f"{TOP}.tar.gz", "gzip", TOP) as writer,
    ):
        writer.add(member, SourceReport("data", "dirs"))
    assert list(backup_dir.iterdir()) == []


def test_verify_checksum_catches_a_flipped_byte(tree: Path, backup_dir: Path) -> None:
    """One changed byte anywhere in the stored file fails the sidecar check."""
    path = write_archive(backup_dir, tree_members(tree))
    archive.verify_checksum(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        archive.verify_checksum(path)


def test_verify_checksum_needs_a_well_formed_sidecar(tree: Path, backup_dir: Path) -> None:
    """A missing sidecar, or one naming another file, fails verification."""
    path = write_archive(backup_dir, tree_members(tree))
    sidecar = archive.sidecar_path(path)
    digest = sidecar.read_text().split()[0]
    sidecar.write_text(f"{digest}  other.tar.gz\n")
    with pytest.raises(ArchiveError, match="malformed"):
        archive.verify_checksum(path)
    sidecar.unlink()
    with pytest.raises(ArchiveError, match="missing"):
        archive.verify_checksum(path)


def test_verify_members_catches_a_flipped_byte_inside(tree: Path, backup_dir: Path) -> None:
    """Deep verification of a damaged uncompressed archive names the changed member."""
    members = [file_member("data", tree), file_member("data/notes.txt", tree / "notes.txt")]
    path = write_archive(backup_dir, members, "none")
    data = bytearray(path.read_bytes())
    position = data.index(b"hello\nhello\n")
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=re.escape("data/notes.txt differs from the manifest")):
        archive.verify_members(path, TOP)


def test_verify_members_reports_a_truncated_archive(tree: Path, backup_dir: Path) -> None:
    """An archive cut short is unreadable, not silently accepted."""
    path = write_archive(backup_dir, tree_members(tree))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="unreadable archive"):
        archive.verify_members(path, TOP)


def craft_archive(
    path: Path,
    contents: dict[str, bytes],
    listed: dict[str, bytes],
    raw_names: tuple[str, ...] = (),
) -> Path:
    """Write a gzip tar whose members are *contents* and whose manifest lists *listed*.

    Names in *raw_names* become members as they are, not below the top directory.
    """
    entries = [
        FileEntry(
            path=name,
            type="file",
            origin=f"/srv/{name}",
            size=len(data),
            mode=0o644,
            mtime=0.0,
            uid=0,
            gid=0,
            sha256=hashlib.sha256(data).hexdigest(),
        )
        for name, data in listed.items()
    ]
    manifest = make_manifest("gzip", entries).model_dump_json().encode()
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        top_info = tarfile.TarInfo(TOP)
        top_info.type = tarfile.DIRTYPE
        top_info.mode = 0o700
        tar.addfile(top_info)
        members = [(f"{TOP}/{name}", data) for name, data in contents.items()]
        members += [(name, b"x") for name in raw_names]
        members.append((f"{TOP}/{MANIFEST_NAME}", manifest))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def test_verify_members_accepts_a_faithful_hand_made_archive(backup_dir: Path) -> None:
    """The crafted archives below are valid when the manifest tells the truth."""
    path = craft_archive(backup_dir / "crafted.tar.gz", {"a.txt": b"a"}, {"a.txt": b"a"})
    manifest = archive.verify_members(path, TOP)
    assert [entry.path for entry in manifest.files] == ["a.txt"]


def test_verify_members_catches_a_member_that_differs_from_the_manifest(
    backup_dir: Path,
) -> None:
    """A member whose bytes do not hash to the manifest's sha256 fails verification."""
    path = craft_archive(
        backup_dir / "crafted.tar.gz",
        {"a.txt": b"tampered", "b.txt": b"b"},
        {"a.txt": b"original", "b.txt": b"b"},
    )
    with pytest.raises(ArchiveError, match=re.escape("a.txt differs from the manifest")):
        archive.verify_members(path, TOP)


def test_verify_members_catches_an_extra_member(backup_dir: Path) -> None:
    """A member that the manifest does not list fails verification."""
    path = craft_archive(
        backup_dir / "crafted.tar.gz",
        {"a.txt": b"a", "planted.sh": b"rm -rf /"},
        {"a.txt": b"a"},
    )
    with pytest.raises(ArchiveError, match=re.escape("planted.sh is not in the manifest")):
        archive.verify_members(path, TOP)


def test_verify_members_catches_a_missing_member(backup_dir: Path) -> None:
    """A manifest entry with no member in the archive fails verification."""
    path = craft_archive(
        backup_dir / "crafted.tar.gz", {"a.txt": b"a"}, {"a.txt": b"a", "lost.db": b"db"}
    )
    with pytest.raises(ArchiveError, match=re.escape("lost.db is missing from the archive")):
        archive.verify_members(path, TOP)


@pytest.mark.parametrize("outside", ["/etc/passwd", "other_top/a.txt", f"{TOP}x/a.txt"])
def test_verify_members_catches_a_member_outside_the_top_dir(
    backup_dir: Path, outside: str
) -> None:
    """A member that would extract outside <name>/ fails verification."""
    path = craft_archive(
        backup_dir / "crafted.tar.gz", {"a.txt": b"a"}, {"a.txt": b"a"}, (outside,)
    )
    with pytest.raises(ArchiveError, match="is outside"):
        archive.verify_members(path, TOP)


def test_verify_members_catches_a_listed_member_climbing_out_of_the_top_dir(
    backup_dir: Path,
) -> None:
    """A `..` path is outside the top dir even when a forged manifest lists it."""
    path = craft_archive(
        backup_dir / "crafted.tar.gz", {"../escape.txt": b"e"}, {"../escape.txt": b"e"}
    )
    with pytest.raises(ArchiveError, match="is outside"):
        archive.verify_members(path, TOP)


def test_verify_members_needs_a_manifest_inside(backup_dir: Path) -> None:
    """An archive without manifest.json cannot be verified."""
    path = backup_dir / "bare.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"{TOP}/a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
    with pytest.raises(ArchiveError, match=re.escape("no manifest.json inside")):
        archive.verify_members(path, TOP)


def test_compression_of_refuses_unknown_suffixes(tmp_path: Path) -> None:
    """Only .tar, .tar.gz and .tar.zst are archives sovbackupd reads."""
    with pytest.raises(ArchiveError, match=re.escape("not a .tar")):
        archive.compression_of(tmp_path / "backup.zip")


def test_manifest_path_drops_every_archive_suffix(tmp_path: Path) -> None:
    """The manifest copy is <name>.manifest.json for every archive suffix."""
    for suffix in (".tar.gz", ".tar.zst", ".tar", ".tar.gz.gpg", ".tar.zst.gpg", ".tar.gpg"):
        assert archive.manifest_path(tmp_path / f"{TOP}{suffix}") == (
            tmp_path / f"{TOP}.manifest.json"
        )


def test_verify_members_reports_a_manifest_that_is_not_a_manifest(backup_dir: Path) -> None:
    """A manifest.json that does not parse is an ArchiveError, not a crash."""
    path = backup_dir / "garbled.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"{TOP}/{MANIFEST_NAME}")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"not json!"))
    with pytest.raises(ArchiveError, match=re.escape("manifest.json")):
        archive.verify_members(path, TOP)


NANOSECONDS = 10**9
printable = st.characters(blacklist_categories=("Cs", "Cc"))
names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
    min_size=1,
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(names, min_size=1, max_size=6),
    mtime_ns=st.integers(-(10**18), 10**19),
    size=st.integers(0, 2**40),
    uid=st.integers(0, 2**32),
    gid=st.integers(0, 2**32),
    link=st.one_of(st.just(""), names, st.text(printable, min_size=101, max_size=200)),
)
def test_tar_header_keeps_every_field_exactly(
    *, parts: list[str], mtime_ns: int, size: int, uid: int, gid: int, link: str
) -> None:
    """Invariant: tarfile reads back the name, link, size, ids and nanosecond mtime of a header."""
    name = f"{TOP}/" + "/".join(parts)
    kind: MemberKind = "symlink" if link else "file"
    member = Member(
        name, kind, None, 0o640, mtime_ns / NANOSECONDS, uid, gid, link, mtime_ns=mtime_ns
    )
    header = archive._tar_header(name, 0 if link else size, member)
    stream = io.BytesIO(header + b"\0" * (2 * tarfile.BLOCKSIZE))
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        info = tar.next()
        assert info is not None
        assert info.name == name
        assert info.linkname == link
        assert info.size == (0 if link else size)
        assert (info.uid, info.gid) == (uid, gid)
        recorded = info.pax_headers.get("mtime")
        if mtime_ns % NANOSECONDS or not 0 <= mtime_ns < 8**11 * NANOSECONDS:
            assert recorded is not None
            assert Decimal(recorded) * NANOSECONDS == mtime_ns
        else:
            assert recorded is None
            assert info.mtime * NANOSECONDS == mtime_ns


def test_gnu_tar_restores_the_mtime_to_the_nanosecond(tmp_path: Path, backup_dir: Path) -> None:
    """The pax mtime carries the stat's nanoseconds, and GNU tar sets them back."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "precise").write_text("x")
    exact = 1_600_000_000_123_456_789
    os.utime(source / "precise", ns=(exact, exact))
    path = write_archive(backup_dir, [file_member("precise", source / "precise")])
    target = tmp_path / "extracted"
    target.mkdir()
    subprocess.run([require_tool("tar"), "-xzf", str(path), "-C", str(target)], check=True)
    assert (target / TOP / "precise").stat().st_mtime_ns == exact


def make_sparse(path: Path, apparent: int, runs: list[tuple[int, bytes]]) -> None:
    """Create *path* of *apparent* size with data only at the offsets of *runs*."""
    with path.open("wb") as handle:
        handle.truncate(apparent)
        for offset, data in runs:
            handle.seek(offset)
            handle.write(data)


def sparse_runs() -> list[tuple[int, bytes]]:
    return [
        (0, os.urandom(4096)),
        (40 << 20, b"middle" * 1000),
        ((64 << 20) + 123, os.urandom(5000)),
    ]


def test_sparse_file_is_archived_with_its_holes(tmp_path: Path, backup_dir: Path) -> None:
    """A 128 MiB file with 15 KiB of data is stored as data plus a map, read back in full."""
    source = tmp_path / "sparse.img"
    make_sparse(source, 128 << 20, sparse_runs())
    assert source.stat().st_blocks * 512 < 1 << 20, "the filesystem must support holes"
    report = SourceReport("data", "dirs")
    path = write_archive(backup_dir, [file_member("sparse.img", source)], "none", report)
    assert report.warnings == []
    assert path.stat().st_size < 1 << 20
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{TOP}/sparse.img")
        assert info.sparse is not None
        assert info.size == 128 << 20
        extracted = tar.extractfile(info)
        assert extracted is not None
        assert archive.stream_sha256(extracted) == archive.file_sha256(source)
    manifest = archive.verify_members(path, TOP)
    assert [(entry.path, entry.size) for entry in manifest.files] == [("sparse.img", 128 << 20)]


def test_gnu_tar_extracts_a_sparse_member_sparse_with_the_same_bytes(
    tmp_path: Path, backup_dir: Path
) -> None:
    """`tar -xzf` gives back the same bytes under the real name, still sparse on disk."""
    source = tmp_path / "sparse.img"
    make_sparse(source, 128 << 20, sparse_runs())
    path = write_archive(backup_dir, [file_member("sparse.img", source)])
    target = tmp_path / "extracted"
    target.mkdir()
    subprocess.run([require_tool("tar"), "-xzf", str(path), "-C", str(target)], check=True)
    restored = target / TOP / "sparse.img"
    assert sorted(entry.name for entry in (target / TOP).iterdir()) == [
        INFO_NAME,
        MANIFEST_NAME,
        "sparse.img",
    ]
    assert restored.stat().st_size == 128 << 20
    assert restored.stat().st_blocks * 512 < 1 << 20
    assert archive.file_sha256(restored) == archive.file_sha256(source)


def test_sparse_file_ending_in_data_or_all_hole_round_trips(
    tmp_path: Path, backup_dir: Path
) -> None:
    """Edge maps: a file that is only a hole, and one whose data runs to its end."""
    empty = tmp_path / "hole.img"
    make_sparse(empty, 8 << 20, [])
    tail = tmp_path / "tail.img"
    make_sparse(tail, 8 << 20, [((8 << 20) - 4096, os.urandom(4096))])
    members = [file_member("hole.img", empty), file_member("tail.img", tail)]
    path = write_archive(backup_dir, members, "none")
    with tarfile.open(path) as tar:
        for source in (empty, tail):
            info = tar.getmember(f"{TOP}/{source.name}")
            assert info.sparse is not None
            extracted = tar.extractfile(info)
            assert extracted is not None
            assert archive.stream_sha256(extracted) == archive.file_sha256(source)


PAGE = 4096
layouts = st.lists(
    st.tuples(st.integers(0, 2047), st.integers(1, 64)), max_size=12
)  # (page, pages) runs of data in an 8 MiB file


@settings(max_examples=25, deadline=None)
@given(runs=layouts, tail_pages=st.integers(0, 3))
def test_any_sparse_layout_reads_back_the_same_bytes(
    runs: list[tuple[int, int]], tail_pages: int
) -> None:
    """Invariant: any layout of holes reads back with its bytes and size, stored compactly."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        source = directory / "layout.img"
        ends = [(page + pages) * PAGE for page, pages in runs]
        apparent = max([2048 * PAGE, *ends]) + tail_pages * 123
        make_sparse(
            source, apparent, [(page * PAGE, b"\x5a" * (pages * PAGE)) for page, pages in runs]
        )
        backups = directory / "backups"
        backups.mkdir()
        path = write_archive(backups, [file_member("layout.img", source)], "none")
        allocated = source.stat().st_blocks * 512
        with tarfile.open(path) as tar:
            info = tar.getmember(f"{TOP}/layout.img")
            extracted = tar.extractfile(info)
            assert extracted is not None
            assert info.size == apparent
            assert archive.stream_sha256(extracted) == archive.file_sha256(source)
        (entry,) = archive.verify_members(path, TOP).files
        assert entry.size == apparent
        assert path.stat().st_size <= allocated + 64 * PAGE


def test_file_bytes_count_a_sparse_files_data_not_its_holes(
    tmp_path: Path, backup_dir: Path
) -> None:
    """The manifest's file_bytes, which the next space estimate divides by, leave holes out."""
    source = tmp_path / "sparse.img"
    make_sparse(source, 128 << 20, [(0, b"x" * 4096), (64 << 20, b"y" * 8192)])
    report = SourceReport("data", "dirs")
    with archive.Writer(backup_dir / f"{TOP}.tar", "none", TOP) as writer:
        writer.add(file_member("sparse.img", source), report)
        assert writer.file_bytes == 4096 + 8192
        assert [entry.size for entry in writer.entries] == [128 << 20]


def test_sparse_file_with_too_many_runs_is_archived_dense_with_one_warning(
    tmp_path: Path, backup_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_SPARSE_REGIONS data runs the map is not worth it: dense, same bytes, one warning."""
    monkeypatch.setattr(archive, "MAX_SPARSE_REGIONS", 2)
    source = tmp_path / "fragmented.img"
    make_sparse(source, 16 << 20, [(offset << 20, b"z" * 4096) for offset in (0, 5, 10)])
    report = SourceReport("data", "dirs")
    path = write_archive(backup_dir, [file_member("fragmented.img", source)], "none", report)
    assert report.warnings == [
        f"{source}: sparse, but archived as dense (16.0 MiB): it has more than 2 data runs"
    ]
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{TOP}/fragmented.img")
        assert info.sparse is None
        extracted = tar.extractfile(info)
        assert extracted is not None
        assert archive.stream_sha256(extracted) == archive.file_sha256(source)


class _FullDiskFile(io.BytesIO):
    """A temp file on a disk that is full: every write and the flush at close fail ENOSPC.

    Stands in for the disk because where a real tmpfs runs out (in a write, or only in
    the buffered flush at close) depends on buffer sizes, and the test needs the second.
    """

    def write(self, data: object) -> int:
        del data
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        super().close()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_manifest_is_a_disk_space_error_even_when_closing_fails_too(
    tree: Path, backup_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC again as the manifest's temp file is closed does not hide the DiskSpaceError."""
    path = backup_dir / f"{TOP}.tar.gz"
    with (
        pytest.raises(DiskSpaceError, match="no space left on"),
        archive.Writer(path, "gzip", TOP) as writer,
    ):
        writer.add(file_member("data", tree), SourceReport("data", "dirs"))
        # Only the manifest's temp file, made at commit, is on the full disk.
        monkeypatch.setattr(tempfile, "TemporaryFile", lambda **_: _FullDiskFile())
        writer.commit(make_manifest("gzip"))
    assert list(backup_dir.iterdir()) == []
