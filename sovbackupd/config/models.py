"""The policy models: the single source of truth for what a policy file may say."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from sovbackupd import scheduler
from sovbackupd.policy import parse_duration

TIER_NAMES = ("hourly", "daily", "weekly", "monthly", "yearly")
TierName = Literal["hourly", "daily", "weekly", "monthly", "yearly"]
Compression = Literal["gzip", "zstd", "none"]

# Names at the top of every archive that a source's basename must not take.
RESERVED_ARCHIVE_NAMES = frozenset(
    {
        "redis_dump.rdb",
        "appendonly.aof",
        "appendonlydir",
        "config",
        "backup_info.txt",
        "manifest.json",
    }
)


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path, not {str(path)!r}")
    return path


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _path_shorthand(value: object) -> object:
    return {"path": value} if isinstance(value, str) else value


class SourcePath(_Model):
    """A file or directory to back up."""

    path: AbsolutePath = Field(description="Absolute path of the file or directory.")
    optional: bool = Field(
        default=False,
        description="When true, a missing path is recorded in the manifest instead of "
        "failing the backup.",
    )


SourcePathEntry = Annotated[SourcePath, BeforeValidator(_path_shorthand)]


class RedisSource(_Model):
    """The Redis instance, snapshotted with BGSAVE."""

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis:// or unix:// URL of the instance. Keep passwords out of it: "
        "use password_file.",
    )
    username: str | None = Field(
        default=None,
        description="ACL user; it needs only +bgsave +lastsave +info +ping.",
    )
    password_file: AbsolutePath | None = Field(
        default=None, description="File whose first line is the Redis password."
    )
    rdb_path: AbsolutePath = Field(
        default=Path("/var/lib/redis/dump.rdb"),
        description="Where the server writes its RDB (dir + dbfilename in redis.conf).",
    )
    aof_dir: AbsolutePath | None = Field(
        default=None,
        description="Set to archive the AOF too: Redis 7's appendonlydir, or the directory "
        "holding appendonly.aof on older servers.",
    )
    timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Longest wait for BGSAVE to finish before the backup fails.",
    )


def _unique_basenames(entries: list[SourcePath], what: str) -> list[SourcePath]:
    seen: dict[str, Path] = {}
    for entry in entries:
        name = entry.path.name
        if name in RESERVED_ARCHIVE_NAMES:
            raise ValueError(f"{what} {entry.path} would take the reserved archive name {name!r}")
        if name in seen:
            raise ValueError(
                f"{what} {seen[name]} and {entry.path} share the basename {name!r}, "
                "which must be unique inside the archive"
            )
        seen[name] = entry.path
    return entries


class Sources(_Model):
    """What goes into every backup."""

    redis: RedisSource | None = Field(default=None, description="The Redis instance, if any.")
    sqlite: list[SourcePathEntry] = Field(
        default_factory=list,
        description="SQLite databases, copied with the online backup API; each is archived "
        "under its basename.",
    )
    sqlite_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Longest wait for a locked SQLite database before the backup fails.",
    )
    config: list[SourcePathEntry] = Field(
        default_factory=list,
        description="Configuration files, archived under config/ by basename.",
    )
    dirs: list[SourcePathEntry] = Field(
        default_factory=list,
        description="Data directories, each archived under its basename.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns (fnmatch) matched against each entry's name and its "
        "path relative to its directory; matches are left out.",
    )

    @field_validator("sqlite")
    @classmethod
    def _sqlite_basenames(cls, entries: list[SourcePath]) -> list[SourcePath]:
        return _unique_basenames(entries, "sqlite database")

    @field_validator("config")
    @classmethod
    def _config_basenames(cls, entries: list[SourcePath]) -> list[SourcePath]:
        return _unique_basenames(entries, "config file")

    @field_validator("dirs")
    @classmethod
    def _dirs_basenames(cls, entries: list[SourcePath]) -> list[SourcePath]:
        return _unique_basenames(entries, "directory")

    @model_validator(mode="after")
    def _no_shared_top_names(self) -> Sources:
        tops = [entry.path.name for entry in [*self.sqlite, *self.dirs]]
        clashes = sorted({name for name in tops if tops.count(name) > 1})
        if clashes:
            raise ValueError(
                f"sqlite databases and directories share archive names: {', '.join(clashes)}"
            )
        if self.redis is None and not (self.sqlite or self.config or self.dirs):
            raise ValueError("no sources: name at least one of redis, sqlite, config, dirs")
        return self


def _cron(expression: str) -> str:
    scheduler.parse_cron(expression, "UTC")
    return expression


class Tier(_Model):
    """One tier: when it runs, and how many periods of backups GFS retention keeps."""

    schedule: Annotated[str, AfterValidator(_cron)] | None = Field(
        default=None,
        description="Cron expression (5 fields, or 6 with seconds first); none for a tier "
        "that only labels retention, like yearly.",
    )
    keep: int | Literal["unlimited"] = Field(
        default=0,
        description="How many periods (hours, days, ISO weeks, months, years) keep their "
        "newest backup; 'unlimited' keeps every period.",
    )

    @field_validator("keep", mode="before")
    @classmethod
    def _keep_count(cls, keep: object) -> object:
        if keep == "unlimited" or (
            isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0
        ):
            return keep
        raise ValueError("must be a whole number >= 0 or 'unlimited'")


class Tiers(_Model):
    """The GFS tiers: schedules and keep counts."""

    hourly: Tier | None = Field(default=None, description="Hourly backups.")
    daily: Tier | None = Field(default=None, description="Daily backups.")
    weekly: Tier | None = Field(default=None, description="Weekly backups (ISO weeks).")
    monthly: Tier | None = Field(default=None, description="Monthly backups.")
    yearly: Tier | None = Field(default=None, description="Yearly backups.")

    def configured(self) -> dict[str, Tier]:
        """Return the tiers that the policy sets, by name."""
        return {name: tier for name in TIER_NAMES if (tier := getattr(self, name)) is not None}


def _timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"unknown time zone {name!r}") from error
    return name


class SizeGuard(_Model):
    """Hold retention when a backup collapses in size (an emptied source)."""

    ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="A backup smaller than this fraction of the median of the recent ones "
        "holds retention.",
    )
    window: int = Field(
        default=5, ge=1, description="How many earlier backups the median is taken over."
    )


def _duration(text: str) -> str:
    parse_duration(text)
    return text


class Retention(_Model):
    """Rules beyond the tiers' keep counts (restic's --keep-last and --keep-within)."""

    keep_last: int | None = Field(
        default=None, ge=0, description="Also keep the newest N backups, whatever their time."
    )
    keep_within: Annotated[str, AfterValidator(_duration)] | None = Field(
        default=None,
        description="Also keep every backup within this duration of the newest one, as "
        "restic writes it: 1y2M3d4h.",
    )
    size_guard: SizeGuard = Field(
        default_factory=SizeGuard, description="Collapsed-backup protection."
    )


Argv = Annotated[list[str], Field(min_length=1)]


class Hooks(_Model):
    """Commands run around each backup, as argv lists without a shell."""

    before_backup: list[Argv] = Field(
        default_factory=list,
        description="Run in order before a backup; a failing one fails the backup.",
    )
    after_backup: list[Argv] = Field(
        default_factory=list, description="Run in order after a successful backup."
    )
    on_failure: list[Argv] = Field(
        default_factory=list, description="Run in order after a failed backup."
    )
    timeout_seconds: float = Field(
        default=300.0, gt=0, description="Each hook is killed when it runs longer than this."
    )


NotifyEvent = Literal["success", "failure"]


def _failures_only() -> list[NotifyEvent]:
    return ["failure"]


class Webhook(_Model):
    """A URL that receives a JSON POST after backups (e.g. a healthchecks.io ping URL)."""

    type: Literal["webhook"] = Field(description="The kind of notification.")
    url: Annotated[str, Field(pattern=r"^https?://")] = Field(description="http(s) URL to POST to.")
    on: list[NotifyEvent] = Field(
        default_factory=_failures_only,
        description="Which results are sent: success, failure.",
    )
    timeout_seconds: float = Field(default=10.0, gt=0, description="Timeout of one attempt.")
    retries: int = Field(default=3, ge=0, le=10, description="Attempts after the first.")


class Metrics(_Model):
    """The Prometheus endpoint of the daemon."""

    listen: str | None = Field(
        default="127.0.0.1:9877",
        pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):[0-9]{1,5}$",
        description="host:port for /metrics (loopback by default); null turns it off.",
    )


class Daemon(_Model):
    """How the daemon runs its jobs."""

    backup_timeout_seconds: float = Field(
        default=4 * 3600.0,
        gt=0,
        description="A backup still running after this is aborted (no partial archive).",
    )
    shutdown_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        description="On SIGTERM, how long a running backup may finish before it is aborted.",
    )
    misfire_grace_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="A run missed by up to this much (busy, clock jump) still happens.",
    )
    disk_refresh_seconds: float = Field(
        default=60.0, gt=0, description="How often disk free/total metrics are refreshed."
    )


class Restore(_Model):
    """How ``sovbackupd restore`` swaps live data: the services stopped around it."""

    stop: list[Argv] = Field(
        default_factory=list,
        description="Commands run in order before live files are replaced, e.g. "
        "[systemctl, stop, redis]. Without them, restoring Redis is refused while it runs.",
    )
    start: list[Argv] = Field(
        default_factory=list,
        description="Commands run in order after the swap, also when the swap failed.",
    )
    timeout_seconds: float = Field(
        default=300.0, gt=0, description="Each stop or start command is killed after this."
    )
    safety_keep: Annotated[str, AfterValidator(_duration)] = Field(
        default="7d",
        description="How long pre-restore safety backups are kept (restic duration "
        "syntax); retention leaves them out of the tiers until then.",
    )


class TestRestore(_Model):
    """Scheduled restore drills: the newest backup restored to scratch and checked."""

    schedule: Annotated[str, AfterValidator(_cron)] | None = Field(
        default=None,
        description="Cron expression of the drill (the seed's monthly test: '0 5 1 * *'); "
        "none runs no drill from the daemon.",
    )


class Policy(_Model):
    """A sovbackupd policy file."""

    backup_dir: AbsolutePath = Field(
        default=Path("/var/backups/sovereigncore"),
        description="Where archives are written (created 0700). Environment: BACKUP_DIR.",
    )
    name_prefix: str = Field(
        default="sovereigncore_backup",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Archives are named <name_prefix>_YYYYMMDD_HHMMSS (UTC).",
    )
    timezone: Annotated[str, AfterValidator(_timezone)] = Field(
        default="UTC", description="IANA time zone for schedules and retention periods."
    )
    compression: Compression = Field(
        default="gzip",
        description="gzip (readable by tar -xzf), zstd, or none.",
    )
    workers: int = Field(default=2, ge=1, le=64, description="Worker threads of the daemon.")
    sources: Sources = Field(description="What to back up.")
    tiers: Tiers = Field(
        default_factory=Tiers,
        description="Schedules and GFS keep counts. Environment: RETENTION_DAYS sets daily.keep.",
    )
    retention: Retention = Field(
        default_factory=Retention, description="More retention rules, and the size guard."
    )
    hooks: Hooks = Field(default_factory=Hooks, description="Commands around each backup.")
    notify: list[Webhook] = Field(
        default_factory=list, description="Where to report backup results."
    )
    metrics: Metrics = Field(default_factory=Metrics, description="The /metrics endpoint.")
    daemon: Daemon = Field(default_factory=Daemon, description="Timeouts of the daemon.")
    restore: Restore = Field(
        default_factory=Restore, description="Services stopped and started around a restore."
    )
    test_restore: TestRestore = Field(
        default_factory=TestRestore, description="Scheduled test restores."
    )

    @property
    def zone(self) -> ZoneInfo:
        """Return the policy's time zone."""
        return ZoneInfo(self.timezone)

    @property
    def archive_suffix(self) -> str:
        """Return the archive file suffix that the compression setting gives."""
        return ARCHIVE_SUFFIXES[self.compression]


ARCHIVE_SUFFIXES: dict[Compression, str] = {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}
