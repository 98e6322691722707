"""What a backup captures and tells: its space estimate, its progress, sparse files, mtimes."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sovbackupd import archive, backup
from sovbackupd.config import loader
from sovbackupd.config.models import Policy
from sovbackupd.progress import ProgressBar
from sovbackupd.sources import files
from tests.conftest import RedisServer, Sandbox, policy_data, run_cli, write_policy
from tests.integration.test_backup_failures import Mount, mount_tmpfs

__all__ = ["mount_tmpfs"]  # the fixture, shared with the disk-full tests

FRAME = re.compile(r"\[[#.]+\]\s+(\d+)%")


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as the CLI's stderr is."""

    def isatty(self) -> bool:
        return True


def load_policy(tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer | None) -> Policy:
    return loader.load(write_policy(tmp_path / "policy.yaml", policy_data(sandbox, redis_server)))


def space_needed_of(policy: Policy) -> int:
    """Run one backup of *policy*; return the free space its preflight demanded."""
    with capture_logs() as events:
        backup.run(policy)
    (started,) = [event for event in events if event["event"] == "backup.started"]
    needed = started["space_needed_bytes"]
    assert isinstance(needed, int)
    return needed


def test_progress_bar_ends_at_100_percent_on_a_real_backup(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """The last state the bar draws for a finished backup is 100%, whatever the estimate."""
    policy = load_policy(tmp_path, sandbox, redis_server)
    terminal = Terminal()
    bar = ProgressBar(terminal)
    backup.run(policy, on_progress=bar, on_estimate=bar.set_total)
    frames = FRAME.findall(terminal.getvalue())
    assert frames, "the bar drew nothing"
    assert frames[-1] == "100"


def test_space_estimate_follows_the_compression_of_earlier_backups(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """The preflight asks for the uncompressed size first, then about what the last one took."""
    (sandbox.app / "data" / "compressible.txt").write_text("the same line\n" * 400_000)
    policy = load_policy(tmp_path, sandbox, redis_server)
    first = space_needed_of(policy)
    (stored,) = sandbox.backup_dir.glob("*.tar.gz")
    uncompressed = (sandbox.app / "data" / "compressible.txt").stat().st_size
    assert first > uncompressed, "without history: the worst case"
    second = space_needed_of(policy)
    assert second < first / 2
    assert second > stored.stat().st_size, "never less than what the last one took"


@pytest.mark.root
def test_compressible_data_larger_than_the_free_space_is_backed_up(
    sandbox: Sandbox, mount_tmpfs: Mount
) -> None:
    """24 MiB that compress like the last backup's data fit a 16 MiB disk: no refusal."""
    mount_tmpfs(sandbox.backup_dir, "16m")
    text = sandbox.app / "data" / "compressible.txt"
    text.write_text("the same line\n" * 450_000)  # 6 MiB: fits even uncompressed
    config = write_policy(sandbox.root / "policy.yaml", policy_data(sandbox, None))
    first = run_cli("backup", config=config)
    assert first.returncode == 0, first.stderr
    text.write_text("the same line\n" * 1_800_000)  # 24 MiB
    second = run_cli("backup", config=config)
    assert second.returncode == 0, second.stderr


@pytest.mark.root
def test_sparse_file_far_larger_than_the_disk_is_backed_up(
    sandbox: Sandbox, mount_tmpfs: Mount
) -> None:
    """A 2 GiB sparse file with 4 KiB of data needs 4 KiB, not 2 GiB: a 16 MiB disk takes it."""
    mount_tmpfs(sandbox.backup_dir, "16m")
    with (sandbox.app / "data" / "disk.img").open("wb") as handle:
        handle.truncate(2 << 30)
        handle.write(os.urandom(4096))
    config = write_policy(sandbox.root / "policy.yaml", policy_data(sandbox, None))
    result = run_cli("backup", config=config)
    assert result.returncode == 0, result.stderr


def test_sparse_file_is_backed_up_by_its_data_and_restored_byte_for_byte(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A 512 MiB file with 8 KiB of data comes back with its bytes, holes and sub-second mtime."""
    sparse = sandbox.app / "data" / "disk.img"
    with sparse.open("wb") as handle:
        handle.truncate(512 << 20)
        handle.write(os.urandom(4096))
        handle.seek(300 << 20)
        handle.write(os.urandom(4096))
    exact = 1_650_000_000_250_000_000
    os.utime(sparse, ns=(exact, exact))
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, compression="none"))

    made = run_cli("backup", config=config)

    assert made.returncode == 0, made.stderr
    assert "archived as dense" not in made.stderr
    name = made.stdout.split()[0]
    (stored,) = sandbox.backup_dir.glob(f"{name}.tar")
    assert stored.stat().st_size < 8 << 20, "archived with its holes"
    target = tmp_path / "restored"
    restored = run_cli("restore", name, "--to", str(target), config=config)
    assert restored.returncode == 0, restored.stderr
    copy = target / str(sparse).lstrip("/")
    assert copy.stat().st_size == 512 << 20
    assert copy.stat().st_blocks * 512 < 8 << 20, "restored sparse"
    assert archive.file_sha256(copy) == archive.file_sha256(sparse)
    assert abs(copy.stat().st_mtime_ns - exact) < 1000


def backup_and_restore(tmp_path: Path, sandbox: Sandbox) -> Path:
    """Back up *sandbox*, verify it deeply, restore it --to a new dir; return that dir."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    made = run_cli("backup", config=config)
    assert made.returncode == 0, made.stderr
    name = made.stdout.split()[0]
    verified = run_cli("verify", name, "--deep", config=config)
    assert verified.returncode == 0, verified.stderr
    target = tmp_path / "restored"
    restored = run_cli("restore", name, "--to", str(target), config=config)
    assert restored.returncode == 0, restored.stderr
    return target


def test_names_that_are_not_utf8_survive_backup_verify_and_restore(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A name with bytes that are not UTF-8, short or past ustar's 100 bytes, is restorable.

    The manifest keeps such a name as a lone surrogate escape; pydantic's JSON parser
    refused it, so the backup succeeded and verify --deep and restore failed on it.
    """
    data = os.fsencode(sandbox.app / "data")
    names = [b"latin1-caf\xe9", b"long-\xff-" + b"x" * 150, b"line\nbreak\tand=%\xfe"]
    for name in names:
        with open(data + b"/" + name, "wb") as handle:  # noqa: PTH123 (a bytes path)
            handle.write(name)

    target = backup_and_restore(tmp_path, sandbox)

    for name in names:
        with open(os.fsencode(target) + data + b"/" + name, "rb") as handle:  # noqa: PTH123
            assert handle.read() == name


def test_restore_brings_back_every_mtime_to_the_nanosecond(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Files and directories get their exact pax mtime back, not the manifest's float.

    A float rounded .999999999 up into the next second, and other stamps ~100 ns off.
    """
    stamps = {
        "last-nanosecond": 1_600_000_000_999_999_999,
        "before-1970": -1_500_000_001,
        "year-2100": 4_102_444_800_999_999_999,
        "notes.txt": 1_600_000_000_500_000_000,
        "nested": 1_700_000_000_123_456_789,
    }
    for name, stamp in stamps.items():
        path = sandbox.app / "data" / name
        if not path.exists():
            path.write_text(name)
        os.utime(path, ns=(stamp, stamp))

    target = backup_and_restore(tmp_path, sandbox)

    copies = target / str(sandbox.app / "data").lstrip("/")
    restored = {name: (copies / name).stat().st_mtime_ns for name in stamps}
    assert restored == stamps


def make_deep_file(directory: Path, depth_bytes: int) -> bytes:
    """Make a file *depth_bytes* or more below *directory*, in 250-byte names; return its path.

    The directories are made through descriptors: past PATH_MAX no path reaches them.
    """
    component = "d" * 250
    path = os.fsencode(directory)
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(-(-depth_bytes // 251)):
            os.mkdir(component, dir_fd=descriptor)
            inner = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
            path += b"/" + component.encode()
        os.close(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=descriptor))
    finally:
        os.close(descriptor)
    return path + b"/deep.txt"


@pytest.mark.parametrize("past", ["restore's limit", "PATH_MAX"])
def test_a_path_no_restore_could_put_back_is_left_out_with_one_warning(
    tmp_path: Path, sandbox: Sandbox, past: str
) -> None:
    """A path deeper than restore can write (or than PATH_MAX) is skipped with one warning.

    Restore stages each member on a longer path than its own (and a drill below
    backup_dir/.staging): a 3.5 KB path backed up fine and then failed every restore and
    test-restore with "File name too long".
    """
    data = sandbox.app / "data"
    if past == "PATH_MAX":
        deep = make_deep_file(data, 4096)
        assert len(deep) > 4096
    else:
        deep = make_deep_file(data, files.RESTORABLE_PATH_BYTES - len(os.fsencode(data)))
        assert files.RESTORABLE_PATH_BYTES < len(deep) < 4096
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))

    made = run_cli("backup", config=config)

    assert made.returncode == 0, made.stderr
    assert "Traceback" not in made.stderr
    (warning,) = [line for line in made.stderr_lines if "longer than restore can put back" in line]
    assert warning.startswith("sovbackupd: warning: ")
    drill = run_cli("test-restore", "--latest", config=config)
    assert drill.returncode == 0, drill.stderr
    restored = run_cli("restore", "--latest", "--to", str(tmp_path / "out"), config=config)
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "out" / str(data).lstrip("/") / "notes.txt").is_file()


def test_fifos_planted_as_a_manifest_an_archive_or_a_sidecar_block_nothing(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A FIFO under a backup file's name is refused or passed over, never opened to block.

    The space estimate reads the newest manifests: a FIFO manifest hung every backup, and
    list and verify with it, until killed.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    first = run_cli("backup", config=config)
    assert first.returncode == 0, first.stderr
    name = first.stdout.split()[0]
    planted = "sovereigncore_backup_20200101_000000"
    archive_path = sandbox.backup_dir / f"{name}.tar.gz"
    (sandbox.backup_dir / f"{planted}.tar.gz").write_bytes(archive_path.read_bytes())
    os.mkfifo(sandbox.backup_dir / f"{planted}.manifest.json")
    os.mkfifo(sandbox.backup_dir / "sovereigncore_backup_20200102_000000.tar.gz")
    sidecar = archive.sidecar_path(archive_path)
    sidecar.unlink()
    os.mkfifo(sidecar)

    made = run_cli("backup", config=config, timeout=120)
    assert made.returncode == 0, made.stderr
    listed = run_cli("list", config=config, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert planted in listed.stdout
    assert "20200102" not in listed.stdout, "a FIFO is no archive"
    verified = run_cli("verify", name, config=config, timeout=120)
    assert verified.returncode == 1
    assert verified.stderr_lines == [
        f"sovbackupd: error: {name}.tar.gz: checksum sidecar is unreadable"
    ]
