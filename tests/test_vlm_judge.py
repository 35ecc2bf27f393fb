"""VLMJudgeReward against a small OpenAI-compatible chat-completions server written for the tests.

The stand-in judge decodes the image it is sent (the last one, the edited image, when it is sent two) and
answers from its mean red level ``r``: "Yes" with probability ``r`` (split over the tokens "Yes" and " yes",
with "No" taking the rest), or the reply "<10 r>" (the number alone, as the number question asks). So every
score the reward computes can be checked exactly against the image. Tests can also make it send given
candidates, a given reply, or any payload.
"""

import base64
import io
import json
import math
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_trainer
from trl_flow_egrpo.rewards.vlm import (
    DEFAULT_EDIT_NUMBER_QUESTION,
    DEFAULT_EDIT_QUESTION,
    DEFAULT_NUMBER_QUESTION,
    VLMJudgeError,
    VLMJudgeReward,
    number_answer,
    yes_probability,
)
from trl_flow_egrpo.serve.protocol import quantize

MODEL = "tiny-judge"


class FakeJudge(ThreadingHTTPServer):
    """An OpenAI-compatible ``/v1/chat/completions`` on a free loopback port.

    Attributes set by the tests: ``api_key`` (required bearer token, or None), ``failures_before_success``
    (answer 503 to that many requests first), ``omit_logprobs``, ``reply`` (a fixed reply text),
    ``max_logprobs`` (refuse larger ``top_logprobs`` with a 400), ``delay`` (seconds per request),
    ``candidates`` (the ``top_logprobs`` list to send instead of the image's), ``payload`` (a body to send
    instead of a completion).
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.api_key = self.reply = self.candidates = self.payload = None
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
            self.answer(200, judge.payload if judge.payload is not None else self.completion(body, judge))
        finally:
            with judge.lock:
                judge.in_flight -= 1

    @staticmethod
    def completion(body: dict, judge: FakeJudge) -> dict:
        content = body["messages"][-1]["content"]
        red = mean_red([part["image_url"]["url"] for part in content if part["type"] == "image_url"][-1])
        reply = judge.reply if judge.reply is not None else f"{10 * red}"
        choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
        if body.get("logprobs") and not judge.omit_logprobs:
            p = min(max(red, 1e-9), 1 - 1e-9)
            candidates = [("Yes", 0.75 * p), (" yes", 0.25 * p), ("No", 1 - p)]
            choice["message"]["content"] = "Yes" if p >= 0.5 else "No"
            top = [{"token": t, "logprob": math.log(q)} for t, q in candidates][: body["top_logprobs"]]
            top = judge.candidates if judge.candidates is not None else top
            choice["logprobs"] = {
                "content": [
                    {"token": choice["message"]["content"], "logprob": math.log(max(p, 1 - p)), "top_logprobs": top}
                ]
            }
        return {"id": "cmpl-test", "object": "chat.completion", "model": MODEL, "choices": [choice]}

    def answer(self, status: int, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
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


def as_pil(image: torch.Tensor) -> Image.Image:
    """A ``[3, H, W]`` image in [0, 1] as the PIL image of its uint8 quantization (what a dataset would hold)."""
    return Image.fromarray(quantize(image[None])[0].permute(1, 2, 0).numpy())


def sent_images(body: dict) -> list[Image.Image]:
    """The images of a request's user message, in the order they were sent."""
    urls = [part["image_url"]["url"] for part in body["messages"][-1]["content"] if part["type"] == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB") for url in urls]


def test_an_edit_judge_sends_the_source_then_the_edited_image(judge):
    edited = images_with_red([0.9, 0.2, 0.6])
    sources = images_with_red([0.1, 0.7, 0.4]).flip(-1)  # other reds, other pixels
    reward = VLMJudgeReward(judge.base_url, MODEL, source_image_column="source_image")
    scores = reward(edited, PROMPTS, source_image=[as_pil(source) for source in sources])
    torch.testing.assert_close(scores, expected_red(edited), rtol=1e-6, atol=1e-6)  # the judge saw the edits
    assert len(judge.requests) == 3
    for body in judge.requests:
        content = body["messages"][-1]["content"]
        assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
        row = [DEFAULT_EDIT_QUESTION.format(prompt=prompt) for prompt in PROMPTS].index(content[2]["text"])
        source, edit = (torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in sent_images(body))
        assert torch.equal(source, quantize(sources[row : row + 1])[0])  # the source first, lossless (PNG)
        assert torch.equal(edit, quantize(edited[row : row + 1])[0])


def test_an_edit_judge_resizes_the_source_and_asks_for_a_number(judge, tmp_path):
    path = tmp_path / "source.png"
    Image.new("RGB", (48, 32), (255, 0, 0)).save(path)  # twice the edited images' 24 x 16, all red
    edited = images_with_red([0.3, 0.8])
    reward = VLMJudgeReward(judge.base_url, MODEL, score="number", source_image_column="before")
    scores = reward(edited, PROMPTS[:2], before=[path, str(path)])
    torch.testing.assert_close(scores, 10 * expected_red(edited), rtol=1e-5, atol=1e-5)
    assert reward.question_template == DEFAULT_EDIT_NUMBER_QUESTION and reward.number_range == (0.0, 10.0)
    for body in judge.requests:
        source = sent_images(body)[0]
        assert source.size == (24, 16) and np.asarray(source)[..., 0].min() == 255


def test_an_edit_judge_without_its_source_column_says_which_and_how():
    reward = VLMJudgeReward("http://127.0.0.1:1/v1", MODEL, source_image_column="source_image")
    with pytest.raises(
        ValueError,
        match=r"reads the dataset column 'source_image', which this batch lacks \(columns: \['style'\]\)\. "
        r"Add a 'source_image' column .* or pass source_image_column=<your column>",
    ):
        reward(images_with_red([0.3]), ["a"], style=["photo"])
    with pytest.raises(ValueError, match=r"Column 'source_image' has 1 entries for 2 images"):
        reward(images_with_red([0.3, 0.4]), ["a", "b"], source_image=[images_with_red([0.3])[0]])
    with pytest.raises(TypeError, match=r"column 'source_image', row 0 is a NoneType: expected a PIL image"):
        reward(images_with_red([0.3]), ["a"], source_image=[None])


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
    with pytest.raises(
        VLMJudgeError, match=r"failed after 2 attempt\(s\) \(TimeoutError: timed out: no complete answer"
    ):
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


def test_replies_without_a_number_alone_or_out_of_range_are_parse_failures(judge):
    judge.reply = "I cannot rate this."
    with pytest.raises(
        VLMJudgeError,
        match=rf"The judge 'tiny-judge' at {judge.base_url}/chat/completions replied with something other "
        r"than a number alone: 'I cannot rate this.'.*set on_parse_failure",
    ):
        VLMJudgeReward(judge.base_url, MODEL, score="number")(images_with_red([0.3]), ["a"])
    judge.reply = "12"
    with pytest.raises(VLMJudgeError, match=r"replied 12, outside number_range \(0.0, 10.0\): '12'"):
        VLMJudgeReward(judge.base_url, MODEL, score="number", number_range=(0, 10))(images_with_red([0.3]), ["a"])
    judge.reply = "x" * 500  # a long reply is quoted in part
    with pytest.raises(VLMJudgeError, match=r": 'x{200}'\.\.\.\. Make question_template"):
        VLMJudgeReward(judge.base_url, MODEL, score="number")(images_with_red([0.3]), ["a"])


def test_the_default_number_question_asks_for_the_number_alone_on_its_range(judge):
    images = images_with_red([0.2, 0.7])
    reward = VLMJudgeReward(judge.base_url, MODEL, score="number")
    torch.testing.assert_close(reward(images, PROMPTS[:2]), 10 * expected_red(images), rtol=1e-5, atol=1e-5)
    assert reward.question_template == DEFAULT_NUMBER_QUESTION and reward.number_range == (0.0, 10.0)
    texts = [part["text"] for body in judge.requests for part in body["messages"][-1]["content"] if "text" in part]
    assert sorted(texts) == sorted(DEFAULT_NUMBER_QUESTION.format(prompt=p) for p in PROMPTS[:2])
    assert VLMJudgeReward(judge.base_url, MODEL, "Rate {prompt} from 1 to 100.", score="number").number_range is None


# The cases (issue 18, section 6). A reply in the wrong form is a parse failure: raised by default,
# or scored with on_parse_failure and counted in parse_failures.
@pytest.mark.parametrize(
    "reply, number_range",
    [
        ("I'm sorry\u2026 2 reasons", None),  # scored 2.0 by the first-number parser
        ("On 2024-01-01 I rate it 9", (0, 10)),  # scored 2024.0, even with the range
        ("Score: 7 out of 10", (0, 10)),  # a number inside text: not the format the question asks for
        ("8/10", (0, 10)),
        ("-1", (0, 10)),
        ("", None),
    ],
)
def test_number_replies_in_another_form_are_parse_failures(judge, reply, number_range):
    judge.reply = reply
    question = "Rate {prompt} from 0 to 10. Answer with the number only."
    strict = VLMJudgeReward(judge.base_url, MODEL, question, score="number", number_range=number_range)
    with pytest.raises(
        VLMJudgeError, match=rf"at {judge.base_url}/chat/completions replied .*: {re.escape(repr(reply))}\."
    ):
        strict(images_with_red([0.3]), ["a"])
    assert strict.parse_failures == 1
    lenient = VLMJudgeReward(
        judge.base_url, MODEL, question, score="number", number_range=number_range, on_parse_failure=-1.0
    )
    assert lenient(images_with_red([0.3, 0.6]), ["a", "b"]).tolist() == [-1.0, -1.0]
    assert lenient.parse_failures == 2


@pytest.mark.parametrize("reply", ["7", " 7.5\n", "7.", "+3", ".5", "10"])
def test_a_number_alone_within_the_range_is_the_score(judge, reply):
    judge.reply = reply
    reward = VLMJudgeReward(judge.base_url, MODEL, score="number", number_range=(0, 10))
    assert reward(images_with_red([0.3]), ["a"]).tolist() == [float(reply)]
    assert reward.parse_failures == 0


def test_the_deprecated_unparsable_score_sets_the_fallback(judge):
    judge.reply = "no idea"
    with pytest.warns(FutureWarning, match="use on_parse_failure"):
        reward = VLMJudgeReward(judge.base_url, MODEL, score="number", unparsable_score=-2.0)
    assert reward(images_with_red([0.3]), ["a"]).tolist() == [-2.0] and reward.parse_failures == 1


def candidates(*pairs) -> list[dict]:
    return [{"token": token, "logprob": logprob} for token, logprob in pairs]


def normalized_yes(pairs) -> float:
    """The reference: P(yes) as the softmax of the answer tokens' logprobs, each distinct token text once."""
    answers = {}
    for token, logprob in pairs:
        if token.strip().lower() in ("yes", "no"):
            answers[token] = max(answers.get(token, -math.inf), logprob)
    logits = torch.tensor(list(answers.values()), dtype=torch.float64)
    is_yes = torch.tensor([t.strip().lower() == "yes" for t in answers])
    return torch.softmax(logits, 0)[is_yes].sum().item()


@pytest.mark.parametrize(
    "pairs",
    [
        [("Yes", 5.0)],  # scored exp(5) = 148.4
        [("Yes", 5.0), ("No", 0.0)],
        [("Yes", 0.0), (" yes", 0.0), ("YES", 0.0)],  # scored 3.0
        [("Yes", 0.0), (" yes", 0.0), ("YES", 0.0), ("No", 0.0)],
        [("Yes", math.log(0.5)), ("Yes", math.log(0.5)), ("No", math.log(0.5))],  # a repeated entry counts once
        [("No", math.log(0.9)), ("The", math.log(0.05)), (" yes", math.log(0.05))],  # other tokens do not count
        [("Yes", 1000.0), ("No", 999.0)],  # would overflow exp
        [("no", 0.0), ("Yes", -math.inf)],
    ],
)
def test_yes_probability_is_a_probability_normalized_over_the_answer_tokens(judge, pairs):
    judge.candidates = candidates(*pairs)
    score = VLMJudgeReward(judge.base_url, MODEL)(images_with_red([0.3]), ["a"]).item()
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(normalized_yes(pairs), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("pairs", [[("The", 0.0), ("A", -1.0)], [("Yes", -math.inf), ("No", -math.inf)]])
def test_no_answer_token_among_the_candidates_is_a_parse_failure(judge, pairs):
    judge.candidates = candidates(*pairs)
    reward = VLMJudgeReward(judge.base_url, MODEL)
    with pytest.raises(VLMJudgeError, match=r"gave no 'yes' or 'no' among the 2 answer candidates"):
        reward(images_with_red([0.3]), ["a"])
    fallback = VLMJudgeReward(judge.base_url, MODEL, on_parse_failure=0.0)
    assert fallback(images_with_red([0.3]), ["a"]).tolist() == [0.0]
    assert (reward.parse_failures, fallback.parse_failures) == (1, 1)


def completion(message=None, logprobs=None) -> dict:
    choice = {"index": 0, "message": message or {"role": "assistant", "content": "Yes"}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


def with_candidates(top) -> dict:
    return completion(logprobs={"content": [{"token": "Yes", "logprob": 0.0, "top_logprobs": top}]})


# Malformed answers are always errors (never parse failures) that name the endpoint and what is wrong.
@pytest.mark.parametrize(
    "score, payload, message",
    [
        ("yes_probability", with_candidates(candidates(("Yes", "-0.1"))), r"top_logprobs\[0\].logprob is '-0.1'"),
        ("yes_probability", with_candidates(candidates(("Yes", None))), r"top_logprobs\[0\].logprob is None"),
        ("yes_probability", with_candidates([{"token": "Yes"}]), r"top_logprobs\[0\].logprob is None"),
        ("yes_probability", with_candidates([{"logprob": 0.0}]), r"top_logprobs\[0\].token is None"),
        ("yes_probability", with_candidates(candidates(("Yes", math.nan))), r"logprob is nan, not a log-prob"),
        ("yes_probability", with_candidates(["Yes"]), r"top_logprobs\[0\] is a str, not an object"),
        ("yes_probability", with_candidates("Yes: -0.1"), r"content\[0\].top_logprobs is a str, not a list"),
        ("yes_probability", completion(logprobs={"content": {"token": "Yes"}}), r"logprobs.content is a dict"),
        ("yes_probability", completion(logprobs={"content": ["Yes"]}), r"logprobs.content\[0\] is a str"),
        ("yes_probability", completion(logprobs="Yes"), r"choices\[0\].logprobs is a str, not an object"),
        ("number", completion({"role": "assistant", "content": [{"type": "text", "text": "7"}]}), r"is a list"),
        ("number", completion({"role": "assistant", "content": 7}), r"message.content is a int, not a string"),
        ("number", {"choices": [{"index": 0}]}, r"choices\[0\].message is NoneType, not an object"),
        ("number", {"choices": ["7"]}, r"did not answer like a chat-completions endpoint \(choices\[0\] is a str"),
        ("number", {"choices": []}, r"did not answer like a chat-completions endpoint \(it has no 'choices' list"),
        ("number", {"object": "list", "data": []}, r"did not answer like a chat-completions endpoint"),
        ("number", ["7"], r"did not answer like a chat-completions endpoint"),
    ],
)
def test_malformed_answers_are_clear_errors_naming_the_endpoint(judge, score, payload, message):
    judge.payload = payload
    reward = VLMJudgeReward(judge.base_url, MODEL, score=score, on_parse_failure=0.5)
    with pytest.raises(VLMJudgeError, match=rf"{judge.base_url}/chat/completions .*{message}"):
        reward(images_with_red([0.3]), ["a"])
    assert reward.parse_failures == 0


def test_an_answer_that_is_not_json_is_a_clear_error(judge):
    judge.payload = b"<html>502 Bad Gateway</html>"
    with pytest.raises(VLMJudgeError, match=r"did not answer like a chat-completions endpoint.*<html>502"):
        VLMJudgeReward(judge.base_url, MODEL)(images_with_red([0.3]), ["a"])


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
        candidates((" YES", math.log(0.5)), ("yes", math.log(0.25)), ("No", math.log(0.25)))
    ) == pytest.approx(0.75)
    assert yes_probability(candidates(("No", 0.0))) == 0.0
    assert yes_probability(candidates(("\u2581Yes", 0.0), ("\u0120no", 0.0))) == pytest.approx(0.5)  # tokenizer marks
    assert yes_probability(candidates(("Maybe", 0.0))) is None and yes_probability([]) is None
    assert number_answer("7.5") == 7.5 and number_answer(" -3\n") == -3.0
    for reply in ("Score: 7.5/10", "7.5/10", "none", "1e3", "nan", "inf", "7 7", "2024-01-01", "- 3"):
        assert number_answer(reply) is None, reply


def test_bad_policy_and_range_arguments_are_refused():
    for policy in ("fallback", None, math.nan, True):
        with pytest.raises(ValueError, match="on_parse_failure must be 'raise' or a finite number"):
            VLMJudgeReward("http://127.0.0.1:1/v1", MODEL, on_parse_failure=policy)
    for number_range in ((10, 0), (0, math.inf), (0,), ("a", "b")):
        with pytest.raises(ValueError, match="number_range must be"):
            VLMJudgeReward("http://127.0.0.1:1/v1", MODEL, score="number", number_range=number_range)


def test_training_with_the_judge_as_reward(judge, tmp_path):
    reward = VLMJudgeReward(judge.base_url, MODEL, max_concurrency=4)
    history = tiny_trainer(tmp_path, [reward], max_steps=1).train().log_history
    assert 0.0 <= history[0]["reward/vlm_judge/mean"] <= 1.0
    assert len(judge.requests) == 2 * 4 * 4 + 2  # 2 prompts x 4 merged steps x G=4 rollouts, plus 2 anchors


def test_the_trainer_logs_the_judges_parse_failures(judge, tmp_path):
    judge.reply = "I would rather not say"
    reward = VLMJudgeReward(judge.base_url, MODEL, score="number", on_parse_failure=0.0, max_concurrency=4)
    history = tiny_trainer(tmp_path, [reward], max_steps=1).train().log_history
    assert history[0]["reward/vlm_judge/parse_failures"] == len(judge.requests) == 2 * 4 * 4 + 2
