"""The HTTP clients of RemoteReward and VLMJudgeReward against small misbehaving servers on loopback sockets:
a server that drips its answer one byte at a time, one that sends more than the size cap, and URLs with
credentials in them (issue 18, sections 2 and 5)."""

import http.server
import socket
import threading
import time

import pytest
import torch

from trl_flow_egrpo.redaction import redact_url
from trl_flow_egrpo.rewards._http import HttpClient, ResponseTooLargeError, with_retries
from trl_flow_egrpo.rewards.remote import RemoteReward, RemoteRewardError
from trl_flow_egrpo.rewards.vlm import VLMJudgeError, VLMJudgeReward
from trl_flow_egrpo.serve.protocol import TOKEN_ENV

DRIP_SECONDS = 0.5
"""The dripping server sends one byte every this many seconds."""
MAX_DRIP_BYTES = 60
"""It stops after this many (30 s), so a client that never gives up cannot hang the test run for ever."""
# How much longer than its time limit a call may take: the limit is checked before each read, so a call ends at
# most one scheduling delay after it. Measured on this project's shared 2-core machine at load average 7, with
# the torch 2.14 venv and the minimum-versions venv (Python 3.11.7 both; the client is standard library only):
# 24 calls each of the deadline and total_timeout tests below ended 0.001-0.024 s after their limit. 0.5 s is
# 20 times that, room for a loaded CI machine.
SLACK_SECONDS = 0.5


class RawServer:
    """A loopback TCP server that reads each request's head, then hands the connection to ``respond``.

    ``respond(connection, stop)`` writes whatever bytes it likes; ``stop`` is set when the test ends, and every
    connection is closed after ``respond`` returns. ``connections`` counts the connections accepted.
    """

    def __init__(self, respond):
        self.respond, self.stop, self.connections = respond, threading.Event(), 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> "RawServer":
        self.threads[0].start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in list(self.threads):
            thread.join(timeout=10)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(5)
            received = b""
            while b"\r\n\r\n" not in received and len(received) < 1 << 16:
                chunk = connection.recv(1 << 16)
                if not chunk:
                    return
                received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            # Read the whole body: a socket closed with unread bytes sends a reset, which could reach the
            # client before it has read the answer.
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                chunk = connection.recv(1 << 16)
                if not chunk:
                    return
                body += chunk
            self.respond(connection, self.stop)
        except OSError:  # the client gave up and closed its end: expected
            pass
        finally:
            connection.close()


def drip(data: bytes, connection: socket.socket, stop: threading.Event) -> None:
    """Send ``data`` one byte every :data:`DRIP_SECONDS`, at most :data:`MAX_DRIP_BYTES` of it."""
    for index in range(min(len(data), MAX_DRIP_BYTES)):
        if stop.wait(DRIP_SECONDS):
            return
        connection.sendall(data[index : index + 1])


