"""Per-batch latency of remote scoring (RemoteReward -> reward server on loopback) against local scoring.

For each reward and image size, times one batch of 8 images: the local reward called in this process, then
the same reward served by ``trl-flow-egrpo serve-reward`` in a subprocess on 127.0.0.1 and called through
RemoteReward with the raw and the PNG encoding. The remote time includes quantizing, encoding, the HTTP round
trip, decoding on the server and the server's reward call. The rewards are the weight-free colour reward and
a tiny random-weight PickScore (``tests/reward_fixtures.py``), so the numbers show the transport's overhead,
not the cost of real reward models. Each remote score is checked against the local one (within 1e-6).

Run: ``HF_HUB_OFFLINE=1 python benchmarks/remote_rewards.py [--repeats 20]`` (one torch thread in this
process and in the servers).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reward_fixtures as fixtures  # noqa: E402
from trl_flow_egrpo.registry import build_reward  # noqa: E402
from trl_flow_egrpo.rewards.remote import RemoteReward  # noqa: E402
from trl_flow_egrpo.serve.launch import RewardServerProcess  # noqa: E402
from trl_flow_egrpo.serve.protocol import dequantize, encode_request, quantize  # noqa: E402

BATCH, SIZES = 8, (64, 512)
PROMPTS = ["a photo of a cat", "a red car", "the blue sky", "a dog on the tree"] * 2


def smooth_images(size: int, seed: int) -> torch.Tensor:
    """A batch of smooth random images (8 x 8 noise upsampled bilinearly): PNG compresses them, as it compresses
    generated images, whereas pixel noise does not compress at all (the PNG is then larger than the raw array)."""
    noise = torch.rand(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)


def timed_ms(call, repeats: int) -> str:
    """``"median (min)"`` wall time of ``call()`` in milliseconds over ``repeats`` calls, after one warm-up call
    (the minimum is the least disturbed by other processes on a shared machine)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return f"{statistics.median(times) * 1e3:.1f} ({min(times) * 1e3:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement, after one warm-up")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as directory:
        model_dir, processor_dir = fixtures.save_tiny_pickscore(Path(directory))
        rewards = {"color": {}, "pickscore": {"model": str(model_dir), "processor": str(processor_dir)}}
        servers = {
            name: RewardServerProcess(
                name,
                "--reward-kwargs",
                json.dumps(kwargs),
                "--device",
                "cpu",
                "--log-level",
                "warning",
                env=env,
                log_dir=Path(directory) / name,
            )
            for name, kwargs in rewards.items()
        }
        try:
            print(
                f"CPU, torch {torch.__version__}, 1 thread per process; batch of {BATCH} images; loopback; median "
                f"(min) of {args.repeats} calls; pickscore = TINY random-weight model; load average "
                f"{os.getloadavg()[0]:.1f}"
            )
            print(
                f"{'reward':10s} {'size':>8s} {'local ms':>16s} {'remote raw ms':>16s} {'remote png ms':>16s} "
                f"{'png / raw bytes':>16s}"
            )
            for name, kwargs in rewards.items():
                local_reward, url = build_reward(name, **kwargs), servers[name].ready().url
                for size in SIZES:
                    images = smooth_images(size, seed=size)
                    quantized = dequantize(quantize(images))
                    timings = {"local": timed_ms(functools.partial(local_reward, images, PROMPTS), args.repeats)}
                    for encoding in ("raw", "png"):
                        remote = RemoteReward(url, name=name, encoding=encoding)
                        torch.testing.assert_close(
                            remote(images, PROMPTS), local_reward(quantized, PROMPTS), rtol=1e-6, atol=1e-6
                        )
                        timings[encoding] = timed_ms(functools.partial(remote, images, PROMPTS), args.repeats)
                    png, raw = (
                        len(encode_request(quantize(images), PROMPTS, {}, encoding)) for encoding in ("png", "raw")
                    )
                    print(
                        f"{name:10s} {size:>4d}^2 {timings['local']:>16s} {timings['raw']:>16s} "
                        f"{timings['png']:>16s} {png / raw:16.2f}"
                    )
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
