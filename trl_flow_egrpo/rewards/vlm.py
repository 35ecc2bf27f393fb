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
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..serve.protocol import quantize
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
from .edit import SOURCE_FORMATS, column_entries, source_image_tensor

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = 'Does this image show "{prompt}"? Answer Yes or No.'
"""The question of ``score="yes_probability"``."""
DEFAULT_NUMBER_QUESTION = (
    'Rate how well this image shows "{prompt}" on a scale from 0 to 10. Answer with the number only.'
)
"""The question of ``score="number"``; it asks for the one answer format :func:`number_answer` accepts."""
DEFAULT_EDIT_QUESTION = (
    "The first image is the original, the second the edited one. Does the edited image follow the instruction "
    '"{prompt}" and leave the rest of the original unchanged? Answer Yes or No.'
)
"""The question of ``score="yes_probability"`` when the judge sees the source image too (``source_image_column``)."""
DEFAULT_EDIT_NUMBER_QUESTION = (
    "The first image is the original, the second the edited one. Rate from 0 to 10 how well the edit follows the "
    'instruction "{prompt}" and leaves the rest of the original unchanged. Answer with the number only.'
)
"""The question of ``score="number"`` with ``source_image_column``; on the scale of :data:`DEFAULT_NUMBER_RANGE`."""
DEFAULT_NUMBER_RANGE = (0.0, 10.0)
"""The scale :data:`DEFAULT_NUMBER_QUESTION` asks for: its ``number_range`` when none is given."""
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20
"""1 MiB: a chat completion of a few tokens with 20 log-probability candidates is a few kilobytes."""
SCORE_MODES = ("yes_probability", "number")
REPLY_EXCERPT_CHARS = 200
"""How much of a reply an error message or a warning quotes."""
# A number alone, as the number question asks: "7", "-2", "7.5", ".5", "7." (a closing full stop). No exponent,
# no "inf"/"nan", no text around it.
_NUMBER_ANSWER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# What tokenizers put around a word: spaces and newlines, SentencePiece's "▁", byte-level BPE's "Ġ" and "Ċ".
_TOKEN_PADDING = " \t\r\n\u2581\u0120\u010a"


class VLMJudgeError(RuntimeError):
    """The judge endpoint could not score an image; the message names the endpoint, the model and the fix."""


def answer_word(token: str) -> str:
    """The word a candidate token spells, for matching "yes"/"no": without the spacing tokenizers add and in
    lower case (``" Yes"``, ``"YES"``, ``"▁yes"`` -> ``"yes"``)."""
    return token.strip(_TOKEN_PADDING).lower()


def checked_candidate(item, index: int) -> tuple[str, float]:
    """``(token, logprob)`` of one ``top_logprobs`` entry ``{"token": str, "logprob": number}``.

    Raises:
        ValueError: naming the entry and what is wrong (not an object, token not a string, logprob missing,
            not a number, NaN or +inf). ``-inf`` (probability 0) is accepted.
    """
    if not isinstance(item, dict):
        raise ValueError(f"top_logprobs[{index}] is a {type(item).__name__}, not an object")
    token, logprob = item.get("token"), item.get("logprob")
    if not isinstance(token, str):
        raise ValueError(f"top_logprobs[{index}].token is {token!r}, not a string")
    if isinstance(logprob, bool) or not isinstance(logprob, int | float):
        raise ValueError(f"top_logprobs[{index}].logprob is {logprob!r}, not a number")
    if math.isnan(logprob) or logprob == math.inf:
        raise ValueError(f"top_logprobs[{index}].logprob is {logprob!r}, not a log-probability")
    return token, float(logprob)


