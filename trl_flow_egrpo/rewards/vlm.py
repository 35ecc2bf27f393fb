"""A vision-language model as a judge, behind any OpenAI-compatible chat-completions endpoint (vLLM, SGLang,
TGI, a hosted API)."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..serve.protocol import quantize
from ._http import HttpClient, Response, check_retry_settings, with_retries

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = 'Does this image show "{prompt}"? Answer Yes or No.'
SCORE_MODES = ("yes_probability", "number")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class VLMJudgeError(RuntimeError):
    """The judge endpoint could not score an image; the message names the endpoint, the model and the fix."""


def yes_probability(top_logprobs: Sequence[dict]) -> float:
    """``P(Yes)`` at the first answer token: ``sum exp(logprob)`` over the top candidates whose text is "yes" in
    any case and spacing (``"Yes"``, ``" yes"``, ``"YES"``). A "Yes" outside the ``top_logprobs`` candidates is
    less likely than every one of them and counts as 0.

    Args:
        top_logprobs: the candidates of the first generated token, ``[{"token": str, "logprob": float}, ...]``.
    """
    return float(
        sum(
            math.exp(item.get("logprob", -math.inf))
            for item in top_logprobs
            if str(item.get("token", "")).strip().lower() == "yes"
        )
    )


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (``"Score: 7.5/10"`` -> 7.5), or None."""
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def image_data_url(image: torch.Tensor, image_format: str) -> str:
    """One ``[3, H, W]`` uint8 image as a ``data:image/...;base64,`` URL (PNG lossless, JPEG quality 95)."""
    from PIL import Image

    buffer = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())  # [H, W, 3] uint8: RGB
    if image_format == "png":
        pil.save(buffer, format="PNG", compress_level=1)
    else:
        pil.save(buffer, format="JPEG", quality=95)
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode()}"


