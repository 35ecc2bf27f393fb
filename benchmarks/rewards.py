"""Time each reward on the CPU: one batch of 8 images of 64 x 64, tiny random-weight models.

The model-based rewards run on miniatures of their architectures (``tests/reward_fixtures.py``: a ~1.7M
parameter open_clip ViT for HPSv2 and CLIP score, a ~0.6M parameter CLIPModel for PickScore, a 2-layer
BLIP at width 32 for ImageReward), so the numbers measure the reward code paths (preprocessing,
tokenization, batching, validation) plus a small forward pass, NOT the cost of the real models, which is
hundreds to thousands of times higher. Nothing is downloaded.

Run: ``HF_HUB_OFFLINE=1 python benchmarks/rewards.py [--repeats 10] [--threads 1]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reward_fixtures as fixtures  # noqa: E402
from trl_flow_egrpo.rewards import (  # noqa: E402
    BrightnessReward,
    CLIPScoreReward,
    ColorReward,
    HPSv2Reward,
    ImageRewardReward,
    JpegCompressibilityReward,
    PickScoreReward,
)

BATCH, SIZE = 8, 64
PROMPTS = ["a photo of a cat", "a red car", "the blue sky", "a dog on the tree"] * 2


def build_rewards(directory: Path) -> dict:
    """Every reward, the model-based ones loading tiny checkpoints written to ``directory``."""
    hps_checkpoint, clip_checkpoint = fixtures.save_tiny_open_clip(directory)
    pickscore_model, pickscore_processor = fixtures.save_tiny_pickscore(directory)
    image_reward_files = fixtures.save_tiny_image_reward(directory)
    tiny = fixtures.TINY_OPEN_CLIP_NAME
    return {
        "hps_v2.1": HPSv2Reward(checkpoint=str(hps_checkpoint), model_name=tiny, batch_size=BATCH),
        "clip_score": CLIPScoreReward(tiny, str(clip_checkpoint), batch_size=BATCH),
        "pickscore": PickScoreReward(str(pickscore_model), str(pickscore_processor), batch_size=BATCH),
        "image_reward": ImageRewardReward(**image_reward_files, batch_size=BATCH),
        "jpeg_compressibility (weight-free)": JpegCompressibilityReward(),
        "color (weight-free)": ColorReward(),
        "brightness (weight-free)": BrightnessReward(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per reward, after one warm-up call")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: reproducible on a shared machine; 0 = torch's choice)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Keep the table readable: building random tiny models makes open_clip warn (on the root logger) that the
    # model is "initialized randomly", and transformers draws progress bars while saving and loading.
    logging.getLogger().setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as directory:
        rewards = build_rewards(Path(directory))
        print(
            f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; batch of {BATCH} images "
            f"{SIZE}x{SIZE}; TINY RANDOM-WEIGHT models (not the real checkpoints)"
        )
        print(f"{'reward':38s} {'first call (load)':>18s} {'median / batch':>15s} {'min / batch':>12s}")
        for name, reward in rewards.items():
            start = time.perf_counter()
            reward(images, PROMPTS)
            first = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                reward(images, PROMPTS)
                times.append(time.perf_counter() - start)
            print(
                f"{name:38s} {first * 1e3:15.1f} ms {statistics.median(times) * 1e3:12.1f} ms "
                f"{min(times) * 1e3:9.1f} ms"
            )


if __name__ == "__main__":
    main()
