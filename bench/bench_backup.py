"""Benchmark ``sovbackupd backup`` and ``restore`` against tar on a SovereignCore-like tree.

The tree is generated from a fixed seed, so runs of the same size are comparable: a WAL
SQLite database (~15%), an RDB-like blob (~20%), thousands of small text and JSON files
(~35%) and incompressible binaries (~30%), plus ``.env`` and ``redis.conf``. No Redis
server is started: the RDB-like blob is archived as a plain file inside ``data/``.

Each tool runs as a child process. Wall and CPU time (user + sys) come from ``os.wait4``,
peak RSS from GNU time around the tool; all three include the tool's own children (tar's
gzip, pigz or zstd).
The restore side times ``sovbackupd restore NAME --to DIR`` of sovbackupd's gzip and zstd
archives against ``tar -xzf`` and ``tar --zstd -xf``, each into a fresh directory.
The page cache cannot be dropped reliably, so the tree is read once before timing and
every run starts from a warm cache. Run ``bench_backup.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

SEED = 20240611
KIB = 1 << 10
MIB = 1 << 20
SIZE_UNITS = {"": 1, "K": KIB, "M": MIB, "G": 1 << 30}
SHARES = {"sqlite": 0.15, "rdb-like": 0.20, "text": 0.35, "random": 0.30}
TEXT_SHARES = {"data": 0.40, "mcp_data": 0.35, "memory": 0.25}
TEXT_FILE_BYTES = (1 * KIB, 50 * KIB)
FILES_PER_DIR = 40
RANDOM_FILE_BYTES = 64 * MIB
DATABASE_NAME = "sovereign_rekor.db"
DATA_DIRS = ("data", "mcp_data", "memory")
CONFIG_FILES = (".env", "redis.conf")
RDB_PATH = "data/redis/dump.rdb"
RSS_LIMIT_MIB = 120
# Peak RSS must not grow with the data. Its peak moves by a block or two between runs of
# one size (the compressor's queues hold a few 1 MiB blocks), so growth within this is none.
RSS_SLACK_MIB = 4
IDLE_BUSY = 0.10  # the machine counts as idle when other work uses less than this share
SOVBACKUPD = (sys.executable, "-m", "sovbackupd")
SANITIZED_ENV = ("BACKUP_DIR", "RETENTION_DAYS", "REMOTE_BACKUP_PATH", "SOVBACKUPD_CONFIG")
COMMON_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "which but all were when we there can more if has will one been would their what so "
    "about into them some could other then than only its also after two over new first "
    "request user session memory agent tool server status error ok value key token cache"
)
NOTES = (
    "Redis: no server is started; the RDB-like blob is archived as the plain file "
    f"{RDB_PATH} by every tool.",
    "Page cache: not dropped (no reliable way without root); the tree is read once "
    "before timing, so every run reads from a warm cache.",
    "sovbackupd also copies the SQLite database with the online backup API, runs "
    "integrity_check on the copy, hashes every member and fsyncs the archive; tar reads "
    "the live database file and does not fsync.",
    "sovbackupd restore --to first checks the archive against its sidecar sha256, then "
    "checks every member against the manifest (sha256 included) and makes the files "
    "durable before moving them into place; tar -xf does neither.",
)


class BenchError(Exception):
    """A tool failed or produced no archive: the figures would mean nothing."""


# --- the tree -------------------------------------------------------------------------


def _zipf_pool(items: list[str], top: int) -> list[str]:
    """Repeat the item of rank r ``top // r`` times (at least once), to draw it uniformly."""
    return [item for rank, item in enumerate(items, 1) for _ in range(top // rank or 1)]


class Corpus:
    """Phrases with Zipf-like frequencies: text that gzip packs 3-4x, like notes and logs."""

    def __init__(
        self, rng: random.Random, words: int = 2000, phrases: int = 5000, top: int = 2000
    ) -> None:
        """Draw *words* words and *phrases* phrases of them from *rng*.

        Both are drawn with Zipf-like weights: the commonest is *top* times as likely as
        the rarest.
        """
        vocabulary = COMMON_WORDS.split()
        while len(vocabulary) < words:
            vocabulary.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 11))))
        self._rng = rng
        self._words = _zipf_pool(vocabulary, top)
        self._phrases = _zipf_pool(
            [" ".join(rng.choices(self._words, k=rng.randint(1, 5))) for _ in range(phrases)], top
        )

    def word(self) -> str:
        """Return one word."""
        return self._rng.choice(self._words)

    def sentence(self, phrases: int) -> str:
        """Return *phrases* phrases (about three words each) joined by spaces."""
        return " ".join(self._rng.choices(self._phrases, k=phrases))

    def lines(self, size: int, prefix: Callable[[], str] = lambda: "") -> str:
        """Return lines of 2-6 phrases, each after *prefix()*, until *size* characters."""
        parts: list[str] = []
        total = 0
        while total < size:
            line = f"{prefix()}{self.sentence(self._rng.randint(2, 6))}\n"
            parts.append(line)
            total += len(line)
        return "".join(parts)


