"""GnuPG encryption of archive streams: nothing past this point sees plaintext.

Archives are encrypted by the real ``gpg`` binary (GnuPG 2.2 or later) while they stream,
so plain ``gpg --decrypt`` opens them on any machine and no plaintext is written to disk
on the way. The policy's :class:`~sovbackupd.config.models.Gpg` chooses the mode:

* a passphrase, from a file or a systemd credential: symmetric AES256;
* public-key recipients, whose keys are imported from an exported key file: the server
  then holds no secret that can read its backups, and a restore needs the secret key,
  which lives on the recovery machine.

Each operation runs gpg in a throwaway GNUPGHOME (a fresh 0700 temp dir, removed
afterwards), so no keyring of the host is read or changed. Only decryption with a secret key
starts a gpg-agent there, and it is shut down before the directory goes.
The passphrase reaches gpg through a pipe (``--passphrase-fd``) only: never through argv,
the environment of a child, or a log line. gpg's own compression is off: the payload is
compressed already.

gpg writes plaintext before it can check the integrity of what it decrypts, so a
decrypting stream reports a wrong key, damage or tampering when it reaches its end: what
was read from it is trustworthy only once the stream has ended without an error.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import structlog

from sovbackupd import untrusted
from sovbackupd.config.models import Gpg
from sovbackupd.errors import CryptoError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = structlog.get_logger("sovbackupd.crypto")

SUFFIX = ".gpg"
"""What an encrypted archive's file name ends with: ``<name>.tar.gz.gpg``."""
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
"""Where systemd puts the unit's credentials (LoadCredential=)."""
GPG = "gpg"
GPGCONF = "gpgconf"
CHUNK_BYTES = 1 << 20
PASSPHRASE_MAX_BYTES = 4096
S2K_COUNT = 65011712  # the largest iteration count OpenPGP can encode
HELPER_TIMEOUT_SECONDS = 60.0
"""Bound on key imports and on shutting the agent down; streams themselves have none."""
AGENT_EXIT_SECONDS = 5.0
THREAD_EXIT_SECONDS = 10.0
_STATUS = "[GNUPG:] "
_STDERR_MAX_BYTES = 1 << 20
_BAD_PASSPHRASE = 11  # GPG_ERR_BAD_PASSPHRASE, in the low 16 bits of gpg's error codes
_IMPORTED_SECRET = 16  # IMPORT_OK's flag for "contains a secret key"
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
_INVALID_RECIPIENT = {  # INV_RECP's reason codes, as gpg's DETAILS file lists them
    "1": "no public key for it in",
    "3": "its key cannot encrypt, in",
    "4": "its key is revoked in",
    "5": "its key has expired in",
}


class Sink(Protocol):
    """Where encrypted bytes go: a file, or an object that hashes and forwards them."""

    def write(self, data: bytes, /) -> int | None:
        """Take *data*; return how many bytes were taken (None: all of them)."""
        ...


class Source(Protocol):
    """Where encrypted bytes come from: a file, or a download stream."""

    def read(self, size: int = -1, /) -> bytes:
        """Return up to *size* bytes; b"" at the end."""
        ...


@dataclass(frozen=True)
class _Passphrase:
    """A passphrase that a traceback or a repr() cannot show."""

    value: bytes = field(repr=False)


def _first_line(path: Path, what: str) -> _Passphrase:
    """Read a passphrase as ``gpg --passphrase-file`` does: the first line, without its newline."""
    try:
        # A FIFO or a device here would block the backup or never end: refused.
        with untrusted.open_regular(path, follow_symlinks=True) as handle:
            line = handle.readline(PASSPHRASE_MAX_BYTES + 1)
    except (OSError, untrusted.NotRegularError) as error:
        reason = error.strerror if isinstance(error, OSError) else None
        raise CryptoError(f"cannot read {what} {path}: {reason or error}") from None
    passphrase = _Passphrase(line.removesuffix(b"\n"))
    if not passphrase.value:
        raise CryptoError(f"{what} {path} is empty: its first line must be the passphrase")
    if len(passphrase.value) > PASSPHRASE_MAX_BYTES:
        raise CryptoError(f"{what} {path}: the passphrase is over {PASSPHRASE_MAX_BYTES} bytes")
    return passphrase


