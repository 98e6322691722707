"""Streaming tar archives: written once and atomically, with checksums, read back to verify.

The writer streams each member straight from its source through the compressor into
``<archive>.partial``, hashing every member and the stored bytes on the way, so memory
stays flat whatever the data size. The archive takes its final name only after the data
is fsynced and its sidecars are in place; a run that dies leaves only ``*.partial``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO, Literal, Self, cast

import isal.igzip_threaded
import zstandard
from pydantic import ValidationError

from sovbackupd import crypto
from sovbackupd.config.models import Gpg
from sovbackupd.errors import AbortedError, ArchiveError, DiskSpaceError, SovbackupdError
from sovbackupd.manifest import INFO_NAME, MANIFEST_NAME, FileEntry, Manifest, write_manifest
from sovbackupd.sources.base import Member, SourceReport

Compression = Literal["gzip", "zstd", "none"]
CHUNK_BYTES = 1 << 20
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
GZIP_LEVEL = 2  # isal's level 2 is about zlib -4 in ratio at several times its speed
ZSTD_LEVEL = 3  # zstd's own default, as `tar --zstd` uses
# Worker threads keep the compressor off the reading thread; the default job (4 windows,
# 8 MiB) costs ~85 MiB of buffers with 2 threads, 2 MiB jobs ~20 MiB (measured in bench/).
ZSTD_JOB_BYTES = 2 << 20
PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".sha256"
MANIFEST_SUFFIX = ".manifest.json"
ProgressCallback = Callable[[int], None]


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def fsync_dir(directory: Path) -> None:
    """Make renames inside *directory* durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def copy_atomically(source: IO[bytes], path: Path, *, owner: tuple[int, int] | None = None) -> None:
    """Copy *source* to *path* (mode 0600) through a temp name, fsync and rename.

    The temp file is created anew, never opened through whatever sits at its name: a
    symlink planted there by whoever can write the directory would otherwise have a root
    CLI write through it to the link's target. *owner* (uid, gid) is given to the file
    before it takes its name.
    """
    temporary = path.with_name(path.name + PARTIAL_SUFFIX)
    temporary.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, 0o600)
    try:
        if owner is not None:
            os.fchown(descriptor, *owner)
        with os.fdopen(descriptor, "wb") as handle:
            shutil.copyfileobj(source, handle, CHUNK_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes, *, owner: tuple[int, int] | None = None) -> None:
    """Write *data* to *path* (mode 0600, *owner*'s) through a temp name, fsync and rename."""
    copy_atomically(io.BytesIO(data), path, owner=owner)


class _HashingFile(io.RawIOBase):
    """The stored file: counts and hashes every byte on its way to disk."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]  # RawIOBase types the buffer as Buffer
        written = self._handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        return written if written is not None else len(data)


def _compressor(raw: IO[bytes], compression: Compression) -> IO[bytes]:
    match compression:
        case "gzip":
            stream: IO[bytes] = isal.igzip_threaded.open(  # type: ignore[no-untyped-call]  # isal leaves open() untyped
                raw, "wb", compresslevel=GZIP_LEVEL, threads=_threads()
            )
            return stream
        case "zstd":
            parameters = zstandard.ZstdCompressionParameters.from_level(
                ZSTD_LEVEL, threads=_threads(), job_size=ZSTD_JOB_BYTES
            )
            compressor = zstandard.ZstdCompressor(compression_params=parameters)
            writer: IO[bytes] = compressor.stream_writer(raw, closefd=False)
            return writer
        case "none":
            return raw  # the file below is buffered already


_TYPEFLAGS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_USTAR_LIMIT = 8**11  # the largest size or mtime an 11-digit octal field holds
_ID_LIMIT = 8**7


def _split_name(name: bytes) -> tuple[bytes, bytes] | None:
    """Split *name* into ustar's (prefix, name) fields, or None when it cannot fit."""
    if len(name) <= 100:
        return b"", name
    cut = name.find(b"/", len(name) - 101)
    if cut <= 0 or cut > 155:
        return None
    return name[:cut], name[cut + 1 :]


