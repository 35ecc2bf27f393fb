"""Remote rewards: the real reward server (``trl-flow-egrpo serve-reward``) in a subprocess on a free loopback
port, and RemoteReward against it. Every server is stopped at the end of its test or module."""

import http.client
import json
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

import reward_fixtures as fixtures
from helpers import tiny_trainer
from trl_flow_egrpo import checkpoints, cli
from trl_flow_egrpo.rewards import BrightnessReward, ColorReward, PickScoreReward
from trl_flow_egrpo.rewards.remote import RemoteReward, RemoteRewardError
from trl_flow_egrpo.serve import protocol
from trl_flow_egrpo.serve.launch import RewardServerProcess
from trl_flow_egrpo.serve.protocol import CONTENT_TYPE, dequantize, quantize
from trl_flow_egrpo.serve.server import BatchScorer, RewardFailure, load_reward

TOKEN = "test-token-0123456789"
STARTUP_SECONDS = 180  # importing torch, diffusers and peft on a busy 2-core machine
PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose"]


def start_server(name: str, log_dir: Path, *args: str, token: str | None = None, port: int = 0):
    """A reward server subprocess (one torch thread, offline, warnings only), starting in the background."""
    return RewardServerProcess(
        name,
        "--log-level",
        "warning",
        *args,
        port=port,
        token=token,
        log_dir=log_dir,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        startup_timeout=STARTUP_SECONDS,
    )


