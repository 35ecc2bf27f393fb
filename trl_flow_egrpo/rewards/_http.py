"""A small thread-safe HTTP client with retries, shared by the rewards that call services.

Standard library only (``http.client``), so the remote rewards add no dependency. Each thread keeps its own
keep-alive connection: the trainer's async scoring thread and the main thread never share one.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses worth retrying: overload (429, 503), a failing or restarting server (500, 502, 504)."""
MAX_BACKOFF_SECONDS = 30.0
# What a reused keep-alive connection raises when the server closed it while idle.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass
class Response:
    """An HTTP response: status code and body."""

    status: int
    body: bytes

    def json_body(self):
        """The body parsed as JSON (``ValueError`` if it is not)."""
        return json.loads(self.body)

    def detail(self) -> str:
        """The error message of the body: ``{"detail": ...}`` (FastAPI), ``{"error": {"message": ...}}``
        (OpenAI-compatible servers), ``{"message": ...}``, else the start of the body as text."""
        try:
            payload = json.loads(self.body)
        except ValueError:
            return self.body[:300].decode(errors="replace").strip() or "(empty body)"
        if isinstance(payload, dict):
            error = payload.get("error")
            for value in (
                payload.get("detail"),
                error.get("message") if isinstance(error, dict) else error,
                payload.get("message"),
            ):
                if value:
                    return value if isinstance(value, str) else json.dumps(value)
        return json.dumps(payload)[:300]


def parse_base_url(url: str) -> urllib.parse.SplitResult:
    """``url`` checked to be an ``http://`` or ``https://`` URL with a host.

    Raises:
        ValueError: naming the URL and what is wrong with it.
    """
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host, e.g. 'http://127.0.0.1:8711'.")
    try:
        _ = parts.port  # raises ValueError for an invalid port
    except ValueError as error:
        raise ValueError(f"{url!r} has an invalid port ({error}).") from error
    return parts


class HttpClient:
    """Requests to one server, one keep-alive connection per thread.

    Args:
        base_url: ``http(s)://host[:port][/prefix]``; request paths are appended to the prefix.
        timeout: seconds to wait for the connection and for each read.
        headers: sent with every request (e.g. ``Authorization``).
    """

    def __init__(self, base_url: str, timeout: float, headers: dict[str, str] | None = None):
        parts = parse_base_url(base_url)
        self.base_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path.rstrip("/")
        self.timeout, self.headers = timeout, dict(headers or {})
        self._local = threading.local()

    def url(self, path: str) -> str:
        """The full URL of ``path``."""
        return self.base_url + path

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request on this thread's connection; raises ``OSError`` / ``http.client.HTTPException`` on
        connection problems and timeouts. A keep-alive connection the server closed while idle is replaced and
        the request sent once more, without counting as a failure."""
        reused = getattr(self._local, "connection", None) is not None
        try:
            return self._send(method, path, body, headers)
        except _STALE_CONNECTION:
            if not reused:
                raise
            return self._send(method, path, body, headers)

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> Response:
        connection = getattr(self._local, "connection", None)
        try:
            if connection is None:
                connection = self._local.connection = self._connection_class(
                    self._host, self._port, timeout=self.timeout
                )
                connection.connect()
                # Small requests go out at once instead of waiting for the server's delayed ACK (Nagle).
                connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.request(method, self._prefix + path, body=body, headers={**self.headers, **(headers or {})})
            response = connection.getresponse()
            result = Response(response.status, response.read())
        except BaseException:
            if connection is not None:
                connection.close()
            self._local.connection = None
            raise
        if response.will_close:
            connection.close()
            self._local.connection = None
        return result


def with_retries(
    send: Callable[[], Response], retries: int, backoff: float, give_up: Callable[[str, int], Exception]
) -> Response:
    """``send()`` until it returns a response whose status is not in :data:`RETRY_STATUSES`, at most
    ``retries + 1`` times; connection errors and timeouts are retried too.

    Waits ``backoff * 2^k`` seconds (at most :data:`MAX_BACKOFF_SECONDS`) before retry ``k + 1``. After the
    last attempt raises ``give_up(problem, attempts)``, where ``problem`` says what failed the last time.
    """
    problem = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))
        try:
            response = send()
        except (OSError, http.client.HTTPException) as error:
            problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            continue
        if response.status not in RETRY_STATUSES:
            return response
        problem = f"HTTP {response.status}: {response.detail()}"
    raise give_up(problem, retries + 1)


def check_retry_settings(timeout: float, retries: int, backoff: float) -> None:
    """Clear errors for unusable ``timeout`` / ``retries`` / ``backoff`` values."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}.")
    if not backoff >= 0:
        raise ValueError(f"backoff must be >= 0 seconds, got {backoff}.")
