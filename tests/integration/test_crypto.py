"""Encryption on the real gpg binary: round trips, plain gpg, clear failures, no leaks.

Every throwaway GNUPGHOME of a test lands in one short scratch directory, so a test can
watch the gpg and gpg-agent processes working there and check that nothing outlives it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from structlog.testing import capture_logs

from sovbackupd import crypto
from sovbackupd.config.models import Gpg
from sovbackupd.errors import CryptoError, ExitCode
from tests.conftest import require_tool

PASSPHRASE = "correct horse battery staple 7f3a9c"  # noqa: S105 (a test's passphrase)
KEY_PASSPHRASE = "unlock the recovery key 51d0"  # noqa: S105 (a test's passphrase)
CREDENTIAL = "backup-passphrase"
MIB = 1 << 20


@dataclass(frozen=True)
class GpgKey:
    """A key pair exported to files, as an operator would hand them over."""

    fingerprint: str
    public_file: Path
    secret_file: Path


def _run(argv: list[str], stdin_data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin_data, capture_output=True, check=True, timeout=120)


def _generate_key(directory: Path, uid: str, passphrase: str) -> GpgKey:
    gpg = require_tool("gpg")
    home = directory / "home"
    home.mkdir(mode=0o700)
    base = [gpg, "--homedir", str(home), "--batch", "--pinentry-mode", "loopback"]
    secret = [*base, "--passphrase", passphrase]  # empty: no protection
    try:
        _run([*secret, "--quick-generate-key", uid, "future-default", "default", "never"])
        colons = _run([*base, "--with-colons", "--list-keys"]).stdout.decode()
        fingerprint = next(
            line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:")
        )
        public_file = directory / "public.asc"
        public_file.write_bytes(_run([*base, "--armor", "--export", fingerprint]).stdout)
        secret_file = directory / "secret.asc"
        secret_file.write_bytes(
            _run([*secret, "--armor", "--export-secret-keys", fingerprint]).stdout
        )
    finally:
        subprocess.run(
            [require_tool("gpgconf"), "--homedir", str(home), "--kill", "all"],
            check=False,
            timeout=60,
        )
    return GpgKey(fingerprint, public_file, secret_file)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> GpgKey:
    """A recipient key pair whose secret key has no passphrase."""
    return _generate_key(tmp_path_factory.mktemp("key"), "sovbackupd test <t@example.invalid>", "")


@pytest.fixture(scope="module")
def protected_key(tmp_path_factory: pytest.TempPathFactory) -> GpgKey:
    """A recipient key pair whose secret key is locked with KEY_PASSPHRASE."""
    return _generate_key(
        tmp_path_factory.mktemp("protected-key"),
        "sovbackupd recovery <r@example.invalid>",
        KEY_PASSPHRASE,
    )


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Make every throwaway GNUPGHOME of this test land in one directory we can watch."""
    assert tmp_path.is_dir()  # created before tempfile's directory moves, and outside it
    require_tool("gpg")
    require_tool("gpgconf")
    # Short, unlike tmp_path: gpg-agent's socket paths must fit in 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="sbd-crypto-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def operator_home(tmp_path: Path) -> Iterator[Path]:
    """An operator's own GNUPGHOME for plain gpg commands; its agent is stopped afterwards."""
    home = tmp_path / "operator-gnupg"
    home.mkdir(mode=0o700)
    yield home
    subprocess.run(
        [require_tool("gpgconf"), "--homedir", str(home), "--kill", "all"], check=False, timeout=60
    )


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    """A passphrase file as an operator writes one: the passphrase, a newline, a comment."""
    path = tmp_path / "passphrase"
    path.write_text(f"{PASSPHRASE}\nthe first line is the passphrase\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def symmetric(passphrase_file: Path) -> Gpg:
    return Gpg(passphrase_file=passphrase_file)


def _processes(scratch: Path) -> dict[int, str]:
    """Return the live processes (pid: name) working in a GNUPGHOME below *scratch*."""
    found: dict[int, str] = {}
    marker = str(scratch).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2 :].split()[0]
        if state not in {"Z", "X"} and marker in cmdline:
            found[int(entry.name)] = (entry / "comm").read_text().strip()
    return found


def _crypto_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("gpg-")]