def yes_probability(top_logprobs: Sequence[dict]) -> float | None:
    """``P(yes | the answer is yes or no)`` at the first answer token, or None when no candidate is yes or no.

    The answer tokens are the candidates whose :func:`answer_word` is "yes" or "no" (``"Yes"``, ``" yes"``,
    ``"NO"``...). Their probabilities are normalized over the answer tokens present::

        P = sum_{yes tokens} exp(logprob) / sum_{yes and no tokens} exp(logprob)

    so the score is a probability in [0, 1] whatever the server sends (a logprob above 0, several "yes"
    spellings that together exceed 1). An answer token outside the candidates counts as probability 0. A token
    text listed twice counts once, with its larger logprob: one token cannot be two candidates, so a repeat is
    the server's duplicate, and adding it would tilt the score towards that answer. The sums are computed
    relative to the largest logprob, so no value overflows.

    Args:
        top_logprobs: the candidates of the first generated token, ``[{"token": str, "logprob": float}, ...]``.

    Raises:
        ValueError: a malformed candidate (see :func:`checked_candidate`).
    """
    answers: dict[str, float] = {}
    for index, item in enumerate(top_logprobs):
        token, logprob = checked_candidate(item, index)
        if answer_word(token) in ("yes", "no"):
            answers[token] = max(answers.get(token, -math.inf), logprob)
    largest = max(answers.values(), default=-math.inf)
    if largest == -math.inf:  # no answer token, or only answer tokens of probability 0: nothing to normalize
        return None
    weights = {token: math.exp(logprob - largest) for token, logprob in answers.items()}
    yes = sum(weight for token, weight in weights.items() if answer_word(token) == "yes")
    return yes / sum(weights.values())  # the largest weight is 1, so the sum is >= 1 and yes <= sum


def number_answer(reply: str) -> float | None:
    """The number of a reply that is a number alone, as :data:`DEFAULT_NUMBER_QUESTION` asks (``"7"``,
    ``" 7.5\\n"``, ``"7."``), else None: a number inside text (``"I rate it 9"``, ``"8/10"``) is not taken,
    since the first number of free text is often not the rating (a date, a count)."""
    match = _NUMBER_ANSWER.fullmatch(reply.strip())
    return float(match.group()) if match else None


def first_choice(payload) -> dict:
    """``choices[0]`` of a chat-completions answer.

    Raises:
        ValueError: the payload has no non-empty ``choices`` list of objects.
    """
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ValueError("it has no 'choices' list")
    if not isinstance(choices[0], dict):
        raise ValueError(f"choices[0] is a {type(choices[0]).__name__}, not an object")
    return choices[0]


def reply_text(choice: dict) -> str:
    """The text of ``choice["message"]["content"]``; a null content (a refusal) reads as the empty reply.

    Raises:
        ValueError: the message is missing or not an object, or its content is not a string.
    """
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ValueError(f"choices[0].message is {type(message).__name__}, not an object")
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is a {type(content).__name__}, not a string")
    return content


def first_token_candidates(choice: dict) -> list | None:
    """``choice["logprobs"]["content"][0]["top_logprobs"]``, or None when the answer has no log-probabilities.

    Raises:
        ValueError: one of these fields has the wrong type (e.g. ``top_logprobs`` a string).
    """
    logprobs = choice.get("logprobs")
    if logprobs is None:
        return None
    if not isinstance(logprobs, dict):
        raise ValueError(f"choices[0].logprobs is a {type(logprobs).__name__}, not an object")
    content = logprobs.get("content")
    if not content:
        return None
    if not isinstance(content, list):
        raise ValueError(f"choices[0].logprobs.content is a {type(content).__name__}, not a list")
    if not isinstance(content[0], dict):
        raise ValueError(f"choices[0].logprobs.content[0] is a {type(content[0]).__name__}, not an object")
    candidates = content[0].get("top_logprobs")
    if not candidates:
        return None
    if not isinstance(candidates, list):
        raise ValueError(f"choices[0].logprobs.content[0].top_logprobs is a {type(candidates).__name__}, not a list")
    return candidates


def excerpt(reply: str | list[str]) -> str:
    """A reply (or a list of candidate tokens) quoted as Python would, cut at :data:`REPLY_EXCERPT_CHARS`
    characters of the reply (marked with ``...``)."""
    if not isinstance(reply, str):
        quoted = repr(reply)
        return quoted[:REPLY_EXCERPT_CHARS] + ("..." if len(quoted) > REPLY_EXCERPT_CHARS else "")
    return repr(reply[:REPLY_EXCERPT_CHARS]) + ("..." if len(reply) > REPLY_EXCERPT_CHARS else "")


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


def _checked_policy(on_parse_failure) -> str | float:
    """``on_parse_failure`` checked: ``"raise"`` or a finite number (returned as a float)."""
    if on_parse_failure == "raise":
        return "raise"
    if (
        isinstance(on_parse_failure, bool)
        or not isinstance(on_parse_failure, int | float)
        or not math.isfinite(on_parse_failure)
    ):
        raise ValueError(
            f"on_parse_failure must be 'raise' or a finite number (the score of a reply that cannot be parsed), "
            f"got {on_parse_failure!r}."
        )
    return float(on_parse_failure)


