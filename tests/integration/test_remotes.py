"""Off-site copies wired end to end: `backup` and the daemon replicate to real remotes.

The targets themselves are tested in test_targets_faults.py; here the CLI and the daemon
run as an operator runs them, against the real sshd + rsync, moto's S3 server over HTTP
and the GCS emulator of tests/remotes.py: uploads, retention on remotes, faults and the
next run catching up, disaster recovery from a bucket, and the remote metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from sovbackupd import targets
from sovbackupd.store import Store
from sovbackupd.targets.gcs import GcsTarget
from sovbackupd.targets.rsync import RsyncTarget
from sovbackupd.targets.s3 import S3Target
from tests.conftest import (
    CliResult,
    RedisServer,
    Sandbox,
    backup_files,
    policy_data,
    run_cli,
    stored_files,
    write_policy,
)
from tests.integration.test_daemon import (
    EVERY_4_SECONDS,
    DaemonProcess,
    Scrape,
    daemon_policy,
    notify_socket,
    scrape,
    scrape_when_up,
    start_daemon,
)
from tests.integration.test_encrypted_backups import (
    CANARY,
    files_under,
    leaks,
    passphrase_encryption,
    passphrase_file,
    plaintext_secrets,
)
from tests.integration.test_restore import (
    assert_same_tree,
    backup_now,
    keys,
    live_paths,
    restart_commands,
    rows,
    tree_state,
)
from tests.integration.test_targets_faults import refused_key
from tests.remotes import (
    GcsEmulator,
    MotoServer,
    SshServer,
    TcpProxy,
    gcs_bucket,
    gcs_target,
    rsync_target,
    s3_bucket,
    s3_target,
)

# Fixtures of other test modules, requested by name below.
__all__ = ["notify_socket", "passphrase_file", "restart_commands", "start_daemon"]

PREFIX = "sovereigncore_backup"
S3_PREFIX = "backups/sovereigncore/"
UPLOADS = "sovbackupd_remote_uploads_total"
LAST_SUCCESS = "sovbackupd_remote_last_success_timestamp_seconds"
STORED = "sovbackupd_backups_stored"
# The retrying wrapper as the daemon builds it, with waits of a tenth of a second: the
# same attempts, log lines and give-up path, without the default 2-60 s backoff.
FAST_RETRIES = '''"""Shorter backoff for the remotes tests (tests/integration/test_remotes.py)."""
from sovbackupd import targets
from sovbackupd.targets.retry import Backoff

targets.build_target.__kwdefaults__["backoff"] = Backoff(
    attempts=3, initial_seconds=0.05, max_seconds=0.2
)
'''


@pytest.fixture
def fast_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every sovbackupd process this test starts retry remotes within a second."""
    seam = tmp_path / "fast-retries"
    seam.mkdir()
    (seam / "sitecustomize.py").write_text(FAST_RETRIES)
    inherited = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(seam), inherited])))


@pytest.fixture
def proxies() -> Iterator[list[TcpProxy]]:
    """TcpProxies a test puts in front of a remote; closed afterwards."""
    started: list[TcpProxy] = []
    yield started
    for proxy in started:
        take_down(proxy)


