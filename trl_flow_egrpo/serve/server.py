"""The reward server: one reward behind ``POST /score`` and ``GET /health``, on FastAPI and uvicorn.

Start it with ``trl-flow-egrpo serve-reward NAME`` (:mod:`trl_flow_egrpo.cli`); train against it with
:class:`~trl_flow_egrpo.rewards.remote.RemoteReward`. The wire format is :mod:`.protocol`: uint8 images as raw
arrays or PNG, never pickle.

Requests from any number of clients (several training processes, the async scoring thread) are decoded in
the event loop's thread pool and queued; one worker thread owns the reward and scores the queue. When it
picks up work it merges every queued request that is compatible with the first one (same image size, same
column names) into one call, up to ``batch_size`` images, so concurrent requests share model batches; a
request larger than ``batch_size`` is scored in chunks. If a merged call fails, its requests are scored one
by one, so one bad request never fails another's.

Errors never stop the server: a body that is not a valid request gets 400, one over the limits 413, a body
that stalls 408, a missing or wrong token 401, a reward that rejects its input (``ValueError``, including
wrong or non-finite scores) 422, more requests at once than ``--max-connections`` 503, and any other failure
of the reward 500; each with ``{"detail": message}``. Connections that send no complete request head within
the request timeout are closed (:mod:`.guards`).
"""

# No "from __future__ import annotations": FastAPI reads the route handlers' annotations at runtime, and
# Request is imported inside create_app.
import asyncio
import hmac
import importlib
import ipaddress
import logging
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..scoring import call_reward, reward_name
from .protocol import (
    DEFAULT_REQUEST_TIMEOUT,
    PROTOCOL_VERSION,
    ProtocolError,
    ScoreBatch,
    check_token,
    decode_request,
    dequantize,
)

logger = logging.getLogger(__name__)

SERVER_HINT = 'pip install "trl-flow-egrpo[server]"'


