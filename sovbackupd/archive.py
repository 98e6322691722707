"""Streaming tar archives: written once and atomically, with checksums, read back to verify.

The writer streams each member straight from its source through the compressor into
``<archive>.partial``, hashing every member and the stored bytes on the way, so memory
stays flat whatever the data size. The archive takes its final name only after the data
is fsynced and its sidecars are in place; a run that dies leaves only ``*.partial``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
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

from sovbackupd import crypto, untrusted
from sovbackupd.config.layout import shown
from sovbackupd.config.models import Gpg
from sovbackupd.errors import (
    AbortedError,
    ArchiveError,
    AuthError,
    DiskSpaceError,
    SovbackupdError,
)
from sovbackupd.fsat import PARTIAL_SUFFIX, fsync_dir
from sovbackupd.manifest import (
    FULL_LIMIT_BYTES,
    INFO_NAME,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    parse_json,
    parse_manifest,
    write_manifest,
)
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
SIDECAR_SUFFIX = ".sha256"
SIDECAR_LIMIT_BYTES = 4096  # "<64 hex digits>  <name>\n"; more is not one of ours
MANIFEST_SUFFIX = ".manifest.json"
AUTH_SUFFIX = ".auth.json"
ProgressCallback = Callable[[int], None]
UNREADABLE = (tarfile.TarError, EOFError, ValueError, zstandard.ZstdError)
"""What reading a damaged or hostile stream raises; tarfile raises ValueError on some
malformed headers (a GNU sparse map that is not numbers)."""


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def copy_atomically(source: IO[bytes], path: Path, *, owner: tuple[int, int] | None = None) -> None:
    """Copy *source* to *path* (mode 0600) through a temp name, fsync and rename.

    The temp file is created anew, never opened through whatever sits at its name: a
    symlink planted there by whoever can write the directory would otherwise have a root
    CLI write through it to the link's target. *owner* (uid, gid) is given to the file
    before it takes its name.
    """
    fill_atomically(path, lambda handle: shutil.copyfileobj(source, handle, CHUNK_BYTES), owner)


def fill_atomically(
    path: Path, fill: Callable[[BinaryIO], None], owner: tuple[int, int] | None = None
) -> None:
    """Create *path* (mode 0600, *owner*'s) with what *fill* writes, through a temp name.

    See :func:`copy_atomically`; the file is fsynced before the rename.
    """
    temporary = path.with_name(path.name + PARTIAL_SUFFIX)
    temporary.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, 0o600)
    try:
        if owner is not None:
            os.fchown(descriptor, *owner)
        with os.fdopen(descriptor, "wb") as handle:
            fill(handle)
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
_PAX_NAME = b"././@PaxHeader"
_NAME_KEYWORDS = frozenset({"path", "linkpath", "GNU.sparse.name"})
_ZEROS = bytes(CHUNK_BYTES)
SPARSE_DIRECTORY = "GNUSparseFile.0"
"""Where GNU's sparse format 1.0 parks a sparse member's ustar name; pax names the real one."""
MAX_SPARSE_REGIONS = 1 << 16  # a map of this many runs is ~1.5 MiB; beyond it, archive dense


def _split_name(name: bytes) -> tuple[bytes, bytes] | None:
    """Split *name* into ustar's (prefix, name) fields, or None when it cannot fit."""
    if len(name) <= 100:
        return b"", name
    cut = name.find(b"/", len(name) - 101)
    if cut <= 0 or cut > 155:
        return None
    return name[:cut], name[cut + 1 :]


def _ustar_block(
    fields: tuple[bytes, bytes],
    typeflag: bytes,
    *,
    size: int,
    mode: int,
    mtime: int,
    uid: int = 0,
    gid: int = 0,
    link: bytes = b"",
) -> bytes:
    prefix, short = fields
    header = bytearray(
        _USTAR.pack(
            short,
            b"%07o\0" % mode,
            b"%07o\0" % uid,
            b"%07o\0" % gid,
            b"%011o\0" % size,
            b"%011o\0" % mtime,
            b" " * 8,
            typeflag,
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


def _pax_record(keyword: str, value: bytes) -> bytes:
    """Return one pax record, ``<length> <keyword>=<value>`` and a newline.

    The length counts the whole record, its own digits included.
    """
    body = b" %s=%s\n" % (keyword.encode("ascii"), value)
    length = len(body)
    while (total := len(body) + len(str(length))) != length:
        length = total
    return b"%d%s" % (length, body)


def _pax_time(nanoseconds: int) -> bytes:
    """Format *nanoseconds* since the epoch as pax's decimal seconds (``1600000000.5``)."""
    if nanoseconds < 0:
        return b"-" + _pax_time(-nanoseconds)
    return (b"%d.%09d" % divmod(nanoseconds, 10**9)).rstrip(b"0").rstrip(b".")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _tar_header(
    name: str, size: int, member: Member, extra: tuple[tuple[str, bytes], ...] = ()
) -> bytes:
    """Return the tar header of *member*: ustar, after a pax header when ustar cannot hold it.

    The pax header carries what ustar's fields cannot: the exact mtime (whenever it has
    a fraction of a second), a long name or link, a large size or id, and *extra*
    records, which come last so that they take precedence (GNU.sparse.name over path).
    Headers are built by hand because tarfile's cost tens of microseconds per member,
    which dominates a tree of small files.
    """
    encoded = name.encode("utf-8", "surrogateescape")
    link = member.linkname.encode("utf-8", "surrogateescape")
    nanoseconds = member.exact_mtime_ns
    mtime = nanoseconds // 10**9
    ustar_mtime = mtime if 0 <= mtime < _USTAR_LIMIT else 0
    records: list[tuple[str, bytes]] = []
    fields = _split_name(encoded)
    if fields is None:
        records.append(("path", encoded))
        fields = (b"", encoded[-100:])
    if len(link) > 100:
        records.append(("linkpath", link))
        link = link[:100]
    if size >= _USTAR_LIMIT:
        records.append(("size", b"%d" % size))
    if nanoseconds % 10**9 or ustar_mtime != mtime:
        records.append(("mtime", _pax_time(nanoseconds)))
    ids = {"uid": member.uid, "gid": member.gid}
    for keyword, value in ids.items():
        if not 0 <= value < _ID_LIMIT:
            records.append((keyword, b"%d" % value))
            ids[keyword] = 0
    records.extend(extra)
    if not all(_is_utf8(value) for keyword, value in records if keyword in _NAME_KEYWORDS):
        records.insert(0, ("hdrcharset", b"BINARY"))  # names that are not UTF-8, kept as bytes
    header = _ustar_block(
        fields,
        _TYPEFLAGS[member.kind],
        size=size if size < _USTAR_LIMIT else 0,
        mode=member.mode,
        mtime=ustar_mtime,
        uid=ids["uid"],
        gid=ids["gid"],
        link=link,
    )
    if not records:
        return header
    data = b"".join(_pax_record(keyword, value) for keyword, value in records)
    return _pax_header_block(len(data)) + data + b"\0" * (-len(data) % BLOCK) + header


@functools.lru_cache(maxsize=4096)
def _pax_header_block(size: int) -> bytes:
    """Return the ustar header of a pax extended header of *size* bytes.

    Its mtime is 0, as Python's tarfile writes it, so that it depends on the size alone
    and is built once: nearly every member has one, for its sub-second mtime.
    """
    return _ustar_block((b"", _PAX_NAME), tarfile.XHDTYPE, size=size, mode=0o644, mtime=0)


def _sparse_header(name: str, size: int, member: Member, regions: list[tuple[int, int]]) -> bytes:
    """Return the headers and data map of *member* as a GNU sparse (format 1.0) member.

    Its ustar name is ``<dir>/GNUSparseFile.0/<base>``, its real name and size are in
    pax records, and its data starts with the map of the *regions* that follow it.
    """
    directory, _, base = name.rpartition("/")
    sparse_map = b"%d\n" % len(regions) + b"".join(b"%d\n%d\n" % run for run in regions)
    sparse_map += b"\0" * (-len(sparse_map) % BLOCK)
    stored = len(sparse_map) + sum(length for _, length in regions)
    extra = (
        ("GNU.sparse.major", b"1"),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", name.encode("utf-8", "surrogateescape")),
        ("GNU.sparse.realsize", b"%d" % size),
    )
    placeholder = f"{directory}/{SPARSE_DIRECTORY}/{base}"
    return _tar_header(placeholder, stored, member, extra) + sparse_map


def _hash_zeros(digest: hashlib._Hash, count: int) -> None:
    """Feed *count* zero bytes (a hole) to *digest*."""
    while count > 0:
        piece = memoryview(_ZEROS)[: min(count, CHUNK_BYTES)]
        digest.update(piece)
        count -= len(piece)


def data_regions(descriptor: int, status: os.stat_result) -> list[tuple[int, int]] | None:
    """Return the (offset, length) runs of data of a sparse file, None when it is dense.

    A file is sparse when fewer bytes are allocated (``st_blocks`` counts 512-byte
    units) than its size; SEEK_DATA/SEEK_HOLE find its holes. The list ends with a
    zero-length run at the end of the file when it ends in a hole, as GNU tar writes.
    Raise OSError when the filesystem cannot tell where the holes are.
    """
    size = status.st_size
    if status.st_blocks * 512 >= size:
        return None
    regions: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(descriptor, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: nothing but a hole from here on
                    raise
                break
            end = min(os.lseek(descriptor, start, os.SEEK_HOLE), size)
            if start >= end:
                break
            regions.append((start, end - start))
            offset = end
    finally:
        os.lseek(descriptor, 0, os.SEEK_SET)
    if regions == [(0, size)]:
        return None
    if not regions or sum(regions[-1]) < size:
        regions.append((size, 0))
    return regions


def _shown(member: Member) -> str:
    """Return where *member* came from for a message: one line, whatever bytes its name holds."""
    return shown(Path(member.origin or member.arcname))


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
            report.warnings.append(f"{_shown(member)}: vanished before it could be read")
            return
        except OSError as error:
            raise ArchiveError(f"cannot read {_shown(member)}: {error.strerror}") from error
        with handle:
            before = os.fstat(handle.fileno())
            size = before.st_size
            sparse = self._regions(handle, before, member, report)
            if sparse is None:
                self._write(_tar_header(name, size, member))
            else:
                self._write(_sparse_header(name, size, member, sparse))
            digest = hashlib.sha256()
            position = 0
            shrank = False
            runs = sparse or [(0, size)]
            for offset, length in runs:
                _hash_zeros(digest, offset - position)  # the hole before this run
                if sparse is not None:
                    handle.seek(offset)
                shrank |= self._copy(handle, length, digest)
                position = offset + length
            _hash_zeros(digest, size - position)
            if shrank:
                report.warnings.append(f"{_shown(member)}: shrank while read, padded with zeros")
            else:
                after = os.fstat(handle.fileno())
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    report.warnings.append(f"{_shown(member)}: changed while read")
        self._pad(self._tar_bytes)
        self._record(member, size, digest.hexdigest(), sum(length for _, length in runs))

    @staticmethod
    def _regions(
        handle: BinaryIO, status: os.stat_result, member: Member, report: SourceReport
    ) -> list[tuple[int, int]] | None:
        """Return the data runs of a sparse file to archive as sparse, None to archive dense.

        When the holes cannot be found, or there are too many, the file is archived dense
        and *report* says so: its bytes are the same, only larger.
        """
        try:
            regions = data_regions(handle.fileno(), status)
        except OSError as error:
            reason = f"its holes cannot be found ({error.strerror})"
        else:
            if regions is None or len(regions) <= MAX_SPARSE_REGIONS:
                return regions
            reason = f"it has more than {MAX_SPARSE_REGIONS} data runs"
        from sovbackupd.store import human_size  # noqa: PLC0415 (store imports this module)

        report.warnings.append(
            f"{_shown(member)}: sparse, but archived as dense "
            f"({human_size(status.st_size)}): {reason}"
        )
        return None

    def _copy(self, handle: BinaryIO, length: int, digest: hashlib._Hash) -> bool:
        """Stream *length* bytes of *handle* into the archive and *digest*.

        A file that ends sooner (it shrank while read) is padded with zeros, because the
        header promised *length* bytes; return True then.
        """
        remaining = length
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
        shrank = remaining > 0
        while remaining > 0:
            piece = memoryview(_ZEROS)[: min(remaining, CHUNK_BYTES)]
            digest.update(piece)
            self._write(piece)
            remaining -= len(piece)
        return shrank

    @property
    def read_bytes(self) -> int:
        """Return the file bytes read from the sources so far (what progress counts)."""
        return self._done

    def _record(self, member: Member, size: int, sha256: str | None, data_bytes: int = 0) -> None:
        """Spool the manifest entry of *member*; count *data_bytes*, what its tar data holds."""
        try:
            self._spool.write(_entry_line(member, size, sha256))
        except OSError as error:
            raise _disk_error(error, self.partial) from error
        if member.kind == "file":
            self.file_count += 1
            self.file_bytes += data_bytes

    @property
    def entries(self) -> list[FileEntry]:
        """Return the manifest entries recorded so far (reads them back from the spool)."""
        self._spool.flush()
        self._spool.seek(0)
        entries = [FileEntry.model_validate(parse_json(line)) for line in self._spool]
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

    def _write_manifests(self, head: Manifest, manifest: IO[bytes]) -> None:
        """Put the manifest beside the archive: in plaintext, or encrypted and a head.

        An encrypted backup keeps no plaintext file list: its full manifest, byte for byte
        the member inside, is encrypted as the archive is into ``.manifest.json.gpg``;
        beside it lies only the head that listing and retention read.
        """
        manifest.seek(0)
        if self._encryption is None:
            copy_atomically(manifest, manifest_path(self.path))
            return
        settings = self._encryption
        target = encrypted_manifest_path(self.path)

        def encrypt(handle: BinaryIO) -> None:
            with crypto.encrypting(handle, settings, name=target.name) as sink:
                shutil.copyfileobj(manifest, sink, CHUNK_BYTES)

        fill_atomically(target, encrypt)
        written = io.BytesIO()
        write_manifest(head.head(), (), written)
        write_atomically(manifest_path(self.path), written.getvalue())

    def commit(self, head: Manifest, read_back: Callable[[IO[bytes]], None] | None = None) -> str:
        """Archive the manifest, finish the stream, then put the archive in place.

        The manifest is *head* plus every recorded entry. The sidecars are written before
        the rename, so an archive under its final name always has them. *read_back* runs
        once they are on disk, before the rename, given the plaintext manifest as it went
        into the archive (it reads the manifest back and writes the authentication
        record): whatever it raises discards the archive, its sidecars and its record, so
        that no archive takes its name unless its manifest reads back and it is signed.
        Return the archive's sha256.
        """
        try:
            manifest = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115 (closed in the finally below; its creation alone can hit ENOSPC)
        except OSError as error:
            raise _disk_error(error, self.partial) from error
        try:
            try:
                self._add_manifest(head, manifest)
            except OSError as error:
                raise _disk_error(error, self.partial) from error
            sha256 = self._finish()
            try:
                write_atomically(sidecar_path(self.path), f"{sha256}  {self.path.name}\n".encode())
                self._write_manifests(head, manifest)
                if read_back is not None:
                    manifest.seek(0)
                    read_back(manifest)
                self.partial.replace(self.path)
                fsync_dir(self.path.parent)
            except BaseException as error:
                for beside in (sidecar_path, manifest_path, encrypted_manifest_path, auth_path):
                    beside(self.path).unlink(missing_ok=True)
                if isinstance(error, OSError):
                    raise _disk_error(error, self.partial) from error
                raise
        finally:
            # The temp file is nameless and its bytes, if any were needed, are copied by now;
            # on a full disk its close flushes into ENOSPC, which must not replace the error
            # that says what happened (a `with` would raise it from __exit__).
            with contextlib.suppress(OSError):
                manifest.close()
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


def encrypted_manifest_path(archive: Path) -> Path:
    """Return where the encrypted full manifest of *archive* is kept (encrypted or not)."""
    beside = manifest_path(archive)
    return beside.with_name(beside.name + crypto.SUFFIX)


def encryption_needed(archive: Path) -> ArchiveError:
    """Return the error that says *archive* is encrypted and the policy has no settings."""
    return ArchiveError(
        f"{archive.name} is encrypted: the policy needs its encryption settings "
        "(passphrase_file, or secret_keys_file on the recovery machine)"
    )


def read_encrypted_manifest(
    archive: Path, encryption: Gpg | None, signed_sha256: str | None = None
) -> bytes:
    """Return the full manifest of the encrypted *archive*, decrypted into memory.

    The plaintext never touches the disk, and reading stops (gpg stopped) past
    FULL_LIMIT_BYTES, so a small file that decompresses to gigabytes cannot fill memory.
    The encrypted bytes are read once, and when *signed_sha256* is given (what the
    backup's record vouched for) they must hash to it: what is decrypted is what was
    authenticated, even if the file is swapped meanwhile. Raise ArchiveError when it is
    missing, unreadable or too large, AuthError when it is not what was signed,
    CryptoError when gpg cannot decrypt it or finds it damaged.
    """
    path = encrypted_manifest_path(archive)
    if encryption is None:
        raise encryption_needed(archive)
    try:
        with untrusted.open_regular(path) as handle:
            sealed = handle.read(FULL_LIMIT_BYTES + 1)
        if len(sealed) > FULL_LIMIT_BYTES:
            raise ArchiveError(f"{path.name} is larger than {FULL_LIMIT_BYTES >> 20} MiB")
        if signed_sha256 is not None and hashlib.sha256(sealed).hexdigest() != signed_sha256:
            raise AuthError(f"{path.name} changed after its authentication was checked")
        with crypto.decrypting(io.BytesIO(sealed), encryption, name=path.name) as plain:
            data = plain.read(FULL_LIMIT_BYTES + 1)
            if len(data) > FULL_LIMIT_BYTES:
                raise ArchiveError(
                    f"{path.name} decrypts to more than {FULL_LIMIT_BYTES >> 20} MiB"
                )
    except FileNotFoundError:
        raise ArchiveError(
            f"{path.name} is missing: the head beside {archive.name} says its manifest is "
            "encrypted there"
        ) from None
    except (OSError, ValueError) as error:  # NotRegularError is a ValueError
        reason = error.strerror if isinstance(error, OSError) else None
        raise ArchiveError(f"{path.name} is unreadable: {reason or error}") from None
    return data


def auth_path(archive: Path) -> Path:
    """Return the authentication record kept beside *archive* (see auth.py)."""
    base = manifest_path(archive).name.removesuffix(MANIFEST_SUFFIX)
    return archive.with_name(base + AUTH_SUFFIX)


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
                raise encryption_needed(archive)
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
        # Never a FIFO (verify and the remote passes would block on it), and bounded.
        with untrusted.open_regular(sidecar_path(archive)) as handle:
            text = handle.read(SIDECAR_LIMIT_BYTES).decode("ascii")
    except FileNotFoundError:
        raise ArchiveError(f"{archive.name}: checksum sidecar is missing") from None
    except (OSError, ValueError) as error:  # UnicodeDecodeError, NotRegularError
        raise ArchiveError(f"{archive.name}: checksum sidecar is unreadable") from error
    digest, _, name = text.strip().partition("  ")
    if name != archive.name or len(digest) != 64:
        raise ArchiveError(f"{archive.name}: checksum sidecar is malformed")
    return digest


def file_sha256(path: Path) -> str:
    """Return the sha256 of the file at *path*."""
    with path.open("rb") as handle:
        return stream_sha256(handle)


def verify_checksum(archive: Path, expected: str | None = None) -> None:
    """Compare *archive* with *expected* or else its sidecar; raise ArchiveError if they differ."""
    expected = expected or read_sidecar(archive)
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
    except (OSError, *UNREADABLE) as error:
        raise ArchiveError(f"{archive.name}: unreadable archive: {error}") from error
    if manifest_bytes is None:
        raise ArchiveError(f"{archive.name}: no {MANIFEST_NAME} inside")
    try:
        manifest = parse_manifest(manifest_bytes)
    except ValueError as error:  # ValidationError and JSONDecodeError
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
