"""Encrypted backups end to end through the CLI: real gpg, a real redis-server, real SQLite.

The crypto module's own tests (test_crypto.py) cover streams, argv and the environment of
gpg; these run sovbackupd as an operator would, on a sandbox server, with policies that
carry ``encryption: {gpg: ...}``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    CliResult,
    RedisServer,
    Sandbox,
    backup_files,
    policy_data,
    require_tool,
    resign,
    run_cli,
    write_policy,
)
from tests.integration.test_crypto import GpgKey, _generate_key
from tests.integration.test_restore import (
    assert_same_tree,
    backup_now,
    component_states,
    damage,
    keys,
    live_paths,
    live_paths_under,
    restart_commands,
    rows,
    tree_state,
)

__all__ = ["restart_commands"]  # a fixture of test_restore.py, requested by name below

PASSPHRASE = "sovbackupd-e2e passphrase 9c41d7 never printed"  # noqa: S105 (a test's passphrase)
OTHER_PASSPHRASE = "not the passphrase the archive was made with"  # noqa: S105


@pytest.fixture(scope="module")
def recipient_key(tmp_path_factory: pytest.TempPathFactory) -> GpgKey:
    """A recipient key pair (secret key without a passphrase), exported to two files."""
    return _generate_key(tmp_path_factory.mktemp("key"), "sovbackupd e2e <e2e@example.invalid>", "")


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    """The passphrase on its first line, 0600, outside every backed-up path."""
    path = tmp_path / "passphrase"
    path.write_text(f"{PASSPHRASE}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def operator_home(tmp_path: Path) -> Iterator[Path]:
    """An operator's own GNUPGHOME for plain gpg; its agent is stopped afterwards."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    yield home
    subprocess.run(
        [require_tool("gpgconf"), "--homedir", str(home), "--kill", "all"],
        capture_output=True,
        check=False,
        timeout=60,
    )


def passphrase_encryption(path: Path) -> dict[str, Any]:
    return {"gpg": {"passphrase_file": str(path)}}


def plain_gpg(home: Path, *arguments: str) -> list[str]:
    """The argv of gpg as an operator runs it by hand, in *home*."""
    return [
        require_tool("gpg"), "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
        *arguments,
    ]  # fmt: skip


def tar_listing(plaintext: bytes) -> list[str]:
    """Return what ``tar -tzf -`` lists of *plaintext*."""
    listed = subprocess.run(
        [require_tool("tar"), "-tzf", "-"], input=plaintext, capture_output=True, check=True
    )
    return listed.stdout.decode().splitlines()


