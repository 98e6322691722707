"""Red team of issue 14 (a restore cannot be turned against the server), as merged.

Each test is a break found by attacking the merged code as an adversary or a careless
operator would; each failed on the code it attacked (as a strict xfail until its fix),
and each fix brought the siblings of its break along as tests of their own.
Every backup is made and restored through the CLI or restore's public plan/run, with
real files, gzip, tar, the policy's real key and (for S3) the moto server the remote
tests use. Races are simulated, never timed: a change made between ``restore.plan``
and ``restore.run``, or when the real record check returns (wrapped, not replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from sovbackupd import archive, auth, backup, restore, verify
from sovbackupd import config as policy_config
from sovbackupd.errors import SovbackupdError, UnsafePathError
from sovbackupd.sources.base import Component
from sovbackupd.store import Store
from tests.conftest import Sandbox, policy_data, run_cli, write_policy
from tests.integration.test_remotes import keep_last, local_names, remote_backups, s3_remote
from tests.integration.test_restore import backup_now
from tests.integration.test_restore_hostile import (
    Modes,
    backup_sandbox,
    forge_setuid_shell,
    tree_state,
)
from tests.remotes import MotoServer, s3_bucket

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nroot only\n"


def content(path: Path) -> object:
    """Return what *path* holds: its tree's state for a directory, else its bytes."""
    return tree_state(path) if path.is_dir() else path.read_bytes()


def archived_bytes(backup_dir: Path) -> list[bytes]:
    """Return the content of every regular member of every gzip archive in *backup_dir*."""
    found = []
    for path in sorted(backup_dir.glob("*.tar.gz")):
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                extracted = tar.extractfile(info) if info.isreg() else None
                if extracted is not None:
                    found.append(extracted.read())
    return found


# --- --trust-unsigned must keep its promise: no owners and no setuid from the archive ---