def assert_nothing_left(scratch: Path) -> None:
    """No GNUPGHOME, gpg, gpg-agent or pump thread outlives an operation."""
    assert list(scratch.iterdir()) == []
    assert _crypto_threads() == []
    deadline = time.monotonic() + 5
    while _processes(scratch) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes(scratch) == {}


def _gpg_pid(scratch: Path) -> int:
    (pid,) = [pid for pid, name in _processes(scratch).items() if name == "gpg"]
    return pid


def encrypt_bytes(data: bytes, settings: Gpg, chunk: int = 256 * 1024) -> bytes:
    sink = io.BytesIO()
    with crypto.encrypting(sink, settings, name="test.tar.gz.gpg") as stream:
        for offset in range(0, len(data), chunk):
            stream.write(data[offset : offset + chunk])
    return sink.getvalue()


def decrypt_bytes(data: bytes, settings: Gpg, secret_keys_file: Path | None = None) -> bytes:
    with crypto.decrypting(
        io.BytesIO(data), settings, secret_keys_file, name="test.tar.gz.gpg"
    ) as stream:
        return stream.read()


def _decrypt_error(data: bytes, settings: Gpg, secret_keys_file: Path | None = None) -> str:
    with pytest.raises(CryptoError) as caught:
        decrypt_bytes(data, settings, secret_keys_file)
    assert caught.value.exit_code == ExitCode.FAILURE
    return str(caught.value)


def _random_tar_gz(path: Path, tmp_path: Path) -> list[str]:
    """Write a real .tar.gz with tarfile, as a backup would look; return its member names."""
    top = tmp_path / "sovereigncore_backup_20260102_140000"
    (top / "data").mkdir(parents=True)
    (top / "redis_dump.rdb").write_bytes(os.urandom(2 * MIB))
    (top / "data" / "notes.txt").write_text("hello\n" * 1000)
    (top / "manifest.json").write_text("{}")
    with tarfile.open(path, "w:gz") as archive:
        archive.add(top, arcname=top.name)
    with tarfile.open(path, "r:gz") as archive:
        return archive.getnames()


def test_passphrase_round_trip_of_a_large_stream_is_byte_identical(
    tmp_path: Path, symmetric: Gpg, scratch: Path
) -> None:
    """20 MiB of random bytes, written in odd chunks to a file, decrypt to the same bytes."""
    data = os.urandom(20 * MIB)
    archive = tmp_path / "big.tar.gz.gpg"
    with archive.open("wb") as sink, crypto.encrypting(sink, symmetric) as stream:
        for offset in range(0, len(data), 999_983):
            stream.write(data[offset : offset + 999_983])
    assert archive.stat().st_size > len(data)  # not compressed by gpg: random data stays put
    digest = hashlib.sha256()
    with archive.open("rb") as source, crypto.decrypting(source, symmetric) as stream:
        while chunk := stream.read(65_537):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert_nothing_left(scratch)


