"""The manifest stored inside every archive (and beside it): what was captured, and how."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sovbackupd import untrusted

FORMAT_VERSION = 1
SAFETY_TIER = "pre-restore"
"""The label of the backup a restore takes of the live data it is about to replace."""
MANUAL_TIER = "manual"
"""The label of a backup taken by hand (``sovbackupd backup`` without ``--tier``)."""
MANIFEST_NAME = "manifest.json"
INFO_NAME = "backup_info.txt"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One archive member: where it sits in the archive and where it came from."""

    path: str = Field(description="Path inside the archive, below the top directory.")
    type: Literal["file", "dir", "symlink"]
    origin: str | None = Field(description="Absolute path it was captured from.")
    size: int = Field(description="Bytes archived (0 for directories and symlinks).")
    mode: int = Field(description="Permission bits, as an integer (0o644 = 420).")
    mtime: float
    uid: int
    gid: int
    sha256: str | None = Field(default=None, description="Of the archived bytes; files only.")
    link: str | None = Field(default=None, description="Target of a symlink.")


class SourceResult(_Frozen):
    """What one source reported."""

    component: Literal["redis", "sqlite", "config", "data"]
    name: str
    details: dict[str, Any]
    warnings: list[str]


class Manifest(_Frozen):
    """Everything needed to verify and restore a backup without guessing."""

    format_version: int = FORMAT_VERSION
    id: str = Field(description="The backup name, also the archive's top directory.")
    created: datetime = Field(description="When the backup started (UTC).")
    finished: datetime
    tiers: list[str]
    host: str
    tool_version: str
    compression: Literal["gzip", "zstd", "none"]
    sources: list[SourceResult]
    file_count: int = Field(description="Regular files archived.")
    file_bytes: int = Field(
        description="Their bytes before compression (a sparse file's data, not its holes)."
    )
    files: list[FileEntry] = Field(
        default_factory=list, description="Every member but manifest.json itself."
    )


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


def parse_manifest(data: bytes) -> Manifest:
    """Return the manifest in *data*; raise ValueError (ValidationError) when it is not one."""
    return Manifest.model_validate(parse_json(data))


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
    data = parse_json(head[:cut] + b"\n}" if cut >= 0 else head)
    if isinstance(data, dict):  # anything else fails validation, a ValueError too
        data.pop("files", None)
    return Manifest.model_validate(data)


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
    fields = json.dumps(head.model_dump(mode="json", exclude={"files"}), indent=1)
    out.write(fields.removesuffix("\n}").encode() + FILES_MARKER)
    separator = b"\n  "
    for line in entry_lines:
        out.write(separator + line.rstrip(b"\n"))
        separator = b",\n  "
    out.write(b"\n ]\n}\n")
