"""Generated trees go through a real backup and restore --to and come back as they were."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sovbackupd import backup, config, restore
from sovbackupd.errors import SovbackupdError
from sovbackupd.sources import files
from sovbackupd.store import STAGING_NAME, Store
from tests.conftest import key_file, require_tool, write_policy
from tests.property.trees import Node, snapshot

PATH_BUDGET = files.RESTORABLE_PATH_BYTES - 200
"""The longest path generated below the data dir (itself < 200 bytes): a deeper one is left
out of the backup with a warning (tests/integration/test_backup_capture.py)."""

ODD_NAMES = [
    b"caf\xe9",
    b"\xed\xa0\x80",
    b"line\nbreak",
    b"tab\t\\back",
    b"quo\"te's",
    b" ",
    b"-",
    b"...",
    b"\xff" * 255,
    b"n" * 255,
]


def _clean(name: bytes) -> bytes:
    name = name.replace(b"/", b"_").replace(b"\0", b"_")
    return name + b"_" if name in (b".", b"..") else name


names = st.one_of(
    st.sampled_from(ODD_NAMES),
    st.binary(min_size=1, max_size=24).map(_clean),
    st.binary(min_size=200, max_size=255).map(_clean),
)
file_modes = st.sampled_from([0o644, 0o600, 0o000, 0o200, 0o444, 0o755, 0o4755, 0o2755])
dir_modes = st.sampled_from([0o755, 0o700, 0o555, 0o1777, 0o000, 0o3755])
owners = st.sampled_from([(0, 0), (1000, 1000), (65534, 65534), (4294967294, 0)])
mtimes = st.integers(min_value=-(2**31) * 10**9, max_value=(2**33) * 10**9)


@dataclass
class Tree:
    """A generated tree, as steps replayed below a root."""

    steps: list[tuple[str, bytes, Any]] = field(default_factory=list)
    """(kind, relative path, parameters) in creation order, parents first."""
    attributes: list[tuple[bytes, int, tuple[int, int], int]] = field(default_factory=list)
    """(relative path, mode, owner, mtime_ns), applied after every step, deepest first."""

    def describe(self) -> str:
        """Return the steps in a form a failing example prints readably."""
        return "\n".join(
            f"{kind} {path!r} {str(parameters)[:80]}" for kind, path, parameters in self.steps
        )


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _relative_target(link: bytes, target: bytes) -> bytes:
    """Return the relative path from the directory of *link* to *target*."""
    depth = link.count(b"/")
    return b"../" * depth + target


@st.composite
def trees(draw: st.DrawFn) -> Tree:  # noqa: PLR0912 (a branch per kind of entry drawn)
    """Draw a tree of files, dirs, symlinks, hardlinks, sparse and big files, deep chains."""
    tree = Tree()
    dirs = [b""]
    files: list[bytes] = []
    taken: set[bytes] = set()
    links: list[bytes] = []
    for _ in range(draw(st.integers(min_value=1, max_value=14))):
        parent = draw(st.sampled_from(dirs))
        path = _join(parent, draw(names))
        if path in taken or len(path) > PATH_BUDGET:
            continue
        kind = draw(
            st.sampled_from(
                [
                    "file",
                    "file",
                    "dir",
                    "dir",
                    "symlink",
                    "hardlink",
                    "sparse",
                    "big",
                    "deep",
                    "fifo",
                ]
            )
        )
        if kind == "hardlink" and not files:
            kind = "file"
        if kind == "deep":
            depth = draw(st.integers(min_value=2, max_value=12))
            chain = path
            for level in range(depth):
                step = draw(st.sampled_from([b"d" * 250, b"\xe9" * 100, b"x"])) + b"%d" % level
                if len(chain) + len(step) + 1 > PATH_BUDGET:
                    break
                chain = _join(chain, step)
            parts = chain.split(b"/")
            for end in range(parent.count(b"/") + (2 if parent else 1), len(parts) + 1):
                prefix = b"/".join(parts[:end])
                if prefix not in taken:
                    tree.steps.append(("dir", prefix, None))
                    taken.add(prefix)
                    dirs.append(prefix)
            continue
        taken.add(path)
        if kind == "dir":
            tree.steps.append(("dir", path, None))
            dirs.append(path)
        elif kind == "file":
            content = draw(st.one_of(st.just(b""), st.binary(max_size=2000)))
            tree.steps.append(("file", path, content))
            files.append(path)
        elif kind == "big":
            tree.steps.append(
                ("big", path, draw(st.integers(min_value=1 << 20, max_value=3 << 20)))
            )
            files.append(path)
        elif kind == "sparse":
            size = draw(st.integers(min_value=1, max_value=64 << 20))
            offset = draw(st.integers(min_value=0, max_value=size - 1))
            tree.steps.append(("sparse", path, (size, offset)))
            files.append(path)
        elif kind == "hardlink":
            tree.steps.append(("hardlink", path, draw(st.sampled_from(files))))
            continue  # it shares the attributes of what it links to
        elif kind == "fifo":
            tree.steps.append(("fifo", path, None))  # skipped by the backup, with a warning
        else:
            target = draw(
                st.one_of(
                    st.just(b"/etc/hostname"),  # absolute, outside the tree
                    st.sampled_from(sorted(taken)).map(partial(_relative_target, path)),
                    names.map(lambda name: b"missing/" + name),  # dangling
                    # a chain: a link to a link
                    st.sampled_from(links or [b"nowhere"]).map(partial(_relative_target, path)),
                    st.just(b".."),  # the tree's parent: outside it
                )
            )
            tree.steps.append(("symlink", path, target))
            links.append(path)
        mode = draw(dir_modes if kind == "dir" else file_modes)
        tree.attributes.append((path, mode, draw(owners), draw(mtimes)))
    for path in dirs:
        if path and not any(item[0] == path for item in tree.attributes):
            tree.attributes.append((path, draw(dir_modes), draw(owners), draw(mtimes)))
    tree.attributes.append((b"", draw(dir_modes), (0, 0), draw(mtimes)))
    return tree


def build(tree: Tree, root: bytes) -> None:
    """Create *tree* below the existing directory *root*."""
    for kind, relative, parameters in tree.steps:
        path = _join(root, relative) if relative else root
        if kind == "dir":
            os.mkdir(path)  # noqa: PTH102 (bytes paths: pathlib takes text)
        elif kind == "file":
            with open(path, "wb") as handle:  # noqa: PTH123
                handle.write(parameters)
        elif kind == "big":
            with open(path, "wb") as handle:  # noqa: PTH123
                handle.write(os.urandom(parameters))
        elif kind == "sparse":
            size, offset = parameters
            with open(path, "wb") as handle:  # noqa: PTH123
                handle.truncate(size)
                handle.seek(offset)
                handle.write(b"data"[: size - offset])
        elif kind == "hardlink":
            os.link(_join(root, parameters), path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            os.symlink(parameters, path)  # noqa: PTH211
    for relative, mode, (uid, gid), mtime_ns in sorted(
        tree.attributes, key=lambda item: item[0].count(b"/") + bool(item[0]), reverse=True
    ):
        path = _join(root, relative) if relative else root
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            os.chmod(path, mode)  # noqa: PTH101 (after lchown, which clears setuid)
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


@dataclass
class Counter:
    """How many trees the property took through a backup."""

    tried: int = 0
    refused: int = 0


COUNTER = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_trees(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many trees were tried: the number the long run's closing note quotes."""
    yield
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(
            f"round-trip property: {COUNTER.tried} trees backed up and restored, "
            f"{COUNTER.refused} refused with one line"
        )


