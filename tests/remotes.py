"""Real remote services on loopback for the target tests: sshd, moto's S3, a GCS emulator.

Each is started as its own process on a free port, so a test can stop one (the remote is
down) or put a TcpProxy in front of it (the connection is cut, bytes are flipped).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from sovbackupd.config.models import GcsRemote, RsyncRemote, S3Remote
from sovbackupd.redis_server import free_port
from sovbackupd.targets.gcs import GcsTarget
from sovbackupd.targets.rsync import RsyncTarget
from sovbackupd.targets.s3 import S3Target
from tests.conftest import require_tool

STARTUP_SECONDS = 30.0
VENV_BIN = Path(sys.executable).parent


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited at start: {log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    process.kill()
    pytest.fail(f"{process.args!r} did not listen on port {port}: {log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _venv_tool(name: str) -> str:
    """Return a console script of the test environment (installed by the dev extra)."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    return require_tool(name)


@dataclass
class SshServer:
    """A throwaway sshd on 127.0.0.1 that lets root in with one test key."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    identity_file: Path
    known_hosts_file: Path
    host_public_key: str

    def known_hosts_line(self, port: int) -> str:
        """Return the known_hosts line of this server's key as seen on *port*."""
        return f"[127.0.0.1]:{port} {self.host_public_key}\n"

    def stop(self) -> None:
        """Stop the server (existing sessions end with it)."""
        _stop(self.process)

    @classmethod
    def start(cls, directory: Path) -> SshServer:
        """Start sshd with its own host key, authorized key and config in *directory*."""
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"  # sbin may be off a user's PATH
        if not Path(sshd).exists():
            pytest.fail("sshd is not installed; run the README's test command to install it")
        keygen = require_tool("ssh-keygen")
        require_tool("ssh")
        require_tool("rsync")
        directory.mkdir(parents=True, exist_ok=True)
        host_key = directory / "host_ed25519"
        identity = directory / "id_ed25519"
        for key in (host_key, identity):
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "sovbackupd-test", "-f", key],
                check=True,
            )
        authorized = directory / "authorized_keys"
        shutil.copyfile(identity.with_suffix(".pub"), authorized)
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        port = free_port()
        config = directory / "sshd_config"
        config.write_text(
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\n"
            f"PidFile {directory / 'sshd.pid'}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\n"
            "MaxStartups 100\n"
            "LogLevel VERBOSE\n"
        )
        log = directory / "sshd.log"
        process = subprocess.Popen(
            [sshd, "-D", "-f", config, "-p", str(port), "-o", "ListenAddress=127.0.0.1", "-E", log],
        )
        _wait_for_port(port, process, log)
        host_public_key = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
        known_hosts = directory / "known_hosts"
        server = cls(directory, port, process, identity, known_hosts, host_public_key)
        known_hosts.write_text(server.known_hosts_line(port))
        return server


@dataclass
class MotoServer:
    """moto's S3 in server mode, spoken to over HTTP like any S3-compatible store."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        _stop(self.process)

    @classmethod
    def start(cls, directory: Path, *, enforce_credentials: bool = False) -> MotoServer:
        """Start moto_server; with *enforce_credentials*, unknown access keys are refused."""
        directory.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ)
        if enforce_credentials:
            environment["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        port = free_port()
        log = directory / "moto.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [_venv_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        _wait_for_port(port, process, log)
        return cls(port, process)


@dataclass
class GcsEmulator:
    """gcp-storage-emulator: GCS's JSON API in memory, with resumable uploads."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        _stop(self.process)

    @classmethod
    def start(cls, directory: Path) -> GcsEmulator:
        """Start the emulator in memory on a free port."""
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = directory / "gcs.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    _venv_tool("gcp-storage-emulator"),
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--in-memory",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        _wait_for_port(port, process, log)
        return cls(port, process)