@dataclass(frozen=True)
class Tree:
    """The generated server tree: its root, the bytes of each part, how many files."""

    root: Path
    parts: dict[str, int]
    files: int

    @property
    def total_bytes(self) -> int:
        """Return the bytes of every generated file."""
        return sum(self.parts.values())

    @property
    def database(self) -> Path:
        """Return the SQLite database."""
        return self.root / DATABASE_NAME

    @property
    def members(self) -> list[str]:
        """Return the top-level names that every tool archives, relative to the root."""
        return [*CONFIG_FILES, DATABASE_NAME, *DATA_DIRS]


def parse_size(text: str) -> int:
    """Parse ``200M``, ``2G``, ``512K`` or plain bytes (binary units) into bytes."""
    number, unit = text.rstrip("KMGkmg"), text[len(text.rstrip("KMGkmg")) :].upper()
    if unit not in SIZE_UNITS or not number.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 200M or 2G)")
    return int(float(number) * SIZE_UNITS[unit])


def _write_config(root: Path) -> int:
    files = {
        ".env": "SECRET_KEY=bench-not-a-secret\nREDIS_URL=redis://127.0.0.1:6379/0\n"
        f"DATABASE_PATH={root / DATABASE_NAME}\nLOG_LEVEL=info\n",
        "redis.conf": "port 6379\nbind 127.0.0.1\nsave 3600 1\nappendonly no\n"
        f"dir {root / 'data' / 'redis'}\ndbfilename dump.rdb\n",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / ".env").chmod(0o600)
    return sum(len(text) for text in files.values())


