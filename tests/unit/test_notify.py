"""Webhook notifications against a real local HTTP server."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from structlog.testing import capture_logs

from sovbackupd import __version__, notify
from sovbackupd.config.models import NotifyEvent, Webhook
from sovbackupd.redis_server import free_port

PAYLOAD = {"event": "failure", "backup": "sovereigncore_backup_20260102_140000", "size": 12}


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Answer:
    """What the server answers to one request."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)


class RecordingServer(ThreadingHTTPServer):
    """Records every request; answers from a script of statuses, then 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[Received] = []
        self.answers: list[Answer] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, *statuses: int | Answer) -> None:
        self.answers = [
            status if isinstance(status, Answer) else Answer(status) for status in statuses
        ]

    def next_answer(self, request: Received) -> Answer:
        with self.lock:
            self.received.append(request)
            return self.answers.pop(0) if self.answers else Answer(200)


class _Handler(BaseHTTPRequestHandler):
    server: RecordingServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = Received(self.command, self.path, dict(self.headers.items()), body)
        answer = self.server.next_answer(request)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve() -> tuple[RecordingServer, threading.Thread]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    """A real HTTP server on a free loopback port that records what it receives."""
    running, thread = serve()
    yield running
    running.shutdown()
    running.server_close()
    thread.join(5)


@pytest.fixture
def other_server() -> Iterator[RecordingServer]:
    """A second server, on another port, that a redirect could point to."""
    running, thread = serve()
    yield running
    running.shutdown()
    running.server_close()
    thread.join(5)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel completes them) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


class Sleeps(list[float]):
    """A fake sleep that records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def webhook(
    url: str,
    *,
    on: list[NotifyEvent] | None = None,
    retries: int = 3,
    timeout_seconds: float = 5,
) -> Webhook:
    return Webhook(
        type="webhook",
        url=url,
        on=on or ["success", "failure"],
        retries=retries,
        timeout_seconds=timeout_seconds,
    )


def test_payload_is_posted_as_json_with_our_headers(server: RecordingServer) -> None:
    """A 2xx answer is a delivery; the body is the JSON payload, with type and agent set."""
    sleeps = Sleeps()
    [delivery] = notify.send(
        [webhook(f"{server.base_url}/ping/abc")], "failure", PAYLOAD, sleep=sleeps
    )
    assert delivery == notify.Delivery(target=server.base_url, ok=True, attempts=1, error=None)
    [received] = server.received
    assert received.method == "POST"
    assert received.path == "/ping/abc"
    assert json.loads(received.body) == PAYLOAD
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["User-Agent"] == f"sovbackupd/{__version__}"
    assert sleeps == []


def test_values_json_cannot_hold_are_sent_as_text(server: RecordingServer) -> None:
    """A datetime in the payload arrives as its str() instead of failing the send."""
    created = datetime(2026, 1, 2, 14, 0, tzinfo=UTC)
    [delivery] = notify.send([webhook(server.base_url)], "success", {"created": created})
    assert delivery.ok
    assert json.loads(server.received[0].body) == {"created": str(created)}


def test_server_error_is_retried_with_backoff_until_it_succeeds(server: RecordingServer) -> None:
    """Two 500 answers then a 200: three attempts, waiting 1 s and then 2 s between them."""
    server.answer(500, 500, 200)
    sleeps = Sleeps()
    [delivery] = notify.send([webhook(server.base_url)], "failure", PAYLOAD, sleep=sleeps)
    assert delivery.ok
    assert delivery.attempts == 3
    assert sleeps == [1, 2]
    assert [json.loads(request.body) for request in server.received] == [PAYLOAD] * 3


@pytest.mark.parametrize("status", [408, 429, 502, 503])
def test_transient_answers_are_retried(server: RecordingServer, status: int) -> None:
    """408, 429 and other 5xx answers are retried like a 500."""
    server.answer(status)
    sleeps = Sleeps()
    [delivery] = notify.send([webhook(server.base_url)], "failure", PAYLOAD, sleep=sleeps)
    assert delivery.ok
    assert delivery.attempts == 2
    assert sleeps == [1]