def test_trust_unsigned_with_keep_setuid_restores_no_root_setuid_shell(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A forger without the key removes the record and adds a setuid shell: no root shell.

    docs/restore.md promises that with --trust-unsigned "the restore then keeps no owner
    from the archive ... and no setuid/setgid bit", and the threat table that nobody
    without the key can "with --trust-unsigned, give any file ... a setuid/setgid bit".
    An operator on a recovery machine without the key (told to use --trust-unsigned)
    who also passes --keep-setuid (for an app that ships setuid helpers) gets the
    forger's shell installed setuid, owned by root, since files belong to the restorer.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = run_cli("backup", config=config).stdout.strip()
    stored = sandbox.backup_dir / f"{name}.tar.gz"
    work = tmp_path / "forger"
    work.mkdir()
    forge_setuid_shell(stored, Modes(config, config, [], [], ".tar.gz"), work)
    archive.auth_path(stored).unlink()

    result = run_cli(
        "restore",
        name,
        "--only",
        "data",
        "--yes",
        "--no-safety-backup",
        "--trust-unsigned",
        "--keep-setuid",
        config=config,
    )

    shell = sandbox.app / "data" / "suidsh"
    assert "--keep-setuid notwithstanding: the backup is not authenticated" in result.stdout
    if result.returncode == 0:
        mode = stat.S_IMODE(shell.stat().st_mode)
        assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{oct(mode)} uid {shell.stat().st_uid}"
    else:
        assert len(result.stderr_lines) == 1, result.stderr
        assert not shell.exists()


# --- the safety backup reads through a link planted after the plan ---------------------


@pytest.mark.parametrize("planted", ["data", ".env"])
def test_safety_backup_reads_nothing_through_a_link_planted_after_the_plan(
    tmp_path: Path, sandbox: Sandbox, planted: str
) -> None:
    """Whoever owns the app dir swaps data (or .env) for a link to root's files: not archived.

    The plan resolves the way to each destination once and the swap refuses a name that
    changed, but the pre-restore safety backup runs in between (after the confirmation
    prompt and the whole extraction: a long window, which inotify on the staging dir
    makes easy to hit) and captures the policy's paths by name, following the link as
    root. The swap then refuses (data) or replaces the link (.env), yet the safety
    backup, signed with the key, already holds the root-only file the app dir's owner
    chose: kept in backup_dir as an authenticated backup, and put into the app's tree
    with its own mode by the undo command restore prints (``restore <safety> --yes``).
    docs/restore.md: "a link planted after the plan leads nowhere".
    Simulated between the public ``restore.plan`` and ``restore.run``, as the window of
    the confirmation prompt is in test_restore_hostile.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    victim = tmp_path / "root-only"
    victim.mkdir(mode=0o700)
    (victim / "id_rsa").write_bytes(SECRET)
    (victim / "id_rsa").chmod(0o600)
    policy = policy_config.load(config, {})
    stored = Store(policy.backup_dir, policy.name_prefix).find(editor.top)
    component: Component = "data" if planted == "data" else "config"
    planned = restore.plan(policy, stored, only={component})
    assert planned.safety_sources is not None
    live = sandbox.app / planted
    live.rename(sandbox.app / f"{planted}.moved")
    live.symlink_to(victim if planted == "data" else victim / "id_rsa")

    victim_before = tree_state(victim)

    try:
        restore.run(policy, planned)
    except SovbackupdError as error:
        assert "Traceback" not in str(error)

    assert all(SECRET not in content for content in archived_bytes(sandbox.backup_dir))
    assert tree_state(victim) == victim_before


@pytest.mark.parametrize("planted", ["data", ".env"])
def test_a_link_planted_while_the_safety_backup_reads_gets_that_safety_backup_deleted(
    tmp_path: Path, sandbox: Sandbox, planted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link planted while the safety backup runs: that backup is deleted, nothing replaced.

    The check before the safety backup cannot see a link made while it reads; the one
    after it can, and a safety backup that may hold what the link led to is not kept.
    Simulated by planting the link when the real safety backup returns.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    victim = tmp_path / "root-only"
    victim.mkdir(mode=0o700)
    (victim / "id_rsa").write_bytes(SECRET)
    policy = policy_config.load(config, {})
    store = Store(policy.backup_dir, policy.name_prefix)
    component: Component = "data" if planted == "data" else "config"
    planned = restore.plan(policy, store.find(editor.top), only={component})
    live = sandbox.app / planted
    moved = sandbox.app / f"{planted}.moved"
    real_run = backup.run
    taken: list[str] = []

    def run_then_plant(*arguments: Any, **options: Any) -> backup.BackupResult:
        result = real_run(*arguments, **options)
        taken.append(result.name)
        live.rename(moved)
        live.symlink_to(victim if planted == "data" else victim / "id_rsa")
        return result

    monkeypatch.setattr(backup, "run", run_then_plant)
    before = content(live)

    with pytest.raises(UnsafePathError) as refused:
        restore.run(policy, planned)

    assert taken, "the safety backup ran"
    assert f"the safety backup {taken[0]} taken meanwhile was deleted" in str(refused.value)
    assert taken[0] not in {stored.name for stored in store.backups()}
    assert not list(sandbox.backup_dir.glob(f"{taken[0]}*"))
    assert live.is_symlink()  # the restore replaced nothing: the link is as planted
    assert content(moved) == before
    assert (victim / "id_rsa").read_bytes() == SECRET


# --- --trust-unsigned must not let a mismatched record through -------------------------


def test_trust_unsigned_refuses_a_record_whose_files_do_not_match_under_a_foreign_key_id(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A genuine record, altered only in key_id, does not vouch for files it does not list.

    docs/restore.md: "A record that fails (a bad MAC, a changed file, a copy under another
    name) is never accepted", even with --trust-unsigned. Yet ``auth.vouched`` returns
    FOREIGN as soon as key_id is not ours, before comparing any digest: a forger keeps
    the record of the backup they rewrote, changes one hex digit of key_id, and verify
    --deep --trust-unsigned says "ok (deep, foreign key)" of an archive whose sha256 is
    not the one the record lists; restore --trust-unsigned takes it. After a key loss
    (every older backup is "foreign key", restorable with --trust-unsigned only, says the
    escrow paragraph) such a forgery reads exactly like a genuine old backup.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = run_cli("backup", config=config).stdout.strip()
    stored = sandbox.backup_dir / f"{name}.tar.gz"
    work = tmp_path / "forger"
    work.mkdir()
    forge_setuid_shell(stored, Modes(config, config, [], [], ".tar.gz"), work)
    record_path = archive.auth_path(stored)
    record = json.loads(record_path.read_text())
    record["key_id"] = ("1" if record["key_id"][0] != "1" else "2") + record["key_id"][1:]
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    forged_sha256 = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert record["files"][stored.name] != forged_sha256  # the record lists other bytes
    destination = tmp_path / "restored"

    deep = run_cli("verify", name, "--deep", "--trust-unsigned", config=config)
    restored = run_cli("restore", name, "--to", str(destination), "--trust-unsigned", config=config)

    assert deep.returncode == 1, deep.stdout
    assert "is not what" in deep.stderr, deep.stderr
    assert restored.returncode == 65, restored.stdout
    assert not destination.exists()


# --- the key file of the documented deployment ----------------------------------------


def test_root_restores_with_the_key_the_service_user_created(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The daemon (User=sovbackupd) creates the key; root's restore must be able to use it.

    docs/systemd.md: the first backup creates ``/var/lib/sovbackupd/auth.key`` in the
    service's StateDirectory, and as root ``create_key`` gives it to that directory's
    owner: either way the key belongs to the service user, 0400. Restore runs as root
    (docs/restore.md), and ``load_key`` accepts only a key owned by the reader or root:
    every restore, verify and test-restore that root runs fails with exit 78, leaving the
    operator --trust-unsigned (no owners) or a chown as the way out on the worst day.
    Here root's first backup creates the key in a StateDirectory owned by uid 65534, and
    create_key gives it to 65534, as it would to the service user.
    """
    state = tmp_path / "var-lib-sovbackupd"  # the StateDirectory, the service user's
    state.mkdir(mode=0o700)
    service_user = 65534
    os.chown(state, service_user, service_user)
    key = state / "auth.key"
    data = policy_data(sandbox, None, authentication={"key_file": str(key)})
    config = write_policy(tmp_path / "policy.yaml", data)
    backed_up = run_cli("backup", config=config)
    assert backed_up.returncode == 0, backed_up.stderr
    name = backed_up.stdout.strip()
    assert key.stat().st_uid == service_user  # create_key gave it to the directory's owner
    destination = tmp_path / "restored"

    verified = run_cli("verify", name, config=config)
    restored = run_cli("restore", name, "--to", str(destination), config=config)

    assert verified.returncode == 0, verified.stderr
    assert restored.returncode == 0, restored.stderr
    assert (destination / str(sandbox.app).lstrip("/") / ".env").exists()


# --- --to DIR: a directory that is the live tree under another name -------------------


def in_private_mounts(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the shell *script* (with *arguments* as $1...) in a mount namespace of its own.

    The bind mount it makes is seen by no other process and vanishes with it; the test
    is skipped where this system lets no one make one (no CAP_SYS_ADMIN, no unshare).
    """
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to make a private bind mount")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is refused here: {probe.stderr.decode().strip()}")
    return subprocess.run(
        [unshare, "-m", "sh", "-c", script, "sh", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("bound", ["root", "app"])
def test_restore_to_a_bind_mount_of_the_root_is_refused(
    tmp_path: Path, sandbox: Sandbox, bound: str
) -> None:
    """--to DIR where DIR is / under another name (a bind mount) must be refused as / is.

    check_target_dir compares path strings (with realpath), so it refuses --to / and
    --to /tmp/.. but not a directory that is the same directory as / by identity: a
    rescue or container host's ``/mnt/host`` bind mount, say (or of the app dir, which
    holds the live paths: *bound*). Such a --to restore
    replaces the live files and deletes what is live only, with no confirmation, no
    safety backup and no restore.stop, which is what issue 14 case 4 was about.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    since = sandbox.app / "data" / "since-backup.txt"
    since.write_text("written after the backup\n")
    live_before = tree_state(sandbox.app)
    alias = tmp_path / "alias"
    alias.mkdir()

    ran = in_private_mounts(
        'mount --rbind "$5" "$1" && exec "$2" -m sovbackupd --config "$3" restore "$4" --to "$1"',
        str(alias),
        sys.executable,
        str(config),
        editor.top,
        "/" if bound == "root" else str(sandbox.app),
    )

    assert since.exists(), "the live file written after the backup is gone"
    assert tree_state(sandbox.app) == live_before
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "--to" in ran.stderr


# --- verify --deep checks other bytes than the ones the record vouched for ------------


def test_verify_deep_never_calls_a_forgery_swapped_in_after_the_check_authenticated(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consistent forgery swapped in once the record was checked is not "ok (authenticated)".

    Restore reads only the bytes the record vouched for (test_restore_hostile's
    test_files_swapped_after_the_authentication_check_are_refused), but verify checks
    the record with ``auth.check`` and then reads the sidecar, the manifest and every
    member again from their names. Whoever writes backup_dir swaps in the forgery (a
    setuid shell, sidecar and both manifests consistent) right after the record's files
    were hashed, which inotify shows them, and verify --deep says "authenticated" of it.
    The race is simulated by forging when the record check returns (whichever of
    ``auth.check`` and ``auth.vouched`` verify calls).
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = run_cli("backup", config=config).stdout.strip()
    policy = policy_config.load(config, {})
    stored = Store(policy.backup_dir, policy.name_prefix).find(name)
    work = tmp_path / "forger"
    work.mkdir()
    forged: list[str] = []
    checked, vouched = auth.check, auth.vouched

    def forge_once() -> None:
        if not forged:
            forge_setuid_shell(stored.path, Modes(config, config, [], [], ".tar.gz"), work)
            forged.append(stored.name)

    def check_then_swapped(archive_path: Path, backup: str, key: auth.Key | None) -> auth.Status:
        status = checked(archive_path, backup, key)
        forge_once()
        return status

    def vouched_then_swapped(
        archive_path: Path, backup: str, key: auth.Key | None
    ) -> tuple[auth.Status, dict[str, str]]:
        found = vouched(archive_path, backup, key)
        forge_once()
        return found

    monkeypatch.setattr(auth, "check", check_then_swapped)
    monkeypatch.setattr(auth, "vouched", vouched_then_swapped)

    verdict = verify.check(stored, True, key=auth.policy_key(policy))

    assert forged, "the forgery was swapped in"
    assert not verdict.ok, verdict


def test_a_backup_creates_no_new_key_once_backups_signed_with_one_exist(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The first backup creates the key; a later one finding it gone must not make another.

    docs/restore.md: "The first backup creates it". ``ensure_key`` creates a key whenever
    the file is missing, so a key deleted, lost with a disk, or moved by a key_file typo
    in the policy is replaced without a word but a log line: every earlier backup turns
    "foreign key", verify and restore refuse them until --trust-unsigned (which keeps no
    owners, and under which a forgery reads like them), and the escrowed copy no longer
    signs what is made from then on. Refusing, with the key_file and "sovbackupd key
    init" in the message, keeps the operator in the loop.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    first = run_cli("backup", config=config)
    assert first.returncode == 0, first.stderr
    key = tmp_path / "auth.key"
    key.rename(tmp_path / "auth.key.lost")

    second = run_cli("backup", config=config)

    assert not key.exists(), "a new key was created in place of the lost one"
    assert second.returncode != 0, second.stdout
    assert str(key) in second.stderr


# --- remote retention counts copies by the presence of a record, not by its check -----


@pytest.mark.usefixtures("aws_environment")
def test_remote_retention_never_prunes_for_copies_signed_with_another_key(
    tmp_path: Path, sandbox: Sandbox, moto_server: MotoServer
) -> None:
    """Copies a bucket holds of another key's backups neither count nor get ours deleted.

    docs/restore.md: "Retention never counts or deletes a backup whose record fails, nor
    an unsigned or foreign-key one dated after the oldest authenticated backup". On a
    remote, ``retention.remote_plan`` only asks whether a copy *has* a record
    (``backup.auth is not None``), never whether it checks. Two servers left with the
    default name_prefix and one bucket (or a bucket holder uploading copies with any
    ``.auth.json``): the other's copies, newer than our oldest, count for our keep_last
    2, so our next backup's retention deletes our older off-site copy (backup_dir still
    keeps it) and one of theirs. The other server keeps everything here (keep_last 10):
    only our own retention decides.
    """
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry], **keep_last(2))
    )
    elsewhere = tmp_path / "other-server"
    elsewhere.mkdir()
    other = policy_data(sandbox, None, remotes=[entry], **keep_last(10))
    other.update(
        backup_dir=str(elsewhere / "backups"),
        authentication={"key_file": str(elsewhere / "auth.key")},
    )
    other_config = write_policy(elsewhere / "policy.yaml", other)

    made = [backup_now(config)]
    for policy_file in (other_config, other_config, config):
        time.sleep(1)  # a name of its own second: both servers name by the clock
        made.append(backup_now(policy_file))

    ours, theirs, newest = made[0], made[1:3], made[3]
    assert len(set(made)) == len(made)
    assert local_names(sandbox) == [ours, newest]
    held = remote_backups(target)
    assert ours in held, "our retention deleted our copy for the other server's"
    assert set(theirs) <= set(held), "our retention deleted a copy it cannot authenticate"
    listed = run_cli("list", "--remote", entry["name"], config=config)
    assert listed.returncode == 0, listed.stderr
    for name in theirs:
        [warning] = [line for line in listed.stderr_lines if name in line]
        assert "is not authenticated" in warning
        assert "foreign key, yet newer than" in warning


