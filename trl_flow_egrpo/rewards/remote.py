"""A reward scored by a reward server (``trl-flow-egrpo serve-reward``) on another GPU or machine."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch

from ..serve.protocol import CONTENT_TYPE, TOKEN_ENV, decode_scores, encode_request, quantize
from ._http import (
    HttpClient,
    Response,
    ResponseTooLargeError,
    check_max_response_bytes,
    check_retry_settings,
    check_secret,
    resolve_total_timeout,
    with_retries,
)

DEFAULT_MAX_RESPONSE_BYTES = 1 << 24
"""16 MiB: far above a scores answer (a few dozen bytes per image), far below what could exhaust memory."""


class RemoteRewardError(RuntimeError):
    """A remote reward that could not be scored; the message names the URL, what failed and the fix."""


class RemoteReward:
    """The reward served at ``url`` by ``trl-flow-egrpo serve-reward``, used like a local reward.

    Images are quantized to uint8 as ``clamp(round(255 x), 0, 255)`` and sent raw (or as PNG); the server
    hands its reward ``u / 255`` in float32. So the remote score of an image equals the local reward's score
    of the same quantized image (up to float rounding of batched model kernels, about 1e-7); it differs from
    the local score of the unquantized float image by what one uint8 level changes.

    Batches larger than the server's limits (``/health``: images and bytes per request) are split into
    several requests. Connection errors, timeouts and the statuses 429/500/502/503/504 are retried
    ``retries`` times, waiting ``backoff``, ``2 backoff``, ``4 backoff``... seconds, as long as the call stays
    within ``total_timeout``; then a :class:`RemoteRewardError` names the URL and the last failure. It is
    thread-safe (one connection per thread), so it works with ``async_rewards=True``. The token never appears
    in its repr or its errors.

    Args:
        url: the server's base URL, e.g. ``"http://127.0.0.1:8711"``. Credentials in it
            (``http://user:pw@host``) are refused: the token goes in ``token`` or the environment.
        token: the bearer token the server was started with; ``None`` reads ``$TRL_EGRPO_REWARD_TOKEN``
            (no token if unset).
        timeout: seconds one request may take in all: connecting, sending the images and reading the whole
            answer (a server that answers byte by byte cannot stretch it).
        retries: how many times a failed request is retried.
        backoff: seconds before the first retry; doubled for each further one (at most 30).
        name: the name logged for this reward; ``None`` takes the served reward's name from ``/health``
            (asked the first time the name is needed, e.g. when the trainer is built).
        encoding: ``"raw"`` (default: uint8 arrays, fastest on fast links) or ``"png"`` (lossless, smaller on
            slow links, costs CPU time on both sides).
        total_timeout: seconds one request may take with all its retries and backoff waits; no retry starts
            that would end past it. ``None``: ``2 * timeout``.
        max_response_bytes: the largest answer accepted (default 16 MiB); a larger one is an error naming the
            URL and the cap.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        name: str | None = None,
        encoding: str = "raw",
        total_timeout: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        check_retry_settings(timeout, retries, backoff)
        self.total_timeout = resolve_total_timeout(total_timeout, timeout)
        check_max_response_bytes(max_response_bytes)
        if encoding not in ("raw", "png"):
            raise ValueError(f"encoding must be 'raw' or 'png', got {encoding!r}.")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if token:
            check_secret(token, f"The token (token= or ${TOKEN_ENV})")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._has_token = bool(token)
        self._client = HttpClient(
            str(url).rstrip("/").removesuffix("/score"),
            timeout,
            headers,
            max_response_bytes,
            credential_hint=f"token= or ${TOKEN_ENV}",
        )
        self.url, self.retries, self.backoff, self.encoding = self._client.base_url, retries, backoff, encoding
        self._name, self._info = name, None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The logged name: the one given, else the served reward's (from ``/health``)."""
        if self._name is None:
            self._name = self.server_info()["reward"]
        return self._name

    def server_info(self) -> dict:
        """The server's ``/health`` answer (reward name, version, device, limits), fetched once.

        Raises:
            RemoteRewardError: the server cannot be reached (after the retries) or refuses the token.
        """
        with self._lock:
            if self._info is None:
                response = self._request("GET", "/health")
                try:
                    info = response.json_body()
                    int(info["max_images"]), int(info["max_request_bytes"]), str(info["reward"])
                except (ValueError, KeyError, TypeError) as error:
                    raise RemoteRewardError(
                        f"{self._client.url('/health')} did not answer like a trl-flow-egrpo "
                        f"reward server ({response.body[:200]!r}). Check the URL."
                    ) from error
                self._info = info
            return self._info

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        """Score ``images`` ``[B, 3, H, W]`` in [0, 1] on the server; returns float32 ``[B]`` on the images' device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RemoteReward expects images of shape [B, 3, H, W], got {tuple(images.shape)}.")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"RemoteReward got {images.shape[0]} images but {len(prompts)} prompts.")
        quantized, prompts = quantize(images), [str(p) for p in prompts]
        info = self.server_info()
        pixel_bytes = 3 * images.shape[2] * images.shape[3]
        per_request = min(int(info["max_images"]), int(info["max_request_bytes"]) // pixel_bytes)
        if per_request < 1:
            raise RemoteRewardError(
                f"One {images.shape[2]} x {images.shape[3]} image takes {pixel_bytes} bytes, over "
                f"the limit of {info['max_request_bytes']} bytes per request of the reward server "
                f"at {self.url}: restart it with a larger --max-request-mb."
            )
        scores = []
        for start in range(0, len(prompts), per_request):
            stop = start + per_request
            scores += self._score(
                quantized[start:stop],
                prompts[start:stop],
                {name: list(values)[start:stop] for name, values in columns.items()},
            )
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _score(self, images: torch.Tensor, prompts: list[str], columns: dict[str, list]) -> list[float]:
        """Score one request's worth of uint8 images, halving it while its body (prompts included) is too big."""
        body = encode_request(images, prompts, columns, self.encoding)
        if len(body) > int(self.server_info()["max_request_bytes"]) and len(prompts) > 1:
            half = len(prompts) // 2
            return self._score(images[:half], prompts[:half], {k: v[:half] for k, v in columns.items()}) + self._score(
                images[half:], prompts[half:], {k: v[half:] for k, v in columns.items()}
            )
        response = self._request("POST", "/score", body, {"Content-Type": CONTENT_TYPE})
        try:
            return decode_scores(response.body, len(prompts))
        except ValueError as error:
            raise RemoteRewardError(
                f"{self._client.url('/score')}: {error} Check that the URL is a trl-flow-egrpo "
                "reward server of the same version."
            ) from error

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Response:
        """One request with retries; any answer but 200 becomes a :class:`RemoteRewardError` saying what to do."""
        url = self._client.url(path)

        def give_up(problem: str, attempts: int) -> RemoteRewardError:
            return RemoteRewardError(
                f"Remote reward at {url} failed after {attempts} attempt(s) ({problem}). Check "
                "that the reward server (trl-flow-egrpo serve-reward) is running and reachable "
                "from here; raise retries/backoff (and total_timeout) to ride out restarts, or timeout for "
                "slow answers."
            )

        try:
            response = with_retries(
                lambda deadline: self._client.request(method, path, body, headers, deadline),
                self.retries,
                self.backoff,
                give_up,
                self.total_timeout,
            )
        except ResponseTooLargeError as error:
            raise RemoteRewardError(f"Remote reward: {error}") from error
        if response.status == 401:
            raise RemoteRewardError(
                f"Remote reward at {url} refused the token (HTTP 401: {response.detail()}). The "
                f"token is missing or wrong: pass token= or set ${TOKEN_ENV} to the token the "
                "server was started with."
            )
        if response.status != 200:
            raise RemoteRewardError(
                f"Remote reward at {url} refused the request (HTTP {response.status}): {response.detail()}"
            )
        return response

    def __repr__(self) -> str:
        token = ", token=***" if self._has_token else ""
        return f"RemoteReward({self.url!r}, name={self._name!r}{token})"