def take_down(proxy: TcpProxy) -> None:
    """Stop *proxy* for good, so that every connection to it is refused.

    TcpProxy.down() closes the listener under an accept() that stays blocked and still
    lets one more connection through to the server: spend that one here.
    """
    proxy.down()
    with contextlib.suppress(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()


def as_policy(target: RsyncTarget | S3Target | GcsTarget) -> dict[str, Any]:
    """Return the policy entry of *target*, built by the helpers of tests/remotes.py."""
    return target.config.model_dump(mode="json", exclude_none=True)


def s3_remote(endpoint_url: str, bucket: str) -> tuple[dict[str, Any], targets.Target]:
    """Return the policy entry of an S3 remote named s3, and its target to inspect it.

    The credentials come from the aws_environment fixture, which the CLI inherits.
    """
    target = s3_target(endpoint_url, bucket)
    return as_policy(target), target


def rsync_remote(
    server: SshServer, directory: Path, **fields: Any
) -> tuple[dict[str, Any], targets.Target]:
    """Return the policy entry of an rsync remote named rsync, and its target."""
    target = rsync_target(server, directory, **fields)
    return as_policy(target), target


def remote_backups(target: targets.Target) -> dict[str, bool]:
    """Return each backup *target* holds, by name, and whether it is complete there."""
    return {backup.name: backup.complete for backup in targets.list_backups(target.list(), PREFIX)}


def local_names(sandbox: Sandbox) -> list[str]:
    """Return the backups in the sandbox's backup_dir, oldest first."""
    return [backup.name for backup in Store(sandbox.backup_dir, PREFIX).backups()]


def s3_keys(endpoint_url: str, bucket: str) -> set[str]:
    """Return every key in *bucket*, and any multipart upload left open, as S3 has them."""
    client = boto3.session.Session(region_name="us-east-1").client("s3", endpoint_url=endpoint_url)
    listed = client.list_objects_v2(Bucket=bucket)
    found = {entry["Key"] for entry in listed.get("Contents", [])}
    open_uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return found | {f"open upload of {upload['Key']}" for upload in open_uploads}


def gcs_names(endpoint: str, bucket: str) -> set[str]:
    """Return every object name in *bucket* of the GCS emulator."""
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]  # untyped in google-auth
        client_options=ClientOptions(api_endpoint=endpoint),
    )
    return {blob.name for blob in client.list_blobs(bucket)}


def cli_ok(*arguments: str, config: Path) -> CliResult:
    """Run the CLI; fail the test unless it exits 0."""
    result = run_cli(*arguments, config=config, timeout=120)
    assert result.returncode == 0, f"{arguments}: {result.stdout}{result.stderr}"
    return result


def warnings(result: CliResult) -> list[str]:
    """Return the lines sovbackupd itself printed on stderr (not the JSON log events)."""
    return [line for line in result.stderr_lines if line.startswith("sovbackupd: ")]


def backup_with_warning(config: Path, remote: str, *says: str) -> str:
    """Run `backup` with *remote* failing: exit 0, one warning naming it; return the name."""
    result = run_cli("backup", config=config, timeout=120)
    assert result.returncode == 0, result.stderr
    [line] = warnings(result)
    assert line.startswith(f"sovbackupd: warning: remote {remote}: "), line
    for fragment in says:
        assert fragment in line, line
    return result.stdout.strip()


def assert_local_backup_intact(config: Path, sandbox: Sandbox, name: str) -> None:
    """The backup *name* is in backup_dir whole and passes `verify --deep`."""
    assert stored_files(name) <= backup_files(sandbox.backup_dir)
    verified = cli_ok("verify", name, "--deep", config=config)
    assert verified.stdout.strip() == f"{name}: ok (deep, authenticated)"


def s3_behind_proxy(
    moto_server: MotoServer, proxies: list[TcpProxy]
) -> tuple[dict[str, Any], targets.Target, TcpProxy]:
    """Return an S3 remote whose connections go through a TcpProxy, its target and proxy."""
    bucket = s3_bucket(moto_server.endpoint_url)
    proxy = TcpProxy(moto_server.port)
    proxies.append(proxy)
    entry, _ = s3_remote(f"http://127.0.0.1:{proxy.port}", bucket)
    _, direct = s3_remote(moto_server.endpoint_url, bucket)
    return entry, direct, proxy


