"""Remotes that fail: down, cut mid-upload, garbling bytes, refusing credentials.

Every target talks to its real server through a TcpProxy that the test controls, wrapped
in the RetryingTarget that the daemon uses (with a recorded sleep instead of a real one).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sovbackupd.errors import TargetError, TransientTargetError
from sovbackupd.targets import Backoff, RetryingTarget, Target
from tests.remotes import (
    GcsEmulator,
    MotoServer,
    SshServer,
    TcpProxy,
    gcs_bucket,
    gcs_target,
    rsync_target,
    s3_bucket,
    s3_target,
)

KINDS = ("rsync", "s3", "gcs")
BIG_BYTES = 12 * 1024 * 1024 + 777
# Offsets within one connection: the GCS emulator closes each after one request, so a
# fault must land inside one resumable chunk (1 MiB in these tests).
CUT_AFTER = 512 * 1024
FLIP_AT = 700 * 1024
Proxied = Callable[..., tuple[Target, TcpProxy]]


@pytest.fixture
def proxied(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Proxied]:
    """Build a target of a kind whose every connection goes through a fresh TcpProxy."""
    proxies: list[TcpProxy] = []

    def make(kind: str, **faults: Any) -> tuple[Target, TcpProxy]:
        target: Target
        match kind:
            case "rsync":
                server: SshServer = request.getfixturevalue("sshd")
                proxy = TcpProxy(server.port, **faults)
                target = rsync_target(server, tmp_path / "remote", port=proxy.port)
            case "s3":
                request.getfixturevalue("aws_environment")
                moto: MotoServer = request.getfixturevalue("moto_server")
                bucket = s3_bucket(moto.endpoint_url)
                proxy = TcpProxy(moto.port, **faults)
                target = s3_target(f"http://127.0.0.1:{proxy.port}", bucket)
            case "gcs":
                emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
                bucket = gcs_bucket(emulator.endpoint)
                proxy = TcpProxy(emulator.port, **faults)
                target = gcs_target(f"http://127.0.0.1:{proxy.port}", bucket)
            case _:
                raise AssertionError(kind)
        proxies.append(proxy)
        return target, proxy

    yield make
    for proxy in proxies:
        proxy.down()


def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "archive.bin"
    path.write_bytes(os.urandom(BIG_BYTES))
    return path


def retrying(
    target: Target,
    sleeps: list[float],
    attempts: int = 3,
    on_sleep: Callable[[], None] = lambda: None,
) -> RetryingTarget:
    """Wrap *target* as the daemon does, recording the waits instead of sleeping them."""

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        on_sleep()

    return RetryingTarget(target, Backoff(attempts=attempts, initial_seconds=1.0), sleep=sleep)


def assert_identical(target: Target, remote_name: str, source: Path, tmp_path: Path) -> None:
    back = tmp_path / "downloaded.bin"
    target.download(remote_name, back)
    assert (
        hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    )


@pytest.mark.parametrize("kind", KINDS)
def test_remote_down_is_retried_then_reported_and_uploaded_once_back(
    kind: str, proxied: Proxied, tmp_path: Path
) -> None:
    """A remote that stays down fails after the bounded attempts; once back, it gets the file."""
    target, proxy = proxied(kind)
    source = big_file(tmp_path)
    proxy.down()
    sleeps: list[float] = []
    with capture_logs() as events, pytest.raises(TransientTargetError) as caught:
        retrying(target, sleeps).upload(source, "archive.tar.gz")
    assert "gave up after 3 attempts" in str(caught.value)
    assert str(caught.value).startswith(f"remote {kind}: ")
    assert len(sleeps) == 2
    assert [event["event"] for event in events] == [
        "target.retrying",
        "target.retrying",
        "target.upload_failed",
    ]
    assert events[-1]["target"] == kind
    assert events[-1]["transient"] is True
    proxy.up()
    assert target.stat("archive.tar.gz") is None, "a failed upload leaves no object"
    retrying(target, sleeps).upload(source, "archive.tar.gz")
    assert_identical(target, "archive.tar.gz", source, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_remote_back_during_the_retries_gets_the_upload(
    kind: str, proxied: Proxied, tmp_path: Path
) -> None:
    """A remote that comes back while the wrapper waits receives the upload on a retry."""
    target, proxy = proxied(kind)
    source = big_file(tmp_path)
    proxy.down()
    sleeps: list[float] = []

    def back_after_two_waits() -> None:
        if len(sleeps) == 2:
            proxy.up()

    retrying(target, sleeps, attempts=4, on_sleep=back_after_two_waits).upload(
        source, "archive.tar.gz"
    )
    assert len(sleeps) == 2
    assert_identical(target, "archive.tar.gz", source, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_connection_cut_mid_upload_is_retried_and_completes(
    kind: str, proxied: Proxied, tmp_path: Path
) -> None:
    """A connection dropped mid-upload is retried; the object arrives whole."""
    target, proxy = proxied(kind, cut_after=CUT_AFTER, max_faults=1)
    source = big_file(tmp_path)
    sleeps: list[float] = []
    with capture_logs() as events:
        stored = retrying(target, sleeps).upload(source, "archive.tar.gz")
    assert proxy.faults == 1
    assert len(sleeps) == 1
    assert [event["event"] for event in events if event["event"] != "target.uploaded"] == [
        "target.retrying"
    ]
    assert stored.size == BIG_BYTES
    assert [(entry.name, entry.size) for entry in target.list()] == [("archive.tar.gz", BIG_BYTES)]
    assert_identical(target, "archive.tar.gz", source, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_connection_cut_every_time_is_reported_and_leaves_nothing(
    kind: str, proxied: Proxied, tmp_path: Path
) -> None:
    """When every attempt is cut, the failure is reported and no object takes the name."""
    target, proxy = proxied(kind, cut_after=CUT_AFTER)
    source = big_file(tmp_path)
    sleeps: list[float] = []
    with pytest.raises(TransientTargetError, match="gave up after 3 attempts"):
        retrying(target, sleeps).upload(source, "archive.tar.gz")
    assert proxy.faults >= 3
    assert target.stat("archive.tar.gz") is None
    assert target.list() == []


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_garbled_on_the_way_are_caught_and_sent_again(
    kind: str, proxied: Proxied, tmp_path: Path
) -> None:
    """A byte flipped in transit is caught by the checksums (or ssh's MAC) and re-sent."""
    target, proxy = proxied(kind, flip_at=FLIP_AT, max_faults=1)
    source = big_file(tmp_path)
    sleeps: list[float] = []
    with capture_logs() as events:
        retrying(target, sleeps).upload(source, "archive.tar.gz")
    assert proxy.faults == 1
    retries = [event for event in events if event["event"] == "target.retrying"]
    assert len(retries) == 1, retries
    assert_identical(target, "archive.tar.gz", source, tmp_path)


def refused_key(tmp_path: Path) -> Path:
    key = tmp_path / "stranger_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    return key


def changed_host_key(tmp_path: Path, port: int) -> Path:
    key = tmp_path / "impostor_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    known_hosts = tmp_path / "known_hosts"
    public = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    known_hosts.write_text(f"[127.0.0.1]:{port} {public}\n")
    return known_hosts


def bad_target(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """Return a target whose credentials the remote refuses, as *case* says."""
    match case:
        case "rsync-refused-key":
            server: SshServer = request.getfixturevalue("sshd")
            return rsync_target(server, tmp_path / "remote", identity_file=refused_key(tmp_path))
        case "rsync-changed-host-key":
            server = request.getfixturevalue("sshd")
            known_hosts = changed_host_key(tmp_path, server.port)
            return rsync_target(server, tmp_path / "remote", known_hosts_file=known_hosts)
        case "s3-unknown-access-key":
            request.getfixturevalue("aws_environment")
            moto = MotoServer.start(tmp_path / "moto", enforce_credentials=True)
            request.addfinalizer(moto.stop)
            return s3_target(moto.endpoint_url, "bucket")
        case "s3-credentials-file-without-keys":
            request.getfixturevalue("aws_environment")
            credentials = tmp_path / "aws-credentials"
            credentials.write_text("[default]\naws_access_key_id = AKIDEXAMPLE\n")
            moto_server: MotoServer = request.getfixturevalue("moto_server")
            return s3_target(moto_server.endpoint_url, "bucket", credentials_file=str(credentials))
        case "gcs-not-a-service-account-key":
            emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
            key = tmp_path / "gcs-key.json"
            key.write_text('{"type": "authorized_user"}\n')
            return gcs_target(
                emulator.endpoint, gcs_bucket(emulator.endpoint), credentials_file=str(key)
            )
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("rsync-refused-key", "Permission denied"),
        ("rsync-changed-host-key", "Host key verification failed"),
        ("s3-unknown-access-key", "InvalidAccessKeyId"),
        ("s3-credentials-file-without-keys", "lacks aws_secret_access_key"),
        ("gcs-not-a-service-account-key", "is not a service account key"),
    ],
)
def test_bad_credentials_fail_at_once_with_a_clear_message(
    case: str, says: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Refused credentials are a permanent TargetError: not retried, and named plainly."""
    target = bad_target(case, request, tmp_path)
    source = tmp_path / "file.bin"
    source.write_bytes(b"x" * 1000)
    sleeps: list[float] = []
    with capture_logs() as events, pytest.raises(TargetError) as caught:
        retrying(target, sleeps).upload(source, "file.tar.gz")
    assert not isinstance(caught.value, TransientTargetError)
    assert says in str(caught.value)
    assert sleeps == [], "permanent errors are not retried"
    [event] = events
    assert event["event"] == "target.upload_failed"
    assert event["transient"] is False