def assert_one_error(result: CliResult, *fragments: str) -> None:
    """The command failed with exit 1 and one stderr line holding every fragment."""
    assert result.returncode == 1, result
    assert len(result.stderr_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr_lines[0], result.stderr


def test_passphrase_backup_opens_with_plain_gpg_and_round_trips_through_the_cli(
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
    passphrase_file: Path,
    operator_home: Path,
) -> None:
    """The .tar.gz.gpg passes sha256sum -c, gpg --decrypt | tar -tzf, list, verify, restore."""
    config = write_policy(
        sandbox.root / "policy.yaml",
        policy_data(
            sandbox,
            redis_server,
            restore=restart_commands(redis_server),
            encryption=passphrase_encryption(passphrase_file),
        ),
    )
    files_before = tree_state(sandbox.root, live_paths(sandbox))
    keys_before = keys(redis_server)
    rows_before = rows(sandbox.database)

    name = backup_now(config)

    stored = sandbox.backup_dir / f"{name}.tar.gz.gpg"
    assert stored.is_file()
    assert stored.stat().st_mode & 0o777 == 0o600
    assert not (sandbox.backup_dir / f"{name}.tar.gz").exists()
    checked = subprocess.run(
        [require_tool("sha256sum"), "-c", f"{name}.tar.gz.gpg.sha256"],
        cwd=sandbox.backup_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"{name}.tar.gz.gpg: OK"
    decrypted = subprocess.run(
        plain_gpg(
            operator_home, "--passphrase-file", str(passphrase_file), "--decrypt", str(stored)
        ),
        capture_output=True,
        check=True,
        timeout=120,
    )
    listing = tar_listing(decrypted.stdout)
    for member in ("redis_dump.rdb", "manifest.json", "backup_info.txt", "sovereign_rekor.db"):
        assert f"{name}/{member}" in listing
    assert f"{name}/config/.env" in listing
    assert f"{name}/data/notes.txt" in listing

    listed = run_cli("list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert (entry["name"], entry["path"]) == (name, str(stored))
    assert name in run_cli("list", config=config).stdout
    deep = run_cli("verify", "--deep", name, config=config)
    assert (deep.returncode, deep.stdout.strip()) == (0, f"{name}: ok (deep, authenticated)"), (
        deep.stderr
    )

    dry = run_cli("restore", name, "--dry-run", config=config)
    assert dry.returncode == 0, dry.stderr
    assert "decrypt it with gpg and the passphrase, checking its integrity" in dry.stdout

    damage(sandbox, redis_server)
    restored = run_cli("restore", name, "--yes", config=config)

    assert restored.returncode == 0, restored.stderr
    assert f"restored {name}" in restored.stdout
    assert_same_tree(tree_state(sandbox.root, live_paths(sandbox)), files_before)
    assert rows(sandbox.database) == rows_before
    assert keys(redis_server) == keys_before
    safety = restored.stdout.split("safety backup of what was replaced: ")[1].split()[0]
    assert (sandbox.backup_dir / f"{safety}.tar.gz.gpg").is_file()
    drill = run_cli("test-restore", name, config=config)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert f"test restore of {name} passed" in drill.stdout


def test_wrong_passphrase_fails_restore_and_deep_verify_but_not_the_checksum(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
    passphrase_file: Path,
) -> None:
    """After the passphrase file changes, restore says 'wrong passphrase' and touches nothing."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(
            sandbox,
            redis_server,
            restore=restart_commands(redis_server),
            encryption=passphrase_encryption(passphrase_file),
        ),
    )
    name = backup_now(config)
    damage(sandbox, redis_server)
    damaged = component_states(sandbox, redis_server)
    stored = sorted(path.name for path in sandbox.backup_dir.iterdir())
    passphrase_file.write_text(f"{OTHER_PASSPHRASE}\n")

    result = run_cli("restore", name, "--yes", config=config)

    assert_one_error(result, "wrong passphrase", f"{name}.tar.gz.gpg")
    assert component_states(sandbox, redis_server) == damaged
    assert sorted(path.name for path in sandbox.backup_dir.iterdir()) == stored
    assert list(sandbox.root.rglob(".sovbackupd-restore-*")) == []
    assert redis_server.client().ping()
    deep = run_cli("verify", "--deep", name, config=config)
    assert_one_error(deep, "wrong passphrase", f"{name}.tar.gz.gpg")
    shallow = run_cli("verify", name, config=config)
    assert (shallow.returncode, shallow.stdout.strip()) == (0, f"{name}: ok (authenticated)"), (
        shallow.stderr
    )


def test_passphrase_appears_in_no_output_of_any_command_even_verbose(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
    passphrase_file: Path,
) -> None:
    """backup, verify --deep, restore, test-restore with -v never print the passphrase."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(
            sandbox,
            redis_server,
            restore=restart_commands(redis_server),
            encryption=passphrase_encryption(passphrase_file),
        ),
    )
    backed_up = run_cli("-v", "backup", config=config)
    assert backed_up.returncode == 0, backed_up.stderr
    name = backed_up.stdout.strip()
    results = [
        backed_up,
        run_cli("-v", "verify", "--deep", name, config=config),
        run_cli("-v", "restore", name, "--yes", config=config),
        run_cli("-v", "test-restore", name, config=config),
        run_cli("-v", "check-config", config=config),
    ]

    assert [result.returncode for result in results] == [0] * len(results), results
    assert "crypto.encrypted" in backed_up.stderr  # -v did log the gpg steps
    for result in results:
        assert PASSPHRASE not in result.stdout + result.stderr
    written = [
        path
        for path in sandbox.backup_dir.rglob("*")
        if path.is_file() and not path.name.endswith(".gpg")
    ]
    assert written  # sidecars, manifests, the test-restore state
    for path in written:
        assert PASSPHRASE.encode() not in path.read_bytes(), path


def test_public_key_backup_needs_the_secret_key_only_on_the_recovery_machine(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    recipient_key: GpgKey,
    operator_home: Path,
) -> None:
    """With recipients only, the server backs up but cannot read; the recovery policy can."""
    server_gpg = {
        "recipients": [recipient_key.fingerprint],
        "public_keys_file": str(recipient_key.public_file),
    }
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, redis_server, encryption={"gpg": server_gpg}),
    )
    recovery = write_policy(
        tmp_path / "recovery.yaml",
        policy_data(
            sandbox,
            redis_server,
            encryption={"gpg": {**server_gpg, "secret_keys_file": str(recipient_key.secret_file)}},
        ),
    )
    before = tree_state(sandbox.root, live_paths(sandbox))

    name = backup_now(config)

    stored = sandbox.backup_dir / f"{name}.tar.gz.gpg"
    assert stored.is_file()
    deep = run_cli("verify", "--deep", name, config=config)
    assert_one_error(deep, f"{name}.tar.gz.gpg", "secret_keys_file")
    shallow = run_cli("verify", name, config=config)
    assert shallow.returncode == 0, shallow.stderr
    subprocess.run(
        plain_gpg(operator_home, "--import", str(recipient_key.secret_file)),
        capture_output=True,
        check=True,
        timeout=120,
    )
    decrypted = subprocess.run(
        plain_gpg(operator_home, "--decrypt", str(stored)),
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert f"{name}/redis_dump.rdb" in tar_listing(decrypted.stdout)

    damage(sandbox, redis_server)
    target = tmp_path / "restored"
    restored = run_cli("restore", name, "--to", str(target), config=recovery)

    assert restored.returncode == 0, restored.stderr
    rerooted = target / str(sandbox.root).lstrip("/")
    expected = {path: state for path, state in before.items() if not path.endswith(".tmp")}
    assert_same_tree(tree_state(rerooted, live_paths_under(rerooted, sandbox)), expected)
    assert rows(target / str(sandbox.database).lstrip("/")) == {"entries": 500, "odd name": 1}
    assert (target / str(redis_server.rdb_path).lstrip("/")).read_bytes()[:5] == b"REDIS"
    recovered_deep = run_cli("verify", "--deep", name, config=recovery)
    assert recovered_deep.returncode == 0, recovered_deep.stderr
    drill = run_cli("test-restore", name, config=recovery)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert f"test restore of {name} passed" in drill.stdout


def test_encrypted_archive_with_a_policy_without_encryption_is_refused_clearly(
    tmp_path: Path, sandbox: Sandbox, passphrase_file: Path
) -> None:
    """Restore (also --to and --dry-run) says 'is encrypted: set encryption.gpg', exit 1."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, None, encryption=passphrase_encryption(passphrase_file)),
    )
    plain = write_policy(tmp_path / "plain.yaml", policy_data(sandbox, None))
    name = backup_now(config)
    damage(sandbox, None)
    damaged = component_states(sandbox, None)
    target = tmp_path / "restored"

    for argv in (["--yes"], ["--to", str(target)], ["--dry-run"]):
        result = run_cli("restore", name, *argv, config=plain)
        assert_one_error(result, f"{name}.tar.gz.gpg is encrypted: set encryption.gpg")

    assert component_states(sandbox, None) == damaged
    assert not target.exists()
    deep = run_cli("verify", "--deep", name, config=plain)
    assert_one_error(deep, f"{name}.tar.gz.gpg is encrypted")


def test_unencrypted_backups_made_before_encryption_stay_listable_and_restorable(
    tmp_path: Path, sandbox: Sandbox, passphrase_file: Path
) -> None:
    """After the policy gains encryption, the old .tar.gz lists, verifies and restores."""
    before = tree_state(sandbox.root, live_paths(sandbox))
    old = backup_now(write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None)))
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, None, encryption=passphrase_encryption(passphrase_file)),
    )
    (sandbox.app / "memory" / "later.md").write_text("only in the encrypted backup\n")
    new = backup_now(config)

    listed = run_cli("list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    paths = {row["name"]: Path(row["path"]).name for row in json.loads(listed.stdout)}
    assert paths == {old: f"{old}.tar.gz", new: f"{new}.tar.gz.gpg"}
    verified = run_cli("verify", "--all", "--deep", config=config)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines() == [
        f"{new}: ok (deep, authenticated)",
        f"{old}: ok (deep, authenticated)",
    ]  # newest first

    damage(sandbox, None)
    restored = run_cli("restore", old, "--yes", config=config)

    assert restored.returncode == 0, restored.stderr
    assert_same_tree(tree_state(sandbox.root, live_paths(sandbox)), before)
    assert rows(sandbox.database) == {"entries": 500, "odd name": 1}
    safety = restored.stdout.split("safety backup of what was replaced: ")[1].split()[0]
    assert (sandbox.backup_dir / f"{safety}.tar.gz.gpg").is_file()
    for name in (old, new):
        drill = run_cli("test-restore", name, config=config)
        assert drill.returncode == 0, drill.stdout + drill.stderr


def test_tampered_archive_whose_tar_is_intact_fails_restore_before_anything_is_replaced(
    tmp_path: Path, sandbox: Sandbox, passphrase_file: Path, operator_home: Path
) -> None:
    """Only gpg's integrity check sees a changed last byte: restore still replaces nothing."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, None, encryption=passphrase_encryption(passphrase_file)),
    )
    name = backup_now(config)
    stored = sandbox.backup_dir / f"{name}.tar.gz.gpg"
    tampered = bytearray(stored.read_bytes())
    tampered[-1] ^= 0x01  # inside the encrypted MDC packet, after all of the tar.gz
    stored.write_bytes(bytes(tampered))
    digest = hashlib.sha256(bytes(tampered)).hexdigest()
    (sandbox.backup_dir / f"{stored.name}.sha256").write_text(f"{digest}  {stored.name}\n")
    resign(stored, sandbox.root)  # by the key's holder: gpg's own check must refuse it
    by_hand = subprocess.run(
        plain_gpg(
            operator_home, "--passphrase-file", str(passphrase_file), "--decrypt", str(stored)
        ),
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert by_hand.returncode != 0
    assert f"{name}/manifest.json" in tar_listing(by_hand.stdout)  # the plaintext looks fine
    damage(sandbox, None)
    damaged = component_states(sandbox, None)
    stored_names = backup_files(sandbox.backup_dir)

    result = run_cli("restore", name, "--yes", config=config)

    assert_one_error(result, f"{name}.tar.gz.gpg is damaged or was tampered with")
    assert component_states(sandbox, None) == damaged
    assert backup_files(sandbox.backup_dir) == stored_names
    assert list(sandbox.root.rglob(".sovbackupd-restore-*")) == []
    assert_one_error(run_cli("verify", "--deep", name, config=config), "tampered with")
    drill = run_cli("test-restore", name, config=config)
    assert drill.returncode == 1
    assert "FAIL archive:" in drill.stdout
    assert "tampered with" in drill.stdout


@pytest.mark.parametrize("problem", ["missing passphrase_file", "public_keys_file without keys"])
def test_backup_that_gpg_cannot_start_fails_clearly_and_leaves_no_file(
    tmp_path: Path, sandbox: Sandbox, problem: str
) -> None:
    """An unreadable passphrase file or key file fails the backup with one line, nothing left."""
    if problem == "missing passphrase_file":
        setting = tmp_path / "missing-passphrase"
        gpg: dict[str, Any] = {"passphrase_file": str(setting)}
        expected = f"cannot read passphrase_file {setting}"
    else:
        setting = tmp_path / "public.asc"
        setting.write_text("not a key\n")
        gpg = {"recipients": ["0123456789ABCDEF0123456789ABCDEF01234567"]}
        gpg["public_keys_file"] = str(setting)
        expected = f"public_keys_file {setting} holds no key"
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, encryption={"gpg": gpg})
    )

    result = run_cli("backup", config=config)

    assert_one_error(result, expected)
    assert backup_files(sandbox.backup_dir) == set()