@pytest.mark.usefixtures("aws_environment")
def test_backup_uploads_to_rsync_s3_and_gcs_where_list_and_verify_see_it_complete(
    tmp_path: Path,
    sandbox: Sandbox,
    sshd: SshServer,
    moto_server: MotoServer,
    gcs_emulator: GcsEmulator,
) -> None:
    """One backup lands on each remote as its three files; list, verify and --deep agree."""
    bucket = s3_bucket(moto_server.endpoint_url)
    gcs = gcs_bucket(gcs_emulator.endpoint)
    far_dir = tmp_path / "far-side"
    remotes = [
        rsync_remote(sshd, far_dir)[0],
        s3_remote(moto_server.endpoint_url, bucket)[0],
        as_policy(gcs_target(gcs_emulator.endpoint, gcs)),
    ]
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=remotes))

    result = cli_ok("backup", config=config)

    name = result.stdout.strip()
    assert result.stderr_lines == [], result.stderr
    archive = sandbox.backup_dir / f"{name}.tar.gz"
    for remote in ("rsync", "s3", "gcs"):
        listed = json.loads(cli_ok("list", "--remote", remote, "--json", config=config).stdout)
        assert [(row["name"], row["remote"], row["complete"]) for row in listed] == [
            (name, remote, True)
        ]
        assert listed[0]["size"] == archive.stat().st_size
        assert listed[0]["object"] == archive.name
        shallow = cli_ok("verify", "--remote", remote, config=config)
        assert shallow.stdout.strip() == f"{name}: ok on {remote}"
        deep = cli_ok("verify", "--remote", remote, name, "--deep", config=config)
        assert deep.stdout.strip() == f"{name}: ok on {remote} (deep)"
    assert backup_files(far_dir) == stored_files(name)
    assert s3_keys(moto_server.endpoint_url, bucket) == {
        S3_PREFIX + file for file in stored_files(name)
    }
    assert gcs_names(gcs_emulator.endpoint, gcs) == {
        S3_PREFIX + file for file in stored_files(name)
    }
    assert (far_dir / archive.name).read_bytes() == archive.read_bytes()
    assert not list(sandbox.backup_dir.glob(".verify-*")), "verify --deep left scratch files"


def keep_last(count: int) -> dict[str, Any]:
    """Retention keeping the newest *count* backups, and no tier (nor manual_keep) keeping more."""
    return {
        "tiers": {"daily": {"schedule": "0 2 * * *", "keep": 0}},
        "retention": {"keep_last": count, "manual_keep": "0h"},
    }


@pytest.mark.usefixtures("aws_environment")
def test_remote_retention_keeps_by_name_what_local_retention_keeps(
    tmp_path: Path, sandbox: Sandbox, moto_server: MotoServer
) -> None:
    """With keep_last 2, after each of three backups the bucket holds the local ones."""
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry], **keep_last(2))
    )
    made = []
    for _ in range(3):
        made.append(backup_now(config))
        kept = local_names(sandbox)
        assert kept == made[-2:]
        assert remote_backups(target) == dict.fromkeys(kept, True)
    assert s3_keys(moto_server.endpoint_url, bucket) == {
        S3_PREFIX + file for name in made[-2:] for file in stored_files(name)
    }
    listed = json.loads(cli_ok("list", "--remote", "s3", "--json", config=config).stdout)
    assert [(row["name"], row["kept_by"] != []) for row in listed] == [
        (made[2], True),
        (made[1], True),
    ]


@pytest.mark.usefixtures("aws_environment")
def test_remote_retention_keeps_pinned_and_manual_backups(
    tmp_path: Path, sandbox: Sandbox, moto_server: MotoServer
) -> None:
    """A pin in backup_dir keeps the remote copy too, until unpin; so does manual_keep."""
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry], **keep_last(1))
    )
    pinned = backup_now(config)
    cli_ok("pin", pinned, config=config)
    second = backup_now(config)
    third = cli_ok("backup", config=config)
    latest = third.stdout.strip()
    assert third.stderr_lines == [
        f"sovbackupd: retention deleted {second}",
        f"sovbackupd: retention deleted {second} from remote s3",
    ]
    assert remote_backups(target) == {pinned: True, latest: True}
    listed = json.loads(cli_ok("list", "--remote", "s3", "--json", config=config).stdout)
    assert [row["kept_by"][-1] for row in listed] == ["newest successful backup", "pinned"]

    cli_ok("unpin", pinned, config=config)
    after = backup_now(config)
    assert remote_backups(target) == {after: True}

    manual = write_policy(
        tmp_path / "manual.yaml",
        policy_data(
            sandbox, None, remotes=[entry], **keep_last(1) | {"retention": {"keep_last": 1}}
        ),
    )
    newer = backup_now(manual)
    assert remote_backups(target) == {after: True, newer: True}
    listed = json.loads(cli_ok("list", "--remote", "s3", "--json", config=manual).stdout)
    assert listed[1]["kept_by"][0].startswith("manual (until ")


