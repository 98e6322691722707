"""One soak run: build a server, start the daemon, inject the faults, then look at it all."""

from __future__ import annotations

import contextlib
import hashlib
import random
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovbackupd import config, retention
from sovbackupd import policy as gfs
from sovbackupd.config.models import Policy
from sovbackupd.redis_server import free_port
from sovbackupd.store import STAGING_NAME, Store, StoredBackup
from tests.integration.test_daemon import NotifySocket
from tests.soak import faults
from tests.soak.harness import (
    CLI_MARK,
    DAEMON_MARK,
    CliRun,
    Daemons,
    Instance,
    ProcessInfo,
    Sampler,
    marked_processes,
    redis_processes_under,
    run_cli,
    wait_event,
)
from tests.soak.services import (
    REDIS_KEYS,
    FileChurn,
    Load,
    RedisLoad,
    RedisService,
    SqliteLoad,
    Tmpfs,
    make_database,
)

DEFAULT_SECONDS = 120.0
SEED_ENV = "SOVBACKUPD_SOAK_SEED"
PREFIX = "sovereigncore_backup"
DISK_SIZE = "64m"
BLOB_BYTES = 1536 << 10  # incompressible and never changed: archive sizes stay steady
FIRST_BACKUP_SECONDS = 90.0
FINAL_BACKUP_SECONDS = 90.0
CALM_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Layout:
    """Where everything of one soak lives."""

    root: Path

    @property
    def app(self) -> Path:
        """Return the /opt/sovereigncore look-alike."""
        return self.root / "opt" / "sovereigncore"

    @property
    def database(self) -> Path:
        """Return the SQLite database under load."""
        return self.app / "sovereign_rekor.db"

    @property
    def blob(self) -> Path:
        """Return the large file that never changes."""
        return self.app / "data" / "blob.bin"

    @property
    def config_files(self) -> list[Path]:
        """Return the configuration files."""
        return [self.app / ".env", self.app / "redis.conf"]

    @property
    def data_dirs(self) -> list[Path]:
        """Return the data directories."""
        return [self.app / "data", self.app / "mcp_data", self.app / "memory"]

    @property
    def disk(self) -> Path:
        """Return the tmpfs mount point."""
        return self.root / "disk"

    @property
    def backup_dir(self) -> Path:
        """Return the backup directory, on the tmpfs."""
        return self.disk / "backups"

    @property
    def restored(self) -> Path:
        """Return where the newest backup is restored at the end."""
        return self.root / "restored"

    def build(self, rng: random.Random) -> None:
        """Lay out the server's files."""
        for directory in self.data_dirs:
            directory.mkdir(parents=True)
        (self.app / ".env").write_text("SECRET_KEY=soak\nREDIS_URL=redis://localhost\n")
        (self.app / ".env").chmod(0o600)
        (self.app / "redis.conf").write_text("port 6379\n")
        self.blob.write_bytes(rng.randbytes(BLOB_BYTES))
        (self.app / "data" / "notes.txt").write_text("soak\n" * 2000)
        (self.app / "mcp_data" / "state.json").write_text('{"soak": true}')
        (self.app / "memory" / "memory.md").write_text("# remembered\n")
        make_database(self.database)


def base_policy(layout: Layout, redis: RedisService, listen: str) -> dict[str, Any]:
    """Return the soak's policy: tiers every few seconds, small keeps, a drill every 20 s."""
    return {
        "backup_dir": str(layout.backup_dir),
        "authentication": {"key_file": str(layout.root / "auth.key")},
        "name_prefix": PREFIX,
        "sources": {
            "redis": {
                "url": redis.url,
                "rdb_path": str(redis.rdb_path),
                "timeout_seconds": 30,
            },
            "sqlite": [str(layout.database)],
            "sqlite_timeout_seconds": 1,
            "config": [str(path) for path in layout.config_files],
            "dirs": [str(path) for path in layout.data_dirs],
            "exclude": ["*.tmp"],
        },
        "tiers": {
            "hourly": {"schedule": "*/3 * * * * *", "keep": 3},
            "daily": {"schedule": "*/7 * * * * *", "keep": 2},
            # Three ISO weeks: a run spans at most two, so "oldest weekly" keeps the oldest.
            "weekly": {"schedule": "*/13 * * * * *", "keep": 3},
        },
        # Manual (CLI) backups follow the tiers here, as the outcome checks recompute them.
        "retention": {"keep_last": 3, "manual_keep": "0h"},
        "metrics": {"listen": listen},
        "daemon": {
            "backup_timeout_seconds": 60,
            "shutdown_grace_seconds": 60,
            "misfire_grace_seconds": 30,
            "disk_refresh_seconds": 5,
        },
        "test_restore": {"schedule": "*/20 * * * * *"},
    }


