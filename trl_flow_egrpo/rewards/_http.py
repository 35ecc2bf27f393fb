"""A small thread-safe HTTP client with deadlines, retries and a response size cap, shared by the rewards that
call services.

Standard library only (``http.client``), so the remote rewards add no dependency. Each thread keeps its own
keep-alive connection: the trainer's async scoring thread and the main thread never share one.

Time limits: ``timeout`` bounds one whole request (connecting, sending the body, reading the status line, the
headers and every byte of the body), not each socket operation, so a server that sends one byte a second cannot
hold a call past it; ``total_timeout`` bounds a call with all its retries and backoff waits. Both are measured on
the monotonic clock. (Resolving the host name and an HTTPS handshake are bounded by the time left when the
connection opens, not by the deadline's later remainders.)
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from ..redaction import redact_url

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses worth retrying: overload (429, 503), a failing or restarting server (500, 502, 504)."""
MAX_BACKOFF_SECONDS = 30.0
READ_CHUNK_BYTES = 1 << 16
"""Bytes asked of the socket per read of a response body; the size cap is checked after each."""
# What a reused keep-alive connection raises when the server closed it while idle.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class ResponseTooLargeError(ValueError):
    """A response body larger than the client's ``max_response_bytes``; not retried (the server would answer the
    same again). The message names the URL and the cap."""


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


def parse_base_url(url: str, credential_hint: str = "the token argument") -> urllib.parse.SplitResult:
    """``url`` checked to be an ``http://`` or ``https://`` URL with a host and without credentials in it.

    Credentials in a URL (``http://user:password@host``) are refused: they would show in reprs, logs and error
    messages, and the client would not send them anyway. ``credential_hint`` says where they go instead.

    Raises:
        ValueError: naming the URL (credentials masked as ``***``) and what is wrong with it.
    """
    shown = redact_url(url)
    if shown != str(url):
        raise ValueError(
            f"{shown!r} has credentials in it (user:password@); they are refused because they would show in "
            f"logs and error messages. Remove them from the URL and pass the secret as {credential_hint}."
        )
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host, e.g. 'http://127.0.0.1:8711'.")
    try:
        _ = parts.port  # raises ValueError for an invalid port
    except ValueError as error:
        raise ValueError(f"{url!r} has an invalid port ({error}).") from error
    return parts


def check_secret(secret: str, name: str) -> None:
    """A clear error, which does not show ``secret``, when it cannot be sent in an ``Authorization`` header.

    A bearer token is visible ASCII without spaces (RFC 6750). Anything else, typically the line break at the
    end of a token read from a file, would make ``http.client`` raise at the first request with the whole
    header, token included, in its message.

    Raises:
        ValueError: naming ``name`` and the position of the first bad character, not the secret.
    """
    if not isinstance(secret, str):
        raise ValueError(f"{name} must be a string, got a {type(secret).__name__}.")
    for position, character in enumerate(secret):
        if not "!" <= character <= "~":
            raise ValueError(
                f"{name} has a character that cannot be sent in an Authorization header at position {position} "
                f"(of {len(secret)}; code point {ord(character)}): a token is visible ASCII without spaces. "
                "Strip it, e.g. the line break at the end of a token read from a file."
            )


