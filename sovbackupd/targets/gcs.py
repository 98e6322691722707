"""A bucket of Google Cloud Storage, written with google-cloud-storage.

Files over 8 MiB go up as resumable uploads in chunks of ``chunk_size`` (memory stays at
one chunk); smaller ones in one request. Either way the file's CRC32C, computed here
before the upload, travels in the object's metadata: GCS compares it with what it
received and refuses to create the object on a mismatch, and the client library checks
it again. After the upload the object's size and CRC32C are compared once more, and the
whole file's sha256 is kept in the object's metadata for verifying a remote without
downloading it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.api_core.exceptions
import google.auth
import google.auth.exceptions
import google_crc32c
import requests
import structlog
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.oauth2 import service_account

from sovbackupd.archive import CHUNK_BYTES
from sovbackupd.config.models import GcsRemote
from sovbackupd.errors import NotFoundError, TargetError, TransientTargetError
from sovbackupd.fsat import PARTIAL_SUFFIX, fsync_dir
from sovbackupd.targets.base import (
    NAME_PATTERN,
    Listing,
    RemoteObject,
    check_arrival,
    check_local_digest,
    check_name,
    local_size,
)

log = structlog.get_logger("sovbackupd.targets")

CHUNK_UNIT = 256 << 10  # resumable chunks are multiples of 256 KiB
CHUNK_SIZE = 64 * CHUNK_UNIT  # 16 MiB
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0
METADATA_KEY = "sha256"
_TRANSIENT_STATUS = frozenset({408, 429})


def _digests(remote: str, path: Path) -> tuple[str, str]:
    """Return the sha256 (hex) and CRC32C (base64, as GCS writes it) of *path*."""
    sha256 = hashlib.sha256()
    crc32c = google_crc32c.Checksum()  # type: ignore[no-untyped-call]  # google-crc32c is untyped
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                sha256.update(chunk)
                crc32c.update(chunk)  # type: ignore[no-untyped-call]  # untyped, as above
    except OSError as error:
        raise TargetError(f"remote {remote}: cannot read {path}: {error.strerror}") from error
    crc = crc32c.digest()  # type: ignore[no-untyped-call]  # untyped, as above
    return sha256.hexdigest(), base64.b64encode(crc).decode("ascii")


class GcsTarget:
    """Objects ``<prefix>/<name>`` in the bucket of *config*."""

    def __init__(
        self,
        config: GcsRemote,
        *,
        chunk_size: int = CHUNK_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = READ_TIMEOUT_SECONDS,
    ) -> None:
        """Copy to the bucket of *config* in resumable chunks of *chunk_size* bytes."""
        if chunk_size <= 0 or chunk_size % CHUNK_UNIT:
            raise ValueError("chunk_size must be a positive multiple of 256 KiB")
        self.config = config
        self.chunk_size = chunk_size
        self._timeout = (connect_timeout, read_timeout)
        stripped = config.prefix.strip("/")
        self._prefix = f"{stripped}/" if stripped else ""
        self._client: storage.Client | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """Return the remote's name."""
        return self.config.name

    def _where(self) -> str:
        return f"gs://{self.config.bucket}/{self._prefix}"

    def _key(self, remote_name: str) -> str:
        return self._prefix + remote_name

    def _credentials(self) -> tuple[Credentials, str | None]:
        path = self.config.credentials_file
        if path is not None:
            try:
                credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]  # untyped in google-auth
                    str(path)
                )
            except OSError as error:
                raise TargetError(
                    f"remote {self.name}: credentials_file {path} cannot be read: {error.strerror}"
                ) from error
            except ValueError as error:  # also JSONDecodeError and a malformed key
                raise TargetError(
                    f"remote {self.name}: credentials_file {path} is not a service account "
                    f"key: {error}"
                ) from error
            return credentials, credentials.project_id
        if self.config.endpoint is not None:
            return AnonymousCredentials(), None  # type: ignore[no-untyped-call]  # google-auth leaves it untyped
        try:
            credentials, project = google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError as error:
            raise TargetError(
                f"remote {self.name}: no Google credentials found; set credentials_file or "
                f"GOOGLE_APPLICATION_CREDENTIALS: {error}"
            ) from error
        return credentials, project

    def _bucket(self) -> storage.Bucket:
        """Return the bucket, the client made on first use (a bad key is a TargetError)."""
        with self._lock:
            if self._client is None:
                credentials, project = self._credentials()
                options = (
                    ClientOptions(api_endpoint=self.config.endpoint)
                    if self.config.endpoint is not None
                    else None
                )
                self._client = storage.Client(
                    project=project, credentials=credentials, client_options=options
                )
            return self._client.bucket(self.config.bucket)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn the client's exceptions into TargetErrors that say where and what."""
        prefix = f"remote {self.name}: {what} on {self._where()} failed"
        try:
            yield
        except google.api_core.exceptions.GoogleAPICallError as error:
            status = error.code or 0
            message = f"{prefix}: {status} {error.message}"
            garbled = status == 400 and (
                "CRC32C" in error.message or "MD5" in error.message.upper()
            )
            if garbled or status >= 500 or status in _TRANSIENT_STATUS:
                raise TransientTargetError(message) from error
            raise TargetError(message) from error
        except (DataCorruption, InvalidResponse) as error:
            raise TransientTargetError(f"{prefix}: {error}") from error
        except (
            requests.exceptions.RequestException,
            google.auth.exceptions.TransportError,
        ) as error:
            raise TransientTargetError(f"{prefix}: {error}") from error
        except google.auth.exceptions.GoogleAuthError as error:
            raise TargetError(f"{prefix}: credentials refused: {error}") from error

    def upload(
        self, local_path: Path, remote_name: str, *, sha256: str | None = None
    ) -> RemoteObject:
        """Upload *local_path* with its CRC32C for GCS to check; verify the stored object."""
        check_name(self.name, remote_name, sha256)
        started = time.monotonic()
        size = local_size(self.name, local_path)
        actual, crc32c = _digests(self.name, local_path)
        check_local_digest(self.name, local_path, actual, sha256)
        what = f"upload of {remote_name}"
        try:
            handle = local_path.open("rb")
        except OSError as error:
            raise TargetError(
                f"remote {self.name}: cannot read {local_path}: {error.strerror}"
            ) from error
        with handle, self._errors(what):
            blob = self._bucket().blob(self._key(remote_name), chunk_size=self.chunk_size)
            blob.metadata = {METADATA_KEY: actual}
            blob.upload_from_file(
                handle,
                size=size,
                checksum="crc32c",
                crc32c_checksum_value=crc32c,
                retry=None,
                timeout=self._timeout,
            )
        if blob.size != size or blob.crc32c != crc32c:
            with contextlib.suppress(Exception):  # the sidecar-last rule keeps it incomplete
                blob.delete(retry=None, timeout=self._timeout)
            raise TransientTargetError(
                f"remote {self.name}: {remote_name} on {self._where()} has {blob.size} bytes "
                f"and CRC32C {blob.crc32c}, not {size} bytes and {crc32c}: damaged on the "
                "way; removed it"
            )
        log.info(
            "target.uploaded",
            target=self.name,
            object=remote_name,
            size=size,
            duration_seconds=round(time.monotonic() - started, 3),
        )
        return RemoteObject(remote_name, size, actual)

    def download(self, remote_name: str, local_path: Path) -> RemoteObject:
        """Download *remote_name* with CRC32C checking to a temp name; check sha256; rename."""
        check_name(self.name, remote_name)
        partial = local_path.with_name(local_path.name + PARTIAL_SUFFIX)
        what = f"download of {remote_name}"
        with self._errors(what):
            blob = self._bucket().get_blob(
                self._key(remote_name), retry=None, timeout=self._timeout
            )
        if blob is None:
            raise NotFoundError(f"remote {self.name}: no object {remote_name!r} on {self._where()}")
        try:
            with self._errors(what):
                descriptor = os.open(
                    partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
                )
                with os.fdopen(descriptor, "wb") as handle:
                    blob.download_to_file(
                        handle,
                        checksum="crc32c",
                        if_generation_match=blob.generation,
                        retry=None,
                        timeout=self._timeout,
                    )
                    handle.flush()
                    os.fsync(handle.fileno())
            size = local_size(self.name, partial)
            actual = _digests(self.name, partial)[0]
            check_arrival(
                self.name,
                remote_name,
                (size, actual),
                (blob.size, (blob.metadata or {}).get(METADATA_KEY)),
            )
            partial.replace(local_path)
            fsync_dir(local_path.parent)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise TargetError(
                f"remote {self.name}: cannot write {local_path}: {error.strerror}"
            ) from error
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        log.info("target.downloaded", target=self.name, object=remote_name, size=size)
        return RemoteObject(remote_name, size, actual)

    def list(self) -> Listing:
        """Return the objects directly under the prefix."""
        found = []
        with self._errors("listing"):
            bucket = self._bucket()
            blobs: Iterator[Any] = bucket.client.list_blobs(
                bucket, prefix=self._prefix, delimiter="/", retry=None, timeout=self._timeout
            )
            for blob in blobs:
                name = blob.name[len(self._prefix) :]
                if NAME_PATTERN.match(name) and not name.endswith(PARTIAL_SUFFIX):
                    found.append(RemoteObject(name, blob.size))
        return sorted(found, key=lambda stored: stored.name)

    def stat(self, remote_name: str) -> RemoteObject | None:
        """Return *remote_name*'s size and recorded sha256, or None when it is missing."""
        check_name(self.name, remote_name)
        with self._errors(f"stat of {remote_name}"):
            blob = self._bucket().get_blob(
                self._key(remote_name), retry=None, timeout=self._timeout
            )
        if blob is None:
            return None
        return RemoteObject(remote_name, blob.size, (blob.metadata or {}).get(METADATA_KEY))

    def delete(self, remote_name: str) -> None:
        """Delete *remote_name*; a missing one is fine."""
        check_name(self.name, remote_name)
        with (
            self._errors(f"deletion of {remote_name}"),
            contextlib.suppress(google.api_core.exceptions.NotFound),
        ):
            self._bucket().delete_blob(self._key(remote_name), retry=None, timeout=self._timeout)
        log.info("target.deleted", target=self.name, object=remote_name)
