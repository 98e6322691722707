"""Every source keeps the Source contract of sovbackupd/sources/base.py."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from pathlib import Path, PurePosixPath

import pytest

from sovbackupd import sources
from sovbackupd.config.models import Sources
from sovbackupd.sources import Source, SourceReport
from sovbackupd.sources.files import MEMBER_OVERHEAD_BYTES
from tests.conftest import RedisServer, Sandbox, policy_data

KINDS: tuple[sources.SourceKind, ...] = sources.SOURCE_ORDER


@pytest.fixture(params=KINDS)
def source(
    request: pytest.FixtureRequest, sandbox: Sandbox, redis_factory: Callable[..., RedisServer]
) -> Source:
    """Each kind of source, built from a policy over the sandbox."""
    server = redis_factory("--appendonly", "yes")
    server.client().set("k", "v")
    data = policy_data(sandbox, server)
    data["sources"]["redis"]["aof_dir"] = str(server.aof_dir)
    built = sources.build_source(request.param, Sources.model_validate(data["sources"]))
    assert built is not None
    return built


def test_source_members_are_relative_unique_and_within_the_estimate(
    source: Source, tmp_path: Path
) -> None:
    """Arcnames are clean relative paths, origins absolute, and the estimate an upper bound."""
    estimate = source.preflight()
    staging = tmp_path / "staging"
    staging.mkdir()
    report = SourceReport(source.component, source.name)
    archived = 0
    names = []
    with closing(source.members(staging, report)) as members:
        for member in members:
            path = PurePosixPath(member.arcname)
            assert not path.is_absolute()
            assert ".." not in path.parts
            assert str(path) == member.arcname, "arcnames are normalised"
            assert member.origin is None or Path(member.origin).is_absolute()
            names.append(member.arcname)
            archived += MEMBER_OVERHEAD_BYTES
            if member.kind == "file":
                assert member.opener is not None
                with member.opener() as handle:
                    archived += len(handle.read())
    assert len(names) == len(set(names))
    assert names, "every configured source yields members"
    assert archived <= estimate.archived_bytes
    assert 0 < estimate.read_bytes <= estimate.archived_bytes, "the progress total is a guess"
    assert list(staging.iterdir()) == [], "staged copies are removed when the source is done"


def test_source_cleans_staging_when_closed_early(source: Source, tmp_path: Path) -> None:
    """Closing the generator after its first member leaves nothing staged."""
    source.preflight()
    staging = tmp_path / "staging"
    staging.mkdir()
    members = source.members(staging, SourceReport(source.component, source.name))
    next(members)
    members.close()
    assert list(staging.iterdir()) == []


def test_source_never_changes_the_live_data(
    source: Source, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Capturing a source leaves every file of the sandbox as it was."""

    def state() -> dict[str, tuple[int, int]]:
        return {
            str(path): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in sandbox.app.rglob("*")
            if not path.name.endswith(("-wal", "-shm"))
        }

    before = state()
    staging = tmp_path / "staging"
    staging.mkdir()
    with closing(source.members(staging, SourceReport(source.component, source.name))) as members:
        for member in members:
            if member.opener is not None:
                member.opener().close()
    assert state() == before
