"""The one remover of restored and left-over trees: no link followed, no root override needed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovbackupd import tree
from tests.conftest import require_tool

NO_OVERRIDES = ("--inh-caps=-all", "--bounding-set=-all")
"""Root without a single capability: only the owner's permission bits count."""


def locked_tree(root: Path) -> Path:
    """Build under *root* a tree of 0555, 0000 and read-only entries; return its top."""
    top = root / "top"
    (top / "open" / "sealed" / "inner").mkdir(parents=True)
    (top / "open" / "sealed" / "inner" / "file").write_text("x")
    (top / "open" / "read-only.txt").write_text("x")
    (top / "open" / "read-only.txt").chmod(0o444)
    (top / "open" / "sealed" / "inner").chmod(0o000)
    (top / "open" / "sealed").chmod(0o000)
    (top / "open").chmod(0o555)
    top.chmod(0o555)
    return top


def remove_without_capabilities(path: Path) -> str:
    """Call tree.remove(*path*) in a child that holds no capability; return what it says."""
    code = (
        "from pathlib import Path; from sovbackupd import tree; "
        f"print(tree.remove(Path({str(path)!r})))"
    )
    completed = subprocess.run(
        [require_tool("setpriv"), *NO_OVERRIDES, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout.strip()


def test_remove_empties_0555_and_0000_dirs_without_dac_override(tmp_path: Path) -> None:
    """0555 and 0000 dirs and read-only files go, with no CAP_DAC_OVERRIDE or DAC_READ_SEARCH."""
    top = locked_tree(tmp_path)

    said = remove_without_capabilities(top)

    assert said == "None"
    assert not os.path.lexists(top)


def test_remove_never_follows_a_symlink_anywhere_in_the_tree(tmp_path: Path) -> None:
    """Links to a directory, to a file and at the top are removed as links; targets stay."""
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "kept.txt").write_text("kept\n")
    (outside / "deep").chmod(0o555)
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "to-dir").symlink_to(outside)
    (top / "sub" / "to-file").symlink_to(outside / "deep" / "kept.txt")
    (top / "sub" / "up").symlink_to("../..")
    link_at_top = tmp_path / "link"
    link_at_top.symlink_to(outside)

    assert tree.remove(top) is None
    assert tree.remove(link_at_top) is None

    assert not os.path.lexists(top)
    assert not os.path.lexists(link_at_top)
    assert (outside / "deep" / "kept.txt").read_text() == "kept\n"
    assert oct((outside / "deep").stat().st_mode & 0o777) == oct(0o555)


def test_remove_takes_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """A chain of directories deeper than Python's recursion limit is removed."""
    depth = sys.getrecursionlimit() + 100
    top = tmp_path / "top"
    top.mkdir()
    descriptor = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=descriptor)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = inner
    os.close(descriptor)

    assert tree.remove(top) is None
    assert not os.path.lexists(top)


def test_remove_of_a_missing_path_is_no_error(tmp_path: Path) -> None:
    """Removing what is not there returns None."""
    assert tree.remove(tmp_path / "missing" / "deeper") is None


def test_what_cannot_be_removed_is_returned_and_the_rest_goes(tmp_path: Path) -> None:
    """An entry the caller may not change is left and returned; its siblings are removed."""
    top = tmp_path / "top"
    foreign = top / "foreign"
    foreign.mkdir(parents=True)
    (foreign / "file").write_text("not ours\n")
    (top / "ours.txt").write_text("ours\n")
    os.chown(foreign, 12345, 12345)
    foreign.chmod(0o555)
    try:
        said = remove_without_capabilities(top)
    finally:
        foreign.chmod(0o755)

    assert "Permission denied" in said or "Operation not permitted" in said
    assert not (top / "ours.txt").exists()
    assert (foreign / "file").exists()


@pytest.fixture(autouse=True)
def _writable_afterwards(tmp_path: Path) -> Iterator[None]:
    """Leave tmp_path removable by pytest whatever a test left locked."""
    yield
    for directory, _, _ in os.walk(tmp_path):
        Path(directory).chmod(0o755)


def test_a_mount_point_inside_the_tree_is_never_entered(tmp_path: Path) -> None:
    """A bind mount below the tree (a leftover scratch, a staging dir) keeps its files.

    As ``rm --one-file-system`` would: the mount point is reported, what is mounted stays.
    """
    mount = require_tool("mount")
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("kept\n")
    top = tmp_path / "scratch"
    (top / "mnt").mkdir(parents=True)
    (top / "ours.txt").write_text("x")
    if subprocess.run([mount, "--bind", str(outside), str(top / "mnt")], check=False).returncode:
        pytest.skip("no bind mounts here")
    try:
        problem = tree.remove(top)
    finally:
        subprocess.run([require_tool("umount"), str(top / "mnt")], check=True)

    assert problem is not None
    assert (outside / "precious.txt").read_text() == "kept\n"
    assert sorted(path.name for path in top.iterdir()) == ["mnt"]
