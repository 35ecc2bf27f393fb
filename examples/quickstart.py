"""E-GRPO in a minute on a CPU: the embedded tiny FLUX pipeline learns to paint red.

    python examples/quickstart.py [--max_steps 40] [--output_dir quickstart-output]

The tiny pipeline (random weights, FLUX.1-dev's architecture scaled down, built offline) is trained with
the paper's sampling recipe (16 steps, shift 3, noise level 0.7, entropy threshold 2.2, the first 8
steps trained) on a weight-free reward: how close the image's mean colour is to pure red. Every 5
iterations the same 8 prompts are sampled deterministically from the same noise and scored, so the
evaluation curve shows the policy itself improving. The curve is saved as a PNG. At the end it prints the
evaluation's colour change with its standard error over the paired images (same prompt, same noise, before and
after training), so the change reads against its noise.
"""

import argparse
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402

from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer  # noqa: E402
from trl_flow_egrpo.distributed import set_cpu_threads  # noqa: E402
from trl_flow_egrpo.rewards import BrightnessReward, ColorReward  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline  # noqa: E402

PROMPTS = [
    "a red apple",
    "a fire truck",
    "a field of poppies",
    "a ripe tomato",
    "a ruby",
    "a cardinal bird",
    "strawberries in a bowl",
    "a lipstick",
    "a stop sign",
    "a red sports car",
    "a rose",
    "cherries",
]
EVAL_PROMPTS = ["a red barn", "a ladybug", "a chili pepper", "a fox", "a sunset", "a brick wall", "a heart", "a flag"]


def paired_change(before, after) -> tuple[float, float]:
    """Mean of the per-image changes ``after - before`` and its standard error ``std / sqrt(N)``.

    The images are paired (the same prompt from the same noise, sampled deterministically before and after
    training), so the spread of the per-image changes is the noise of the mean change.
    """
    change = (after - before).double()
    return change.mean().item(), change.std().item() / len(change) ** 0.5


def plot(history, eval_history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [m["iteration"] for m in history],
        [m["reward/color/mean"] for m in history],
        alpha=0.5,
        label="rollout reward (mean over the iteration's rollouts)",
    )
    ax.plot(
        [m["iteration"] for m in eval_history],
        [m["eval/color/mean"] for m in eval_history],
        "o-",
        label="eval reward (fixed prompts and noise, ODE sampling)",
    )
    ax.set_xlabel("E-GRPO iteration")
    ax.set_ylabel("colour reward  (-|mean RGB - red|)")
    ax.set_title("trl-flow-egrpo quickstart: tiny FLUX learns to paint red")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--output_dir", default="quickstart-output")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    set_cpu_threads()

    config = EGRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        height=64,
        width=64,
        max_sequence_length=32,
        num_generations=8,
        prompts_per_device=2,
        mixed_precision="no",
        rollout_batch_size=64,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        clip_range=1e-2,
        lora_r=8,
        lora_alpha=8,
        eval_steps=5,
        save_steps=0,
        disable_tqdm=True,
    )
    color = ColorReward(target=(1.0, 0.0, 0.0))
    trainer = EGRPOTrainer(
        config,
        build_tiny_flux_pipeline(),
        [color],
        Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": EVAL_PROMPTS}),
        eval_reward_fns=[BrightnessReward()],
    )
    seeds = [config.eval_seed + i for i in range(len(EVAL_PROMPTS))]  # the noise of trainer.evaluate()
    before = color(trainer.sample_images(EVAL_PROMPTS, seeds), EVAL_PROMPTS)
    trainer.evaluate()  # the curve's first point, at iteration 0
    state = trainer.train()
    after = color(trainer.sample_images(EVAL_PROMPTS, seeds), EVAL_PROMPTS)
    change, error = paired_change(before, after)
    trainer.save_model(args.output_dir)
    seconds = [m["time/sampling"] + m["time/rewards"] + m["time/update"] for m in state.log_history]
    curve = os.path.join(args.output_dir, "reward_curve.png")
    plot(state.log_history, state.eval_history, curve)
    print(
        f"\neval colour reward: {before.mean():.4f} -> {after.mean():.4f}, change {change:+.4f} ± {error:.4f} "
        f"(s.e. over {len(EVAL_PROMPTS)} paired images: {change / error:.0f} standard errors)"
    )
    print(
        f"{sum(seconds) / len(seconds):.2f} s per iteration, "
        f"{state.log_history[-1]['transformer_rows']} transformer rows per iteration"
    )
    print(f"LoRA saved to {args.output_dir}/pytorch_lora_weights.safetensors; reward curve: {curve}")


if __name__ == "__main__":
    main()
