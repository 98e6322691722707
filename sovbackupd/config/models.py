"""The policy models: the single source of truth for what a policy file may say."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis.connection
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sovbackupd import scheduler
from sovbackupd.config import layout
from sovbackupd.config.layout import shown
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


# Bounds on the policy's numbers: generous for any real server, and small enough that every
# timer, timeout and counter the daemon builds from them accepts them.
MAX_SECONDS = 7 * 24 * 3600.0  # a week: no timeout or interval needs longer
MAX_KEEP = 100_000  # periods or backups kept: over eleven years of hourly backups
# A file name takes 255 bytes: the prefix, "_YYYYMMDD_HHMMSS" and ".tar.zst.gpg.sha256.partial".
MAX_PREFIX_CHARS = 200

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# [user@]host:path, the host a name or a bracketed IPv6 address, as rsync and scp write it.
RSYNC_URL_PATTERN = r"^(?:[^@\s:/]+@)?(?:\[[0-9A-Fa-f:.]+\]|[^@\s:/\[\]]+):\S.*$"
HTTP_URL_PATTERN = r"^https?://\S+$"
SSH_OPTION_PATTERN = r"^[A-Za-z]+=\S.*$"
STORAGE_CLASS_PATTERN = r"^[A-Z][A-Z0-9_]*$"
GCS_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"

# What each pattern means, for the error an operator reads instead of the regex.
PATTERN_EXPECTATIONS = {
    NAME_PATTERN: "letters, digits, '_', '.' and '-', starting with a letter or digit",
    RSYNC_URL_PATTERN: "[user@]host:path, e.g. backup@backup-server:/backups/sovereigncore",
    HTTP_URL_PATTERN: "an http:// or https:// URL",
    SSH_OPTION_PATTERN: "an ssh option as Key=value, e.g. ProxyJump=bastion",
    STORAGE_CLASS_PATTERN: "an S3 storage class in capitals, e.g. STANDARD_IA",
    GCS_BUCKET_PATTERN: "lowercase letters, digits, '_', '.' and '-', starting with a "
    "letter or digit",
}

REDIS_SCHEMES = ("redis", "rediss", "unix")
LISTEN_PATTERN = re.compile(r"(\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):([0-9]{1,5})")


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path, not {str(path)!r}")
    # pathlib keeps a leading "//" (POSIX leaves it to the system; Linux reads it as "/"),
    # and restore would refuse "//opt/x" as the origin of every member under it.
    return Path("/", *path.parts[1:])


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _path_shorthand(value: object) -> object:
    return {"path": value} if isinstance(value, str) else value


def _archivable(path: Path) -> Path:
    # The basename names the entry inside the archive: ".." would put members outside its
    # top directory (every backup then fails verify), and "/" has no basename at all.
    if ".." in path.parts:
        raise ValueError(f"must not contain '..', not {str(path)!r}: name the directory itself")
    if not path.name:
        raise ValueError("must not be / itself: a source is archived under its basename")
    return path


class SourcePath(_Model):
    """A file or directory to back up."""

    path: Annotated[AbsolutePath, AfterValidator(_archivable)] = Field(
        description="Absolute path of the file or directory."
    )
    optional: bool = Field(
        default=False,
        description="When true, a missing path is recorded in the manifest instead of "
        "failing the backup.",
    )


SourcePathEntry = Annotated[SourcePath, BeforeValidator(_path_shorthand)]


def _redis_url(url: str) -> str:
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() not in REDIS_SCHEMES:
        # Only the scheme is echoed: the rest of a URL may hold a password.
        given = f"one starting {scheme}://" if separator else "something without a scheme"
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL, not {given}")
    try:
        # What the backup's Redis.from_url does first: a bad port or query is a config
        # error now, not a ValueError in every backup. Its messages quote no password.
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]  # untyped in redis-py
    except ValueError as error:
        raise ValueError(f"cannot be used: {error}") from None
    return url


class RedisSource(_Model):
    """The Redis instance, snapshotted with BGSAVE."""

    url: Annotated[str, AfterValidator(_redis_url)] = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis://, rediss:// (TLS) or unix:// URL of the instance. Keep "
        "passwords out of it: use password_file.",
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
        le=MAX_SECONDS,
        description="Longest wait for BGSAVE to finish before the backup fails.",
    )


def _unique_basenames(
    entries: list[SourcePath], what: str, *, top_level: bool = True
) -> list[SourcePath]:
    seen: dict[str, Path] = {}
    for entry in entries:
        name = entry.path.name
        if top_level and name in RESERVED_ARCHIVE_NAMES:
            raise ValueError(
                f"{what} {shown(entry.path)} would take the reserved archive name {name!r}"
            )
        if name in seen:
            raise ValueError(
                f"{what} {shown(seen[name])} and {shown(entry.path)} share the basename {name!r}, "
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
        le=MAX_SECONDS,
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
        # Under config/, a name cannot meet the archive's own top-level names.
        return _unique_basenames(entries, "config file", top_level=False)

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
            isinstance(keep, int) and not isinstance(keep, bool) and 0 <= keep <= MAX_KEEP
        ):
            return keep
        raise ValueError(f"must be a whole number from 0 to {MAX_KEEP}, or 'unlimited'")


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
        default=5,
        ge=1,
        le=1000,
        description="How many earlier backups the median is taken over.",
    )


def _duration(text: str) -> str:
    parse_duration(text)
    return text


class Retention(_Model):
    """Rules beyond the tiers' keep counts (restic's --keep-last and --keep-within)."""

    keep_last: int | None = Field(
        default=None,
        ge=0,
        le=MAX_KEEP,
        description="Also keep the newest N backups, whatever their time.",
    )
    keep_within: Annotated[str, AfterValidator(_duration)] | None = Field(
        default=None,
        description="Also keep every backup within this duration of the newest one, as "
        "restic writes it: 1y2M3d4h.",
    )
    manual_keep: Annotated[str, AfterValidator(_duration)] = Field(
        default="7d",
        description="How long a manual backup (sovbackupd backup without --tier) is kept "
        "after it was made, whatever the tiers keep (restic duration syntax; 0d turns it off).",
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
        default=300.0,
        gt=0,
        le=MAX_SECONDS,
        description="Each hook is killed when it runs longer than this.",
    )


NotifyEvent = Literal["success", "failure"]


def _failures_only() -> list[NotifyEvent]:
    return ["failure"]


class Webhook(_Model):
    """A URL that receives a JSON POST after backups (e.g. a healthchecks.io ping URL)."""

    type: Literal["webhook"] = Field(description="The kind of notification.")
    url: str = Field(pattern=HTTP_URL_PATTERN, description="http(s) URL to POST to.")
    on: list[NotifyEvent] = Field(
        default_factory=_failures_only,
        description="Which results are sent: success, failure.",
    )
    timeout_seconds: float = Field(
        default=10.0, gt=0, le=MAX_SECONDS, description="Timeout of one attempt."
    )
    retries: int = Field(default=3, ge=0, le=10, description="Attempts after the first.")


def _listen(listen: str) -> str:
    shape = LISTEN_PATTERN.fullmatch(listen)
    if shape is None or not 1 <= int(shape[2]) <= 65535:
        raise ValueError(
            "must be host:port with a port from 1 to 65535, e.g. 127.0.0.1:9877 or "
            f"[::1]:9877, not {listen!r}"
        )
    return listen


class Metrics(_Model):
    """The Prometheus endpoint of the daemon."""

    listen: Annotated[str, AfterValidator(_listen)] | None = Field(
        default="127.0.0.1:9877",
        description="host:port for /metrics (loopback by default); null turns it off.",
    )


class Daemon(_Model):
    """How the daemon runs its jobs."""

    backup_timeout_seconds: float = Field(
        default=4 * 3600.0,
        gt=0,
        le=MAX_SECONDS,
        description="A backup still running after this is aborted (no partial archive).",
    )
    shutdown_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        le=MAX_SECONDS,
        description="On SIGTERM, how long a running backup may finish before it is aborted.",
    )
    misfire_grace_seconds: float = Field(
        default=3600.0,
        ge=1,
        le=MAX_SECONDS,
        description="A run missed by up to this much (busy, clock jump) still happens; "
        "whole seconds, rounded up.",
    )
    disk_refresh_seconds: float = Field(
        default=60.0,
        ge=1,
        le=MAX_SECONDS,
        description="How often disk free/total metrics are refreshed.",
    )


RestoreComponent = Literal["redis", "sqlite", "config", "data"]
STOP_ORDER: tuple[RestoreComponent, ...] = ("data", "config", "sqlite", "redis")
"""The order the stop commands of the restored components run in; start runs the reverse."""


class ComponentCommands(_Model):
    """Stop or start commands by component: a restore runs those of what it restores."""

    redis: list[Argv] = Field(
        default_factory=list, description="For a restore of Redis (its RDB and AOF)."
    )
    sqlite: list[Argv] = Field(default_factory=list, description="For a restore of a database.")
    config: list[Argv] = Field(default_factory=list, description="For a restore of config files.")
    data: list[Argv] = Field(default_factory=list, description="For a restore of data dirs.")

    def of(self, component: RestoreComponent) -> list[list[str]]:
        """Return the commands given for *component*."""
        commands: list[list[str]] = getattr(self, component)
        return commands


def _commands_form(value: object) -> str:
    return "components" if isinstance(value, dict | ComponentCommands) else "list"


ServiceCommands = Annotated[
    Annotated[list[Argv], Tag("list")] | Annotated[ComponentCommands, Tag("components")],
    Discriminator(_commands_form),
]


class Restore(_Model):
    """How ``sovbackupd restore`` swaps live data: the services stopped around it."""

    stop: ServiceCommands = Field(
        default_factory=list,
        description="Commands run before live files are replaced: a list, run in order for "
        "every live restore (e.g. [systemctl, stop, sovereigncore] then [systemctl, stop, "
        "redis-server]), or a mapping by component (redis, sqlite, config, data), of which "
        "a restore runs those of the components it restores, each distinct command once, "
        "data's first, then config's, sqlite's and redis's last. Without a command for "
        "Redis, restoring Redis is refused while it runs.",
    )
    start: ServiceCommands = Field(
        default_factory=list,
        description="Commands run after the swap, also when the swap failed: a list, in "
        "order, or a mapping by component, run as for stop but in the reverse order "
        "(redis's first).",
    )
    timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        le=MAX_SECONDS,
        description="Each stop or start command is killed after this.",
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


def _credential_name(name: str) -> str:
    # systemd's own rule for credential names: one path component, not . or ..
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"must be a credential name without '/', not {name!r}")
    return name


def _recipient(recipient: str) -> str:
    if not recipient.strip():
        raise ValueError("must be a key id or fingerprint, not empty")
    return recipient.strip()


_GPG_MODES = ("passphrase_file", "passphrase_credential", "recipients")
_RECIPIENT_ONLY = ("public_keys_file", "secret_keys_file", "secret_key_passphrase_file")


class Gpg(_Model):
    """GnuPG settings: a passphrase (symmetric AES256) or public-key recipients, not both."""

    passphrase_file: AbsolutePath | None = Field(
        default=None,
        description="File whose first line is the passphrase (AES256), read as gpg "
        "--passphrase-file reads it. Keep it 0600 and out of the backups.",
    )
    passphrase_credential: Annotated[str, AfterValidator(_credential_name)] | None = Field(
        default=None,
        description="Name of a systemd credential (LoadCredential= or "
        "LoadCredentialEncrypted= in the unit) holding the passphrase; read from "
        "$CREDENTIALS_DIRECTORY/<name>.",
    )
    recipients: list[Annotated[str, AfterValidator(_recipient)]] = Field(
        default_factory=list,
        description="Fingerprints (or key ids) of the public keys to encrypt to. "
        "Recommended: the server then holds no secret that can read its backups.",
    )
    public_keys_file: AbsolutePath | None = Field(
        default=None,
        description="The recipients' public keys (gpg --armor --export KEY...), imported "
        "into a throwaway keyring for each backup; required with recipients.",
    )
    secret_keys_file: AbsolutePath | None = Field(
        default=None,
        description="A recipient's secret key (gpg --armor --export-secret-keys KEY), for "
        "restores. Set it on the recovery machine only, never on the server.",
    )
    secret_key_passphrase_file: AbsolutePath | None = Field(
        default=None,
        description="File whose first line unlocks the secret key, when it has a passphrase.",
    )

    @model_validator(mode="after")
    def _one_mode(self) -> Gpg:
        modes = [name for name in _GPG_MODES if getattr(self, name)]
        if len(modes) != 1:
            given = " and ".join(modes) if modes else "none of them"
            raise ValueError(
                "set exactly one of passphrase_file, passphrase_credential, recipients "
                f"(got {given})"
            )
        if self.recipients and self.public_keys_file is None:
            raise ValueError("recipients need public_keys_file, the public keys to encrypt to")
        stray = [name for name in _RECIPIENT_ONLY if getattr(self, name) is not None]
        if not self.recipients and stray:
            raise ValueError(f"{', '.join(stray)} only apply with recipients")
        return self


DEFAULT_KEY_FILE = Path("/var/lib/sovbackupd/auth.key")
"""In the service's StateDirectory: only the service user and root can read it."""


