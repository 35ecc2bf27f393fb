"""Learning efficiency: every algorithm of the GRPO family at an equal budget of transformer evaluations.

    python benchmarks/learning_efficiency.py --quick            # 3 seeds, 30,000 rows: about 10 minutes on 2 cores
    python benchmarks/learning_efficiency.py                    # the full budget (longer)
    python benchmarks/learning_efficiency.py --smoke --model tiny   # seconds: checks the script works

Each algorithm (``EGRPOConfig.algorithm``) trains a LoRA on the testbed (benchmarks/testbed: a small pretrained
FLUX-shaped pipeline of coloured shapes, ColourPurityReward) with the same hyperparameters (:data:`SHARED`),
for seeds 0, 1, 2, until its cumulative cost passes the budget. The cost of an iteration is counted in
transformer rows (one latent through the transformer once):

- sampling rows: the rows the rollouts cost (the trainer's ``transformer_evaluations``);
- update rows: the rows the policy update forwards and back-propagates, ``len(rollouts.step_start)`` per inner
  epoch (E-GRPO: one per group; trajectory algorithms: one per trained step of every trajectory);
- total = sampling rows + 3 x update rows (a backward pass costs about two forwards in FLOPs).

Every time the total crosses the next of ``--eval_points`` equally spaced fractions of the budget, the policy
is evaluated: deterministic ODE samples (``trainer.sample_images``) of held-out prompts from fixed noise seeds,
scored by the training reward. The seed-mean curves give, per algorithm, the total it needs to reach the best
baseline's final evaluation reward (linear interpolation between evaluations), and E-GRPO's ratio to that
baseline's own. Writes ``benchmarks/results/learning_efficiency_<mode>.{md,png,json}``.

``--model tiny`` replaces the testbed with the library's random-weight tiny FLUX pipeline and ColorReward
(prompt-independent: useful to check the machinery, not to compare algorithms).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
ALGORITHMS = ["e-grpo", "flow-grpo", "dance-grpo", "mix-grpo"]
BASELINES = ALGORITHMS[1:]
UPDATE_ROW_COST = 3
"""Forward-row equivalents of one update row (a forward and a backward, the backward about twice the FLOPs)."""

SHARED: dict = dict(
    num_inference_steps=16,
    num_generations=8,
    prompts_per_device=4,
    learning_rate=1e-3,
    optimizer_step="iteration",
    advantage_eps=0.05,
    clip_range=1e-2,
    noise_level=0.7,
    lora_r=8,
    lora_alpha=8,
    rollout_batch_size=128,
    per_device_train_batch_size=64,
    mixed_precision="no",
    save_steps=0,
    disable_tqdm=True,
)
"""Hyperparameters every algorithm shares (the testbed's recipe, ``benchmarks.testbed.egrpo_config``, with larger
update micro-batches for speed: micro-batching does not change the gradient). Each algorithm keeps its own paper
defaults otherwise."""

EVAL_SEED = 1000
"""Held-out prompt ``i`` is always sampled from the noise of seed ``EVAL_SEED + i``."""


@dataclass(frozen=True)
class Mode:
    """How much to run: the budget in total rows, evaluations along it, seeds, held-out prompts, an optional
    iteration cap and config fields that replace :data:`SHARED` ones (the smoke mode's smaller groups)."""

    budget: int
    eval_points: int
    seeds: tuple[int, ...]
    num_eval_prompts: int
    max_iterations: int | None = None
    overrides: tuple[tuple[str, object], ...] = ()


MODES: dict[str, Mode] = {
    "full": Mode(budget=60_000, eval_points=12, seeds=(0, 1, 2), num_eval_prompts=64),
    "quick": Mode(budget=30_000, eval_points=5, seeds=(0, 1, 2), num_eval_prompts=48),
    "smoke": Mode(
        budget=10**9,
        eval_points=1,
        seeds=(0,),
        num_eval_prompts=1,
        max_iterations=2,
        overrides=(("num_generations", 2), ("prompts_per_device", 1)),
    ),
}


# ---------------------------------------------------------------------------------------------- model backends


def import_testbed(testbed_root: str):
    """The ``benchmarks.testbed`` package of the repository at ``testbed_root`` (appended to ``sys.path``, so
    that the ``trl_flow_egrpo`` already importable keeps priority)."""
    if not os.path.isfile(os.path.join(testbed_root, "benchmarks", "testbed", "__init__.py")):
        raise SystemExit(
            f"No testbed in {testbed_root}/benchmarks/testbed: pass --testbed_root with the repository "
            "that holds it, or --model tiny."
        )
    if testbed_root not in sys.path:
        sys.path.append(testbed_root)
    import benchmarks.testbed as testbed

    return testbed


@dataclass
class Backend:
    """What a run trains on: a fresh pipeline per run, the reward, train and held-out prompts, config fields."""

    name: str
    build_pipeline: object
    reward: object
    train_prompts: list[str]
    eval_prompts: list[str]
    config_fields: dict = field(default_factory=dict)


def testbed_backend(testbed_root: str, num_eval_prompts: int, checkpoint: str | None = None) -> Backend:
    """The testbed: its pretrained pipeline (the committed one, or the one saved in ``checkpoint``),
    ColourPurityReward (dense and graded, with headroom: see docs/testbed.md), its training and held-out
    prompts."""
    testbed = import_testbed(testbed_root)
    from benchmarks.testbed.rewards import ColourPurityReward

    directory = checkpoint or testbed.CHECKPOINT_DIR
    heldout = testbed.heldout_prompts()
    stride = max(1, len(heldout) // num_eval_prompts)  # spread over the held-out compositions
    return Backend(
        "testbed",
        lambda: testbed.load_testbed_pipeline(directory, build_if_missing=False),
        ColourPurityReward(),
        testbed.train_prompts(),
        heldout[::stride][:num_eval_prompts],
        dict(testbed.SAMPLING),
    )


TINY_PROMPTS = ["a red apple", "a fire truck", "a blue sky", "a green field", "a yellow sun", "a purple flower"]


def tiny_backend(num_eval_prompts: int) -> Backend:
    """The library's random-weight tiny FLUX pipeline with ColorReward (for developing and smoke tests)."""
    from trl_flow_egrpo.rewards import ColorReward
    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    return Backend(
        "tiny",
        lambda: build_tiny_flux_pipeline(seed=0),
        ColorReward(),
        TINY_PROMPTS[:4],
        (TINY_PROMPTS * num_eval_prompts)[:num_eval_prompts],
        dict(height=64, width=64, max_sequence_length=32),
    )


def make_backend(model: str, testbed_root: str, checkpoint: str | None, num_eval_prompts: int) -> Backend:
    """``model``: 'testbed' or 'tiny' (which ignores ``testbed_root`` and ``checkpoint``)."""
    if model == "testbed":
        return testbed_backend(testbed_root, num_eval_prompts, checkpoint)
    return tiny_backend(num_eval_prompts)


# ---------------------------------------------------------------------------------------------- one run


def count_update_rows(trainer) -> list[int]:
    """Make ``trainer`` record the update rows of each iteration: ``len(rollouts.step_start)`` trained-step
    inputs, each forwarded (and back-propagated) once per inner epoch. Returns the list it appends to."""
    rows: list[int] = []
    update = trainer.update

    def counting_update(rollouts, advantages):
        rows.append(len(rollouts.step_start) * trainer.config.num_inner_epochs)
        return update(rollouts, advantages)

    trainer.update = counting_update
    return rows


def evaluation_reward(trainer, reward, prompts: list[str]) -> float:
    """Mean reward of deterministic samples of ``prompts`` (prompt ``i`` from seed ``EVAL_SEED + i``)."""
    images = trainer.sample_images(prompts, [EVAL_SEED + i for i in range(len(prompts))])
    return float(reward(images, prompts).float().mean())


def run_curve(backend: Backend, config_fields: dict, mode: Mode, budget_by_iterations: bool = False) -> dict:
    """Train one configuration until its total rows pass ``mode.budget`` (or for ``mode.max_iterations``), and
    evaluate at 0 and each time the total crosses one of ``mode.eval_points`` equal fractions of the budget
    (``budget_by_iterations``: at equal fractions of ``mode.max_iterations`` instead).

    Returns the curve: per evaluation, the iteration, sampling rows, update rows, total and evaluation reward.
    """
    import torch

    from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer

    torch.set_num_threads(1)
    quiet_libraries()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        config = EGRPOConfig(
            output_dir=output_dir, **{**SHARED, **dict(mode.overrides), **backend.config_fields, **config_fields}
        )
        trainer = EGRPOTrainer(config, backend.build_pipeline(), [backend.reward], backend.train_prompts)
        update_rows = count_update_rows(trainer)
        sampling, updates, iteration = 0, 0, 0
        points = [
            dict(
                iteration=0,
                sampling_rows=0,
                update_rows=0,
                total=0,
                train_reward=None,
                reward=evaluation_reward(trainer, backend.reward, backend.eval_prompts),
            )
        ]
        next_point = 1
        while True:
            metrics = trainer.step()
            iteration += 1
            sampling += int(metrics["transformer_evaluations"])
            updates += update_rows[-1]
            total = sampling + UPDATE_ROW_COST * updates
            progress = iteration if budget_by_iterations else total
            scale = mode.max_iterations if budget_by_iterations else mode.budget
            done = total >= mode.budget or (mode.max_iterations is not None and iteration >= mode.max_iterations)
            if done or progress >= next_point * scale / mode.eval_points:
                while progress >= next_point * scale / mode.eval_points:
                    next_point += 1
                points.append(
                    dict(
                        iteration=iteration,
                        sampling_rows=sampling,
                        update_rows=updates,
                        total=total,
                        reward=evaluation_reward(trainer, backend.reward, backend.eval_prompts),
                        train_reward=metrics["reward/weighted_mean"],
                    )
                )
            if done:
                break
    return dict(
        config=config_fields,
        points=points,
        seconds=time.perf_counter() - start,
        merge_plan=[(step.start, step.length) for step in trainer.merge_plan],
        sampling_rows_per_iteration=sampling / iteration,
        update_rows_per_iteration=updates / iteration,
    )


_WORKER_BACKEND: dict = {}


def _run_job(job: tuple) -> dict:
    """Worker entry: build (once per process) the backend, then run one curve."""
    backend_args, config_fields, mode, budget_by_iterations = job
    if backend_args not in _WORKER_BACKEND:
        _WORKER_BACKEND.clear()
        _WORKER_BACKEND[backend_args] = make_backend(*backend_args)
    return run_curve(_WORKER_BACKEND[backend_args], config_fields, mode, budget_by_iterations)


def run_jobs(
    backend_args: tuple, configs: list[dict], mode: Mode, workers: int, budget_by_iterations: bool = False
) -> list[dict]:
    """Run every configuration (``workers`` single-threaded processes in parallel); results in input order."""
    jobs = [(backend_args, config, mode, budget_by_iterations) for config in configs]
    if workers <= 1:
        return [_run_job(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_run_job, jobs, chunksize=1)


def quiet_libraries() -> None:
    """No loading progress bars or per-run info logs: the runs' output is the tables."""
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("trl_flow_egrpo").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------- analysis


def mean_curve(runs: list[dict], x: str = "total") -> tuple[list[float], list[float], list[float]]:
    """Seed-mean curve of runs with the same evaluation schedule: x, mean reward, standard error of the mean."""
    length = min(len(run["points"]) for run in runs)
    xs, means, errors = [], [], []
    for i in range(length):
        rewards = [run["points"][i]["reward"] for run in runs]
        xs.append(sum(run["points"][i][x] for run in runs) / len(runs))
        mean = sum(rewards) / len(rewards)
        means.append(mean)
        variance = sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1) if len(rewards) > 1 else 0.0
        errors.append(math.sqrt(variance / len(rewards)))
    return xs, means, errors


def cost_to_reach(xs: list[float], rewards: list[float], target: float) -> float | None:
    """The first x at which the curve reaches ``target`` (linear interpolation between evaluations; the
    curve starts at x[0]); None if it never does."""
    if rewards[0] >= target:
        return xs[0]
    for x0, r0, x1, r1 in zip(xs, rewards, xs[1:], rewards[1:], strict=False):
        if r1 >= target:
            return x0 + (target - r0) / (r1 - r0) * (x1 - x0)
    return None


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per algorithm: final seed-mean reward, its s.e., and the rows needed to reach the best baseline's final
    reward; the best baseline and E-GRPO's ratio to it (None where a curve never reaches the target)."""
    curves = {name: mean_curve(runs) for name, runs in results.items()}
    baselines = [name for name in results if name != "e-grpo"]
    best = max(baselines, key=lambda name: curves[name][1][-1]) if baselines else None
    target = curves[best][1][-1] if best else None
    rows = {}
    for name, runs in results.items():
        xs, means, errors = curves[name]
        reach = cost_to_reach(xs, means, target) if target is not None else None
        sampling_xs = mean_curve(runs, "sampling_rows")[0]
        update_xs = mean_curve(runs, "update_rows")[0]
        rows[name] = dict(
            final_reward=means[-1],
            final_se=errors[-1],
            initial_reward=means[0],
            final_total=xs[-1],
            final_sampling_rows=sampling_xs[-1],
            final_update_rows=update_xs[-1],
            iterations=runs[0]["points"][-1]["iteration"],
            total_to_reach=reach,
            sampling_rows_per_iteration=runs[0]["sampling_rows_per_iteration"],
            update_rows_per_iteration=runs[0]["update_rows_per_iteration"],
            seconds=sum(run["seconds"] for run in runs) / len(runs),
        )
    ratio = None
    degenerate = best is not None and target <= rows[best]["initial_reward"]
    if best and not degenerate and "e-grpo" in rows and rows["e-grpo"]["total_to_reach"] is not None:
        ratio = rows["e-grpo"]["total_to_reach"] / rows[best]["total_to_reach"]
    return dict(best_baseline=best, target=target, rows=rows, egrpo_ratio=ratio, target_not_above_start=degenerate)


def _number(value: float | None, digits: int = 0) -> str:
    return "not reached" if value is None else f"{value:,.{digits}f}"


def shared_settings(learning_rate: float) -> str:
    """The shared hyperparameters of a report, with the learning rate the runs used."""
    values = {**SHARED, "learning_rate": learning_rate}
    return (
        "Shared hyperparameters: "
        + ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("mixed_precision", "save_steps", "disable_tqdm"))
        + "."
    )


def result_suffix(learning_rate: float) -> str:
    """Result files of a run at another learning rate than the shared one get it in their name."""
    return "" if learning_rate == SHARED["learning_rate"] else f"_lr{learning_rate:g}"


def markdown_report(
    summary: dict, mode_name: str, mode: Mode, backend: str, command: str, seconds: float, learning_rate: float
) -> str:
    """The table of results, with the settings that produced it."""
    best, target, rows = summary["best_baseline"], summary["target"], summary["rows"]
    lines = [
        f"# Learning efficiency ({mode_name} mode, {backend})",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {seconds:.0f} s. Seeds: {list(mode.seeds)}. "
        f"Budget: {mode.budget:,} total rows (total = sampling rows + {UPDATE_ROW_COST} x update rows). "
        f"Evaluation: {mode.num_eval_prompts} held-out prompts, deterministic ODE samples from fixed seeds.  ",
        shared_settings(learning_rate),
        "",
        "| algorithm | sampling rows / iteration | update rows / iteration | iterations | eval reward at 0 "
        "| final eval reward (± s.e.) | total rows to reach target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['sampling_rows_per_iteration']:,.0f} | {row['update_rows_per_iteration']:,.0f} "
            f"| {row['iterations']} | {row['initial_reward']:.4f} "
            f"| {row['final_reward']:.4f} ± {row['final_se']:.4f} "
            f"| {'n/a' if summary['target_not_above_start'] else _number(row['total_to_reach'])} |"
        )
    lines.append("")
    if summary["target_not_above_start"]:
        lines.append(
            f"Target: the best baseline's final evaluation reward, {best} {target:.4f}, is not above the "
            f"reward before training ({rows[best]['initial_reward']:.4f}): no baseline improved on the "
            "held-out prompts, so rows-to-reach and E-GRPO's ratio are not defined for this run."
        )
    elif best is not None:
        ratio = summary["egrpo_ratio"]
        lines.append(
            f"Target: the best baseline's final evaluation reward, {best} {target:.4f}. "
            f"E-GRPO / {best} rows to reach it: "
            + ("E-GRPO did not reach it within the budget." if ratio is None else f"**{ratio:.2f}**")
            + " (goal: <= 0.5)."
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], target: float | None, path: str, title: str) -> None:
    """Seed-mean evaluation reward (± s.e. band) against total rows and against sampling rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, x, label in (
        (axes[0], "total", f"total rows (sampling + {UPDATE_ROW_COST} x update)"),
        (axes[1], "sampling_rows", "sampling rows"),
    ):
        for name, runs in results.items():
            xs, means, errors = mean_curve(runs, x)
            axis.plot(xs, means, marker="o", markersize=3, label=name)
            axis.fill_between(
                xs,
                [m - e for m, e in zip(means, errors, strict=True)],
                [m + e for m, e in zip(means, errors, strict=True)],
                alpha=0.2,
            )
        if target is not None:
            axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="best baseline's final")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out evaluation reward")
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None, description: str = __doc__):
    parser = argparse.ArgumentParser(
        description=description.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="The quick mode (3 seeds, a 30,000-row budget).")
    group.add_argument("--smoke", action="store_true", help="1 seed, 2 iterations: checks that the script works.")
    parser.add_argument(
        "--model",
        choices=["testbed", "tiny"],
        default="testbed",
        help="The pretrained testbed (default) or the random-weight tiny FLUX pipeline.",
    )
    parser.add_argument(
        "--testbed_root", default=REPO, help="Repository holding benchmarks/testbed (default: this one)."
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="A testbed pipeline saved elsewhere (default: the testbed's committed checkpoint).",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=SHARED["learning_rate"],
        help="The learning rate of every run (default: the shared one).",
    )
    parser.add_argument("--workers", type=int, default=2, help="Runs in parallel (one thread each).")
    parser.add_argument("--out", default=RESULTS_DIR, help="Where the table, plot and JSON are written.")
    parser.add_argument(
        "--from_json",
        default=None,
        help="Re-render the table and plot of a run saved as JSON by this script, without training.",
    )
    return parser.parse_args(argv)


def backend_arguments(args, mode: Mode) -> tuple:
    """The arguments of :func:`make_backend` (a tuple: each worker process builds the backend from them)."""
    checkpoint = os.path.abspath(args.checkpoint) if args.checkpoint else None
    return args.model, os.path.abspath(args.testbed_root), checkpoint, mode.num_eval_prompts


def mode_of(args) -> tuple[str, Mode]:
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    return name, MODES[name]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = ("python benchmarks/learning_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.from_json:
        with open(args.from_json) as file:
            saved = json.load(file)
        mode_name, runs, seconds, model = saved["mode"], saved["runs"], saved["seconds"], saved["model"]
        command = saved.get("command", f"python benchmarks/learning_efficiency.py --{mode_name}")  # older files
        learning_rate = runs[0]["config"].get("learning_rate", SHARED["learning_rate"])
    else:
        mode_name, mode = mode_of(args)
        start = time.perf_counter()
        learning_rate, model = args.learning_rate, args.model
        configs = [
            dict(algorithm=algorithm, seed=seed, learning_rate=learning_rate)
            for algorithm in ALGORITHMS
            for seed in mode.seeds
        ]
        runs = run_jobs(backend_arguments(args, mode), configs, mode, args.workers)
        seconds = time.perf_counter() - start
    mode = MODES[mode_name]
    results = {algorithm: [run for run in runs if run["config"]["algorithm"] == algorithm] for algorithm in ALGORITHMS}
    summary = summarize(results)
    report = markdown_report(summary, mode_name, mode, model, command, seconds, learning_rate)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"learning_efficiency_{mode_name}" + result_suffix(learning_rate))
    with open(stem + ".md", "w") as file:
        file.write(report)
    with open(stem + ".json", "w") as file:
        json.dump(
            dict(
                mode=mode_name, model=model, command=command, seconds=seconds, shared=SHARED, summary=summary, runs=runs
            ),
            file,
            indent=1,
        )
    plot(
        results,
        summary["target"],
        stem + ".png",
        f"Learning efficiency on the {model} ({mode_name}, seeds {list(mode.seeds)})",
    )
    print(report)
    print(f"wall time: {seconds:.1f} s; wrote {stem}.md, .png, .json")
    return summary


if __name__ == "__main__":
    main()
