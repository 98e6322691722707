"""Authentication: the key file read as untrusted input, and records that forgers cannot make."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sovbackupd import archive, auth
from sovbackupd.config.models import Policy
from sovbackupd.errors import AuthError, ConfigError, ExitCode

NAME = "sovereigncore_backup_20260102_140000"
CREATED = datetime(2026, 1, 2, 14, 0, 0, 250_000, tzinfo=UTC)


def make_key(directory: Path) -> auth.Key:
    """Create a key in *directory* as the first backup would."""
    return auth.create_key(directory / "auth.key")


def make_backup(directory: Path, key: auth.Key, name: str = NAME) -> Path:
    """Lay out the files of a signed backup *name*: archive, sidecar, manifest, record."""
    archive_path = directory / f"{name}.tar.gz"
    archive_path.write_bytes(b"not really a tar, but bytes with a digest")
    digest = archive.file_sha256(archive_path)
    archive.sidecar_path(archive_path).write_text(f"{digest}  {archive_path.name}\n")
    archive.manifest_path(archive_path).write_text(json.dumps({"id": name}))
    auth.write(archive_path, name, CREATED, ["daily"], key)
    return archive_path


def record_of(archive_path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(archive.auth_path(archive_path).read_text())
    return loaded


def test_key_is_created_0400_once_and_never_replaced(tmp_path: Path) -> None:
    """create_key writes 64 hex digits 0400, logs its id, and refuses to overwrite it."""
    path = tmp_path / "auth.key"
    with capture_logs() as events:
        key = auth.create_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert path.read_bytes() == key.secret.hex().encode() + b"\n"
    assert [event["key_id"] for event in events if event["event"] == "auth.key_created"] == [key.id]
    assert auth.load_key(path) == key
    with pytest.raises(ConfigError, match="exists: refusing to replace it"):
        auth.create_key(path)
    assert auth.load_key(path) == key


def test_missing_key_is_none_and_a_missing_directory_is_refused(tmp_path: Path) -> None:
    """No key file reads as None; creating one in a directory that is not there is refused."""
    assert auth.load_key(tmp_path / "auth.key") is None
    with pytest.raises(ConfigError, match="cannot be created") as raised:
        auth.create_key(tmp_path / "missing" / "auth.key")
    assert raised.value.exit_code == ExitCode.CONFIG


def _group_readable(path: Path) -> None:
    path.chmod(0o440)


def _other_writable(path: Path) -> None:
    path.chmod(0o602)


def _foreign_owner(path: Path) -> None:
    os.chown(path, 4242, 4242)


def _symlink(path: Path) -> None:
    real = path.with_name("real.key")
    path.rename(real)
    path.symlink_to(real)


def _oversized(path: Path) -> None:
    path.chmod(0o600)
    path.write_bytes(b"0" * 4096)


def _not_hex(path: Path) -> None:
    path.chmod(0o600)
    path.write_bytes(b"z" * 64 + b"\n")


def _short(path: Path) -> None:
    path.chmod(0o600)
    path.write_bytes(b"ab" * 16 + b"\n")


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


KEY_REFUSALS = {
    "group-readable": (_group_readable, "mode 0440"),
    "other-writable": (_other_writable, "mode 0602"),
    "foreign-owner": (_foreign_owner, "owned by uid 4242"),
    "symlink": (_symlink, "is a symbolic link"),
    "oversized": (_oversized, "over 256 bytes"),
    "not-hex": (_not_hex, "64 hex digits"),
    "short": (_short, "64 hex digits"),
    "fifo": (_fifo, "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(KEY_REFUSALS))
def test_unsafe_key_file_is_refused_with_one_config_line(tmp_path: Path, case: str) -> None:
    """A key file others can read or write, or that is not one, is refused (exit 78)."""
    if case == "foreign-owner" and os.geteuid() != 0:
        pytest.fail("the owner case needs root to chown; CI runs the suite as root")
    path = tmp_path / "auth.key"
    make_key(tmp_path)
    spoil, message = KEY_REFUSALS[case]
    spoil(path)

    with pytest.raises(ConfigError) as raised:
        auth.load_key(path)

    assert message in str(raised.value)
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert raised.value.exit_code == ExitCode.CONFIG


def test_credential_replaces_key_file_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$CREDENTIALS_DIRECTORY/auth-key is the key in use when present, key_file otherwise."""
    policy = Policy.model_validate(
        {"sources": {"dirs": ["/srv/data"]}, "authentication": {"key_file": str(tmp_path / "k")}}
    )
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.setenv(auth.CREDENTIALS_ENV, str(credentials))
    assert auth.key_path(policy) == tmp_path / "k"
    (credentials / auth.CREDENTIAL_NAME).write_text("00" * 32 + "\n")
    assert auth.key_path(policy) == credentials / auth.CREDENTIAL_NAME


def test_signed_backup_is_authenticated_and_other_keys_are_foreign(tmp_path: Path) -> None:
    """Our key authenticates our record; another key, or none, finds it foreign."""
    key = make_key(tmp_path)
    archive_path = make_backup(tmp_path, key)
    other = auth.Key(b"\x01" * 32, tmp_path / "other")

    assert auth.check(archive_path, NAME, key) is auth.Status.AUTHENTICATED
    assert auth.check(archive_path, NAME, other) is auth.Status.FOREIGN
    assert auth.check(archive_path, NAME, None) is auth.Status.FOREIGN
    archive.auth_path(archive_path).unlink()
    assert auth.check(archive_path, NAME, key) is auth.Status.UNSIGNED


