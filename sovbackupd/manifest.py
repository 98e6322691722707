"""The manifest stored inside every archive (and beside it): what was captured, and how."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from sovbackupd import untrusted

FORMAT_VERSION = 1
SAFETY_TIER = "pre-restore"
"""The label of the backup a restore takes of the live data it is about to replace."""
MANUAL_TIER = "manual"
"""The label of a backup taken by hand (``sovbackupd backup`` without ``--tier``)."""
MANIFEST_NAME = "manifest.json"
INFO_NAME = "backup_info.txt"
ENCRYPTED = "encrypted"
"""The ``manifest`` field of a head: the full manifest is in the encrypted copy beside it."""


UID_MAX = 2**32 - 2
"""The largest uid or gid Linux hands out: ``(uid_t)-1`` means "no change" to chown."""
SIZE_MAX = 2**63 - 1
"""The largest file size (``off_t``)."""
MTIME_MIN = -62135596800.0
"""0001-01-01T00:00:00Z: tar and Linux allow mtimes before 1970, so the manifest does."""
MTIME_MAX = 253402300799.0
"""9999-12-31T23:59:59Z, the last second a datetime can show."""
PATH_MAX_CHARS = 4096
"""A name longer than PATH_MAX is left out of backups (see sources/files.py)."""
LIST_MAX = 1_000_000
"""More entries than any manifest under FULL_LIMIT_BYTES can hold."""
TEXT_MAX_CHARS = 8192
SAFE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$"
"""A backup name, a tier label: one path component that no shell or glob misreads."""


def _bounded(limit: int) -> AfterValidator:
    """Check length and NUL in Python: a name that is not UTF-8 holds lone surrogates.

    pydantic's own ``max_length`` converts the string for its Rust core, which refuses
    surrogates: the check has to run on the Python string.
    """

    def check(text: str) -> str:
        if len(text) > limit:
            raise ValueError(f"longer than {limit} characters")
        if "\0" in text:
            raise ValueError("holds a NUL byte")
        return text

    return AfterValidator(check)


Count = Annotated[int, Field(strict=True, ge=0, le=SIZE_MAX)]
Text = Annotated[str, _bounded(TEXT_MAX_CHARS)]
Name = Annotated[str, _bounded(PATH_MAX_CHARS)]
Label = Annotated[str, Field(pattern=SAFE_NAME_PATTERN)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One archive member: where it sits in the archive and where it came from."""

    path: Name = Field(description="Path inside the archive, below the top directory.")
    type: Literal["file", "dir", "symlink"]
    origin: Name | None = Field(description="Absolute path it was captured from.")
    size: Count = Field(description="Bytes archived (0 for directories and symlinks).")
    mode: int = Field(
        strict=True, ge=0, le=0o7777, description="Permission bits, as an integer (0o644 = 420)."
    )
    mtime: float = Field(
        allow_inf_nan=False,
        ge=MTIME_MIN,
        le=MTIME_MAX,
        description="Modification time, seconds since the epoch (UTC), years 1 to 9999.",
    )
    uid: int = Field(strict=True, ge=0, le=UID_MAX)
    gid: int = Field(strict=True, ge=0, le=UID_MAX)
    sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="Of the archived bytes; files only."
    )
    link: Name | None = Field(default=None, description="Target of a symlink.")


class _Details(BaseModel):
    """The fields of a source's details that restore and drills read; others are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")


class DatabaseDetails(_Details):
    """What the SQLite source counted in one database copy."""

    rows: dict[Name, Count] = Field(
        default_factory=dict, max_length=LIST_MAX, description="Rows per table."
    )
    page_count: Count | None = None
    page_size: Count | None = None


class SqliteDetails(_Details):
    """The SQLite source's details: each database by its original path."""

    databases: dict[Name, DatabaseDetails] = Field(default_factory=dict, max_length=LIST_MAX)


class RedisDetails(_Details):
    """The Redis source's details: the key counts ``redis-check-rdb`` read."""

    keys_in_rdb: Count | None = None
    expires_in_rdb: Count = 0
    aof_files: list[Name] = Field(default_factory=list, max_length=LIST_MAX)


