"""Does scoring rewards in a worker thread while the next prompt is sampled help? Measured side by side.

    python benchmarks/async_rewards.py [--iterations 4] [--prompts 4] [--threads 1]

Runs the same tiny E-GRPO iterations (embedded tiny FLUX, 64x64, G=8, the paper's 8-step plan) with
``async_rewards`` off and on, for a cheap tensor reward (colour) and a CPU-bound one (JPEG
compressibility, PIL encoding), and prints seconds per iteration and their ratio.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer  # noqa: E402
from trl_flow_egrpo.rewards import ColorReward, JpegCompressibilityReward  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline  # noqa: E402

PROMPTS = [f"prompt {i}" for i in range(64)]


def seconds_per_iteration(reward, async_rewards: bool, iterations: int, prompts: int) -> float:
    with tempfile.TemporaryDirectory() as output_dir:
        config = EGRPOConfig(
            output_dir=output_dir,
            height=64,
            width=64,
            max_sequence_length=32,
            num_generations=8,
            prompts_per_device=prompts,
            mixed_precision="no",
            rollout_batch_size=64,
            per_device_train_batch_size=8,
            save_steps=0,
            disable_tqdm=True,
            async_rewards=async_rewards,
            max_steps=iterations + 1,
        )
        trainer = EGRPOTrainer(config, build_tiny_flux_pipeline(), [reward], Dataset.from_dict({"prompt": PROMPTS}))
        trainer.step()  # warm-up
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the worker thread is extra)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for reward in (ColorReward(), JpegCompressibilityReward()):
        sync = seconds_per_iteration(reward, False, args.iterations, args.prompts)
        overlapped = seconds_per_iteration(reward, True, args.iterations, args.prompts)
        print(
            f"{reward.name:22s} sync {sync:6.3f} s/iter | async {overlapped:6.3f} s/iter | "
            f"async speed-up {sync / overlapped:5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