def unique(prefix: str) -> str:
    """Return a fresh lower-case name (a bucket per test)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """An sshd on loopback that lets root in with a test key (shared by the session)."""
    server = SshServer.start(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """Moto's S3 server on loopback (shared by the session; each test takes a bucket)."""
    server = MotoServer.start(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """The GCS emulator on loopback (shared by the session; each test takes a bucket)."""
    server = GcsEmulator.start(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake AWS credentials in the environment, and no AWS files of the user."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@dataclass
class TcpProxy:
    """A loopback TCP proxy the test controls: forward, cut after N bytes, or flip a byte.

    *cut_after* closes a connection once that many bytes went from the client to the
    server; *flip_at* inverts the byte at that offset of the client's stream instead.
    After *max_faults* faults the proxy forwards faithfully (a flaky network that
    recovers). :meth:`down` stops listening (connections are refused) until :meth:`up`.
    """

    upstream_port: int
    cut_after: int | None = None
    flip_at: int | None = None
    max_faults: int = 1_000_000
    port: int = 0
    connections: int = 0
    faults: int = 0
    _listener: socket.socket = field(init=False, repr=False)
    _sockets: list[socket.socket] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._listen()

    def _listen(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _fault(self) -> bool:
        """Count a fault if any are left; return whether to inject it."""
        with self._lock:
            if self.faults >= self.max_faults:
                return False
            self.faults += 1
            return True

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                end = sent + len(data)
                cut = upstream and self.cut_after is not None and end > self.cut_after
                if cut and self._fault():
                    sink.sendall(data[: max(0, (self.cut_after or 0) - sent)])
                    break
                flip = upstream and self.flip_at is not None and sent <= self.flip_at < end
                if flip and self._fault():
                    index = (self.flip_at or 0) - sent
                    data = data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]
                sink.sendall(data)
                sent = end
        except OSError:
            pass
        finally:
            for end_socket in (source, sink):
                with contextlib.suppress(OSError):
                    end_socket.shutdown(socket.SHUT_RDWR)
                end_socket.close()

    def down(self) -> None:
        """Stop listening and drop every connection: the remote is down."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        # shutdown() first: close() alone leaves a blocked accept() to take one more.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def up(self) -> None:
        """Listen again on the same port: the remote is back."""
        self._listen()

    close = down


PART_BYTES = 5 << 20  # S3's smallest part: a 12 MiB file goes up in three
GCS_CHUNK_BYTES = 1 << 20  # four resumable chunks of a 4 MiB+ file


def rsync_target(
    server: SshServer,
    directory: Path,
    *,
    port: int | None = None,
    identity_file: Path | None = None,
    known_hosts_file: Path | None = None,
    timeout_seconds: float = 10.0,
) -> RsyncTarget:
    """Return an rsync target writing to *directory* through *server* (or *port*)."""
    port = server.port if port is None else port
    if known_hosts_file is None:
        known_hosts_file = server.directory / f"known_hosts_{port}"
        known_hosts_file.write_text(server.known_hosts_line(port))
    config = RsyncRemote(
        name="rsync",
        type="rsync",
        url=f"root@127.0.0.1:{directory}",
        port=port,
        identity_file=identity_file or server.identity_file,
        known_hosts_file=known_hosts_file,
        timeout_seconds=timeout_seconds,
    )
    return RsyncTarget(config)


def s3_bucket(endpoint_url: str) -> str:
    """Create a fresh bucket on the S3 server at *endpoint_url*; return its name."""
    client = boto3.session.Session(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 (moto takes any key)
        region_name="us-east-1",
    ).client("s3", endpoint_url=endpoint_url)
    bucket = unique("bucket")
    client.create_bucket(Bucket=bucket)
    return bucket


def s3_target(endpoint_url: str, bucket: str, **fields: Any) -> S3Target:
    """Return an S3 target on *bucket* of the server at *endpoint_url*."""
    config = S3Remote.model_validate(
        {
            "name": "s3",
            "type": "s3",
            "bucket": bucket,
            "prefix": "backups/sovereigncore/",
            "endpoint_url": endpoint_url,
            "region": "us-east-1",
            "storage_class": "STANDARD_IA",
            **fields,
        }
    )
    return S3Target(config, part_size=PART_BYTES, connect_timeout=5, read_timeout=20)


def gcs_bucket(endpoint: str) -> str:
    """Create a fresh bucket on the GCS emulator at *endpoint*; return its name."""
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]  # untyped in google-auth
        client_options=ClientOptions(api_endpoint=endpoint),
    )
    bucket = unique("bucket")
    client.create_bucket(bucket)
    return bucket


def gcs_target(endpoint: str, bucket: str, **fields: Any) -> GcsTarget:
    """Return a GCS target on *bucket* of the emulator at *endpoint*."""
    config = GcsRemote.model_validate(
        {
            "name": "gcs",
            "type": "gcs",
            "bucket": bucket,
            "prefix": "backups/sovereigncore",
            "endpoint": endpoint,
            **fields,
        }
    )
    return GcsTarget(config, chunk_size=GCS_CHUNK_BYTES, connect_timeout=5, read_timeout=20)
