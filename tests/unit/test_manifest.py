"""Manifest parsing: every field bounded, and a bad one named with its value in one line."""

from __future__ import annotations

import copy
import io
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sovbackupd import manifest
from sovbackupd.manifest import ManifestError

GOOD: dict[str, Any] = {
    "format_version": 1,
    "id": "sovereigncore_backup_20260102_140000",
    "created": "2026-01-02T14:00:00Z",
    "finished": "2026-01-02T14:00:05Z",
    "tiers": ["daily", "pre-restore"],
    "host": "server-1",
    "tool_version": "0.1.0",
    "compression": "gzip",
    "sources": [
        {
            "component": "sqlite",
            "name": "sqlite",
            "details": {
                "databases": {
                    "/opt/sovereigncore/sovereign_rekor.db": {
                        "page_count": 3,
                        "page_size": 4096,
                        "integrity": "ok",
                        "rows": {"entries": 500, "odd name": 1},
                    }
                }
            },
            "warnings": [],
        },
        {
            "component": "redis",
            "name": "redis",
            "details": {"keys_in_rdb": 103, "expires_in_rdb": 1, "rdb_check": "ok"},
            "warnings": [],
        },
    ],
    "file_count": 1,
    "file_bytes": 6,
    "files": [
        {
            "path": "data",
            "type": "dir",
            "origin": "/opt/sovereigncore/data",
            "size": 0,
            "mode": 0o755,
            "mtime": 1_600_000_000.5,
            "uid": 0,
            "gid": 0,
        },
        {
            "path": "data/notes.txt",
            "type": "file",
            "origin": "/opt/sovereigncore/data/notes.txt",
            "size": 6,
            "mode": 0o644,
            "mtime": -86400.0,
            "uid": 1000,
            "gid": 1000,
            "sha256": "0" * 64,
        },
    ],
}

# Each field, where it sits, and values just past its bounds or of the wrong kind.
OUT_OF_BOUNDS: dict[str, tuple[tuple[str | int, ...], list[object]]] = {
    "files[1].uid": (("files", 1, "uid"), [2**40, -5, 2**32 - 1, True, 1.5, "0"]),
    "files[1].gid": (("files", 1, "gid"), [2**32 - 1, -1]),
    "files[1].mode": (("files", 1, "mode"), [0o10000, -1, 0o100644]),
    "files[1].size": (("files", 1, "size"), [2**63, -1]),
    "files[1].mtime": (("files", 1, "mtime"), [math.nan, math.inf, -math.inf, 1e300, -1e300]),
    "files[1].sha256": (("files", 1, "sha256"), ["z" * 64, "0" * 63, "A" * 64]),
    "files[1].path": (("files", 1, "path"), ["a\0b", "x" * 5000]),
    "files[1].origin": (("files", 1, "origin"), ["/opt/\0", "/" + "x" * 5000]),
    "files[1].link": (("files", 1, "link"), ["a\0b"]),
    "id": (("id",), ["../evil", "", "a/b", "-rf", "x" * 300]),
    "tiers[0]": (("tiers", 0), ["../x", "", "a b"]),
    "file_count": (("file_count",), [-1, 2**63]),
    "file_bytes": (("file_bytes",), [-1, 1.5]),
    "format_version": (("format_version",), [0, 2, "1"]),
    "sources[0].details.databases": (("sources", 0, "details", "databases"), [[], "x", 3]),
    "sources[1].details.keys_in_rdb": (("sources", 1, "details", "keys_in_rdb"), [-1, "many"]),
}


def with_value(where: tuple[str | int, ...], value: object) -> dict[str, Any]:
    """Return a copy of GOOD with the field at *where* set to *value*."""
    data = copy.deepcopy(GOOD)
    holder: Any = data
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = value
    return data


def test_the_good_manifest_parses_with_its_typed_details() -> None:
    """The reference manifest, negative mtime included, is accepted, details typed."""
    parsed = manifest.validate(copy.deepcopy(GOOD))

    assert parsed.files[1].mtime == -86400.0
    rows = parsed.sources[0].sqlite().databases["/opt/sovereigncore/sovereign_rekor.db"].rows
    assert rows == {"entries": 500, "odd name": 1}
    assert parsed.sources[1].redis().keys_in_rdb == 103


FIELD_VALUES = [(field, value) for field, (_, values) in OUT_OF_BOUNDS.items() for value in values]


@pytest.mark.parametrize(
    ("field", "value"), FIELD_VALUES, ids=[repr(v)[:30] for _, v in FIELD_VALUES]
)
def test_a_field_out_of_bounds_is_refused_naming_it(field: str, value: object) -> None:
    """Every bounded field refuses a value past its bounds, in one line naming the field."""
    where, _ = OUT_OF_BOUNDS[field]

    with pytest.raises(ManifestError) as raised:
        manifest.validate(with_value(where, value))

    message = str(raised.value)
    assert message.startswith(f"manifest field {field}"), message
    assert "\n" not in message
    assert len(message) < 400


