"""The free-space preflight: from earlier backups' compression, never fooled by their manifests."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sovbackupd import backup
from sovbackupd.config.models import SourcePath
from sovbackupd.sources.base import Estimate
from sovbackupd.sources.files import FilesSource
from sovbackupd.store import Store

PREFIX = "sovereigncore_backup"


def plant(directory: Path, number: int, stored_size: int, head: dict[str, object]) -> None:
    """Put an archive of *stored_size* bytes (sparse: no disk used) and its manifest head."""
    name = f"{PREFIX}_20260101_{number:06d}"
    with (directory / f"{name}.tar.gz").open("wb") as handle:
        handle.truncate(stored_size)
    (directory / f"{name}.manifest.json").write_text(json.dumps(head))


def head_of(number: int, file_bytes: object) -> dict[str, object]:
    return {
        "format_version": 1,
        "id": f"{PREFIX}_20260101_{number:06d}",
        "created": "2026-01-01T00:00:00Z",
        "finished": "2026-01-01T00:00:01Z",
        "tiers": ["daily"],
        "host": "host",
        "tool_version": "0",
        "compression": "gzip",
        "sources": [],
        "file_count": 1,
        "file_bytes": file_bytes,
    }


histories = st.lists(
    st.tuples(
        st.integers(0, 1 << 40),
        st.one_of(st.integers(-(1 << 70), 1 << 70), st.text(max_size=5), st.none()),
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(
    history=histories,
    archived=st.integers(0, 1 << 50),
    staged=st.integers(0, 1 << 40),
)
def test_space_needed_stays_between_the_staged_bytes_and_the_worst_case(
    *, history: list[tuple[int, object]], archived: int, staged: int
) -> None:
    """Invariant: whatever manifests claim, staged + margin < space demanded <= worst case."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        for number, (stored_size, file_bytes) in enumerate(history):
            plant(directory, number, stored_size, head_of(number, file_bytes))
        ratio = backup.compression_ratio(Store(directory, PREFIX), ".tar.gz")
    estimate = Estimate(archived_bytes=archived, staged_bytes=staged)
    needed = backup.space_needed(estimate, ratio)
    floor = staged + backup.SPACE_MARGIN_BYTES
    assert floor + archived * backup.MIN_RATIO <= needed <= floor + archived


def test_without_history_the_worst_case_is_demanded(tmp_path: Path) -> None:
    """No earlier backup: the archive may be as large as its sources."""
    assert backup.compression_ratio(Store(tmp_path, PREFIX), ".tar.gz") is None
    estimate = Estimate(archived_bytes=10 << 20)
    assert backup.space_needed(estimate, None) == (10 << 20) + backup.SPACE_MARGIN_BYTES


def test_history_ratio_shrinks_the_estimate(tmp_path: Path) -> None:
    """833 KiB stored of 10 MiB read last time: the next 10 MiB need ~1.2 MiB, not 10."""
    plant(tmp_path, 1, 833 << 10, head_of(1, 10 << 20))
    ratio = backup.compression_ratio(Store(tmp_path, PREFIX), ".tar.gz")
    needed = backup.space_needed(Estimate(archived_bytes=10 << 20), ratio)
    assert needed - backup.SPACE_MARGIN_BYTES < 2 << 20


def test_other_compression_history_is_not_used(tmp_path: Path) -> None:
    """A gzip history says nothing about the next, uncompressed, archive."""
    plant(tmp_path, 1, 833 << 10, head_of(1, 10 << 20))
    assert backup.compression_ratio(Store(tmp_path, PREFIX), ".tar") is None


def test_a_sparse_file_counts_its_allocated_bytes(tmp_path: Path) -> None:
    """A 200 GiB file with 4 KiB of data adds 4 KiB (plus a header) to the estimate."""
    data = tmp_path / "data"
    data.mkdir()
    with (data / "disk.img").open("wb") as handle:
        handle.truncate(200 << 30)
        handle.write(b"x" * 4096)
    estimate = FilesSource("data", [SourcePath(path=data)], []).preflight()
    assert estimate.read_bytes <= 64 << 10
    assert estimate.archived_bytes <= 64 << 10
