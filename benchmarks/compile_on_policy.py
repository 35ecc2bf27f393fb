"""Regional compilation in the trainer on a CPU: iteration times eager vs compiled, the cost of recomputing the
sampling log-probabilities with the update's graph, and the on-policy ratio with and without that recompute.

    python benchmarks/compile_on_policy.py [--iterations 4]

Three trainers on the tiny FLUX pipeline (bf16 autocast, the tests' tiny config: 2 prompts, G=4, 8 steps,
sampling calls of 7 rows, update micro-batches of 3 groups, one optimizer step per iteration so that every
ratio is on-policy): eager; ``compile_transformer=True``; and compiled with the recompute switched off, which
shows why the trainer recomputes. Prints one JSON line per iteration; the first compiled iteration includes
the compilation (minutes on a CPU without a warm inductor cache).
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from helpers import tiny_trainer  # noqa: E402

KEYS = (
    "ratio/on_policy_max_abs_dev",
    "time/sampling",
    "time/update",
    "time/recompute_log_probs",
    "time/sampling_rows_per_s",
    "time/update_rows_per_s",
)


def run(variant: str, iterations: int, output_dir: str) -> None:
    """Print one JSON line per iteration of the trainer ``variant`` ('eager', 'compiled', 'compiled, no recompute')."""
    trainer = tiny_trainer(
        output_dir,
        max_steps=iterations,
        mixed_precision="bf16",
        rollout_batch_size=7,
        per_device_train_batch_size=3,
        optimizer_step="iteration",
        compile_transformer=variant != "eager",
    )
    if variant == "compiled, no recompute":
        trainer._recompute_log_probs = lambda rollouts, phases, old_means=None: 0.0
    for iteration in range(1, iterations + 1):
        start = time.perf_counter()
        metrics = trainer.step()
        line = {"variant": variant, "iteration": iteration, "seconds": round(time.perf_counter() - start, 3)}
        line.update({key: metrics[key] for key in KEYS if key in metrics})
        print(json.dumps(line), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for variant in ("eager", "compiled", "compiled, no recompute"):
        with tempfile.TemporaryDirectory() as output_dir:
            run(variant, args.iterations, output_dir)


if __name__ == "__main__":
    main()