def make_database(path: Path, target: int, rng: random.Random, corpus: Corpus) -> int:
    """Create a WAL SQLite database of about *target* bytes; return its size."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=OFF")  # generation only; nothing to protect
        connection.executescript(
            """
            CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, email TEXT, created INTEGER);
            CREATE TABLE events (
                id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users, kind TEXT,
                at INTEGER, payload TEXT);
            CREATE INDEX events_by_user ON events (user_id, at);
            CREATE TABLE documents (
                id INTEGER PRIMARY KEY, title TEXT, body TEXT, digest BLOB, attachment BLOB);
            """
        )
        connection.executemany(
            "INSERT INTO users (name, email, created) VALUES (?, ?, ?)",
            [
                (corpus.sentence(1), f"user{number}@example.org", 1_700_000_000 + number)
                for number in range(2000)
            ],
        )
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        while connection.execute("PRAGMA page_count").fetchone()[0] * page_size < target:
            connection.executemany(
                "INSERT INTO events (user_id, kind, at, payload) VALUES (?, ?, ?, ?)",
                [
                    (
                        rng.randint(1, 2000),
                        rng.choice(("login", "query", "tool_call", "memory_write")),
                        1_700_000_000 + rng.getrandbits(24),
                        json.dumps({"id": f"{rng.getrandbits(64):016x}", "q": corpus.sentence(3)}),
                    )
                    for _ in range(2000)
                ],
            )
            connection.executemany(
                "INSERT INTO documents (title, body, digest, attachment) VALUES (?, ?, ?, ?)",
                [
                    (
                        corpus.sentence(2),
                        corpus.lines(rng.randint(500, 3000)),
                        rng.randbytes(32),
                        rng.randbytes(rng.randint(0, 400)),
                    )
                    for _ in range(200)
                ],
            )
            connection.commit()
    finally:
        connection.close()
    return path.stat().st_size


def make_rdb_like(path: Path, target: int, rng: random.Random) -> int:
    """Write an RDB-like blob of about *target* bytes: structured records, random ids."""
    kinds = (b"session", b"user", b"cache", b"ratelimit", b"memory")
    states = (b"active", b"idle", b"expired", b"pending", b"archived")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("wb") as handle:
        written += handle.write(b"REDIS0011\xfa\tredis-ver\x057.2.4\xfe\x00\xfb")
        while written < target:
            chunk = bytearray()
            while len(chunk) < MIB:
                key = b"%s:%016x" % (rng.choice(kinds), rng.getrandbits(64))
                value = b"".join(
                    (
                        rng.choice(states),
                        struct.pack(
                            "<IQ", rng.getrandbits(16), 1_700_000_000 + rng.getrandbits(20)
                        ),
                        rng.randbytes(rng.randint(4, 24)),
                    )
                )
                chunk += struct.pack("<BB", 0x04, len(key)) + key
                chunk += struct.pack("<H", len(value)) + value
            written += handle.write(chunk)
        written += handle.write(b"\xff" + rng.randbytes(8))
    return written


def _directories(root: Path, count: int, rng: random.Random, corpus: Corpus) -> list[Path]:
    """Create *count* nested directories (1-3 levels) below *root*."""
    directories = []
    for _ in range(count):
        depth = rng.randint(1, 3)
        directory = root.joinpath(*(corpus.word() for _ in range(depth)))
        directory.mkdir(parents=True, exist_ok=True)
        directories.append(directory)
    return directories


def _log_text(size: int, rng: random.Random, corpus: Corpus) -> str:
    def prefix() -> str:
        return (
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z "
            f"{rng.choice(('INFO', 'INFO', 'INFO', 'WARN', 'DEBUG'))} "
            f"request_id={rng.getrandbits(64):016x} "
        )

    return corpus.lines(size, prefix)


def _json_text(size: int, rng: random.Random, corpus: Corpus) -> str:
    records: list[str] = []
    total = 0
    while total < size:
        record = json.dumps(
            {
                "id": f"{rng.getrandbits(128):032x}",
                "created": 1_700_000_000 + rng.getrandbits(24),
                "role": rng.choice(("user", "assistant", "tool")),
                "tags": [corpus.word() for _ in range(3)],
                "score": round(rng.random(), 4),
                "text": corpus.sentence(rng.randint(3, 20)),
            }
        )
        records.append(record)
        total += len(record) + 2
    return "[\n" + ",\n".join(records) + "\n]\n"


def _markdown_text(size: int, rng: random.Random, corpus: Corpus) -> str:
    parts = [f"# {corpus.sentence(2)}\n"]
    total = len(parts[0])
    while total < size:
        part = f"\n## {corpus.sentence(1)}\n\n{corpus.lines(rng.randint(200, 1500), lambda: '- ')}"
        parts.append(part)
        total += len(part)
    return "".join(parts)


TEXT_KINDS: dict[str, tuple[str, Callable[[int, random.Random, Corpus], str]]] = {
    "data": (".log", _log_text),
    "mcp_data": (".json", _json_text),
    "memory": (".md", _markdown_text),
}


def make_text_files(root: Path, target: int, rng: random.Random, corpus: Corpus) -> tuple[int, int]:
    """Write small text files, about *target* bytes in all; return (bytes, files).

    Logs go to data/, JSON to mcp_data/ and Markdown to memory/, 1-50 KiB each, spread
    over nested directories.
    """
    written = files = 0
    for area, share in TEXT_SHARES.items():
        suffix, render = TEXT_KINDS[area]
        budget = int(target * share)
        count = 2 * budget // sum(TEXT_FILE_BYTES)  # files of the average size
        directories = _directories(root / area, max(4, count // FILES_PER_DIR), rng, corpus)
        area_written = 0
        while area_written < budget:
            text = render(rng.randint(*TEXT_FILE_BYTES), rng, corpus).encode()
            path = rng.choice(directories) / f"{corpus.word()}-{files:06d}{suffix}"
            path.write_bytes(text)
            area_written += len(text)
            files += 1
        written += area_written
    return written, files


def make_random_files(directory: Path, target: int, rng: random.Random) -> tuple[int, int]:
    """Write incompressible files of up to 64 MiB, *target* bytes in all; return (bytes, files)."""
    directory.mkdir(parents=True, exist_ok=True)
    count = max(2, -(-target // RANDOM_FILE_BYTES))
    each = target // count
    for number in range(count):
        with (directory / f"blob-{number:02d}.bin").open("wb") as handle:
            for offset in range(0, each, 4 * MIB):
                handle.write(rng.randbytes(min(4 * MIB, each - offset)))
    return each * count, count


def generate_tree(root: Path, total: int, seed: int) -> Tree:
    """Generate the server tree of about *total* bytes below *root*, from *seed*."""
    rng = random.Random(seed)
    corpus = Corpus(rng)
    for name in DATA_DIRS:
        (root / name).mkdir(parents=True)
    config_bytes = _write_config(root)
    database_bytes = make_database(root / DATABASE_NAME, int(total * SHARES["sqlite"]), rng, corpus)
    rdb_bytes = make_rdb_like(root / RDB_PATH, int(total * SHARES["rdb-like"]), rng)
    text_bytes, text_files = make_text_files(root, int(total * SHARES["text"]), rng, corpus)
    random_bytes, random_files = make_random_files(
        root / "data" / "blobs", int(total * SHARES["random"]), rng
    )
    return Tree(
        root=root,
        parts={
            "config": config_bytes,
            "sqlite": database_bytes,
            "rdb-like": rdb_bytes,
            "text": text_bytes,
            "random": random_bytes,
        },
        files=len(CONFIG_FILES) + 2 + text_files + random_files,  # 2: database, RDB-like
    )


def warm_cache(root: Path) -> int:
    """Read every file below *root* once so that all runs start from a warm page cache."""
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            with (Path(directory) / name).open("rb") as handle:
                while chunk := handle.read(MIB):
                    total += len(chunk)
    return total


def policy_path(work: Path, compression: str) -> Path:
    """Return where the sovbackupd policy for *compression* is written below *work*."""
    return work / f"policy-{compression}.yaml"


def write_policy(path: Path, tree: Tree, backup_dir: Path, compression: str) -> Path:
    """Write a sovbackupd policy for *tree* (sqlite, config and dirs; no Redis)."""
    policy = {
        "backup_dir": str(backup_dir),
        "authentication": {"key_file": str(path.parent / "auth.key")},
        "name_prefix": "bench",
        "compression": compression,
        "sources": {
            "sqlite": [str(tree.database)],
            "config": [str(tree.root / name) for name in CONFIG_FILES],
            "dirs": [str(tree.root / name) for name in DATA_DIRS],
        },
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")
    return path


# --- measuring ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """What one child process cost: wall and CPU seconds, peak RSS, archive size.

    *busy_before* is how busy the machine was just before the run, with nothing of ours
    running: other work skews every figure.
    """

    wall_seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    output_bytes: int = 0
    busy_before: float = 0.0  # the share of all CPUs that other work used just before


@dataclass(frozen=True)
class Case:
    """One timed command and the directory it writes into, fresh before every run.

    An archiver leaves exactly one *suffix* file there; a restore (no *suffix*) a tree.
    """

    label: str
    argv: tuple[str, ...]
    output_dir: Path
    suffix: str | None = None

    def archive(self) -> Path:
        """Return the archive the command wrote."""
        if self.suffix is None:
            raise BenchError(f"{self.label}: writes no archive")
        suffix = self.suffix
        found = [path for path in self.output_dir.iterdir() if path.name.endswith(suffix)]
        if len(found) != 1:
            raise BenchError(f"{self.label}: expected one *{suffix} in {self.output_dir}")
        return found[0]

    def output_bytes(self) -> int:
        """Return the archive's size, or for a restore the bytes of every file it wrote."""
        if self.suffix is not None:
            return self.archive().stat().st_size
        return sum(
            (Path(directory) / name).lstat().st_size
            for directory, _, names in os.walk(self.output_dir)
            for name in names
        )


