"""Is the testbed meaningful? Rewards of ground truth vs the pretrained pipeline vs random weights, then a short
E-GRPO run.

    python benchmarks/testbed/evaluate.py [--checkpoint DIR] [--iterations 20] [--learning-rate LR]
        [--num-generations G] [--train-on train|heldout] [--out results.json] [--grid samples.png]

1. Held-out prompts (compositions never seen in training) and as many training prompts, one image each:
   ground-truth renders (as rendered, and through the VAE), and deterministic ODE samples (16 steps, the
   pipeline's static shift 3) of the pretrained pipeline, of the same pipeline with its transformer at the
   random initialization it was trained from, and of the fully untrained pipeline (random VAE too). Each
   scored by CompositionReward and CountReward (mean and its standard error).
2. A short EGRPOTrainer LoRA run with CompositionReward on the training prompts (or, with
   ``--train-on heldout``, on the held-out prompts themselves), evaluated on all held-out prompts (fixed seeds,
   the trainer's ODE sampler, paired before/after), CountReward as an evaluation-only reward (it would catch a
   policy that paints colours everywhere).

Prints markdown tables and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.testbed` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.testbed import CHECKPOINT_DIR, SAMPLING, egrpo_config, heldout_prompts, load_testbed_pipeline  # noqa: E402
from benchmarks.testbed import train_prompts as all_train_prompts  # noqa: E402
from benchmarks.testbed.grammar import render_prompts  # noqa: E402
from benchmarks.testbed.model import build_transformer, build_untrained_pipeline  # noqa: E402
from benchmarks.testbed.rewards import CompositionReward, CountReward  # noqa: E402

NUM_INFERENCE_STEPS = 16


def ground_truth_images(prompts: list[str], seed: int) -> torch.Tensor:
    """One render per prompt, drawn from a generator seeded ``seed``."""
    return render_prompts(prompts, SAMPLING["height"], torch.Generator().manual_seed(seed))


@torch.no_grad()
def pipeline_images(pipeline, prompts: list[str], seed: int, batch_size: int = 64) -> torch.Tensor:
    """Deterministic (ODE) samples of a plain pipeline call, prompt ``i`` from noise seeded ``seed + i``."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images.append(
            pipeline(
                batch, num_inference_steps=NUM_INFERENCE_STEPS, generator=generators, output_type="pt", **SAMPLING
            ).images
        )
    return torch.cat(images)


@torch.no_grad()
def vae_reconstructions(pipeline, images: torch.Tensor) -> torch.Tensor:
    """``images`` encoded (posterior mean) and decoded by the pipeline's VAE: the best a sample can look."""
    vae = pipeline.vae
    decoded = vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample
    return (decoded / 2 + 0.5).clamp(0, 1)


def with_transformer(pipeline, transformer):
    """The same pipeline with another transformer (the other components shared, not copied)."""
    return type(pipeline)(**{**pipeline.components, "transformer": transformer.eval()})


def reward_summary(images: torch.Tensor, prompts: list[str]) -> dict[str, dict[str, float]]:
    """Mean and standard error of the mean of each testbed reward."""
    summary = {}
    for reward in (CompositionReward(), CountReward()):
        values = reward(images, prompts).double()
        summary[reward.name] = {"mean": values.mean().item(), "se": (values.std() / len(values) ** 0.5).item()}
    return summary


