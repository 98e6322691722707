"""A bucket of Amazon S3 or an S3-compatible store, written with boto3.

Every upload is a multipart upload streamed one part at a time (memory stays at one
part, whatever the file size), created with ``ChecksumAlgorithm=SHA256``: each part
carries its SHA256, which S3 checks on receipt (``BadDigest`` otherwise), and the object
only appears when CompleteMultipartUpload commits it. Afterwards the object's composite
checksum (the SHA256 of the parts' SHA256s, ``-N``) from ``HeadObject`` with
``ChecksumMode=ENABLED`` is compared with the one computed here, which also catches
stores that accept checksums without checking them. The whole file's sha256 is kept in
the object's metadata (``x-amz-meta-sha256``) so that a remote can be verified without
downloading it.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
import structlog
from botocore.config import Config

from sovbackupd import untrusted
from sovbackupd.archive import CHUNK_BYTES
from sovbackupd.config.models import S3Remote
from sovbackupd.errors import NotFoundError, TargetError, TransientTargetError
from sovbackupd.fsat import PARTIAL_SUFFIX, fsync_dir
from sovbackupd.targets.base import (
    NAME_PATTERN,
    Listing,
    RemoteObject,
    check_arrival,
    check_local_digest,
    check_name,
    file_sha256,
    local_size,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = structlog.get_logger("sovbackupd.targets")

PART_BYTES = 16 << 20
MAX_PARTS = 10_000  # S3's limit per multipart upload
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0
CREDENTIALS_MAX_BYTES = 64 << 10  # a credentials file holds a few keys
METADATA_KEY = "sha256"
# Error codes that a later attempt may not get: throttling, a server-side hiccup, or a
# part garbled on the way (S3 checked its checksum and refused it).
_TRANSIENT_CODES = frozenset(
    {
        "BadDigest",
        "InternalError",
        "InvalidDigest",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "XAmzContentSHA256Mismatch",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class Credentials:
    """An access key, as the [default] section of an AWS credentials file holds it."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