def post(url: str, body: bytes, token: str | None = TOKEN, path: str = "/score") -> tuple[int, str]:
    """One raw POST (no client code of the package involved); returns (status, detail)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Content-Type": CONTENT_TYPE, **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    return response.status, json.loads(payload).get("detail", "") if payload.startswith(b"{") else payload.decode()


def health(url: str) -> dict:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", "/health", headers={"Authorization": f"Bearer {TOKEN}"})
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def locally_quantized(reward):
    """``reward`` applied to the images as the server sees them: the local reference of a remote score."""

    def score(images, prompts, **columns):
        return reward(dequantize(quantize(images)), prompts, **columns)

    score.name = reward.name
    return score


@pytest.fixture(scope="module")
def pickscore_files(tmp_path_factory):
    model_dir, processor_dir = fixtures.save_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))
    return {"model": str(model_dir), "processor": str(processor_dir)}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, pickscore_files):
    """The module's servers, started at once (each takes seconds to import torch and diffusers):

    * ``color``: the weight-free colour reward behind a token, with small limits (1 MB and 16 images per
      request, 8 images per reward call);
    * ``pickscore``: a tiny PickScore model (official save_pretrained layout), loaded by name with --reward-kwargs;
    * ``killable``: another colour reward behind a token, for the test that kills it;
    * ``unknown``: a reward name that does not exist, for the test of a server that cannot start.
    """
    for package in ("fastapi", "uvicorn"):
        pytest.importorskip(package)  # fallback only: the dev extra installs the server extra
    started = {}
    try:
        started["color"] = start_server(
            "color",
            tmp_path_factory.mktemp("color"),
            "--max-request-mb",
            "1",
            "--max-batch",
            "16",
            "--batch-size",
            "8",
            token=TOKEN,
        )
        started["pickscore"] = start_server(
            "pickscore",
            tmp_path_factory.mktemp("pickscore_server"),
            "--reward-kwargs",
            json.dumps(pickscore_files),
            "--device",
            "cpu",
        )
        started["killable"] = start_server("color", tmp_path_factory.mktemp("killable"), token=TOKEN)
        started["unknown"] = start_server("no_such_reward", tmp_path_factory.mktemp("unknown"))
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def color_server(servers):
    return servers["color"].ready()


@pytest.fixture
def pickscore_server(servers):
    return servers["pickscore"].ready()


# --------------------------------------------------------------------------------------------- remote == local


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_remote_weight_free_scores_equal_the_local_reward_on_the_quantized_images(color_server, encoding):
    images = random_images(5, 24, 40)  # not square, not a multiple of anything
    remote = RemoteReward(color_server.url, token=TOKEN, encoding=encoding)
    scores = remote(images, PROMPTS)
    assert remote.name == "color"  # from /health
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, locally_quantized(ColorReward())(images, PROMPTS), rtol=0, atol=1e-6)


def test_remote_tiny_model_scores_equal_the_local_reward_on_the_quantized_images(pickscore_server, pickscore_files):
    images = random_images(8, 64, 64, seed=1)
    prompts = ["a photo of a cat", "the red car", "a dog", "the sky"] * 2
    remote = RemoteReward(pickscore_server.url, name="pickscore")
    local = locally_quantized(PickScoreReward(**pickscore_files))(images, prompts)
    torch.testing.assert_close(remote(images, prompts), local, rtol=1e-6, atol=1e-6)
    assert local.std() > 1e-3  # the tiny model tells the images apart, so the comparison means something


def test_health_names_reward_version_device_and_limits(color_server):
    info = health(color_server.url)
    assert info["reward"] == "color" and info["device"] == "cpu" and info["version"]
    assert info["max_images"] == 16 and info["max_request_bytes"] == 1_000_000


def test_batches_over_the_server_limits_are_split_and_concurrent_clients_share_one_reward(color_server):
    # 40 images of 64 x 64: more than the 16 images per request the server takes; four threads at once.
    remote = RemoteReward(color_server.url, token=TOKEN, name="color")
    batches = [random_images(40, 64, 64, seed=seed) for seed in range(4)]
    results = [None] * 4

    def score(i):
        results[i] = remote(batches[i], [f"prompt {j}" for j in range(40)])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for images, scores in zip(batches, results, strict=True):
        torch.testing.assert_close(scores, locally_quantized(ColorReward())(images, [""] * 40), rtol=0, atol=1e-6)


def test_quantization_contract():
    images = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 0.2, 1.0, -0.3, 1.7]).view(1, 1, 7, 1).expand(1, 3, 7, 1)
    assert quantize(images)[0, 0, :, 0].tolist() == [0, 0, 2, 51, 255, 0, 255]  # round half to even, clamped
    assert torch.equal(dequantize(quantize(images)), quantize(images).float() / 255)


def test_request_round_trip_keeps_images_prompts_and_columns():
    images = quantize(random_images(3, 8, 12))
    columns = {"seed": [1, 2, 3], "tags": [["a"], [], ["b", "c"]], "weight": torch.tensor([0.5, 1.0, 2.0])}
    for encoding in ("raw", "png"):
        batch = protocol.decode_request(protocol.encode_request(images, ["x", "y", "z"], columns, encoding), 3, 10**6)
        assert torch.equal(batch.images, images) and batch.prompts == ["x", "y", "z"]
        assert batch.columns == {"seed": [1, 2, 3], "tags": [["a"], [], ["b", "c"]], "weight": [0.5, 1.0, 2.0]}
    with pytest.raises(ValueError, match="Column 'path' cannot be sent to a remote reward"):
        protocol.encode_request(images, ["x", "y", "z"], {"path": [Path("a"), Path("b"), Path("c")]})


# --------------------------------------------------------------------------------------------- refusals


def test_missing_or_wrong_token_gets_401_and_a_clear_client_error(color_server):
    body = protocol.encode_request(quantize(random_images(1, 8, 8)), ["a"], {})
    assert post(color_server.url, body, token=None)[0] == 401
    assert post(color_server.url, body, token="wrong")[0] == 401
    for token in (None, "wrong"):
        with pytest.raises(
            RemoteRewardError,
            match=rf"at {color_server.url}/health refused the token \(HTTP 401.*"
            r"token is missing or wrong",
        ):
            RemoteReward(color_server.url, token=token, retries=0)(random_images(1, 8, 8), ["a"])


def test_the_client_reads_the_token_from_the_environment(color_server, monkeypatch):
    monkeypatch.setenv(protocol.TOKEN_ENV, TOKEN)
    assert RemoteReward(color_server.url).name == "color"


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "not a scoring request"),
        (b"\x80\x04\x95pickle", "not a scoring request"),
        (protocol.MAGIC + b"\x00\x00\x00\x05{bad}", "header is not valid JSON"),
        (protocol.MAGIC + b"\xff\xff\xff\xff{}", "header length"),
    ],
)
def test_malformed_payloads_get_400_with_a_message(color_server, body, message):
    status, detail = post(color_server.url, body)
    assert status == 400 and message in detail, (status, detail)


def _with_header(images: torch.Tensor, **changes) -> bytes:
    """A valid request for ``images`` whose header fields are then replaced by ``changes``."""
    body = protocol.encode_request(images, ["p"] * len(images), {})
    length = int.from_bytes(body[4:8], "big")
    header = {**json.loads(body[8 : 8 + length]), **changes}
    header_bytes = json.dumps(header).encode()
    return protocol.MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes + body[8 + length :]


@pytest.mark.parametrize(
    "changes, status, message",
    [
        ({"shape": [1, 3, 8, 16]}, 400, "take 384 bytes, but 192 follow"),
        ({"shape": [1, 4, 8, 8]}, 400, "shape must be [B, 3, H, W]"),
        ({"prompts": ["a", "b"]}, 400, "prompts must be a list of 1 strings"),
        ({"columns": {"seed": [1, 2]}}, 400, "columns must map each column name to a list of 1 values"),
        ({"version": 99}, 400, "Protocol version 99 is not supported"),
        ({"encoding": "pickle"}, 400, "encoding must be one of"),
        ({"encoding": "png", "png_lengths": [192]}, 400, "Image 0 is not a readable PNG"),
        ({"shape": [17, 3, 1, 1]}, 413, "at most 16 per request"),
        ({"shape": [1, 3, 1000, 1000]}, 413, "at most 1000000 per request"),
    ],
)
def test_invalid_headers_are_refused_naming_the_problem(color_server, changes, status, message):
    got_status, detail = post(color_server.url, _with_header(quantize(random_images(1, 8, 8)), **changes))
    assert got_status == status and message in detail, (got_status, detail)


def test_oversize_requests_are_refused_and_the_server_keeps_serving(color_server):
    status, detail = post(color_server.url, b"\0" * 1_200_000)
    assert status == 413 and "larger than this server's limit of 1000000 bytes" in detail
    with pytest.raises(
        RemoteRewardError,
        match=r"One 600 x 600 image takes 1080000 bytes, over the limit of 1000000 "
        r"bytes .*--max-request-mb",
    ):
        RemoteReward(color_server.url, token=TOKEN)(random_images(1, 600, 600), ["a"])
    assert health(color_server.url)["status"] == "ok"


def test_client_errors_name_the_url_after_the_retries(tmp_path):
    with FreePort() as port:  # a port nothing listens on
        url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError,
        match=rf"Remote reward at {url}/health failed after 3 attempt\(s\) "
        r"\(ConnectionRefusedError.*is running and reachable",
    ):
        RemoteReward(url, retries=2, backoff=0.05)(random_images(1, 8, 8), ["a"])
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff 0.05 then 0.1 s
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        RemoteReward("127.0.0.1:8711")
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        RemoteReward("http://127.0.0.1:8711", retries=-1)


class FreePort:
    """A free loopback port, reserved while the ``with`` block runs."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