def _tar_header(name: str, size: int, member: Member) -> bytes:
    """Return the tar header of *member*: plain ustar when it fits, else pax.

    A ustar header is built directly because tarfile's costs tens of microseconds per
    member, which dominates a tree of small files. Its mtime is whole seconds; the exact
    mtime is in the manifest, which restore uses.
    """
    encoded = name.encode("utf-8", "surrogateescape")
    link = member.linkname.encode("utf-8", "surrogateescape")
    mtime = int(member.mtime)
    fields = _split_name(encoded)
    if (
        fields is None
        or len(link) > 100
        or not 0 <= mtime < _USTAR_LIMIT
        or size >= _USTAR_LIMIT
        or not (0 <= member.uid < _ID_LIMIT and 0 <= member.gid < _ID_LIMIT)
    ):
        return _pax_header(name, size, member)
    prefix, short = fields
    header = bytearray(
        _USTAR.pack(
            short,
            b"%07o\0" % member.mode,
            b"%07o\0" % member.uid,
            b"%07o\0" % member.gid,
            b"%011o\0" % size,
            b"%011o\0" % mtime,
            b" " * 8,
            _TYPEFLAGS[member.kind],
            link,
            tarfile.POSIX_MAGIC[:6],
            tarfile.POSIX_MAGIC[6:],
            b"",
            b"",
            b"",
            b"",
            prefix,
        )
    )
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _pax_header(name: str, size: int, member: Member) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = _TYPEFLAGS[member.kind]
    info.size = size
    info.mode = member.mode
    info.mtime = int(member.mtime)
    info.uid = member.uid
    info.gid = member.gid
    info.linkname = member.linkname
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _entry_line(member: Member, size: int, sha256: str | None) -> bytes:
    """Serialise one manifest entry (a FileEntry) as a compact JSON line."""
    entry = {
        "path": member.arcname,
        "type": member.kind,
        "origin": member.origin,
        "size": size,
        "mode": member.mode,
        "mtime": member.mtime,
        "uid": member.uid,
        "gid": member.gid,
        "sha256": sha256,
        "link": member.linkname or None,
    }
    return json.dumps(entry, separators=(",", ":")).encode("utf-8", "surrogateescape") + b"\n"


