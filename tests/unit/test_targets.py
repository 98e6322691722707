"""The target registry and the retrying wrapper: backoff, bounds, permanent errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sovbackupd.config.models import GcsRemote, Policy, RsyncRemote, S3Remote
from sovbackupd.errors import NotFoundError, TargetError, TransientTargetError
from sovbackupd.targets import Backoff, RemoteObject, RetryingTarget, build_target, list_backups
from sovbackupd.targets.gcs import GcsTarget
from sovbackupd.targets.local import LocalTarget
from sovbackupd.targets.rsync import RsyncTarget, split_url
from sovbackupd.targets.s3 import S3Target, read_credentials

REMOTES = [
    {"name": "backup-server", "type": "rsync", "url": "user@backup-server:/backups/sovereigncore"},
    {"name": "s3", "type": "s3", "bucket": "your-bucket", "prefix": "backups/sovereigncore/"},
    {"name": "gcs", "type": "gcs", "bucket": "your-bucket", "prefix": "backups/sovereigncore/"},
]


def test_build_target_makes_each_kind_behind_the_retrying_wrapper() -> None:
    """Each remote type of the policy builds its own target, wrapped in RetryingTarget."""
    policy = Policy.model_validate({"sources": {"dirs": ["/srv/data"]}, "remotes": REMOTES})
    built = [build_target(remote) for remote in policy.remotes]
    assert all(isinstance(target, RetryingTarget) for target in built)
    inner = [target.inner for target in built if isinstance(target, RetryingTarget)]
    assert [type(target) for target in inner] == [RsyncTarget, S3Target, GcsTarget]
    assert [target.name for target in built] == ["backup-server", "s3", "gcs"]
    bare = build_target(policy.remotes[0], backoff=None)
    assert isinstance(bare, RsyncTarget)


@pytest.mark.parametrize(
    ("url", "host", "path"),
    [
        (
            "user@backup-server:/backups/sovereigncore",
            "user@backup-server",
            "/backups/sovereigncore",
        ),
        ("backup-server:relative/dir", "backup-server", "relative/dir"),
        ("root@[2001:db8::1]:/srv/backups", "root@[2001:db8::1]", "/srv/backups"),
    ],
)
def test_rsync_urls_split_into_host_and_path(url: str, host: str, path: str) -> None:
    """An rsync url splits at the colon after the host, IPv6 brackets included."""
    assert split_url(url) == (host, path)
    RsyncRemote(name="r", type="rsync", url=url)


def test_backoff_grows_exponentially_up_to_its_cap_with_bounded_jitter() -> None:
    """Delays double from the initial one, stop at the cap, and jitter stays within bounds."""
    backoff = Backoff(attempts=6, initial_seconds=1.0, max_seconds=5.0, multiplier=2.0, jitter=0.5)
    assert list(backoff.delays(lambda: 0.5)) == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert list(backoff.delays(lambda: 0.0)) == [0.5, 1.0, 2.0, 2.5, 2.5]
    assert next(backoff.delays(lambda: 0.999999)) == pytest.approx(1.5)
    assert list(Backoff(attempts=1).delays()) == []


@pytest.mark.parametrize("settings", [{"attempts": 0}, {"jitter": 2.0}, {"multiplier": 0.5}])
def test_backoff_refuses_settings_that_never_try_or_shrink(settings: dict[str, float]) -> None:
    """A backoff that would never try, or wait less each time, is refused."""
    with pytest.raises(ValueError, match="must be"):
        Backoff(**settings)  # type: ignore[arg-type]  # the values are the point of the test


def test_transient_errors_are_retried_until_the_remote_is_back(tmp_path: Path) -> None:
    """A directory that appears (a disk mounted) during the waits gets the upload."""
    directory = tmp_path / "mount"
    source = tmp_path / "file.bin"
    source.write_bytes(b"payload")
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            directory.mkdir()

    target = RetryingTarget(
        LocalTarget("usb", directory),
        Backoff(attempts=5, initial_seconds=1.0, jitter=0.0),
        sleep=sleep,
    )
    with capture_logs() as events:
        stored = target.upload(source, "file.tar.gz")
    assert stored == RemoteObject("file.tar.gz", 7, stored.sha256)
    assert sleeps == [1.0, 2.0]
    retries = [event for event in events if event["event"] == "target.retrying"]
    assert [event["attempt"] for event in retries] == [1, 2]
    assert all(event["target"] == "usb" and event["operation"] == "upload" for event in retries)
    assert events[-1]["event"] == "target.uploaded"


def test_transient_errors_give_up_after_the_bounded_attempts(tmp_path: Path) -> None:
    """A remote that never comes back fails after exactly `attempts` tries, saying so."""
    sleeps: list[float] = []
    target = RetryingTarget(
        LocalTarget("usb", tmp_path / "never"), Backoff(attempts=4), sleep=sleeps.append
    )
    with capture_logs() as events, pytest.raises(TransientTargetError) as caught:
        target.list()
    assert "gave up after 4 attempts" in str(caught.value)
    assert len(sleeps) == 3
    assert events[-1]["event"] == "target.list_failed"
    assert events[-1]["attempts"] == 4


def test_permanent_errors_pass_through_at_once(tmp_path: Path) -> None:
    """A TargetError that is not transient is raised on the first attempt, unretried."""
    (tmp_path / "remote").mkdir()
    sleeps: list[float] = []
    target = RetryingTarget(LocalTarget("usb", tmp_path / "remote"), sleep=sleeps.append)
    source = tmp_path / "file.bin"
    source.write_bytes(b"payload")
    with capture_logs() as events, pytest.raises(TargetError) as caught:
        target.upload(source, "file.tar.gz", sha256="0" * 64)
    assert not isinstance(caught.value, TransientTargetError)
    assert sleeps == []
    assert [event["event"] for event in events] == ["target.upload_failed"]
    with pytest.raises(NotFoundError):
        target.download("missing.tar.gz", tmp_path / "missing")
    assert sleeps == []


def test_list_backups_groups_files_and_tells_complete_from_incomplete() -> None:
    """Archives pair with their manifest and sidecar; strangers and temp names are ignored."""
    listing = [
        RemoteObject("sovereigncore_backup_20260102_140000.tar.gz", 100),
        RemoteObject("sovereigncore_backup_20260102_140000.tar.gz.sha256", 90),
        RemoteObject("sovereigncore_backup_20260102_140000.manifest.json", 50),
        RemoteObject("sovereigncore_backup_20260101_020000.tar.zst.gpg", 80),
        RemoteObject("sovereigncore_backup_20260101_020000.manifest.json", 50),
        RemoteObject("other_backup_20260101_020000.tar.gz", 10),
        RemoteObject("notes.txt", 1),
    ]
    backups = list_backups(listing, "sovereigncore_backup")
    assert [(backup.name, backup.complete) for backup in backups] == [
        ("sovereigncore_backup_20260101_020000", False),
        ("sovereigncore_backup_20260102_140000", True),
    ]
    assert backups[0].archive.name.endswith(".tar.zst.gpg")
    assert backups[1].created.isoformat() == "2026-01-02T14:00:00+00:00"


def test_remote_kinds_keep_their_own_fields() -> None:
    """Fields of one kind of remote are unknown keys on another."""
    S3Remote.model_validate(REMOTES[1])
    GcsRemote.model_validate(REMOTES[2])
    with pytest.raises(ValueError, match="Extra inputs"):
        GcsRemote.model_validate({**REMOTES[2], "endpoint_url": "http://x"})


@pytest.mark.parametrize("damage", ["fifo", "huge"])
def test_s3_credentials_file_that_is_a_fifo_or_huge_is_refused_at_once(
    tmp_path: Path, damage: str
) -> None:
    """A FIFO blocked the upload on open(); /dev/zero-sized files were read whole."""
    path = tmp_path / "credentials"
    if damage == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"[default]\n" + b"#" * (1 << 20))
    raised: list[TargetError] = []

    def read() -> None:
        try:
            read_credentials("offsite", path)
        except TargetError as error:
            raised.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(60)
    if reader.is_alive():  # unblock the reader before failing, so that the run ends
        with path.open("w"):
            pass
        reader.join()
        pytest.fail("reading a FIFO as the credentials file blocked")
    [error] = raised
    assert str(error).startswith(f"remote offsite: credentials_file {path} "), error
    assert ("not a regular file" if damage == "fifo" else "larger than 64 KiB") in str(error)