@given(st.sampled_from(sorted(OUT_OF_BOUNDS)), st.integers(min_value=2**63))
def test_any_huge_integer_anywhere_is_refused_never_an_overflow(field: str, value: int) -> None:
    """Invariant: no integer past 2**63 in a bounded field reaches restore (a ManifestError)."""
    where, _ = OUT_OF_BOUNDS[field]

    with pytest.raises(ManifestError, match=r"^manifest field "):
        manifest.validate(with_value(where, value))


@given(
    uid=st.integers(min_value=0, max_value=manifest.UID_MAX),
    mode=st.integers(min_value=0, max_value=0o7777),
    size=st.integers(min_value=0, max_value=manifest.SIZE_MAX),
    mtime=st.floats(min_value=manifest.MTIME_MIN, max_value=manifest.MTIME_MAX),
)
def test_every_value_within_bounds_round_trips(
    uid: int, mode: int, size: int, mtime: float
) -> None:
    """Invariant: a value within every bound is accepted and survives a JSON round trip."""
    data = with_value(("files", 1, "uid"), uid)
    data["files"][1].update(mode=mode, size=size, mtime=mtime, gid=uid)

    parsed = manifest.parse_manifest(json.dumps(data).encode())

    assert (parsed.files[1].uid, parsed.files[1].mode, parsed.files[1].size) == (uid, mode, size)
    assert parsed.files[1].mtime == mtime


def test_json_that_is_no_manifest_is_one_line() -> None:
    """Bytes that are not JSON are a ManifestError, not a JSONDecodeError's text."""
    with pytest.raises(ManifestError, match=r"^manifest is not JSON"):
        manifest.parse_manifest(b'{"id": ')


@given(
    st.binary(min_size=1, max_size=255).filter(lambda name: b"/" not in name and b"\0" not in name)
)
def test_a_name_that_is_not_utf8_is_within_bounds(name: bytes) -> None:
    """Invariant: any file-system name (surrogate-escaped, as backups write it) is accepted."""
    text = name.decode("utf-8", "surrogateescape")
    data = with_value(("files", 1, "path"), f"data/{text}")
    data["files"][1]["origin"] = f"/opt/sovereigncore/data/{text}"
    data["sources"][0]["details"]["databases"] = {f"/opt/{text}.db": {"rows": {text: 1}}}

    parsed = manifest.validate(data)

    assert parsed.files[1].path.encode("utf-8", "surrogateescape") == b"data/" + name


SECRET_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\'),
    min_size=12,
    max_size=40,
)


@given(
    path=SECRET_TEXT, table=SECRET_TEXT, warning=SECRET_TEXT, digest=st.sampled_from("0123abcdef")
)
def test_a_head_holds_no_path_row_count_warning_or_sha256_of_the_manifest(
    path: str, table: str, warning: str, digest: str
) -> None:
    """Invariant: a head holds nothing of its manifest's files, yet all that listing needs.

    No file path, origin, table name, row count, warning or member sha256 is in the bytes
    written beside an encrypted archive, and they read back as a head with every field
    that listing and retention use.
    """
    data = copy.deepcopy(GOOD)
    data["files"][1].update(path=f"data/{path}", origin=f"/opt/{path}", sha256=digest * 64)
    data["sources"][0]["details"]["databases"]["/opt/sovereigncore/sovereign_rekor.db"]["rows"] = {
        table: 987_654_321
    }
    data["sources"][1]["warnings"] = [warning]
    full = manifest.validate(data)
    written = io.BytesIO()
    manifest.write_manifest(full.head(), (), written)
    text = written.getvalue()

    for secret in (path, table, warning, digest * 64, "987654321", "sovereign_rekor.db"):
        assert secret.encode() not in text
    head = manifest.validate(json.loads(text))
    assert head.is_head and not full.is_head
    assert head.files == []
    kept = ("id", "created", "finished", "tiers", "host", "tool_version", "compression")
    assert [getattr(head, name) for name in kept] == [getattr(full, name) for name in kept]
    assert (head.file_count, head.file_bytes) == (full.file_count, full.file_bytes)
    assert [(source.component, source.name) for source in head.sources] == [
        (source.component, source.name) for source in full.sources
    ]


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("files",), GOOD["files"]),
        (("sources", 1, "warnings"), ["data/notes.txt: changed while read"]),
        (("sources", 1, "details"), {"keys_in_rdb": 103}),
        (("manifest",), "plaintext"),
    ],
)
def test_a_head_that_holds_a_file_list_details_or_warnings_is_refused(
    where: tuple[str | int, ...], value: object
) -> None:
    """A head claiming its manifest is encrypted may carry nothing that names a file."""
    head = json.loads(_head_bytes())
    holder: Any = head
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = value

    with pytest.raises(ManifestError, match=r"^manifest field "):
        manifest.validate(head)


def _head_bytes() -> bytes:
    written = io.BytesIO()
    manifest.write_manifest(manifest.validate(copy.deepcopy(GOOD)).head(), (), written)
    return written.getvalue()


def test_a_full_manifest_is_written_without_the_head_marker() -> None:
    """Backups that are not encrypted keep the manifest bytes they had before heads."""
    full = manifest.validate(copy.deepcopy(GOOD))
    written = io.BytesIO()
    manifest.write_manifest(full, (), written)

    assert b'"manifest"' not in written.getvalue()
    assert b'"manifest": "encrypted"' in _head_bytes()
