"""Whether a reward server keeps serving while many connections send nothing (or half a request), and when it
closes them.

Starts ``trl-flow-egrpo serve-reward color`` on 127.0.0.1, opens ``--connections`` connections of which every
other one sends half a request line (``POST /sc``) and the rest nothing, then sends ``--requests`` real
``POST /score`` requests, each on a new connection, and records their statuses and latencies. Then it waits up
to ``--wait`` seconds for the server to close the silent connections and records when it did.

Run: ``HF_HUB_OFFLINE=1 python benchmarks/reward_server_silent_connections.py`` (results go to
``benchmarks/results/reward_server_silent_connections.txt``). To measure an older version of the server, whose
command has no ``--request-timeout``: ``git archive <commit> trl_flow_egrpo | tar -x -C /tmp/old`` and
``PYTHONPATH=/tmp/old python benchmarks/reward_server_silent_connections.py --no-timeout-flag --output ...``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

import trl_flow_egrpo
from trl_flow_egrpo.serve.launch import RewardServerProcess
from trl_flow_egrpo.serve.protocol import CONTENT_TYPE, encode_request, quantize

TOKEN = "benchmark-token-0123456789"


def score_once(port: int, body: bytes) -> tuple[int, float]:
    """One POST /score on a new connection: (status, seconds)."""
    start = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}"}
        connection.request("POST", "/score", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    return response.status, time.monotonic() - start


def closed_at(sock: socket.socket, deadline: float) -> float | None:
    """When the server closed ``sock`` (EOF or reset), or None if it is still open at ``deadline``."""
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic()


def main() -> None:
    """Measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--request-timeout", type=float, default=4.0)
    parser.add_argument("--wait", type=float, default=12.0, help="seconds to wait for the server to close them")
    parser.add_argument("--no-timeout-flag", action="store_true", help="the server's command lacks --request-timeout")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "reward_server_silent_connections.txt")
    )
    args = parser.parse_args()

    options = ["--log-level", "warning"]
    if not args.no_timeout_flag:
        options += ["--request-timeout", str(args.request_timeout)]
    server = RewardServerProcess(
        "color",
        *options,
        token=TOKEN,
        log_dir=tempfile.mkdtemp(prefix="silent-connections-"),
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        startup_timeout=300,
    ).ready()
    body = encode_request(quantize(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))), ["a"] * 2, {})
    silent = []
    try:
        before = score_once(server.port, body)
        opened = time.monotonic()
        for i in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            silent.append(sock)
            if i % 2:
                sock.sendall(b"POST /sc")
        during = [score_once(server.port, body) for _ in range(args.requests)]
        served_within = time.monotonic() - opened
        closes = [closed_at(sock, opened + args.wait) for sock in silent]
        after = score_once(server.port, body)
    finally:
        for sock in silent:
            sock.close()
        server.stop()

    closed = [t - opened for t in closes if t is not None]
    lines = [
        f"python benchmarks/reward_server_silent_connections.py {' '.join(sys.argv[1:])}".rstrip(),
        f"trl_flow_egrpo from {Path(trl_flow_egrpo.__file__).parent} (version {trl_flow_egrpo.__version__}); "
        f"server options: {' '.join(options)}; load average {os.getloadavg()[0]:.1f}",
        f"before: POST /score -> {before[0]} in {before[1] * 1000:.1f} ms",
        f"{args.connections} silent connections opened (half of them sent 'POST /sc')",
        f"during: {args.requests} x POST /score -> statuses {[status for status, _ in during]}, "
        f"latencies {[round(seconds * 1000, 1) for _, seconds in during]} ms, all answered within "
        f"{served_within:.2f} s of opening the silent connections",
        f"closed by the server within {args.wait:g} s: {len(closed)}/{args.connections}"
        + (f", {min(closed):.2f}-{max(closed):.2f} s after they were opened" if closed else ""),
        f"after: POST /score -> {after[0]} in {after[1] * 1000:.1f} ms",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(json.dumps({"written": str(output)}))


if __name__ == "__main__":
    main()