class OtherDetails(_Details):
    """The files sources' details: nothing a restore reads."""


_DETAILS: dict[str, type[_Details]] = {
    "redis": RedisDetails,
    "sqlite": SqliteDetails,
    "config": OtherDetails,
    "data": OtherDetails,
}


class SourceResult(_Frozen):
    """What one source reported."""

    component: Literal["redis", "sqlite", "config", "data"]
    name: Text
    details: dict[Text, Any] = Field(max_length=LIST_MAX)
    warnings: list[Text] = Field(max_length=LIST_MAX)

    @model_validator(mode="after")
    def _typed_details(self) -> SourceResult:
        try:
            _DETAILS[self.component].model_validate(self.details)
        except ValidationError as error:
            first = error.errors()[0]
            raise PydanticCustomError(
                "details",
                "{where}: {problem}",
                {"where": _location(("details", *first["loc"])), "problem": _problem(first)},
            ) from None
        return self

    def sqlite(self) -> SqliteDetails:
        """Return the details as the SQLite source wrote them (validated when parsed)."""
        return SqliteDetails.model_validate(self.details)

    def redis(self) -> RedisDetails:
        """Return the details as the Redis source wrote them (validated when parsed)."""
        return RedisDetails.model_validate(self.details)


class Manifest(_Frozen):
    """Everything needed to verify and restore a backup without guessing."""

    format_version: int = Field(default=FORMAT_VERSION, strict=True, ge=1, le=FORMAT_VERSION)
    id: Label = Field(description="The backup name, also the archive's top directory.")
    created: datetime = Field(description="When the backup started (UTC).")
    finished: datetime
    tiers: list[Label] = Field(max_length=64)
    host: Text
    tool_version: Text
    compression: Literal["gzip", "zstd", "none"]
    sources: list[SourceResult] = Field(max_length=64)
    file_count: Count = Field(description="Regular files archived.")
    file_bytes: Count = Field(
        description="Their bytes before compression (a sparse file's data, not its holes)."
    )
    files: list[FileEntry] = Field(
        default_factory=list,
        max_length=10 * LIST_MAX,
        description="Every member but manifest.json itself.",
    )
    manifest: Literal["encrypted"] | None = Field(
        default=None,
        description="Only in the head beside an encrypted archive: the full manifest is in "
        "<name>.manifest.json.gpg, and this one holds no file list, details or warnings.",
    )

    @model_validator(mode="after")
    def _head_holds_nothing_secret(self) -> Manifest:
        if self.manifest == ENCRYPTED:
            if self.files:
                raise ValueError("a head (manifest: encrypted) lists no files")
            if any(source.details or source.warnings for source in self.sources):
                raise ValueError("a head (manifest: encrypted) holds no details or warnings")
        return self

    @property
    def is_head(self) -> bool:
        """Tell whether this is the head of an encrypted backup, its full manifest elsewhere."""
        return self.manifest == ENCRYPTED

    def head(self) -> Manifest:
        """Return what may lie in plaintext beside an encrypted archive: no file list.

        Sources keep their component and name only: details (row counts, key counts) and
        warnings (which name files) stay in the encrypted full manifest.
        """
        return self.model_copy(
            update={
                "sources": [
                    SourceResult(
                        component=source.component, name=source.name, details={}, warnings=[]
                    )
                    for source in self.sources
                ],
                "files": [],
                "manifest": ENCRYPTED,
            }
        )

    @property
    def safety(self) -> bool:
        """Tell whether this is a restore's pre-restore safety backup (no tier's backup).

        It holds only what that restore replaced: ``--latest`` never means it, retention
        keeps it outside the tiers, and it stays on this server.
        """
        return self.tiers == [SAFETY_TIER]


class ManifestError(ValueError):
    """A manifest that is not JSON or has a field out of its bounds; the message names it."""


