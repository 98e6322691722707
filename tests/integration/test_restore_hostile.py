"""Hostile archives: each one refused before restore writes anything, live or under --to.

Every archive here starts as a real backup of the sandbox, rewritten with one hostile
member added or altered, then made consistent again (manifests, sidecar) so that restore
has to refuse it for the hostile member itself, not for a stale checksum. Most are signed
again with the test's key, as if its holder had gone rogue: the checks behind
authentication must hold on their own. The forgers without the key come last, in every
encryption mode, and the replays.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest

from sovbackupd import archive, auth, restore
from sovbackupd import config as policy_config
from sovbackupd.errors import ArchiveError, AuthError
from sovbackupd.manifest import MANIFEST_NAME
from sovbackupd.store import Store
from tests.conftest import (
    RedisServer,
    Sandbox,
    backup_files,
    key_file,
    policy_data,
    resign,
    run_cli,
    write_policy,
)
from tests.integration.test_crypto import GpgKey
from tests.integration.test_encrypted_backups import operator_home, plain_gpg, recipient_key

__all__ = ["operator_home", "recipient_key"]  # fixtures of test_encrypted_backups.py

MemberKind = Literal["file", "dir", "symlink", "hardlink", "chardev", "fifo"]
_TAR_TYPES: dict[MemberKind, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}
# The manifest knows only files, directories and symlinks: special members are listed as
# the empty file they would read as, so that only their type can get them refused.
_MANIFEST_TYPES: dict[MemberKind, str] = {
    "file": "file",
    "dir": "dir",
    "symlink": "symlink",
    "hardlink": "file",
    "chardev": "file",
    "fifo": "file",
}


def write_sidecar(archive_path: Path) -> None:
    """Write the ``sha256sum`` sidecar of *archive_path* from its current bytes."""
    digest = hashlib.sha256(archive_path.read_bytes()).hexdigest()
    sidecar = archive_path.with_name(archive_path.name + ".sha256")
    sidecar.write_text(f"{digest}  {archive_path.name}\n")


@dataclass
class Member:
    """One tar member held in memory: its header and, for a regular file, its bytes."""

    info: tarfile.TarInfo
    data: bytes | None


class ArchiveEditor:
    """A stored gzip backup opened for rewriting: its members and its manifest as JSON.

    Change ``members`` and ``manifest`` (the one inside), then :meth:`save`: the archive is
    written again under the same name, the manifest inside and the one beside it both
    from ``manifest`` (unless ``beside`` is set), and the sidecar recomputed. With
    *signer* (the test's temp dir, which holds its key) the backup is signed again.
    """

    def __init__(self, archive_path: Path, signer: Path | None = None) -> None:
        self.path = archive_path
        self.signer = signer
        self.top = archive_path.name.removesuffix(".tar.gz")
        self.members: list[Member] = []
        with tarfile.open(archive_path, "r:gz") as tar:
            for info in tar:
                extracted = tar.extractfile(info) if info.isreg() else None
                data = extracted.read() if extracted is not None else None
                self.members.append(Member(info, data))
        self.manifest: dict[str, Any] = json.loads(self.content(MANIFEST_NAME))
        self.beside: dict[str, Any] | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path.with_name(f"{self.top}.manifest.json")

    def _member(self, relative: str) -> Member:
        name = f"{self.top}/{relative}"
        return next(member for member in self.members if member.info.name == name)

    def content(self, relative: str) -> bytes:
        """Return the bytes of the regular file *relative* (below the top directory)."""
        data = self._member(relative).data
        assert data is not None, relative
        return data

    def entry(self, relative: str) -> dict[str, Any]:
        """Return the manifest entry of *relative*."""
        entries: list[dict[str, Any]] = self.manifest["files"]
        return next(entry for entry in entries if entry["path"] == relative)

    def add(
        self,
        relative: str,
        kind: MemberKind,
        data: bytes = b"",
        link: str = "",
        *,
        listed: bool = True,
        name: str | None = None,
    ) -> None:
        """Add a member after every data member; list it in the manifest when *listed*.

        *name* replaces the member's full name in the tar (``<top>/<relative>``), for
        names that cannot sit below the top directory.
        """
        info = tarfile.TarInfo(name or f"{self.top}/{relative}")
        info.type = _TAR_TYPES[kind]
        info.mode = 0o777 if kind == "symlink" else 0o644
        info.mtime = int(time.time())
        info.uid, info.gid = os.getuid(), os.getgid()
        info.linkname = link
        if kind == "chardev":
            info.devmajor, info.devminor = 1, 3  # /dev/null
        content = data if kind == "file" else None
        info.size = len(content) if content is not None else 0
        # Just before manifest.json, so the hostile member comes after all the good ones.
        self.members.insert(len(self.members) - 1, Member(info, content))
        if not listed:
            return
        root = self.entry(relative.split("/", 1)[0])
        self.manifest["files"].append(
            {
                "path": relative,
                "type": _MANIFEST_TYPES[kind],
                "origin": f"{root['origin']}{relative.removeprefix(root['path'])}",
                "size": info.size,
                "mode": info.mode,
                "mtime": float(info.mtime),
                "uid": info.uid,
                "gid": info.gid,
                "sha256": hashlib.sha256(data).hexdigest()
                if kind not in ("dir", "symlink")
                else None,
                "link": link or None,
            }
        )

    def replace(self, relative: str, data: bytes, *, listed: bool = True) -> None:
        """Give the file *relative* new bytes; with *listed*, its manifest entry follows."""
        member = self._member(relative)
        old_size = len(member.data or b"")
        member.data = data
        if listed:
            entry = self.entry(relative)
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            entry["size"] = len(data)
            self.manifest["file_bytes"] += len(data) - old_size

    def save(self, *, sidecar: bool = True) -> None:
        """Write the archive, both manifests and (with *sidecar*) the sidecar again."""
        inside = json.dumps(self.manifest, indent=1).encode()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            for member in self.members:
                info = copy.copy(member.info)
                data = inside if info.name == f"{self.top}/{MANIFEST_NAME}" else member.data
                if data is not None:
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        self.path.write_bytes(buffer.getvalue())
        beside = self.manifest if self.beside is None else self.beside
        self.manifest_path.write_bytes(json.dumps(beside, indent=1).encode())
        self.seal(sidecar=sidecar)

    def seal(self, *, sidecar: bool = True) -> None:
        """Write the sidecar (with *sidecar*) from the archive's bytes; sign again if set to."""
        if sidecar:
            write_sidecar(self.path)
        if self.signer is not None:
            resign(self.path, self.signer)


# --- the hostile edits: each leaves the archive consistent but for the hostile part -----


def absolute_member(editor: ArchiveEditor) -> None:
    editor.add("evil", "file", b"owned\n", listed=False, name="/etc/evil")
    editor.save()


def dotdot_member(editor: ArchiveEditor) -> None:
    editor.add("evil", "file", b"owned\n", listed=False, name=f"{editor.top}/../../evil")
    editor.save()


def symlink_then_file_through_it(editor: ArchiveEditor) -> None:
    editor.add("data/escape", "symlink", link="/etc")
    editor.add("data/escape/cron", "file", b"* * * * * root sh -c owned\n")
    editor.save()


def file_through_dotdot_symlink(editor: ArchiveEditor) -> None:
    editor.add("data/up", "symlink", link="../../../..")
    editor.add("data/up/evil", "file", b"owned\n")
    editor.save()


def hardlink_member(editor: ArchiveEditor) -> None:
    editor.add("data/passwd", "hardlink", link="/etc/passwd")
    editor.save()


def device_member(editor: ArchiveEditor) -> None:
    editor.add("data/null", "chardev")
    editor.save()


def fifo_member(editor: ArchiveEditor) -> None:
    editor.add("data/pipe", "fifo")
    editor.save()


def member_not_in_manifest(editor: ArchiveEditor) -> None:
    editor.add("data/stowaway.txt", "file", b"not listed\n", listed=False)
    editor.save()


def content_differs_from_manifest(editor: ArchiveEditor) -> None:
    original = editor.content("data/notes.txt")
    editor.replace("data/notes.txt", b"HELLO\n" + original[6:], listed=False)
    editor.save()


def checksum_mismatch(editor: ArchiveEditor) -> None:
    original = editor.content("data/notes.txt")
    editor.replace("data/notes.txt", b"HELLO\n" + original[6:])
    editor.save(sidecar=False)


def truncated_archive(editor: ArchiveEditor) -> None:
    editor.save()
    data = editor.path.read_bytes()
    editor.path.write_bytes(data[: len(data) // 2])
    editor.seal()


def manifest_inside_differs(editor: ArchiveEditor) -> None:
    editor.beside = copy.deepcopy(editor.manifest)
    editor.manifest["host"] = "elsewhere"
    editor.save()


def truncated_tar_in_sound_gzip(editor: ArchiveEditor) -> None:
    editor.save()
    tar_bytes = gzip.decompress(editor.path.read_bytes())
    editor.path.write_bytes(gzip.compress(tar_bytes[: len(tar_bytes) // 2]))
    editor.seal()


def manifest_member_left_out(editor: ArchiveEditor) -> None:
    editor.members.pop()  # manifest.json, the last member: the tar just ends before it
    editor.save()


def duplicate_member(editor: ArchiveEditor) -> None:
    editor.add("data/notes.txt", "file", editor.content("data/notes.txt"), listed=False)
    editor.save()


def entry_listed_twice(editor: ArchiveEditor) -> None:
    # One member, two manifest entries that disagree: restore checked the last one only.
    twin = dict(editor.entry("data/notes.txt"), mode=0o4755, uid=0, gid=0)
    editor.manifest["files"].append(twin)
    editor.save()


def origin_outside_policy(editor: ArchiveEditor) -> None:
    editor.entry("memory")["origin"] = "/etc/cron.d"
    editor.save()


def file_through_symlink_chain(editor: ArchiveEditor) -> None:
    # Each link alone resolves inside data/, but data/a goes through data/nested/up
    # (which is data/ itself) and one level up: data/a is the directory holding data/.
    editor.add("data/nested/up", "symlink", link="..")
    editor.add("data/a", "symlink", link="nested/up/..")
    editor.add("data/a/evil", "file", b"owned\n")
    editor.save()


def origin_inside_another_unit(editor: ArchiveEditor) -> None:
    # memory/ put back inside data/: staged in a tree data's swap replaces, and through
    # data's symlinks it could land anywhere.
    editor.entry("memory")["origin"] = f"{editor.entry('data')['origin']}/memory"
    editor.save()


def malformed_sparse_map(editor: ArchiveEditor) -> None:
    # A GNU sparse 1.0 member whose map promises three runs and holds one number.
    info = tarfile.TarInfo(f"{editor.top}/data/GNUSparseFile.0/holes.img")
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": f"{editor.top}/data/holes.img",
        "GNU.sparse.realsize": "4096",
    }
    data = b"3\n0\n".ljust(tarfile.BLOCKSIZE, b"\0")
    info.size = len(data)
    editor.members.insert(len(editor.members) - 1, Member(info, data))
    editor.save()


def mtime_not_a_number(editor: ArchiveEditor) -> None:
    # restore sets the exact pax mtime: a record that is no number is refused, not a crash.
    info = editor._member("data/notes.txt").info
    info.mtime = 0  # whole seconds: tarfile writes no mtime record over the planted one
    info.pax_headers = {"mtime": "nan"}
    editor.save()


@dataclass(frozen=True)
class Hostile:
    """One hostile archive: how it is made and what the refusal must name."""

    id: str
    edit: Callable[[ArchiveEditor], None]
    refusal: str
    options: tuple[str, ...] = ()
    where: tuple[str, ...] = ("live", "to")
    """Where it is hostile: live restore, --to DIR or both."""


HOSTILE = [
    Hostile("absolute-path", absolute_member, "'/etc/evil' is outside"),
    Hostile("dotdot-path", dotdot_member, "/../../evil' is outside"),
    Hostile(
        "file-through-absolute-symlink",
        symlink_then_file_through_it,
        "data/escape/cron lies below a symlink",
    ),
    Hostile(
        "file-through-symlink-when-outside-symlinks-allowed",
        symlink_then_file_through_it,
        "data/escape/cron lies below a symlink",
        ("--allow-outside-symlinks",),
    ),
    Hostile("file-through-dotdot-symlink", file_through_dotdot_symlink, "data/up/evil lies below"),
    Hostile("file-through-symlink-chain", file_through_symlink_chain, "data/a/evil lies below"),
    Hostile("origin-inside-another", origin_inside_another_unit, "would be restored inside data"),
    Hostile("hardlink", hardlink_member, "data/passwd is a hard link"),
    Hostile("character-device", device_member, "data/null is a character device"),
    Hostile("fifo", fifo_member, "data/pipe is a FIFO"),
    Hostile(
        "fifo-in-a-component-not-restored",
        fifo_member,
        "data/pipe is a FIFO",
        ("--only", "config"),
    ),
    Hostile("member-not-in-manifest", member_not_in_manifest, "data/stowaway.txt is not in"),
    Hostile("duplicate-member", duplicate_member, "data/notes.txt appears twice"),
    Hostile("entry-listed-twice", entry_listed_twice, "data/notes.txt is listed twice"),
    Hostile("content-not-manifest-sha256", content_differs_from_manifest, "data/notes.txt does"),
    Hostile("checksum-mismatch", checksum_mismatch, "checksum mismatch"),
    Hostile("truncated", truncated_archive, "unreadable archive"),
    Hostile("truncated-tar-in-sound-gzip", truncated_tar_in_sound_gzip, "unreadable archive"),
    Hostile("ends-before-manifest", manifest_member_left_out, "no manifest.json inside"),
    Hostile("malformed-sparse-map", malformed_sparse_map, "unreadable archive"),
    Hostile("pax-mtime-nan", mtime_not_a_number, "data/notes.txt: its mtime 'nan' is no time"),
    Hostile("manifest-inside-differs", manifest_inside_differs, "manifest inside differs"),
    Hostile(
        "origin-outside-policy",
        origin_outside_policy,
        "puts memory back to /etc/cron.d, which the policy does not back up",
        where=("live",),
    ),
]
HOSTILE_PARAMS = [
    pytest.param(hostile, where, id=f"{hostile.id}-{where}")
    for hostile in HOSTILE
    for where in hostile.where
]

TreeState = dict[str, tuple[str, int, str, float | None]]


def tree_state(root: Path) -> TreeState:
    """Describe everything below *root*: type, mode, content or link, mtime (not for dirs).

    A directory's mtime is left out: restore stages beside its destination, so creating
    and removing the staging directory moves the parent's mtime, by design.
    """
    state: TreeState = {}
    for path in sorted(root.rglob("*")):
        status = path.lstat()
        relative = str(path.relative_to(root))
        mode = stat.S_IMODE(status.st_mode)
        if stat.S_ISLNK(status.st_mode):
            state[relative] = ("symlink", mode, str(path.readlink()), status.st_mtime)
        elif stat.S_ISDIR(status.st_mode):
            state[relative] = ("dir", mode, "", None)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[relative] = ("file", mode, digest, status.st_mtime)
    return state


def without_dirs(state: TreeState) -> TreeState:
    """Return *state* without its directories (see test_refused_restore_to_dir_...)."""
    return {path: found for path, found in state.items() if found[0] != "dir"}


def backup_sandbox(config: Path, sandbox: Sandbox) -> ArchiveEditor:
    """Back up *sandbox* with the CLI; return the new archive opened for rewriting."""
    result = run_cli("backup", config=config)
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip()
    return ArchiveEditor(sandbox.backup_dir / f"{name}.tar.gz", signer=sandbox.root)


def staging_leftovers(tmp_path: Path) -> list[Path]:
    return [*tmp_path.rglob(".sovbackupd-restore-*"), *tmp_path.rglob(".staging")]


@pytest.mark.parametrize(("hostile", "where"), HOSTILE_PARAMS)
def test_hostile_archive_is_refused_before_anything_is_written(
    tmp_path: Path, sandbox: Sandbox, hostile: Hostile, where: str
) -> None:
    """A hostile archive is refused with one error line; live data and --to DIR are untouched."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    hostile.edit(editor)
    destination = tmp_path / "restored"
    destination.mkdir()
    (destination / "already-there.txt").write_text("kept\n")
    live_before = tree_state(sandbox.app)
    destination_before = tree_state(destination)
    stored_before = backup_files(sandbox.backup_dir)
    target = ("--yes",) if where == "live" else ("--to", str(destination))

    result = run_cli("restore", editor.top, *target, *hostile.options, config=config)

    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith("sovbackupd: error: "), result.stderr
    assert hostile.refusal in result.stderr_lines[0]
    assert tree_state(sandbox.app) == live_before
    assert without_dirs(tree_state(destination)) == without_dirs(destination_before)
    assert backup_files(sandbox.backup_dir) == stored_before, "no safety backup was taken"
    assert staging_leftovers(tmp_path) == []


DEEP_PARAMS = [
    pytest.param(hostile, id=hostile.id)
    for hostile in HOSTILE
    if "to" in hostile.where and not hostile.options
]
"""The archives restore --to refuses whatever the policy: verify --deep must fail them too."""


@pytest.mark.parametrize("hostile", DEEP_PARAMS)
def test_verify_deep_fails_every_archive_restore_refuses(
    tmp_path: Path, sandbox: Sandbox, hostile: Hostile
) -> None:
    """A deep verify calls no archive ok that restore or test-restore would refuse."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    hostile.edit(editor)

    result = run_cli("verify", editor.top, "--deep", config=config)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert hostile.refusal in result.stderr_lines[0], result.stderr


def test_rewritten_archive_without_hostile_member_restores(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The rewriting itself is sound: a rewritten but unaltered archive restores under --to."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    editor.save()
    destination = tmp_path / "restored"

    result = run_cli("restore", editor.top, "--to", str(destination), config=config)

    assert result.returncode == 0, result.stderr
    restored = destination / str(sandbox.app).lstrip("/")
    assert (restored / "data" / "notes.txt").read_text() == "hello\n" * 1000
    assert staging_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "edit",
    [checksum_mismatch, member_not_in_manifest],
    ids=["checksum-mismatch", "not-in-manifest"],
)
def test_refused_restore_to_dir_leaves_no_directories_behind(
    tmp_path: Path, sandbox: Sandbox, edit: Callable[[ArchiveEditor], None]
) -> None:
    """A refused restore --to DIR leaves DIR exactly as it was, without new empty directories."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    edit(editor)
    destination = tmp_path / "restored"
    destination.mkdir()
    (destination / "already-there.txt").write_text("kept\n")

    result = run_cli("restore", editor.top, "--to", str(destination), config=config)

    assert result.returncode == 1, result.stdout
    assert sorted(path.name for path in destination.iterdir()) == ["already-there.txt"]


def test_restore_never_moves_excluded_files_through_a_restored_symlink(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Files the excludes kept out of backups are never moved through a symlink restore created."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    outside = tmp_path / "outside"
    outside.mkdir()
    editor.add("data/escape", "symlink", link=str(outside))
    editor.save()
    (sandbox.app / "data" / "escape").mkdir()
    (sandbox.app / "data" / "escape" / "cache.tmp").write_text("excluded from backups\n")

    result = run_cli(
        "restore", editor.top, "--yes", "--allow-outside-symlinks", "--no-safety-backup",
        config=config,
    )  # fmt: skip

    assert "Traceback" not in result.stderr
    assert list(outside.iterdir()) == []


# --- symlinks whose target lies outside: restored as links, as tar does ------------------

OUTSIDE_LINKS = {
    "absolute": {"data/abs_link": "/etc/hostname"},
    "absolute-dir": {"data/abs_dir": "/etc"},
    "dotdot": {"data/up": "../../../.."},
    "dangling": {"data/nowhere": "no/such/file"},
    "chain": {"data/nested/up": "..", "data/a": "nested/up/.."},
}
POINTING_OUTSIDE = {"data/abs_link", "data/abs_dir", "data/up", "data/a"}
"""The links above whose target leaves data/, so that the plan notes them."""


def add_links(editor: ArchiveEditor, links: dict[str, str]) -> None:
    for relative, target in links.items():
        editor.add(relative, "symlink", link=target)
    editor.save()


@pytest.mark.parametrize("links", OUTSIDE_LINKS.values(), ids=OUTSIDE_LINKS.keys())
def test_outside_symlinks_restore_as_links_with_a_note_and_block_nothing(
    tmp_path: Path, sandbox: Sandbox, links: dict[str, str]
) -> None:
    """A symlink pointing outside data/ comes back as that link; --only, --to, --dry-run work."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    add_links(editor, links)
    destination = tmp_path / "restored"

    dry_run = run_cli("restore", editor.top, "--dry-run", config=config)
    to_dir = run_cli("restore", editor.top, "--to", str(destination), config=config)
    only_sqlite = run_cli(
        "restore", editor.top, "--only", "sqlite", "--yes", "--no-safety-backup", config=config
    )
    deprecated = run_cli(
        "restore", editor.top, "--to", str(tmp_path / "again"), "--allow-outside-symlinks",
        config=config,
    )  # fmt: skip

    for result in (dry_run, to_dir, only_sqlite, deprecated):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    for relative, target in links.items():
        note = f"note: {relative} -> {target} points outside data; restored as a link"
        assert (note in dry_run.stdout) == (relative in POINTING_OUTSIDE), dry_run.stdout
    restored = destination / str(sandbox.app).lstrip("/")
    for relative, target in links.items():
        assert str((restored / relative).readlink()) == target
    assert staging_leftovers(tmp_path) == []


def test_outside_symlink_blocks_neither_only_redis_nor_test_restore(
    tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    """With absolute links in data/, --only redis and test-restore pass; nothing outside changes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("kept\n")
    data = policy_data(sandbox, redis_server, restore={"stop": [["true"]], "start": [["true"]]})
    config = write_policy(tmp_path / "policy.yaml", data)
    editor = backup_sandbox(config, sandbox)
    add_links(editor, {"data/abs_link": "/etc/hostname", "data/abs_dir": str(outside)})
    outside_before = tree_state(outside)
    redis_server.stop()

    only_redis = run_cli(
        "restore", editor.top, "--only", "redis", "--yes", "--no-safety-backup", config=config
    )
    drill = run_cli("test-restore", editor.top, config=config)

    assert only_redis.returncode == 0, only_redis.stderr
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert f"test restore of {editor.top} passed" in drill.stdout
    assert tree_state(outside) == outside_before
    assert not (sandbox.backup_dir / ".staging").exists()
    assert staging_leftovers(tmp_path) == []


# --- manifest fields out of their bounds: one error naming the backup and the field ----


def notes_index(editor: ArchiveEditor) -> int:
    files: list[dict[str, Any]] = editor.manifest["files"]
    return next(index for index, entry in enumerate(files) if entry["path"] == "data/notes.txt")


def sqlite_details(editor: ArchiveEditor) -> dict[str, Any]:
    sources: list[dict[str, Any]] = editor.manifest["sources"]
    found: dict[str, Any] = next(s for s in sources if s["component"] == "sqlite")["details"]
    return found


@dataclass(frozen=True)
class Forged:
    """One manifest field set out of bounds, in both manifests, and the field it names."""

    id: str
    edit: Callable[[ArchiveEditor], str]
    """Change the field in ``editor.manifest``; return the field's path as the error names it."""


def _files_field(field_name: str, value: object) -> Callable[[ArchiveEditor], str]:
    def edit(editor: ArchiveEditor) -> str:
        index = notes_index(editor)
        editor.manifest["files"][index][field_name] = value
        return f"files[{index}].{field_name}"

    return edit


def _databases_list(editor: ArchiveEditor) -> str:
    sqlite_details(editor)["databases"] = []
    return ".details.databases"


def _negative_rows(editor: ArchiveEditor) -> str:
    for database in sqlite_details(editor)["databases"].values():
        database["rows"]["entries"] = -1
    return ".rows.entries: -1"


FORGED = [
    Forged("uid-2**40", _files_field("uid", 2**40)),
    Forged("uid-negative", _files_field("uid", -5)),
    Forged("gid-no-one", _files_field("gid", 2**32 - 1)),
    Forged("mtime-nan", _files_field("mtime", math.nan)),
    Forged("mtime-1e300", _files_field("mtime", 1e300)),
    Forged("mode-past-07777", _files_field("mode", 0o100644)),
    Forged("sha256-not-hex", _files_field("sha256", "z" * 64)),
    Forged("path-with-nul", _files_field("origin", "/opt/x\0y")),
    Forged("databases-a-list", _databases_list),
    Forged("row-count-negative", _negative_rows),
]


@pytest.mark.parametrize("forged", FORGED, ids=[forged.id for forged in FORGED])
def test_manifest_field_out_of_bounds_is_one_error_in_every_command(
    tmp_path: Path, sandbox: Sandbox, forged: Forged
) -> None:
    """restore, test-restore, verify and verify --deep all fail with one line naming the field."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    field = forged.edit(editor)
    editor.save()
    destination = tmp_path / "restored"

    restored = run_cli("restore", editor.top, "--to", str(destination), config=config)
    drill = run_cli("test-restore", editor.top, config=config)
    verified = run_cli("verify", editor.top, config=config)
    deep = run_cli("verify", editor.top, "--deep", config=config)

    for result in (restored, drill, verified, deep):
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    for result in (restored, verified, deep):
        assert len(result.stderr_lines) == 1, result.stderr
        assert result.stderr_lines[0].startswith(f"sovbackupd: error: backup {editor.top}: ")
        assert "manifest field " in result.stderr_lines[0]
        assert field in result.stderr_lines[0]
    assert f"FAIL archive: backup {editor.top}: manifest field" in drill.stdout
    assert field in drill.stdout
    assert not destination.exists()
    assert staging_leftovers(tmp_path) == []


def test_an_archive_renamed_as_another_backup_is_refused_naming_the_id(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A backup copied under a newer name (sidecar and manifest too) restores as nothing.

    Its members and manifest say they are the older backup: restored, verified or drilled
    under the new name, it would pass off the older data as the newer. Without its record
    it is unsigned; trusted as such, the manifest's id still refuses it.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    renamed = editor.top[:-1] + ("9" if editor.top[-1] != "9" else "8")
    copy_path = editor.path.with_name(f"{renamed}.tar.gz")
    copy_path.write_bytes(editor.path.read_bytes())
    write_sidecar(copy_path)
    copy_path.with_name(f"{renamed}.manifest.json").write_bytes(editor.manifest_path.read_bytes())
    destination = tmp_path / "restored"

    trust = "--trust-unsigned"
    restored = run_cli("restore", renamed, "--to", str(destination), trust, config=config)
    drill = run_cli("test-restore", renamed, trust, config=config)
    deep = run_cli("verify", renamed, "--deep", trust, config=config)

    for result in (restored, drill, deep):
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    for result in (restored, deep):
        assert len(result.stderr_lines) == 1, result.stderr
        assert f"backup {renamed}: manifest field id: '{editor.top}'" in result.stderr_lines[0]
    assert "manifest field id" in drill.stdout
    assert not destination.exists()


# --- restore writes nothing through a link, and nothing outside its plan ---------------

ROOT_KEY_TEXT = "-----BEGIN OPENSSH PRIVATE KEY-----\nroot's\n"


def make_victim(tmp_path: Path) -> Path:
    """Return a root-only directory that no restore may touch, holding an ``id_rsa.tmp``.

    The name matches the sandbox's ``*.tmp`` exclude, so that carrying excluded files over
    from a replaced directory would pick it up; numbered subdirectories stand where a
    staging directory keeps its units.
    """
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "id_rsa.tmp").write_text(ROOT_KEY_TEXT)
    for index in range(12):
        (victim / str(index)).mkdir()
        (victim / str(index) / "id_rsa.tmp").write_text(ROOT_KEY_TEXT)
    return victim


def stop_swapping(tmp_path: Path, app: Path, target: str) -> list[list[str]]:
    """Return restore.stop: move *target* (a glob in *app*) aside, a victim link in its place.

    Run between plan and swap, it is the race an attacker would win.
    """
    script = tmp_path / "swap.sh"
    script.write_text(
        'set -e\ncd "$1"\nfor found in $2; do mv "$found" "$found.moved"; '
        'ln -s "$3" "$found"; done\n'
    )
    return [["sh", str(script), str(app), target, str(tmp_path / "victim")]]


@pytest.mark.parametrize("target", ["data", ".sovbackupd-restore-*"], ids=["data", "staging"])
def test_swapped_for_a_symlink_between_plan_and_swap_is_refused(
    tmp_path: Path, sandbox: Sandbox, target: str
) -> None:
    """A destination or staging dir swapped for a symlink before the swap: refused, nothing moved.

    Invariant: the swap acts only on what the restore opened; the victim's files stay
    where they are, and the live tree keeps what the stop command left.
    """
    victim = make_victim(tmp_path)
    stop = stop_swapping(tmp_path, sandbox.app, target)
    data = policy_data(sandbox, None, restore={"stop": stop, "start": [["true"]]})
    config = write_policy(tmp_path / "policy.yaml", data)
    editor = backup_sandbox(config, sandbox)
    victim_before = tree_state(victim)

    result = run_cli(
        "restore", editor.top, "--only", "data", "--yes", "--no-safety-backup", config=config
    )
    live_after_stop = tree_state(sandbox.app)

    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    assert "changed since the restore opened it" in result.stderr_lines[0]
    assert tree_state(victim) == victim_before
    assert tree_state(sandbox.app) == live_after_stop
    assert (sandbox.app / "data").is_symlink() == (target == "data")


TO_ROOTS = {"root": "/", "root-through-dotdot": "/tmp/.."}


@pytest.mark.parametrize("to", TO_ROOTS.values(), ids=TO_ROOTS.keys())
def test_restore_to_the_root_is_refused(tmp_path: Path, sandbox: Sandbox, to: str) -> None:
    """--to / (or a DIR that resolves to /) is no live restore in disguise: refused, exit 2."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    (sandbox.app / "data" / "since-backup.txt").write_text("new\n")
    live_before = tree_state(sandbox.app)

    result = run_cli("restore", editor.top, "--to", to, config=config)

    assert result.returncode == 2, result.stdout
    assert len(result.stderr_lines) == 1, result.stderr
    assert "--to" in result.stderr_lines[0]
    assert tree_state(sandbox.app) == live_before


def _live_relation(sandbox: Sandbox, tmp_path: Path) -> dict[str, Path]:
    return {
        "contains-live": sandbox.root / "opt",
        "equals-live": sandbox.app / "data",
        "inside-live": sandbox.app / "memory" / "inspect",
        "inside-backup-dir": sandbox.backup_dir / "inspect",
        "symlink-to-live": tmp_path / "innocent",
    }


@pytest.mark.parametrize(
    "relation",
    ["contains-live", "equals-live", "inside-live", "inside-backup-dir", "symlink-to-live"],
)
def test_restore_to_a_dir_overlapping_a_live_path_is_refused(
    tmp_path: Path, sandbox: Sandbox, relation: str
) -> None:
    """--to DIR that contains, equals or lies inside a live path (backup_dir too): exit 2."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    to = _live_relation(sandbox, tmp_path)[relation]
    if relation == "symlink-to-live":
        to.symlink_to(sandbox.app)
    live_before = tree_state(sandbox.app)

    result = run_cli("restore", editor.top, "--to", str(to), config=config)

    assert result.returncode == 2, result.stdout
    assert len(result.stderr_lines) == 1, result.stderr
    assert "live path" in result.stderr_lines[0]
    assert tree_state(sandbox.app) == live_before


def test_restore_to_dir_follows_no_symlink_inside_it(tmp_path: Path, sandbox: Sandbox) -> None:
    """DIR/tmp -> /tmp must not make a restore --to DIR replace the live tree."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    (sandbox.app / "data" / "since-backup.txt").write_text("new\n")
    live_before = tree_state(sandbox.app)
    destination = tmp_path / "restored"
    destination.mkdir()
    top = Path(str(sandbox.app).lstrip("/")).parts[0]
    (destination / top).symlink_to(f"/{top}")

    result = run_cli("restore", editor.top, "--to", str(destination), config=config)

    assert result.returncode == 1, result.stdout
    assert len(result.stderr_lines) == 1, result.stderr
    assert f"{destination / top} is a symlink" in result.stderr_lines[0]
    assert tree_state(sandbox.app) == live_before
    assert staging_leftovers(tmp_path) == []


def test_forged_origin_cannot_lead_restore_to_dir_outside_it(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A forged origin through a symlink inside DIR writes nothing outside DIR."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    editor.entry("memory")["origin"] = "/escape/memory"
    editor.save()
    outside = tmp_path / "outside"
    outside.mkdir()
    destination = tmp_path / "restored"
    destination.mkdir()
    (destination / "escape").symlink_to(outside)

    result = run_cli("restore", editor.top, "--to", str(destination), config=config)

    assert result.returncode == 1, result.stdout
    assert len(result.stderr_lines) == 1, result.stderr
    assert "is a symlink" in result.stderr_lines[0]
    assert list(outside.iterdir()) == []


def symlink_sources(sandbox: Sandbox) -> None:
    """Make the sandbox's ``data`` and ``.env`` symlinks into ``vol/``, as a volume mount."""
    volume = sandbox.app / "vol"
    volume.mkdir()
    (sandbox.app / "data").rename(volume / "data")
    (sandbox.app / "data").symlink_to("vol/data")
    (sandbox.app / ".env").rename(volume / "env")
    (sandbox.app / ".env").symlink_to("vol/env")


def test_symlinked_sources_get_a_safety_backup_of_what_they_lead_to(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """With data -> vol/data and .env -> vol/env, the safety backup holds the changes since."""
    symlink_sources(sandbox)
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    (sandbox.app / "vol" / "data" / "since-backup.txt").write_text("written after\n")
    (sandbox.app / "vol" / "env").write_text("SECRET_KEY=rotated\n")

    dry_run = run_cli("restore", editor.top, "--dry-run", config=config)
    result = run_cli("restore", editor.top, "--only", "config,data", "--yes", config=config)

    assert result.returncode == 0, result.stderr
    assert "nothing live exists yet" not in dry_run.stdout
    assert f"{sandbox.app / 'data'} -> {sandbox.app / 'vol' / 'data'}" in dry_run.stdout
    assert (sandbox.app / "data").is_symlink()
    assert (sandbox.app / ".env").is_symlink()
    assert not (sandbox.app / "vol" / "data" / "since-backup.txt").exists()
    safety = next(line for line in result.stdout.splitlines() if line.startswith("safety"))
    safety_name = safety.split()[6]
    restored = tmp_path / "safety"
    again = run_cli("restore", safety_name, "--to", str(restored), config=config)
    assert again.returncode == 0, again.stderr
    inner = restored / str(sandbox.app).lstrip("/")
    assert (inner / "data" / "since-backup.txt").read_text() == "written after\n"
    assert (inner / ".env").read_text() == "SECRET_KEY=rotated\n"


def test_symlinked_source_leading_to_a_dir_its_owner_does_not_own_is_refused(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The app dir's owner points data at a root-owned dir: root's restore does not replace it."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    foreign = tmp_path / "etc-like"
    foreign.mkdir()
    (foreign / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    owner = 4242
    os.chown(sandbox.app, owner, owner)
    data = sandbox.app / "data"
    data.rename(sandbox.app / "data.old")
    data.symlink_to(foreign)
    os.lchown(data, owner, owner)
    foreign_before = tree_state(foreign)

    result = run_cli(
        "restore", editor.top, "--only", "data", "--yes", "--no-safety-backup", config=config
    )

    assert result.returncode == 1, result.stdout
    assert len(result.stderr_lines) == 1, result.stderr
    assert f"{data} -> {foreign}" in result.stderr_lines[0]
    assert tree_state(foreign) == foreign_before


def add_setuid_shell(editor: ArchiveEditor) -> None:
    editor.add("data/suidsh", "file", b"#!/bin/sh\nexec sh\n")
    entry = editor.entry("data/suidsh")
    entry["mode"], entry["uid"], entry["gid"] = 0o6755, 0, 0
    editor._member("data/suidsh").info.mode = 0o6755
    editor.save()


@pytest.mark.parametrize("keep", [False, True], ids=["dropped", "kept-with-flag"])
def test_setuid_bits_are_restored_only_with_keep_setuid(
    tmp_path: Path, sandbox: Sandbox, keep: bool
) -> None:
    """A setuid/setgid file comes back without those bits, and the plan says so."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    add_setuid_shell(editor)
    destination = tmp_path / "restored"
    flags = ("--keep-setuid",) if keep else ()

    dry_run = run_cli("restore", editor.top, "--dry-run", *flags, config=config)
    result = run_cli("restore", editor.top, "--to", str(destination), *flags, config=config)

    assert result.returncode == 0, result.stderr
    restored = destination / str(sandbox.app).lstrip("/") / "data" / "suidsh"
    mode = stat.S_IMODE(restored.stat().st_mode)
    assert mode == (0o6755 if keep else 0o755)
    assert ("setuid/setgid bits dropped" in dry_run.stdout) == (not keep), dry_run.stdout


def test_block_device_member_is_refused(tmp_path: Path, sandbox: Sandbox) -> None:
    """A block device member is refused as the character devices and FIFOs are."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    editor.add("data/disk", "file")
    editor._member("data/disk").info.type = tarfile.BLKTYPE
    editor.save()

    result = run_cli("restore", editor.top, "--to", str(tmp_path / "restored"), config=config)

    assert result.returncode == 1, result.stdout
    assert "data/disk is a block device: refused" in result.stderr_lines[0]


@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "unauthenticated"])
def test_owners_come_from_the_archive_only_when_it_is_authenticated(
    tmp_path: Path, sandbox: Sandbox, authenticated: bool
) -> None:
    """As root, a file the archive gives to uid 4242 is 4242's only from an authenticated backup."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    editor.add("data/given-away", "file", b"whose?\n")
    editor.entry("data/given-away")["uid"] = editor.entry("data/given-away")["gid"] = 4242
    editor.save()
    policy = policy_config.load(config, {})
    stored = Store(policy.backup_dir, policy.name_prefix).find(editor.top)
    destination = tmp_path / "restored"
    planned = restore.plan(policy, stored, to=destination)

    restore.run(policy, dataclasses.replace(planned, authenticated=authenticated))

    restored = destination / str(sandbox.app).lstrip("/") / "data" / "given-away"
    expected = 4242 if authenticated and os.geteuid() == 0 else os.geteuid()
    assert (restored.stat().st_uid, restored.stat().st_gid) == (expected, expected)
    assert ("not authenticated" in " ".join(planned.steps())) is False
    steps = dataclasses.replace(planned, authenticated=authenticated).steps()
    assert any("not authenticated" in step for step in steps) == (not authenticated)


def test_refused_restore_to_a_new_dir_removes_every_dir_it_made(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """DIR did not exist: a refused restore --to DIR leaves no DIR, however many units it opened."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    editor = backup_sandbox(config, sandbox)
    checksum_mismatch(editor)
    destination = tmp_path / "new" / "restored"

    result = run_cli("restore", editor.top, "--to", str(destination), config=config)

    assert result.returncode == 1, result.stdout
    assert "checksum mismatch" in result.stderr
    assert not (tmp_path / "new").exists()


# --- forgers without the key: a consistent rewrite, in every encryption mode ------------

EncryptionMode = Literal["plaintext", "passphrase", "public-key"]
Forger = Literal["record-kept", "record-removed", "own-key"]


@dataclass
class Modes:
    """The policies of one encryption mode: the server's, and the one that can decrypt."""

    config: Path
    reader: Path
    decrypt: list[str]
    encrypt: list[str]
    suffix: str


def encryption_modes(
    tmp_path: Path, sandbox: Sandbox, mode: EncryptionMode, key: GpgKey, home: Path
) -> Modes:
    """Write the policies of *mode*; return them with the gpg argv a forger would run."""
    if mode == "plaintext":
        config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
        return Modes(config, config, [], [], ".tar.gz")
    if mode == "passphrase":
        passphrase = tmp_path / "passphrase"
        passphrase.write_text("a forger who read the passphrase\n")
        passphrase.chmod(0o600)
        gpg = {"gpg": {"passphrase_file": str(passphrase)}}
        config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, encryption=gpg))
        with_passphrase = plain_gpg(home, "--passphrase-file", str(passphrase))
        return Modes(
            config,
            config,
            [*with_passphrase, "--decrypt"],
            [*with_passphrase, "--symmetric", "--cipher-algo", "AES256", "--output", "-"],
            ".tar.gz.gpg",
        )
    server = {"recipients": [key.fingerprint], "public_keys_file": str(key.public_file)}
    config = write_policy(
        tmp_path / "policy.yaml", policy_data(sandbox, None, encryption={"gpg": server})
    )
    reader = write_policy(
        tmp_path / "reader.yaml",
        policy_data(
            sandbox,
            None,
            encryption={"gpg": {**server, "secret_keys_file": str(key.secret_file)}},
        ),
    )
    # The forger needs only the public key; the test decrypts the real archive to save
    # building one from the plaintext manifest, which anyone could.
    for exported in (key.public_file, key.secret_file):
        subprocess.run(plain_gpg(home, "--import", str(exported)), capture_output=True, check=True)
    encrypt = ["--trust-model", "always", "--encrypt", "--recipient", key.fingerprint]
    return Modes(
        config,
        reader,
        plain_gpg(home, "--decrypt"),
        plain_gpg(home, *encrypt, "--output", "-"),
        ".tar.gz.gpg",
    )


def forge_setuid_shell(stored: Path, modes: Modes, work: Path) -> None:
    """Rewrite *stored* with data/suidsh (06755, root's) and data 0777: both manifests, sidecar."""
    name = stored.name.split(".tar")[0]
    plain = work / f"{name}.tar.gz"
    if modes.decrypt:
        decrypted = subprocess.run([*modes.decrypt, str(stored)], capture_output=True, check=True)
        plain.write_bytes(decrypted.stdout)
    else:
        plain.write_bytes(stored.read_bytes())
    editor = ArchiveEditor(plain)
    editor.add("data/suidsh", "file", b"#!/bin/sh\nexec /bin/sh -p\n")
    shell = editor.members[-2].info
    shell.mode, shell.uid, shell.gid = 0o6755, 0, 0
    editor.entry("data/suidsh").update(mode=0o6755, uid=0, gid=0)
    editor._member("data").info.mode = 0o777
    editor.entry("data")["mode"] = 0o777
    editor.save(sidecar=False)
    if modes.encrypt:
        encrypted = subprocess.run([*modes.encrypt, str(plain)], capture_output=True, check=True)
        stored.write_bytes(encrypted.stdout)
    else:
        stored.write_bytes(plain.read_bytes())
    write_sidecar(stored)
    archive.manifest_path(stored).write_bytes(editor.manifest_path.read_bytes())


FORGER_REFUSALS: dict[Forger, str] = {
    "record-kept": "is not what",
    "record-removed": "has no authentication record",
    "own-key": "signed with a key this host does not hold",
}


FORGERIES: list[tuple[EncryptionMode, Forger]] = [
    (mode, forger)
    for mode in ("plaintext", "passphrase", "public-key")
    for forger in sorted(FORGER_REFUSALS)
]


@pytest.mark.parametrize("forgery", FORGERIES, ids=["-".join(case) for case in FORGERIES])
def test_consistent_forgery_without_the_key_is_refused_by_verify_and_restore(
    tmp_path: Path,
    sandbox: Sandbox,
    recipient_key: GpgKey,
    operator_home: Path,
    forgery: tuple[EncryptionMode, Forger],
) -> None:
    """A forged setuid shell, sidecar and both manifests consistent, never passes or lands.

    verify --deep does not call it ok and restore --only data refuses it (exit 65) with
    one line, whether the forger kept the old record, removed it, or signed with a key
    of their own; the live data dir is left as it was.
    """
    mode, forger = forgery
    modes = encryption_modes(tmp_path, sandbox, mode, recipient_key, operator_home)
    name = run_cli("backup", config=modes.config).stdout.strip()
    stored = sandbox.backup_dir / f"{name}{modes.suffix}"
    work = tmp_path / "forger"
    work.mkdir()
    forge_setuid_shell(stored, modes, work)
    record = archive.auth_path(stored)
    if forger == "record-removed":
        record.unlink()
    elif forger == "own-key":
        created = datetime.fromisoformat(json.loads(record.read_text())["created"])
        auth.write(stored, name, created, ["manual"], auth.Key(os.urandom(32), work / "key"))
    live_before = tree_state(sandbox.app)

    deep = run_cli("verify", name, "--deep", config=modes.reader)
    restored = run_cli("restore", name, "--only", "data", "--yes", config=modes.reader)

    assert deep.returncode == 1, deep.stdout
    assert "ok" not in deep.stdout
    assert len(deep.stderr_lines) == 1, deep.stderr
    assert FORGER_REFUSALS[forger] in deep.stderr_lines[0]
    assert restored.returncode == 65, restored.stdout + restored.stderr
    assert len(restored.stderr_lines) == 1, restored.stderr
    assert restored.stderr_lines[0].startswith(f"sovbackupd: error: backup {name}")
    assert FORGER_REFUSALS[forger] in restored.stderr_lines[0]
    assert tree_state(sandbox.app) == live_before
    assert not (sandbox.app / "data" / "suidsh").exists()


def replay_newest(sandbox: Sandbox, old: str, record: bool) -> str:
    """Copy backup *old* under a name of now, rewritten to say so; return that name.

    The top directory, both manifests' id and created time, and the sidecar all name the
    copy; with *record* the old authentication record is copied beside it too.
    """
    time.sleep(1)  # a name of its own second, after every real backup's
    now = datetime.now(UTC)
    new = f"{old.rsplit('_', 2)[0]}_{now:%Y%m%d_%H%M%S}"
    copy_path = sandbox.backup_dir / f"{new}.tar.gz"
    editor = ArchiveEditor(sandbox.backup_dir / f"{old}.tar.gz")
    editor.path, editor.top = copy_path, new
    for member in editor.members:
        member.info.name = new + member.info.name.removeprefix(old)
    editor.manifest.update(id=new, created=now.isoformat())
    editor.save()
    if record:
        old_record = sandbox.backup_dir / f"{old}.auth.json"
        archive.auth_path(copy_path).write_bytes(old_record.read_bytes())
    return new


@pytest.mark.parametrize("record", [True, False], ids=["record-copied", "record-dropped"])
def test_replayed_old_backup_is_refused_by_list_test_restore_and_restore_latest(
    tmp_path: Path, sandbox: Sandbox, record: bool
) -> None:
    """An old backup passed off as the newest is flagged by list and refused by the rest.

    restore --latest would otherwise put the old content back over the newer.
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    old = run_cli("backup", config=config).stdout.strip()
    (sandbox.app / "data" / "notes.txt").write_text("written after the first backup\n")
    run_cli("backup", config=config)
    replayed = replay_newest(sandbox, old, record)
    live_before = tree_state(sandbox.app)

    listed = run_cli("list", config=config)
    drill = run_cli("test-restore", "--latest", config=config)
    restored = run_cli("restore", "--latest", "--yes", config=config)

    assert listed.returncode == 0, listed.stderr
    assert f"{replayed} is not authenticated" in listed.stderr
    assert drill.returncode == 1, drill.stdout + drill.stderr
    assert f"test restore of {replayed} FAILED" in drill.stdout
    assert restored.returncode == 65, restored.stdout + restored.stderr
    assert len(restored.stderr_lines) == 1, restored.stderr
    assert f"backup {replayed}" in restored.stderr_lines[0]
    assert tree_state(sandbox.app) == live_before


def test_retention_neither_counts_nor_deletes_a_forged_newest_backup(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A forged newest backup is kept for the operator and the real newest survives prune."""
    tiers = {"daily": {"schedule": "0 2 * * *", "keep": 1}}
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None, tiers=tiers))
    real = run_cli("backup", "--tier", "daily", config=config).stdout.strip()
    forged = replay_newest(sandbox, real, record=False)

    pruned = run_cli("prune", config=config)

    assert pruned.returncode == 0, pruned.stderr
    assert f"{forged} is not authenticated" in pruned.stderr
    left = {path.name.split(".")[0] for path in sandbox.backup_dir.glob("*.tar.gz")}
    assert left == {real, forged}


def test_first_backup_creates_the_key_once_and_plan_reports_authentication(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """The key appears 0400 at the first backup and stays; plan() says what the check found."""
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    key_path = key_file(sandbox.root)
    first = run_cli("backup", "-v", config=config)
    key_bytes = key_path.read_bytes()
    second = run_cli("backup", "-v", config=config)

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "auth.key_created" in first.stderr
    assert "auth.key_created" not in second.stderr
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o400
    assert key_path.read_bytes() == key_bytes
    policy = policy_config.load(config)
    stored = Store(policy.backup_dir, policy.name_prefix).find(second.stdout.strip())
    assert restore.plan(policy, stored, to=tmp_path / "to").authenticated is True
    archive.auth_path(stored.path).unlink()
    with pytest.raises(AuthError, match="no authentication record"):
        restore.plan(policy, stored, to=tmp_path / "to")
    trusted = restore.plan(policy, stored, to=tmp_path / "to", trust_unsigned=True)
    assert trusted.authenticated is False


@pytest.mark.parametrize("when", ["after-check", "after-plan"])
def test_files_swapped_after_the_authentication_check_are_refused(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A forgery swapped in once the record was checked is not what the restore uses.

    Invariant: restore plans from, and extracts, only bytes that hash to what the record
    vouched for. The race is simulated by forging the files (setuid shell, consistent
    sidecar and manifest, old record kept) right after ``auth.vouched`` returns, or
    between plan and run (the confirmation prompt's window).
    """
    config = write_policy(tmp_path / "policy.yaml", policy_data(sandbox, None))
    name = run_cli("backup", config=config).stdout.strip()
    policy = policy_config.load(config, {})
    stored = Store(policy.backup_dir, policy.name_prefix).find(name)
    work = tmp_path / "forger"
    work.mkdir()
    plaintext = Modes(config, config, [], [], ".tar.gz")
    live_before = tree_state(sandbox.app)

    if when == "after-check":
        checked = auth.vouched

        def vouched_then_swapped(
            archive_path: Path, backup: str, key: auth.Key | None
        ) -> tuple[auth.Status, dict[str, str]]:
            verdict = checked(archive_path, backup, key)
            forge_setuid_shell(stored.path, plaintext, work)
            return verdict

        monkeypatch.setattr(auth, "vouched", vouched_then_swapped)
        with pytest.raises(AuthError, match="changed after its authentication was checked"):
            restore.plan(policy, stored, only={"data"})
    else:
        planned = restore.plan(policy, stored, only={"data"})
        forge_setuid_shell(stored.path, plaintext, work)
        with pytest.raises(ArchiveError, match="checksum mismatch"):
            restore.run(policy, dataclasses.replace(planned, safety_sources=None))

    assert tree_state(sandbox.app) == live_before
    assert not (sandbox.app / "data" / "suidsh").exists()