class Authentication(_Model):
    """The key that authenticates every backup (HMAC-SHA256), held outside backup_dir."""

    key_file: AbsolutePath = Field(
        default=DEFAULT_KEY_FILE,
        description="File holding the 32-byte key as 64 hex digits; the first backup "
        "creates it (0400). Owned by the reading user or root, no access for group or "
        "other. $CREDENTIALS_DIRECTORY/auth-key (systemd LoadCredential=) is used instead "
        "when it exists. Keep a copy beside the passphrase: without it, restores need "
        "--trust-unsigned and keep no owners.",
    )


class Encryption(_Model):
    """How archives are encrypted before they are stored: <name>.tar.gz.gpg."""

    gpg: Gpg = Field(description="GnuPG, the only engine: plain gpg --decrypt opens archives.")


class RsyncRemote(_Model):
    """A directory on another machine, written with rsync over SSH."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Names the remote for --remote and --from and in the metrics' remote label.",
    )
    type: Literal["rsync"] = Field(description="The kind of remote.")
    url: str = Field(
        pattern=RSYNC_URL_PATTERN,
        description="user@host:/path of the directory that holds the backups (created if "
        "missing). The host needs rsync, sha256sum and a POSIX shell.",
    )
    port: int = Field(default=22, ge=1, le=65535, description="SSH port of the host.")
    identity_file: AbsolutePath | None = Field(
        default=None,
        description="Private key (without a passphrase) to log in with; none uses the "
        "default keys of the user sovbackupd runs as.",
    )
    known_hosts_file: AbsolutePath | None = Field(
        default=None,
        description="known_hosts file holding the host's key. Host keys are always "
        "checked (StrictHostKeyChecking=yes); none uses ~/.ssh/known_hosts of the user "
        "sovbackupd runs as.",
    )
    ssh_options: list[Annotated[str, Field(pattern=SSH_OPTION_PATTERN)]] = Field(
        default_factory=list,
        description="More ssh options as Key=value (ProxyJump=bastion); they cannot turn "
        "off host key checking or batch mode.",
    )
    timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=MAX_SECONDS,
        description="Longest wait for the connection, and for a stalled transfer to move.",
    )


class S3Remote(_Model):
    """A bucket of Amazon S3 or an S3-compatible store (MinIO, Ceph, R2, Wasabi)."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Names the remote for --remote and --from and in the metrics' remote label.",
    )
    type: Literal["s3"] = Field(description="The kind of remote.")
    bucket: str = Field(pattern=NAME_PATTERN, description="Bucket name.")
    prefix: str = Field(
        default="",
        description="Key prefix the backups are stored under, like a folder "
        "(backups/sovereigncore/); a trailing / is implied.",
    )
    endpoint_url: Annotated[str, Field(pattern=HTTP_URL_PATTERN)] | None = Field(
        default=None,
        description="http(s) URL of an S3-compatible store (path-style requests); none is AWS.",
    )
    region: str | None = Field(
        default=None,
        description="Region of the bucket; none takes AWS_REGION or the AWS config file's.",
    )
    storage_class: Annotated[str, Field(pattern=STORAGE_CLASS_PATTERN)] | None = Field(
        default=None,
        description="Storage class of uploads (STANDARD_IA, GLACIER_IR, ...); none keeps "
        "the bucket's default. GLACIER and DEEP_ARCHIVE objects need an S3 restore before "
        "restore --from can read them.",
    )
    credentials_file: AbsolutePath | None = Field(
        default=None,
        description="AWS credentials file whose [default] section has aws_access_key_id "
        "and aws_secret_access_key; none uses boto3's chain (AWS_ACCESS_KEY_ID and "
        "friends, ~/.aws/credentials, an instance role).",
    )