@pytest.mark.usefixtures("aws_environment")
def test_incomplete_remote_backup_is_never_pruned_and_the_next_pass_completes_it(
    tmp_path: Path, sandbox: Sandbox, moto_server: MotoServer
) -> None:
    """A remote backup without its sidecar survives pruning; one still local is re-sent."""
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry], **keep_last(2))
    )
    first, second = backup_now(config), backup_now(config)
    for name in (first, second):  # as if each upload had been cut before its sidecar
        target.delete(f"{name}.tar.gz.sha256")

    third = backup_now(config)

    # first: pruned locally, incomplete remotely: retention leaves it alone, and nothing
    # here can complete it. second: still kept locally, so uploaded again, complete.
    assert local_names(sandbox) == [second, third]
    assert remote_backups(target) == {first: False, second: True, third: True}
    listed = json.loads(cli_ok("list", "--remote", "s3", "--json", config=config).stdout)
    assert [(row["name"], row["complete"]) for row in listed] == [
        (third, True),
        (second, True),
        (first, False),
    ]
    failed = run_cli("verify", "--remote", "s3", "--all", config=config)
    assert failed.returncode == 1
    assert failed.stderr_lines == [
        f"sovbackupd: error: {first}.tar.gz: incomplete on s3 (no sidecar or manifest)"
    ]

    fourth = backup_now(config)

    assert remote_backups(target) == {first: False, third: True, fourth: True}
    assert s3_keys(moto_server.endpoint_url, bucket) == {
        S3_PREFIX + file
        for file in {
            f"{first}.tar.gz",
            f"{first}.manifest.json",
            f"{first}.auth.json",
            *stored_files(third),
            *stored_files(fourth),
        }
    }


@pytest.mark.usefixtures("aws_environment", "fast_retries")
def test_backup_with_the_remote_down_exits_0_warns_once_and_the_next_backup_uploads_both(
    tmp_path: Path,
    sandbox: Sandbox,
    moto_server: MotoServer,
    proxies: list[TcpProxy],
) -> None:
    """Remote down: local backup committed and verified, one warning; once back, both go up."""
    entry, target, proxy = s3_behind_proxy(moto_server, proxies)
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry]))
    take_down(proxy)

    missed = backup_with_warning(config, "s3", "gave up after 3 attempts")

    assert_local_backup_intact(config, sandbox, missed)
    proxy.up()
    caught_up = run_cli("backup", config=config, timeout=120)
    assert caught_up.returncode == 0, caught_up.stderr
    assert warnings(caught_up) == []
    newest = caught_up.stdout.strip()
    assert remote_backups(target) == {missed: True, newest: True}
    verified = cli_ok("verify", "--remote", "s3", "--all", "--json", config=config)
    assert [(row["name"], row["ok"]) for row in json.loads(verified.stdout)] == [
        (newest, True),
        (missed, True),
    ]


@pytest.mark.usefixtures("fast_retries")
def test_backup_with_a_refused_ssh_key_warns_at_once_and_catches_up_once_authorised(
    tmp_path: Path, sandbox: Sandbox, sshd: SshServer
) -> None:
    """Refused credentials: exit 0, one warning, no retries; the fixed policy uploads both."""
    far_dir = tmp_path / "far-side"
    refused, _ = rsync_remote(sshd, far_dir, identity_file=refused_key(tmp_path))
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[refused]))

    result = run_cli("backup", config=config, timeout=120)

    assert result.returncode == 0, result.stderr
    [line] = warnings(result)
    assert line.startswith("sovbackupd: warning: remote rsync: "), line
    assert "Permission denied" in line
    assert "target.retrying" not in result.stderr, "a refused key is not retried"
    missed = result.stdout.strip()
    assert_local_backup_intact(config, sandbox, missed)
    authorised, target = rsync_remote(sshd, far_dir)
    write_policy(config, policy_data(sandbox, None, remotes=[authorised]))
    newest = backup_now(config)
    assert remote_backups(target) == {missed: True, newest: True}


