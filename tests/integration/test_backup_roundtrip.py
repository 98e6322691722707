"""A backup of a live server comes back with the seed's manual commands, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sovbackupd.manifest import Manifest
from sovbackupd.sources import files
from tests.conftest import (
    RedisServer,
    Sandbox,
    policy_data,
    require_tool,
    run_cli,
    write_policy,
)
from tests.property.trees import snapshot

INSERTER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], timeout=30)
connection.execute("PRAGMA journal_mode=WAL")
deadline = time.monotonic() + float(sys.argv[2])
count = 0
while time.monotonic() < deadline:
    connection.execute("INSERT INTO entries (body) VALUES (?)", ("concurrent " * 20,))
    connection.commit()
    count += 1
    if count == 20:
        print("inserting", flush=True)
print(count, flush=True)
"""


def redis_snapshot(
    server: RedisServer, databases: tuple[int, ...] = (0, 3)
) -> dict[int, dict[bytes, bytes | None]]:
    """Return every key of *databases* with its DUMP serialisation."""
    snapshot: dict[int, dict[bytes, bytes | None]] = {}
    for db in databases:
        client = server.client(db)
        snapshot[db] = {key: client.dump(key) for key in client.scan_iter(count=1000)}
    return snapshot


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_against_manifest(top: Path, manifest: Manifest) -> None:
    """Fail unless every manifest entry is in *top* with the same content, mode and link."""
    for entry in manifest.files:
        path = top / entry.path
        status = path.lstat()
        assert stat.S_IMODE(status.st_mode) == entry.mode, entry.path
        if entry.type == "file":
            assert status.st_size == entry.size, entry.path
            assert sha256(path) == entry.sha256, entry.path
        elif entry.type == "symlink":
            assert str(path.readlink()) == entry.link, entry.path
        else:
            assert path.is_dir(), entry.path