@dataclass
class SoakRun:
    """Everything one soak did and saw, for the invariants and the report."""

    seed: int
    seconds: float
    layout: Layout
    mark: str
    plan: list[str]
    faults: faults.Faults
    daemons: Daemons
    loads: list[Load]
    seen: set[str]
    fault_phase_seconds: float = 0.0
    total_seconds: float = 0.0
    final_backup: dict[str, Any] | None = None
    running_at_sigterm: dict[str, Any] | None = None
    final_exit_code: int | None = None
    leftovers: list[str] = field(default_factory=list)
    final_policy: Policy | None = None
    stored: list[StoredBackup] = field(default_factory=list)
    candidates: list[gfs.Candidate] = field(default_factory=list)
    verify_all: CliRun | None = None
    verify_deep: CliRun | None = None
    restore: CliRun | None = None
    drill: CliRun | None = None
    restored_problems: list[str] = field(default_factory=list)
    newest: str | None = None
    daemon_leftovers: list[ProcessInfo] = field(default_factory=list)
    redis_after_daemon: list[ProcessInfo] = field(default_factory=list)
    cli_leftovers: list[ProcessInfo] = field(default_factory=list)
    redis_after_cli: list[ProcessInfo] = field(default_factory=list)
    redis_after_stop: list[ProcessInfo] = field(default_factory=list)

    @property
    def instances(self) -> list[Instance]:
        """Return every daemon instance, in order."""
        return self.daemons.instances

    @property
    def store(self) -> Store:
        """Return the backup directory's store."""
        return Store(self.layout.backup_dir, PREFIX)


# What a backup keeps beside its archive under its own name (see targets.backup_files).
BESIDE_FILES = (
    (".manifest.json", "manifest"),
    (".manifest.json.gpg", "encrypted manifest"),
    (".auth.json", "authentication record"),
)


def leftovers(layout: Layout) -> list[str]:
    """Return what a clean stop must not leave: partial files, staging, orphans, ballast."""
    found = []
    finals = {backup.path.name for backup in Store(layout.backup_dir, PREFIX).backups()}
    for entry in sorted(layout.backup_dir.iterdir()):
        name = entry.name
        if name.endswith(".partial") or name == STAGING_NAME:
            found.append(name)
        elif name.endswith(".sha256") and name.removesuffix(".sha256") not in finals:
            found.append(f"{name} (orphaned sidecar)")
        else:
            for suffix, what in BESIDE_FILES:
                if name.endswith(suffix) and not any(
                    final.startswith(name.removesuffix(suffix) + ".tar") for final in finals
                ):
                    found.append(f"{name} (orphaned {what})")
    found.extend(
        f"{entry.name} (beside backup_dir)"
        for entry in layout.disk.iterdir()
        if entry != layout.backup_dir
    )
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restored_problems(layout: Layout, redis: RedisService) -> list[str]:
    """Check what ``restore --to`` put under layout.restored against the live server."""
    problems = []

    def rerooted(path: Path) -> Path:
        return layout.restored / path.relative_to("/")

    blob = rerooted(layout.blob)
    if not blob.is_file():
        problems.append(f"{blob} was not restored")
    elif _sha256(blob) != _sha256(layout.blob):
        problems.append(f"{blob} differs from the file that never changed")
    database = rerooted(layout.database)
    if not database.is_file():
        problems.append(f"{database} was not restored")
    else:
        connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
        try:
            verdict = connection.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            connection.close()
        if verdict != "ok":
            problems.append(f"{database} fails integrity_check: {verdict}")
    if not rerooted(redis.rdb_path).is_file():
        problems.append(f"{rerooted(redis.rdb_path)} (the RDB) was not restored")
    return problems


def _prefill(redis: RedisService) -> None:
    with redis.client() as client:
        client.mset({f"soak:{number}": "x" * 160 for number in range(REDIS_KEYS)})


def _calm_until(deadline: float, injected: faults.Faults) -> None:
    while time.monotonic() < deadline:
        injected.restart_if_dead()
        time.sleep(CALM_POLL_SECONDS)


def _recover(injected: faults.Faults, redis: RedisService, disk: Tmpfs) -> None:
    """Put the server back in working order after a fault the harness could not finish."""
    if redis.pid is None:
        redis.start()
    disk.release()
    injected.policy.write_valid(injected.policy.variant)
    injected.restart_if_dead()


