"""A Target around a Target that retries transient errors with backoff (restic's retry backend).

Each implementation raises at the first failure; this wrapper alone decides when to try
again, so every remote gets the same, tested policy. Permanent errors pass through at
once: retrying bad credentials only delays the alert.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from sovbackupd.errors import SovbackupdError, TransientTargetError
from sovbackupd.targets.base import Listing, RemoteObject, Target
from sovbackupd.wording import plural

log = structlog.get_logger("sovbackupd.targets")

Result = TypeVar("Result")


@dataclass(frozen=True)
class Backoff:
    """How often and how patiently to retry: exponential delays with jitter.

    The n-th retry waits ``initial_seconds * multiplier**(n-1)``, capped at
    ``max_seconds``, then spread by ``jitter`` (0.5: anywhere from half to one and a
    half times that) so that workers retrying together do not hit the remote together.
    """

    attempts: int = 5
    initial_seconds: float = 2.0
    max_seconds: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        """Refuse settings that would never try, or wait a negative time."""
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.initial_seconds < 0 or self.max_seconds < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and the multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def delays(self, uniform: Callable[[], float] = random.random) -> Iterator[float]:
        """Yield the wait before each retry (attempts - 1 of them); *uniform* is in [0, 1)."""
        delay = self.initial_seconds
        for _ in range(self.attempts - 1):
            base = min(delay, self.max_seconds)
            yield base * (1 - self.jitter + 2 * self.jitter * uniform())
            delay *= self.multiplier


class RetryingTarget:
    """Retry the TransientTargetErrors of *inner* as *backoff* says; log what happens.

    Every operation of a Target is idempotent, so a failed one is simply run again. When
    the attempts run out, the last error is raised with the count in its message.
    """

    def __init__(
        self,
        inner: Target,
        backoff: Backoff | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        """Wrap *inner*; *sleep* and *uniform* are injectable for tests."""
        self.inner = inner
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self._uniform = uniform

    @property
    def name(self) -> str:
        """Return the wrapped remote's name."""
        return self.inner.name

    def _run(self, operation: str, remote_name: str | None, call: Callable[[], Result]) -> Result:
        delays = self.backoff.delays(self._uniform)
        attempt = 1
        while True:
            try:
                return call()
            except TransientTargetError as error:
                delay = next(delays, None)
                if delay is None:
                    self._failed(operation, remote_name, error, attempt)
                    raise TransientTargetError(
                        f"{error} (gave up after {plural(attempt, 'attempt')})"
                    ) from error
                log.info(
                    "target.retrying",
                    target=self.name,
                    operation=operation,
                    object=remote_name,
                    attempt=attempt,
                    delay_seconds=round(delay, 3),
                    error=str(error),
                )
                self._sleep(delay)
                attempt += 1
            except SovbackupdError as error:
                self._failed(operation, remote_name, error, attempt)
                raise

    def _failed(
        self, operation: str, remote_name: str | None, error: SovbackupdError, attempts: int
    ) -> None:
        # Info: the error goes up to the caller, which reports it once, as a warning
        # (the daemon's remote.pass_failed) or one line on the terminal (the CLI).
        log.info(
            f"target.{operation}_failed",
            target=self.name,
            object=remote_name,
            attempts=attempts,
            transient=isinstance(error, TransientTargetError),
            error=str(error),
        )

    def upload(
        self, local_path: Path, remote_name: str, *, sha256: str | None = None
    ) -> RemoteObject:
        """Upload, retrying transient failures."""
        return self._run(
            "upload",
            remote_name,
            lambda: self.inner.upload(local_path, remote_name, sha256=sha256),
        )

    def download(self, remote_name: str, local_path: Path) -> RemoteObject:
        """Download, retrying transient failures."""
        return self._run(
            "download", remote_name, lambda: self.inner.download(remote_name, local_path)
        )

    def list(self) -> Listing:
        """List, retrying transient failures."""
        return self._run("list", None, self.inner.list)

    def stat(self, remote_name: str) -> RemoteObject | None:
        """Stat, retrying transient failures."""
        return self._run("stat", remote_name, lambda: self.inner.stat(remote_name))

    def delete(self, remote_name: str) -> None:
        """Delete, retrying transient failures."""
        self._run("delete", remote_name, lambda: self.inner.delete(remote_name))