class GcsRemote(_Model):
    """A bucket of Google Cloud Storage."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Names the remote for --remote and --from and in the metrics' remote label.",
    )
    type: Literal["gcs"] = Field(description="The kind of remote.")
    bucket: str = Field(pattern=GCS_BUCKET_PATTERN, description="Bucket name.")
    prefix: str = Field(
        default="",
        description="Object name prefix the backups are stored under, like a folder "
        "(backups/sovereigncore/); a trailing / is implied.",
    )
    credentials_file: AbsolutePath | None = Field(
        default=None,
        description="Service account key (JSON); none uses Application Default "
        "Credentials (GOOGLE_APPLICATION_CREDENTIALS, the metadata server).",
    )
    endpoint: Annotated[str, Field(pattern=HTTP_URL_PATTERN)] | None = Field(
        default=None,
        description="http(s) URL of the JSON API for an emulator or a private endpoint; "
        "without credentials_file its requests carry no credentials.",
    )


Remote = Annotated[RsyncRemote | S3Remote | GcsRemote, Field(discriminator="type")]


def _own_directory(path: Path) -> Path:
    if (refusal := layout.backup_dir_refusal(path)) is not None:
        raise ValueError(refusal)
    return path


class Policy(_Model):
    """A sovbackupd policy file."""

    backup_dir: Annotated[AbsolutePath, AfterValidator(_own_directory)] = Field(
        default=Path(layout.SUGGESTED_BACKUP_DIR),
        description="Where archives are written: created 0700 when missing; an existing "
        "one others can write is refused. Not /, /tmp or a system directory, not inside a "
        "data directory, and no source inside it. Environment: BACKUP_DIR.",
    )
    name_prefix: str = Field(
        default="sovereigncore_backup",
        pattern=NAME_PATTERN,
        max_length=MAX_PREFIX_CHARS,
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
    encryption: Encryption | None = Field(
        default=None,
        description="Encrypt archives with gpg before they are stored or copied; none "
        "stores them unencrypted.",
    )
    authentication: Authentication = Field(
        default_factory=Authentication,
        description="The key that signs every backup; verify, restore, test restores and "
        "retention check it.",
    )
    remotes: list[Remote] = Field(
        default_factory=list,
        description="Where every backup is copied off the server, each under a unique name. "
        "Environment: REMOTE_BACKUP_PATH adds the rsync remote 'remote' with that url (or "
        "sets the url of the policy's rsync remote named 'remote').",
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

    @field_validator("sources")
    @classmethod
    def _restorable_layout(cls, sources: Sources, info: ValidationInfo) -> Sources:
        backup_dir = info.data.get("backup_dir")
        if backup_dir is not None:  # else its own error is reported
            overlaps = [message for _, message in layout.overlaps(backup_dir, sources)]
            if overlaps:
                raise ValueError("; ".join(overlaps))
        return sources

    @field_validator("remotes")
    @classmethod
    def _unique_remote_names(cls, remotes: list[Remote]) -> list[Remote]:
        names = [remote.name for remote in remotes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"remote names must be unique: {', '.join(duplicates)}")
        return remotes

    @property
    def zone(self) -> ZoneInfo:
        """Return the policy's time zone."""
        return ZoneInfo(self.timezone)

    @property
    def gpg(self) -> Gpg | None:
        """Return the GnuPG settings when archives are encrypted, else None."""
        return self.encryption.gpg if self.encryption is not None else None

    @property
    def archive_suffix(self) -> str:
        """Return the archive file suffix: the compression's, plus ``.gpg`` when encrypted."""
        return ARCHIVE_SUFFIXES[self.compression] + (".gpg" if self.encryption else "")


ARCHIVE_SUFFIXES: dict[Compression, str] = {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}