def _policy(workdir: Path, data: Path) -> Path:
    database = workdir / "app.db"
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE t (x)")
    connection.execute("INSERT INTO t VALUES (1)")
    connection.commit()
    connection.close()
    return write_policy(
        workdir / "policy.yaml",
        {
            "backup_dir": str(workdir / "backups"),
            "authentication": {"key_file": str(key_file(workdir))},
            "sources": {"sqlite": [str(database)], "dirs": [str(data)]},
            "tiers": {"daily": {"schedule": "0 2 * * *", "keep": 3}},
        },
    )


@given(tree=trees())
def test_every_tree_restores_as_it_was_or_is_refused_with_one_line(tree: Tree) -> None:
    """A tree comes back from restore --to exactly as it was, or its backup is refused.

    Invariant: the backup either fails with one clear line, or restore --to gives back
    every name (as bytes), content, mode, owner, mtime (to the nanosecond) and link
    target below the data dir (FIFOs aside: they are skipped), and test-restore passes.
    Modes keep their setuid/setgid bits with --keep-setuid; without it, only those go.
    """
    with tempfile.TemporaryDirectory(prefix="i13-roundtrip-") as scratch:
        workdir = Path(scratch)
        data = workdir / "app" / "data"
        data.parent.mkdir()
        data.mkdir()
        build(tree, os.fsencode(data))
        original = {
            path: node
            for path, node in snapshot(os.fsencode(data)).items()
            if node.kind != "special"
        }
        policy = config.load(_policy(workdir, data))
        try:
            made = backup.run(policy, ["daily"])
        except SovbackupdError as error:
            COUNTER.refused += 1
            assert "\n" not in str(error), tree.describe()
            return
        COUNTER.tried += 1
        stored = Store(policy.backup_dir, policy.name_prefix).find(made.name)
        target = workdir / "out"
        restore.run(policy, restore.plan(policy, stored, to=target, keep_setuid=True))
        restored = snapshot(os.fsencode(target) + os.fsencode(data))
        assert _differences(original, restored) == [], tree.describe()
        stripped = workdir / "stripped"
        restore.run(policy, restore.plan(policy, stored, to=stripped))
        without_setid = {
            path: dataclasses.replace(node, mode=node.mode & ~0o6000)
            if node.kind == "file"
            else node
            for path, node in original.items()
        }
        restored = snapshot(os.fsencode(stripped) + os.fsencode(data))
        assert _differences(without_setid, restored) == [], tree.describe()
        drill = restore.drill(policy, made.name)
        assert drill.ok, [check for check in drill.checks if not check.ok]


