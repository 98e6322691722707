"""The real things a soak runs against: a tmpfs, a killable redis-server, SQLite, loads."""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

MiB = 1 << 20
REDIS_START_SECONDS = 30.0
REDIS_STOP_SECONDS = 10.0
REDIS_KEYS = 4000
# Each key a BGSAVE writes waits this long (microseconds): a save of REDIS_KEYS keys then
# lasts about 100 ms, long enough for a fault to land in the middle of one.
REDIS_KEY_SAVE_DELAY_USEC = 25
LOCKER_READY_SECONDS = 30.0


class SoakSetupError(Exception):
    """The soak could not build or drive its environment (not a finding about sovbackupd)."""


def require(tool: str) -> str:
    """Return the path of *tool*, or raise SoakSetupError naming it."""
    path = shutil.which(tool)
    if path is None:
        raise SoakSetupError(f"{tool} is not installed; tools/setup installs it")
    return path


@dataclass
class Tmpfs:
    """A small tmpfs the test mounts (as root), so that it can fill it and free it."""

    directory: Path
    size: str
    mounted: bool = False

    @property
    def ballast(self) -> Path:
        """Return the file that fills the disk: outside backup_dir, named like nothing owned."""
        return self.directory / "soak-ballast.bin"

    def mount(self) -> None:
        """Mount the tmpfs on its directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        completed = subprocess.run(
            [
                require("mount"),
                *("-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs"),
                str(self.directory),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise SoakSetupError(
                f"cannot mount a {self.size} tmpfs on {self.directory} (the soak runs as root "
                f"in CI): {completed.stderr.strip()}"
            )
        self.mounted = True

    def unmount(self) -> None:
        """Unmount the tmpfs (lazily if something still holds it)."""
        if not self.mounted:
            return
        umount = require("umount")
        completed = subprocess.run([umount, str(self.directory)], capture_output=True, check=False)
        if completed.returncode != 0:
            subprocess.run([umount, "-l", str(self.directory)], check=False)
        self.mounted = False

    def free_bytes(self) -> int:
        """Return the free bytes on the tmpfs."""
        return shutil.disk_usage(self.directory).free

    def fill(self, leave: int) -> int:
        """Fill the disk until only *leave* bytes are free; return the ballast's size."""
        size = max(0, self.free_bytes() - leave)
        with self.ballast.open("ab") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
            except OSError:
                # Something else wrote meanwhile: take what is left, chunk by chunk.
                chunk = b"\0" * MiB
                with contextlib.suppress(OSError):
                    while self.free_bytes() > leave + len(chunk):
                        handle.write(chunk)
                        handle.flush()
        return self.ballast.stat().st_size

    def release(self) -> None:
        """Remove the ballast: the disk has room again."""
        self.ballast.unlink(missing_ok=True)


@dataclass
class RedisService:
    """A redis-server on a fixed port and dir, in its own process group so it dies whole."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def rdb_path(self) -> Path:
        """Return where the server writes its RDB."""
        return self.directory / "dump.rdb"

    @property
    def url(self) -> str:
        """Return the server's redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Return the server's pid while it runs."""
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """Return a client with short timeouts."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def start(self) -> None:
        """Start the server (again) on the same port and dir; return once it answers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            require("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
            "--save", "",  # only the backups' BGSAVEs write the RDB
            "--appendonly", "no",
            "--rdb-key-save-delay", str(REDIS_KEY_SAVE_DELAY_USEC),
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + REDIS_START_SECONDS
        while True:
            try:
                with self.client() as client:
                    client.ping()
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "redis.log").read_text(errors="replace")[-1000:]
                    raise SoakSetupError(
                        f"redis-server did not start on {self.port}: {log}"
                    ) from None
                time.sleep(0.05)
            else:
                return

    def kill(self) -> None:
        """SIGKILL the server and its BGSAVE child at once."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop the server with SIGTERM (a clean shutdown), SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(REDIS_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # a BGSAVE child it left, if any

    def saving(self) -> bool:
        """Tell whether a BGSAVE is in progress."""
        try:
            with self.client(timeout=0.5) as client:
                info = client.info("persistence")
        except redis.RedisError:
            return False
        return bool(int(info.get("rdb_bgsave_in_progress", 0)))


LOCKER_SCRIPT = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
# In WAL mode BEGIN EXCLUSIVE alone does not block readers; in exclusive locking mode the
# connection holds the database file's lock, so readers (the backup API) wait too.
connection.execute("PRAGMA locking_mode=EXCLUSIVE")
connection.execute("BEGIN EXCLUSIVE")
connection.execute("INSERT INTO entries (body) VALUES ('written under the soak lock')")
print("locked", flush=True)
sys.stdin.read()
connection.execute("ROLLBACK")
"""


@dataclass
class SqliteLock:
    """Another process holding a WAL database in an EXCLUSIVE transaction."""

    process: subprocess.Popen[str]

    @classmethod
    def take(cls, database: Path) -> SqliteLock:
        """Lock *database*; return once the lock is held."""
        process = subprocess.Popen(
            [sys.executable, "-c", LOCKER_SCRIPT, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        held = cls(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], LOCKER_READY_SECONDS)
        if not ready or process.stdout.readline().strip() != "locked":
            held.release()
            raise SoakSetupError(f"the SQLite locker did not lock {database}")
        return held

    def release(self) -> None:
        """End the transaction and let the process exit."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_database(path: Path) -> None:
    """Create the WAL database the SQLite load writes to."""
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, body TEXT)")
    connection.executemany(
        "INSERT INTO entries (body) VALUES (?)", [(os.urandom(60).hex(),) for _ in range(2000)]
    )
    connection.commit()
    connection.close()


