"""Every target keeps the Target contract of sovbackupd/targets/base.py, on a real remote."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sovbackupd import targets
from sovbackupd.errors import ArchiveError, NotFoundError, TargetError, TransientTargetError
from sovbackupd.redis_server import free_port
from sovbackupd.targets import RemoteObject, Target
from sovbackupd.targets.local import LocalTarget
from tests.remotes import (
    GcsEmulator,
    MotoServer,
    SshServer,
    gcs_bucket,
    gcs_target,
    rsync_target,
    s3_bucket,
    s3_target,
)

KINDS = ("local", "rsync", "s3", "gcs")
BIG_BYTES = 12 * 1024 * 1024 + 12345  # several S3 parts, several GCS resumable chunks
PREFIX = "sovereigncore_backup"


@dataclass
class RemoteUnderTest:
    """A target on a live remote, and the same kind of target on one that is not there."""

    target: Target
    unreachable: Target


def _build(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> RemoteUnderTest:
    closed_port = free_port()
    match kind:
        case "local":
            (tmp_path / "remote").mkdir()
            return RemoteUnderTest(
                LocalTarget("local", tmp_path / "remote"),
                LocalTarget("local", tmp_path / "unmounted"),
            )
        case "rsync":
            server: SshServer = request.getfixturevalue("sshd")
            directory = tmp_path / "remote" / "backups"
            return RemoteUnderTest(
                rsync_target(server, directory),
                rsync_target(server, directory, port=closed_port, timeout_seconds=5),
            )
        case "s3":
            request.getfixturevalue("aws_environment")
            moto: MotoServer = request.getfixturevalue("moto_server")
            bucket = s3_bucket(moto.endpoint_url)
            return RemoteUnderTest(
                s3_target(moto.endpoint_url, bucket),
                s3_target(f"http://127.0.0.1:{closed_port}", bucket),
            )
        case "gcs":
            emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
            bucket = gcs_bucket(emulator.endpoint)
            return RemoteUnderTest(
                gcs_target(emulator.endpoint, bucket),
                gcs_target(f"http://127.0.0.1:{closed_port}", bucket),
            )
    raise AssertionError(kind)


@pytest.fixture(params=KINDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> RemoteUnderTest:
    """Each kind of target, on its own directory or bucket of a live server."""
    return _build(request.param, request, tmp_path)


@pytest.fixture
def target(remote: RemoteUnderTest) -> Target:
    return remote.target


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_then_list_stat_and_download_are_byte_identical(
    target: Target, tmp_path: Path
) -> None:
    """What goes up is listed with its size, and comes back byte for byte."""
    big = random_file(tmp_path / "big.bin", BIG_BYTES)
    small = random_file(tmp_path / "small.bin", 100)
    receipt = target.upload(big, "big.tar.gz")
    assert receipt == RemoteObject("big.tar.gz", BIG_BYTES, sha256_of(big))
    assert target.upload(small, "small.sha256").sha256 == sha256_of(small)
    assert target.list() == [
        RemoteObject("big.tar.gz", BIG_BYTES),
        RemoteObject("small.sha256", 100),
    ]
    stat = target.stat("big.tar.gz")
    assert stat is not None
    assert stat.size == BIG_BYTES
    assert stat.sha256 in (None, sha256_of(big))
    downloaded = tmp_path / "restored" / "big.tar.gz"
    downloaded.parent.mkdir()
    assert target.download("big.tar.gz", downloaded).sha256 == sha256_of(big)
    assert downloaded.read_bytes() == big.read_bytes()
    assert downloaded.stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in downloaded.parent.iterdir()) == ["big.tar.gz"]


def test_upload_checks_the_recorded_sha256_and_leaves_nothing_on_a_mismatch(
    target: Target, tmp_path: Path
) -> None:
    """A file that does not match its recorded digest fails for good and never appears."""
    source = random_file(tmp_path / "archive.bin", 3 * 1024 * 1024)
    wrong = hashlib.sha256(b"what the sidecar said").hexdigest()
    with pytest.raises(TargetError) as caught:
        target.upload(source, "archive.tar.gz", sha256=wrong)
    assert not isinstance(caught.value, TransientTargetError)
    assert "sha256" in str(caught.value)
    assert target.stat("archive.tar.gz") is None
    assert target.list() == []
    assert target.upload(source, "archive.tar.gz", sha256=sha256_of(source)).size == 3 * 1024 * 1024


def test_final_name_only_ever_shows_the_complete_object(target: Target, tmp_path: Path) -> None:
    """While an upload runs, the final name is either absent or the whole file."""
    source = random_file(tmp_path / "big.bin", BIG_BYTES)
    seen: list[int | None] = []
    listed: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            stored = target.stat("big.tar.gz")
            seen.append(None if stored is None else stored.size)
            listed.update(stored.name for stored in target.list())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        target.upload(source, "big.tar.gz")
    finally:
        done.set()
        watcher.join()
    assert seen, "the watcher looked at least once"
    assert set(seen) <= {None, BIG_BYTES}
    assert listed <= {"big.tar.gz"}, "temp names are never listed"
    stored = target.stat("big.tar.gz")
    assert stored is not None
    assert stored.size == BIG_BYTES


def test_uploading_again_replaces_the_object_safely(target: Target, tmp_path: Path) -> None:
    """The same upload twice leaves one object; new bytes under the name replace the old."""
    first = random_file(tmp_path / "first.bin", 2 * 1024 * 1024)
    target.upload(first, "backup.tar.gz")
    target.upload(first, "backup.tar.gz")
    assert target.list() == [RemoteObject("backup.tar.gz", first.stat().st_size)]
    second = random_file(tmp_path / "second.bin", 1000)
    target.upload(second, "backup.tar.gz")
    assert target.list() == [RemoteObject("backup.tar.gz", 1000)]
    target.download("backup.tar.gz", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == second.read_bytes()


def test_delete_removes_the_object_and_a_missing_name_is_fine(
    target: Target, tmp_path: Path
) -> None:
    """Deleting removes the object; deleting it again succeeds."""
    source = random_file(tmp_path / "file.bin", 10)
    target.upload(source, "one.tar.gz")
    target.upload(source, "two.tar.gz")
    target.delete("one.tar.gz")
    assert target.stat("one.tar.gz") is None
    assert [stored.name for stored in target.list()] == ["two.tar.gz"]
    target.delete("one.tar.gz")
    target.delete("never-uploaded.tar.gz")


def test_download_of_a_missing_name_is_not_found(target: Target, tmp_path: Path) -> None:
    """A missing object is NotFoundError, and no temp file is left behind."""
    with pytest.raises(NotFoundError):
        target.download("missing.tar.gz", tmp_path / "missing.tar.gz")
    assert list(tmp_path.glob("missing.tar.gz*")) == []


@pytest.mark.parametrize("remote_name", ["../escape", ".hidden", "a/b", "x.tar.gz.partial", ""])
def test_names_that_are_not_plain_file_names_are_refused(
    target: Target, tmp_path: Path, remote_name: str
) -> None:
    """Every operation refuses a name that could leave the directory or hide as a temp file."""
    source = random_file(tmp_path / "file.bin", 10)
    with pytest.raises(TargetError, match="not a valid object name"):
        target.upload(source, remote_name)
    with pytest.raises(TargetError, match="not a valid object name"):
        target.delete(remote_name)


def test_unreachable_remote_is_a_transient_error_naming_it(
    remote: RemoteUnderTest, tmp_path: Path
) -> None:
    """Every operation on a remote that is not there raises TransientTargetError."""
    source = random_file(tmp_path / "file.bin", 10)
    operations: list[Callable[[], object]] = [
        lambda: remote.unreachable.upload(source, "file.tar.gz"),
        lambda: remote.unreachable.download("file.tar.gz", tmp_path / "back"),
        remote.unreachable.list,
        lambda: remote.unreachable.stat("file.tar.gz"),
        lambda: remote.unreachable.delete("file.tar.gz"),
    ]
    for operation in operations:
        with pytest.raises(TransientTargetError) as caught:
            operation()
        assert str(caught.value).startswith(f"remote {remote.unreachable.name}: ")


def make_backup(directory: Path, stamp: str) -> Path:
    """Write a backup's three files as the archive writer leaves them."""
    directory.mkdir(exist_ok=True)
    name = f"{PREFIX}_{stamp}"
    archive = random_file(directory / f"{name}.tar.gz", 300_000)
    (directory / f"{name}.tar.gz.sha256").write_text(f"{sha256_of(archive)}  {archive.name}\n")
    (directory / f"{name}.manifest.json").write_text('{"format": 1}\n')
    return archive


