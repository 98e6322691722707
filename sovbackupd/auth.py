"""Authenticity: an HMAC key kept outside backup_dir, and one signed record per backup.

Whoever can write backup_dir (the service user) or a bucket can rewrite an archive, its
manifests and its sidecar consistently; only the key, which neither holds, tells such a
forgery from a backup made here. ``<name>.auth.json`` binds the backup's name, creation
time, host and tiers to the sha256 of each of its files (the archive's is its
sidecar's) with HMAC-SHA256. A record copied under another name names the other backup:
a replay, refused like a bad MAC.
"""

from __future__ import annotations

import contextlib
import enum
import glob
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

import structlog
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from sovbackupd import archive, fsat, untrusted
from sovbackupd.config.models import Policy
from sovbackupd.errors import AuthError, ConfigError
from sovbackupd.manifest import SAFE_NAME_PATTERN, describe, parse_json
from sovbackupd.store import TIMESTAMP_FORMAT

log = structlog.get_logger("sovbackupd.auth")

FORMAT = 1
KEY_BYTES = 32
KEY_FILE_LIMIT_BYTES = 256
"""The key file holds 64 hex digits and a newline; anything larger is not one."""
RECORD_LIMIT_BYTES = 16 << 10
"""A record is a few hundred bytes; anything larger is not one of ours."""
CREDENTIAL_NAME = "auth-key"
"""The systemd credential (LoadCredential=auth-key:...) used instead of key_file."""
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
KEY_ID_CHARS = 16
HEX64 = r"^[0-9a-f]{64}$"
ESCROW = (
    "keep a copy of the key beside the encryption passphrase, off this server: without "
    "it, restores need --trust-unsigned and keep no owners"
)


class Status(enum.Enum):
    """What the check of a backup's record found, when it did not refuse it."""

    AUTHENTICATED = "authenticated"
    UNSIGNED = "unsigned"
    """No record: a backup made before authentication, or one whose record was removed."""
    FOREIGN = "foreign key"
    """Signed with a key this host does not hold (or this host holds none)."""


@dataclass(frozen=True)
class Key:
    """The HMAC key and the file it was read from."""

    secret: bytes = field(repr=False)
    path: Path

    @property
    def id(self) -> str:
        """Return the key's id: the first 16 hex digits of its sha256 (not secret)."""
        return hashlib.sha256(self.secret).hexdigest()[:KEY_ID_CHARS]


def key_path(policy: Policy) -> Path:
    """Return the key file in use: the systemd credential when it exists, else key_file."""
    directory = os.environ.get(CREDENTIALS_ENV)
    if directory:
        credential = Path(directory) / CREDENTIAL_NAME
        if os.path.lexists(credential):
            return credential
    return policy.authentication.key_file


def load_key(path: Path) -> Key | None:
    """Read the key at *path*; return None when there is no file there.

    The file is untrusted until checked: opened without following a symlink, a regular
    file of at most KEY_FILE_LIMIT_BYTES, owned by this user or root, with no access for
    group or other, holding 64 hex digits and a newline. Raise ConfigError otherwise.
    """
    try:
        with untrusted.open_regular(path) as handle:
            status = os.fstat(handle.fileno())
            data = handle.read(KEY_FILE_LIMIT_BYTES + 1)
    except FileNotFoundError:
        return None
    except untrusted.NotRegularError:
        raise ConfigError(f"authentication key {path} is not a regular file") from None
    except OSError as error:
        if path.is_symlink():
            raise ConfigError(
                f"authentication key {path} is a symbolic link: point key_file at the file"
            ) from None
        raise ConfigError(
            f"authentication key {path} cannot be read: {error.strerror or error}"
        ) from None
    if status.st_uid not in _key_owners(path):
        raise ConfigError(
            f"authentication key {path} is owned by uid {status.st_uid}: it must belong "
            "to the user sovbackupd runs as, or root"
        )
    if stat.S_IMODE(status.st_mode) & 0o077:
        raise ConfigError(
            f"authentication key {path} has mode {stat.S_IMODE(status.st_mode):04o}: "
            "group and other must have no access (chmod 0400)"
        )
    if len(data) > KEY_FILE_LIMIT_BYTES:
        raise ConfigError(f"authentication key {path} is over {KEY_FILE_LIMIT_BYTES} bytes")
    text = data.removesuffix(b"\n")
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES or len(text) != 2 * KEY_BYTES:
        raise ConfigError(
            f"authentication key {path} must hold {2 * KEY_BYTES} hex digits and a newline"
        )
    return Key(secret, path)


