"""Verification of stored backups: authenticity, the sidecar checksum, and every member."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sovbackupd import archive, auth, restore
from sovbackupd.config.models import Gpg
from sovbackupd.errors import AuthError, SovbackupdError
from sovbackupd.manifest import Manifest
from sovbackupd.store import StoredBackup


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one backup."""

    name: str
    ok: bool
    deep: bool
    problem: str | None = None
    authentication: str | None = None
    """What the record check found (``authenticated``, ``unsigned``, ``foreign key``);
    None when the record itself was refused."""


def check(
    backup: StoredBackup,
    deep: bool,
    encryption: Gpg | None = None,
    *,
    key: auth.Key | None,
    trust_unsigned: bool = False,
) -> Verdict:
    """Verify *backup*: its record against *key*, its sidecar checksum, with *deep* every member.

    A record that fails (a forgery, a replay) fails verification; an unsigned or
    foreign-key backup fails too unless *trust_unsigned*, as restore would refuse it.
    Deep verification decrypts (with *encryption*) and decompresses the whole archive,
    hashes every member and compares it with the manifest inside, and that manifest with
    the copy kept beside the archive (decrypted, when the copy beside is an encrypted
    backup's head). That copy is validated as restore reads it: a field out of its bounds
    fails verification, naming the field. Every file is compared with the digest the
    record vouched for as it is read, so a file swapped after the check fails too.
    """
    try:
        status, signed = auth.vouched(backup.path, backup.name, key)
        if status is not auth.Status.AUTHENTICATED and not trust_unsigned:
            raise AuthError(auth.refusal(backup.name, status))
    except SovbackupdError as error:
        return Verdict(backup.name, ok=False, deep=deep, problem=str(error))
    found = status.value
    try:
        archive.verify_checksum(backup.path, signed.get(backup.path.name))
        beside = _beside(backup, signed)
        if deep and beside is not None:
            # The checks restore makes, member by member: what it refuses fails here.
            restore.verify_members(backup, encryption, signed)
            return Verdict(backup.name, ok=True, deep=deep, authentication=found)
        inside = archive.verify_members(backup.path, backup.name, encryption) if deep else None
    except SovbackupdError as error:
        return Verdict(backup.name, ok=False, deep=deep, problem=str(error), authentication=found)
    if inside is not None and beside is not None and beside != inside:
        problem = f"{backup.path.name}: the manifest beside it differs from the one inside"
        return Verdict(backup.name, ok=False, deep=deep, problem=problem, authentication=found)
    return Verdict(backup.name, ok=True, deep=deep, authentication=found)


def _beside(backup: StoredBackup, signed: Mapping[str, str]) -> Manifest | None:
    """Return the manifest kept beside *backup*, None when there is none.

    Raise ArchiveError, naming the field, when it is there but restore would refuse it,
    or when it is an encrypted backup's head and the encrypted manifest is missing;
    AuthError when it is not the one *signed* lists.
    """
    if not os.path.lexists(archive.manifest_path(backup.path)):
        return None
    return restore.load_head(backup, signed)
