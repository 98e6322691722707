"""The /metrics endpoint: one thread, a bounded number of connections, each bounded in time.

prometheus_client's own server starts a thread per connection and waits forever for a
request to arrive: a thousand half-sent requests hold a thousand threads and their stacks.
Here one thread multiplexes every connection with a selector. A connection has
:data:`IDLE_SECONDS` to send its request head (at most :data:`MAX_REQUEST_BYTES`), to
take the response and to close its end (what it sends meanwhile is dropped); at
:data:`MAX_CONNECTIONS` the connection idle for longest is closed to make room, so a
scraper that sends its request at once is always answered.
"""

from __future__ import annotations

import contextlib
import gzip
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = structlog.get_logger("sovbackupd.exposition")

MAX_CONNECTIONS = 64
"""Connections open at once; a Prometheus server needs one, a few scrapers a few."""
IDLE_SECONDS = 10.0
"""How long a connection may take to send its request and to read the response."""
MAX_REQUEST_BYTES = 8192
"""The longest request head (request line and headers) read; a longer one gets 431."""
ACCEPT_PAUSE_SECONDS = 1.0
"""Out of descriptors with no connection to close: how long the listener is left alone."""
_READ_BYTES = 4096
_PATHS = {"/", "/metrics"}


@dataclass
class _Connection:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    outgoing: memoryview | None = None
    draining: bool = False  # answered: what the client still sends is read and dropped


def _headers(head: bytes) -> tuple[str, str | None, dict[str, str]]:
    """Return the method, the path and the lower-cased headers of a request head.

    The path is None when the request target is no URL (``http://[::1``): a bad request.
    """
    lines = head.decode("latin-1").split("\r\n")
    method, target, *_ = [*lines[0].split(" "), "", ""]
    headers = {}
    for line in lines[1:]:
        name, separator, value = line.partition(":")
        if separator:
            headers[name.strip().lower()] = value.strip()
    try:
        path: str | None = urlsplit(target).path
    except ValueError:
        path = None
    return method, path, headers


def _response(status: str, headers: list[tuple[str, str]], body: bytes, head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)


def _error(status: str) -> bytes:
    return _response(status, [("Content-Type", "text/plain; charset=utf-8")], b"", False)


class MetricsServer:
    """Serve *registry* over HTTP on one thread, with bounded connections."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        """Listen on *host*:*port*; raise OSError when that address cannot be bound."""
        self._registry = registry
        self._max_connections = max_connections
        self._idle_seconds = idle_seconds
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._waker, self._wake_end = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._waker, selectors.EVENT_READ)
        self._connections: dict[socket.socket, _Connection] = {}
        self._stopping = False
        self._paused_until: float | None = None  # the listener is unregistered until then
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        """Return the port listened on (the one the OS chose when asked for port 0)."""
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """Return how many connections are open."""
        return len(self._connections)

    def start(self) -> None:
        """Start serving on the server's own thread."""
        self._thread.start()

    def shutdown(self) -> None:
        """Stop serving, close every connection and the listener."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_end.send(b"x")
        if self._thread.ident is not None:
            self._thread.join()
        for connection in list(self._connections.values()):
            self._close(connection)
        for sock in (self._listener, self._waker, self._wake_end):
            sock.close()
        self._selector.close()

    def _serve(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            deadlines = [connection.deadline for connection in self._connections.values()]
            if self._paused_until is not None:
                deadlines.append(self._paused_until)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, events in self._selector.select(timeout):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is not self._waker:
                    connection = self._connections.get(key.fileobj)  # type: ignore[call-overload]  # fileobj is a socket here
                    if connection is not None:
                        self._step(connection, events)
            self._expire(time.monotonic())
            self._resume(time.monotonic())

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as error:
            # Out of descriptors: free one, the scraper's retry then gets in.
            log.warning("metrics.accept_failed", error=error.strerror)
            if self._connections:
                self._evict_oldest()
            else:
                # Nothing of ours to free: the listener would stay readable and the loop
                # spin, logging this warning thousands of times a second. Wait instead.
                self._selector.unregister(self._listener)
                self._paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
            return
        if len(self._connections) >= self._max_connections:
            self._evict_oldest()
        sock.setblocking(False)
        connection = _Connection(sock, time.monotonic() + self._idle_seconds)
        self._connections[sock] = connection
        self._selector.register(sock, selectors.EVENT_READ)

    def _resume(self, now: float) -> None:
        if self._paused_until is not None and self._paused_until <= now:
            self._paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ)

    def _evict_oldest(self) -> None:
        if self._connections:
            self._close(min(self._connections.values(), key=lambda seen: seen.deadline))

    def _expire(self, now: float) -> None:
        for connection in [seen for seen in self._connections.values() if seen.deadline <= now]:
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        self._connections.pop(connection.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()

    def _step(self, connection: _Connection, events: int) -> None:
        try:
            if connection.draining:
                if events & selectors.EVENT_READ and not connection.sock.recv(_READ_BYTES):
                    self._close(connection)
                return
            if events & selectors.EVENT_READ and connection.outgoing is None:
                self._read(connection)
            if events & selectors.EVENT_WRITE and connection.outgoing is not None:
                self._write(connection)
        except OSError:
            self._close(connection)

    def _read(self, connection: _Connection) -> None:
        chunk = connection.sock.recv(_READ_BYTES)
        if not chunk:
            self._close(connection)
            return
        connection.received += chunk
        end = connection.received.find(b"\r\n\r\n")
        if end < 0:
            if len(connection.received) > MAX_REQUEST_BYTES:
                self._reply(connection, _error("431 Request Header Fields Too Large"))
            return
        try:
            response = self._answer(bytes(connection.received[:end]))
        except Exception:
            # A collector that raises must cost one scrape, not the endpoint's only thread.
            log.exception("metrics.scrape_failed")
            response = _error("500 Internal Server Error")
        self._reply(connection, response)

    def _answer(self, head: bytes) -> bytes:
        method, path, headers = _headers(head)
        if method not in {"GET", "HEAD"}:
            return _error("405 Method Not Allowed")
        if path is None:
            return _error("400 Bad Request")
        if path not in _PATHS:
            return _error("404 Not Found")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self._registry)
        response_headers = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            response_headers.append(("Content-Encoding", "gzip"))
        return _response("200 OK", response_headers, body, method == "HEAD")

    def _reply(self, connection: _Connection, response: bytes) -> None:
        connection.outgoing = memoryview(response)
        connection.deadline = time.monotonic() + self._idle_seconds
        self._selector.modify(connection.sock, selectors.EVENT_WRITE)
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        assert connection.outgoing is not None  # noqa: S101 (called once a reply is set)
        try:
            sent = connection.sock.send(connection.outgoing)
        except BlockingIOError:
            return
        connection.outgoing = connection.outgoing[sent:]
        if not connection.outgoing:
            # A close with unread input (a pipelined request, a body) makes the kernel send
            # a reset, which discards what is still queued for the client. Send the end of
            # the stream instead and read until the client closes, within the deadline.
            connection.sock.shutdown(socket.SHUT_WR)
            connection.draining = True
            self._selector.modify(connection.sock, selectors.EVENT_READ)