def compare_models(pipeline, seed: int, prompt_sets: dict[str, list[str]]) -> dict:
    """Rewards of ground truth (as rendered, and encoded and decoded by the VAE), pretrained, random-transformer and
    untrained-pipeline images on each prompt set."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same random initialization build.py trained from
        random_transformer = build_transformer()
    models = {
        "pretrained": pipeline,
        "random transformer": with_transformer(pipeline, random_transformer),
        "untrained pipeline": build_untrained_pipeline(seed),
    }
    results = {}
    for set_name, prompts in prompt_sets.items():
        truth = ground_truth_images(prompts, seed)
        results[set_name] = {
            "ground truth": reward_summary(truth, prompts),
            "ground truth through the VAE": reward_summary(vae_reconstructions(pipeline, truth), prompts),
        }
        for model_name, model in models.items():
            results[set_name][model_name] = reward_summary(pipeline_images(model, prompts, seed), prompts)
    return results


def egrpo_run(
    pipeline, iterations: int, eval_prompts: list[str], output_dir: str, prompts: list[str] | None = None, **config
) -> dict:
    """A short LoRA E-GRPO run with CompositionReward on ``prompts`` (default: the training prompts).

    The held-out evaluation samples ``eval_prompts`` deterministically with the trainer's ODE sampler (prompt
    ``i`` from the noise of seed ``eval_seed + i``) before and after training, so the per-image gains are paired:
    returns each reward's mean before and after, and the mean gain with its standard error, plus the
    per-iteration training metrics (mean reward, share of groups without reward spread, on-policy ratio deviation).
    """
    from trl_flow_egrpo import EGRPOTrainer

    trainer = EGRPOTrainer(
        egrpo_config(output_dir, max_steps=iterations, **config),
        pipeline,
        [CompositionReward()],
        all_train_prompts() if prompts is None else prompts,
    )
    seed = trainer.config.eval_seed
    before = trainer.sample_images(eval_prompts, seed)
    start = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.sample_images(eval_prompts, seed)
    evaluation = {}
    for reward in (CompositionReward(), CountReward()):
        scores_before, scores_after = reward(before, eval_prompts).double(), reward(after, eval_prompts).double()
        gain = scores_after - scores_before
        evaluation[reward.name] = {
            "before": scores_before.mean().item(),
            "after": scores_after.mean().item(),
            "gain": gain.mean().item(),
            "gain_se": (gain.std() / len(gain) ** 0.5).item(),
        }
    history = [
        {
            key: metrics[key]
            for key in ("iteration", "reward/composition/mean", "zero_std_fraction", "ratio/on_policy_max_abs_dev")
        }
        for metrics in state.log_history
    ]
    return {
        "config": {"max_steps": iterations, **config},
        "eval_prompts": len(eval_prompts),
        "evaluation": evaluation,
        "train_seconds": seconds,
        "history": history,
    }


def save_comparison_grid(pipeline, prompts: list[str], seed: int, path: str) -> None:
    """A PNG with one column per prompt: ground truth, pretrained and random-transformer samples (rows), 4x
    enlarged."""
    from torchvision.utils import save_image

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_pipeline = with_transformer(pipeline, build_transformer())
    rows = [
        ground_truth_images(prompts, seed),
        pipeline_images(pipeline, prompts, seed),
        pipeline_images(random_pipeline, prompts, seed),
    ]
    save_image(
        torch.nn.functional.interpolate(torch.cat(rows), scale_factor=4, mode="nearest"),
        path,
        nrow=len(prompts),
        padding=2,
        pad_value=0.5,
    )


def markdown_tables(comparison: dict, run: dict | None) -> str:
    """The results as markdown tables."""
    lines = []
    for set_name, rows in comparison.items():
        lines += [f"\n{set_name} prompts:\n", "| images | CompositionReward | CountReward |", "|---|---|---|"]
        for name, summary in rows.items():
            cells = [f"{summary[r]['mean']:.3f} ± {summary[r]['se']:.3f}" for r in ("composition", "count")]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    if run is not None:
        lines += [
            f"\nE-GRPO {run['config']} ({run['train_seconds']:.0f} s), {run['eval_prompts']} held-out prompts:\n",
            "| reward | before | after | paired gain |",
            "|---|---|---|---|",
        ]
        for name, values in run["evaluation"].items():
            lines.append(
                f"| {name} | {values['before']:.3f} | {values['after']:.3f} | "
                f"{values['gain']:+.3f} ± {values['gain_se']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line: compare, run E-GRPO, print and save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=CHECKPOINT_DIR)
    parser.add_argument("--seed", type=int, default=1000, help="seeds the noise and the ground-truth renders")
    parser.add_argument("--iterations", type=int, default=20, help="E-GRPO iterations (0: skip the run)")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="E-GRPO learning rate (default: egrpo_config's)"
    )
    parser.add_argument("--num-generations", type=int, default=None, help="E-GRPO G (default: egrpo_config's)")
    parser.add_argument(
        "--train-on",
        choices=("train", "heldout"),
        default="train",
        help="prompts E-GRPO trains on: the training prompts, or the held-out evaluation prompts "
        "themselves (does RL improve the very prompts it optimizes?)",
    )
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--output-dir", default=None, help="the E-GRPO run's output_dir (default: a temporary one)")
    parser.add_argument(
        "--grid", default=None, help="PNG of ground truth / pretrained / random samples of 12 held-out prompts"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)

    heldout = heldout_prompts()
    train = all_train_prompts()
    train_sample = [
        train[i]
        for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: len(heldout)].tolist()
    ]
    pipeline = load_testbed_pipeline(args.checkpoint)
    results = {"comparison": compare_models(pipeline, args.seed, {"held-out": heldout, "training": train_sample})}
    if args.grid:
        save_comparison_grid(pipeline, heldout[::24], args.seed, args.grid)
    run = None
    if args.iterations:
        config = {
            name: value
            for name, value in (("learning_rate", args.learning_rate), ("num_generations", args.num_generations))
            if value is not None
        }
        run = egrpo_run(
            load_testbed_pipeline(args.checkpoint),
            args.iterations,
            heldout,
            args.output_dir or tempfile.mkdtemp(prefix="testbed-egrpo-"),
            prompts=heldout if args.train_on == "heldout" else None,
            **config,
        )
        run["config"]["train_on"] = args.train_on
        results["egrpo"] = run
    print(markdown_tables(results["comparison"], run))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main()