@pytest.mark.usefixtures("aws_environment", "fast_retries")
def test_connection_cut_mid_upload_is_retried_and_the_backup_arrives_complete(
    tmp_path: Path,
    sandbox: Sandbox,
    moto_server: MotoServer,
    proxies: list[TcpProxy],
) -> None:
    """A connection dropped inside the archive's upload is retried; no warning, all there."""
    bucket = s3_bucket(moto_server.endpoint_url)
    proxy = TcpProxy(moto_server.port, cut_after=100_000, max_faults=1)
    proxies.append(proxy)
    entry, target = s3_remote(f"http://127.0.0.1:{proxy.port}", bucket)
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry]))

    result = run_cli("-v", "backup", config=config, timeout=120)  # -v: info events on stderr

    assert result.returncode == 0, result.stderr
    assert warnings(result) == []
    assert proxy.faults == 1
    retried = [json.loads(line) for line in result.stderr_lines if "target.retrying" in line]
    assert [(event["operation"], event["target"]) for event in retried] == [("upload", "s3")]
    name = result.stdout.strip()
    assert remote_backups(target) == {name: True}
    assert s3_keys(moto_server.endpoint_url, bucket) == {
        S3_PREFIX + file for file in stored_files(name)
    }
    cli_ok("verify", "--remote", "s3", "--deep", config=config)