def test_plain_gpg_decrypt_opens_the_archive_and_tar_lists_it(
    tmp_path: Path, symmetric: Gpg, passphrase_file: Path, operator_home: Path
) -> None:
    """`gpg --batch --decrypt ... | tar -tzf -` lists an encrypted tar.gz, as the seed says."""
    plain = tmp_path / "sovereigncore_backup_20260102_140000.tar.gz"
    names = _random_tar_gz(plain, tmp_path)
    archive = plain.with_name(plain.name + crypto.SUFFIX)
    with archive.open("wb") as sink, crypto.encrypting(sink, symmetric) as stream:
        stream.write(plain.read_bytes())
    listing = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            'gpg --batch --pinentry-mode loopback --passphrase-file "$1" --decrypt "$2" '
            "| tar -tzf -",
            "bash",
            str(passphrase_file),
            str(archive),
        ],
        env={**os.environ, "GNUPGHOME": str(operator_home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert [name.rstrip("/") for name in listing.stdout.splitlines()] == names


def test_passphrase_mode_is_aes256_with_integrity_and_no_gpg_compression(
    symmetric: Gpg, passphrase_file: Path, operator_home: Path, tmp_path: Path
) -> None:
    """The archive is AES256 (algo 9) with an MDC, and holds no compressed packet."""
    archive = tmp_path / "small.tar.gz.gpg"
    archive.write_bytes(encrypt_bytes(b"payload " * 1000, symmetric))
    common = [
        require_tool("gpg"),
        "--homedir",
        str(operator_home),
        "--batch",
        "--pinentry-mode",
        "loopback",
        "--passphrase-file",
        str(passphrase_file),
    ]
    decrypted = _run([*common, "--status-fd", "2", "--decrypt", str(archive)])
    assert decrypted.stdout == b"payload " * 1000
    status = decrypted.stderr.decode()
    assert "[GNUPG:] DECRYPTION_INFO 2 9" in status  # 2: MDC, 9: AES256
    assert "[GNUPG:] GOODMDC" in status
    packets = _run([*common, "--list-packets", str(archive)]).stdout.decode()
    assert ":symkey enc packet: version 4, cipher 9" in packets
    assert "compressed packet" not in packets


def test_public_key_round_trip_needs_only_the_public_key_to_encrypt(
    key: GpgKey, scratch: Path
) -> None:
    """Encrypting takes only public keys; the exported secret key decrypts it again."""
    settings = Gpg(recipients=[key.fingerprint], public_keys_file=key.public_file)
    data = os.urandom(5 * MIB)
    encrypted = encrypt_bytes(data, settings)
    assert_nothing_left(scratch)
    assert decrypt_bytes(encrypted, settings, key.secret_file) == data
    with_key = settings.model_copy(update={"secret_keys_file": key.secret_file})
    assert decrypt_bytes(encrypted, with_key) == data
    assert_nothing_left(scratch)


def test_plain_gpg_decrypts_public_key_output_with_the_secret_key(
    key: GpgKey, operator_home: Path
) -> None:
    """An operator who imports the secret key opens an archive with plain gpg --decrypt."""
    settings = Gpg(recipients=[key.fingerprint], public_keys_file=key.public_file)
    encrypted = encrypt_bytes(b"disaster recovery" * 100, settings)
    gpg = [require_tool("gpg"), "--homedir", str(operator_home), "--batch"]
    _run([*gpg, "--import", str(key.secret_file)])
    assert _run([*gpg, "--decrypt"], stdin_data=encrypted).stdout == b"disaster recovery" * 100


def test_decrypting_public_key_archives_without_a_secret_key_says_so(key: GpgKey) -> None:
    """With recipients and no secret_keys_file, decryption names the missing setting."""
    settings = Gpg(recipients=[key.fingerprint], public_keys_file=key.public_file)
    encrypted = encrypt_bytes(b"x" * 1000, settings)
    message = _decrypt_error(encrypted, settings)
    assert message == (
        "no secret key to decrypt test.tar.gz.gpg: set encryption.gpg.secret_keys_file "
        "on the recovery machine"
    )


def test_the_wrong_secret_key_is_reported_with_the_key_ids(
    key: GpgKey, protected_key: GpgKey
) -> None:
    """A secret key file holding none of the recipients' keys gives 'no secret key'."""
    settings = Gpg(recipients=[key.fingerprint], public_keys_file=key.public_file)
    encrypted = encrypt_bytes(b"x" * 1000, settings)
    message = _decrypt_error(encrypted, settings, protected_key.secret_file)
    assert message.startswith(
        f"no secret key for test.tar.gz.gpg: {protected_key.secret_file} holds none of its keys"
    )


def test_protected_secret_key_is_unlocked_by_its_passphrase_file(
    protected_key: GpgKey, tmp_path: Path, scratch: Path
) -> None:
    """A locked recovery key needs secret_key_passphrase_file; a wrong one is named."""
    settings = Gpg(
        recipients=[protected_key.fingerprint],
        public_keys_file=protected_key.public_file,
        secret_keys_file=protected_key.secret_file,
    )
    data = os.urandom(MIB)
    encrypted = encrypt_bytes(data, settings)
    assert _decrypt_error(encrypted, settings) == (
        "the secret key that opens test.tar.gz.gpg has a passphrase: "
        "set encryption.gpg.secret_key_passphrase_file"
    )
    wrong = tmp_path / "wrong-key-passphrase"
    wrong.write_text("not it\n")
    assert _decrypt_error(
        encrypted, settings.model_copy(update={"secret_key_passphrase_file": wrong})
    ) == (
        "wrong passphrase for the secret key that opens test.tar.gz.gpg "
        f"(secret_key_passphrase_file {wrong})"
    )
    right = tmp_path / "key-passphrase"
    right.write_text(KEY_PASSPHRASE + "\n")
    unlocked = settings.model_copy(update={"secret_key_passphrase_file": right})
    assert decrypt_bytes(encrypted, unlocked) == data
    assert_nothing_left(scratch)


def test_wrong_passphrase_fails_with_a_clear_message(
    tmp_path: Path, symmetric: Gpg, scratch: Path
) -> None:
    """Decrypting with another passphrase names the file and says the passphrase is wrong."""
    archive = tmp_path / "sovereigncore_backup_20260102_140000.tar.gz.gpg"
    archive.write_bytes(encrypt_bytes(os.urandom(MIB), symmetric))
    other = tmp_path / "other-passphrase"
    other.write_text("not the passphrase\n")
    with (
        pytest.raises(CryptoError) as caught,
        archive.open("rb") as source,
        crypto.decrypting(source, Gpg(passphrase_file=other)) as stream,
    ):
        stream.read()
    assert str(caught.value) == f"wrong passphrase for {archive}"
    assert_nothing_left(scratch)


def test_archive_of_the_other_mode_says_which_secret_it_needs(symmetric: Gpg, key: GpgKey) -> None:
    """A passphrase cannot open a public-key archive, nor a secret key a passphrase one."""
    public = Gpg(
        recipients=[key.fingerprint],
        public_keys_file=key.public_file,
        secret_keys_file=key.secret_file,
    )
    assert _decrypt_error(encrypt_bytes(b"x" * 1000, public), symmetric).startswith(
        "no secret key for test.tar.gz.gpg: it is encrypted to public keys ("
    )
    assert _decrypt_error(encrypt_bytes(b"x" * 1000, symmetric), public) == (
        "test.tar.gz.gpg is encrypted with a passphrase, not to public keys: decrypting it "
        "needs passphrase_file or passphrase_credential"
    )


def test_unknown_recipient_is_named(key: GpgKey) -> None:
    """A recipient missing from public_keys_file fails encryption with its name and the file."""
    settings = Gpg(recipients=["0123456789ABCDEF"], public_keys_file=key.public_file)
    with pytest.raises(CryptoError) as caught:
        encrypt_bytes(os.urandom(MIB), settings)
    assert str(caught.value) == (
        "cannot encrypt test.tar.gz.gpg to recipient 0123456789ABCDEF: "
        f"no public key for it in {key.public_file}"
    )


def test_unreadable_public_keys_file_is_named(tmp_path: Path) -> None:
    """A missing or keyless public_keys_file is an error naming the setting and path."""
    missing = tmp_path / "missing.asc"
    with pytest.raises(CryptoError, match=f"cannot read public_keys_file {missing}: No such"):
        encrypt_bytes(b"x", Gpg(recipients=["ABCD"], public_keys_file=missing))
    garbage = tmp_path / "garbage.asc"
    garbage.write_text("not a key\n")
    with pytest.raises(CryptoError, match=f"public_keys_file {garbage} holds no key"):
        encrypt_bytes(b"x", Gpg(recipients=["ABCD"], public_keys_file=garbage))


def test_passphrase_never_reaches_argv_environment_or_logs(
    symmetric: Gpg,
    protected_key: GpgKey,
    tmp_path: Path,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While gpg runs, neither passphrase is in any gpg or agent argv or environment, nor logged."""
    # Even a passphrase an operator exported by mistake stays out of the children.
    monkeypatch.setenv("SOVBACKUPD_LEAK_CANARY", PASSPHRASE)
    key_passphrase_file = tmp_path / "key-passphrase"
    key_passphrase_file.write_text(KEY_PASSPHRASE + "\n")
    recipients = Gpg(
        recipients=[protected_key.fingerprint],
        public_keys_file=protected_key.public_file,
        secret_keys_file=protected_key.secret_file,
        secret_key_passphrase_file=key_passphrase_file,
    )
    secrets = [PASSPHRASE.encode(), KEY_PASSPHRASE.encode()]
    inspected: list[str] = []

    def inspect_children() -> None:
        processes = _processes(scratch)
        assert "gpg" in processes.values()
        for pid, name in processes.items():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert f"--homedir\0{scratch}".encode() in cmdline  # it is ours
            for secret in secrets:
                assert secret not in cmdline
                assert secret not in environ
            if name == "gpg":
                names = {item.split(b"=", 1)[0] for item in environ.split(b"\0") if item}
                assert names == {b"PATH", b"GNUPGHOME", b"LC_ALL"}
            inspected.append(name)

    data = os.urandom(4 * MIB)
    with capture_logs() as logs:
        for settings in (symmetric, recipients):
            sink = io.BytesIO()
            with crypto.encrypting(sink, settings) as stream:
                stream.write(data[: 2 * MIB])
                stream.flush()
                inspect_children()
                stream.write(data[2 * MIB :])
            with crypto.decrypting(io.BytesIO(sink.getvalue()), settings) as stream:
                assert stream.read(MIB) == data[:MIB]
                inspect_children()
                assert stream.read() == data[MIB:]
        with pytest.raises(CryptoError) as caught:
            decrypt_bytes(encrypt_bytes(data, symmetric), Gpg(passphrase_file=key_passphrase_file))
    assert "gpg-agent" in inspected  # the secret-key decryption's agent was inspected too
    events = {event["event"] for event in logs}
    assert {"crypto.encrypted", "crypto.decrypted"} <= events
    for secret in (PASSPHRASE, KEY_PASSPHRASE):
        assert secret not in repr(logs)
        assert secret not in str(caught.value)
    assert_nothing_left(scratch)


def test_isolated_home_is_removed_and_its_agent_stopped(
    protected_key: GpgKey, tmp_path: Path, scratch: Path
) -> None:
    """Secret-key decryption runs a gpg-agent in a 0700 temp home; both are gone afterwards."""
    key_passphrase_file = tmp_path / "key-passphrase"
    key_passphrase_file.write_text(KEY_PASSPHRASE + "\n")
    settings = Gpg(
        recipients=[protected_key.fingerprint],
        public_keys_file=protected_key.public_file,
        secret_keys_file=protected_key.secret_file,
        secret_key_passphrase_file=key_passphrase_file,
    )
    encrypted = encrypt_bytes(os.urandom(2 * MIB), settings)
    with crypto.decrypting(io.BytesIO(encrypted), settings) as stream:
        stream.read(MIB)
        (home,) = scratch.iterdir()
        assert home.stat().st_mode & 0o777 == 0o700
        assert sorted(_processes(scratch).values()) == ["gpg", "gpg-agent"]
    assert_nothing_left(scratch)


def test_passphrase_modes_run_no_agent(symmetric: Gpg, key: GpgKey, scratch: Path) -> None:
    """Encrypting, and decrypting with a passphrase, need no gpg-agent: only gpg runs."""
    public = Gpg(recipients=[key.fingerprint], public_keys_file=key.public_file)
    for settings in (symmetric, public):
        with crypto.encrypting(io.BytesIO(), settings) as stream:
            stream.write(os.urandom(MIB))
            stream.flush()
            assert list(_processes(scratch).values()) == ["gpg"]
    with crypto.decrypting(io.BytesIO(encrypt_bytes(b"x" * MIB, symmetric)), symmetric) as stream:
        stream.read(1000)
        assert list(_processes(scratch).values()) == ["gpg"]
    assert_nothing_left(scratch)


class FullDisk:
    """A sink that takes *capacity* bytes, then fails as a full disk does."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.taken = 0

    def write(self, data: bytes) -> int:
        if self.taken + len(data) > self.capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.taken += len(data)
        return len(data)


def test_full_sink_mid_stream_raises_its_error_and_leaves_nothing(
    symmetric: Gpg, scratch: Path
) -> None:
    """ENOSPC from the sink reaches the writer unchanged; gpg and the thread are gone."""
    sink = FullDisk(3 * MIB)
    with (
        pytest.raises(OSError, match="No space left") as caught,
        crypto.encrypting(sink, symmetric) as stream,
    ):
        for _ in range(40):
            stream.write(os.urandom(MIB))
    assert caught.value.errno == errno.ENOSPC
    assert sink.taken <= 3 * MIB
    assert_nothing_left(scratch)


def test_gpg_killed_while_encrypting_raises_crypto_error(symmetric: Gpg, scratch: Path) -> None:
    """A gpg that dies mid-stream fails the encryption with one line, nothing left behind."""
    with (
        pytest.raises(CryptoError) as caught,
        crypto.encrypting(io.BytesIO(), symmetric, name="x.tar.gz.gpg") as stream,
    ):
        stream.write(os.urandom(MIB))
        stream.flush()
        os.kill(_gpg_pid(scratch), signal.SIGKILL)
        for _ in range(40):
            stream.write(os.urandom(MIB))
    assert str(caught.value) == "cannot encrypt x.tar.gz.gpg: gpg was killed by SIGKILL"
    assert_nothing_left(scratch)


def test_gpg_killed_while_decrypting_raises_crypto_error(symmetric: Gpg, scratch: Path) -> None:
    """A gpg that dies mid-stream fails the decryption at the end of what it gave."""
    encrypted = encrypt_bytes(os.urandom(8 * MIB), symmetric)
    with (
        pytest.raises(CryptoError) as caught,
        crypto.decrypting(io.BytesIO(encrypted), symmetric, name="x.tar.gz.gpg") as stream,
    ):
        stream.read(MIB)
        os.kill(_gpg_pid(scratch), signal.SIGKILL)
        stream.read()
    assert str(caught.value) == "cannot decrypt x.tar.gz.gpg: gpg was killed by SIGKILL"
    assert_nothing_left(scratch)


def test_exception_inside_the_block_stops_gpg_and_is_raised_as_is(
    symmetric: Gpg, scratch: Path
) -> None:
    """An abort in the writer (a cancelled backup) propagates unchanged; gpg is stopped."""

    class Cancelled(Exception):
        pass

    with pytest.raises(Cancelled), crypto.encrypting(io.BytesIO(), symmetric) as stream:
        stream.write(os.urandom(MIB))
        raise Cancelled
    encrypted = encrypt_bytes(os.urandom(4 * MIB), symmetric)
    with pytest.raises(Cancelled), crypto.decrypting(io.BytesIO(encrypted), symmetric) as stream:
        stream.read(1000)
        raise Cancelled
    assert_nothing_left(scratch)


class BrokenSource:
    """A source (a download) that fails after *good* bytes."""

    def __init__(self, data: bytes, good: int) -> None:
        self.stream = io.BytesIO(data)
        self.good = good

    def read(self, size: int = -1) -> bytes:
        if self.stream.tell() >= self.good:
            raise OSError(errno.ECONNRESET, "connection reset by peer")
        return self.stream.read(min(size, self.good - self.stream.tell()))


def test_source_failure_mid_stream_raises_its_error(symmetric: Gpg, scratch: Path) -> None:
    """A source that fails mid-download raises its own error from the reader."""
    encrypted = encrypt_bytes(os.urandom(8 * MIB), symmetric)
    with (
        pytest.raises(OSError, match="connection reset") as caught,
        crypto.decrypting(BrokenSource(encrypted, 2 * MIB), symmetric) as stream,
    ):
        stream.read()
    assert caught.value.errno == errno.ECONNRESET
    assert_nothing_left(scratch)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(
            lambda data: data[:600_000] + bytes([data[600_000] ^ 1]) + data[600_001:],
            id="bit-flipped",
        ),
    ],
)
def test_damaged_archive_fails_the_integrity_check(
    symmetric: Gpg, damage: Callable[[bytes], bytes], scratch: Path
) -> None:
    """A truncated or altered archive raises at its end, never decrypts silently."""
    encrypted = encrypt_bytes(os.urandom(2 * MIB), symmetric)
    assert _decrypt_error(damage(encrypted), symmetric) == (
        "test.tar.gz.gpg is damaged or was tampered with: gpg's integrity check failed"
    )
    assert_nothing_left(scratch)


def test_reader_that_stops_early_still_learns_of_damage(symmetric: Gpg) -> None:
    """Leaving the block reads the rest and checks it, so stopping early hides nothing."""
    encrypted = encrypt_bytes(os.urandom(2 * MIB), symmetric)
    with (
        pytest.raises(CryptoError, match="integrity check failed"),
        crypto.decrypting(io.BytesIO(encrypted[:-100]), symmetric) as stream,
    ):
        stream.read(1000)


def test_unencrypted_or_foreign_input_is_refused(
    symmetric: Gpg, operator_home: Path, tmp_path: Path
) -> None:
    """An OpenPGP file without encryption (gpg --store), or random bytes, is no archive."""
    stored = _run(
        [require_tool("gpg"), "--homedir", str(operator_home), "--batch", "--store"],
        stdin_data=b"plaintext posing as a backup",
    ).stdout
    assert _decrypt_error(stored, symmetric) == (
        "test.tar.gz.gpg is not encrypted: gpg found no encrypted data in it"
    )
    # Random bytes look like an OpenPGP packet now and then (a first byte with bit 7 set
    # is a packet tag), so the foreign bytes start with a zero: that can be no packet.
    foreign = b"\x00" + os.urandom(4095)
    assert _decrypt_error(foreign, symmetric).startswith("test.tar.gz.gpg is not an OpenPGP file")


def test_passphrase_from_a_systemd_credential(
    tmp_path: Path, symmetric: Gpg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """passphrase_credential reads $CREDENTIALS_DIRECTORY/<name>, like LoadCredential=."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / CREDENTIAL).write_text(PASSPHRASE)  # systemd keeps no newline
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = Gpg(passphrase_credential=CREDENTIAL)
    data = os.urandom(MIB)
    encrypted = encrypt_bytes(data, settings)
    assert decrypt_bytes(encrypted, symmetric) == data  # the same passphrase from a file
    assert decrypt_bytes(encrypted, settings) == data


def test_missing_credentials_directory_explains_load_credential(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without $CREDENTIALS_DIRECTORY, or without the credential, the error says what to do."""
    settings = Gpg(passphrase_credential=CREDENTIAL)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(CryptoError, match=r"LoadCredential=.*it is not set"):
        encrypt_bytes(b"x", settings)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(
        CryptoError, match=r"cannot read passphrase_credential .*backup-passphrase: No such"
    ):
        encrypt_bytes(b"x", settings)


def test_empty_passphrase_file_is_refused(tmp_path: Path) -> None:
    """An empty first line would mean an empty passphrase: refused, naming the file."""
    empty = tmp_path / "passphrase"
    empty.write_text("\nsecond line\n")
    with pytest.raises(CryptoError) as caught:
        encrypt_bytes(b"x", Gpg(passphrase_file=empty))
    assert str(caught.value) == (
        f"passphrase_file {empty} is empty: its first line must be the passphrase"
    )


def test_encrypting_stream_accepts_a_sink_that_writes_short(symmetric: Gpg) -> None:
    """A raw sink that takes a few bytes per call still receives the whole file."""

    class Trickle:
        def __init__(self) -> None:
            self.received = bytearray()

        def write(self, data: bytes) -> int:
            self.received += data[:1000]
            return min(len(data), 1000)

    data = os.urandom(300_000)
    sink = Trickle()
    with crypto.encrypting(sink, symmetric) as stream:
        stream.write(data)
    assert decrypt_bytes(bytes(sink.received), symmetric) == data


def test_label_defaults_to_the_file_name(tmp_path: Path, symmetric: Gpg) -> None:
    """Errors name the file a stream reads when no name is given."""
    archive = tmp_path / "x.tar.gz.gpg"
    archive.write_bytes(b"\x00" * 100)
    source: IO[bytes]
    with (
        pytest.raises(CryptoError, match=f"^{archive} is not an OpenPGP file"),
        archive.open("rb") as source,
        crypto.decrypting(source, symmetric) as stream,
    ):
        stream.read()


def test_too_long_temp_directory_for_agent_sockets_is_explained(
    key: GpgKey, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where gpg-agent could not bind its sockets, the error names TMPDIR, not a key."""
    settings = Gpg(recipients=[key.fingerprint], public_keys_file=key.public_file)
    data = os.urandom(1000)
    encrypted = encrypt_bytes(data, settings)
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    if Path(f"/run/user/{os.getuid()}").is_dir():  # the sockets live there instead
        assert decrypt_bytes(encrypted, settings, key.secret_file) == data
    else:
        message = _decrypt_error(encrypted, settings, key.secret_file)
        assert message == (
            f"the temp directory {deep} is too long a path for gpg-agent's sockets; "
            "set TMPDIR to a shorter one"
        )
    assert list(deep.iterdir()) == []
