"""The reward server under hostile clients: connections that never send a request, bodies that stall, malformed
headers, and bearer tokens. The real server (``trl-flow-egrpo serve-reward color``) runs in a subprocess on a
free 127.0.0.1 port; every socket a test opens has a timeout and is closed in a ``finally``."""

import asyncio
import json
import random
import socket
import threading
import time
import urllib.parse

import pytest
import torch

from trl_flow_egrpo import cli
from trl_flow_egrpo.rewards import ColorReward
from trl_flow_egrpo.rewards.remote import RemoteReward
from trl_flow_egrpo.serve import protocol
from trl_flow_egrpo.serve.launch import RewardServerProcess
from trl_flow_egrpo.serve.protocol import CONTENT_TYPE, MAGIC, ProtocolError, decode_request, dequantize, quantize
from trl_flow_egrpo.serve.server import authorization_problem, read_body

# Every visible ASCII character class a token may hold, HTTP's special characters included.
TOKEN = "Tok3n!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~end"
REQUEST_TIMEOUT = 4.0  # --request-timeout of the module's server
SLACK = 4.0  # how much later than the timeout a busy 2-core machine may close a connection
IDLE_CONNECTIONS = 300
STARTUP_SECONDS = 180  # importing torch and diffusers on a busy 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The colour reward behind :data:`TOKEN`, with the default --max-connections (64) and a 4 s request
    timeout, at most 16 images per request."""
    for package in ("fastapi", "uvicorn"):
        pytest.importorskip(package)
    process = RewardServerProcess(
        "color",
        "--log-level",
        "warning",
        "--request-timeout",
        str(REQUEST_TIMEOUT),
        "--max-batch",
        "16",
        token=TOKEN,
        log_dir=tmp_path_factory.mktemp("hardened"),
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        startup_timeout=STARTUP_SECONDS,
    )
    try:
        yield process.ready()
    finally:
        process.stop()


def address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port


def exchange(url: str, request: bytes, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """Send raw ``request`` bytes on a new connection; returns (status, headers, body) of the response."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length from ``sock``: (status, lower-case headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def http_request(method: str, path: str, body: bytes = b"", token: str | None = TOKEN) -> bytes:
    """A complete HTTP/1.1 request as bytes."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    if body:
        lines.append(f"Content-Type: {CONTENT_TYPE}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, str]:
    """POST /score; returns (status, the response's detail or its scores as text)."""
    status, _, payload = exchange(url, http_request("POST", "/score", body, token))
    answer = json.loads(payload)
    return status, answer.get("detail", json.dumps(answer))


def is_open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock``'s connection (no EOF or reset waiting), without blocking."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        sock.settimeout(SLACK)


def wait_closed(sock: socket.socket, deadline: float) -> float | None:
    """Block until the server closes ``sock`` (EOF or reset); the time it did, or None if still open at
    ``deadline``."""
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        while sock.recv(4096):  # a server may answer before closing; only the close counts
            pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic()


def images(batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    return quantize(torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)))


def expected_scores(quantized: torch.Tensor) -> list[float]:
    return ColorReward()(dequantize(quantized), [""] * len(quantized)).tolist()


# --------------------------------------------------------------------------------------------- silent connections