class Recording:
    """A target that notes the order of uploads and deletions before passing them on."""

    def __init__(self, inner: Target) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def upload(
        self, local_path: Path, remote_name: str, *, sha256: str | None = None
    ) -> RemoteObject:
        self.calls.append(("upload", remote_name))
        return self.inner.upload(local_path, remote_name, sha256=sha256)

    def download(self, remote_name: str, local_path: Path) -> RemoteObject:
        return self.inner.download(remote_name, local_path)

    def list(self) -> list[RemoteObject]:
        return self.inner.list()

    def stat(self, remote_name: str) -> RemoteObject | None:
        return self.inner.stat(remote_name)

    def delete(self, remote_name: str) -> None:
        self.calls.append(("delete", remote_name))
        self.inner.delete(remote_name)


def test_a_backup_goes_up_sidecar_last_and_comes_down_sidecar_first(
    target: Target, tmp_path: Path
) -> None:
    """upload_backup sends archive, manifest, sidecar; delete_backup starts at the sidecar."""
    archive = make_backup(tmp_path / "local", "20260102_140000")
    name = archive.name.removesuffix(".tar.gz")
    recording = Recording(target)
    targets.upload_backup(recording, archive)
    assert recording.calls == [
        ("delete", f"{name}.tar.gz.sha256"),
        ("upload", f"{name}.tar.gz"),
        ("upload", f"{name}.manifest.json"),
        ("upload", f"{name}.tar.gz.sha256"),
    ]
    [backup] = targets.list_backups(target.list(), PREFIX)
    assert backup.name == name
    assert backup.complete
    assert backup.archive.size == archive.stat().st_size
    recording.calls.clear()
    targets.delete_backup(recording, archive.name)
    assert recording.calls[0] == ("delete", f"{name}.tar.gz.sha256")
    assert target.list() == []


