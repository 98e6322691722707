"""The command line's parser: where the global options go, and which spans it takes."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sovbackupd import cli

# Every command with the arguments it needs; a test below checks that none is missing.
COMMANDS = (
    ("run",),
    ("backup",),
    ("list",),
    ("verify",),
    ("restore", "NAME"),
    ("pin", "NAME"),
    ("unpin", "NAME"),
    ("test-restore",),
    ("prune",),
    ("retention", "simulate"),
    ("check-config",),
    ("key", "init"),
    ("key", "id"),
    ("demo",),
)
GROUPS = ("retention", "key")
"""Commands whose first word only groups subcommands: no option goes between the two."""


def command_paths(parser: argparse.ArgumentParser) -> set[tuple[str, ...]]:
    """Return every leaf command of *parser*, e.g. ("retention", "simulate")."""
    paths: set[tuple[str, ...]] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths |= {(name, *rest) for rest in command_paths(child)}
    return paths or {()}


def test_the_property_below_covers_every_command() -> None:
    """COMMANDS names each command of the parser, so a new one is tested too."""
    named = {tuple(word for word in command if word != "NAME") for command in COMMANDS}
    assert command_paths(cli._parser()) == named


@given(
    command=st.sampled_from(COMMANDS),
    config=st.sampled_from(["p.yaml", "/etc/sovbackupd/other policy.yaml", "-"]),
    config_at=st.integers(min_value=0, max_value=3),
    verbose=st.booleans(),
    verbose_at=st.integers(min_value=0, max_value=3),
    log_format=st.sampled_from([None, "json", "console"]),
    log_format_at=st.integers(min_value=0, max_value=3),
)
def test_global_options_mean_the_same_before_or_after_the_command(
    *,
    command: tuple[str, ...],
    config: str,
    config_at: int,
    verbose: bool,
    verbose_at: int,
    log_format: str | None,
    log_format_at: int,
) -> None:
    """Invariant: --config, -v and --log-format mean the same wherever they stand."""
    words = [*command]
    # Options may go before the command or after any of its words (not inside a group).
    places = [0, *range(len(command) if command[0] in GROUPS else 1, len(command) + 1)]
    words.insert(places[config_at % len(places)], f"--config={config}")
    if verbose:
        words.insert(places[verbose_at % len(places)], "-v")
    if log_format is not None:
        words.insert(places[log_format_at % len(places)], f"--log-format={log_format}")

    arguments = cli._parser().parse_args(words)

    assert arguments.config == Path(config)
    assert arguments.verbose is verbose
    assert arguments.log_format == log_format


def test_global_option_after_the_command_overrides_the_one_before() -> None:
    """Given twice, the last --config counts; an absent one after keeps the one before."""
    parse = cli._parser().parse_args
    assert parse(["--config", "a", "list", "--config", "b"]).config == Path("b")
    assert parse(["--config", "a", "-v", "list", "--json"]).config == Path("a")
    assert parse(["-v", "list"]).verbose is True
    assert parse(["list"]).config is None


@given(count=st.integers(min_value=0, max_value=10**30), unit=st.sampled_from("hdw"))
def test_span_is_taken_within_a_century_or_refused_as_usage(count: int, unit: str) -> None:
    """Invariant: any --span is a positive timedelta of at most MAX_SPAN, or exit 2."""
    words = ["retention", "simulate", "--span", f"{count}{unit}"]
    try:
        arguments = cli._parser().parse_args(words)
    except SystemExit as stop:
        assert stop.code == 2
        return
    assert timedelta(0) < arguments.span <= cli.MAX_SPAN


@pytest.mark.parametrize("text", ["0d", "5201w", "36401d", "873601h", "1y", "-1d", "1.5d"])
def test_span_out_of_bounds_or_malformed_is_a_usage_error(text: str) -> None:
    """Zero, over a century, or not a count with h, d or w: argparse exits 2."""
    with pytest.raises(SystemExit) as stopped:
        cli._parser().parse_args(["retention", "simulate", "--span", text])
    assert stopped.value.code == 2
