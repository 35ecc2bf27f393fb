"""Build the testbed pipeline from its seed and save it as a diffusers pipeline.

    python benchmarks/testbed/build.py --out DIR [--seed 0] [--vae-steps N] [--transformer-steps N]

Renders the synthetic training set, trains the VAE, then the transformer by flow matching (see
:mod:`benchmarks.testbed.train`), all on the CPU in one thread for a fixed number of steps, and writes
``FluxPipeline.save_pretrained(DIR)`` plus ``DIR/build_info.json`` (the recipe, the losses, the time of each
phase, the torch version and the SHA-256 of every weight file). The defaults rebuild the committed
``benchmarks/testbed/checkpoint/`` bit for bit with the same torch on the same machine (compare the hashes in
the two ``build_info.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.testbed` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.testbed.grammar import split_prompts  # noqa: E402
from benchmarks.testbed.model import build_untrained_pipeline  # noqa: E402
from benchmarks.testbed.train import (  # noqa: E402
    PhaseTimer,
    Recipe,
    TrainingLog,
    encode_latents,
    encode_prompt_table,
    latent_normalization,
    pack,
    render_pool,
    train_transformer,
    train_vae,
)

BUILD_INFO = "build_info.json"
"""The file next to the saved pipeline that records how it was built."""


def build_testbed(recipe: Recipe = Recipe()):
    """Train the testbed pipeline from scratch: ``(pipeline, TrainingLog)``.

    Runs in one torch thread (so the floating-point reductions, hence the weights, do not depend on the thread
    count) and restores the caller's thread count and global RNG state afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            return _train(recipe)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe):
    timer = PhaseTimer()
    generator = torch.Generator().manual_seed(recipe.seed)
    pipeline = build_untrained_pipeline(recipe.seed)
    train_prompts, _ = split_prompts(recipe.seed)
    with timer("render"):
        images, prompt_index = render_pool(train_prompts, recipe.images_per_prompt, recipe.image_size, generator)
    with timer("vae"):
        vae_losses = train_vae(pipeline.vae, images, recipe, generator)
    with timer("encode"):
        raw_latents = encode_latents(pipeline.vae, images)
        shift_factor, scaling_factor = latent_normalization(raw_latents)
        pipeline.vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
        clean = pack(pipeline, (raw_latents - shift_factor) * scaling_factor)
        prompt_embeds, pooled_prompt_embeds = encode_prompt_table(pipeline, train_prompts, recipe.max_sequence_length)
    with timer("transformer"):
        transformer_losses = train_transformer(
            pipeline, clean, prompt_index, prompt_embeds, pooled_prompt_embeds, recipe, generator
        )
    return pipeline, TrainingLog(vae_losses, transformer_losses, timer.seconds, timer.cpu_seconds)


def weight_hashes(directory: str) -> dict[str, str]:
    """SHA-256 of every ``*.safetensors`` file under ``directory``, keyed by relative path."""
    hashes = {}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                with open(path, "rb") as file:
                    hashes[os.path.relpath(path, directory)] = hashlib.sha256(file.read()).hexdigest()
    return dict(sorted(hashes.items()))


def directory_bytes(directory: str) -> int:
    """Total size of the files under ``directory``."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(directory) for name in files)


def save_testbed(pipeline, log: TrainingLog, recipe: Recipe, directory: str) -> dict:
    """``pipeline.save_pretrained(directory)`` plus ``build_info.json``; returns the build info."""
    pipeline.save_pretrained(directory, safe_serialization=True)
    info = {
        "recipe": dataclasses.asdict(recipe),
        "vae_mse": log.vae_losses,
        "transformer_loss": log.transformer_losses,
        "seconds": {name: round(value, 1) for name, value in log.seconds.items()},
        "cpu_seconds": {name: round(value, 1) for name, value in log.cpu_seconds.items()},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "weights_sha256": weight_hashes(directory),
    }
    with open(os.path.join(directory, BUILD_INFO), "w") as file:
        json.dump(info, file, indent=1)
    info["bytes"] = directory_bytes(directory)
    return info


def main(argv: list[str] | None = None) -> dict:
    """Command line: build, save, print the timings and the size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to save the pipeline to")
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--vae-steps", type=int, default=Recipe.vae_steps)
    parser.add_argument("--transformer-steps", type=int, default=Recipe.transformer_steps)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    recipe = Recipe(seed=args.seed, vae_steps=args.vae_steps, transformer_steps=args.transformer_steps)
    pipeline, log = build_testbed(recipe)
    info = save_testbed(pipeline, log, recipe, args.out)
    total_wall, total_cpu = sum(log.seconds.values()), sum(log.cpu_seconds.values())
    print(
        f"built in {total_wall:.0f} s wall clock, {total_cpu:.0f} s CPU "
        f"({', '.join(f'{name} {seconds:.0f} s' for name, seconds in log.seconds.items())})"
    )
    print(f"VAE MSE {log.vae_losses[-1][1]:.4f}; flow-matching loss {log.transformer_losses[-1][1]:.4f}")
    print(f"saved to {args.out}: {info['bytes'] / 1e6:.2f} MB")
    return info


if __name__ == "__main__":
    main()