# --- restore --from: a forged copy on the remote -----------------------------------------


@pytest.mark.usefixtures("aws_environment")
def test_a_forged_copy_on_the_remote_is_refused_by_restore_from_and_lands_nowhere(
    tmp_path: Path, sandbox: Sandbox, moto_server: MotoServer
) -> None:
    """A bucket holder's consistent rewrite (setuid shell) is refused before it is kept.

    The server's disk is gone: `restore --from s3` fetches the copy. The forged archive,
    manifest and sidecar agree with each other but not with the record (the forger has
    no key): one line, exit 65, nothing restored, and no file of the forgery left in
    backup_dir, where retention and the next restore would meet it again.
    """
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry]))
    name = backup_now(config)
    work = tmp_path / "forger"
    work.mkdir()
    stored = work / f"{name}.tar.gz"
    for suffix in (".tar.gz", ".manifest.json", ".tar.gz.sha256"):
        target.download(f"{name}{suffix}", work / f"{name}{suffix}")
    (work / "edit").mkdir()
    forge_setuid_shell(stored, Modes(config, config, [], [], ".tar.gz"), work / "edit")
    for suffix in (".tar.gz", ".manifest.json", ".tar.gz.sha256"):
        target.upload(work / f"{name}{suffix}", f"{name}{suffix}")
    for path in sandbox.backup_dir.glob(f"{name}*"):
        path.unlink()  # the disaster: only the remote copy is left
    destination = tmp_path / "restored"

    result = run_cli("restore", name, "--from", "s3", "--to", str(destination), config=config)

    assert result.returncode == 65, result.stdout
    [line] = result.stderr_lines
    assert name in line
    assert "is not what" in line
    assert not destination.exists() or not any(destination.rglob("suidsh"))
    assert list(sandbox.backup_dir.glob(f"{name}*")) == []
