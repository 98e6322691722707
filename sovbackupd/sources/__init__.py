"""Sources: one module per kind of data, behind the Protocol in base.py."""

from pathlib import Path
from typing import Literal, assert_never

from sovbackupd.config.models import Sources
from sovbackupd.sources.base import Component, Estimate, Member, Source, SourceReport
from sovbackupd.sources.files import FilesSource
from sovbackupd.sources.redis import RedisSource
from sovbackupd.sources.sqlite import SqliteSource

SourceKind = Literal["redis", "sqlite", "config", "dirs"]
SOURCE_ORDER: tuple[SourceKind, ...] = ("redis", "sqlite", "config", "dirs")


def build_source(
    kind: SourceKind,
    config: Sources,
    *,
    redis_offline: bool = False,
    backup_dir: Path | None = None,
) -> Source | None:
    """Return the source of *kind* that *config* describes, or None when it has none.

    *redis_offline* archives a stopped Redis server's files as they are (see RedisSource).
    A data directory walk that meets *backup_dir* fails (see FilesSource).
    """
    match kind:
        case "redis":
            return (
                RedisSource(config.redis, offline=redis_offline)
                if config.redis is not None
                else None
            )
        case "sqlite":
            return (
                SqliteSource(config.sqlite, config.sqlite_timeout_seconds)
                if config.sqlite
                else None
            )
        case "config":
            return FilesSource("config", config.config, config.exclude) if config.config else None
        case "dirs":
            return (
                FilesSource("data", config.dirs, config.exclude, backup_dir)
                if config.dirs
                else None
            )
        case _:
            assert_never(kind)


def build_all(
    config: Sources, *, redis_offline: bool = False, backup_dir: Path | None = None
) -> list[Source]:
    """Return every configured source, in archive order (Redis first: it fails fastest)."""
    return [
        source
        for kind in SOURCE_ORDER
        if (
            source := build_source(kind, config, redis_offline=redis_offline, backup_dir=backup_dir)
        )
        is not None
    ]


__all__ = [
    "Component",
    "Estimate",
    "Member",
    "Source",
    "SourceReport",
    "build_all",
    "build_source",
]