def _key_owners(path: Path) -> set[int]:
    """Return the uids a key at *path* may belong to: this user's and root's.

    As root, also the owner of the key's directory: :func:`create_key` gives it the key
    (the service user of ``User=``, in its StateDirectory), and whoever owns the
    directory can replace the file there anyway.
    """
    owners = {os.geteuid(), 0}
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            owners.add(os.lstat(path.parent).st_uid)
    return owners


def create_key(path: Path) -> Key:
    """Create a new random key at *path* (0400); refuse to replace any file there.

    As root the file is given to the owner of its directory, so that a service user
    can read the key that root created in its StateDirectory. Raise ConfigError when
    the file exists or cannot be written.
    """
    secret = secrets.token_bytes(KEY_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, 0o400)
    except FileExistsError:
        raise ConfigError(
            f"authentication key {path} exists: refusing to replace it (backups signed "
            "with it would no longer verify)"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"authentication key {path} cannot be created: {error.strerror or error}"
        ) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if os.geteuid() == 0:
                directory = path.parent.stat()
                os.fchown(handle.fileno(), directory.st_uid, directory.st_gid)
            handle.write(secret.hex().encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        fsat.fsync_dir(path.parent)
    except OSError as error:
        path.unlink(missing_ok=True)
        raise ConfigError(
            f"authentication key {path} cannot be written: {error.strerror or error}"
        ) from None
    key = Key(secret, path)
    log.info("auth.key_created", key_id=key.id, path=str(path), escrow=ESCROW)
    return key


def signing_key(policy: Policy) -> Key | None:
    """Return the key backups are signed with; None when the first backup is to create it.

    A key that is gone while backup_dir holds backups signed with one (deleted, lost
    with a disk, a key_file typo) is never replaced behind the operator's back: every
    earlier backup would turn "foreign key". Raise ConfigError naming the key file and
    the key those backups need.
    """
    path = key_path(policy)
    key = load_key(path)
    if key is None and (signed := _newest_record(policy.backup_dir, policy.name_prefix)):
        name, key_id = signed
        raise ConfigError(
            f"authentication key {path} is missing, yet backup {name} in "
            f"{policy.backup_dir} is signed with key {key_id}: put that key back (from "
            "escrow), or start a new key with 'sovbackupd key init' (backups signed with "
            "the old one then verify only with --trust-unsigned)"
        )
    return key


def _newest_record(backup_dir: Path, prefix: str) -> tuple[str, str] | None:
    """Return the name and key id of the newest signed backup in *backup_dir*, if any.

    A record that does not parse still says that a key signed backups here: its key id
    is then given as unknown.
    """
    records = sorted(backup_dir.glob(f"{glob.escape(prefix)}_*{archive.AUTH_SUFFIX}"))
    if not records:
        return None
    name = records[-1].name.removesuffix(archive.AUTH_SUFFIX)
    try:
        return name, _read(records[-1], name)[1].key_id
    except AuthError:
        return name, "(unknown: its record does not parse)"


def ensure_key(policy: Policy) -> Key:
    """Return the policy's key, creating it when there is none yet (backups only)."""
    return signing_key(policy) or create_key(key_path(policy))


def policy_key(policy: Policy) -> Key | None:
    """Return the policy's key, None when this host has none; never create one."""
    return load_key(key_path(policy))


Digest = Annotated[str, Field(pattern=HEX64)]
FileName = Annotated[str, Field(pattern=SAFE_NAME_PATTERN)]


class Record(BaseModel):
    """``<name>.auth.json``: what the MAC binds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1]
    backup: FileName
    created: AwareDatetime
    host: Annotated[str, Field(max_length=255)]
    tiers: list[FileName] = Field(max_length=64)
    key_id: Annotated[str, Field(pattern=rf"^[0-9a-f]{{{KEY_ID_CHARS}}}$")]
    files: dict[FileName, Digest] = Field(min_length=1, max_length=8)
    mac: Digest


def _canonical(body: dict[str, object]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(key: Key, body: dict[str, object]) -> str:
    return hmac.new(key.secret, _canonical(body), hashlib.sha256).hexdigest()


def signed_files(archive_path: Path) -> list[Path]:
    """Return the files of a backup that its record lists: all but the sidecar and itself."""
    # Imported here: targets imports the store, which every module here already needs.
    from sovbackupd import targets  # noqa: PLC0415

    unsigned = {archive.sidecar_path(archive_path), archive.auth_path(archive_path)}
    return [path for path in targets.backup_files(archive_path) if path not in unsigned]


def _digest(path: Path) -> str:
    with untrusted.open_regular(path) as handle:
        return archive.stream_sha256(handle)


def write(archive_path: Path, name: str, created: datetime, tiers: list[str], key: Key) -> None:
    """Sign the backup *name* at *archive_path*: write its record beside it, atomically.

    The archive's digest is its sidecar's; every other file is hashed as it is on disk.
    """
    files = {}
    for path in signed_files(archive_path):
        if path == archive_path:
            files[path.name] = archive.read_sidecar(archive_path)
        elif path.exists():
            files[path.name] = _digest(path)
    body: dict[str, object] = {
        "format": FORMAT,
        "backup": name,
        "created": created.isoformat(),
        "host": socket.gethostname(),
        "tiers": list(tiers),
        "key_id": key.id,
        "files": files,
    }
    text = json.dumps({**body, "mac": _mac(key, body)}, indent=1, sort_keys=True) + "\n"
    archive.write_atomically(archive.auth_path(archive_path), text.encode("ascii"))


def _read(path: Path, name: str) -> tuple[dict[str, object], Record]:
    """Return the raw JSON and the validated record at *path*; raise AuthError naming it."""
    try:
        with untrusted.open_regular(path) as handle:
            data = handle.read(RECORD_LIMIT_BYTES + 1)
    except (OSError, untrusted.NotRegularError) as error:
        reason = error.strerror if isinstance(error, OSError) else None
        raise AuthError(f"backup {name}: {path.name} is unreadable: {reason or error}") from None
    return _parse(data, path.name, name)


def _parse(data: bytes, file_name: str, name: str) -> tuple[dict[str, object], Record]:
    """Return the raw JSON and the validated record in *data*; raise AuthError naming it."""
    if len(data) > RECORD_LIMIT_BYTES:
        raise AuthError(f"backup {name}: {file_name} is over {RECORD_LIMIT_BYTES} bytes")
    try:
        raw = parse_json(data)
    except ValueError as error:
        raise AuthError(f"backup {name}: {file_name} is not JSON: {error}") from None
    try:
        record = Record.model_validate(raw)
    except ValidationError as error:
        raise AuthError(f"backup {name}: {file_name}: {describe(error, 'record')}") from None
    assert isinstance(raw, dict)  # noqa: S101 (the model accepted it: a JSON object)
    return raw, record


def _signer(
    raw: dict[str, object], record: Record, file_name: str, name: str, key: Key | None
) -> Key | None:
    """Return *key* when it made *record*, None for another key's; raise AuthError on a forgery.

    A record of another name or second is a replay; one that names our key but whose
    MAC our key did not make is forged or damaged.
    """
    if record.backup != name or not in_second(record.created, name):
        raise AuthError(
            f"backup {name}: {file_name} signs backup {record.backup} of "
            f"{record.created.isoformat()}: a copy under another name (replay)"
        )
    if key is None or record.key_id != key.id:
        return None
    body = {field_name: value for field_name, value in raw.items() if field_name != "mac"}
    if not hmac.compare_digest(_mac(key, body), record.mac):
        raise AuthError(f"backup {name}: {file_name}: the MAC does not match (forged or damaged)")
    return key


def check_record(data: bytes, file_name: str, name: str, key: Key | None) -> Status:
    """Check the record *data* of backup *name* (a remote's copy) without its files.

    What a remote listing can afford: the files stay remote, so only the record is
    checked, as :func:`vouched` checks it (bounds, replay, MAC). Return AUTHENTICATED
    or FOREIGN; raise AuthError when it fails.
    """
    raw, record = _parse(data, file_name, name)
    signer = _signer(raw, record, file_name, name, key)
    return Status.FOREIGN if signer is None else Status.AUTHENTICATED


def in_second(moment: datetime, name: str) -> bool:
    """Tell whether *moment* falls in the second that the timestamp of *name* names."""
    try:
        stamp = datetime.strptime(name[-len("YYYYmmdd_HHMMSS") :], TIMESTAMP_FORMAT)
    except ValueError:
        return False
    start = stamp.replace(tzinfo=UTC)
    return start <= moment < start + timedelta(seconds=1)


def check(archive_path: Path, name: str, key: Key | None) -> Status:
    """Check the record of backup *name* at *archive_path* against *key* (see :func:`vouched`)."""
    return vouched(archive_path, name, key)[0]


def vouched(archive_path: Path, name: str, key: Key | None) -> tuple[Status, dict[str, str]]:
    """Check the record of backup *name* at *archive_path* against *key*.

    Return the status and, when AUTHENTICATED, each signed file's sha256 by file name
    (the archive's as its sidecar gave it): a reader that parses the same bytes it
    compares with these is safe from a file swapped after this check.

    Return UNSIGNED without a record and FOREIGN for a record of another key (or when
    *key* is None) whose files are what it lists. Raise AuthError, one line naming the
    backup, the file and the field, when the record fails: unreadable or out of bounds,
    a MAC that our key did not make, a file that is not what was signed (under any
    key), or a record of another name or time (a replay).
    """
    path = archive.auth_path(archive_path)
    if not os.path.lexists(path):
        return Status.UNSIGNED, {}
    raw, record = _read(path, name)
    ours = _signer(raw, record, path.name, name, key)
    # A foreign key's record vouches for nothing, but files that are not what it lists
    # are a changed backup: refused even under --trust-unsigned.
    _check_files(archive_path, name, path.name, record)
    return (Status.AUTHENTICATED, dict(record.files)) if ours is not None else (Status.FOREIGN, {})


def _check_files(archive_path: Path, name: str, record_name: str, record: Record) -> None:
    """Raise AuthError unless the backup's files are exactly those *record* lists, as listed."""
    expected = {path.name for path in signed_files(archive_path) if path.exists()}
    expected.add(archive_path.name)
    if set(record.files) != expected:
        missing = sorted(expected.symmetric_difference(record.files))[0]
        raise AuthError(f"backup {name}: {missing} is not what {record_name} signed")
    for signed, digest in record.files.items():
        where = archive_path.with_name(signed)
        if where == archive_path:
            actual = archive.read_sidecar(archive_path)
        else:
            try:
                actual = _digest(where)
            except (OSError, ValueError) as error:
                raise AuthError(f"backup {name}: {signed} cannot be read: {error}") from None
        if not hmac.compare_digest(actual, digest):
            raise AuthError(f"backup {name}: {signed} is not what {record_name} signed")


def refusal(name: str, status: Status) -> str:
    """Return why a backup of *status* is refused without ``--trust-unsigned``."""
    why = (
        "has no authentication record (made before authentication, or its record was removed)"
        if status is Status.UNSIGNED
        else "is signed with a key this host does not hold"
    )
    return (
        f"backup {name} {why}: refused; pass --trust-unsigned to restore it anyway, "
        "without owners or setuid bits"
    )