def run(root: Path, seconds: float, seed: int) -> SoakRun:
    """Run the soak in *root* for *seconds* of faults drawn with *seed*; return what it saw."""
    began = time.monotonic()
    rng = random.Random(seed)
    layout = Layout(root)
    layout.build(rng)
    mark = uuid.uuid4().hex
    with contextlib.ExitStack() as cleanup:
        disk = Tmpfs(layout.disk, DISK_SIZE)
        cleanup.callback(disk.unmount)
        disk.mount()
        redis = RedisService(root / "redis", free_port())
        cleanup.callback(redis.stop)
        redis.start()
        _prefill(redis)
        listen = f"127.0.0.1:{free_port()}"
        policy = faults.PolicyFile(root / "policy.yaml", base_policy(layout, redis, listen))
        policy.write_valid(0)
        notify = NotifySocket(root / "notify.sock")
        cleanup.callback(notify.close)
        daemons = Daemons(root, policy.path, listen, notify, mark)
        cleanup.callback(daemons.close)
        store = Store(layout.backup_dir, PREFIX)
        sqlite_load = SqliteLoad("sqlite", database=layout.database)
        loads: list[Load] = [
            RedisLoad("redis", port=redis.port, rng=random.Random(rng.random())),
            sqlite_load,
            FileChurn(
                "files", directories=tuple(layout.data_dirs), rng=random.Random(rng.random())
            ),
        ]
        for load in loads:
            cleanup.callback(load.stop)
            load.start()
        sampler = Sampler(daemons, store)
        cleanup.callback(sampler.stop)
        sampler.start()
        injected = faults.Faults(
            rng, daemons, redis, disk, layout.database, policy, store, mark, sqlite_load
        )
        schedule = faults.plan(rng, seconds)
        soak = SoakRun(
            seed, seconds, layout, mark, schedule, injected, daemons, loads, sampler.seen
        )

        first = daemons.start()
        if (
            wait_event(first.daemon, "backup.finished", 0, FIRST_BACKUP_SECONDS, result="success")
            is None
        ):
            injected.problems.append(f"no first backup within {FIRST_BACKUP_SECONDS:g}s")

        phase_began = time.monotonic()
        deadline = phase_began + seconds
        for position, kind in enumerate(schedule):
            extra = position >= len(faults.ALL_KINDS)
            if extra and time.monotonic() + faults.ESTIMATES[kind] > deadline:
                break
            injected.inject(kind)
            _recover(injected, redis, disk)
            injected.pause()
        _calm_until(deadline, injected)
        soak.fault_phase_seconds = time.monotonic() - phase_began

        # The last clean run: no fault now; one scheduled backup must succeed, then SIGTERM
        # comes while the next one runs, which must finish before the daemon exits.
        _recover(injected, redis, disk)
        instance = daemons.current
        start = instance.daemon.mark()
        soak.final_backup = wait_event(
            instance.daemon, "backup.finished", start, FINAL_BACKUP_SECONDS, result="success"
        )
        start = instance.daemon.mark()
        soak.running_at_sigterm = wait_event(
            instance.daemon, "backup.started", start, faults.EVENT_SECONDS
        )
        with daemons.lock:
            daemons.scrape_failures(instance, terminal=soak.final_backup is not None)
            soak.final_exit_code = daemons.terminate(instance)
        sampler.stop()
        for load in loads:
            load.stop()
        soak.leftovers = leftovers(layout)
        soak.daemon_leftovers = marked_processes(DAEMON_MARK, mark)
        soak.redis_after_daemon = redis_processes_under(root, {redis.pid or -1})

        soak.final_policy = config.load(policy.path)
        soak.stored = store.backups()
        soak.candidates = retention.candidates(soak.stored)  # reads sidecars: before unmount
        soak.newest = soak.stored[-1].name if soak.stored else None
        soak.verify_all = run_cli(policy.path, mark, "verify", "--all", "--json")
        soak.verify_deep = run_cli(policy.path, mark, "verify", "--all", "--deep", "--json")
        soak.restore = run_cli(
            policy.path, mark, "restore", "--latest", "--to", str(layout.restored)
        )
        soak.drill = run_cli(policy.path, mark, "test-restore", "--latest", "--json")
        if soak.restore.returncode == 0:
            soak.restored_problems = restored_problems(layout, redis)
        soak.cli_leftovers = marked_processes(CLI_MARK, mark)
        soak.redis_after_cli = redis_processes_under(root, {redis.pid or -1})
        redis.stop()
        soak.redis_after_stop = redis_processes_under(root, set())
    soak.total_seconds = time.monotonic() - began
    return soak
