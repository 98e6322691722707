"""A directory on another machine, written with the rsync binary over SSH.

An upload goes to ``<name>.partial`` on the far side (rsync's ``--partial`` keeps what
arrived when the connection drops, so the next attempt sends only the rest), is hashed
there with ``sha256sum``, and takes its final name with ``mv`` only when size and digest
match. Host keys are always checked; nothing ever asks a question (BatchMode).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import structlog

from sovbackupd.config.models import RsyncRemote
from sovbackupd.errors import NotFoundError, TargetError, TransientTargetError
from sovbackupd.fsat import PARTIAL_SUFFIX, fsync_dir
from sovbackupd.targets.base import (
    NAME_PATTERN,
    Listing,
    RemoteObject,
    check_local_digest,
    check_name,
    file_sha256,
    local_size,
)

log = structlog.get_logger("sovbackupd.targets")

# ssh's own words for what only an operator can fix: a refused key, an unknown or
# changed host key, a missing identity file. Everything else at the connection level
# (refused, timed out, reset, name resolution) may pass.
_PERMANENT_SSH = re.compile(
    r"Permission denied|Host key verification failed|host key is known|"
    r"REMOTE HOST IDENTIFICATION HAS CHANGED|Too many authentication failures|"
    r"Bad configuration option|Bad owner or permissions|Could not open user known hosts",
    re.IGNORECASE,
)
# rsync exit codes of a connection that broke or stalled (rsync(1), EXIT VALUES); 255
# is ssh's own failure, passed on.
_TRANSIENT_RSYNC = frozenset({5, 10, 12, 20, 30, 35, 255})
_SSH_FAILURE = 255
_RSYNC_MISSING = 23  # "some files/attrs were not transferred": here, a missing path
_NO_SUCH_FILE = "No such file or directory"
_LISTING = re.compile(r"^(?P<mode>\S+)\s+(?P<size>\d+)\s+\S+\s+\S+\s+(?P<name>.+)$")


def split_url(url: str) -> tuple[str, str]:
    """Split ``[user@]host:path`` into the host part and the path."""
    if "]:" in url:  # [IPv6]:path
        host, _, path = url.partition("]:")
        return host + "]", path
    host, _, path = url.partition(":")
    return host, path


def _problem(stderr: str) -> str:
    """Return the telling lines of ssh's and rsync's stderr as one line."""
    lines = [line.strip(" @") for line in stderr.splitlines()]  # ssh frames warnings in @
    lines = [line for line in lines if line and not line.startswith("rsync error:")]
    telling = [line for line in lines if _PERMANENT_SSH.search(line)]
    return " | ".join((telling or lines)[:3]) or "no error output"


class RsyncTarget:
    """Copies in the directory of *config.url*, through rsync and ssh."""

    def __init__(self, config: RsyncRemote, *, rsync: str = "rsync", ssh: str = "ssh") -> None:
        """Copy to the remote *config*; *rsync* and *ssh* name the binaries."""
        self.config = config
        self._rsync = rsync
        self._ssh = ssh
        self._host, directory = split_url(config.url)
        self._directory = directory.rstrip("/") or "/"
        # ssh takes an IPv6 address without rsync's brackets.
        self._ssh_host = self._host.replace("[", "").replace("]", "")
        self._directory_ready = False

    @property
    def name(self) -> str:
        """Return the remote's name."""
        return self.config.name

    def _where(self) -> str:
        return f"{self._host}:{self._directory}"

    def _path(self, remote_name: str) -> str:
        return f"{self._directory}/{remote_name}"

    def _ssh_argv(self) -> list[str]:
        timeout = max(1, math.ceil(self.config.timeout_seconds))
        # Ours come first: ssh keeps the first value of an option, so ssh_options can add
        # to these but cannot turn host key checking or batch mode off.
        argv = [
            self._ssh,
            "-p",
            str(self.config.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={timeout}",
            "-o",
            f"ServerAliveInterval={max(1, timeout // 3)}",
            "-o",
            "ServerAliveCountMax=3",
        ]
        if self.config.known_hosts_file is not None:
            argv += ["-o", f'UserKnownHostsFile="{self.config.known_hosts_file}"']
        if self.config.identity_file is not None:
            argv += ["-i", str(self.config.identity_file), "-o", "IdentitiesOnly=yes"]
        for option in self.config.ssh_options:
            argv += ["-o", option]
        return argv

    def _failure(self, what: str, completed: subprocess.CompletedProcess[str]) -> TargetError:
        message = (
            f"remote {self.name}: {what} on {self._where()} failed: {_problem(completed.stderr)}"
        )
        if _PERMANENT_SSH.search(completed.stderr):
            return TargetError(message)
        if completed.returncode in _TRANSIENT_RSYNC:
            return TransientTargetError(message)
        return TargetError(message)

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            completed = subprocess.run(
                argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
            )
        except OSError as error:
            raise TargetError(f"remote {self.name}: cannot run {argv[0]}: {error}") from error
        if completed.returncode != 0:
            raise self._failure(what, completed)
        return completed

    def _remote(self, command: str, what: str) -> str:
        """Run the shell *command* on the host; return its output."""
        argv = [*self._ssh_argv(), "--", self._ssh_host, command]
        return self._run(argv, what).stdout

    def _rsync_argv(self, *arguments: str) -> list[str]:
        return [
            self._rsync,
            "--protect-args",
            f"--timeout={max(1, math.ceil(self.config.timeout_seconds))}",
            "-e",
            shlex.join(self._ssh_argv()),
            *arguments,
        ]

    def _ensure_directory(self) -> None:
        if not self._directory_ready:
            quoted = shlex.quote(self._directory)
            self._remote(f"umask 077 && mkdir -p -- {quoted}", "creating the directory")
            self._directory_ready = True

    def _commit(self, remote_name: str, size: int, sha256: str, what: str) -> tuple[int, str]:
        """Rename ``<name>.partial`` to *remote_name* if its size and sha256 match.

        One round trip: the far side hashes the temp file, and renames it (fsynced) or
        removes it. Return the size and sha256 that it found there.
        """
        partial = shlex.quote(self._path(remote_name + PARTIAL_SUFFIX))
        final = shlex.quote(self._path(remote_name))
        script = (
            f"size=$(wc -c < {partial}) && sum=$(sha256sum < {partial}) || exit 1; "
            'sum=${sum%% *}; echo "$size $sum"; '
            f'if [ "$size" -eq {size} ] && [ "$sum" = {sha256} ]; then '
            f"sync -- {partial} && mv -f -- {partial} {final} && "
            f"sync -- {shlex.quote(self._directory)}; "
            f"else rm -f -- {partial}; fi"
        )
        output = self._remote(script, what).split()
        if len(output) != 2 or not output[0].isdigit() or len(output[1]) != 64:
            raise TargetError(
                f"remote {self.name}: cannot read the size and sha256sum of the copy of "
                f"{remote_name} on {self._host}: got {' '.join(output)[:200]!r}"
            )
        return int(output[0]), output[1]

    def upload(
        self, local_path: Path, remote_name: str, *, sha256: str | None = None
    ) -> RemoteObject:
        """Send *local_path* to ``<name>.partial``, check it there, then rename it."""
        check_name(self.name, remote_name, sha256)
        started = time.monotonic()
        size = local_size(self.name, local_path)
        expected = sha256 if sha256 is not None else file_sha256(self.name, local_path)
        self._ensure_directory()
        partial = self._path(remote_name + PARTIAL_SUFFIX)
        what = f"upload of {remote_name}"
        self._run(
            self._rsync_argv(
                "--partial",
                "--perms",
                "--chmod=F600",
                "--",
                str(local_path),
                f"{self._host}:{partial}",
            ),
            what,
        )
        remote_size, remote_digest = self._commit(remote_name, size, expected, what)
        if (remote_size, remote_digest) != (size, expected):
            if sha256 is not None:
                # A file that no longer matches its sidecar is damaged here, not on the way.
                check_local_digest(
                    self.name, local_path, file_sha256(self.name, local_path), sha256
                )
            raise TransientTargetError(
                f"remote {self.name}: the copy of {remote_name} on {self._host} has "
                f"{remote_size} bytes and sha256 {remote_digest}, not {size} bytes and "
                f"{expected}; removed it"
            )
        log.info(
            "target.uploaded",
            target=self.name,
            object=remote_name,
            size=size,
            duration_seconds=round(time.monotonic() - started, 3),
        )
        return RemoteObject(remote_name, size, expected)

    def download(self, remote_name: str, local_path: Path) -> RemoteObject:
        """Fetch *remote_name* to ``<local_path>.partial``, fsync it, rename it."""
        check_name(self.name, remote_name)
        partial = local_path.with_name(local_path.name + PARTIAL_SUFFIX)
        argv = self._rsync_argv(
            "--partial",
            "--perms",
            "--chmod=F600",
            "--",
            f"{self._host}:{self._path(remote_name)}",
            str(partial),
        )
        try:
            completed = subprocess.run(
                argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
            )
        except OSError as error:
            raise TargetError(f"remote {self.name}: cannot run {argv[0]}: {error}") from error
        if completed.returncode == _RSYNC_MISSING and _NO_SUCH_FILE in completed.stderr:
            raise NotFoundError(f"remote {self.name}: no object {remote_name!r} on {self._where()}")
        if completed.returncode != 0:
            raise self._failure(f"download of {remote_name}", completed)
        try:
            descriptor = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            partial.replace(local_path)
            fsync_dir(local_path.parent)
        except OSError as error:
            raise TargetError(
                f"remote {self.name}: cannot write {local_path}: {error.strerror}"
            ) from error
        size = local_size(self.name, local_path)
        log.info("target.downloaded", target=self.name, object=remote_name, size=size)
        return RemoteObject(remote_name, size, file_sha256(self.name, local_path))

    def _list(self, path: str, what: str) -> Listing | None:
        """List *path* with ``rsync --list-only``; None when it does not exist."""
        argv = self._rsync_argv("--list-only", "--no-human-readable", f"{self._host}:{path}")
        try:
            completed = subprocess.run(
                argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
            )
        except OSError as error:
            raise TargetError(f"remote {self.name}: cannot run {argv[0]}: {error}") from error
        if completed.returncode == _RSYNC_MISSING and _NO_SUCH_FILE in completed.stderr:
            return None
        if completed.returncode != 0:
            raise self._failure(what, completed)
        found = []
        for line in completed.stdout.splitlines():
            match = _LISTING.match(line)
            if match is None or not match["mode"].startswith("-"):
                continue
            name = match["name"]
            if NAME_PATTERN.match(name) and not name.endswith(PARTIAL_SUFFIX):
                found.append(RemoteObject(name, int(match["size"])))
        return sorted(found, key=lambda stored: stored.name)

    def list(self) -> Listing:
        """Return the files in the directory; none when it does not exist yet."""
        return self._list(self._directory + "/", "listing") or []

    def stat(self, remote_name: str) -> RemoteObject | None:
        """Return *remote_name*'s size, or None when it is missing."""
        check_name(self.name, remote_name)
        found = self._list(self._path(remote_name), f"stat of {remote_name}")
        return next((stored for stored in found or [] if stored.name == remote_name), None)

    def delete(self, remote_name: str) -> None:
        """Remove *remote_name* and its temp file."""
        check_name(self.name, remote_name)
        final = shlex.quote(self._path(remote_name))
        partial = shlex.quote(self._path(remote_name + PARTIAL_SUFFIX))
        self._remote(f"rm -f -- {final} {partial}", f"deletion of {remote_name}")
        log.info("target.deleted", target=self.name, object=remote_name)