class VLMJudgeReward:
    """Ask a vision-language model a question about each image; its answer is the score.

    Each image is sent, uint8-quantized and base64-encoded (PNG by default), with the question
    ``question_template.format(prompt=..., **columns)`` to ``{base_url}/chat/completions``. Two scores:

    * ``score="yes_probability"`` (default): one answer token is generated at temperature 0 with
      ``top_logprobs`` candidates, and the score is ``P(Yes)`` (:func:`yes_probability`), in [0, 1]. Smooth,
      so images that both pass still rank. Needs an endpoint that returns log-probabilities (vLLM, SGLang and
      OpenAI do; vLLM caps ``top_logprobs`` at its ``--max-logprobs``, 20 by default).
    * ``score="number"``: up to ``max_tokens`` tokens are generated at temperature 0 and the first number in
      the reply is the score (ask for it: "Rate ... from 0 to 10. Answer with the number only.").

    Requests run ``max_concurrency`` at a time (the server batches them); connection errors, timeouts and
    429/5xx answers are retried ``retries`` times with exponential backoff. Thread-safe.

    Args:
        base_url: the API base, e.g. ``"http://127.0.0.1:8000/v1"`` (the part before ``/chat/completions``).
        model: the model name the server serves (vLLM: ``--served-model-name`` or the model path).
        question_template: the question, with ``{prompt}`` and any dataset column as ``{column}``.
        score: ``"yes_probability"`` or ``"number"``.
        api_key: sent as ``Authorization: Bearer``; ``None`` sends none (vLLM's ``--api-key``).
        system_prompt: an optional system message.
        max_concurrency: requests in flight at once.
        timeout: seconds to wait for a connection and for each answer.
        retries: how many times a failed request is retried.
        backoff: seconds before the first retry, doubled for each further one (at most 30).
        top_logprobs: candidates asked for the answer token (``yes_probability``).
        max_tokens: the longest reply (``number``).
        number_range: ``(low, high)``: a parsed number outside it is an error (``number``); None accepts any.
        unparsable_score: the score of a reply without a number (``number``), logged as a warning; None (default)
            makes such a reply an error that quotes it.
        image_format: ``"png"`` (lossless) or ``"jpeg"`` (smaller).
        extra_body: more fields for every request body (e.g. ``{"chat_template_kwargs": {...}}``).
        name: the logged name.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        question_template: str = DEFAULT_QUESTION,
        *,
        score: str = "yes_probability",
        api_key: str | None = None,
        system_prompt: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        top_logprobs: int = 20,
        max_tokens: int = 16,
        number_range: tuple[float, float] | None = None,
        unparsable_score: float | None = None,
        image_format: str = "png",
        extra_body: dict | None = None,
        name: str = "vlm_judge",
    ):
        check_retry_settings(timeout, retries, backoff)
        if score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}.")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}.")
        for field, value in (
            ("max_concurrency", max_concurrency),
            ("top_logprobs", top_logprobs),
            ("max_tokens", max_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}.")
        if number_range is not None and not (len(number_range) == 2 and number_range[0] < number_range[1]):
            raise ValueError(f"number_range must be (low, high) with low < high, got {number_range!r}.")
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = HttpClient(base_url, timeout, headers)
        self.endpoint = self._client.url("/chat/completions")
        self.model, self.question_template, self.score_mode = model, question_template, score
        self.system_prompt, self.retries, self.backoff = system_prompt, retries, backoff
        self.top_logprobs, self.max_tokens, self.number_range = top_logprobs, max_tokens, number_range
        self.unparsable_score, self.image_format = unparsable_score, image_format
        self.extra_body, self.name, self.max_concurrency = dict(extra_body or {}), name, max_concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        """Score ``images`` ``[B, 3, H, W]`` in [0, 1]; returns float32 ``[B]`` on the images' device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VLMJudgeReward expects images of shape [B, 3, H, W], got {tuple(images.shape)}.")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"VLMJudgeReward got {images.shape[0]} images but {len(prompts)} prompts.")
        questions = [
            self.question(prompt, {name: values[i] for name, values in columns.items()})
            for i, prompt in enumerate(prompts)
        ]
        quantized = quantize(images)
        scores = list(self._executor().map(self.score_one, quantized, questions))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def question(self, prompt: str, row: dict) -> str:
        """The question for one image: the template filled with its prompt and dataset columns."""
        try:
            return self.question_template.format(**row, prompt=prompt)
        except (KeyError, IndexError) as error:
            raise ValueError(
                f"question_template {self.question_template!r} uses {{{error.args[0]}}}, which is "
                f"neither 'prompt' nor a dataset column (columns: {sorted(row)})."
            ) from error

    def request_body(self, image: torch.Tensor, question: str) -> dict:
        """The chat-completions request for one uint8 ``[3, H, W]`` image and its question."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(image, self.image_format)}},
                    {"type": "text", "text": question},
                ],
            }
        )
        body = {"model": self.model, "messages": messages, "temperature": 0.0}
        if self.score_mode == "yes_probability":
            body.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body.update(max_tokens=self.max_tokens)
        return {**body, **self.extra_body}

    def score_one(self, image: torch.Tensor, question: str) -> float:
        """Ask about one uint8 image and turn the answer into its score."""
        response = self._post(json.dumps(self.request_body(image, question)).encode())
        try:
            choice = response.json_body()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise VLMJudgeError(
                f"{self.endpoint} did not answer like a chat-completions endpoint "
                f"({response.body[:200]!r}). Check base_url (it usually ends in /v1)."
            ) from error
        if self.score_mode == "yes_probability":
            return yes_probability(self._top_logprobs(choice))
        return self._number(choice)

    def _top_logprobs(self, choice: dict) -> list[dict]:
        content = (choice.get("logprobs") or {}).get("content") or []
        candidates = content[0].get("top_logprobs") if content and isinstance(content[0], dict) else None
        if not candidates:
            raise VLMJudgeError(
                f"{self.endpoint} returned no log-probabilities for model {self.model!r}, which "
                "score='yes_probability' needs. Serve the model with an engine that returns them "
                "(vLLM, SGLang; vLLM allows up to --max-logprobs, default 20), or use score='number' "
                "with a question that asks for a number."
            )
        return candidates

    def _number(self, choice: dict) -> float:
        reply = (choice.get("message") or {}).get("content") or ""
        value = first_number(reply)
        if value is None:
            if self.unparsable_score is None:
                raise VLMJudgeError(
                    f"The judge {self.model!r} at {self.endpoint} replied {reply[:200]!r}, which holds "
                    "no number. Ask for the number only in question_template, or set "
                    "unparsable_score to score such replies."
                )
            logger.warning("VLM judge reply without a number (scored %s): %r", self.unparsable_score, reply[:200])
            return float(self.unparsable_score)
        if self.number_range is not None and not self.number_range[0] <= value <= self.number_range[1]:
            raise VLMJudgeError(
                f"The judge {self.model!r} replied {reply[:200]!r}: {value} lies outside number_range "
                f"{tuple(self.number_range)}. State the scale in question_template."
            )
        return value

    def _post(self, body: bytes) -> Response:
        def give_up(problem: str, attempts: int) -> VLMJudgeError:
            return VLMJudgeError(
                f"The VLM judge at {self.endpoint} failed after {attempts} attempt(s) ({problem}). "
                "Check that the server is running and serves the model "
                f"{self.model!r}; raise retries/timeout if it is overloaded."
            )

        response = with_retries(
            lambda: self._client.request("POST", "/chat/completions", body), self.retries, self.backoff, give_up
        )
        if response.status == 401:
            raise VLMJudgeError(
                f"{self.endpoint} refused the API key (HTTP 401: {response.detail()}): pass the "
                "server's key as api_key."
            )
        if response.status != 200:
            raise VLMJudgeError(
                f"{self.endpoint} refused the request for model {self.model!r} (HTTP "
                f"{response.status}): {response.detail()}"
            )
        return response

    def _executor(self) -> ThreadPoolExecutor:
        """The thread pool that caps requests in flight at ``max_concurrency`` (created on first use)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="vlm-judge")
            return self._pool