def seconds_left(deadline: float) -> float:
    """Seconds until ``deadline`` (``time.monotonic()`` time), > 0.

    Raises:
        TimeoutError: the deadline has passed.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out: the request's deadline passed")
    return left


class _DeadlineReader(io.RawIOBase):
    """The raw reader of a response: each socket read waits at most until the request's deadline, so the
    status line, the headers and the body together cannot take longer, however slowly the bytes come.

    It reads through the socket's own unbuffered file, which keeps the socket open while the response is read
    (``http.client`` closes its connection's handle as soon as it sees ``Connection: close``)."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock, self._deadline = sock, deadline
        self._raw = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(seconds_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` is given instead of the socket: it only calls ``makefile``."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineConnectionMixin:
    """An ``http.client`` connection whose sends and reads all end by ``self.deadline`` (monotonic time)."""

    deadline = float("inf")

    def send(self, data) -> None:
        if self.sock is not None:  # sendall's timeout bounds the whole call (Python >= 3.5), not each chunk
            self.sock.settimeout(seconds_left(self.deadline))
        super().send(data)

    def response_class(self, sock, *args, **kwargs) -> http.client.HTTPResponse:
        # ``getresponse`` calls ``self.response_class(sock, ...)``; as a method this sees the request's deadline.
        return http.client.HTTPResponse(_DeadlineSocket(sock, self.deadline), *args, **kwargs)


class _HTTPConnection(_DeadlineConnectionMixin, http.client.HTTPConnection):
    """Plain HTTP with a request deadline."""


class _HTTPSConnection(_DeadlineConnectionMixin, http.client.HTTPSConnection):
    """HTTPS with a request deadline."""


def read_body(response: http.client.HTTPResponse, max_bytes: int, url: str) -> bytes:
    """The body of ``response``, read in chunks, refused as soon as it is known to exceed ``max_bytes``.

    Raises:
        ResponseTooLargeError: the announced ``Content-Length`` or the bytes received exceed ``max_bytes``.
    """
    announced = response.getheader("Content-Length")
    if announced is not None and announced.strip().isdigit() and int(announced) > max_bytes:
        raise _too_large(url, max_bytes, f"it announced {int(announced)} bytes")
    chunks, received = [], 0
    while True:
        chunk = response.read(min(READ_CHUNK_BYTES, max_bytes + 1 - received))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(url, max_bytes, f"more than {max_bytes} bytes arrived")


def _too_large(url: str, max_bytes: int, what: str) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"The response of {url} is larger than the cap of {max_bytes} bytes (max_response_bytes): {what}. Check "
        "that the URL is the right service, or raise max_response_bytes if such answers are expected."
    )


class HttpClient:
    """Requests to one server, one keep-alive connection per thread.

    Args:
        base_url: ``http(s)://host[:port][/prefix]``; request paths are appended to the prefix. Credentials in
            it are refused (see :func:`parse_base_url`).
        timeout: seconds one request may take in all: connecting, sending, and reading the whole answer.
        headers: sent with every request (e.g. ``Authorization``); never shown by ``repr``.
        max_response_bytes: the largest response body accepted.
        credential_hint: where credentials go instead of the URL, for the error that refuses them.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float,
        headers: dict[str, str] | None = None,
        max_response_bytes: int = 1 << 24,
        credential_hint: str = "the token argument",
    ):
        parts = parse_base_url(base_url, credential_hint)
        self.base_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._connection_class = _HTTPSConnection if parts.scheme == "https" else _HTTPConnection
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path.rstrip("/")
        self.timeout, self.headers, self.max_response_bytes = timeout, dict(headers or {}), max_response_bytes
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"HttpClient({self.base_url!r}, timeout={self.timeout}, headers={sorted(self.headers)})"

    def url(self, path: str) -> str:
        """The full URL of ``path``."""
        return self.base_url + path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        deadline: float = float("inf"),
    ) -> Response:
        """Send one request on this thread's connection, all of it within ``timeout`` seconds and before
        ``deadline`` (``time.monotonic()`` time), whichever comes first.

        A keep-alive connection the server closed while idle is replaced and the request sent once more (within
        the same time limit), without counting as a failure.

        Raises:
            TimeoutError: the time limit passed; the message says which limit.
            OSError, http.client.HTTPException: other connection problems.
            ResponseTooLargeError: the body exceeds ``max_response_bytes``.
        """
        limit = min(self.timeout, deadline - time.monotonic())
        request_deadline = time.monotonic() + limit
        reused = getattr(self._local, "connection", None) is not None
        try:
            try:
                return self._send(method, path, body, headers, request_deadline)
            except _STALE_CONNECTION:
                if not reused:
                    raise
                return self._send(method, path, body, headers, request_deadline)
        except TimeoutError as error:
            raise TimeoutError(f"timed out: no complete answer within {max(limit, 0.0):.3g} s") from error

    def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None, deadline: float
    ) -> Response:
        connection = getattr(self._local, "connection", None)
        try:
            if connection is None:
                connection = self._local.connection = self._connection_class(
                    self._host, self._port, timeout=seconds_left(deadline)
                )
                connection.connect()
                # Small requests go out at once instead of waiting for the server's delayed ACK (Nagle).
                connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.deadline = deadline
            connection.request(method, self._prefix + path, body=body, headers={**self.headers, **(headers or {})})
            response = connection.getresponse()
            result = Response(response.status, read_body(response, self.max_response_bytes, self.url(path)))
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
    send: Callable[[float], Response],
    retries: int,
    backoff: float,
    give_up: Callable[[str, int], Exception],
    total_timeout: float = float("inf"),
) -> Response:
    """``send(deadline)`` until it returns a response whose status is not in :data:`RETRY_STATUSES`, at most
    ``retries + 1`` times and within ``total_timeout`` seconds in all; connection errors and timeouts are
    retried too. ``deadline`` is the ``time.monotonic()`` time by which ``send`` must be done.

    Waits ``backoff * 2^k`` seconds (at most :data:`MAX_BACKOFF_SECONDS`) before retry ``k + 1``; a retry whose
    wait would end past ``total_timeout`` is not made. Then raises ``give_up(problem, attempts)``, where
    ``problem`` says what failed the last time (and that the total time ran out, if it did).
    """
    deadline = time.monotonic() + total_timeout
    problem, attempts = "no attempt made", 0
    for attempt in range(retries + 1):
        if attempt:
            wait = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
            if time.monotonic() + wait >= deadline:
                problem += f"; no time left for a retry within total_timeout={total_timeout:g} s"
                break
            time.sleep(wait)
        attempts += 1
        try:
            response = send(deadline)
        except (OSError, http.client.HTTPException) as error:
            problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            continue
        if response.status not in RETRY_STATUSES:
            return response
        problem = f"HTTP {response.status}: {response.detail()}"
    raise give_up(problem, attempts)


def check_retry_settings(timeout: float, retries: int, backoff: float) -> None:
    """Clear errors for unusable ``timeout`` / ``retries`` / ``backoff`` values."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}.")
    if not backoff >= 0:
        raise ValueError(f"backoff must be >= 0 seconds, got {backoff}.")


def resolve_total_timeout(total_timeout: float | None, timeout: float) -> float:
    """``total_timeout`` checked, or its default ``2 * timeout`` (one stalled attempt and one full retry).

    Raises:
        ValueError: ``total_timeout`` is not a number > 0.
    """
    if total_timeout is None:
        return 2 * timeout
    if isinstance(total_timeout, bool) or not isinstance(total_timeout, int | float) or not total_timeout > 0:
        raise ValueError(f"total_timeout must be > 0 seconds (or None for 2 * timeout), got {total_timeout!r}.")
    return float(total_timeout)


def check_max_response_bytes(max_response_bytes: int) -> None:
    """A clear error for a ``max_response_bytes`` that is not an integer >= 1."""
    if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1:
        raise ValueError(f"max_response_bytes must be an integer >= 1, got {max_response_bytes!r}.")
