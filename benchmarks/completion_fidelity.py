"""E-GRPO's cheaper completions against the paper's full Euler completion, side by side (METHOD.md 4b).

    python benchmarks/completion_fidelity.py [--seeds 3] [--iterations 4] [--threads 1] [--out benchmarks/results]

On the pretrained testbed (``benchmarks/testbed``, its recipe: T = 16, shift 3, a = 0.7, tau = 2.2, 8 active steps,
G = 8, 4 prompts per iteration, the training reward ``ColourPurityReward`` and ``advantage_eps = 0.05``), every
iteration's rollouts are sampled once per completion setting from the same noise, so all settings share the
anchors and the samples ``x'`` of the stochastic step (checked) and differ only in the ODE after it. Per setting
it prints the transformer rows per iteration (counted by the engine, next to the closed form
``EGRPO.evaluations_per_prompt``), the Pearson correlation of the group advantages with those of the full Euler
completion (all rollouts of all groups pooled; advantages are centred within their group, so this is the
within-group agreement), the share of groups whose best member is the same, and the mean absolute reward change.
The policy is the pretrained testbed itself (no training), so this measures the completion, not a learning curve.
Results go to ``<out>/completion_fidelity.{md,json}``.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.testbed import SAMPLING, load_testbed_pipeline, train_prompts  # noqa: E402
from benchmarks.testbed.rewards import ColourPurityReward  # noqa: E402
from trl_flow_egrpo import EGRPOConfig, plan_merges  # noqa: E402
from trl_flow_egrpo.adapters import get_adapter  # noqa: E402
from trl_flow_egrpo.advantages import group_advantages  # noqa: E402
from trl_flow_egrpo.algorithms.egrpo import EGRPO  # noqa: E402
from trl_flow_egrpo.rollout import prompt_generators, sample_rollouts  # noqa: E402

SETTINGS = {
    "euler 1.0 (paper)": dict(completion_solver="euler", completion_steps_fraction=1.0),
    "dpmpp_2m 0.4": dict(completion_solver="dpmpp_2m", completion_steps_fraction=0.4),
    "dpmpp_2m 0.2": dict(completion_solver="dpmpp_2m", completion_steps_fraction=0.2),
    "euler 0.4": dict(completion_solver="euler", completion_steps_fraction=0.4),
    "euler 0.2": dict(completion_solver="euler", completion_steps_fraction=0.2),
}
"""The completions compared; the first is the reference."""

RECIPE = dict(
    num_inference_steps=16,
    shift=3.0,
    noise_level=0.7,
    entropy_threshold=2.2,
    num_active_steps=8,
    num_generations=8,
    prompts_per_device=4,
    advantage_eps=0.05,
)
"""The testbed's E-GRPO recipe (``benchmarks.testbed.egrpo_config`` and ``benchmarks/learning_efficiency.py``)."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds (each draws its own prompts and noise)")
    parser.add_argument("--iterations", type=int, default=4, help="iterations of 4 prompts per seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    return parser.parse_args(argv)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flattened tensors."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def sample_iteration(pipeline, adapter, schedule, plan, prompts, seed, setting):
    """One iteration's rollouts of ``prompts`` under a completion ``setting``, from the noise of ``seed``."""
    conditioning = adapter.encode_prompts(prompts)
    generators = prompt_generators(torch.Generator().manual_seed(seed), len(prompts))
    noise = torch.cat([adapter.initial_noise(1, generator) for generator in generators])
    return sample_rollouts(
        adapter,
        pipeline.transformer,
        schedule,
        plan,
        conditioning,
        noise,
        RECIPE["num_generations"],
        RECIPE["noise_level"],
        generators,
        batch_size=128,
        completion_solver=setting["completion_solver"],
        completion_steps_fraction=setting["completion_steps_fraction"],
    )


def measure(args) -> dict:
    """Rows, correlation and agreement of every setting against the first, over all seeds and iterations."""
    torch.set_num_threads(args.threads)
    pipeline = load_testbed_pipeline()
    adapter = get_adapter(pipeline, **SAMPLING)
    schedule = adapter.schedule(RECIPE["num_inference_steps"], RECIPE["shift"])
    plan = plan_merges(schedule.sigmas, RECIPE["noise_level"], RECIPE["entropy_threshold"], RECIPE["num_active_steps"])
    reward = ColourPurityReward()
    prompts = train_prompts()
    per_setting = {name: {"rows": [], "advantages": [], "rewards": [], "seconds": 0.0} for name in SETTINGS}
    for seed in range(args.seeds):
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        for iteration in range(args.iterations):
            batch = [prompts[i] for i in order[iteration * 4 : iteration * 4 + 4]]
            reference = None
            for name, setting in SETTINGS.items():
                start = time.perf_counter()
                rollouts = sample_iteration(pipeline, adapter, schedule, plan, batch, 1000 * seed + iteration, setting)
                per_setting[name]["seconds"] += time.perf_counter() - start
                if reference is None:
                    reference = rollouts
                elif not torch.equal(rollouts.samples, reference.samples):
                    # Batch composition moves a velocity by ~1e-7 on a CPU; the samples must agree that closely.
                    torch.testing.assert_close(rollouts.samples, reference.samples, rtol=1e-4, atol=1e-4)
                images = rollouts.images.flatten(0, 1)
                group_prompts = [batch[p] for p in rollouts.group_prompt.repeat_interleave(rollouts.images.shape[1])]
                rewards = reward(images, group_prompts).view(rollouts.images.shape[:2])
                per_setting[name]["rows"].append(rollouts.num_evaluations)
                per_setting[name]["rewards"].append(rewards)
                per_setting[name]["advantages"].append(group_advantages(rewards, eps=RECIPE["advantage_eps"]))
    reference_name = next(iter(SETTINGS))
    reference_advantages = torch.cat(per_setting[reference_name]["advantages"])
    reference_rewards = torch.cat(per_setting[reference_name]["rewards"])
    results = {}
    for name, values in per_setting.items():
        advantages, rewards = torch.cat(values["advantages"]), torch.cat(values["rewards"])
        # The closed form of the rows, from the strategy the trainer would build.
        closed_form = EGRPO(EGRPOConfig(output_dir="unused", **SAMPLING, **RECIPE, **SETTINGS[name]), schedule)
        results[name] = {
            "rows_per_iteration": sum(values["rows"]) / len(values["rows"]),
            "closed_form_rows_per_iteration": closed_form.evaluations_per_prompt() * RECIPE["prompts_per_device"],
            "advantage_correlation": pearson(advantages, reference_advantages),
            "same_best_member": float((advantages.argmax(1) == reference_advantages.argmax(1)).float().mean()),
            "mean_abs_reward_change": float((rewards - reference_rewards).abs().mean()),
            "groups": len(advantages),
            "seconds_per_iteration": values["seconds"] / len(values["rows"]),
        }
    return results


def report(results: dict, command: str) -> str:
    """The Markdown table."""
    lines = [
        "# E-GRPO completion options on the testbed (METHOD.md 4b)",
        "",
        f"`{command}`",
        "",
        "| completion | rows / iteration (closed form) | advantage correlation with euler 1.0 | same best member "
        "| mean abs reward change | s / iteration |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['rows_per_iteration']:,.0f} ({r['closed_form_rows_per_iteration']:,}) "
            f"| {r['advantage_correlation']:.3f} | {r['same_best_member']:.2f} | {r['mean_abs_reward_change']:.4f} "
            f"| {r['seconds_per_iteration']:.2f} |"
        )
    lines.append(
        f"\n{next(iter(results.values()))['groups']} groups of 8 per setting. Seconds are wall-clock on the machine "
        "that ran it, with whatever else it was running: indicative only; the rows are the cost measure."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = ("python benchmarks/completion_fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    results = measure(args)
    markdown = report(results, command)
    print(markdown)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "completion_fidelity.md"), "w") as file:
        file.write(markdown)
    with open(os.path.join(args.out, "completion_fidelity.json"), "w") as file:
        json.dump({"command": command, "recipe": RECIPE, "settings": SETTINGS, "results": results}, file, indent=2)
    return results


if __name__ == "__main__":
    main()