class RewardFailure(Exception):
    """The reward raised on a batch; ``status`` is 422 for a ``ValueError`` (the input), else 500."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- the reward


def load_reward(name: str, kwargs: dict | None = None) -> Callable:
    """The reward to serve: a registry name (``hps``, ``color``, ...; :func:`~trl_flow_egrpo.registry.build_reward`
    with ``kwargs``) or ``module:attribute``. An imported class is instantiated with ``kwargs``; any other
    imported callable is the reward itself and takes no ``kwargs``.

    Raises:
        ValueError: unknown name, unimportable module, missing attribute, not callable, or ``kwargs`` given to
            a callable that is not a class.
    """
    kwargs = dict(kwargs or {})
    if ":" not in name:
        from ..registry import build_reward

        return build_reward(name, **kwargs)
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"Cannot import {module_name!r} for the reward {name!r} ({error}). Give a built-in reward "
            "name or module:callable of an importable module (is it on PYTHONPATH?)."
        ) from error
    target = getattr(module, attribute, None)
    if not callable(target):
        raise ValueError(f"{name!r}: module {module_name!r} has no callable {attribute!r}.")
    if isinstance(target, type):
        return target(**kwargs)
    if kwargs:
        raise ValueError(
            f"{name!r} is a function, not a class: it is served as it is and takes no --reward-kwargs. "
            "Point at a class, or bind the arguments in your module."
        )
    return target


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class _Job:
    batch: ScoreBatch
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        """Jobs with equal keys can be scored in one reward call."""
        return tuple(self.batch.images.shape[2:]), tuple(sorted(self.batch.columns))


class BatchScorer:
    """Owns the reward; scores submitted batches in one worker thread, merging compatible ones.

    Args:
        reward: the reward callable.
        device: where the images are put (as float32 ``u / 255``) before the reward is called.
        batch_size: the most images per reward call.
    """

    def __init__(self, reward: Callable, device: str, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.reward, self.name = reward, reward_name(reward)
        self.device, self.batch_size = torch.device(device), batch_size
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._held: list[_Job] = []  # taken from the queue but not compatible with the last group
        self._thread = threading.Thread(target=self._work, name="reward-scorer", daemon=True)
        self._thread.start()

    def submit(self, batch: ScoreBatch) -> Future:
        """Queue ``batch``; the future's result is its list of scores, or a :class:`RewardFailure`."""
        job = _Job(batch)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Stop the worker after the queued jobs."""
        self._queue.put(None)
        self._thread.join()

    def score(self, batch: ScoreBatch) -> list[float]:
        """Score one batch in the calling thread, in chunks of ``batch_size`` (the worker and the warm-up use it)."""
        images, prompts, columns = batch.images, batch.prompts, batch.columns
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            with torch.no_grad():
                chunk = call_reward(
                    self.name,
                    self.reward,
                    dequantize(images[start:stop], self.device),
                    prompts[start:stop],
                    {name: values[start:stop] for name, values in columns.items()},
                )
            scores.extend(chunk.tolist())
        return scores

    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            self._score_group(group)

    def _next_group(self) -> list[_Job] | None:
        """The next jobs to score together: the oldest job, then every queued compatible one that still fits."""
        while True:
            try:
                job = self._queue.get(block=not self._held)
            except queue.Empty:
                break
            if job is None:
                if not self._held:
                    return None
                self._queue.put(None)  # finish the held jobs first
                break
            self._held.append(job)
        first, rest = self._held[0], self._held[1:]
        group, size, self._held = [first], len(first.batch), []
        for job in rest:
            if job.key() == first.key() and size + len(job.batch) <= self.batch_size:
                group.append(job)
                size += len(job.batch)
            else:
                self._held.append(job)
        return group

    def _score_group(self, group: list[_Job]) -> None:
        if len(group) > 1:
            try:
                merged = _merge([job.batch for job in group])
                scores = self._guarded_score(merged)
            except RewardFailure:
                for job in group:  # find which request the reward rejects; the others still get their scores
                    self._score_group([job])
                return
            start = 0
            for job in group:
                job.future.set_result(scores[start : start + len(job.batch)])
                start += len(job.batch)
            return
        try:
            group[0].future.set_result(self._guarded_score(group[0].batch))
        except RewardFailure as failure:
            group[0].future.set_exception(failure)

    def _guarded_score(self, batch: ScoreBatch) -> list[float]:
        """:meth:`score`, with any exception of the reward turned into a :class:`RewardFailure`."""
        try:
            return self.score(batch)
        except ValueError as error:
            raise RewardFailure(f"Reward '{self.name}' rejected the batch: {error}", 422) from error
        except Exception as error:  # the reward's own failure (out of memory, a bug): report, keep serving
            logger.exception("Reward '%s' failed", self.name)
            raise RewardFailure(
                f"Reward '{self.name}' failed on the server: {type(error).__name__}: {error}", 500
            ) from error


def _merge(batches: list[ScoreBatch]) -> ScoreBatch:
    """Concatenate compatible batches (same image size and column names)."""
    return ScoreBatch(
        torch.cat([b.images for b in batches]),
        [p for b in batches for p in b.prompts],
        {name: [v for b in batches for v in b.columns[name]] for name in batches[0].columns},
    )


# ---------------------------------------------------------------------------------------------- HTTP


def create_app(
    scorer: BatchScorer,
    *,
    token: str | None,
    max_request_bytes: int,
    max_images: int,
    body_timeout: float = DEFAULT_REQUEST_TIMEOUT,
):
    """The FastAPI application serving ``scorer``.

    Args:
        scorer: the reward and its worker.
        token: the bearer token every request must carry (see :func:`~.protocol.check_token`), or None for
            none (loopback-only use).
        max_request_bytes: the most bytes a request body, and its decoded images, may take.
        max_images: the most images per request.
        body_timeout: the longest a request body may stall (no bytes arriving) before the request gets 408.

    Raises:
        ValueError: the token breaks the rules of :func:`~.protocol.check_token`.
    """
    if token is not None:
        check_token(token)
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
    except ImportError as error:
        raise ImportError(f"The reward server needs FastAPI and uvicorn: {SERVER_HINT}") from error

    app = FastAPI(
        title=f"trl-flow-egrpo reward server ({scorer.name})", docs_url=None, redoc_url=None, openapi_url=None
    )
    info = {
        "status": "ok",
        "reward": scorer.name,
        "version": __version__,
        "protocol": PROTOCOL_VERSION,
        "device": str(scorer.device),
        "batch_size": scorer.batch_size,
        "max_images": max_images,
        "max_request_bytes": max_request_bytes,
    }

    def error(status: int, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if status == 408:  # a client that stalled its body: do not wait for the rest on this connection
            headers["Connection"] = "close"
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.get("/health")
    async def health(request: Request):
        problem = authorization_problem(request.headers.get("authorization"), token)
        return error(401, problem) if problem else info

    @app.post("/score")
    async def score(request: Request):
        problem = authorization_problem(request.headers.get("authorization"), token)
        if problem:
            return error(401, problem)
        try:
            body = await read_body(request, max_request_bytes, body_timeout)
            batch = await asyncio.to_thread(decode_request, body, max_images, max_request_bytes)
        except ProtocolError as refused:
            return error(refused.status, str(refused))
        try:
            scores = await asyncio.wrap_future(scorer.submit(batch))
        except RewardFailure as failure:
            return error(failure.status, str(failure))
        return {"scores": scores, "reward": scorer.name}

    return app


def authorization_problem(header: str | None, token: str | None) -> str | None:
    """Why the ``Authorization`` header does not carry ``token`` (compared in constant time), or None if it does
    (or no token is required).

    The header is ``Bearer`` and the token, separated by spaces (RFC 6750). The token is taken as sent, never
    stripped or otherwise changed: tokens hold no whitespace (:func:`~.protocol.check_token`), so a client
    sending the server's token always matches.
    """
    if token is None:
        return None
    parts = (header or "").split(" ")
    scheme, supplied = parts[0], [part for part in parts[1:] if part]  # RFC 6750 allows several spaces
    if scheme.lower() != "bearer" or not supplied:
        return (
            "This reward server requires a bearer token and the request carries none: pass token= to "
            "RemoteReward or set the client's TRL_EGRPO_REWARD_TOKEN."
        )
    if len(supplied) > 1 or not hmac.compare_digest(supplied[0].encode(), token.encode()):
        return "The bearer token is wrong: use the token the server was started with."
    return None


async def read_body(request, limit: int, stall_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> bytes:
    """The request body, refused with a 413 :class:`ProtocolError` as soon as it exceeds ``limit`` bytes (by its
    declared length, or while it streams in), and with a 408 one when no bytes arrive for ``stall_timeout``
    seconds (a client holding a request open without sending its body)."""
    from starlette.requests import ClientDisconnect  # starlette comes with FastAPI

    declared = request.headers.get("content-length")
    too_big = ProtocolError(
        f"The request body is larger than this server's limit of {limit} bytes "
        "(--max-request-mb). Send fewer or smaller images per request.",
        status=413,
    )
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_big
    body, chunks = bytearray(), request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), stall_timeout)
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError as error:
            raise ProtocolError(
                f"The request body stalled: no bytes for {stall_timeout} s (--request-timeout), after "
                f"{len(body)} bytes.",
                status=408,
            ) from error
        except ClientDisconnect as error:  # nobody reads the answer; a 400 instead of a logged 500 traceback
            raise ProtocolError(f"The client disconnected after {len(body)} bytes of the body.") from error
        body.extend(chunk)
        if len(body) > limit:
            raise too_big


# ---------------------------------------------------------------------------------------------- running


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: a free one, read it from ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it every response waits about 40 ms for the client's delayed ACK (Nagle's algorithm).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server gets its port back at once
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"Cannot listen on {host}:{port} ({error}). Pick another --port (0 picks a free one).") from error
    sock.listen(128)
    return sock


def warm_up(scorer: BatchScorer) -> None:
    """Score one grey 64 x 64 image, so that the model loads before the first client waits for it. The prompt quotes
    a text because OCRReward scores against a prompt's quoted span and refuses prompts without one."""
    scorer.score(ScoreBatch(torch.full((1, 3, 64, 64), 128, dtype=torch.uint8), ['a photo of a sign saying "hi"'], {}))