@dataclass
class Load:
    """A thread that keeps writing to one service, riding out its outages."""

    name: str
    pause: float = 0.1
    operations: int = 0
    errors: int = 0
    last_error: str | None = None
    unexpected: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _suspend: threading.Event = field(default_factory=threading.Event)
    _suspended: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start writing in a thread."""
        self._thread = threading.Thread(target=self._run, name=f"soak-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop writing and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.close()  # in this thread: SQLite connections belong to theirs

    def suspend(self) -> None:
        """Stop writing and release the service (close connections) until resume()."""
        self._suspended.clear()
        self._suspend.set()
        if self._thread is not None and self._thread.is_alive():
            self._suspended.wait(30)

    def resume(self) -> None:
        """Write again."""
        self._suspend.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._suspend.is_set():
                self.close()
                self._suspended.set()
                self._stop.wait(0.05)
                continue
            try:
                self.step()
                self.operations += 1
            except self.expected() as error:
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                self._stop.wait(0.2)
            except Exception as error:  # a load must outlive any one write
                self.unexpected.append(f"{type(error).__name__}: {error}")
                self._stop.wait(0.5)
            self._stop.wait(self.pause)

    def expected(self) -> tuple[type[Exception], ...]:
        """Return the errors a write may meet while a fault is on."""
        return ()

    def step(self) -> None:
        """Write once."""

    def close(self) -> None:
        """Release what the writes held."""


@dataclass
class RedisLoad(Load):
    """SETs over a fixed key space (some with a TTL), in pipelined batches."""

    port: int = 0
    rng: random.Random = field(default_factory=random.Random)
    _client: redis.Redis | None = None

    def expected(self) -> tuple[type[Exception], ...]:
        """Return redis errors: the server is killed and stopped on purpose."""
        return (redis.RedisError,)

    def step(self) -> None:
        """Write a batch of 50 keys."""
        if self._client is None:
            self._client = redis.Redis(
                host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2
            )
        pipeline = self._client.pipeline(transaction=False)
        for _ in range(50):
            key = f"soak:{self.rng.randrange(REDIS_KEYS)}"
            ttl = 30 if self.rng.random() < 0.05 else None
            pipeline.set(key, self.rng.randbytes(80).hex(), ex=ttl)
        pipeline.execute()

    def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass
class SqliteLoad(Load):
    """Rows inserted in small transactions; old rows deleted so the size stays flat."""

    database: Path = Path()
    _connection: sqlite3.Connection | None = None

    def expected(self) -> tuple[type[Exception], ...]:
        """Return SQLite's busy errors: the database is locked on purpose."""
        return (sqlite3.OperationalError,)

    def step(self) -> None:
        """Insert 10 rows, and now and then trim the table."""
        if self._connection is None:
            self._connection = sqlite3.connect(self.database, timeout=0.5)
        connection = self._connection
        try:
            connection.executemany(
                "INSERT INTO entries (body) VALUES (?)",
                [(os.urandom(60).hex(),) for _ in range(10)],
            )
            if self.operations % 20 == 0:
                connection.execute(
                    "DELETE FROM entries WHERE id < (SELECT max(id) FROM entries) - 3000"
                )
            connection.commit()
        except sqlite3.OperationalError:
            connection.rollback()
            raise

    def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@dataclass
class FileChurn(Load):
    """Files created, rewritten, renamed and deleted in the data directories."""

    directories: tuple[Path, ...] = ()
    rng: random.Random = field(default_factory=random.Random)
    max_files: int = 40

    def expected(self) -> tuple[type[Exception], ...]:
        """Return nothing: the data directories are never faulted."""
        return ()

    def _files(self) -> list[Path]:
        return sorted(
            path
            for directory in self.directories
            for path in directory.rglob("churn-*")
            if path.is_file()
        )

    def step(self) -> None:
        """Change one file."""
        files = self._files()
        action = self.rng.choice(("create", "create", "rewrite", "append", "rename", "delete"))
        if action == "create" or not files:
            if len(files) >= self.max_files:
                files[0].unlink()
                return
            directory = self.rng.choice(self.directories)
            if self.rng.random() < 0.3:
                directory = directory / f"churn-dir-{self.rng.randrange(4)}"
                directory.mkdir(exist_ok=True)
            suffix = ".tmp" if self.rng.random() < 0.1 else ".bin"  # *.tmp is excluded
            path = directory / f"churn-{self.rng.randrange(1 << 30):08x}{suffix}"
            path.write_bytes(self.rng.randbytes(self.rng.randrange(1024, 16 * 1024)))
            return
        path = self.rng.choice(files)
        if action == "rewrite":
            path.write_bytes(self.rng.randbytes(self.rng.randrange(1024, 16 * 1024)))
        elif action == "append":
            with path.open("ab") as handle:
                handle.write(self.rng.randbytes(512))
        elif action == "rename":
            path.rename(path.with_name(f"churn-{self.rng.randrange(1 << 30):08x}{path.suffix}"))
        else:
            path.unlink()