def _checked_range(number_range) -> tuple[float, float] | None:
    """``number_range`` checked: None or ``(low, high)`` finite numbers with ``low < high``."""
    if number_range is None:
        return None
    try:
        low, high = (float(value) for value in number_range)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"number_range must be (low, high) with low < high, got {number_range!r}.")
    return low, high


class VLMJudgeReward:
    """Ask a vision-language model a question about each image; its answer is the score.

    Each image is sent, uint8-quantized and base64-encoded (PNG by default), with the question
    ``question_template.format(prompt=..., **columns)`` to ``{base_url}/chat/completions``. Two scores:

    * ``score="yes_probability"`` (default): one answer token is generated at temperature 0 with
      ``top_logprobs`` candidates, and the score is ``P(yes)`` normalized over the "yes" and "no" candidates
      present (:func:`yes_probability`), a probability in [0, 1]. Smooth, so images that both pass still rank.
      Needs an endpoint that returns log-probabilities (vLLM, SGLang and OpenAI do; vLLM caps
      ``top_logprobs`` at its ``--max-logprobs``, 20 by default).
    * ``score="number"``: up to ``max_tokens`` tokens are generated at temperature 0, and the reply must be a
      number alone (:func:`number_answer`) inside ``number_range``. The default question
      (:data:`DEFAULT_NUMBER_QUESTION`) asks for exactly that, on a scale from 0 to 10.

    A reply that does not give an answer in that form (no "yes" or "no" among the candidates; a reply that is
    not a number alone, or a number outside ``number_range``) is a parse failure: ``on_parse_failure="raise"``
    (default) raises a :class:`VLMJudgeError` naming the endpoint and quoting the reply; a number scores such
    replies with it and logs a warning. Either way :attr:`parse_failures` counts them. A malformed answer (not
    a chat completion, fields of the wrong type) is always an error naming the endpoint.

    Requests run ``max_concurrency`` at a time (the server batches them); connection errors, timeouts and
    429/5xx answers are retried ``retries`` times with exponential backoff, within ``total_timeout``.
    Thread-safe. The API key never appears in its repr or its errors.

    For image editing, ``source_image_column`` names the dataset column of the images before the edit: each
    request then sends the source image first and the edited image second, in the same user message, before the
    question (:data:`DEFAULT_EDIT_QUESTION` or :data:`DEFAULT_EDIT_NUMBER_QUESTION` by default, which say which
    image is which). A source entry is anything :func:`~trl_flow_egrpo.rewards.edit.source_image_tensor` reads
    (PIL image, path, array, tensor); it is resized to the edited image's size and sent in ``image_format``.

    Args:
        base_url: the API base, e.g. ``"http://127.0.0.1:8000/v1"`` (the part before ``/chat/completions``).
            Credentials in it (``http://user:key@host``) are refused: the key goes in ``api_key``.
        model: the model name the server serves (vLLM: ``--served-model-name`` or the model path).
        question_template: the question, with ``{prompt}`` and any dataset column as ``{column}``; ``None``
            takes :data:`DEFAULT_QUESTION` or, for ``score="number"``, :data:`DEFAULT_NUMBER_QUESTION` (their
            ``DEFAULT_EDIT_...`` versions with ``source_image_column``).
        score: ``"yes_probability"`` or ``"number"``.
        api_key: sent as ``Authorization: Bearer``; ``None`` sends none (vLLM's ``--api-key``).
        system_prompt: an optional system message.
        max_concurrency: requests in flight at once.
        timeout: seconds one request may take in all: connecting, sending the image, reading the whole answer.
        retries: how many times a failed request is retried.
        backoff: seconds before the first retry, doubled for each further one (at most 30).
        top_logprobs: candidates asked for the answer token (``yes_probability``).
        max_tokens: the longest reply (``number``).
        number_range: ``(low, high)``, the accepted scores (``number``); ``None`` takes (0, 10) with the default
            question and accepts any number with a question of your own.
        on_parse_failure: ``"raise"`` (default), or the score given to a reply that cannot be parsed.
        unparsable_score: deprecated, use ``on_parse_failure``; a number here sets it.
        image_format: ``"png"`` (lossless) or ``"jpeg"`` (smaller).
        extra_body: more fields for every request body (e.g. ``{"chat_template_kwargs": {...}}``).
        name: the logged name.
        total_timeout: seconds one request may take with all its retries and backoff waits; ``None``:
            ``2 * timeout``.
        max_response_bytes: the largest answer accepted (default 1 MiB); a larger one is an error naming the
            endpoint and the cap.
        source_image_column: the dataset column of the source images, for judging edits (both images are sent);
            ``None`` (default) sends the generated image alone.

    Attributes:
        parse_failures: how many replies could not be parsed so far (raised or scored with
            ``on_parse_failure``). The trainer does not log it by itself: read it, e.g. in a callback.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        question_template: str | None = None,
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
        on_parse_failure: str | float = "raise",
        unparsable_score: float | None = None,
        image_format: str = "png",
        extra_body: dict | None = None,
        name: str = "vlm_judge",
        total_timeout: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        source_image_column: str | None = None,
    ):
        check_retry_settings(timeout, retries, backoff)
        self.total_timeout = resolve_total_timeout(total_timeout, timeout)
        check_max_response_bytes(max_response_bytes)
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
        if unparsable_score is not None:
            warnings.warn(
                "unparsable_score is deprecated: use on_parse_failure=<score> (it also covers numbers outside "
                "number_range).",
                FutureWarning,
                stacklevel=2,
            )
            on_parse_failure = unparsable_score
        self.on_parse_failure = _checked_policy(on_parse_failure)
        if question_template is None:
            if source_image_column is None:
                question_template = DEFAULT_NUMBER_QUESTION if score == "number" else DEFAULT_QUESTION
            else:
                question_template = DEFAULT_EDIT_NUMBER_QUESTION if score == "number" else DEFAULT_EDIT_QUESTION
            if score == "number" and number_range is None:
                number_range = DEFAULT_NUMBER_RANGE
        self.number_range = _checked_range(number_range)
        headers = {"Content-Type": "application/json"}
        if api_key:
            check_secret(api_key, "api_key")
            headers["Authorization"] = f"Bearer {api_key}"
        self._has_api_key = bool(api_key)
        self._client = HttpClient(base_url, timeout, headers, max_response_bytes, credential_hint="api_key")
        self.endpoint = self._client.url("/chat/completions")
        self.model, self.question_template, self.score_mode = model, question_template, score
        self.system_prompt, self.retries, self.backoff = system_prompt, retries, backoff
        self.top_logprobs, self.max_tokens, self.image_format = top_logprobs, max_tokens, image_format
        self.extra_body, self.name, self.max_concurrency = dict(extra_body or {}), name, max_concurrency
        self.source_image_column = source_image_column
        self.parse_failures = 0
        self._count_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        key = ", api_key=***" if self._has_api_key else ""
        return (
            f"VLMJudgeReward({self._client.base_url!r}, {self.model!r}, score={self.score_mode!r}, "
            f"name={self.name!r}{key})"
        )

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        """Score ``images`` ``[B, 3, H, W]`` in [0, 1]; returns float32 ``[B]`` on the images' device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VLMJudgeReward expects images of shape [B, 3, H, W], got {tuple(images.shape)}.")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"VLMJudgeReward got {images.shape[0]} images but {len(prompts)} prompts.")
        sources = self._sources(images, columns)
        questions = [
            self.question(prompt, {name: values[i] for name, values in columns.items()})
            for i, prompt in enumerate(prompts)
        ]
        quantized = quantize(images)
        scores = list(self._executor().map(self.score_one, quantized, questions, sources))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _sources(self, images: torch.Tensor, columns: dict) -> list[torch.Tensor | None]:
        """The uint8 source image of each generated image (resized to its size), or None each without
        ``source_image_column``."""
        if self.source_image_column is None:
            return [None] * images.shape[0]
        entries = column_entries(
            columns,
            self.source_image_column,
            images.shape[0],
            f"one source image per row: {SOURCE_FORMATS}",
            "source_image_column",
        )
        sources = [
            source_image_tensor(entry, tuple(images.shape[-2:]), f"column {self.source_image_column!r}, row {row}")
            for row, entry in enumerate(entries)
        ]
        return list(quantize(torch.stack(sources)))

    def question(self, prompt: str, row: dict) -> str:
        """The question for one image: the template filled with its prompt and dataset columns."""
        try:
            return self.question_template.format(**row, prompt=prompt)
        except (KeyError, IndexError) as error:
            raise ValueError(
                f"question_template {self.question_template!r} uses {{{error.args[0]}}}, which is "
                f"neither 'prompt' nor a dataset column (columns: {sorted(row)})."
            ) from error

    def request_body(self, image: torch.Tensor, question: str, source: torch.Tensor | None = None) -> dict:
        """The chat-completions request for one uint8 ``[3, H, W]`` image and its question; given the uint8
        ``source`` image of an edit, it goes first, the edited ``image`` second."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        shown = [image] if source is None else [source, image]
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(picture, self.image_format)}} for picture in shown
        ]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        body = {"model": self.model, "messages": messages, "temperature": 0.0}
        if self.score_mode == "yes_probability":
            body.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body.update(max_tokens=self.max_tokens)
        return {**body, **self.extra_body}

    def score_one(self, image: torch.Tensor, question: str, source: torch.Tensor | None = None) -> float:
        """Ask about one uint8 image (after its uint8 ``source``, for an edit) and turn the answer into its score."""
        return self.score_answer(self._post(json.dumps(self.request_body(image, question, source)).encode()))

    def score_answer(self, response: Response) -> float:
        """The score of one chat-completions answer (the status already checked to be 200).

        Raises:
            VLMJudgeError: the answer is malformed or has no log-probabilities (always), or cannot be parsed
                (with ``on_parse_failure="raise"``).
        """
        try:
            choice = first_choice(response.json_body())
        except ValueError as error:
            raise VLMJudgeError(
                f"{self.endpoint} did not answer like a chat-completions endpoint ({error}: "
                f"{response.body[:200]!r}). Check base_url (it usually ends in /v1)."
            ) from error
        try:
            if self.score_mode == "number":
                return self._number(reply_text(choice))
            candidates = first_token_candidates(choice)
            if candidates is None:
                raise VLMJudgeError(
                    f"{self.endpoint} returned no log-probabilities for model {self.model!r}, which "
                    "score='yes_probability' needs. Serve the model with an engine that returns them "
                    "(vLLM, SGLang; vLLM allows up to --max-logprobs, default 20), or use score='number' "
                    "with a question that asks for a number."
                )
            probability = yes_probability(candidates)
        except ValueError as error:
            raise VLMJudgeError(
                f"{self.endpoint} sent a malformed chat completion for model {self.model!r}: {error} "
                f"({response.body[:200]!r}). Check that base_url is an OpenAI-compatible endpoint."
            ) from error
        if probability is None:
            tokens = [item["token"] for item in candidates]
            return self._parse_failure(f"gave no 'yes' or 'no' among the {len(tokens)} answer candidates", tokens)
        return probability

    def _number(self, reply: str) -> float:
        """The score of a ``score="number"`` reply, or the parse-failure policy's."""
        value = number_answer(reply)
        if value is None:
            return self._parse_failure("replied with something other than a number alone", reply)
        if self.number_range is not None and not self.number_range[0] <= value <= self.number_range[1]:
            return self._parse_failure(f"replied {value:g}, outside number_range {self.number_range}", reply)
        return value

    def _parse_failure(self, what: str, reply: str | list[str]) -> float:
        """Count a reply that cannot be parsed, then raise or return the fallback score (``on_parse_failure``)."""
        with self._count_lock:
            self.parse_failures += 1
        message = f"The judge {self.model!r} at {self.endpoint} {what}: {excerpt(reply)}."
        if self.on_parse_failure == "raise":
            raise VLMJudgeError(
                f"{message} Make question_template ask for exactly that answer (score='number': the number "
                "alone, within number_range), or set on_parse_failure to a score for such replies."
            )
        logger.warning("%s Scored %s (on_parse_failure).", message, self.on_parse_failure)
        return self.on_parse_failure

    def _post(self, body: bytes) -> Response:
        def give_up(problem: str, attempts: int) -> VLMJudgeError:
            return VLMJudgeError(
                f"The VLM judge at {self.endpoint} failed after {attempts} attempt(s) ({problem}). "
                "Check that the server is running and serves the model "
                f"{self.model!r}; raise retries/timeout/total_timeout if it is overloaded."
            )

        try:
            response = with_retries(
                lambda deadline: self._client.request("POST", "/chat/completions", body, deadline=deadline),
                self.retries,
                self.backoff,
                give_up,
                self.total_timeout,
            )
        except ResponseTooLargeError as error:
            raise VLMJudgeError(f"The VLM judge: {error}") from error
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