def run_child(argv: Sequence[str], env: Mapping[str, str]) -> Sample:
    """Run *argv* to completion and measure it; raise BenchError on failure.

    Wall and CPU time come from ``os.wait4``. Peak RSS comes from GNU time wrapped around
    *argv*, not from that wait4: Linux starts a spawned child's ru_maxrss at its parent's
    RSS, so a small tool spawned by this process would seem as big as this process.
    """
    probe = shutil.which("time")
    if probe is None:
        raise BenchError("GNU time is needed to measure peak RSS (apt-get install time)")
    with tempfile.TemporaryFile() as errors, tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        # From /, not here: `python -m` puts the working directory first on sys.path, and a
        # source tree there would shadow the sovbackupd that PYTHONPATH or the venv selects.
        # In a session of its own, so that an interrupt can stop tar and its compressor too.
        process = subprocess.Popen(
            (probe, "--format=%M", f"--output={peak.name}", *argv),
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env=env,
            cwd="/",
            start_new_session=True,
        )
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()[-2000:]
            raise BenchError(f"{' '.join(argv)} exited {process.returncode}: {message}")
        peak_kib = int(peak.read().split()[-1])
    return Sample(
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=peak_kib / KIB,
    )


def cpu_busy(interval: float = 0.5) -> float:
    """Return the share of all CPUs' time spent busy over the next *interval* seconds."""

    def counters() -> tuple[int, int]:
        with Path("/proc/stat").open(encoding="ascii") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:9]]
        return ticks[3] + ticks[4], sum(ticks)  # (idle + iowait, all but guest time)

    idle_before, total_before = counters()
    time.sleep(interval)
    idle_after, total_after = counters()
    return 1 - (idle_after - idle_before) / max(1, total_after - total_before)