def test_a_server_that_cannot_start_says_why(servers):
    with pytest.raises(
        RuntimeError,
        match=r"(?s)exited with code 1:.*cannot serve 'no_such_reward': ValueError: "
        r"Unknown reward 'no_such_reward'. Known rewards: hps, clip",
    ):
        servers["unknown"].ready()


# --------------------------------------------------------------------------------------------- the batching worker


class RecordingReward:
    """Colour reward that records the batch size of each call, refuses prompts containing "bad", and can
    hold its first call until released (so that later requests queue up behind it)."""

    name = "recording"

    def __init__(self):
        self.calls, self.release, self.entered = [], threading.Event(), threading.Event()

    def __call__(self, images, prompts, **columns):
        self.entered.set()
        self.release.wait(timeout=30)
        if any("bad" in p for p in prompts):
            raise ValueError("prompt 'bad' is not allowed")
        self.calls.append(len(prompts))
        return ColorReward()(images, prompts)


def _batch(n: int, prompt: str = "ok", size: int = 8, seed: int = 0):
    return protocol.ScoreBatch(quantize(random_images(n, size, size, seed)), [prompt] * n, {})


def test_queued_compatible_requests_are_scored_together_and_a_bad_one_fails_alone():
    reward = RecordingReward()
    scorer = BatchScorer(reward, "cpu", batch_size=8)
    try:
        first = scorer.submit(_batch(2))
        assert reward.entered.wait(timeout=30)
        # While the first call runs: three compatible requests, one of another size, one the reward refuses.
        queued = [scorer.submit(_batch(2, seed=s)) for s in (1, 2, 3)]
        other_size = scorer.submit(_batch(2, size=16))
        bad = scorer.submit(_batch(1, prompt="bad"))
        reward.release.set()
        assert len(first.result(timeout=30)) == 2
        for future, seed in zip(queued, (1, 2, 3), strict=True):
            expected = ColorReward()(dequantize(_batch(2, seed=seed).images), ["ok"] * 2)
            torch.testing.assert_close(torch.tensor(future.result(timeout=30)), expected, rtol=0, atol=1e-6)
        assert len(other_size.result(timeout=30)) == 2
        with pytest.raises(RewardFailure, match="Reward 'recording' rejected the batch: prompt 'bad' is not allowed"):
            bad.result(timeout=30)
    finally:
        scorer.close()
    # The three queued requests (6 images) and the bad one (7 <= 8) went in one call, which failed and was
    # redone request by request; the 16 x 16 request never joined 8 x 8 images.
    assert reward.calls == [2, 2, 2, 2, 2], reward.calls


def test_requests_larger_than_the_batch_size_are_scored_in_chunks():
    reward = RecordingReward()
    reward.release.set()
    scorer = BatchScorer(reward, "cpu", batch_size=4)
    try:
        assert len(scorer.submit(_batch(10)).result(timeout=30)) == 10
    finally:
        scorer.close()
    assert reward.calls == [4, 4, 2]


