"""Throwaway redis-server processes on a free loopback port (demo, test restores)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from sovbackupd.errors import SovbackupdError

START_SECONDS = 10.0
STOP_SECONDS = 10.0


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class RedisProcess:
    """A redis-server we started, in its own directory, listening on 127.0.0.1 only."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    password: str | None = None

    @property
    def rdb_path(self) -> Path:
        """Return where the server writes its RDB (the default dbfilename)."""
        return self.directory / "dump.rdb"

    @property
    def aof_dir(self) -> Path:
        """Return Redis 7's multi-part AOF directory (the default appenddirname)."""
        return self.directory / "appendonlydir"

    @property
    def url(self) -> str:
        """Return the server's redis:// URL (without the password)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        """Return a client for database *db*."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=self.password, socket_timeout=10
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after STOP_SECONDS)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _last_log_line(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1].split(" ", 4)[-1] if lines else "empty log"


def start(
    directory: Path, *options: str, password: str | None = None, timeout: float = START_SECONDS
) -> RedisProcess:
    """Start redis-server in *directory* with extra *options*; return once it answers PING.

    A server still loading its dataset does not answer yet: *timeout* bounds the wait.
    Raise SovbackupdError when redis-server is missing or does not come up, with the last
    line of its log (``redis.log`` in *directory*).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise SovbackupdError(
            "redis-server is not installed (Debian: apt-get install redis-server)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--daemonize", "no",
        "--logfile", str(directory / "redis.log"),
        *options,
    ]  # fmt: skip
    if password is not None:
        argv += ["--requirepass", password]
    server = RedisProcess(
        directory, port, subprocess.Popen(argv, stdout=subprocess.DEVNULL), password
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.client().ping()
        except redis.RedisError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise SovbackupdError(
                    f"redis-server did not start in {directory}: "
                    f"{_last_log_line(directory / 'redis.log')}"
                ) from None
            time.sleep(0.05)
        else:
            return server
