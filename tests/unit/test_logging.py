"""Logs are whole lines: JSON off a terminal, for people on one, never two glued together."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from sovbackupd import logging as sovlogging


class YieldingStream(io.StringIO):
    """A stream whose every write lets another thread run, as a pipe's write(2) does.

    A writer that splits a line into two writes (``print`` does: the text, then the
    newline) is interleaved here almost every time another thread is writing too.
    """

    def write(self, text: str) -> int:
        written = super().write(text)
        time.sleep(0)
        return written


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()


def test_structlog_and_library_warnings_are_json_lines() -> None:
    """APScheduler's stdlib warnings come out in the same JSON as our own events."""
    stream = io.StringIO()
    sovlogging.configure(stream)
    structlog.get_logger("test").info("backup.finished", result="success")
    logging.getLogger("apscheduler.scheduler").warning("Run time of job %s missed", "x")
    ours, theirs = (json.loads(line) for line in stream.getvalue().splitlines())
    assert ours["event"] == "backup.finished"
    assert ours["level"] == "info"
    assert theirs["event"] == "Run time of job x missed"
    assert theirs["logger"] == "apscheduler.scheduler"
    assert theirs["level"] == "warning"


def test_many_threads_logging_through_both_paths_write_only_whole_json_lines() -> None:
    """Every line parses as JSON and none is lost, whatever the threads' interleaving."""
    stream = YieldingStream()
    sovlogging.configure(stream)
    threads_per_path, events_per_thread = 8, 60
    start = threading.Barrier(2 * threads_per_path)

    def ours(number: int) -> None:
        start.wait()
        for event in range(events_per_thread):
            structlog.get_logger("test").info("backup.progress", thread=number, event_number=event)

    def theirs(number: int) -> None:
        start.wait()
        for event in range(events_per_thread):
            logging.getLogger("apscheduler.scheduler").warning("job %s tick %s", number, event)

    threads = [
        threading.Thread(target=target, args=(number,))
        for number in range(threads_per_path)
        for target in (ours, theirs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = stream.getvalue().split("\n")
    assert lines.pop() == ""  # the text ends with a newline, and has no empty line before
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 * threads_per_path * events_per_thread
    assert sum(record["event"] == "backup.progress" for record in records) == (
        threads_per_path * events_per_thread
    )


def test_a_terminal_gets_lines_for_people_and_json_stays_available() -> None:
    """By default a terminal gets the console format; --log-format json overrides it."""
    console = Terminal()
    sovlogging.configure(console)
    structlog.get_logger("test").info("backup.finished", backup="b1")
    text = re.sub(r"\x1b\[[0-9;]*m", "", console.getvalue())
    assert "backup.finished" in text
    assert "backup=b1" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    chosen = Terminal()
    sovlogging.configure(chosen, log_format="json")
    structlog.get_logger("test").info("backup.finished", backup="b1")
    assert json.loads(chosen.getvalue())["backup"] == "b1"


def test_console_format_off_a_terminal_has_no_colour_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Colour escapes go only to a terminal, and never when NO_COLOR is set."""
    plain = io.StringIO()
    sovlogging.configure(plain, log_format="console")
    structlog.get_logger("test").warning("retention.held", reason="size")
    assert "retention.held" in plain.getvalue()
    assert "\x1b[" not in plain.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    terminal = Terminal()
    sovlogging.configure(terminal)
    structlog.get_logger("test").warning("retention.held", reason="size")
    assert "\x1b[" not in terminal.getvalue()


def test_console_format_renders_exceptions_without_raw_json() -> None:
    """An exception logged in console format is shown as text, not a JSON string."""
    stream = io.StringIO()
    sovlogging.configure(stream, log_format="console")
    try:
        int("boom")
    except ValueError:
        structlog.get_logger("test").exception("backup.crashed")
    text = stream.getvalue()
    assert "backup.crashed" in text
    assert "ValueError: invalid literal" in text


def test_console_format_shortens_a_prefix_and_json_keeps_full_values() -> None:
    """The console writes the label for the prefix, in strings and lists; JSON is untouched."""
    console = io.StringIO()
    sovlogging.configure(console, log_format="console", shorten=("/tmp/demo-x", "$SANDBOX"))
    structlog.get_logger("test").info(
        "restore.swapped", destination="/tmp/demo-x/opt/data", units=["/tmp/demo-x/a", 3]
    )
    logging.getLogger("apscheduler.scheduler").warning("job at /tmp/demo-x/b missed")
    text = console.getvalue()
    assert "/tmp/demo-x" not in text
    assert "$SANDBOX/opt/data" in text
    assert "$SANDBOX/a" in text
    assert "$SANDBOX/b" in text
    plain = io.StringIO()
    sovlogging.configure(plain, log_format="json", shorten=("/tmp/demo-x", "$SANDBOX"))
    structlog.get_logger("test").info("restore.swapped", destination="/tmp/demo-x/opt/data")
    assert json.loads(plain.getvalue())["destination"] == "/tmp/demo-x/opt/data"