def drip_status_line(connection, stop):
    drip(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", connection, stop)


def drip_body(connection, stop):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    drip(b"{" + b" " * 98 + b"}", connection, stop)


def remote_call(url: str, **kwargs):
    RemoteReward(url, name="r", **kwargs)(torch.zeros(1, 3, 4, 4), ["a"])


def judge_call(url: str, **kwargs):
    VLMJudgeReward(url + "/v1", "judge", **kwargs)(torch.zeros(1, 3, 4, 4), ["a"])


CLIENTS = {"remote": (remote_call, RemoteRewardError, "/health"), "judge": (judge_call, VLMJudgeError, "/v1/chat")}


def timed(call, *args, **kwargs):
    """(the exception ``call`` raised, seconds it took); fails the test if it raised none."""
    start = time.monotonic()
    with pytest.raises(Exception) as error:
        call(*args, **kwargs)
    return error.value, time.monotonic() - start


# --------------------------------------------------------------------------------------------- deadlines


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("respond", [drip_status_line, drip_body], ids=["status_line", "body"])
def test_timeout_bounds_the_whole_request_against_a_dripping_server(client, respond):
    call, error_class, path = CLIENTS[client]
    with RawServer(respond) as server:
        error, seconds = timed(call, server.url, timeout=1.0, retries=0)
    assert isinstance(error, error_class), error
    assert f"{server.url}{path}" in str(error) and "timed out: no complete answer within 1 s" in str(error)
    # The old client waited 20 s and more here: each byte restarted the 1 s socket timeout.
    assert 1.0 <= seconds < 1.0 + SLACK_SECONDS, seconds


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_retries_against_a_stalled_server_end_within_total_timeout(client):
    call, error_class, _ = CLIENTS[client]
    with RawServer(drip_body) as server:
        error, seconds = timed(call, server.url, timeout=1.0, retries=5, backoff=0.1, total_timeout=2.5)
        assert isinstance(error, error_class), error
        assert "no time left for a retry within total_timeout=2.5 s" in str(error)
        # 1 s, wait 0.1, 1 s, wait 0.2, 0.2 s left for the third attempt; the fourth would start after 2.5 s.
        assert "failed after 3 attempt(s)" in str(error) and server.connections == 3
        assert 2.5 <= seconds < 2.5 + SLACK_SECONDS, seconds

        # The default total_timeout is 2 x timeout: with retries=3 the old client took 3 x 1 + 0.1 + 0.2 + 0.4 s.
        error, seconds = timed(call, server.url, timeout=1.0, retries=3, backoff=0.1)
    assert "within total_timeout=2 s" in str(error)
    assert 2.0 <= seconds < 2.0 + SLACK_SECONDS, seconds


def test_the_deadline_is_per_request_on_a_reused_keep_alive_connection():
    class KeepAlive(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = HttpClient(f"http://127.0.0.1:{server.server_address[1]}", timeout=0.3)
        first = client.request("GET", "/")
        connection = client._local.connection
        time.sleep(0.4)  # longer than the timeout: the next request still gets all of its 0.3 s
        second = client.request("GET", "/")
        assert (first.body, second.body) == (b"ok", b"ok") and client._local.connection is connection
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_with_retries_makes_no_attempt_it_has_no_time_for():
    attempts = []

    def send(deadline):
        attempts.append(deadline)
        raise ConnectionRefusedError("refused")

    with pytest.raises(RuntimeError, match=r"2 attempts: ConnectionRefusedError: refused; no time left"):
        with_retries(send, 10, 0.2, lambda problem, n: RuntimeError(f"{n} attempts: {problem}"), total_timeout=0.5)
    assert len(attempts) == 2 and attempts[0] == attempts[1]  # waits 0.2 then 0.4 s: the second retry would end late


@pytest.mark.parametrize("name, value", [("total_timeout", 0), ("total_timeout", "1"), ("max_response_bytes", 0)])
def test_bad_time_and_size_limits_are_refused(name, value):
    for build in (
        lambda: RemoteReward("http://127.0.0.1:1", **{name: value}),
        lambda: judge_call("http://x", **{name: value}),
    ):
        with pytest.raises(ValueError, match=f"{name} must be"):
            build()


# --------------------------------------------------------------------------------------------- size cap


def announced_body(size: int):
    def respond(connection, stop):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)

    return respond


def unannounced_body(size: int):
    def respond(connection, stop):  # no length: the body ends when the server closes the connection
        connection.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * size)

    return respond


