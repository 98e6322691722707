"""Cutting a live AOF copy after its last whole command."""

from __future__ import annotations

import io

import pytest

from sovbackupd.sources.redis import complete_commands_length


def resp(*arguments: bytes) -> bytes:
    """Encode one command as Redis writes it to the AOF."""
    encoded = b"*%d\r\n" % len(arguments)
    for argument in arguments:
        encoded += b"$%d\r\n%s\r\n" % (len(argument), argument)
    return encoded


SELECT = resp(b"SELECT", b"0")
SET = resp(b"SET", b"key", b"value")
BINARY = resp(b"SET", b"blob", b"line\r\nbreak\x00\xff*3\r\n$1\r\n")
MULTI = SELECT + SET + BINARY


def whole(data: bytes) -> int:
    return complete_commands_length(io.BytesIO(data))


def test_empty_aof_has_no_complete_commands() -> None:
    """An empty file keeps nothing."""
    assert whole(b"") == 0


def test_whole_commands_are_kept_entirely() -> None:
    """A stream of complete commands is kept to its last byte."""
    assert whole(SET) == len(SET)
    assert whole(MULTI) == len(MULTI)


def test_arguments_containing_resp_syntax_are_read_by_length() -> None:
    """CRLF, NUL and `*3` inside a value do not confuse the parser: lengths rule."""
    assert whole(BINARY) == len(BINARY)
    assert whole(BINARY + SET) == len(BINARY + SET)


def test_empty_argument_is_a_whole_argument() -> None:
    """A zero-length bulk string is complete once its CRLF is there."""
    command = resp(b"SET", b"empty", b"")
    assert whole(command) == len(command)


@pytest.mark.parametrize("cut", range(1, len(SET)))
def test_command_cut_anywhere_is_dropped(cut: int) -> None:
    """A command cut at any byte (header, length, argument, CRLF) is not kept."""
    assert whole(SELECT + SET[:cut]) == len(SELECT)


def test_command_cut_in_its_header_is_dropped() -> None:
    """A cut inside the `*3` line keeps only the commands before it."""
    assert whole(SELECT + b"*3") == len(SELECT)
    assert whole(SELECT + b"*3\r") == len(SELECT)


def test_command_cut_in_an_argument_is_dropped() -> None:
    """A cut inside an argument's bytes keeps only the commands before it."""
    cut = SET.index(b"value") + 2
    assert whole(SELECT + SET[:cut]) == len(SELECT)


def test_command_missing_its_final_crlf_is_dropped() -> None:
    """A command whose last argument lacks its trailing CRLF (or half of it) is dropped."""
    assert whole(SELECT + SET[:-2]) == len(SELECT)
    assert whole(SELECT + SET[:-1]) == len(SELECT)


def test_timestamp_annotations_count_as_complete() -> None:
    """`#TS:` lines of aof-timestamp-enabled are whole units between commands."""
    annotated = b"#TS:1700000000\r\n" + SET + b"#TS:1700000001\r\n" + SELECT
    assert whole(annotated) == len(annotated)


def test_timestamp_annotation_cut_short_is_dropped() -> None:
    """An annotation without its CRLF is cut off like a partial command."""
    assert whole(SET + b"#TS:17000") == len(SET)
    assert whole(SET + b"#TS:1700000000\r") == len(SET)


def test_garbage_after_commands_is_cut_off() -> None:
    """A line that is not a command or an annotation ends the usable prefix."""
    assert whole(SET + b"garbage\r\n" + SELECT) == len(SET)


def test_bad_argument_header_ends_the_usable_prefix() -> None:
    """A command whose argument does not start with `$` is not kept."""
    assert whole(SET + b"*1\r\n+OK\r\n") == len(SET)


def test_rdb_preamble_is_not_mistaken_for_commands() -> None:
    """Binary data (an RDB preamble) yields no commands rather than an error."""
    assert whole(b"REDIS0011\xfa\x09redis-ver\x057.2.4\r\n") == 0


@pytest.mark.parametrize("damage", [b"*x\r\n", b"*\r\n", b"*1\r\n$y\r\nab\r\n", b"*1\r\n$-5\r\n"])
def test_malformed_counts_end_the_usable_prefix(damage: bytes) -> None:
    """A non-numeric or negative count is damage: the prefix before it is kept, no crash."""
    assert whole(SET + damage + SELECT) == len(SET)
