"""The descriptor-relative primitives restore writes through: no link is ever followed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovbackupd import fsat
from sovbackupd.errors import UnsafePathError


@pytest.fixture(params=["openat2", "walk"])
def below(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the kernel's openat2 and with the walk a kernel without it takes."""
    if request.param == "walk":
        monkeypatch.setattr(fsat, "_openat2", lambda root, relative: None)
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[int]:
    descriptor = os.open(tmp_path, fsat.OPEN_PATH)
    yield descriptor
    os.close(descriptor)


def test_open_below_refuses_a_symlink_anywhere_in_the_path(
    tmp_path: Path, root: int, below: str
) -> None:
    """DIR/tmp -> /tmp: opening DIR/tmp/x below DIR is refused, naming the link."""
    (tmp_path / "tmp").symlink_to("/tmp")
    (tmp_path / "real" / "up").mkdir(parents=True)
    (tmp_path / "real" / "up" / "back").symlink_to("..")

    for relative, link in (("tmp/x", "tmp"), ("real/up/back/up", "real/up/back")):
        with pytest.raises(UnsafePathError, match=f"{tmp_path}/{link} is a symlink"):
            fsat.open_below(root, relative, str(tmp_path), create=True)
    assert not Path("/tmp/x").exists()


def test_open_below_creates_missing_dirs_and_removes_them(
    tmp_path: Path, root: int, below: str
) -> None:
    """Created directories are made below the root, and removed again innermost first."""
    opened = fsat.open_below(root, "a/b/c", str(tmp_path), create=True)
    try:
        assert fsat.anchored(opened.descriptor).resolve() == tmp_path / "a" / "b" / "c"
        opened.remove_created()
    finally:
        opened.close()
    if below == "walk":
        assert list(tmp_path.iterdir()) == []


def test_open_dir_refuses_a_symlink_and_a_dir_open_to_everyone(tmp_path: Path) -> None:
    """open_dir follows no link on the way from /, nor enters a world-writable, non-sticky dir."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "sticky").mkdir()
    (tmp_path / "sticky").chmod(0o1777)

    with pytest.raises(UnsafePathError, match="link is a symlink"):
        fsat.open_dir(tmp_path / "link")
    with pytest.raises(UnsafePathError, match="open is writable by every user"):
        fsat.open_dir(tmp_path / "open")
    fsat.open_dir(tmp_path / "sticky").close()


def test_exchange_swaps_two_names_in_two_open_dirs(tmp_path: Path) -> None:
    """renameat2(RENAME_EXCHANGE) through real dir descriptors swaps, and a link moves as one."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "tree").mkdir()
    (tmp_path / "one" / "tree" / "file").write_text("new")
    (tmp_path / "two" / "tree").symlink_to("/etc")
    first = os.open(tmp_path / "one", fsat.OPEN_PATH)
    second = os.open(tmp_path / "two", fsat.OPEN_PATH)
    try:
        assert fsat.exchange(first, "tree", second, "tree")
    finally:
        os.close(first)
        os.close(second)

    assert (tmp_path / "one" / "tree").readlink() == Path("/etc")
    assert (tmp_path / "two" / "tree" / "file").read_text() == "new"


_NAMES = st.sampled_from(["a", "b", "c", "..", "."])
_TARGETS = st.lists(_NAMES, min_size=1, max_size=4).map("/".join)


@settings(max_examples=60, deadline=None)
@given(
    links=st.dictionaries(st.sampled_from(["a", "b", "c/a", "c/b"]), _TARGETS, max_size=4),
    path=st.lists(_NAMES, min_size=1, max_size=5),
)
def test_resolve_agrees_with_the_kernel(links: dict[str, str], path: list[str]) -> None:
    """Invariant: resolve() lands where realpath() does, and names every link it followed."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(os.path.realpath(scratch))
        (base / "c").mkdir()
        for name, target in links.items():
            (base / name).symlink_to(target)
        wanted = base.joinpath(*path)
        try:
            resolved, followed = fsat.resolve(wanted)
        except UnsafePathError:
            with pytest.raises(OSError, match="Too many levels"):
                wanted.stat()
            return
        if resolved.exists():
            assert resolved == Path(os.path.realpath(wanted))
        assert all(link.path.is_symlink() for link in followed)