def run(
    scorer: BatchScorer,
    sock: socket.socket,
    *,
    token: str | None,
    max_request_bytes: int,
    max_images: int,
    max_connections: int,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    log_level: str = "info",
) -> None:
    """Serve ``scorer`` on the listening ``sock`` until interrupted (SIGINT / SIGTERM).

    Args:
        max_connections: the most requests in progress at once; more get 503, which RemoteReward retries.
        request_timeout: seconds a connection has to send a complete request head before it is closed, and the
            longest its body may stall (408).
        (the others: see :func:`create_app`.)
    """
    try:
        import uvicorn

        from .guards import RequestLimit, head_timeout_protocol
    except ImportError as error:
        raise ImportError(f"The reward server needs FastAPI and uvicorn: {SERVER_HINT}") from error
    app = create_app(
        scorer, token=token, max_request_bytes=max_request_bytes, max_images=max_images, body_timeout=request_timeout
    )
    # Not uvicorn's limit_concurrency: it counts open connections, so clients that connect and send nothing
    # would lock every real client out (503). RequestLimit counts requests; the protocol closes silent
    # connections (see .guards).
    config = uvicorn.Config(
        RequestLimit(app, max_connections),
        http=head_timeout_protocol(request_timeout),
        log_level=log_level,
        timeout_keep_alive=30,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        scorer.close()