def _differences(original: dict[bytes, Node], restored: dict[bytes, Node]) -> list[str]:
    problems = [f"missing {path!r}" for path in original.keys() - restored.keys()]
    problems += [f"extra {path!r}" for path in restored.keys() - original.keys()]
    problems += [
        f"{path!r}: {original[path]} became {restored[path]}"
        for path in original.keys() & restored.keys()
        if original[path] != restored[path]
    ]
    return problems


UNIT_PRIVILEGES = ["--inh-caps=-all", "--bounding-set=-all,+dac_read_search"]
"""The systemd unit's: reading everything (CAP_DAC_READ_SEARCH), no CAP_DAC_OVERRIDE."""


def test_a_read_only_tree_backs_up_and_drills_with_the_unit_privileges(tmp_path: Path) -> None:
    """Without CAP_DAC_OVERRIDE, backup, test-restore and the next backup pass, leaving nothing."""
    setpriv = require_tool("setpriv")
    data = tmp_path / "app" / "data"
    data.parent.mkdir()
    data.mkdir()
    tree = Tree(
        steps=[
            ("dir", b"ro\xe9", None),
            ("file", b"ro\xe9/inside", b"x"),
            ("dir", b"ro\xe9/empty", None),
        ],
        attributes=[(b"ro\xe9/empty", 0o555, (0, 0), 10**18), (b"ro\xe9", 0o555, (0, 0), 10**18)],
    )
    build(tree, os.fsencode(data))
    policy = _policy(tmp_path, data)

    def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                setpriv,
                *UNIT_PRIVILEGES,
                sys.executable,
                "-m",
                "sovbackupd",
                "--config",
                str(policy),
                *arguments,
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    for arguments in (("backup",), ("test-restore", "--latest"), ("backup",)):
        result = cli(*arguments)
        assert result.returncode == 0, (arguments, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "backups" / STAGING_NAME).exists()