def _passphrase(settings: Gpg) -> _Passphrase | None:
    """Return the symmetric passphrase of *settings*, or None when they name recipients."""
    if settings.passphrase_file is not None:
        return _first_line(settings.passphrase_file, "passphrase_file")
    if settings.passphrase_credential is not None:
        directory = os.environ.get(CREDENTIALS_ENV)
        if not directory:
            raise CryptoError(
                f"passphrase_credential {settings.passphrase_credential!r} needs "
                f"${CREDENTIALS_ENV}, which systemd sets for a unit with LoadCredential=; "
                "it is not set"
            )
        return _first_line(
            Path(directory) / settings.passphrase_credential, "passphrase_credential"
        )
    return None


def can_decrypt(settings: Gpg) -> bool:
    """Tell whether *settings* can decrypt what they encrypt: a passphrase, or a secret key.

    A server with public keys only cannot, by design: the recovery machine holds the key.
    """
    return not settings.recipients or settings.secret_keys_file is not None


def _label(stream: object) -> str:
    name = getattr(stream, "name", None)
    return name if isinstance(name, str) else "the archive stream"


def _environment(home: Path) -> dict[str, str]:
    # A minimal environment: nothing of ours (say, a secret an operator exported in the
    # unit) reaches gpg or the agent it starts, and gpg's messages stay in English.
    return {"PATH": os.environ.get("PATH", os.defpath), "GNUPGHOME": str(home), "LC_ALL": "C"}


def _gpg_argv(home: Path, *, agent: bool) -> list[str]:
    """Return gpg's argv up to the command; *agent*: may gpg start a gpg-agent (secret keys)."""
    argv = [
        GPG,
        "--homedir",
        str(home),
        "--batch",
        "--no-tty",
        "--status-fd",
        "2",  # status lines go to stderr with the messages; they are parsed, not shown
        "--pinentry-mode",
        "loopback",
        "--no-symkey-cache",
    ]
    # Only secret keys need an agent; without one there is nothing to stop afterwards.
    return argv if agent else [*argv, "--no-autostart"]


@dataclass(frozen=True)
class _Report:
    """What gpg said on stderr: its status lines (parsed) and its messages."""

    returncode: int
    status: tuple[tuple[str, ...], ...]
    messages: tuple[str, ...]

    @classmethod
    def parse(cls, text: bytes, returncode: int) -> _Report:
        status: list[tuple[str, ...]] = []
        messages: list[str] = []
        for line in text.decode(errors="replace").splitlines():
            if line.startswith(_STATUS):
                status.append(tuple(line.removeprefix(_STATUS).split()))
            elif line.startswith("gpg: "):
                messages.append(line.removeprefix("gpg: ").strip())
        return cls(returncode, tuple(status), tuple(messages))

    @classmethod
    def read(cls, stderr: IO[bytes], returncode: int) -> _Report:
        stderr.seek(0)
        return cls.parse(stderr.read(_STDERR_MAX_BYTES), returncode)

    def has(self, keyword: str) -> bool:
        return any(line[:1] == (keyword,) for line in self.status)

    def arguments(self, keyword: str) -> list[tuple[str, ...]]:
        return [line[1:] for line in self.status if line[:1] == (keyword,)]

    def reason(self) -> str:
        """Say in a few words why gpg failed, from its own messages."""
        if self.returncode < 0:
            try:
                return f"gpg was killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"gpg was killed by signal {-self.returncode}"
        telling = [
            message
            for message in self.messages
            if any(word in message.lower() for word in ("fail", "error", "skipped", "invalid"))
        ]
        if telling or self.messages:
            return (telling or list(self.messages))[-1]
        return f"gpg exited with status {self.returncode}"