def test_server_error_that_persists_is_reported_after_every_retry(
    server: RecordingServer,
) -> None:
    """A server that keeps answering 500 gets 1 + retries attempts, then a failed delivery."""
    server.answer(*[500] * 10)
    sleeps = Sleeps()
    [delivery] = notify.send(
        [webhook(server.base_url, retries=2)], "failure", PAYLOAD, sleep=sleeps
    )
    assert not delivery.ok
    assert delivery.attempts == 3
    assert delivery.error == "HTTP 500 Internal Server Error"
    assert len(server.received) == 3
    assert sleeps == [1, 2]


@pytest.mark.parametrize("status", [400, 401, 404, 410])
def test_client_error_is_not_retried(server: RecordingServer, status: int) -> None:
    """A 4xx answer other than 408 and 429 is final: one attempt, no wait."""
    server.answer(status)
    sleeps = Sleeps()
    [delivery] = notify.send([webhook(server.base_url)], "failure", PAYLOAD, sleep=sleeps)
    assert not delivery.ok
    assert delivery.attempts == 1
    assert delivery.error is not None
    assert delivery.error.startswith(f"HTTP {status} ")
    assert len(server.received) == 1
    assert sleeps == []


def test_closed_port_is_retried_and_reported_failed_without_raising() -> None:
    """Connection refused is retried *retries* times, then the delivery fails."""
    sleeps = Sleeps()
    [delivery] = notify.send(
        [webhook(f"http://127.0.0.1:{free_port()}/ping")], "failure", PAYLOAD, sleep=sleeps
    )
    assert not delivery.ok
    assert delivery.attempts == 4
    assert delivery.error is not None
    assert delivery.error.startswith("connection failed: ")
    assert sleeps == [1, 2, 4]


def test_backoff_doubles_up_to_its_cap() -> None:
    """Waits between attempts are 1, 2, 4 ... seconds, never more than 30."""
    sleeps = Sleeps()
    [delivery] = notify.send(
        [webhook(f"http://127.0.0.1:{free_port()}/", retries=7)], "failure", PAYLOAD, sleep=sleeps
    )
    assert delivery.attempts == 8
    assert sleeps == [1, 2, 4, 8, 16, 30, 30]


def test_server_that_never_answers_costs_one_timeout_per_attempt(silent_port: int) -> None:
    """A server that accepts and stays silent hits the timeout on each attempt, and no more."""
    sleeps = Sleeps()
    started = time.monotonic()
    [delivery] = notify.send(
        [webhook(f"http://127.0.0.1:{silent_port}/", retries=1, timeout_seconds=0.5)],
        "failure",
        PAYLOAD,
        sleep=sleeps,
    )
    elapsed = time.monotonic() - started
    assert not delivery.ok
    assert delivery.attempts == 2
    assert delivery.error == "no answer within 0.5 s"
    assert sleeps == [1]
    assert elapsed >= 1.0  # both attempts waited their whole timeout; load only adds


def test_only_webhooks_that_want_the_event_are_notified(server: RecordingServer) -> None:
    """The on list filters: a success reaches success hooks only."""
    webhooks = [
        webhook(f"{server.base_url}/failures", on=["failure"]),
        webhook(f"{server.base_url}/successes", on=["success"]),
        webhook(f"{server.base_url}/both", on=["success", "failure"]),
    ]
    deliveries = notify.send(webhooks, "success", PAYLOAD)
    assert [delivery.ok for delivery in deliveries] == [True, True]
    assert [request.path for request in server.received] == ["/successes", "/both"]


def test_default_webhook_reports_failures_only(server: RecordingServer) -> None:
    """A webhook without an on list hears about failures, not successes."""
    hook = Webhook(type="webhook", url=server.base_url)
    assert notify.send([hook], "success", PAYLOAD) == []
    assert len(notify.send([hook], "failure", PAYLOAD)) == 1


def test_credentials_in_the_url_are_sent_as_basic_auth(server: RecordingServer) -> None:
    """user:password@ in the URL becomes an Authorization header, percent-decoded."""
    port = server.server_address[1]
    [delivery] = notify.send(
        [webhook(f"http://ops%40example:p%3Ass@127.0.0.1:{port}/hook")], "failure", PAYLOAD
    )
    assert delivery.ok
    [received] = server.received
    assert received.path == "/hook"
    assert (
        received.headers["Authorization"]
        == "Basic " + base64.b64encode(b"ops@example:p:ss").decode()
    )