def test_a_backup_without_its_sidecar_on_the_remote_is_incomplete(
    target: Target, tmp_path: Path
) -> None:
    """An archive and manifest whose sidecar never arrived do not count as a remote backup."""
    complete = make_backup(tmp_path / "local", "20260102_140000")
    partial = make_backup(tmp_path / "local", "20260103_140000")
    targets.upload_backup(target, complete)
    for path in targets.backup_files(partial)[:2]:
        target.upload(path, path.name)
    backups = targets.list_backups(target.list(), PREFIX)
    assert [(backup.name, backup.complete) for backup in backups] == [
        (complete.name.removesuffix(".tar.gz"), True),
        (partial.name.removesuffix(".tar.gz"), False),
    ]


def test_an_archive_whose_sidecar_disagrees_is_not_uploaded(target: Target, tmp_path: Path) -> None:
    """upload_backup refuses an archive that changed since its sidecar was written."""
    archive = make_backup(tmp_path / "local", "20260102_140000")
    with archive.open("r+b") as handle:
        handle.write(b"rot")
    with pytest.raises(TargetError, match="does not match its recorded sha256"):
        targets.upload_backup(target, archive)
    assert target.list() == []


HEAD_FIELDS = {
    "format_version": 1,
    "created": "2026-01-02T14:00:00Z",
    "finished": "2026-01-02T14:00:05Z",
    "tiers": ["daily"],
    "host": "server-1",
    "tool_version": "0.1.0",
    "compression": "gzip",
    "sources": [],
    "file_count": 0,
    "file_bytes": 0,
    "files": [],
}


def make_encrypted_backup(directory: Path, stamp: str, *, head: bool) -> Path:
    """Write an encrypted backup's files: with *head*, a head and the encrypted manifest.

    Without, the shape of backups made before heads: one whole manifest beside the archive.
    """
    directory.mkdir(exist_ok=True)
    name = f"{PREFIX}_{stamp}"
    stored = random_file(directory / f"{name}.tar.gz.gpg", 300_000)
    (directory / f"{name}.tar.gz.gpg.sha256").write_text(f"{sha256_of(stored)}  {stored.name}\n")
    full = HEAD_FIELDS | {"id": name}
    if head:
        random_file(directory / f"{name}.manifest.json.gpg", 2_000)
        full = full | {"manifest": "encrypted"}
    (directory / f"{name}.manifest.json").write_text(json.dumps(full))
    return stored


def test_an_encrypted_backup_goes_up_with_its_encrypted_manifest_before_the_head(
    target: Target, tmp_path: Path
) -> None:
    """Archive, encrypted manifest, head, sidecar last; the listing sees it; delete takes all."""
    stored = make_encrypted_backup(tmp_path / "local", "20260102_140000", head=True)
    name = stored.name.removesuffix(".tar.gz.gpg")
    recording = Recording(target)
    targets.upload_backup(recording, stored)
    assert recording.calls == [
        ("delete", f"{name}.tar.gz.gpg.sha256"),
        ("upload", f"{name}.tar.gz.gpg"),
        ("upload", f"{name}.manifest.json.gpg"),
        ("upload", f"{name}.manifest.json"),
        ("upload", f"{name}.tar.gz.gpg.sha256"),
    ]
    [backup] = targets.list_backups(target.list(), PREFIX)
    assert backup.complete
    assert backup.encrypted_manifest is not None
    assert backup.encrypted_manifest.name == f"{name}.manifest.json.gpg"
    recording.calls.clear()
    targets.delete_backup(recording, stored.name)
    assert recording.calls[0] == ("delete", f"{name}.tar.gz.gpg.sha256")
    assert target.list() == []


def test_an_encrypted_backup_whose_encrypted_manifest_is_lost_is_not_uploaded(
    target: Target, tmp_path: Path
) -> None:
    """A head without its encrypted manifest is refused; a backup made before heads goes up."""
    lost = make_encrypted_backup(tmp_path / "local", "20260102_140000", head=True)
    (tmp_path / "local" / lost.name.replace(".tar.gz.gpg", ".manifest.json.gpg")).unlink()
    old = make_encrypted_backup(tmp_path / "local", "20260103_140000", head=False)

    with pytest.raises(ArchiveError, match=r"manifest\.json\.gpg is missing: the head beside"):
        targets.upload_backup(target, lost)
    targets.upload_backup(target, old)

    assert [
        (backup.name, backup.complete) for backup in targets.list_backups(target.list(), PREFIX)
    ] == [(old.name.removesuffix(".tar.gz.gpg"), True)]