def refused_backup(tmp_path: Path, sandbox: Sandbox, sshd: SshServer) -> CliResult:
    """Run `backup` with an rsync remote that refuses the policy's ssh key."""
    refused, _ = rsync_remote(sshd, tmp_path / "far-side", identity_file=refused_key(tmp_path))
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[refused]))
    result = run_cli("backup", config=config, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_failed_remote_leaves_one_line_on_stderr_as_the_docs_promise(
    tmp_path: Path, sandbox: Sandbox, sshd: SshServer
) -> None:
    """docs/offsite.md: a failed remote prints one warning line, like every other warning."""
    result = refused_backup(tmp_path, sandbox, sshd)

    assert len(result.stderr_lines) == 1, result.stderr


def test_failed_remote_warning_names_the_remote_once(
    tmp_path: Path, sandbox: Sandbox, sshd: SshServer
) -> None:
    """The warning reads `sovbackupd: warning: remote rsync: <what failed>`, said once."""
    result = refused_backup(tmp_path, sandbox, sshd)

    [line] = warnings(result)
    assert line.count("remote rsync:") == 1, line


@pytest.mark.usefixtures("aws_environment")
def test_disaster_recovery_from_s3_with_only_the_policy_and_the_passphrase(
    sandbox: Sandbox,
    redis_server: RedisServer,
    restart_commands: Callable[..., dict[str, Any]],
    passphrase_file: Path,
    moto_server: MotoServer,
) -> None:
    """Backup dir, sources, database and RDB all gone: restore --from s3 brings all back."""
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    start_redis = restart_commands(redis_server)["start"]
    config = write_policy(
        sandbox.root / "policy.yaml",
        policy_data(
            sandbox,
            redis_server,
            encryption=passphrase_encryption(passphrase_file),
            remotes=[entry],
            restore={"start": start_redis},
        ),
    )
    files_before = tree_state(sandbox.root, live_paths(sandbox))
    keys_before = keys(redis_server)
    rows_before = rows(sandbox.database)
    name = backup_now(config)
    assert remote_backups(target) == {name: True}

    shutil.rmtree(sandbox.backup_dir)
    shutil.rmtree(sandbox.app)
    redis_server.stop()
    redis_server.rdb_path.unlink()
    assert backup_files(sandbox.root) >= {"policy.yaml", "passphrase"}

    result = run_cli("restore", "--latest", "--from", "s3", "--yes", config=config, timeout=180)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"restored {name}" in result.stdout
    excluded = {path for path in files_before if path.endswith(".tmp")}  # never backed up
    assert excluded
    assert_same_tree(
        tree_state(sandbox.root, live_paths(sandbox)),
        {path: state for path, state in files_before.items() if path not in excluded},
    )
    assert rows(sandbox.database) == rows_before
    assert keys(redis_server) == keys_before
    drill = cli_ok("test-restore", "--latest", config=config)
    assert f"test restore of {name} passed" in drill.stdout
    listed = json.loads(cli_ok("list", "--json", config=config).stdout)
    assert [row["name"] for row in listed] == [name]
    assert (sandbox.backup_dir / f"{name}.tar.gz.gpg").is_file()


def remote_metrics(sample: Scrape, remote: str) -> tuple[float, float, float, float]:
    """Return (successes, failures, last success, stored) of *remote* in one scrape."""
    return (
        sample.value(UPLOADS, remote=remote, result="success"),
        sample.value(UPLOADS, remote=remote, result="failure"),
        sample.value(LAST_SUCCESS, remote=remote),
        sample.value(STORED, location=remote),
    )


def quiet_remote_metrics(
    daemon: DaemonProcess, listen: str, target: targets.Target
) -> tuple[Scrape, dict[str, bool]]:
    """Scrape and list the remote between a finished pass and the next backup."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        synced = daemon.wait_for("remote.synced", daemon.mark())
        after = daemon.index_of(synced) + 1
        sample = scrape(listen)
        held = remote_backups(target)
        if not daemon.named("backup.started", after) and not daemon.named("remote.synced", after):
            return sample, held
    pytest.fail("no quiet moment between a pass over the remote and the next backup")


@pytest.mark.usefixtures("aws_environment", "fast_retries")
def test_daemon_exports_uploads_last_success_and_stored_count_of_a_remote(
    tmp_path: Path,
    sandbox: Sandbox,
    start_daemon: Callable[[Path], DaemonProcess],
    moto_server: MotoServer,
    proxies: list[TcpProxy],
) -> None:
    """Failure series at 0 from the start; after an upload: successes, a recent time, the count."""
    entry, target, _ = s3_behind_proxy(moto_server, proxies)
    policy, listen = daemon_policy(
        tmp_path, sandbox, None, {"hourly": EVERY_4_SECONDS}, remotes=[entry]
    )
    started = time.time()
    daemon = start_daemon(policy)

    first = scrape_when_up(listen)
    assert first.value(UPLOADS, remote="s3", result="failure") == 0
    daemon.wait_for("remote.uploaded", remote="s3")
    sample, held = quiet_remote_metrics(daemon, listen, target)

    successes, failures, last_success, stored = remote_metrics(sample, "s3")
    assert successes >= 1
    assert failures == 0
    assert started < last_success <= sample.taken
    assert held and all(held.values())
    assert stored == len(held)
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0


@pytest.mark.usefixtures("aws_environment", "fast_retries")
def test_daemon_counts_a_failure_and_keeps_last_success_while_the_remote_is_unreachable(
    tmp_path: Path,
    sandbox: Sandbox,
    start_daemon: Callable[[Path], DaemonProcess],
    moto_server: MotoServer,
    proxies: list[TcpProxy],
) -> None:
    """Remote down: failures go up at the next pass; the last success time stays put."""
    entry, target, proxy = s3_behind_proxy(moto_server, proxies)
    policy, listen = daemon_policy(
        tmp_path, sandbox, None, {"hourly": EVERY_4_SECONDS}, remotes=[entry]
    )
    daemon = start_daemon(policy)
    daemon.wait_for("remote.uploaded", remote="s3")
    before, _ = quiet_remote_metrics(daemon, listen, target)
    take_down(proxy)

    daemon.wait_for("remote.pass_failed", daemon.mark(), remote="s3")
    after = scrape(listen)

    assert after.value(LAST_SUCCESS, remote="s3") == before.value(LAST_SUCCESS, remote="s3")
    assert after.value(UPLOADS, remote="s3", result="failure") >= 1


@pytest.mark.usefixtures("aws_environment")
def test_a_manual_backup_deleted_locally_by_hand_stays_manual_on_the_remote(
    tmp_path: Path, sandbox: Sandbox, moto_server: MotoServer
) -> None:
    """The remote copy of a manual backup keeps its manual window when backup_dir lost it.

    An operator who frees local disk by deleting an archive that the bucket holds, or who
    rebuilds a server with an empty backup_dir, must not lose the remote copy early: its
    manifest on the remote says it is manual.
    """
    bucket = s3_bucket(moto_server.endpoint_url)
    entry, target = s3_remote(moto_server.endpoint_url, bucket)
    retained = keep_last(1) | {"retention": {"keep_last": 1, "manual_keep": "7d"}}
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, remotes=[entry], **retained)
    )
    first = backup_now(config)
    for path in sandbox.backup_dir.glob(f"{first}*"):
        path.unlink()
    second = backup_now(config)
    assert remote_backups(target) == {first: True, second: True}
    listed = json.loads(cli_ok("list", "--remote", "s3", "--json", config=config).stdout)
    assert [row["name"] for row in listed] == [second, first]
    assert listed[1]["kept_by"][0].startswith("manual (until ")


def s3_contents(endpoint_url: str, bucket: str) -> dict[str, bytes]:
    """Return every object in *bucket* with its bytes, as a bucket holder reads them."""
    client = boto3.session.Session(region_name="us-east-1").client("s3", endpoint_url=endpoint_url)
    keys = [entry["Key"] for entry in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.mark.usefixtures("aws_environment")
def test_remotes_of_an_encrypted_backup_hold_no_plaintext_file_list_and_restore_from_it(
    tmp_path: Path,
    sandbox: Sandbox,
    sshd: SshServer,
    moto_server: MotoServer,
    passphrase_file: Path,
) -> None:
    """The rsync and S3 copies hold a head and the encrypted manifest, and restore from them."""
    (sandbox.app / "data" / CANARY).write_text("a name that only the file list holds\n")
    secrets = plaintext_secrets(sandbox)
    bucket = s3_bucket(moto_server.endpoint_url)
    far_dir = tmp_path / "far-side"
    s3_entry, s3 = s3_remote(moto_server.endpoint_url, bucket)
    config = write_policy(
        tmp_path / "policy.yaml",
        policy_data(
            sandbox,
            None,
            encryption=passphrase_encryption(passphrase_file),
            remotes=[rsync_remote(sshd, far_dir)[0], s3_entry],
        ),
    )
    name = backup_now(config)
    expected = {
        f"{name}.tar.gz.gpg",
        f"{name}.tar.gz.gpg.sha256",
        f"{name}.manifest.json",
        f"{name}.manifest.json.gpg",
        f"{name}.auth.json",
    }

    assert backup_files(far_dir) == expected
    assert leaks(files_under(far_dir), secrets) == []
    objects = s3_contents(moto_server.endpoint_url, bucket)
    assert set(objects) == {S3_PREFIX + file for file in expected}
    assert [key for key, data in objects.items() for secret in secrets if secret in data] == []
    for remote in ("rsync", "s3"):
        deep = cli_ok("verify", "--remote", remote, name, "--deep", config=config)
        assert deep.stdout.strip() == f"{name}: ok on {remote} (deep)"

    shutil.rmtree(sandbox.backup_dir)
    s3.delete(f"{name}.manifest.json.gpg")  # the head stays: this copy cannot be restored
    refused = run_cli(
        "restore", "--latest", "--from", "s3", "--to", str(tmp_path / "to"), config=config
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert len(refused.stderr_lines) == 1, refused.stderr
    assert f"{name} is incomplete: {name}.manifest.json.gpg is missing" in refused.stderr
    assert not (tmp_path / "to").exists()
    restored = run_cli(
        "restore", "--latest", "--from", "rsync", "--to", str(tmp_path / "to"), config=config
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    rerooted = tmp_path / "to" / str(sandbox.app).lstrip("/")
    assert (rerooted / "data" / CANARY).is_file()

    second = backup_now(config)  # the next pass sends the first backup to s3 again, whole

    assert set(s3_contents(moto_server.endpoint_url, bucket)) >= {
        f"{S3_PREFIX}{name}.manifest.json.gpg",
        f"{S3_PREFIX}{second}.manifest.json.gpg",
    }