def test_hundreds_of_silent_connections_do_not_lock_clients_out_and_are_closed_after_the_timeout(server):
    assert post(server.url, protocol.encode_request(images(), ["a", "b"], {}))[0] == 200  # the server is serving
    # Three kinds of connection that never complete a request: nothing, part of a request line, part of the
    # headers. Each is more than the 64 (--max-connections) that used to lock every client out.
    partials = [b"", b"POST /sc", b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"]
    idle, opened = [], time.monotonic()
    try:
        for i in range(IDLE_CONNECTIONS):
            sock = socket.create_connection(address(server.url), timeout=10)
            idle.append(sock)
            if partials[i % 3]:
                sock.sendall(partials[i % 3])
        remote = RemoteReward(server.url, token=TOKEN, retries=0)  # a 503 would fail at once
        for seed in range(5):
            batch = images(seed=seed)
            scores = remote(dequantize(batch), ["a", "b"])
            torch.testing.assert_close(scores.tolist(), expected_scores(batch), rtol=0, atol=1e-6)
        served = time.monotonic() - opened
        still_open = sum(is_open(sock) for sock in idle)
        assert served < REQUEST_TIMEOUT and still_open == IDLE_CONNECTIONS, (served, still_open)

        deadline = opened + REQUEST_TIMEOUT + SLACK
        closed_at = [wait_closed(sock, deadline) for sock in idle]
        assert None not in closed_at, f"{closed_at.count(None)} connections still open {REQUEST_TIMEOUT + SLACK} s on"
        # The server closed none of them before the timeout: not one at the first sign of trouble.
        assert min(closed_at) - opened >= REQUEST_TIMEOUT - 0.5, min(closed_at) - opened
    finally:
        for sock in idle:
            sock.close()


def test_trickling_clients_and_partial_next_requests_are_cut_off(server):
    # Three connections that keep sending, but never a complete request in time: one trickles a request head,
    # one sends half of its next request after a first one, one trickles the rest of a body the server
    # refused unread (401 before reading: no token).
    trickling, kept_alive, refused = (socket.create_connection(address(server.url), timeout=10) for _ in range(3))
    stop = threading.Event()

    def trickle(sock, data):  # one byte every 0.5 s: the timer is not reset by bytes
        for byte in data:
            if stop.wait(0.5):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    threads = []
    try:
        started = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 1000
        threads.append(threading.Thread(target=trickle, args=(trickling, head), daemon=True))
        threads[-1].start()
        kept_alive.sendall(http_request("GET", "/health"))
        assert read_response(kept_alive)[0] == 200
        kept_alive.sendall(b"GET /hea")  # the next request, never finished
        partial_sent = time.monotonic()
        refused.sendall(http_request("POST", "/score", token=None).replace(b"Length: 0", b"Length: 1000000"))
        assert read_response(refused)[0] == 401
        answered = time.monotonic()
        threads.append(threading.Thread(target=trickle, args=(refused, b"\0" * 1000), daemon=True))
        threads[-1].start()
        for sock, since in ((trickling, started), (kept_alive, partial_sent), (refused, answered)):
            closed = wait_closed(sock, since + REQUEST_TIMEOUT + SLACK)
            assert closed is not None and closed - since >= REQUEST_TIMEOUT - 0.5, (closed, since)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        for sock in (trickling, kept_alive, refused):
            sock.close()


def test_a_body_that_stalls_gets_408_with_a_message(server):
    body = protocol.encode_request(images(), ["a", "b"], {})
    request = http_request("POST", "/score", body)
    with socket.create_connection(address(server.url), timeout=REQUEST_TIMEOUT + SLACK) as sock:
        sock.sendall(request[:-10])  # all but the last 10 bytes of the body
        sent = time.monotonic()
        status, headers, payload = read_response(sock)
        waited = time.monotonic() - sent
        assert headers["connection"] == "close" and wait_closed(sock, time.monotonic() + SLACK) is not None
    assert status == 408 and "The request body stalled: no bytes for 4.0 s" in json.loads(payload)["detail"]
    assert REQUEST_TIMEOUT - 0.5 <= waited <= REQUEST_TIMEOUT + SLACK, waited


def test_a_client_that_disconnects_mid_body_is_a_400_not_a_500():
    from starlette.requests import ClientDisconnect

    class Request:  # what read_body uses of starlette's Request
        headers = {"content-length": "100"}

        async def stream(self):
            yield b"abc"
            raise ClientDisconnect()

    with pytest.raises(ProtocolError, match="The client disconnected after 3 bytes of the body") as refused:
        asyncio.run(read_body(Request(), limit=1000, stall_timeout=10.0))
    assert refused.value.status == 400


def test_requests_beyond_the_limit_get_503_and_connections_without_requests_do_not_count():
    from trl_flow_egrpo.serve.guards import RequestLimit

    async def scenario():
        release, entered = asyncio.Event(), []

        async def app(scope, receive, send):
            entered.append(scope["path"])
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        limited = RequestLimit(app, limit=2)

        async def call(path):
            sent = []

            async def send(message):
                sent.append(message)

            await limited({"type": "http", "path": path}, None, send)
            return sent

        first, second = asyncio.create_task(call("/1")), asyncio.create_task(call("/2"))
        while len(entered) < 2:
            await asyncio.sleep(0)
        refused = await call("/3")  # answered at once, while two are in progress
        release.set()
        await asyncio.gather(first, second)
        after = await call("/4")
        return entered, refused, after

    entered, refused, after = asyncio.run(scenario())
    assert entered == ["/1", "/2", "/4"]
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert "handling 2 requests (--max-connections)" in json.loads(refused[1]["body"])["detail"]
    assert after[0]["status"] == 200
    with pytest.raises(ValueError, match="request limit must be >= 1"):
        RequestLimit(None, 0)


def test_the_request_timeout_must_be_positive(monkeypatch, capsys):
    from trl_flow_egrpo.serve.guards import head_timeout_protocol

    with pytest.raises(ValueError, match="request timeout must be > 0 seconds"):
        head_timeout_protocol(0)
    assert head_timeout_protocol(2.5).head_timeout == 2.5
    monkeypatch.delenv(protocol.TOKEN_ENV, raising=False)
    for value in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve-reward", "color", "--request-timeout", value])
        assert exit_info.value.code == 2
        assert "--request-timeout must be a positive number of seconds" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- malformed headers


def raw_body(header, payload: bytes = b"") -> bytes:
    """A request body with ``header`` (JSON-encoded unless bytes) and ``payload``."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    return MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes + payload


def valid_header(**changes) -> dict:
    """The header of a valid raw request for one 8 x 8 image, with ``changes``."""
    return {"version": 1, "encoding": "raw", "shape": [1, 3, 8, 8], "prompts": ["p"], "columns": {}, **changes}


def nested(depth: int) -> list:
    """``depth`` lists inside one another."""
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


PIXELS = bytes(3 * 8 * 8)
TOO_DEEP = "nests lists and objects more than 32 levels deep"


@pytest.mark.parametrize(
    "body, status, message",
    [
        (raw_body(b"[" * 100_000 + b"]" * 100_000), 400, TOO_DEEP),  # was a 500 (RecursionError)
        (raw_body(valid_header(columns={"deep": [nested(40)]}), PIXELS), 400, TOO_DEEP),
        (raw_body(valid_header(columns={"images": [1]}), PIXELS), 400, "Column name(s) ['images'] cannot be sent"),
        (raw_body(valid_header(columns={"prompts": ["x"]}), PIXELS), 400, "Column name(s) ['prompts'] cannot be"),
        (raw_body([1, 2]), 400, "The header must be a JSON object, got list"),
        (raw_body("header"), 400, "The header must be a JSON object, got str"),
        (raw_body(b"\xff\xfe{}"), 400, "The header is not valid JSON"),
        (raw_body(b""), 400, "The header is not valid JSON"),
        (raw_body(b"1" * 5000), 400, "The header is not valid JSON"),  # over Python's int digit limit
        (raw_body(valid_header(shape=["1", 3, 8, 8]), PIXELS), 400, "shape must be [B, 3, H, W]"),
        (raw_body(valid_header(shape=[1.0, 3, 8, 8]), PIXELS), 400, "shape must be [B, 3, H, W]"),
        (raw_body(valid_header(shape=[True, 3, 8, 8]), PIXELS), 400, "shape must be [B, 3, H, W]"),
        (raw_body(valid_header(shape=[1, 3, -8, 8]), PIXELS), 400, "shape must be [B, 3, H, W]"),
        (raw_body(valid_header(shape=[1, 3, 8]), PIXELS), 400, "shape must be [B, 3, H, W]"),
        (raw_body(valid_header(shape={"B": 1}), PIXELS), 400, "shape must be [B, 3, H, W]"),
        (raw_body(valid_header(shape=[10**30, 3, 1, 1])), 413, "at most 16 per request"),
        (raw_body(valid_header(shape=[1, 3, 10**15, 10**15])), 413, "this server takes at most"),
        (raw_body(valid_header(prompts="p"), PIXELS), 400, "prompts must be a list of 1 strings"),
        (raw_body(valid_header(prompts=[7]), PIXELS), 400, "prompts must be a list of 1 strings"),
        (raw_body(valid_header(columns=[]), PIXELS), 400, "columns must map each column name"),
        (raw_body(valid_header(columns={"seed": 1}), PIXELS), 400, "columns must map each column name"),
        (raw_body(valid_header(encoding=["raw"]), PIXELS), 400, "encoding must be one of"),
        (raw_body(valid_header(version="1"), PIXELS), 400, "Protocol version '1' is not supported"),
        (raw_body(valid_header(encoding="png", png_lengths="x"), PIXELS), 400, "png_lengths must be a list"),
        (raw_body(valid_header(encoding="png", png_lengths=[-1]), PIXELS), 400, "png_lengths must be a list"),
        (raw_body(valid_header(encoding="png", png_lengths=[10**30]), PIXELS), 400, "png_lengths add up to"),
        (MAGIC + b"\x00\x00", 400, "not a scoring request"),
    ],
)
def test_malformed_headers_get_400_or_413_with_a_message(server, body, status, message):
    got_status, detail = post(server.url, body)
    assert got_status == status and message in detail, (got_status, detail)


def test_a_valid_request_with_columns_still_scores(server):
    batch = images(batch=2, seed=3)
    body = protocol.encode_request(batch, ["a", "b"], {"tags": [["x", ["y"]], []], "seed": [1, 2]})
    status, scores = post(server.url, body)
    assert status == 200
    torch.testing.assert_close(json.loads(scores)["scores"], expected_scores(batch), rtol=0, atol=1e-6)


JUNK = [None, True, -1, 0, 2**70, 1.5, "x", "", [], {}, [1, -2], {"a": []}, [None] * 3, nested(50), "\x00"]


def test_fuzzed_headers_are_refused_with_a_protocol_error_only():
    # Every field replaced by junk, dropped, or two fields at once: decode_request raises ProtocolError (the
    # server's 400 or 413) or accepts the request, never anything else.
    rng, good = random.Random(0), valid_header(columns={"seed": [1]})
    fields = [*good, "png_lengths"]
    refused = 0
    for _ in range(3000):
        header = dict(good)
        for field in rng.sample(fields, rng.choice([1, 2])):
            if rng.random() < 0.2:
                header.pop(field, None)
            else:
                header[field] = rng.choice(JUNK)
        try:
            decode_request(raw_body(header, PIXELS), max_images=16, max_pixel_bytes=10**6)
        except ProtocolError as error:
            assert str(error) and error.status in (400, 413), (header, error)
            refused += 1
    assert refused > 2500  # nearly every mutation is invalid; the loop did exercise the refusals


def test_the_client_refuses_reserved_column_names_before_sending():
    with pytest.raises(ValueError, match=r"Column name\(s\) \['images'\] cannot be sent"):
        protocol.encode_request(images(batch=1), ["a"], {"images": [1]})


# --------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    "token, message",
    [
        ("short-token", "The token has 11 characters; it needs at least 16"),
        ("x", "The token has 1 characters; it needs at least 16"),
        (" " * 20, "The token contains whitespace"),
        ("a-token-with a-space-inside", "The token contains whitespace"),
        ("tab\there-0123456789", "The token contains whitespace"),
        ("non-ascii-tokén-0123456789", "The token must be visible ASCII characters only"),
    ],
)
def test_the_server_refuses_to_start_with_a_weak_or_unsendable_token(token, message, monkeypatch, capsys):
    monkeypatch.setenv(protocol.TOKEN_ENV, token)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve-reward", "color", "--no-warmup"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"${protocol.TOKEN_ENV}: {message}" in error and "openssl rand -hex 16" in error
    if len(token.strip()) > 3:  # a short one may occur in the message by chance
        assert token not in error  # the message names the rule, never the secret


def test_every_valid_token_matches_exactly_as_sent():
    rng = random.Random(0)
    visible = [chr(code) for code in range(0x21, 0x7F)]
    for _ in range(200):
        token = "".join(rng.choices(visible, k=rng.randint(16, 80)))
        protocol.check_token(token)
        assert authorization_problem(f"Bearer {token}", token) is None
        assert authorization_problem(f"bearer  {token}", token) is None  # RFC 6750: 1*SP, scheme any case
        for header in (f"Bearer {token[:-1]}", f"Bearer {token}x", f"Bearer {token} {token}", f"Basic {token}", token):
            assert authorization_problem(header, token) is not None, header


def test_a_token_with_http_special_characters_matches_over_http(server):
    assert exchange(server.url, http_request("GET", "/health"))[0] == 200
    assert exchange(server.url, http_request("GET", "/health", token=TOKEN[:-1]))[0] == 401
    assert RemoteReward(server.url, token=TOKEN).name == "color"