def chunked_body(size: int):
    def respond(connection, stop):
        chunks = b"".join(b"%x\r\n%s\r\n" % (100, b"x" * 100) for _ in range(size // 100))
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")

    return respond


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize(
    "respond, what",
    [
        (announced_body(5000), "it announced 5000 bytes"),
        (unannounced_body(5000), "more than 1000 bytes arrived"),
        (chunked_body(5000), "more than 1000 bytes arrived"),
    ],
    ids=["content_length", "until_close", "chunked"],
)
def test_answers_over_max_response_bytes_are_refused_and_not_retried(client, respond, what):
    call, error_class, path = CLIENTS[client]
    with RawServer(respond) as server:
        error, _ = timed(call, server.url, max_response_bytes=1000, retries=2, backoff=0.01)
    assert isinstance(error, error_class), error
    assert f"The response of {server.url}{path}" in str(error)
    assert f"larger than the cap of 1000 bytes (max_response_bytes): {what}" in str(error)
    assert server.connections == 1  # the server would answer the same again


@pytest.mark.parametrize("respond", [announced_body, unannounced_body, chunked_body])
def test_an_answer_of_exactly_max_response_bytes_is_read_whole(respond):
    with RawServer(respond(1000)) as server:
        assert HttpClient(server.url, timeout=5, max_response_bytes=1000).request("GET", "/").body == b"x" * 1000
    with RawServer(respond(1001 if respond is not chunked_body else 1100)) as server:
        with pytest.raises(ResponseTooLargeError):
            HttpClient(server.url, timeout=5, max_response_bytes=1000).request("GET", "/")


# --------------------------------------------------------------------------------------------- credentials

SECRET = "s3cr/et#pw"


@pytest.mark.parametrize(
    "url",
    [
        f"http://alice:{SECRET}@127.0.0.1:8711",
        f"https://{SECRET}@reward.example.org/v1",
        f"alice:{SECRET}@127.0.0.1:8711",  # no scheme: refused for the credentials, not echoed as a bad URL
        f"ftp://alice:{SECRET}@host",
    ],
)
def test_credentials_in_urls_are_refused_without_showing_them(url):
    for build, hint in (
        (lambda: RemoteReward(url), f"pass the secret as token= or ${TOKEN_ENV}"),
        (lambda: VLMJudgeReward(url, "judge"), "pass the secret as api_key"),
    ):
        with pytest.raises(ValueError, match="has credentials in it") as error:
            build()
        assert hint in str(error.value) and "***@" in str(error.value)
        for part in ("s3cr", "et#pw", "alice"):
            assert part not in str(error.value), str(error.value)
    assert SECRET not in redact_url(url)


def test_reprs_never_show_the_token(monkeypatch):
    remote = RemoteReward("http://127.0.0.1:8711", token=SECRET, name="r")
    assert repr(remote) == "RemoteReward('http://127.0.0.1:8711', name='r', token=***)"
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    assert repr(RemoteReward("http://127.0.0.1:8711")) == "RemoteReward('http://127.0.0.1:8711', name=None, token=***)"
    monkeypatch.delenv(TOKEN_ENV)
    assert repr(RemoteReward("http://127.0.0.1:8711")) == "RemoteReward('http://127.0.0.1:8711', name=None)"
    judge = VLMJudgeReward("http://127.0.0.1:8000/v1", "judge", api_key=SECRET)
    assert repr(judge) == (
        "VLMJudgeReward('http://127.0.0.1:8000/v1', 'judge', score='yes_probability', name='vlm_judge', api_key=***)"
    )
    for client in (remote._client, judge._client):
        assert SECRET not in repr(client) and "Authorization" in repr(client)


@pytest.mark.parametrize("bad", ["\n", " more", "\u00e9", "\x7f"])
def test_tokens_that_cannot_be_sent_are_refused_without_showing_them(bad, monkeypatch):
    token = "t0ken-value-" + bad
    # Sent as it is, http.client would raise "Invalid header value b'Bearer t0ken-value-\n'" at the first request.
    monkeypatch.setenv(TOKEN_ENV, token)
    for build, name in (
        (lambda: RemoteReward("http://127.0.0.1:8711", token=token), "The token (token= or $TRL_EGRPO_REWARD_TOKEN)"),
        (lambda: RemoteReward("http://127.0.0.1:8711"), "The token (token= or $TRL_EGRPO_REWARD_TOKEN)"),
        (lambda: VLMJudgeReward("http://127.0.0.1:8000/v1", "judge", api_key=token), "api_key"),
    ):
        with pytest.raises(ValueError, match="cannot be sent in an Authorization header at position 12") as error:
            build()
        assert str(error.value).startswith(name) and "t0ken" not in str(error.value)