def test_target_and_logs_never_show_the_url_path_or_credentials(server: RecordingServer) -> None:
    """Secrets in a ping URL's path, query or userinfo stay out of results and events."""
    port = server.server_address[1]
    secret_url = f"http://user:hunter2@127.0.0.1:{port}/ping/secret-uuid?token=secret-token"
    server.answer(500, 404)
    with capture_logs() as events:
        [delivery] = notify.send([webhook(secret_url)], "failure", PAYLOAD, sleep=Sleeps())
    assert delivery.target == f"http://127.0.0.1:{port}"
    assert server.received[0].path == "/ping/secret-uuid?token=secret-token"
    assert server.received[0].headers["Authorization"] == "Basic dXNlcjpodW50ZXIy"
    shown = repr(delivery) + repr(events)
    for secret in ("secret", "hunter2", "/ping"):
        assert secret not in shown


def test_invalid_url_fails_without_retries_or_showing_its_path(server: RecordingServer) -> None:
    """A URL that http.client refuses fails once, without its path in the error.

    The policy already refuses a URL with whitespace; a port that is no number passes its
    pattern and is refused by http.client only.
    """
    sleeps = Sleeps()
    [delivery] = notify.send(
        [webhook(f"{server.base_url}x/secret-uuid")], "failure", PAYLOAD, sleep=sleeps
    )
    assert not delivery.ok
    assert delivery.attempts == 1
    assert delivery.error is not None
    assert delivery.error.startswith("invalid URL: ")
    assert "secret" not in delivery.error
    assert server.received == []
    assert sleeps == []


def test_target_keeps_scheme_host_and_explicit_port_only() -> None:
    """https, IPv6 and default ports come out as scheme://host[:port]."""
    assert notify.target_of("https://hc-ping.com/5f0c-uuid") == "https://hc-ping.com"
    assert notify.target_of("https://HC-Ping.com:8443/x?y") == "https://hc-ping.com:8443"
    assert notify.target_of("http://[::1]:9000/a") == "http://[::1]:9000"
    assert notify.target_of("http://a:b@host/p") == "http://host"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_not_followed(
    server: RecordingServer, other_server: RecordingServer, status: int
) -> None:
    """A 3xx answer fails the delivery without retries and without a request elsewhere."""
    server.answer(Answer(status, {"Location": f"{other_server.base_url}/elsewhere/secret"}))
    sleeps = Sleeps()
    [delivery] = notify.send([webhook(server.base_url)], "failure", PAYLOAD, sleep=sleeps)
    assert not delivery.ok
    assert delivery.attempts == 1
    assert delivery.error is not None
    assert delivery.error.endswith(f"redirected to {other_server.base_url}")
    assert other_server.received == []
    assert sleeps == []


def test_relative_redirect_names_the_same_host(server: RecordingServer) -> None:
    """A relative Location is reported against the webhook's own host."""
    server.answer(Answer(302, {"Location": "/moved/secret"}))
    [delivery] = notify.send([webhook(f"{server.base_url}/hook")], "failure", PAYLOAD)
    assert delivery.error == f"HTTP 302 Found: redirected to {server.base_url}"
    assert len(server.received) == 1


def test_notify_events_name_the_target_attempts_and_error(server: RecordingServer) -> None:
    """A retry logs notify.retrying; the outcome logs notify.sent or notify.failed."""
    server.answer(503, 200, 404)
    with capture_logs() as events:
        notify.send([webhook(server.base_url)], "failure", PAYLOAD, sleep=Sleeps())
        notify.send([webhook(server.base_url)], "success", PAYLOAD, sleep=Sleeps())
    assert [(event["event"], event["log_level"]) for event in events] == [
        ("notify.retrying", "info"),
        ("notify.sent", "info"),
        ("notify.failed", "warning"),
    ]
    retrying, sent, failed = events
    assert retrying["error"] == "HTTP 503 Service Unavailable"
    assert retrying["delay_seconds"] == 1
    assert sent["target"] == server.base_url
    assert sent["attempts"] == 2
    assert sent["result"] == "failure"
    assert failed["attempts"] == 1
    assert failed["error"] == "HTTP 404 Not Found"
    assert failed["result"] == "success"