def read_credentials(remote: str, path: Path) -> Credentials:
    """Read the [default] section of the AWS credentials file at *path*."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        # Bounded and never a FIFO: either would hang or exhaust the backup, not fail it.
        with untrusted.open_regular(path, follow_symlinks=True) as handle:
            data = handle.read(CREDENTIALS_MAX_BYTES + 1)
        if len(data) > CREDENTIALS_MAX_BYTES:
            raise TargetError(
                f"remote {remote}: credentials_file {path} is larger than "
                f"{CREDENTIALS_MAX_BYTES >> 10} KiB"
            )
        parser.read_string(data.decode("utf-8"))
    except OSError as error:
        raise TargetError(
            f"remote {remote}: credentials_file {path} cannot be read: {error.strerror}"
        ) from error
    except untrusted.NotRegularError as error:
        raise TargetError(
            f"remote {remote}: credentials_file {path} cannot be read: {error}"
        ) from error
    except (configparser.Error, UnicodeDecodeError) as error:
        raise TargetError(
            f"remote {remote}: credentials_file {path} is not an AWS credentials file"
        ) from error
    if not parser.has_section("default"):
        raise TargetError(f"remote {remote}: credentials_file {path} has no [default] section")
    section = parser["default"]
    missing = [
        key for key in ("aws_access_key_id", "aws_secret_access_key") if not section.get(key)
    ]
    if missing:
        raise TargetError(
            f"remote {remote}: credentials_file {path}: [default] lacks {', '.join(missing)}"
        )
    return Credentials(
        section["aws_access_key_id"],
        section["aws_secret_access_key"],
        section.get("aws_session_token") or None,
    )


def _parts(remote: str, path: Path, part_size: int) -> Iterator[bytes]:
    """Yield *path* in parts of *part_size* bytes (one empty part for an empty file)."""
    # botocore's connection errors are OSErrors too: only the file's own are caught here.
    try:
        with path.open("rb") as handle:
            chunk = handle.read(part_size)
            yield chunk
            while len(chunk) == part_size and (chunk := handle.read(part_size)):
                yield chunk
    except OSError as error:
        raise TargetError(f"remote {remote}: cannot read {path}: {error.strerror}") from error


class S3Target:
    """Objects ``<prefix>/<name>`` in the bucket of *config*."""

    def __init__(
        self,
        config: S3Remote,
        *,
        part_size: int = PART_BYTES,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = READ_TIMEOUT_SECONDS,
    ) -> None:
        """Copy to the bucket of *config* in parts of *part_size* bytes (5 MiB at least)."""
        self.config = config
        self.part_size = part_size
        self._timeouts = (connect_timeout, read_timeout)
        stripped = config.prefix.strip("/")
        self._prefix = f"{stripped}/" if stripped else ""
        self._client: S3Client | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """Return the remote's name."""
        return self.config.name

    def _where(self) -> str:
        return f"s3://{self.config.bucket}/{self._prefix}"

    def _key(self, remote_name: str) -> str:
        return self._prefix + remote_name

    def _s3(self) -> S3Client:
        """Return the client, made on first use so that a bad credentials file is a TargetError."""
        with self._lock:
            if self._client is None:
                path = self.config.credentials_file
                # Without a file, None leaves the credentials to boto3's own chain.
                keys = read_credentials(self.name, path) if path is not None else None
                session = boto3.session.Session(
                    aws_access_key_id=keys.access_key_id if keys else None,
                    aws_secret_access_key=keys.secret_access_key if keys else None,
                    aws_session_token=keys.session_token if keys else None,
                    region_name=self.config.region,
                )
                connect, read = self._timeouts
                self._client = session.client(
                    "s3",
                    endpoint_url=self.config.endpoint_url,
                    config=Config(
                        # The retrying wrapper is the one place that retries.
                        retries={"total_max_attempts": 1, "mode": "standard"},
                        connect_timeout=connect,
                        read_timeout=read,
                        s3={"addressing_style": "path" if self.config.endpoint_url else "auto"},
                    ),
                )
            return self._client

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn boto3's exceptions into TargetErrors that say where and what."""
        prefix = f"remote {self.name}: {what} on {self._where()} failed"
        try:
            yield
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
        ):
            raise TargetError(
                f"{prefix}: no AWS credentials found; set credentials_file, or "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the service's environment"
            ) from None
        except (
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.IncompleteReadError,
            botocore.exceptions.ChecksumError,
            botocore.exceptions.FlexibleChecksumError,
        ) as error:
            raise TransientTargetError(f"{prefix}: {error}") from error
        except botocore.exceptions.ClientError as error:
            details = error.response.get("Error", {})
            code = details.get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = f"{prefix}: {code}: {details.get('Message') or 'no message'}"
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                raise TransientTargetError(message) from error
            raise TargetError(message) from error
        except botocore.exceptions.BotoCoreError as error:
            raise TargetError(f"{prefix}: {error}") from error

    def upload(
        self, local_path: Path, remote_name: str, *, sha256: str | None = None
    ) -> RemoteObject:
        """Stream *local_path* as a multipart upload with SHA256 part checksums; verify it."""
        check_name(self.name, remote_name, sha256)
        started = time.monotonic()
        size = local_size(self.name, local_path)
        expected = sha256 if sha256 is not None else file_sha256(self.name, local_path)
        part_size = max(self.part_size, math.ceil(size / MAX_PARTS))
        key = self._key(remote_name)
        what = f"upload of {remote_name}"
        extra: dict[str, Any] = {"Metadata": {METADATA_KEY: expected}}
        if self.config.storage_class is not None:
            extra["StorageClass"] = self.config.storage_class
        with self._errors(what):
            client = self._s3()
            upload_id = client.create_multipart_upload(
                Bucket=self.config.bucket, Key=key, ChecksumAlgorithm="SHA256", **extra
            )["UploadId"]
        try:
            with self._errors(what):
                part_digests = self._send_parts(local_path, key, upload_id, part_size, expected)
        except BaseException:
            with contextlib.suppress(Exception):  # S3's lifecycle rule catches what this misses
                client.abort_multipart_upload(
                    Bucket=self.config.bucket, Key=key, UploadId=upload_id
                )
            raise
        self._verify(key, remote_name, size, part_digests)
        log.info(
            "target.uploaded",
            target=self.name,
            object=remote_name,
            size=size,
            parts=len(part_digests),
            duration_seconds=round(time.monotonic() - started, 3),
        )
        return RemoteObject(remote_name, size, expected)

    def _send_parts(
        self, local_path: Path, key: str, upload_id: str, part_size: int, expected: str
    ) -> list[bytes]:
        """Upload the parts, then commit them if the file matched *expected*."""
        client = self._s3()
        whole = hashlib.sha256()
        part_digests: list[bytes] = []
        parts: list[CompletedPartTypeDef] = []
        for chunk in _parts(self.name, local_path, part_size):
            whole.update(chunk)
            digest = hashlib.sha256(chunk).digest()
            number = len(parts) + 1
            response = client.upload_part(
                Bucket=self.config.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=chunk,
                ChecksumSHA256=_b64(digest),
            )
            parts.append(
                {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": _b64(digest)}
            )
            part_digests.append(digest)
        check_local_digest(self.name, local_path, whole.hexdigest(), expected)
        client.complete_multipart_upload(
            Bucket=self.config.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        return part_digests

    def _verify(self, key: str, remote_name: str, size: int, part_digests: list[bytes]) -> None:
        """Compare the stored object's size and composite SHA256 with what was sent."""
        composite = _b64(hashlib.sha256(b"".join(part_digests)).digest())
        with self._errors(f"verification of {remote_name}"):
            head = self._s3().head_object(
                Bucket=self.config.bucket, Key=key, ChecksumMode="ENABLED"
            )
        stored = head.get("ChecksumSHA256")
        if stored is None:
            self._remove_unverified(key)
            raise TargetError(
                f"remote {self.name}: {self._where()} returned no SHA256 checksum for "
                f"{remote_name}: the store does not support S3 additional checksums; removed it"
            )
        value, _, count = stored.partition("-")
        if (
            head["ContentLength"] != size
            or value != composite
            or (count and int(count) != len(part_digests))
        ):
            self._remove_unverified(key)
            raise TransientTargetError(
                f"remote {self.name}: {remote_name} on {self._where()} has "
                f"{head['ContentLength']} bytes and checksum {stored}, not {size} bytes and "
                f"{composite}-{len(part_digests)}: damaged on the way; removed it"
            )

    def _remove_unverified(self, key: str) -> None:
        with contextlib.suppress(Exception):  # the sidecar-last rule keeps it incomplete anyway
            self._s3().delete_object(Bucket=self.config.bucket, Key=key)

    def download(self, remote_name: str, local_path: Path) -> RemoteObject:
        """Stream *remote_name* to ``<local_path>.partial``, check size and sha256, rename."""
        check_name(self.name, remote_name)
        what = f"download of {remote_name}"
        partial = local_path.with_name(local_path.name + PARTIAL_SUFFIX)
        digest = hashlib.sha256()
        size = 0
        try:
            with self._errors(what):
                try:
                    response = self._s3().get_object(
                        Bucket=self.config.bucket,
                        Key=self._key(remote_name),
                        ChecksumMode="ENABLED",
                    )
                except botocore.exceptions.ClientError as error:
                    if error.response.get("Error", {}).get("Code") in _MISSING_CODES:
                        raise NotFoundError(
                            f"remote {self.name}: no object {remote_name!r} on {self._where()}"
                        ) from None
                    raise
                descriptor = os.open(
                    partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
                )
                with os.fdopen(descriptor, "wb") as handle:
                    for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
                        handle.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                    handle.flush()
                    os.fsync(handle.fileno())
            check_arrival(
                self.name,
                remote_name,
                (size, digest.hexdigest()),
                (response["ContentLength"], response.get("Metadata", {}).get(METADATA_KEY)),
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
        return RemoteObject(remote_name, size, digest.hexdigest())

    def list(self) -> Listing:
        """Return the objects directly under the prefix."""
        found = []
        with self._errors("listing"):
            pages = (
                self._s3()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.config.bucket, Prefix=self._prefix, Delimiter="/")
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(self._prefix) :]
                    if NAME_PATTERN.match(name) and not name.endswith(PARTIAL_SUFFIX):
                        found.append(RemoteObject(name, entry["Size"]))
        return sorted(found, key=lambda stored: stored.name)

    def stat(self, remote_name: str) -> RemoteObject | None:
        """Return *remote_name*'s size and recorded sha256, or None when it is missing."""
        check_name(self.name, remote_name)
        with self._errors(f"stat of {remote_name}"):
            try:
                head = self._s3().head_object(Bucket=self.config.bucket, Key=self._key(remote_name))
            except botocore.exceptions.ClientError as error:
                if error.response.get("Error", {}).get("Code") in _MISSING_CODES:
                    return None
                raise
        return RemoteObject(
            remote_name, head["ContentLength"], head.get("Metadata", {}).get(METADATA_KEY)
        )

    def delete(self, remote_name: str) -> None:
        """Delete *remote_name* (S3 answers the same for a missing key)."""
        check_name(self.name, remote_name)
        with self._errors(f"deletion of {remote_name}"):
            self._s3().delete_object(Bucket=self.config.bucket, Key=self._key(remote_name))
        log.info("target.deleted", target=self.name, object=remote_name)
