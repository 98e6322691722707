"""structlog set-up: JSON lines for journald, readable lines on a terminal.

Every line, whether it comes from structlog or from a library logging through the
standard library (APScheduler), leaves through one :class:`LineWriter`: the whole line,
newline included, in one ``write()`` under one process-wide lock. ``print()`` writes the
text and the newline separately, so two threads printing at once glue one JSON object to
the next; journald and every log shipper would mis-parse that.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Literal, TextIO

import structlog

LogFormat = Literal["json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")

# One lock for every stream: stdout and stderr may be the same pipe (journald, 2>&1).
_WRITE_LOCK = threading.Lock()


class LineWriter:
    """Write whole lines to a stream, one ``write()`` each, under the shared lock."""

    def __init__(self, stream: TextIO) -> None:
        """Write to *stream*."""
        self.stream = stream

    def line(self, text: str) -> None:
        """Write *text* and its newline as one piece, then flush."""
        with _WRITE_LOCK:
            self.stream.write(text + "\n")
            self.stream.flush()


class _LineLogger:
    """structlog's final logger: every method writes the rendered event as one line."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.line(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _LineHandler(logging.Handler):
    """A standard-library handler that hands each formatted record to a LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.line(self.format(record))
        except Exception:  # logging's own contract: report through handleError, never raise
            self.handleError(record)


def _colours(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def _shortener(prefix: str, label: str) -> structlog.typing.Processor:
    """Return a processor that writes *label* for *prefix* in every string value."""

    def shorten(value: object) -> object:
        if isinstance(value, str):
            return value.replace(prefix, label)
        if isinstance(value, list | tuple):
            return [shorten(item) for item in value]
        return value

    def processor(
        logger: object, method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        del logger, method
        return {key: shorten(value) for key, value in event.items()}

    return processor


def _renderer(log_format: LogFormat, stream: TextIO) -> structlog.typing.Processor:
    if log_format == "console":
        return structlog.dev.ConsoleRenderer(colors=_colours(stream), sort_keys=False)
    return structlog.processors.JSONRenderer()


def default_format(stream: TextIO) -> LogFormat:
    """Return the format for *stream*: for people on a terminal, JSON anywhere else."""
    return "console" if stream.isatty() else "json"


def configure(
    stream: TextIO | None = None,
    level: int = logging.INFO,
    log_format: LogFormat | None = None,
    shorten: tuple[str, str] | None = None,
) -> LineWriter:
    """Send events at *level* and above to *stream* (stdout by default); return its writer.

    *log_format* ``json`` gives one JSON object per line with an ISO timestamp in UTC and
    its level (journald, files, pipes); ``console`` gives a short line per event for
    people. By default a terminal gets ``console`` and anything else ``json``. In the
    console format, *shorten* ``(prefix, label)`` writes *label* for *prefix* in values
    (the demo's sandbox root in every path); JSON always carries the full values.
    """
    output = sys.stdout if stream is None else stream
    chosen = log_format or default_format(output)
    rendering: list[structlog.typing.Processor] = [_renderer(chosen, output)]
    if chosen == "console" and shorten is not None:
        rendering.insert(0, _shortener(*shorten))
    writer = LineWriter(output)
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(
            fmt="iso" if chosen == "json" else "%H:%M:%S", utc=chosen == "json"
        ),
    ]
    # Libraries (APScheduler) log through the standard library: render their warnings the
    # same way, so journald sees one format.
    handler = _LineHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            # The console renderer formats exceptions itself, for people.
            *([structlog.processors.format_exc_info] if chosen == "json" else []),
            *rendering,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _LineLogger(writer),
        cache_logger_on_first_use=False,
    )
    return writer
