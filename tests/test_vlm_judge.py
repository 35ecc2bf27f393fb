"""VLMJudgeReward against a small OpenAI-compatible chat-completions server written for the tests.

The stand-in judge decodes the image it is sent and answers from its mean red level ``r``: "Yes" with
probability ``r`` (split over the tokens "Yes" and " yes", with "No" taking the rest), or the reply
"Score: <10 r> out of 10". So every score the reward computes can be checked exactly against the image.
"""

import base64
import io
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_trainer
from trl_flow_egrpo.rewards.vlm import VLMJudgeError, VLMJudgeReward, first_number, yes_probability
from trl_flow_egrpo.serve.protocol import quantize

MODEL = "tiny-judge"


class FakeJudge(ThreadingHTTPServer):
    """An OpenAI-compatible ``/v1/chat/completions`` on a free loopback port.

    Attributes set by the tests: ``api_key`` (required bearer token, or None), ``failures_before_success``
    (answer 503 to that many requests first), ``omit_logprobs``, ``reply`` (a fixed reply text),
    ``max_logprobs`` (refuse larger ``top_logprobs`` with a 400), ``delay`` (seconds per request).
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.api_key = self.reply = None
        self.failures_before_success, self.omit_logprobs, self.max_logprobs, self.delay = 0, False, 20, 0.0
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out hung up: expected
            super().handle_error(request, client_address)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def mean_red(data_url: str) -> float:
    """The mean red level in [0, 1] of the image in a data URL."""
    encoded = data_url.split(",", 1)[1]
    return float(np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))[..., 0].mean() / 255)


class JudgeHandler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):
        judge = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with judge.lock:
            judge.requests.append(body)
            judge.in_flight += 1
            judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
            fail = len(judge.requests) <= judge.failures_before_success
        try:
            time.sleep(judge.delay)
            if self.path != "/v1/chat/completions":
                return self.answer(404, {"error": {"message": f"no route {self.path}"}})
            if judge.api_key and self.headers.get("Authorization") != f"Bearer {judge.api_key}":
                return self.answer(401, {"error": {"message": "Invalid API key"}})
            if fail:
                return self.answer(503, {"error": {"message": "overloaded"}})
            if body.get("top_logprobs", 0) > judge.max_logprobs:
                return self.answer(400, {"error": {"message": f"top_logprobs must be <= {judge.max_logprobs}"}})
            if body["model"] != MODEL:
                return self.answer(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
            self.answer(200, self.completion(body, judge))
        finally:
            with judge.lock:
                judge.in_flight -= 1

    @staticmethod
    def completion(body: dict, judge: FakeJudge) -> dict:
        content = body["messages"][-1]["content"]
        red = mean_red(next(part["image_url"]["url"] for part in content if part["type"] == "image_url"))
        reply = judge.reply if judge.reply is not None else f"Score: {10 * red} out of 10"
        choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
        if body.get("logprobs") and not judge.omit_logprobs:
            p = min(max(red, 1e-9), 1 - 1e-9)
            candidates = [("Yes", 0.75 * p), (" yes", 0.25 * p), ("No", 1 - p)]
            choice["message"]["content"] = "Yes" if p >= 0.5 else "No"
            top = [{"token": t, "logprob": math.log(q)} for t, q in candidates][: body["top_logprobs"]]
            choice["logprobs"] = {
                "content": [
                    {"token": choice["message"]["content"], "logprob": math.log(max(p, 1 - p)), "top_logprobs": top}
                ]
            }
        return {"id": "cmpl-test", "object": "chat.completion", "model": MODEL, "choices": [choice]}

    def answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge():
    server = FakeJudge()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def images_with_red(levels) -> torch.Tensor:
    """One 16 x 24 image per red level, with random green and blue."""
    images = torch.rand(len(levels), 3, 16, 24, generator=torch.Generator().manual_seed(0))
    images[:, 0] = torch.tensor(levels).view(-1, 1, 1)
    return images


def expected_red(images: torch.Tensor) -> torch.Tensor:
    return quantize(images)[:, 0].float().mean(dim=(1, 2)) / 255


PROMPTS = ["a red apple", "a blue sky", "a rose"]


def test_yes_probability_scores_and_the_question_sent(judge):
    images = images_with_red([0.9, 0.1, 0.5])
    reward = VLMJudgeReward(judge.base_url, MODEL, "Is this {prompt} ({style})? Answer Yes or No.")
    scores = reward(images, PROMPTS, style=["photo", "painting", "sketch"])
    torch.testing.assert_close(scores, expected_red(images), rtol=1e-6, atol=1e-6)
    questions = sorted(
        part["text"] for body in judge.requests for part in body["messages"][-1]["content"] if part["type"] == "text"
    )
    assert questions == [
        "Is this a blue sky (painting)? Answer Yes or No.",
        "Is this a red apple (photo)? Answer Yes or No.",
        "Is this a rose (sketch)? Answer Yes or No.",
    ]
    body = judge.requests[0]
    assert (body["model"], body["max_tokens"], body["logprobs"], body["top_logprobs"], body["temperature"]) == (
        MODEL,
        1,
        True,
        20,
        0.0,
    )


def test_number_scores(judge):
    images = images_with_red([0.2, 0.7, 1.0])
    reward = VLMJudgeReward(
        judge.base_url, MODEL, "Rate {prompt} from 0 to 10.", score="number", number_range=(0, 10), image_format="jpeg"
    )
    torch.testing.assert_close(
        reward(images, PROMPTS), 10 * torch.tensor([mean_red_jpeg(i) for i in images]), rtol=1e-5, atol=1e-5
    )
    assert judge.requests[0]["max_tokens"] == 16 and "logprobs" not in judge.requests[0]


def mean_red_jpeg(image: torch.Tensor) -> float:
    """What the judge sees of one image sent as JPEG (lossy): the reference for image_format="jpeg"."""
    from trl_flow_egrpo.rewards.vlm import image_data_url

    return mean_red(image_data_url(quantize(image[None])[0], "jpeg"))


def test_an_endpoint_without_logprobs_gets_a_clear_error(judge):
    judge.omit_logprobs = True
    with pytest.raises(
        VLMJudgeError,
        match=rf"{judge.base_url}/chat/completions returned no log-probabilities for "
        r"model 'tiny-judge'.*or use score='number'",
    ):
        VLMJudgeReward(judge.base_url, MODEL)(images_with_red([0.5]), ["a"])


def test_server_errors_are_retried_with_backoff(judge):
    judge.failures_before_success = 2
    start = time.monotonic()
    scores = VLMJudgeReward(judge.base_url, MODEL, retries=2, backoff=0.05, max_concurrency=1)(
        images_with_red([0.3]), ["a"]
    )
    assert time.monotonic() - start >= 0.05 + 0.1
    torch.testing.assert_close(scores, expected_red(images_with_red([0.3])), rtol=1e-6, atol=1e-6)
    assert len(judge.requests) == 3


def test_a_judge_slower_than_the_timeout_fails_after_the_retries(judge):
    judge.delay = 1.0
    start = time.monotonic()
    with pytest.raises(VLMJudgeError, match=r"failed after 2 attempt\(s\) \(TimeoutError: timed out\)"):
        VLMJudgeReward(judge.base_url, MODEL, timeout=0.2, retries=1, backoff=0.01)(images_with_red([0.3]), ["a"])
    assert time.monotonic() - start < 0.9  # two timeouts of 0.2 s, not two answers of 1 s


def test_errors_name_the_endpoint_and_the_fix(judge):
    judge.failures_before_success = 100
    with pytest.raises(VLMJudgeError, match=r"failed after 2 attempt\(s\) \(HTTP 503: overloaded\)"):
        VLMJudgeReward(judge.base_url, MODEL, retries=1, backoff=0.01)(images_with_red([0.3]), ["a"])
    judge.failures_before_success = 0
    judge.api_key = "secret"
    with pytest.raises(VLMJudgeError, match=r"refused the API key \(HTTP 401: Invalid API key\)"):
        VLMJudgeReward(judge.base_url, MODEL, api_key="wrong")(images_with_red([0.3]), ["a"])
    assert VLMJudgeReward(judge.base_url, MODEL, api_key="secret")(images_with_red([0.3]), ["a"]).shape == (1,)
    judge.max_logprobs = 5
    with pytest.raises(
        VLMJudgeError,
        match=r"refused the request for model 'tiny-judge' \(HTTP 400\): top_logprobs "
        r"must be <= 5",
    ):
        VLMJudgeReward(judge.base_url, MODEL, api_key="secret")(images_with_red([0.3]), ["a"])
    with pytest.raises(VLMJudgeError, match=r"HTTP 404\): The model `other` does not exist"):
        VLMJudgeReward(judge.base_url, "other", api_key="secret", top_logprobs=5)(images_with_red([0.3]), ["a"])


def test_replies_without_a_number_or_out_of_range(judge):
    judge.reply = "I cannot rate this."
    with pytest.raises(VLMJudgeError, match=r"replied 'I cannot rate this.', which holds no number"):
        VLMJudgeReward(judge.base_url, MODEL, score="number")(images_with_red([0.3]), ["a"])
    scores = VLMJudgeReward(judge.base_url, MODEL, score="number", unparsable_score=-1.0)(images_with_red([0.3]), ["a"])
    assert scores.tolist() == [-1.0]
    judge.reply = "Score: 12"
    with pytest.raises(VLMJudgeError, match=r"12.0 lies outside number_range \(0, 10\)"):
        VLMJudgeReward(judge.base_url, MODEL, score="number", number_range=(0, 10))(images_with_red([0.3]), ["a"])


def test_requests_in_flight_stay_within_max_concurrency(judge):
    judge.delay = 0.05
    VLMJudgeReward(judge.base_url, MODEL, max_concurrency=3)(images_with_red([0.5] * 12), ["a"] * 12)
    assert judge.max_in_flight == 3 and len(judge.requests) == 12


def test_bad_arguments_and_templates_are_refused():
    with pytest.raises(ValueError, match="score must be one of"):
        VLMJudgeReward("http://127.0.0.1:1/v1", MODEL, score="logits")
    with pytest.raises(ValueError, match="max_concurrency must be an integer >= 1"):
        VLMJudgeReward("http://127.0.0.1:1/v1", MODEL, max_concurrency=0)
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        VLMJudgeReward("localhost:8000/v1", MODEL)
    with pytest.raises(ValueError, match=r"uses \{style\}, which is neither 'prompt' nor a dataset column"):
        VLMJudgeReward("http://127.0.0.1:1/v1", MODEL, "Is it {prompt} in {style}?")(images_with_red([0.3]), ["a"])


def test_score_parsers():
    assert yes_probability(
        [
            {"token": " YES", "logprob": math.log(0.5)},
            {"token": "yes", "logprob": math.log(0.25)},
            {"token": "No", "logprob": math.log(0.25)},
        ]
    ) == pytest.approx(0.75)
    assert yes_probability([{"token": "No", "logprob": 0.0}]) == 0.0
    assert first_number("Score: 7.5/10") == 7.5 and first_number("-3") == -3.0 and first_number("none") is None


def test_training_with_the_judge_as_reward(judge, tmp_path):
    reward = VLMJudgeReward(judge.base_url, MODEL, max_concurrency=4)
    history = tiny_trainer(tmp_path, [reward], max_steps=1).train().log_history
    assert 0.0 <= history[0]["reward/vlm_judge/mean"] <= 1.0
    assert len(judge.requests) == 2 * 4 * 4 + 2  # 2 prompts x 4 merged steps x G=4 rollouts, plus 2 anchors
