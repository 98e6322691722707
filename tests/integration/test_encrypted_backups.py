"""Encrypted backups end to end through the CLI: real gpg, a real redis-server, real SQLite.

The crypto module's own tests (test_crypto.py) cover streams, argv and the environment of
gpg; these run sovbackupd as an operator would, on a sandbox server, with policies that
carry ``encryption: {gpg: ...}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from sovbackupd import archive, backup, config
from sovbackupd.errors import ArchiveError
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

    # The encrypted manifest is the first thing decrypted: the error names it.
    assert_one_error(result, "wrong passphrase", f"{name}.manifest.json.gpg")
    assert component_states(sandbox, redis_server) == damaged
    assert sorted(path.name for path in sandbox.backup_dir.iterdir()) == stored
    assert list(sandbox.root.rglob(".sovbackupd-restore-*")) == []
    assert redis_server.client().ping()
    deep = run_cli("verify", "--deep", name, config=config)
    assert_one_error(deep, "wrong passphrase", f"{name}.manifest.json.gpg")
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
    assert_one_error(deep, f"{name}.manifest.json.gpg", "secret_keys_file")
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


CANARY = "canary-5c2e9a1f-file-list.txt"


def plaintext_secrets(sandbox: Sandbox) -> list[bytes]:
    """What a file list gives away: a member's name, a table's name, the .env's sha256."""
    env_digest = hashlib.sha256((sandbox.app / ".env").read_bytes()).hexdigest()
    return [
        CANARY.encode(),
        b"odd name",
        b"sovereign_rekor.db",
        b"config/.env",
        env_digest.encode(),
    ]


def leaks(files: list[Path], secrets: list[bytes]) -> list[str]:
    """Return which of *files* hold which of *secrets* in plaintext."""
    return [
        f"{path.name} holds {secret!r}"
        for path in files
        for secret in secrets
        if secret in path.read_bytes()
    ]


def files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


@dataclass(frozen=True)
class Mode:
    """The server's gpg settings, the recovery machine's, and how plain gpg opens a file."""

    server: dict[str, Any]
    recovery: dict[str, Any]
    unlock: list[str]


@pytest.fixture
def encryption_mode(
    request: pytest.FixtureRequest,
    passphrase_file: Path,
    recipient_key: GpgKey,
    operator_home: Path,
) -> Mode:
    """The mode in the param; in public-key mode the operator's gpg holds the secret key."""
    if request.param == "passphrase":
        settings = passphrase_encryption(passphrase_file)
        return Mode(settings, settings, ["--passphrase-file", str(passphrase_file)])
    subprocess.run(
        plain_gpg(operator_home, "--import", str(recipient_key.secret_file)),
        capture_output=True,
        check=True,
        timeout=120,
    )
    server = {
        "recipients": [recipient_key.fingerprint],
        "public_keys_file": str(recipient_key.public_file),
    }
    recovery = {**server, "secret_keys_file": str(recipient_key.secret_file)}
    return Mode({"gpg": server}, {"gpg": recovery}, [])