@dataclass(frozen=True)
class Runner:
    """How every timed command runs: its environment, how many times, after what calm."""

    env: Mapping[str, str]
    repeat: int
    idle_wait: float

    def run(self, argv: Sequence[str]) -> Sample:
        """Wait up to *idle_wait* seconds for the CPUs to calm down, then measure *argv*."""
        deadline = time.monotonic() + self.idle_wait
        busy = cpu_busy()
        while busy > IDLE_BUSY and time.monotonic() < deadline:
            busy = cpu_busy()
        return replace(run_child(argv, self.env), busy_before=busy)


def backup_cases(tree: Tree, work: Path) -> list[Case]:
    """Return the five archivers of the same tree, each writing below *work*."""
    tar_inputs = ("-C", str(tree.root), *tree.members)
    cases = []
    for compression, suffix in (("gzip", ".tar.gz"), ("zstd", ".tar.zst")):
        backup_dir = work / f"sovbackupd-{compression}"
        policy = write_policy(policy_path(work, compression), tree, backup_dir, compression)
        cases.append(
            Case(
                f"sovbackupd {compression}",
                (*SOVBACKUPD, "--config", str(policy), "backup"),
                backup_dir,
                suffix,
            )
        )
    for label, flags, suffix in (
        ("tar czf", ("-czf",), ".tar.gz"),
        ("tar -I pigz", ("-I", "pigz", "-cf"), ".tar.gz"),
        ("tar --zstd", ("--zstd", "-cf"), ".tar.zst"),
    ):
        output_dir = work / label.replace(" ", "_")
        argv = ("tar", *flags, str(output_dir / f"tree{suffix}"), *tar_inputs)
        cases.append(Case(label, argv, output_dir, suffix))
    return cases