class Writer:
    """Write one archive to ``<path>.partial`` and commit it to *path*.

    Use as a context manager: leaving it without :meth:`commit` (an error, a signal)
    removes the partial file, so nothing half-written is ever left under a final name.
    """

    def __init__(
        self,
        path: Path,
        compression: Compression,
        top: str,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        encryption: Gpg | None = None,
    ) -> None:
        """Prepare to write the archive *path* whose members sit below *top*/.

        Setting *cancel* makes the next write raise AbortedError, which discards the
        archive like any other error. With *encryption* the compressed stream goes
        through gpg, and the checksum covers the encrypted file as stored.
        """
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self._compression = compression
        self._top = top
        self._on_progress = on_progress
        self._cancel = cancel
        self._encryption = encryption
        self._done = 0
        self._committed = False
        self.file_count = 0
        self.file_bytes = 0

    def __enter__(self) -> Self:
        """Create the partial file (0600) and start the stream with the top directory.

        If that fails (no room, gpg cannot start), nothing is left behind.
        """
        self._closers: list[Callable[[], None]] = []
        self._created = False
        try:
            # Manifest entries wait in an unnamed temp file beside the archive, so that
            # memory stays flat however many files there are, and nothing is left if the
            # run dies.
            self._spool = tempfile.TemporaryFile(dir=self.path.parent)
            self._closers.append(self._spool.close)
            descriptor = os.open(
                self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            self._created = True
            self._file = os.fdopen(descriptor, "wb", buffering=CHUNK_BYTES)
            self._closers.append(self._file.close)
            self._raw = _HashingFile(self._file)
            self._layers = contextlib.ExitStack()
            self._closers.append(self._layers.close)
            stored: IO[bytes] = cast(IO[bytes], self._raw)
            if self._encryption is not None:
                stored = self._layers.enter_context(
                    crypto.encrypting(self._raw, self._encryption, name=self.path.name)
                )
            self._stream = _compressor(stored, self._compression)
            self._closers.append(self._stream.close)
            self._tar_bytes = 0
            top = Member(self._top, "dir", None, 0o700, time.time())
            self._write(_tar_header(self._top, 0, top))
        except BaseException:
            self._discard()
            raise
        return self

    def _discard(self) -> None:
        """Close what was opened, newest first, and remove the partial file."""
        for closer in reversed(self._closers):
            # The archive is being discarded: errors closing it change nothing.
            with contextlib.suppress(OSError, SovbackupdError):
                closer()
        if self._created:
            self.partial.unlink(missing_ok=True)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Remove the partial file unless the archive was committed."""
        if self._committed:
            return
        self._discard()

    def _write(self, data: bytes | memoryview) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise AbortedError(f"backup aborted while writing {self.path.name}")
        try:
            self._stream.write(data)
        except OSError as error:
            raise _disk_error(error, self.partial) from error
        self._tar_bytes += len(data)

    def _pad(self, size: int) -> None:
        if remainder := size % BLOCK:
            self._write(b"\0" * (BLOCK - remainder))

    def add(self, member: Member, report: SourceReport) -> None:
        """Stream *member* into the archive; record it, or note in *report* why not."""
        name = f"{self._top}/{member.arcname}"
        if member.kind != "file":
            self._write(_tar_header(name, 0, member))
            self._record(member, 0, None)
            return
        if member.opener is None:
            raise ArchiveError(f"member {member.arcname} has no content")
        try:
            handle = member.opener()
        except FileNotFoundError:
            report.warnings.append(f"{member.origin}: vanished before it could be read")
            return
        except OSError as error:
            raise ArchiveError(f"cannot read {member.origin}: {error.strerror}") from error
        with handle:
            before = os.fstat(handle.fileno())
            size = before.st_size
            self._write(_tar_header(name, size, member))
            digest = hashlib.sha256()
            remaining = size
            while remaining > 0:
                chunk = handle.read(min(remaining, CHUNK_BYTES))
                if not chunk:
                    break
                digest.update(chunk)
                self._write(chunk)
                remaining -= len(chunk)
                self._done += len(chunk)
                if self._on_progress is not None:
                    self._on_progress(self._done)
            if remaining:
                # The file shrank while read: the header promised *size* bytes.
                zeros = b"\0" * min(remaining, CHUNK_BYTES)
                while remaining > 0:
                    piece = zeros[: min(remaining, len(zeros))]
                    digest.update(piece)
                    self._write(piece)
                    remaining -= len(piece)
                report.warnings.append(f"{member.origin}: shrank while read, padded with zeros")
            else:
                after = os.fstat(handle.fileno())
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    report.warnings.append(f"{member.origin}: changed while read")
        self._pad(size)
        self._record(member, size, digest.hexdigest())

    def _record(self, member: Member, size: int, sha256: str | None) -> None:
        try:
            self._spool.write(_entry_line(member, size, sha256))
        except OSError as error:
            raise _disk_error(error, self.partial) from error
        if member.kind == "file":
            self.file_count += 1
            self.file_bytes += size

    @property
    def entries(self) -> list[FileEntry]:
        """Return the manifest entries recorded so far (reads them back from the spool)."""
        self._spool.flush()
        self._spool.seek(0)
        entries = [FileEntry.model_validate_json(line) for line in self._spool]
        self._spool.seek(0, os.SEEK_END)
        return entries

    def add_bytes(self, arcname: str, data: bytes, mtime: float) -> None:
        """Add generated content (backup_info.txt) as a 0600 file."""
        header = _tar_header(
            f"{self._top}/{arcname}", len(data), Member(arcname, "file", None, 0o600, mtime)
        )
        self._write(header)
        self._write(data)
        self._pad(len(data))

    def _add_manifest(self, head: Manifest, manifest: IO[bytes]) -> None:
        """Write *head* plus every recorded entry to *manifest*, then archive it last."""
        self._spool.flush()
        self._spool.seek(0)
        write_manifest(head, self._spool, manifest)
        size = manifest.tell()
        manifest.seek(0)
        member = Member(MANIFEST_NAME, "file", None, 0o600, time.time())
        self._write(_tar_header(f"{self._top}/{MANIFEST_NAME}", size, member))
        while chunk := manifest.read(CHUNK_BYTES):
            self._write(chunk)
        self._pad(size)

    def commit(self, head: Manifest) -> str:
        """Archive the manifest, finish the stream, then put the archive in place.

        The manifest is *head* plus every recorded entry. The sidecars are written before
        the rename, so an archive under its final name always has them. Return the
        archive's sha256.
        """
        try:
            manifest = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115 (closed by the with below; its creation alone can hit ENOSPC)
        except OSError as error:
            raise _disk_error(error, self.partial) from error
        with manifest:
            try:
                self._add_manifest(head, manifest)
            except OSError as error:
                raise _disk_error(error, self.partial) from error
            sha256 = self._finish()
            try:
                write_atomically(sidecar_path(self.path), f"{sha256}  {self.path.name}\n".encode())
                manifest.seek(0)
                copy_atomically(manifest, manifest_path(self.path))
                self.partial.replace(self.path)
                fsync_dir(self.path.parent)
            except OSError as error:
                sidecar_path(self.path).unlink(missing_ok=True)
                manifest_path(self.path).unlink(missing_ok=True)
                raise _disk_error(error, self.partial) from error
        self._spool.close()
        self._committed = True
        return sha256

    def _finish(self) -> str:
        """End the tar stream, flush and fsync the file; return its sha256."""
        try:
            self._write(b"\0" * (2 * BLOCK))
            # Like tar, fill the last record: readers that read whole records expect it.
            if remainder := self._tar_bytes % RECORD:
                self._write(b"\0" * (RECORD - remainder))
            self._stream.close()
            self._layers.close()  # gpg ends its output; a failure raises CryptoError
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as error:
            raise _disk_error(error, self.partial) from error
        return self._raw.digest.hexdigest()


def _disk_error(error: OSError, path: Path) -> ArchiveError | DiskSpaceError:
    if error.errno in (28, 122):  # ENOSPC, EDQUOT
        return DiskSpaceError(f"no space left on {path.parent} while writing {path.name}")
    return ArchiveError(f"cannot write {path}: {error.strerror or error}")


def sidecar_path(archive: Path) -> Path:
    """Return the ``sha256sum -c`` sidecar of *archive*."""
    return archive.with_name(archive.name + SIDECAR_SUFFIX)


def manifest_path(archive: Path) -> Path:
    """Return the manifest copy kept beside *archive*."""
    name = archive.name
    for suffix in (".gpg", ".gz", ".zst", ".tar"):
        name = name.removesuffix(suffix)
    return archive.with_name(name + MANIFEST_SUFFIX)


def encrypted(archive: Path) -> bool:
    """Tell from its file name whether *archive* is encrypted."""
    return archive.name.endswith(crypto.SUFFIX)


def compression_of(archive: Path) -> Compression:
    """Tell the compression of *archive* from its file name."""
    name = archive.name.removesuffix(crypto.SUFFIX)
    if name.endswith(".tar.gz"):
        return "gzip"
    if name.endswith(".tar.zst"):
        return "zstd"
    if name.endswith(".tar"):
        return "none"
    raise ArchiveError(f"{archive.name} is not a .tar, .tar.gz or .tar.zst archive")


@contextmanager
def decompressing(handle: BinaryIO, compression: Compression) -> Iterator[IO[bytes]]:
    """Yield the decompressed tar stream read from *handle*, which stays open."""
    match compression:
        case "gzip":
            # One thread reads ahead and inflates while the caller hashes and writes.
            stream: IO[bytes] = isal.igzip_threaded.open(handle, "rb", threads=1)  # type: ignore[no-untyped-call]  # isal leaves open() untyped
        case "zstd":
            stream = zstandard.ZstdDecompressor().stream_reader(handle, closefd=False)
        case "none":
            yield handle
            return
    with stream:
        yield stream


@contextmanager
def readable(handle: BinaryIO, archive: Path, encryption: Gpg | None) -> Iterator[IO[bytes]]:
    """Yield the tar stream of *archive* read from *handle*: decrypted, decompressed.

    Raise ArchiveError when the archive is encrypted and *encryption* is None.
    """
    with contextlib.ExitStack() as layers:
        stored: BinaryIO = handle
        if encrypted(archive):
            if encryption is None:
                raise ArchiveError(
                    f"{archive.name} is encrypted: the policy needs its encryption settings "
                    "(passphrase_file, or secret_keys_file on the recovery machine)"
                )
            stored = cast(
                BinaryIO,
                layers.enter_context(crypto.decrypting(handle, encryption, name=archive.name)),
            )
        yield layers.enter_context(decompressing(stored, compression_of(archive)))


@contextmanager
def open_stream(archive: Path, encryption: Gpg | None = None) -> Iterator[IO[bytes]]:
    """Open *archive* and yield its tar stream, decrypted with *encryption* if needed."""
    with archive.open("rb") as handle, readable(handle, archive, encryption) as stream:
        yield stream


def stream_sha256(stream: IO[bytes]) -> str:
    """Read *stream* to its end; return the sha256 of its bytes."""
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(archive: Path) -> str:
    """Return the sha256 the sidecar records for *archive*."""
    try:
        text = sidecar_path(archive).read_text(encoding="ascii")
    except FileNotFoundError:
        raise ArchiveError(f"{archive.name}: checksum sidecar is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ArchiveError(f"{archive.name}: checksum sidecar is unreadable") from error
    digest, _, name = text.strip().partition("  ")
    if name != archive.name or len(digest) != 64:
        raise ArchiveError(f"{archive.name}: checksum sidecar is malformed")
    return digest


def file_sha256(path: Path) -> str:
    """Return the sha256 of the file at *path*."""
    with path.open("rb") as handle:
        return stream_sha256(handle)


def verify_checksum(archive: Path) -> None:
    """Compare *archive* with its sidecar; raise ArchiveError when they differ."""
    expected = read_sidecar(archive)
    if file_sha256(archive) != expected:
        raise ArchiveError(f"{archive.name}: checksum mismatch, the archive is damaged")


def _member_digest(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str:
    extracted = tar.extractfile(info)
    if extracted is None:
        raise ArchiveError(f"member {info.name} cannot be read")
    return stream_sha256(extracted)


_KINDS = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink"}


def verify_members(archive: Path, top: str, encryption: Gpg | None = None) -> Manifest:
    """Read every member of *archive* and check it against the manifest inside.

    Return that manifest. Raise ArchiveError on the first difference: a missing, extra or
    changed member, or a stream that does not decompress; CryptoError when an encrypted
    archive does not decrypt with *encryption*.
    """
    found: dict[str, tuple[str, int, int, str | None, str]] = {}
    manifest_bytes: bytes | None = None
    try:
        with (
            open_stream(archive, encryption) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for info in tar:
                if info.name == top:
                    continue
                if not info.name.startswith(f"{top}/") or ".." in info.name.split("/"):
                    raise ArchiveError(f"{archive.name}: member {info.name!r} is outside {top}/")
                relative = info.name[len(top) + 1 :]
                if relative == MANIFEST_NAME:
                    extracted = tar.extractfile(info)
                    manifest_bytes = extracted.read() if extracted else None
                    continue
                kind = _KINDS.get(info.type, "other")
                digest = _member_digest(tar, info) if kind == "file" else None
                found[relative] = (kind, info.size, stat.S_IMODE(info.mode), digest, info.linkname)
    except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError) as error:
        raise ArchiveError(f"{archive.name}: unreadable archive: {error}") from error
    if manifest_bytes is None:
        raise ArchiveError(f"{archive.name}: no {MANIFEST_NAME} inside")
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as error:
        raise ArchiveError(f"{archive.name}: {MANIFEST_NAME} inside is not valid") from error
    for entry in manifest.files:
        actual = found.pop(entry.path, None)
        expected = (entry.type, entry.size, entry.mode, entry.sha256, entry.link or "")
        if actual is None:
            raise ArchiveError(f"{archive.name}: {entry.path} is missing from the archive")
        if actual != expected:
            raise ArchiveError(f"{archive.name}: {entry.path} differs from the manifest")
    unexpected = sorted(set(found) - {INFO_NAME})
    if unexpected:
        raise ArchiveError(f"{archive.name}: {unexpected[0]} is not in the manifest")
    return manifest
