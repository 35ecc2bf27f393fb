"""The reward server's defences against clients that hold connections without sending requests.

uvicorn has no timeout for reading a request head: ``timeout_keep_alive`` only starts after a response, so a
connection that sends nothing, or half a request line, stays open as long as its client wants. And uvicorn's
``limit_concurrency`` counts open connections, idle ones included, so 64 such connections (the default
``--max-connections``) made every real request a 503. Two small pieces fix that, both working from uvicorn
0.30 (the ``server`` extra's lower bound) to the latest:

* :func:`head_timeout_protocol`: uvicorn's own h11 protocol with one timer more. A connection must send a
  complete request head (request line and headers) within ``timeout`` seconds of opening, of the first byte
  of its next request on a kept-alive connection, or of a response sent before it finished its request body,
  or it is closed. The timer is not reset by further bytes, so trickling a byte at a time does not keep a
  connection open either.
* :class:`RequestLimit`: an ASGI middleware that answers 503 beyond ``limit`` requests in progress. It counts
  requests, not connections, so connections waiting to send a request never lock real clients out.

Importing this module imports uvicorn and h11 (the ``server`` extra).
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not send a complete request head within
    :attr:`head_timeout` seconds. Build a subclass with the timeout you want with :func:`head_timeout_protocol`.

    The timer starts whenever the server waits for a client's next request: when the connection opens, when
    the first bytes of a new request arrive on a kept-alive connection (before them, uvicorn's keep-alive
    timeout applies), and when a response went out before the client finished sending its request body (the
    server refused it unread, e.g. with 401 or 413). It stops when h11 has parsed a new request head; if none
    came by then, the connection is closed. Further bytes do not reset it, so a client trickling a byte at a
    time does not keep a connection open either. Only methods uvicorn's h11 protocol has had since 0.30 are
    extended, each calling the original first.
    """

    head_timeout: float  # set by head_timeout_protocol
    _head_timer: asyncio.TimerHandle | None = None
    _timed_cycle: object = None  # uvicorn's request cycle when the timer started; a new request replaces it

    def connection_made(self, transport) -> None:
        """A new connection: start the timer."""
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        """Bytes arrived: start the timer on a kept-alive connection's next request, stop it once a head is in."""
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._timed_cycle:
            self._cancel_head_timer()  # a new request head was parsed: the application has it now

    def on_response_complete(self) -> None:
        """A response went out: start the timer if the client still owes the rest of its body (which the
        server will not read) or part of its next request is already buffered."""
        super().on_response_complete()
        if self.transport.is_closing() or not self.cycle.response_complete:
            return  # closing, or a pipelined request that super() started is running
        owes_body = self.conn.their_state is h11.SEND_BODY
        buffered_head = self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]
        if owes_body or buffered_head:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed: stop the timer."""
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._timed_cycle = self.cycle
        self._head_timer = asyncio.get_running_loop().call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is self._timed_cycle and not self.transport.is_closing():
            logger.debug("Closing %s: no complete request within %s s", self.client, self.head_timeout)
            self.transport.close()


def head_timeout_protocol(timeout: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: :class:`HeadTimeoutH11Protocol` closing
    connections without a complete request head after ``timeout`` seconds.

    Raises:
        ValueError: ``timeout`` is not a positive number.
    """
    if not timeout > 0:
        raise ValueError(f"The request timeout must be > 0 seconds, got {timeout}.")
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout": float(timeout)})


class RequestLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in progress in ``app``; beyond it, 503 with
    ``{"detail": message}`` and ``Retry-After: 1`` (RemoteReward retries 503 with backoff).

    A request counts from the moment its head is parsed until its response is sent; open connections
    without a request do not count.

    Raises:
        ValueError: ``limit`` < 1.
    """

    def __init__(self, app, limit: int):
        if limit < 1:
            raise ValueError(f"The request limit must be >= 1, got {limit}.")
        self.app, self.limit, self.in_progress = app, limit, 0

    async def __call__(self, scope, receive, send) -> None:
        """The ASGI interface: pass HTTP requests on while fewer than ``limit`` are in progress, else 503."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            await self._refuse(send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1

    async def _refuse(self, send) -> None:
        body = json.dumps(
            {
                "detail": f"The server is handling {self.limit} requests (--max-connections); "
                "retry in a moment (RemoteReward retries by itself)."
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