def _location(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic location as the path an operator reads: ``files[3].uid``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith(("function-", "json-or-python[")):
            continue  # pydantic's name for a validator step, not a field
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text or "(top level)"


def _problem(error: ErrorDetails) -> str:
    shown = repr(error["input"])
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if error["type"] in ("missing", "extra_forbidden"):
        return error["msg"].lower()
    return f"{shown}: {error['msg'][0].lower()}{error['msg'][1:]}"


def describe(error: ValidationError, what: str = "manifest") -> str:
    """Return the first problem of *error* as one line naming *what*'s field and its value."""
    first = error.errors()[0]
    if first["type"] == "details":
        context = first.get("ctx", {})
        where = f"{_location(first['loc'])}.{context.get('where', '')}"
        return f"{what} field {where}: {context.get('problem', first['msg'])}"
    more = len(error.errors()) - 1
    extra = f" (and {more} more)" if more else ""
    return f"{what} field {_location(first['loc'])}: {_problem(first)}{extra}"


FILES_MARKER = b',\n "files": ['


def parse_json(data: bytes) -> object:
    """Parse manifest JSON, in which a name that is not UTF-8 is a lone surrogate escape.

    Such names are kept as bytes with surrogateescape (U+DCFF for the byte 0xff), which
    pydantic's parser refuses; json.loads takes them. Raise ValueError on anything that is
    not JSON, a planted ``[[[[...`` too (json.loads would raise RecursionError).
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def validate(data: object) -> Manifest:
    """Return the manifest parsed JSON *data* holds; raise ManifestError naming a bad field."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise ManifestError(describe(error)) from None


def parse_manifest(data: bytes) -> Manifest:
    """Return the manifest in *data*; raise ManifestError when it is not one."""
    try:
        parsed = parse_json(data)
    except ValueError as error:
        raise ManifestError(f"manifest is not JSON: {error}") from None
    return validate(parsed)


HEAD_LIMIT_BYTES = 16 << 20
FULL_LIMIT_BYTES = 1 << 30  # a million files at ~300 bytes a line, with room to spare


def read_head(path: Path) -> Manifest:
    """Read the manifest at *path* without its file list, which can hold 100k entries.

    :func:`write_manifest` puts every other field before ``files``, so only the bytes up
    to that key are parsed. Raise OSError or ValueError when the file is unreadable, or
    not a regular file: a FIFO planted in its place must not block the daemon's start.
    """
    with untrusted.open_regular(path) as handle:
        head = handle.read(HEAD_LIMIT_BYTES)
    cut = head.find(FILES_MARKER)
    try:
        data = parse_json(head[:cut] + b"\n}" if cut >= 0 else head)
    except ValueError as error:
        raise ManifestError(f"manifest is not JSON: {error}") from None
    if isinstance(data, dict):  # anything else fails validation, a ManifestError too
        data.pop("files", None)
    return validate(data)


def read_full(path: Path) -> Manifest:
    """Read the whole manifest at *path*, file list included, as untrusted input.

    Raise OSError or ValueError when it is unreadable, not a regular file or invalid.
    """
    with untrusted.open_regular(path) as handle:
        data = handle.read(FULL_LIMIT_BYTES + 1)
    if len(data) > FULL_LIMIT_BYTES:
        raise ValueError(f"larger than {FULL_LIMIT_BYTES >> 20} MiB")
    return parse_manifest(data)


def write_manifest(head: Manifest, entry_lines: Iterable[bytes], out: IO[bytes]) -> None:
    """Write the manifest JSON: *head*'s fields, then ``files`` from *entry_lines*.

    Each line is one FileEntry as compact JSON; they are streamed, never held together.
    """
    # A full manifest holds no ``manifest`` key: its bytes are what they were before heads.
    unset = {"files"} if head.is_head else {"files", "manifest"}
    fields = json.dumps(head.model_dump(mode="json", exclude=unset), indent=1)
    out.write(fields.removesuffix("\n}").encode() + FILES_MARKER)
    separator = b"\n  "
    for line in entry_lines:
        out.write(separator + line.rstrip(b"\n"))
        separator = b",\n  "
    out.write(b"\n ]\n}\n")