def _fresh(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def restore_cases(backups: Sequence[Case], work: Path) -> list[Case]:
    """Return the restores of the archives *backups* left, each into *work*/restore.

    ``tar -xf`` of sovbackupd's and tar's gzip archives, ``sovbackupd restore NAME --to``
    of sovbackupd's gzip and zstd archives, and ``tar --zstd -xf`` of tar's zstd archive.
    """
    target = work / "restore"
    archives = {case.label: case.archive() for case in backups}

    def tar(flags: tuple[str, ...], label: str) -> Case:
        argv = ("tar", *flags, str(archives[label]), "-C", str(target))
        return Case(f"tar {' '.join(flags)} of {label}", argv, target)

    cases = [tar(("-xzf",), "sovbackupd gzip"), tar(("-xzf",), "tar czf")]
    for compression, suffix in (("gzip", ".tar.gz"), ("zstd", ".tar.zst")):
        name = archives[f"sovbackupd {compression}"].name.removesuffix(suffix)
        policy = str(policy_path(work, compression))
        argv = (*SOVBACKUPD, "--config", policy, "restore", name, "--to", str(target))
        cases.append(Case(f"sovbackupd restore --to {compression}", argv, target))
    cases.append(tar(("--zstd", "-xf"), "tar --zstd"))
    return cases


def measure(cases: Sequence[Case], runner: Runner) -> dict[str, list[Sample]]:
    """Run every case, interleaved, as often as *runner* says; the last outputs stay.

    Each run starts in a fresh output directory; its sample records the bytes written.
    """
    samples: dict[str, list[Sample]] = {case.label: [] for case in cases}
    for round_number in range(1, runner.repeat + 1):
        for case in cases:
            _fresh(case.output_dir)
            os.sync()  # no dirty pages of an earlier run left to flush during this one
            print(
                f"  [{round_number}/{runner.repeat}] {case.label} ...", file=sys.stderr, flush=True
            )
            sample = runner.run(case.argv)
            samples[case.label].append(replace(sample, output_bytes=case.output_bytes()))
    return samples


def median_sample(samples: Sequence[Sample]) -> Sample:
    """Return the per-figure median of *samples*."""
    return Sample(
        wall_seconds=statistics.median(sample.wall_seconds for sample in samples),
        cpu_seconds=statistics.median(sample.cpu_seconds for sample in samples),
        peak_rss_mib=statistics.median(sample.peak_rss_mib for sample in samples),
        output_bytes=int(statistics.median(sample.output_bytes for sample in samples)),
        busy_before=statistics.median(sample.busy_before for sample in samples),
    )


# --- reporting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A ratio or figure, with the goal it must meet (None: reported only)."""

    name: str
    value: float
    goal: Literal["<=", "<"] | None = None
    limit: float = 0.0

    @property
    def met(self) -> bool | None:
        """Return whether the goal is met, None when there is no goal."""
        if self.goal is None:
            return None
        return self.value <= self.limit if self.goal == "<=" else self.value < self.limit


@dataclass
class Report:
    """Everything one benchmark run measured, as printed and as ``--json`` writes it."""

    machine: dict[str, Any]
    tree: dict[str, Any]
    repeat: int
    backup: dict[str, Sample]
    extract: dict[str, Sample]
    checks: list[Check] = field(default_factory=list)
    notes: tuple[str, ...] = NOTES

    def to_json(self) -> str:
        """Return the report as JSON, goals with their verdicts."""
        data = asdict(self)
        data["checks"] = [{**asdict(check), "met": check.met} for check in self.checks]
        return json.dumps(data, indent=1)


def machine(env: Mapping[str, str]) -> dict[str, Any]:
    """Describe the machine (CPUs, CPU model, kernel, Python, load) and the sovbackupd run."""
    model = "unknown"
    with Path("/proc/cpuinfo").open(encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),  # other work on the machine skews every figure
        "sovbackupd": subprocess.run(
            (sys.executable, "-c", "import sovbackupd as s; print(s.__version__, s.__path__[0])"),
            env=env,
            cwd="/",  # as the timed runs: see run_child
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
    }


def checks(
    backup: Mapping[str, Sample], extract: Mapping[str, Sample], baseline: Report | None
) -> list[Check]:
    """Return the goal ratios and figures of this run (and against *baseline*, if any)."""

    def wall(label: str) -> float:
        return backup[label].wall_seconds

    def size(label: str) -> float:
        return backup[label].output_bytes

    found = [
        Check(
            "sovbackupd gzip wall / tar czf wall",
            wall("sovbackupd gzip") / wall("tar czf"),
            "<=",
            0.15,
        ),
        Check(
            "sovbackupd zstd wall / tar --zstd wall",
            wall("sovbackupd zstd") / wall("tar --zstd"),
            "<=",
            1.3,
        ),
        Check(
            "sovbackupd gzip wall / tar -I pigz wall", wall("sovbackupd gzip") / wall("tar -I pigz")
        ),
    ]
    for compression in ("gzip", "zstd"):
        rss = backup[f"sovbackupd {compression}"].peak_rss_mib
        found.append(Check(f"sovbackupd {compression} peak RSS (MiB)", rss, "<", RSS_LIMIT_MIB))
        if baseline is not None:
            before = baseline.backup[f"sovbackupd {compression}"].peak_rss_mib
            found.append(
                Check(
                    f"sovbackupd {compression} peak RSS minus {baseline.tree['requested']}'s (MiB)",
                    rss - before,
                    "<=",
                    RSS_SLACK_MIB,
                )
            )

    def unpack(label: str) -> float:
        return extract[label].wall_seconds

    found += [
        Check(
            "tar -xzf sovbackupd gzip wall / tar -xzf tar czf wall",
            unpack("tar -xzf of sovbackupd gzip") / unpack("tar -xzf of tar czf"),
            "<=",
            1.0,
        ),
        Check(
            "sovbackupd restore --to wall / tar -xzf of tar czf wall",
            unpack("sovbackupd restore --to gzip") / unpack("tar -xzf of tar czf"),
            "<=",
            1.0,
        ),
        Check(
            "sovbackupd restore --to zstd wall / tar --zstd -xf wall",
            unpack("sovbackupd restore --to zstd") / unpack("tar --zstd -xf of tar --zstd"),
        ),
        Check("sovbackupd gzip size / tar czf size", size("sovbackupd gzip") / size("tar czf")),
        Check(
            "sovbackupd zstd size / tar --zstd size", size("sovbackupd zstd") / size("tar --zstd")
        ),
    ]
    return found


def load_report(path: Path) -> Report:
    """Read a report that an earlier run wrote with ``--json``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return Report(
        machine=data["machine"],
        tree=data["tree"],
        repeat=data["repeat"],
        backup={label: Sample(**figures) for label, figures in data["backup"].items()},
        extract={label: Sample(**figures) for label, figures in data["extract"].items()},
    )


BACKUP_COLUMNS = (
    "wall s",
    "CPU s",
    "CPU/wall",
    "MiB/s",
    "peak RSS MiB",
    "output MiB",
    "out/in",
    "busy before",
)
EXTRACT_COLUMNS = ("wall s", "CPU s", "CPU/wall", "peak RSS MiB", "output MiB", "busy before")


def _row(label: str, cells: Sequence[str | float]) -> str:
    return f"{label:<30}" + "".join(
        f"{cell:>13}" if isinstance(cell, str) else f"{cell:13.2f}" for cell in cells
    )


def render(report: Report) -> Iterator[str]:
    """Yield the report as text lines: the tree, two tables, the goals, the notes."""
    tree = report.tree
    total = tree["bytes"]
    yield (
        f"machine: {report.machine['cpus']} CPUs, {report.machine['cpu_model']}, load average "
        + " ".join(f"{load:.2f}" for load in report.machine["load_average"])
    )
    yield f"measured: {report.machine['sovbackupd']}"
    yield (
        f"tree: {total / MIB:.1f} MiB in {tree['files']} files ("
        + ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in tree["parts"].items())
        + f"); median of {report.repeat} run(s)"
    )
    yield ""
    yield _row("backup", BACKUP_COLUMNS)
    for label, sample in report.backup.items():
        yield _row(
            label,
            (
                sample.wall_seconds,
                sample.cpu_seconds,
                sample.cpu_seconds / sample.wall_seconds,
                total / MIB / sample.wall_seconds,
                sample.peak_rss_mib,
                sample.output_bytes / MIB,
                sample.output_bytes / total,
                sample.busy_before,
            ),
        )
    yield ""
    yield _row("restore", EXTRACT_COLUMNS)
    for label, sample in report.extract.items():
        yield _row(
            label,
            (
                sample.wall_seconds,
                sample.cpu_seconds,
                sample.cpu_seconds / sample.wall_seconds,
                sample.peak_rss_mib,
                sample.output_bytes / MIB,
                sample.busy_before,
            ),
        )
    yield ""
    yield f"{'ratio / figure':<56} {'value':>8}  goal"
    for check in report.checks:
        verdict = (
            "(reported only)"
            if check.met is None
            else f"{check.goal} {check.limit:g}  {'met' if check.met else 'NOT MET'}"
        )
        yield f"{check.name:<56} {check.value:8.3f}  {verdict}"
    yield ""
    yield from (f"note: {note}" for note in report.notes)


# --- command line ---------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default="200M", help="tree size (default 200M)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),  # noqa: S108 (mkdtemp makes a private directory inside)
        help="parent of the temporary work directory (default /var/tmp)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per tool; the median is reported"
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other work to go below 10%% CPU",
    )
    parser.add_argument("--seed", type=int, default=SEED, help=f"tree seed (default {SEED})")
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write the report as JSON to PATH"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="JSON of an earlier (smaller) run: sovbackupd's peak RSS must not have grown",
    )
    arguments = parser.parse_args(argv)
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    return arguments


def benchmark(arguments: argparse.Namespace, work: Path) -> Report:
    """Generate the tree in *work*, time every tool on it and return the report."""
    env = {key: value for key, value in os.environ.items() if key not in SANITIZED_ENV}
    host = machine(env)  # before any work of ours adds to the load average
    baseline = load_report(arguments.baseline) if arguments.baseline else None
    print(
        f"generating {arguments.size / MIB:.0f} MiB tree in {work} ...", file=sys.stderr, flush=True
    )
    started = time.perf_counter()
    tree = generate_tree(work / "tree", arguments.size, arguments.seed)
    print(f"  {tree.files} files in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(f"warming the page cache: read {warm_cache(tree.root) / MIB:.0f} MiB", file=sys.stderr)
    cases = backup_cases(tree, work)
    runner = Runner(env, arguments.repeat, arguments.idle_wait)
    backup = measure(cases, runner)
    restores = restore_cases(cases, work)
    extract = measure(restores, runner)
    shutil.rmtree(restores[0].output_dir)
    medians = {label: median_sample(samples) for label, samples in backup.items()}
    extract_medians = {label: median_sample(samples) for label, samples in extract.items()}
    return Report(
        machine=host,
        tree={
            "requested": f"{arguments.size / MIB:.0f}M",
            "bytes": tree.total_bytes,
            "files": tree.files,
            "parts": tree.parts,
            "seed": arguments.seed,
        },
        repeat=arguments.repeat,
        backup=medians,
        extract=extract_medians,
        checks=checks(medians, extract_medians, baseline),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0, or 1 when a goal is not met, 2 when a tool failed."""
    arguments = parse_arguments(argv)
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sovbackupd-bench-", dir=arguments.workdir))
    try:
        report = benchmark(arguments, work)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    finally:
        if arguments.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(render(report)))
    if arguments.json:
        arguments.json.write_text(report.to_json() + "\n", encoding="utf-8")
    return 0 if all(check.met is not False for check in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