def test_backup_restores_with_the_seed_manual_commands(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_server: RedisServer,
    redis_factory: Callable[..., RedisServer],
) -> None:
    """Archive a live server while SQLite takes inserts; tar -xzf and cp bring it all back."""
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, redis_server))
    original_keys = redis_snapshot(redis_server)
    inserter = subprocess.Popen(
        [sys.executable, "-c", INSERTER, str(sandbox.database), "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert inserter.stdout is not None
    assert inserter.stdout.readline().strip() == "inserting"

    result = run_cli("backup", "--tier", "daily", config=policy)
    assert inserter.poll() is None, "the inserter must still be writing when the backup ends"
    inserter.terminate()
    inserter.wait()
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip()
    assert name.startswith("sovereigncore_backup_")
    archive = sandbox.backup_dir / f"{name}.tar.gz"
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert stat.S_IMODE(sandbox.backup_dir.stat().st_mode) == 0o700

    verified = run_cli("verify", "--deep", name, config=policy)
    assert verified.returncode == 0, verified.stderr
    checked = subprocess.run(
        ["sha256sum", "-c", f"{name}.tar.gz.sha256"],
        cwd=sandbox.backup_dir,
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout

    work = tmp_path / "manual"
    (work / "restored-redis").mkdir(parents=True)
    (work / "restored-app").mkdir()
    script = f"""
        set -euo pipefail
        tar -tzf {archive} > listing.txt
        tar -xzf {archive}
        cp {name}/redis_dump.rdb restored-redis/dump.rdb
        cp {name}/sovereign_rekor.db restored-app/
        cp {name}/config/.env {name}/config/redis.conf restored-app/
    """
    manual = subprocess.run(
        ["bash", "-c", script], cwd=work, capture_output=True, text=True, check=False
    )
    assert manual.returncode == 0, manual.stderr
    listing = (work / "listing.txt").read_text().splitlines()
    assert f"{name}/redis_dump.rdb" in listing
    assert f"{name}/sovereign_rekor.db" in listing
    assert f"{name}/manifest.json" in listing
    assert f"{name}/backup_info.txt" in listing
    assert not any(line.endswith(".tmp") for line in listing), "excluded files stay out"

    manifest = Manifest.model_validate_json((work / name / "manifest.json").read_text())
    assert manifest.id == name
    assert manifest.tiers == ["daily"]
    check_against_manifest(work / name, manifest)
    assert (work / "restored-app" / ".env").read_bytes() == (sandbox.app / ".env").read_bytes()
    notes = next(entry for entry in manifest.files if entry.path == "data/notes.txt")
    assert notes.mtime == pytest.approx(1_600_000_000.5)
    assert notes.origin == str(sandbox.app / "data" / "notes.txt")

    restored_server = redis_factory(name="restored-redis")
    restored_server.stop()
    (restored_server.directory / "dump.rdb").write_bytes(
        (work / "restored-redis" / "dump.rdb").read_bytes()
    )
    restored = redis_factory(name="restored-redis")
    assert redis_snapshot(restored) == original_keys
    redis_details = next(
        source for source in manifest.sources if source.component == "redis"
    ).details
    assert redis_details["rdb_check"] == "ok"
    assert redis_details["keys_in_rdb"] == sum(len(keys) for keys in original_keys.values())

    database = sqlite3.connect(work / "restored-app" / "sovereign_rekor.db")
    assert database.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = database.execute("SELECT count(*) FROM entries").fetchone()[0]
    database.close()
    sqlite_details = next(
        source for source in manifest.sources if source.component == "sqlite"
    ).details
    recorded = sqlite_details["databases"][str(sandbox.database)]
    assert recorded["integrity"] == "ok"
    assert recorded["rows"] == {"entries": rows, "odd name": 1}
    assert rows > 500, "rows inserted before the backup are in it"


def test_backup_archives_a_redis7_aof_that_redis_check_aof_accepts(
    tmp_path: Path,
    sandbox: Sandbox,
    redis_factory: Callable[..., RedisServer],
) -> None:
    """With appendonly on, appendonlydir/ is archived whole and a server loads it back."""
    server = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    client = server.client()
    client.mset({f"before:{number}": str(number) for number in range(2000)})
    data = policy_data(sandbox, server)
    data["sources"]["redis"]["aof_dir"] = str(server.aof_dir)
    policy = write_policy(tmp_path / "policy.yaml", data)

    stop = threading.Event()

    def write_load() -> None:
        writer = server.client()
        number = 0
        while not stop.is_set():
            writer.set(f"during:{number}", "x" * 100)
            number += 1

    load = threading.Thread(target=write_load)
    load.start()
    try:
        time.sleep(0.2)
        result = run_cli("backup", config=policy)
    finally:
        stop.set()
        load.join()
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip()

    work = tmp_path / "extract"
    work.mkdir()
    subprocess.run(
        ["tar", "-xzf", str(sandbox.backup_dir / f"{name}.tar.gz")], cwd=work, check=True
    )
    aof_dir = work / name / "appendonlydir"
    manifests = list(aof_dir.glob("*.manifest"))
    assert len(manifests) == 1
    checked = subprocess.run(
        [require_tool("redis-check-aof"), str(manifests[0])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    target = tmp_path / "aof-restored"
    target.mkdir()
    subprocess.run(["cp", "-a", str(aof_dir), str(target / "appendonlydir")], check=True)
    restored = redis_factory("--appendonly", "yes", name="aof-restored")
    restored_client = restored.client()
    assert restored_client.mget([f"before:{number}" for number in range(2000)]) == [
        str(number).encode() for number in range(2000)
    ]
    assert restored_client.dbsize() > 2000, "writes during the backup are in the AOF too"


@pytest.mark.parametrize(
    ("compression", "suffix", "list_flags"),
    [("zstd", ".tar.zst", ["--zstd", "-tf"]), ("none", ".tar", ["-tf"])],
)
def test_backup_in_other_compressions_is_listed_by_tar(
    tmp_path: Path,
    sandbox: Sandbox,
    compression: str,
    suffix: str,
    list_flags: list[str],
) -> None:
    """Archives in zstd and uncompressed verify and list with GNU tar."""
    policy = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, compression=compression)
    )
    result = run_cli("backup", config=policy)
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip()
    archive = sandbox.backup_dir / f"{name}{suffix}"
    listing = subprocess.run(
        ["tar", *list_flags, str(archive)], capture_output=True, text=True, check=True
    )
    assert f"{name}/sovereign_rekor.db" in listing.stdout.splitlines()
    assert run_cli("verify", "--deep", "--latest", config=policy).returncode == 0


def test_list_shows_backups_newest_first_with_their_tiers(tmp_path: Path, sandbox: Sandbox) -> None:
    """The list command reports each backup's name, tiers and size, newest first."""
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    first = run_cli("backup", "--tier", "daily", config=policy).stdout.strip()
    second = run_cli("backup", "--tier", "hourly", "--tier", "daily", config=policy).stdout.strip()
    listed = run_cli("list", "--json", config=policy)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["name"] for row in rows] == [second, first]
    assert rows[0]["tiers"] == ["hourly", "daily"]
    assert rows[1]["size"] == (sandbox.backup_dir / f"{first}.tar.gz").stat().st_size
    table = run_cli("list", config=policy)
    assert table.stdout.splitlines()[1].startswith(second)


def test_verify_all_reports_newest_first_as_list_does(tmp_path: Path, sandbox: Sandbox) -> None:
    """With --all, verify goes through the backups in list's order, newest first."""
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    first = run_cli("backup", config=policy).stdout.strip()
    second = run_cli("backup", config=policy).stdout.strip()
    listed = [row["name"] for row in json.loads(run_cli("list", "--json", config=policy).stdout)]

    verified = run_cli("verify", "--all", "--json", config=policy)
    text = run_cli("verify", "--all", config=policy)

    assert listed == [second, first]
    assert [row["name"] for row in json.loads(verified.stdout)] == listed
    assert text.stdout.splitlines() == [
        f"{second}: ok (authenticated)",
        f"{first}: ok (authenticated)",
    ]


def test_verify_all_reports_the_damaged_backup_and_fails(tmp_path: Path, sandbox: Sandbox) -> None:
    """Verifying all backups names the one whose bytes changed, and exits non-zero."""
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    good = run_cli("backup", config=policy).stdout.strip()
    bad = run_cli("backup", config=policy).stdout.strip()
    archive = sandbox.backup_dir / f"{bad}.tar.gz"
    content = bytearray(archive.read_bytes())
    content[len(content) // 2] ^= 0xFF
    archive.write_bytes(bytes(content))
    result = run_cli("verify", "--all", "--json", config=policy)
    assert result.returncode == 1
    verdicts = {row["name"]: row for row in json.loads(result.stdout)}
    assert verdicts[good]["ok"] is True
    assert verdicts[bad]["ok"] is False
    assert "checksum mismatch" in verdicts[bad]["problem"]


def test_check_config_prints_the_effective_policy_with_environment_overrides(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """BACKUP_DIR and RETENTION_DAYS from the seed's scripts override the file."""
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    result = run_cli(
        "check-config",
        config=policy,
        env={"BACKUP_DIR": str(tmp_path / "elsewhere"), "RETENTION_DAYS": "14"},
    )
    assert result.returncode == 0, result.stderr
    assert f"backup_dir: {tmp_path / 'elsewhere'}" in result.stdout
    assert "keep: 14" in result.stdout


# Every byte but / and NUL may be in a name; none of these is valid UTF-8 text to every reader.
ODD_NAMES = [
    b"caf\xe9.txt",  # Latin-1
    b"\xed\xa0\x80lone-surrogate",  # what UTF-8 would make of U+D800: not UTF-8
    b"line\nbreak",
    b"tab\tand\\backslash",
    b"quo\"te's",
    b" -leading dash and spaces ",
    b"\x01control\x7f",
    b"n" * 255,
    b"\xff" * 255,
]


def make_odd_tree(root: Path, depth_budget: int) -> None:
    """Fill *root* with odd names: files, a dir, links, a sparse file, a FIFO, a deep path.

    The deep path takes *depth_budget* bytes below *root*, in 250-byte names.
    """
    base = os.fsencode(root)
    for name in ODD_NAMES:
        with open(base + b"/" + name, "wb") as handle:  # noqa: PTH123 (a bytes path)
            handle.write(name)
    os.mkdir(base + b"/dir\xe9")  # noqa: PTH102 (bytes paths: pathlib takes text)
    with open(base + b"/dir\xe9/inner\xfe", "wb") as handle:  # noqa: PTH123
        handle.write(b"inner")
    os.symlink(b"caf\xe9.txt", base + b"/link\xe9")  # noqa: PTH211
    os.symlink(b"dir\xe9/inner\xfe", base + b"/link-into-dir\xe9")  # noqa: PTH211
    with open(base + b"/sparse\xe9", "wb") as handle:  # noqa: PTH123
        handle.truncate(4 << 20)
        handle.seek(1 << 20)
        handle.write(b"data in the middle")
    os.mkfifo(base + b"/fi\nfo\xe9")  # skipped with a warning naming it, on one line
    deep = base
    while len(deep) - len(base) + 251 < depth_budget:
        deep += b"/" + b"d\xe9" + b"e" * 248
        os.mkdir(deep)  # noqa: PTH102
    with open(deep + b"/deep\xe9", "wb") as handle:  # noqa: PTH123
        handle.write(b"deep")


def test_every_name_the_file_system_holds_comes_back_identical(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Names of any bytes go through backup, verify --deep, test-restore, restore and tar -x.

    The warning of a FIFO with such a name is one line, the name quoted: on main it was
    two lines on stderr, and backup_info.txt's strict UTF-8 made the backup a traceback.
    """
    data = sandbox.app / "data"
    target = tmp_path / "out"
    # As deep as a backup takes: restore's staging and --to have the headroom beyond it.
    budget = files.RESTORABLE_PATH_BYTES - len(os.fsencode(data))
    make_odd_tree(data, budget)
    (data / "scratch.tmp").unlink()  # the sandbox policy excludes it
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    strict = {"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}
    ascii_only = {"LC_ALL": "C", "PYTHONIOENCODING": "ascii"}

    made = run_cli("backup", config=policy, env=strict)
    assert made.returncode == 0, made.stderr
    assert "Traceback" not in made.stderr
    name = made.stdout.strip()
    (warning,) = [line for line in made.stderr_lines if "special file" in line]
    assert f"'{data}/fi\\nfo\\udce9': special file" in warning
    for arguments, env in [
        (("list",), ascii_only),
        (("list", "--json"), ascii_only),
        (("verify", "--deep", name), ascii_only),
        (("verify", "--deep", "--json", name), strict),
        (("test-restore", name), strict),
        (("test-restore", "--json", name), ascii_only),
        (("restore", name, "--to", str(target)), ascii_only),
    ]:
        result = run_cli(*arguments, config=policy, env=env)
        assert result.returncode == 0, (arguments, result.stderr)
        assert "Traceback" not in result.stderr, arguments

    original = snapshot(os.fsencode(data))
    assert b"fi\nfo\xe9" not in (restored := snapshot(os.fsencode(target) + os.fsencode(data)))
    del original[b"fi\nfo\xe9"]
    assert restored == original

    extracted = tmp_path / "tar"
    extracted.mkdir()
    archive = sandbox.backup_dir / f"{name}.tar.gz"
    subprocess.run(["tar", "-xzf", str(archive)], cwd=extracted, check=True, capture_output=True)
    by_tar = snapshot(os.fsencode(extracted / name / "data"))
    assert set(by_tar) == set(original), "GNU tar extracts every name to the same bytes"
    assert {path: node.content for path, node in by_tar.items()} == {
        path: node.content for path, node in original.items()
    }
    info = (extracted / name / "backup_info.txt").read_bytes()
    assert f"'{data}/fi\\nfo\\udce9': special file".encode() in info
    beside = json.loads((sandbox.backup_dir / f"{name}.manifest.json").read_bytes())
    paths = {os.fsencode(entry["path"]) for entry in beside["files"]}
    assert {b"data/" + path for path in original if path} <= paths


def test_restore_notes_quote_names_with_control_characters(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A link named with an escape or a newline is quoted in notes: no forged line, no ANSI."""
    data_dir = sandbox.app / "data"
    (data_dir / "\x1b[31mevil\nFORGED: restore ok").symlink_to("/etc/host\nname")
    (data_dir / "x\x1b]0;title\x07").symlink_to("/etc/hostname")
    policy = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    assert run_cli("backup", config=policy).returncode == 0
    dry = run_cli("restore", "--latest", "--dry-run", config=policy)
    into = run_cli("restore", "--latest", "--to", str(tmp_path / "out"), "--yes", config=policy)
    for result in (dry, into):
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout + result.stderr
        assert "\x07" not in result.stdout
        lines = result.stdout.splitlines()
        assert not any(line.startswith("FORGED") or line.startswith("name ") for line in lines)
        notes = [line for line in lines if line.startswith("note: ") and "points outside" in line]
        assert notes == [
            "note: 'data/\\x1b[31mevil\\nFORGED: restore ok' -> '/etc/host\\nname' points "
            "outside data; restored as a link",
            "note: 'data/x\\x1b]0;title\\x07' -> /etc/hostname points outside data; "
            "restored as a link",
        ]
    restored = tmp_path / "out" / str(data_dir).lstrip("/")
    link = restored / "\x1b[31mevil\nFORGED: restore ok"
    assert link.readlink() == Path("/etc/host\nname")