@pytest.mark.parametrize("encryption_mode", ["passphrase", "public-key"], indirect=True)
def test_no_file_of_an_encrypted_backup_holds_its_file_list_in_plaintext(
    tmp_path: Path, sandbox: Sandbox, encryption_mode: Mode, operator_home: Path
) -> None:
    """Beside the archive lie a head and the encrypted manifest; plain gpg opens the latter."""
    (sandbox.app / "data" / CANARY).write_text("a name that only the file list holds\n")
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, encryption=encryption_mode.server)
    )
    recovered = write_policy(
        tmp_path / "recovery.yaml",
        policy_data(sandbox, None, encryption=encryption_mode.recovery),
    )

    name = backup_now(config)

    stored = files_under(sandbox.backup_dir)
    assert {path.name for path in stored} >= {
        f"{name}.tar.gz.gpg",
        f"{name}.tar.gz.gpg.sha256",
        f"{name}.manifest.json",
        f"{name}.manifest.json.gpg",
    }
    assert leaks(stored, plaintext_secrets(sandbox)) == []
    head = json.loads((sandbox.backup_dir / f"{name}.manifest.json").read_bytes())
    assert (head["manifest"], head["files"], head["id"]) == ("encrypted", [], name)
    opened = [
        subprocess.run(
            plain_gpg(
                operator_home,
                *encryption_mode.unlock,
                "--decrypt",
                str(sandbox.backup_dir / file),
            ),
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
        for file in (f"{name}.manifest.json.gpg", f"{name}.tar.gz.gpg")
    ]
    member = subprocess.run(
        [require_tool("tar"), "-xzOf", "-", f"{name}/manifest.json"],
        input=opened[1],
        capture_output=True,
        check=True,
    ).stdout
    assert opened[0] == member  # byte for byte the manifest inside
    assert CANARY.encode() in member
    listed = run_cli("list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["files"], row["warnings"]) == (name, head["file_count"], None)
    assert run_cli("verify", name, config=config).stdout.strip() == f"{name}: ok (authenticated)"
    deep = run_cli("verify", "--deep", name, config=recovered)
    assert (deep.returncode, deep.stdout.strip()) == (
        0,
        f"{name}: ok (deep, authenticated)",
    ), deep.stderr
    drill = run_cli("test-restore", name, config=recovered)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert leaks(files_under(sandbox.backup_dir), plaintext_secrets(sandbox)) == []


def edit_head(path: Path) -> None:
    """Change the tiers in the head: a head that is not its manifest's."""
    head = json.loads(path.read_bytes())
    head["tiers"] = ["monthly"]
    path.write_text(json.dumps(head, indent=1))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("missing", "manifest.json.gpg is missing"),
        ("damaged", "manifest.json.gpg is damaged or was tampered with"),
        ("not its head", "manifest.json is not the head of the manifest in"),
    ],
)
def test_a_head_whose_encrypted_manifest_is_missing_damaged_or_not_its_own_is_refused(
    tmp_path: Path, sandbox: Sandbox, passphrase_file: Path, problem: str, expected: str
) -> None:
    """restore, verify --deep and test-restore refuse it in one line; nothing live changes."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, None, encryption=passphrase_encryption(passphrase_file)),
    )
    name = backup_now(config)
    encrypted_copy = sandbox.backup_dir / f"{name}.manifest.json.gpg"
    if problem == "missing":
        encrypted_copy.unlink()
    elif problem == "damaged":
        flip_last_byte(encrypted_copy)
    else:
        edit_head(sandbox.backup_dir / f"{name}.manifest.json")
    # By the key's holder: the checks behind authentication must refuse it.
    resign(sandbox.backup_dir / f"{name}.tar.gz.gpg", sandbox.root)
    damage(sandbox, None)
    damaged = component_states(sandbox, None)

    for argv in (["--yes"], ["--to", str(tmp_path / "elsewhere")], ["--dry-run"]):
        assert_one_error(run_cli("restore", name, *argv, config=config), expected)
    assert_one_error(run_cli("verify", "--deep", name, config=config), expected)
    drill = run_cli("test-restore", name, config=config)

    assert drill.returncode == 1
    assert expected in drill.stdout
    assert component_states(sandbox, None) == damaged
    assert not (tmp_path / "elsewhere").exists()
    assert list(sandbox.root.rglob(".sovbackupd-restore-*")) == []
    shallow = run_cli("verify", name, config=config)
    if problem == "missing":  # the shallow check sees only that the file is gone
        assert_one_error(shallow, expected)


def test_an_encrypted_backup_made_before_heads_still_lists_verifies_and_restores(
    tmp_path: Path,
    sandbox: Sandbox,
    passphrase_file: Path,
    operator_home: Path,
) -> None:
    """Its whole manifest in plaintext beside the archive, no .manifest.json.gpg: as before."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(sandbox, None, encryption=passphrase_encryption(passphrase_file)),
    )
    before = tree_state(sandbox.root, live_paths(sandbox))
    name = backup_now(config)
    # Today's code made exactly this: the manifest inside, in plaintext beside the archive.
    encrypted_copy = sandbox.backup_dir / f"{name}.manifest.json.gpg"
    whole = subprocess.run(
        plain_gpg(
            operator_home,
            "--passphrase-file",
            str(passphrase_file),
            "--decrypt",
            str(encrypted_copy),
        ),
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    (sandbox.backup_dir / f"{name}.manifest.json").write_bytes(whole)
    encrypted_copy.unlink()
    (sandbox.backup_dir / f"{name}.auth.json").unlink()  # that code signed nothing either

    listed = run_cli("list", "--json", config=config)
    assert [row["name"] for row in json.loads(listed.stdout)] == [name]
    deep = run_cli("verify", "--deep", "--trust-unsigned", name, config=config)
    assert (deep.returncode, deep.stdout.strip()) == (0, f"{name}: ok (deep, unsigned)"), (
        deep.stderr
    )
    damage(sandbox, None)
    restored = run_cli("restore", name, "--yes", "--trust-unsigned", config=config)

    assert restored.returncode == 0, restored.stderr
    assert_same_tree(tree_state(sandbox.root, live_paths(sandbox)), before)
    assert rows(sandbox.database) == {"entries": 500, "odd name": 1}
    drill = run_cli("test-restore", "--trust-unsigned", name, config=config)
    assert drill.returncode == 0, drill.stdout + drill.stderr


def test_retention_deletes_the_encrypted_manifest_with_its_backup(
    tmp_path: Path, sandbox: Sandbox, passphrase_file: Path
) -> None:
    """A pruned encrypted backup leaves none of its files behind, the .manifest.json.gpg too."""
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(
            sandbox,
            None,
            encryption=passphrase_encryption(passphrase_file),
            tiers={"daily": {"schedule": "0 2 * * *", "keep": 1}},
        ),
    )
    first = run_cli("backup", "--tier", "daily", config=config)
    assert first.returncode == 0, first.stderr
    old = first.stdout.strip()
    assert (sandbox.backup_dir / f"{old}.manifest.json.gpg").is_file()

    second = run_cli("backup", "--tier", "daily", config=config)

    assert second.returncode == 0, second.stderr
    new = second.stdout.strip()
    assert [name for name in backup_files(sandbox.backup_dir) if name.startswith(old)] == []
    assert {name for name in backup_files(sandbox.backup_dir) if name.startswith(new)} == {
        f"{new}.tar.gz.gpg",
        f"{new}.tar.gz.gpg.sha256",
        f"{new}.manifest.json",
        f"{new}.manifest.json.gpg",
        f"{new}.auth.json",
    }


def test_a_backup_whose_encrypted_manifest_does_not_decrypt_back_is_discarded(
    tmp_path: Path, sandbox: Sandbox, passphrase_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-back before commit decrypts the .manifest.json.gpg: a torn one fails the run."""
    fill = archive.fill_atomically

    def tearing(path: Path, write: Callable[[BinaryIO], None], owner: Any = None) -> None:
        def torn(handle: BinaryIO) -> None:
            whole = io.BytesIO()
            write(cast(BinaryIO, whole))
            handle.write(whole.getvalue()[:-40])  # what a torn write leaves

        fill(path, torn if path.name.endswith(".manifest.json.gpg") else write, owner)

    monkeypatch.setattr(archive, "fill_atomically", tearing)
    policy = config.load(
        write_policy(
            tmp_path / "policy.yaml",
            policy_data(sandbox, None, encryption=passphrase_encryption(passphrase_file)),
        )
    )

    with pytest.raises(ArchiveError, match=r"was discarded: .*manifest\.json\.gpg"):
        backup.run(policy, ["daily"])

    assert not [name for name in backup_files(sandbox.backup_dir) if "backup_" in name]
