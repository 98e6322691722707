"""Logs are JSON lines off a terminal, the standard library's included."""

from __future__ import annotations

import io
import json
import logging

import structlog

from sovbackupd import logging as sovlogging


def test_structlog_and_library_warnings_are_json_lines() -> None:
    """APScheduler's stdlib warnings come out in the same JSON as our own events."""
    stream = io.StringIO()
    sovlogging.configure(stream)
    try:
        structlog.get_logger("test").info("backup.finished", result="success")
        logging.getLogger("apscheduler.scheduler").warning("Run time of job %s missed", "x")
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    ours, theirs = (json.loads(line) for line in stream.getvalue().splitlines())
    assert ours["event"] == "backup.finished"
    assert ours["level"] == "info"
    assert theirs["event"] == "Run time of job x missed"
    assert theirs["logger"] == "apscheduler.scheduler"
    assert theirs["level"] == "warning"