def _run_helper(argv: list[str], home: Path, stdin: IO[bytes] | None = None) -> _Report:
    try:
        completed = subprocess.run(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env=_environment(home),
            timeout=HELPER_TIMEOUT_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        raise CryptoError(
            f"{argv[0]} is not installed; encryption needs GnuPG 2.2 or later"
        ) from None
    except subprocess.TimeoutExpired:
        raise CryptoError(f"{argv[0]} did not finish in {HELPER_TIMEOUT_SECONDS:.0f}s") from None
    return _Report.parse(completed.stderr, completed.returncode)


def _import(home: Path, path: Path, setting: str, *, secret: bool) -> None:
    """Import the keys in *path* (the policy's *setting*) into the keyring at *home*.

    With *secret*, a secret key must be among them (gpg-agent keeps it).
    """
    try:
        keys = untrusted.open_regular(path, follow_symlinks=True)  # never a FIFO: see there
    except (OSError, untrusted.NotRegularError) as error:
        reason = error.strerror if isinstance(error, OSError) else None
        raise CryptoError(f"cannot read {setting} {path}: {reason or error}") from None
    with keys:
        report = _run_helper([*_gpg_argv(home, agent=secret), "--import"], home, stdin=keys)
    reasons = [
        int(arguments[0])
        for arguments in report.arguments("IMPORT_OK")
        if arguments and arguments[0].isdigit()
    ]
    if secret and not any(reason & _IMPORTED_SECRET for reason in reasons):
        raise CryptoError(
            f"{setting} {path} holds no secret key gpg could import: {report.reason()}"
        )
    if not reasons:
        raise CryptoError(f"{setting} {path} holds no key gpg could import: {report.reason()}")


def _run_user_dir() -> Path:
    """Return where gpg puts agent sockets when it exists, instead of in GNUPGHOME."""
    return Path(f"/run/user/{os.getuid()}")


def _stop_agent(home: Path) -> None:
    """Shut down the gpg-agent that gpg started for *home*, and wait until it is gone."""
    try:
        report = _run_helper([GPGCONF, "--homedir", str(home), "--kill", "all"], home)
    except CryptoError as error:
        log.warning("crypto.agent_stop_failed", home=str(home), error=str(error))
        return
    if report.returncode != 0:
        log.warning("crypto.agent_stop_failed", home=str(home), error=report.reason())
        return
    # The agent removes its socket as it exits; removing the home before that races it.
    socket = home / "S.gpg-agent"
    deadline = time.monotonic() + AGENT_EXIT_SECONDS
    while socket.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if _run_user_dir().is_dir():
        # There gpg puts the sockets in /run/user/UID/gnupg/d.HASH instead, one directory
        # per home: without this, every backup would leave one behind.
        with contextlib.suppress(CryptoError):
            _run_helper([GPGCONF, "--homedir", str(home), "--remove-socketdir"], home)


@contextmanager
def _isolated_home(*, agent: bool) -> Iterator[Path]:
    """Yield a fresh, empty GNUPGHOME (0700); stop its *agent* and remove it afterwards."""
    home = Path(tempfile.mkdtemp(prefix="sovbackupd-gnupg-"))
    if (
        agent
        and not _run_user_dir().is_dir()
        and len(str(home / "S.gpg-agent.browser")) > _SOCKET_PATH_MAX
    ):
        home.rmdir()
        # gpg-agent would fail to bind its sockets there, and gpg would then only say
        # "no secret key".
        raise CryptoError(
            f"the temp directory {home.parent} is too long a path for gpg-agent's sockets; "
            "set TMPDIR to a shorter one"
        )
    try:
        yield home
    finally:
        if agent:
            _stop_agent(home)
        shutil.rmtree(home, ignore_errors=True)


def _spawn(
    home: Path,
    arguments: list[str],
    passphrase: _Passphrase | None,
    stderr: IO[bytes],
    *,
    agent: bool,
) -> subprocess.Popen[bytes]:
    """Start gpg in *home* with its stdin and stdout as pipes, stderr into *stderr*."""
    argv = _gpg_argv(home, agent=agent)
    pass_fds: tuple[int, ...] = ()
    passphrase_read = None
    if passphrase is not None:
        passphrase_read, passphrase_write = os.pipe()
        try:
            # Far below the pipe's capacity, so this returns before gpg reads it.
            os.write(passphrase_write, passphrase.value + b"\n")
        finally:
            os.close(passphrase_write)
        argv += ["--passphrase-fd", str(passphrase_read)]
        pass_fds = (passphrase_read,)
    try:
        return subprocess.Popen(
            [*argv, *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_environment(home),
            pass_fds=pass_fds,
            bufsize=0,
            # Its own session: a Ctrl-C reaches us, and we stop gpg, not the terminal.
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CryptoError(f"{GPG} is not installed; encryption needs GnuPG 2.2 or later") from None
    finally:
        if passphrase_read is not None:
            os.close(passphrase_read)


def _write_all(sink: Sink, data: bytes) -> None:
    while data:
        written = sink.write(data)
        if written is None:
            return
        data = data[written:]  # a copy, but only after a short write (a signal)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    process.wait()


class _GpgStream(io.RawIOBase):
    """One end of a running gpg, seen as a stream; a thread works the other end."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        stderr: IO[bytes],
        describe: Callable[[_Report], str],
        thread_name: str,
    ) -> None:
        super().__init__()
        assert process.stdin is not None  # noqa: S101 (stdin=PIPE)
        assert process.stdout is not None  # noqa: S101 (stdout=PIPE)
        self._process = process
        self._input = process.stdin
        self._output = process.stdout
        self._stderr = stderr
        self._describe = describe
        self._peer_error: BaseException | None = None  # raised by the thread's end
        self.failure: BaseException | None = None
        self._finished = False
        self._abandoned = False
        self.plain_bytes = 0
        self.stored_bytes = 0
        self._thread = threading.Thread(target=self._pump, name=thread_name, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        raise NotImplementedError

    def _conclude(self, report: _Report, succeeded: bool) -> None:
        """Record the failure, the thread's end's first, then gpg's; raise it."""
        if self._peer_error is not None:
            self.failure = self._peer_error
        elif not succeeded:
            self.failure = CryptoError(self._describe(report))
        if self.failure is not None:
            raise self.failure

    def check(self) -> None:
        """Raise the failure seen so far, if any."""
        if self.failure is not None:
            raise self.failure


class _Encryptor(_GpgStream):
    """gpg's stdin: what is written here comes out of gpg, encrypted, into the sink.

    A thread moves gpg's output into the sink, which may be a Python object (hashing,
    uploading) rather than a file descriptor gpg could write to itself.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        stderr: IO[bytes],
        sink: Sink,
        describe: Callable[[_Report], str],
    ) -> None:
        self._sink = sink  # before the thread starts
        super().__init__(process, stderr, describe, "gpg-output")

    def _pump(self) -> None:
        try:
            while chunk := self._output.read(CHUNK_BYTES):
                _write_all(self._sink, chunk)
                self.stored_bytes += len(chunk)
        except BaseException as error:  # handed to the writing thread
            self._peer_error = error
            # gpg blocks on its full stdout once nobody reads it: stopping it wakes the
            # writer, which then raises this error.
            _stop(self._process)
        finally:
            self._output.close()

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        if self._abandoned:
            # Discarded: the buffered writer above still flushes, into a stopped gpg.
            return memoryview(data).nbytes
        if self._finished:
            raise self.failure or ValueError("write to a finished encryption")
        try:
            written = self._input.write(data)
        except BrokenPipeError:
            self._finish()
            raise CryptoError("gpg stopped reading before the end of the data") from None
        self.plain_bytes += written or 0
        return written or 0

    def _finish(self) -> None:
        """End gpg's input and wait for it; raise (once) what went wrong."""
        self._finished = True
        with contextlib.suppress(BrokenPipeError):
            self._input.close()
        self._thread.join()
        returncode = self._process.wait()
        report = _Report.read(self._stderr, returncode)
        self._conclude(report, returncode == 0 and report.has("END_ENCRYPTION"))

    def abandon(self) -> None:
        """Stop gpg and the thread without waiting for the output to end."""
        self._abandoned = True
        _stop(self._process)
        with contextlib.suppress(OSError):
            self._input.close()
        self._thread.join(THREAD_EXIT_SECONDS)

    def close(self) -> None:
        """Finish the encryption (raising on failure) unless it ended already."""
        if self.closed:
            return
        try:
            if not self._abandoned and not self._finished:
                self._finish()
        finally:
            super().close()


class _Decryptor(_GpgStream):
    """gpg's stdout: plaintext decrypted from the source, which a thread feeds to gpg."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        stderr: IO[bytes],
        source: Source,
        describe: Callable[[_Report], str],
    ) -> None:
        self._source = source  # before the thread starts
        super().__init__(process, stderr, describe, "gpg-input")

    def _pump(self) -> None:
        try:
            while chunk := self._source.read(CHUNK_BYTES):
                _write_all(self._input, chunk)
                self.stored_bytes += len(chunk)
        except BrokenPipeError:
            pass  # gpg stopped reading: it failed, and its status says why
        except BaseException as error:  # handed to the reading thread
            self._peer_error = error
            _stop(self._process)
        finally:
            with contextlib.suppress(OSError):
                self._input.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        if self._abandoned:
            raise ValueError("read from an abandoned decryption")
        if self._finished:
            if self.failure is not None:
                raise self.failure
            return 0
        count = os.readv(self._output.fileno(), [buffer])
        if count == 0:
            self._finish()
        self.plain_bytes += count
        return count

    def _finish(self) -> None:
        """Wait for gpg and the feeding thread; raise what went wrong."""
        self._finished = True
        self._output.close()
        self._thread.join()
        returncode = self._process.wait()
        report = _Report.read(self._stderr, returncode)
        self._conclude(
            report,
            returncode == 0
            # An OpenPGP file need not be encrypted at all (gpg --store); that is no backup.
            and report.has("DECRYPTION_OKAY")
            and not report.has("BADMDC")
            and not report.has("DECRYPTION_FAILED"),
        )

    def abandon(self) -> None:
        """Stop gpg and the thread without reading to the end."""
        self._abandoned = True
        _stop(self._process)
        with contextlib.suppress(OSError):
            self._output.close()
        self._thread.join(THREAD_EXIT_SECONDS)

    def close(self) -> None:
        """Stop gpg if it is still running; reading to the end is the caller's part."""
        if not self.closed and not self._finished:
            self.abandon()
        super().close()


def _encrypt_problem(report: _Report, settings: Gpg, label: str) -> str:
    if invalid := report.arguments("INV_RECP"):
        problems = [
            f"{arguments[1] if len(arguments) > 1 else '?'}: "
            f"{_INVALID_RECIPIENT.get(arguments[0], 'its key is unusable in')} "
            f"{settings.public_keys_file}"
            for arguments in invalid
        ]
        return f"cannot encrypt {label} to recipient {'; '.join(problems)}"
    return f"cannot encrypt {label}: {report.reason()}"


def _error_code(arguments: tuple[str, ...]) -> int | None:
    code = arguments[1].split("_", 1)[0] if len(arguments) > 1 else ""
    return int(code) & 0xFFFF if code.isdigit() else None


def _decrypt_problem(
    report: _Report, settings: Gpg, keys_file: Path | None, label: str, unlocked: bool
) -> str:
    errors = report.arguments("ERROR")
    if report.returncode < 0:
        return f"cannot decrypt {label}: {report.reason()}"
    if report.has("NODATA") and not report.has("BEGIN_DECRYPTION"):
        return f"{label} is not an OpenPGP file (not encrypted by gpg, or damaged at its start)"
    if report.has("BAD_PASSPHRASE") or any(
        arguments[0].startswith("symkey_decrypt") and _error_code(arguments) == _BAD_PASSPHRASE
        for arguments in errors
    ):
        return f"wrong passphrase for {label}"
    if any(
        arguments[0] == "pkdecrypt_failed" and _error_code(arguments) == _BAD_PASSPHRASE
        for arguments in errors
    ):
        return (
            f"wrong passphrase for the secret key that opens {label} "
            f"(secret_key_passphrase_file {settings.secret_key_passphrase_file})"
        )
    if report.has("NEED_PASSPHRASE") and not unlocked:
        return (
            f"the secret key that opens {label} has a passphrase: "
            "set encryption.gpg.secret_key_passphrase_file"
        )
    if report.has("NO_SECKEY") and not report.has("DECRYPTION_KEY"):
        key_ids = ", ".join(arguments[0] for arguments in report.arguments("ENC_TO"))
        if settings.recipients:
            return f"no secret key for {label}: {keys_file} holds none of its keys ({key_ids})"
        return (
            f"no secret key for {label}: it is encrypted to public keys ({key_ids}), not with "
            "a passphrase"
        )
    if report.has("NEED_PASSPHRASE_SYM") and settings.recipients:
        return (
            f"{label} is encrypted with a passphrase, not to public keys: decrypting it "
            "needs passphrase_file or passphrase_credential"
        )
    if report.has("BADMDC") or report.has("DECRYPTION_FAILED"):
        return f"{label} is damaged or was tampered with: gpg's integrity check failed"
    if report.returncode == 0 and not report.has("DECRYPTION_OKAY"):
        return f"{label} is not encrypted: gpg found no encrypted data in it"
    return f"cannot decrypt {label}: {report.reason()}"


def _mode(settings: Gpg) -> str:
    return "public-key" if settings.recipients else "passphrase"


@contextmanager
def encrypting(sink: Sink, settings: Gpg, *, name: str | None = None) -> Iterator[IO[bytes]]:
    """Yield a writable stream whose bytes are encrypted by gpg into *sink*.

    Leaving the block ends the input and waits for gpg: on failure it raises
    :class:`CryptoError` with one line naming the stream (*name*, else *sink*'s file
    name). An error raised by *sink* itself (a full disk) is raised unchanged, from a
    write or from leaving the block. An exception inside the block stops gpg and is
    raised as it is. Either way no gpg, agent, thread or GNUPGHOME is left behind. What
    *sink* received is the complete ``.gpg`` file only when the block ended cleanly.
    """
    label = name or _label(sink)
    passphrase = _passphrase(settings)
    started = time.monotonic()
    with _isolated_home(agent=False) as home, tempfile.TemporaryFile(dir=home) as stderr:
        if passphrase is None:
            # Checked by the model; kept for the type checker.
            assert settings.public_keys_file is not None  # noqa: S101
            _import(home, settings.public_keys_file, "public_keys_file", secret=False)
            # The keys come from the operator's own export: trust them as given.
            mode = ["--encrypt", "--trust-model", "always"]
            for recipient in settings.recipients:
                mode += ["--recipient", recipient]
        else:
            # The strongest iterated and salted key derivation OpenPGP can express; naming
            # it also spares gpg asking an agent to calibrate one.
            mode = [
                "--symmetric",
                "--cipher-algo",
                "AES256",
                "--s2k-mode",
                "3",
                "--s2k-digest-algo",
                "SHA512",
                "--s2k-count",
                str(S2K_COUNT),
            ]
        arguments = [*mode, "--compress-algo", "none", "--output", "-"]
        process = _spawn(home, arguments, passphrase, stderr, agent=False)
        encryptor = _Encryptor(
            process, stderr, sink, lambda report: _encrypt_problem(report, settings, label)
        )
        stream = io.BufferedWriter(encryptor, CHUNK_BYTES)
        try:
            yield stream
            stream.close()
            # The block may have caught a failed write and carried on: it still failed.
            encryptor.check()
        except BaseException:
            encryptor.abandon()
            with contextlib.suppress(Exception):
                stream.close()
            raise
    log.info(
        "crypto.encrypted",
        archive=label,
        mode=_mode(settings),
        plain_bytes=encryptor.plain_bytes,
        stored_bytes=encryptor.stored_bytes,
        duration_seconds=round(time.monotonic() - started, 3),
    )


@contextmanager
def decrypting(
    source: Source,
    settings: Gpg,
    secret_keys_file: Path | None = None,
    *,
    name: str | None = None,
) -> Iterator[IO[bytes]]:
    """Yield a readable stream of the plaintext that gpg decrypts from *source*.

    With a passphrase in *settings* it opens what :func:`encrypting` wrote with it. With
    recipients it needs a secret key: *secret_keys_file*, else the policy's
    ``secret_keys_file`` (unlocked by ``secret_key_passphrase_file`` if it has a
    passphrase). A wrong passphrase, a missing key, damage or tampering raise
    :class:`CryptoError` with one line naming the stream (*name*, else *source*'s file
    name) from the read that reaches the end. Leaving the block reads what is left and
    checks it too, so a reader that stops early still learns of a bad archive. Errors of
    *source* itself are raised unchanged.
    """
    label = name or _label(source)
    passphrase = _passphrase(settings)
    secret_keys = passphrase is None
    unlocked = not secret_keys  # a passphrase goes to gpg, for the file or for the key
    keys_file = secret_keys_file or settings.secret_keys_file
    if secret_keys and keys_file is None:
        raise CryptoError(
            f"no secret key to decrypt {label}: set encryption.gpg.secret_keys_file "
            "on the recovery machine"
        )
    started = time.monotonic()
    with _isolated_home(agent=secret_keys) as home, tempfile.TemporaryFile(dir=home) as stderr:
        if keys_file is not None and secret_keys:
            _import(home, keys_file, "secret_keys_file", secret=True)
            if settings.secret_key_passphrase_file is not None:
                passphrase = _first_line(
                    settings.secret_key_passphrase_file, "secret_key_passphrase_file"
                )
                unlocked = True
        process = _spawn(
            home, ["--decrypt", "--output", "-"], passphrase, stderr, agent=secret_keys
        )
        decryptor = _Decryptor(
            process,
            stderr,
            source,
            lambda report: _decrypt_problem(report, settings, keys_file, label, unlocked),
        )
        stream = io.BufferedReader(decryptor, CHUNK_BYTES)
        try:
            yield stream
            while stream.read(CHUNK_BYTES):
                pass
            decryptor.check()
            stream.close()
        except BaseException:
            decryptor.abandon()
            with contextlib.suppress(Exception):
                stream.close()
            raise
    log.info(
        "crypto.decrypted",
        archive=label,
        mode=_mode(settings),
        plain_bytes=decryptor.plain_bytes,
        stored_bytes=decryptor.stored_bytes,
        duration_seconds=round(time.monotonic() - started, 3),
    )
