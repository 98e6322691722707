"""Webhook notifications: a JSON POST per backup result, retried, never raising.

Ping URLs (healthchecks.io and the like) carry their secret in the path, so logs and
results name a webhook only by its ``scheme://host[:port]``.

Credentials in the URL (``https://user:password@host/...``) are sent as HTTP Basic
authentication, as curl does.

Redirects are not followed: urllib would turn a POST answered with 301, 302 or 303 into
a body-less GET to whatever host the answer names. A 3xx answer is a failure (not
retried) whose error names where it pointed, so that the operator can put the final URL
in the policy. Proxies from the environment (``https_proxy``, ``no_proxy``) apply as
usual.

Each attempt is bounded by the webhook's ``timeout_seconds``, which urllib applies to
the connection and to each read: a server that accepts and then stays silent costs one
timeout per attempt, so a delivery takes at most ``timeout_seconds * (retries + 1)``
plus the backoff between attempts. A server that trickles its answer byte by byte, or a
resolver that is slow to answer, can stretch an attempt beyond that.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Literal
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import structlog

from sovbackupd import __version__
from sovbackupd.config.models import Webhook

log = structlog.get_logger("sovbackupd.notify")

BACKOFF_CAP_SECONDS = 30.0
"""The longest wait between two attempts; waits double from 1 s up to this."""
_RETRIED_STATUSES = frozenset({408, 429})
_ANSWER_READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class Delivery:
    """How one webhook's notification went."""

    target: str  # the URL's scheme://host[:port] only: ping URLs carry secrets in their path
    ok: bool
    attempts: int
    error: str | None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(  # noqa: PLR0917 (urllib's signature)
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None  # urllib then raises HTTPError with the 3xx status


_opener = urllib.request.build_opener(_NoRedirects)


def target_of(url: str) -> str:
    """Return the ``scheme://host[:port]`` of *url*, without credentials, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def backoff_seconds(retry: int) -> float:
    """Return the seconds to wait before retry number *retry*: 1, 2, 4 ... up to the cap."""
    return min(2.0 ** (retry - 1), BACKOFF_CAP_SECONDS)


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    retry: bool
    error: str | None


def _request(url: str, body: bytes) -> urllib.request.Request:
    headers = {"Content-Type": "application/json", "User-Agent": f"sovbackupd/{__version__}"}
    parts = urlsplit(url)
    if parts.username is not None:
        # urllib would take user:password@ for part of the host; send it as curl does.
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    # The policy allows only http and https URLs.
    return urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310


def _attempt(webhook: Webhook, body: bytes) -> _Outcome:
    request = _request(webhook.url, body)
    try:
        with _opener.open(request, timeout=webhook.timeout_seconds) as answer:
            answer.read(_ANSWER_READ_BYTES)
            return _Outcome(ok=True, retry=False, error=None)
    except urllib.error.HTTPError as error:
        error.close()
        status = f"HTTP {error.code} {error.reason}".rstrip()
        if 300 <= error.code < 400:
            location = error.headers.get("Location")
            where = target_of(urljoin(request.full_url, location)) if location else "nowhere"
            return _Outcome(ok=False, retry=False, error=f"{status}: redirected to {where}")
        return _Outcome(
            ok=False,
            retry=error.code >= 500 or error.code in _RETRIED_STATUSES,
            error=status,
        )
    except urllib.error.URLError as error:
        if isinstance(error.reason, ssl.SSLCertVerificationError):
            return _Outcome(ok=False, retry=False, error=f"TLS: {error.reason.verify_message}")
        reason = error.reason
        if isinstance(reason, TimeoutError):
            return _Outcome(ok=False, retry=True, error=_timed_out(webhook))
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        return _Outcome(ok=False, retry=True, error=f"connection failed: {text}")
    except TimeoutError:
        return _Outcome(ok=False, retry=True, error=_timed_out(webhook))
    except (http.client.InvalidURL, ValueError) as error:
        return _Outcome(ok=False, retry=False, error=f"invalid URL: {error}")
    except (OSError, http.client.HTTPException) as error:
        return _Outcome(ok=False, retry=True, error=f"{type(error).__name__}: {error}")


def _scrub(text: str, url: str) -> str:
    """Return *text* without the parts of *url* that may be secret (for error messages)."""
    parts = urlsplit(url)
    secrets = [url, parts.path, parts.query, parts.password or ""]
    if parts.username is not None:
        secrets.append(parts.netloc)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) > 1:
            text = text.replace(secret, "...")
    return text


def _timed_out(webhook: Webhook) -> str:
    return f"no answer within {webhook.timeout_seconds:g} s"


def _deliver(webhook: Webhook, body: bytes, sleep: Callable[[float], None]) -> Delivery:
    target = target_of(webhook.url)
    attempts = 0
    outcome = _Outcome(ok=False, retry=True, error=None)
    while outcome.retry and attempts <= webhook.retries:
        if attempts:
            delay = backoff_seconds(attempts)
            log.info(
                "notify.retrying",
                target=target,
                attempts=attempts,
                error=outcome.error,
                delay_seconds=delay,
            )
            sleep(delay)
        attempts += 1
        try:
            outcome = _attempt(webhook, body)
        except Exception as error:  # a notification must never fail a backup
            outcome = _Outcome(ok=False, retry=False, error=f"{type(error).__name__}: {error}")
        if outcome.error is not None:
            outcome = _Outcome(outcome.ok, outcome.retry, _scrub(outcome.error, webhook.url))
    return Delivery(target=target, ok=outcome.ok, attempts=attempts, error=outcome.error)


def send(
    webhooks: Sequence[Webhook],
    event: Literal["success", "failure"],
    payload: Mapping[str, object],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Delivery]:
    """POST *payload* as JSON to each webhook whose ``on`` includes *event*.

    Connection errors, timeouts, 408, 429 and 5xx answers are retried ``retries`` times,
    waiting 1, 2, 4 ... seconds (at most BACKOFF_CAP_SECONDS) through *sleep*; other
    answers are final. Values that JSON cannot hold are sent as their ``str()``. Return
    one delivery per webhook notified, in order; never raise for a delivery's failure.
    """
    body = json.dumps(dict(payload), default=str).encode()
    deliveries = []
    for webhook in webhooks:
        if event not in webhook.on:
            continue
        delivery = _deliver(webhook, body, sleep)
        deliveries.append(delivery)
        if delivery.ok:
            log.info(
                "notify.sent", target=delivery.target, result=event, attempts=delivery.attempts
            )
        else:
            log.warning(
                "notify.failed",
                target=delivery.target,
                result=event,
                attempts=delivery.attempts,
                error=delivery.error,
            )
    return deliveries
