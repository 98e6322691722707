"""Redis, snapshotted with BGSAVE and archived from one open handle of the RDB."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Generator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import redis

from sovbackupd import untrusted
from sovbackupd.config.models import RedisSource as RedisConfig
from sovbackupd.errors import SourceError
from sovbackupd.sources.base import Component, Estimate, Member, SourceReport
from sovbackupd.sources.files import MEMBER_OVERHEAD_BYTES, open_nofollow

POLL_SECONDS = 0.05
CHECK_TIMEOUT_SECONDS = 600
PASSWORD_MAX_BYTES = 64 << 10  # Redis takes longer ones; no password_file holds one
_KEYS_READ = re.compile(rb"\[info\] (\d+) keys read")
_EXPIRES = re.compile(rb"\[info\] (\d+) expires")


def complete_commands_length(stream: BinaryIO) -> int:
    """Return how many leading bytes of an AOF *stream* form whole commands.

    Redis appends to its AOF while we copy it, so the copy may end inside a command;
    cutting there is what Redis itself does on load with ``aof-load-truncated yes``.
    """
    good = position = 0
    while line := stream.readline():
        if not line.endswith(b"\r\n"):
            return good
        position += len(line)
        if line.startswith(b"#"):  # a timestamp annotation (aof-timestamp-enabled)
            good = position
            continue
        if not line.startswith(b"*") or not line[1:-2].isdigit():  # damage, not a command
            return good
        for _ in range(int(line[1:-2])):
            header = stream.readline()
            if not (header.startswith(b"$") and header.endswith(b"\r\n")):
                return good
            if not header[1:-2].isdigit():
                return good
            length = int(header[1:-2]) + 2
            if len(stream.read(length)) < length:
                return good
            position += len(header) + length
        good = position
    return good


def _copy_prefix(handle: BinaryIO, destination: Path, length: int) -> None:
    handle.seek(0)
    with destination.open("wb") as out:
        remaining = length
        while remaining > 0 and (chunk := handle.read(min(remaining, 1 << 20))):
            out.write(chunk)
            remaining -= len(chunk)


def _check(command: list[str], what: str, **kwargs: Any) -> bytes:  # noqa: ANN401 (passes through to subprocess.run)
    """Run a redis-check-* tool; return its output or raise SourceError."""
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            timeout=CHECK_TIMEOUT_SECONDS,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as error:
        raise SourceError(f"{command[0]} did not finish checking {what}") from error
    if result.returncode != 0:
        last = (result.stdout + result.stderr).strip().splitlines()[-1:] or [b"(no output)"]
        raise SourceError(f"{command[0]} rejects {what}: {last[0].decode(errors='replace')}")
    output: bytes = result.stdout
    return output


class RedisSource:
    """BGSAVE, confirmed through INFO persistence, then the RDB through one open handle.

    Only ``+bgsave +lastsave +info +ping`` are needed: file locations come from the
    policy, never from CONFIG GET. The RDB is opened once, checked through that handle
    with ``redis-check-rdb`` and archived from it, so a later BGSAVE that replaces the file
    cannot mix two snapshots.
    """

    def __init__(self, config: RedisConfig, *, offline: bool = False) -> None:
        """Back up the instance described by *config*.

        With *offline* the server is known to be stopped (a restore's safety backup):
        its RDB and AOF are archived from disk as they are, without BGSAVE.
        """
        self._config = config
        self._offline = offline

    @property
    def component(self) -> Component:
        """Return "redis"."""
        return "redis"

    @property
    def name(self) -> str:
        """Return "redis"."""
        return "redis"

    @property
    def where(self) -> str:
        """Return the URL without credentials, for messages."""
        scheme, separator, rest = self._config.url.partition("://")
        return f"{scheme}{separator}{rest.rpartition('@')[2]}"

    def _client(self) -> redis.Redis:
        password = None
        if self._config.password_file is not None:
            try:
                # Not read_text(): a FIFO would block the backup, /dev/zero fill the memory.
                with untrusted.open_regular(
                    self._config.password_file, follow_symlinks=True
                ) as file:
                    password = file.readline(PASSWORD_MAX_BYTES).decode("utf-8").splitlines()[0]
            except (OSError, ValueError, IndexError) as error:  # UnicodeDecodeError too
                raise SourceError(
                    f"cannot read the redis password from {self._config.password_file}"
                ) from error
        return redis.Redis.from_url(
            self._config.url,
            username=self._config.username,
            password=password,
            socket_connect_timeout=5,
            socket_timeout=30,
        )

    def _call(self, client: redis.Redis, *command: str) -> Any:  # noqa: ANN401 (redis replies are untyped)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        except redis.AuthenticationError as error:
            raise self._refused(error) from None
        except redis.ConnectionError as error:
            raise SourceError(f"redis at {self.where} is unreachable: {error}") from None
        except redis.RedisError as error:
            raise SourceError(f"redis at {self.where} failed {command[0]}: {error}") from None

    def _refused(self, error: redis.AuthenticationError) -> SourceError:
        """Say which policy setting gives Redis the password it asks for."""
        in_url = urlsplit(self._config.url)
        if self._config.password_file is None and in_url.password is None:
            # Redis's own words ("HELLO must be called...", "NOAUTH") do not say what to set.
            return SourceError(
                f"redis at {self.where} requires a password and the policy gives none: set "
                "sources.redis.password_file (a file whose first line is the password) and, "
                "for an ACL user, sources.redis.username"
            )
        user = self._config.username or in_url.username or "default"
        given = (
            f"sources.redis.password_file {self._config.password_file}"
            if self._config.password_file is not None
            else "sources.redis.url"
        )
        return SourceError(
            f"redis at {self.where} refused the credentials (user {user}, password from "
            f"{given}): {error}"
        )

    def answers(self) -> bool:
        """Tell whether a server listens at the URL (even one refusing our credentials)."""
        try:
            with self._client() as client:
                client.ping()
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        except redis.RedisError:
            return True  # it answered, if only to refuse us
        return True

    def _persistence(self, client: redis.Redis) -> dict[str, Any]:
        info: dict[str, Any] = self._call(client, "INFO", "persistence")
        return info

    def preflight(self) -> Estimate:
        """Check Redis answers; estimate the RDB from the dataset's size, and the AOF's.

        An RDB is rarely larger than the memory the server uses, so ``used_memory`` (or
        the current RDB, if larger) bounds what the new snapshot adds.
        """
        archived = MEMBER_OVERHEAD_BYTES
        read = 0
        if not self._offline:
            with self._client() as client:
                self._call(client, "PING")
                memory = self._call(client, "INFO", "memory")
            archived += int(memory.get("used_memory", 0))
            read = int(memory.get("used_memory_dataset", 0))
        # The new snapshot most likely has the size of the last one, far below used_memory.
        if self._config.rdb_path.exists():
            read = self._config.rdb_path.stat().st_size
            archived = max(archived, MEMBER_OVERHEAD_BYTES + read)
        staged = 0
        if self._config.aof_dir is not None:
            if not self._config.aof_dir.is_dir():
                raise SourceError(f"redis aof_dir {self._config.aof_dir} is not a directory")
            sizes = [
                entry.stat().st_size for entry in self._config.aof_dir.iterdir() if entry.is_file()
            ]
            staged = MEMBER_OVERHEAD_BYTES * (len(sizes) + 1) + sum(sizes)
            read += sum(sizes)
        return Estimate(archived_bytes=archived + staged, staged_bytes=staged, read_bytes=read)

    def _wait_for(
        self, client: redis.Redis, deadline: float, done: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """Poll INFO persistence until *done* holds; fail at *deadline*."""
        while not done(info := self._persistence(client)):
            if time.monotonic() > deadline:
                raise SourceError(
                    f"redis BGSAVE at {self.where} did not finish within "
                    f"{self._config.timeout_seconds:g}s"
                )
            time.sleep(POLL_SECONDS)
        return info

    def _save(self, client: redis.Redis) -> dict[str, Any]:
        """Run BGSAVE and wait until INFO persistence confirms that it succeeded.

        A save someone else started is not ours: it began before our request. We wait for
        it to end, then ask for our own (BGSAVE SCHEDULE covers a running AOF rewrite).
        """
        deadline = time.monotonic() + self._config.timeout_seconds
        while True:
            before = self._wait_for(
                client, deadline, lambda info: not int(info["rdb_bgsave_in_progress"])
            )
            counter = "rdb_saves" if "rdb_saves" in before else "rdb_last_save_time"
            try:
                client.execute_command("BGSAVE", "SCHEDULE")  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            except redis.ResponseError as error:
                if "in progress" in str(error):
                    continue  # another save started in between: wait for it, then ask again
                raise SourceError(f"redis at {self.where} failed BGSAVE: {error}") from None
            except redis.RedisError as error:
                raise SourceError(f"redis at {self.where} failed BGSAVE: {error}") from None
            break
        target = int(before[counter]) + 1
        info = self._wait_for(
            client,
            deadline,
            lambda info: int(info[counter]) >= target and not int(info["rdb_bgsave_in_progress"]),
        )
        if info["rdb_last_bgsave_status"] != "ok":
            raise SourceError(
                f"redis BGSAVE at {self.where} failed (rdb_last_bgsave_status:"
                f"{info['rdb_last_bgsave_status']}); see the Redis log: disk full or no "
                "write access to its dir?"
            )
        return info

    def _open_rdb(self, requested_at: float | None) -> BinaryIO:
        """Open the RDB; with *requested_at*, check that the BGSAVE asked for then wrote it."""
        path = self._config.rdb_path
        try:
            handle = open_nofollow(str(path))
        except OSError as error:
            after = "" if requested_at is None else " after BGSAVE"
            raise SourceError(
                f"redis rdb_path {path} cannot be opened{after}: {error.strerror}"
            ) from error
        if requested_at is not None and os.fstat(handle.fileno()).st_mtime < requested_at - 2:
            handle.close()
            raise SourceError(
                f"redis rdb_path {path} was not written by this BGSAVE; does it match the "
                "server's dir and dbfilename?"
            )
        return handle

    def _check_rdb(self, handle: BinaryIO, report: SourceReport) -> None:
        checker = shutil.which("redis-check-rdb")
        if checker is None:
            report.details["rdb_check"] = "skipped: redis-check-rdb not installed"
            return
        descriptor = handle.fileno()
        output = _check(
            [checker, f"/dev/fd/{descriptor}"], "the RDB snapshot", pass_fds=(descriptor,)
        )
        report.details["rdb_check"] = "ok"
        if match := _KEYS_READ.search(output):
            report.details["keys_in_rdb"] = int(match.group(1))
        if match := _EXPIRES.search(output):
            report.details["expires_in_rdb"] = int(match.group(1))

    def members(self, staging: Path, report: SourceReport) -> Generator[Member]:
        """Snapshot Redis, yield its RDB and, when configured, its AOF."""
        if self._offline:
            report.details["offline"] = True
            handle = self._open_rdb(None)
        else:
            with self._client() as client:
                requested_at = time.time()
                info = self._save(client)
                keyspace = self._call(client, "INFO", "keyspace")
            report.details["keyspace_at_save"] = {
                db: {"keys": int(stats["keys"]), "expires": int(stats["expires"])}
                for db, stats in keyspace.items()
            }
            report.details["rdb_saves"] = info.get("rdb_saves")
            handle = self._open_rdb(requested_at)
        try:
            self._check_rdb(handle, report)
            status = os.fstat(handle.fileno())
        except BaseException:
            handle.close()
            raise

        def rewound() -> BinaryIO:
            handle.seek(0)
            return handle

        try:
            yield Member.from_stat("redis_dump.rdb", self._config.rdb_path, status, rewound)
        finally:
            handle.close()
        if self._config.aof_dir is not None:
            yield from self._aof(self._config.aof_dir, staging, report)

    def _aof(self, aof_dir: Path, staging: Path, report: SourceReport) -> Generator[Member]:
        manifests = sorted(aof_dir.glob("*.manifest"))
        staged_dir = staging / "aof"
        staged_dir.mkdir()
        try:
            if manifests:
                names = self._stage_multipart(manifests[0], staged_dir)
                arcdir = "appendonlydir"
                checked = staged_dir / manifests[0].name
            else:
                legacy = aof_dir / "appendonly.aof"
                if not legacy.is_file():
                    raise SourceError(f"redis aof_dir {aof_dir} holds no AOF manifest or file")
                with open_nofollow(str(legacy)) as handle:
                    self._stage_tail(handle, staged_dir / legacy.name)
                names = [legacy.name]
                arcdir = ""
                checked = staged_dir / legacy.name
            checker = shutil.which("redis-check-aof")
            if checker is None:
                report.details["aof_check"] = "skipped: redis-check-aof not installed"
            else:
                _check([checker, str(checked)], "the AOF copy")
                report.details["aof_check"] = "ok"
            report.details["aof_files"] = names
            if arcdir:
                yield Member.from_stat(arcdir, aof_dir, aof_dir.stat())
            for name in names:
                arcname = f"{arcdir}/{name}" if arcdir else name
                live = aof_dir / name
                staged = staged_dir / name
                yield Member.from_stat(
                    arcname,
                    live,
                    staged.stat(),
                    partial(open_nofollow, str(staged)),
                )
        finally:
            shutil.rmtree(staged_dir, ignore_errors=True)

    @staticmethod
    def _stage_tail(handle: BinaryIO, destination: Path) -> None:
        """Copy an AOF that Redis may be appending to, cut after its last whole command."""
        size = os.fstat(handle.fileno()).st_size
        _copy_prefix(handle, destination, size)
        with destination.open("rb") as staged:
            length = complete_commands_length(staged)
        os.truncate(destination, length)

    def _stage_multipart(self, manifest: Path, staged_dir: Path) -> list[str]:
        """Copy a Redis 7 appendonlydir as one consistent set of files.

        An AOF rewrite can swap the manifest at any time, so the files are opened while
        the manifest reads the same before and after; open handles keep them readable
        even if the rewrite then deletes them.
        """
        for _ in range(20):
            listed = manifest.read_bytes()
            entries = [line.split() for line in listed.decode().splitlines() if line.strip()]
            names = [fields[1] for fields in entries]
            kinds = [fields[fields.index("type") + 1] for fields in entries]
            with ExitStack() as stack:
                try:
                    handles = [
                        stack.enter_context(open_nofollow(str(manifest.parent / name)))
                        for name in names
                    ]
                except FileNotFoundError:
                    continue
                if manifest.read_bytes() != listed:
                    continue
                last_incr = max((i for i, kind in enumerate(kinds) if kind == "i"), default=-1)
                for index, (name, handle) in enumerate(zip(names, handles, strict=True)):
                    if index == last_incr:
                        self._stage_tail(handle, staged_dir / name)
                    else:
                        _copy_prefix(handle, staged_dir / name, os.fstat(handle.fileno()).st_size)
                (staged_dir / manifest.name).write_bytes(listed)
                return [*names, manifest.name]
        raise SourceError(f"redis AOF in {manifest.parent} kept changing; no consistent copy")