@pytest.mark.parametrize("reader", ["our key", "another key", "no key"])
def test_changed_file_of_a_signed_backup_fails_naming_it(tmp_path: Path, reader: str) -> None:
    """A manifest rewritten after signing, or an archive with a new sidecar, is refused.

    Whatever key reads it: a record of a key this host lacks proves nothing, yet files
    that are not what it lists are a changed backup, never a foreign one.
    """
    key = make_key(tmp_path)
    checking = {"our key": key, "another key": auth.Key(b"\x01" * 32, tmp_path), "no key": None}
    archive_path = make_backup(tmp_path, key)
    manifest = archive.manifest_path(archive_path)
    manifest.write_text(json.dumps({"id": NAME, "forged": True}))

    with pytest.raises(AuthError, match=f"{manifest.name} is not what") as raised:
        auth.check(archive_path, NAME, checking[reader])
    assert raised.value.exit_code == ExitCode.UNAUTHENTICATED

    archive_path = make_backup(tmp_path, key)
    archive_path.write_bytes(b"other bytes")
    digest = archive.file_sha256(archive_path)
    archive.sidecar_path(archive_path).write_text(f"{digest}  {archive_path.name}\n")
    with pytest.raises(AuthError, match=f"{archive_path.name} is not what"):
        auth.check(archive_path, NAME, checking[reader])


def test_a_lost_key_is_not_replaced_while_backups_signed_with_it_exist(tmp_path: Path) -> None:
    """No key, yet signed backups: refused naming the key file and the key id they need.

    A new key made silently would turn every earlier backup "foreign key"; `key init`
    (create_key) is how the operator starts a new one on purpose.
    """
    backups = tmp_path / "backups"
    backups.mkdir()
    key_file = tmp_path / "auth.key"
    policy = Policy.model_validate(
        {
            "sources": {"dirs": ["/srv/data"]},
            "backup_dir": str(backups),
            "authentication": {"key_file": str(key_file)},
        }
    )
    assert auth.signing_key(policy) is None  # the first backup creates it
    key = auth.ensure_key(policy)
    make_backup(backups, key)
    key_file.unlink()

    for lookup in (auth.signing_key, auth.ensure_key):
        with pytest.raises(ConfigError) as raised:
            lookup(policy)
        assert str(key_file) in str(raised.value)
        assert key.id in str(raised.value)
        assert "key init" in str(raised.value)
        assert not key_file.exists()

    started = auth.create_key(key_file)  # sovbackupd key init
    assert auth.signing_key(policy) == started


def test_record_copied_under_another_name_is_a_replay(tmp_path: Path) -> None:
    """Every file of a backup copied under a newer name, record included, is refused."""
    key = make_key(tmp_path)
    original = make_backup(tmp_path, key)
    newer = "sovereigncore_backup_20260103_140000"
    copied = tmp_path / f"{newer}.tar.gz"
    copied.write_bytes(original.read_bytes())
    digest = archive.file_sha256(copied)
    archive.sidecar_path(copied).write_text(f"{digest}  {copied.name}\n")
    archive.manifest_path(copied).write_bytes(archive.manifest_path(original).read_bytes())
    archive.auth_path(copied).write_bytes(archive.auth_path(original).read_bytes())

    with pytest.raises(AuthError, match="replay"):
        auth.check(copied, newer, key)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["format", "backup", "created", "host", "tiers", "key_id", "files", "mac", "extra"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3))
def test_no_forged_record_authenticates(tmp_path: Path, changes: dict[str, Any]) -> None:
    """A record with any field replaced by any JSON value is never called authenticated.

    Invariant: check() either raises AuthError (one line naming the record) or finds the
    record unsigned-like (FOREIGN); it never returns AUTHENTICATED for a record it did not
    write, and never raises anything else.
    """
    key = auth.load_key(tmp_path / "auth.key") or make_key(tmp_path)
    archive_path = make_backup(tmp_path, key)
    record = record_of(archive_path)
    forged = {**record, **changes}
    if forged == record:
        return
    archive.auth_path(archive_path).write_text(json.dumps(forged))

    try:
        status = auth.check(archive_path, NAME, key)
    except AuthError as error:
        assert "\n" not in str(error)
        assert str(error).startswith(f"backup {NAME}: ")
    else:
        assert status is auth.Status.FOREIGN


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | st.just(b"{" * 100_000) | st.just(b" " * 20_000))
def test_any_bytes_as_a_record_are_refused_in_one_line(tmp_path: Path, data: bytes) -> None:
    """Invariant: whatever bytes sit in the record file, check() raises one AuthError line."""
    key = auth.load_key(tmp_path / "auth.key") or make_key(tmp_path)
    archive_path = make_backup(tmp_path, key)
    archive.auth_path(archive_path).write_bytes(data)

    with pytest.raises(AuthError) as raised:
        auth.check(archive_path, NAME, key)
    assert "\n" not in str(raised.value)


def test_record_names_its_fields_and_binds_the_name_and_second(tmp_path: Path) -> None:
    """The record holds what the MAC binds, its created time in the second of its name."""
    key = make_key(tmp_path)
    record = record_of(make_backup(tmp_path, key))

    assert sorted(record) == sorted(FIELDS[:-1])
    assert record["backup"] == NAME
    assert record["key_id"] == key.id
    assert sorted(record["files"]) == [f"{NAME}.manifest.json", f"{NAME}.tar.gz"]
    assert auth.in_second(datetime.fromisoformat(record["created"]), NAME)
    assert not auth.in_second(datetime(2026, 1, 2, 14, 0, 1, tzinfo=UTC), NAME)