def test_non_finite_scores_and_crashes_of_the_reward_become_422_and_500():
    def nan_reward(images, prompts, **columns):
        return torch.full((len(prompts),), float("nan"))

    def crashing_reward(images, prompts, **columns):
        raise RuntimeError("CUDA out of memory")

    for reward, status, message in ((nan_reward, 422, "returned NaN or inf"), (crashing_reward, 500, "out of memory")):
        scorer = BatchScorer(reward, "cpu", batch_size=4)
        try:
            with pytest.raises(RewardFailure, match=message) as failure:
                scorer.submit(_batch(2)).result(timeout=30)
            assert failure.value.status == status
        finally:
            scorer.close()


# --------------------------------------------------------------------------------------------- the command


def test_load_reward_by_name_or_module_callable():
    assert isinstance(load_reward("color", {"target": [0, 1, 0]}), ColorReward)
    assert isinstance(load_reward("trl_flow_egrpo.rewards:BrightnessReward"), BrightnessReward)
    assert load_reward("trl_flow_egrpo.scoring:reward_name").__name__ == "reward_name"
    with pytest.raises(ValueError, match="Unknown reward 'nope'"):
        load_reward("nope")
    with pytest.raises(ValueError, match="Cannot import 'no_such_module'"):
        load_reward("no_such_module:fn")
    with pytest.raises(ValueError, match="is a function, not a class"):
        load_reward("trl_flow_egrpo.scoring:reward_name", {"x": 1})


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["serve-reward", "color", "--reward-kwargs", "{bad"], 2, "--reward-kwargs is not valid JSON"),
        (["serve-reward", "color", "--reward-kwargs", "[1]"], 2, "--reward-kwargs must be a JSON object"),
        (["serve-reward", "color", "--batch-size", "0"], 2, "--batch-size must be >= 1"),
        (["serve-reward", "color", "--host", "0.0.0.0"], 2, "needs a token: set $TRL_EGRPO_REWARD_TOKEN"),
        (["serve-reward", "nope"], 1, "cannot serve 'nope': ValueError: Unknown reward 'nope'"),
        (["serve-reward", "color", "--reward-kwargs", '{"target": [2, 0, 0]}'], 1, "target must be three RGB values"),
    ],
)
def test_command_line_errors_are_clear(argv, code, message, capsys, monkeypatch):
    monkeypatch.delenv(protocol.TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == code
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- training


def test_async_training_on_a_remote_reward_equals_training_on_the_local_one(color_server, tmp_path):
    remote = RemoteReward(color_server.url, token=TOKEN)
    remote_history = tiny_trainer(tmp_path / "remote", [remote], max_steps=1, async_rewards=True).train().log_history
    local_history = (
        tiny_trainer(tmp_path / "local", [locally_quantized(ColorReward())], max_steps=1, async_rewards=True)
        .train()
        .log_history
    )
    for key in ("reward/weighted_mean", "reward/color/std", "loss", "advantage/std", "grad_norm"):
        assert remote_history[0][key] == local_history[0][key], key


def test_a_server_killed_mid_run_ends_the_run_clearly_and_a_resume_continues_exactly(servers, color_server, tmp_path):
    keys = ["loss", "ratio/mean", "reward/weighted_mean", "reward/color/mean", "grad_norm", "advantage/std"]
    baseline = tiny_trainer(tmp_path / "baseline", [RemoteReward(color_server.url, token=TOKEN)], max_steps=3)
    history = baseline.train().log_history

    server = servers["killable"].ready()
    remote = RemoteReward(server.url, token=TOKEN, retries=2, backoff=0.05)
    calls = []

    def killing_reward(images, prompts, **columns):  # the server dies just before iteration 3 is scored
        calls.append(len(images))
        if len(calls) == 3:
            server.kill()
        return remote(images, prompts, **columns)

    killing_reward.name = "color"
    run = tmp_path / "run"
    with pytest.raises(RemoteRewardError, match=rf"Remote reward at {server.url}/score failed after 3 attempt"):
        tiny_trainer(run, [killing_reward], max_steps=3, save_steps=1).train()
    restarted = start_server("color", tmp_path / "restarted", token=TOKEN, port=server.port)
    try:
        assert checkpoints.list_checkpoints(str(run)) == [str(run / "checkpoint-1"), str(run / "checkpoint-2")]
        for checkpoint in checkpoints.list_checkpoints(str(run)):
            checkpoints.verify(checkpoint)
        resumed = tiny_trainer(run, [remote], max_steps=3, save_steps=1, resume_from_checkpoint="true")
        assert restarted.ready().url == server.url
        resumed_history = resumed.train().log_history
    finally:
        restarted.stop()
    assert len(resumed_history) == 3
    for key in keys:
        assert resumed_history[2][key] == history[2][key], key
    for a, b in zip(
        baseline.optimizer.param_groups[0]["params"], resumed.optimizer.param_groups[0]["params"], strict=True
    ):
        assert torch.equal(a, b)
