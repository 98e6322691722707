"""The /metrics server over real sockets: bounded connections, idle time and request size."""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from sovbackupd.exposition import MAX_REQUEST_BYTES, MetricsServer

HALF_OPEN = 1000
CAP = 16


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    """A server on a free port with one gauge, at most CAP connections, 0.2 s idle."""
    registry = CollectorRegistry()
    Gauge("probe", "A probe.", registry=registry).set(42)
    serving = MetricsServer(registry, "127.0.0.1", 0, max_connections=CAP, idle_seconds=0.2)
    serving.start()
    yield serving
    serving.shutdown()


def get(server: MetricsServer, path: str = "/metrics", method: str = "GET") -> tuple[int, bytes]:
    """Return the status and body of one request to *server*."""
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        client.request(method, path)
        response = client.getresponse()
        return response.status, response.read()
    finally:
        client.close()


def probe_value(body: bytes) -> float:
    """Return the probe gauge's value in an exposition *body*."""
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "probe":
                return float(sample.value)
    raise AssertionError("no probe sample")


def half_sent(port: int) -> socket.socket:
    """Open a connection that sends the start of a request and never finishes it."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    return connection


def test_a_thousand_half_sent_requests_cost_no_thread_and_metrics_stay_answered(
    server: MetricsServer,
) -> None:
    """1000 idle clients: no thread per connection, at most CAP held, /metrics still served."""
    threads = threading.active_count()
    held = [half_sent(server.port) for _ in range(HALF_OPEN)]
    try:
        status, body = get(server)
        assert status == 200
        assert probe_value(body) == 42
        assert threading.active_count() == threads
        assert server.connections <= CAP
        # The oldest were closed to make room: they read the end of the stream.
        held[0].settimeout(30)
        assert held[0].recv(1) == b""
    finally:
        for connection in held:
            connection.close()


def test_an_idle_connection_is_closed_at_its_bound(server: MetricsServer) -> None:
    """A client that never finishes its request is disconnected after idle_seconds."""
    connection = half_sent(server.port)
    with connection:
        connection.settimeout(30)  # far beyond the bound: a hang fails, not a slow machine
        assert connection.recv(1) == b""


def test_an_oversized_request_head_gets_431(server: MetricsServer) -> None:
    """Headers beyond MAX_REQUEST_BYTES are refused, not buffered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES)
        assert connection.recv(64).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [("/metrics", "GET", 200), ("/", "GET", 200), ("/other", "GET", 404), ("/", "POST", 405)],
)
def test_paths_and_methods(server: MetricsServer, path: str, method: str, status: int) -> None:
    """/metrics and / serve the registry; other paths are 404, other methods 405."""
    assert get(server, path, method)[0] == status


def test_head_gets_the_headers_without_the_body(server: MetricsServer) -> None:
    """HEAD /metrics answers 200 with an empty body."""
    assert get(server, "/metrics", "HEAD") == (200, b"")


class Failing:
    """A collector that raises on every scrape."""

    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("broken collector")


def test_a_raising_collector_costs_one_scrape_not_the_endpoint() -> None:
    """A scrape that raises answers 500 and is logged; the server keeps serving."""
    registry = CollectorRegistry()
    failing = Failing()
    registry.register(failing)
    serving = MetricsServer(registry, "127.0.0.1", 0)
    serving.start()
    try:
        with capture_logs() as events:
            assert get(serving)[0] == 500
        assert [event["event"] for event in events] == ["metrics.scrape_failed"]
        registry.unregister(failing)
        assert get(serving)[0] == 200
    finally:
        serving.shutdown()


def raw(server: MetricsServer, request: bytes) -> bytes:
    """Send *request* as is and return everything the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
        return answer


@pytest.mark.parametrize("target", [b"http://[::1/metrics", b"//[/metrics", b"http://a]/metrics"])
def test_a_request_target_that_is_no_url_is_a_400_not_a_logged_traceback(
    server: MetricsServer, target: bytes
) -> None:
    """Anyone who can reach the port could otherwise write a traceback to the journal per request.

    A malformed request is the client's fault: 400, and nothing logged at error level.
    """
    with capture_logs() as events:
        answer = raw(server, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert events == []
    assert get(server)[0] == 200


def test_out_of_descriptors_is_a_few_warnings_not_a_busy_loop(server: MetricsServer) -> None:
    """EMFILE on accept with no connection to close must not spin on the listener.

    The listener stays readable while the client waits in the backlog: retrying at once
    logged tens of thousands of `metrics.accept_failed` warnings a second on one core.
    Once descriptors are free again, the waiting client is answered.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    client = socket.socket()
    client.settimeout(30)
    held: list[int] = []
    try:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (len(list(Path("/proc/self/fd").iterdir())) + 8, hard)
        )
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        with capture_logs() as events:
            client.connect(("127.0.0.1", server.port))  # waits in the listener's backlog
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            for _ in range(1500):  # bounded: until the server has met the limit
                if events:
                    break
                time.sleep(0.02)
            time.sleep(0.5)  # a busy loop logs thousands here; load only lowers the count
            failures = [event for event in events if event["event"] == "metrics.accept_failed"]
        assert 1 <= len(failures) <= 3
    finally:
        for descriptor in held:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with client:
        assert client.recv(64).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "extra",
    [b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 300, b"x" * 20_000],
    ids=["pipelined requests", "a body after the head"],
)
def test_bytes_sent_after_the_request_never_reset_the_answer(extra: bytes) -> None:
    """A client that pipelines (or sends anything after its head) gets its answer and an EOF.

    Closing a socket with unread input makes the kernel send a reset, which discards what
    is still queued for the client: it saw ECONNRESET instead of the end of the response.
    """
    registry = CollectorRegistry()
    gauge = Gauge("wide", "Many series.", ["label"], registry=registry)
    for number in range(3000):  # an answer of ~100 KiB, more than one send() takes
        gauge.labels(label=f"value{number:05}").set(number)
    serving = MetricsServer(registry, "127.0.0.1", 0)
    serving.start()
    try:
        answer = raw(serving, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" + extra)
    finally:
        serving.shutdown()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(body)}".encode() in head
    assert body.count(b'wide{label="value') == 3000
