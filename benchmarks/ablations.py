"""The E-GRPO paper's ablations on the testbed with paired seeds and verdicts, as one command.

    python benchmarks/ablations.py --quick            # 3 seeds, 6 iterations of 2 prompts (under 10 min, 2 cores)
    python benchmarks/ablations.py                    # 20 seeds, 30 iterations of 4 prompts (CPU-hours)
    python benchmarks/ablations.py --seeds 30         # add seeds to the cached full run
    python benchmarks/ablations.py --report_only      # rebuild the report from the cache, train nothing
    python benchmarks/ablations.py --smoke --model tiny   # seconds: checks the script works

Four tables, each varying one thing from the paper's recipe (tau = 2.2, adaptive merging, the first 8 of 16 steps
trained, Euler completions), every setting an arm (a label and the ``EGRPOConfig`` fields it changes):

- merge strategy: adaptive against fixed lengths 2, 4, 6 and no merging;
- trained steps: the first 4, the first 8, the second 8, all 16;
- entropy threshold tau in {1.8, 2.0, 2.2, 2.6};
- completion options: Euler on every step (the paper), DPM-Solver++ 2M on 40% of the steps, granularities [1, 2].

Every setting trains E-GRPO for the same number of iterations (the paper's axis) with the shared hyperparameters of
benchmarks/learning_efficiency.py and one learning rate: ``--learning_rate``, by default the one the learning-
efficiency benchmark of the same mode chose for E-GRPO (its JSON), else :data:`DEFAULT_LEARNING_RATE`. Seeds are
paired (seed ``s`` gives every setting the same prompts and per-prompt random streams), runs are evaluated on the
report split of held-out prompts, and each comparison is the paired difference of final gains over seeds with a
bootstrap 95% interval, its paired standard error and the seeds that would resolve 0.01 at 2 s.e.

The paper's orderings get a verdict each (benchmarks/power.py): a claim ``A > B`` is *confirmed* when the
interval of ``gain(A) - gain(B)`` lies above 0, *refuted* when below, *unresolved* otherwise; a chain is refuted if
any link is, confirmed if all are. Runs are cached like the learning-efficiency runs (``<out>/cache/``). Writes
``<out>/ablations_<mode>.{md,png,json}``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import power  # noqa: E402
from learning_efficiency import (  # noqa: E402
    SHARED,
    Mode,
    available_arms,
    backend_arguments,
    cached_runs,
    group_by_arm,
    make_job,
    parse_args,
    report_seeds,
    run_jobs,
    shared_settings,
)

DEFAULT_LEARNING_RATE = 1.25e-4
"""The learning rate when no learning-efficiency result of the same mode chose one for E-GRPO."""

MODES: dict[str, Mode] = {
    "full": Mode(
        budget=10**12,
        eval_points=10,
        learning_rates=(),
        sweep_seeds=(),
        seeds=tuple(range(20)),
        num_eval_prompts=48,
        max_iterations=30,
        budget_by_iterations=True,
    ),
    "quick": Mode(
        budget=10**12,
        eval_points=3,
        learning_rates=(),
        sweep_seeds=(),
        seeds=(0, 1, 2),
        num_eval_prompts=16,
        max_iterations=6,
        overrides=(("prompts_per_device", 2),),
        budget_by_iterations=True,
    ),
    "smoke": Mode(
        budget=10**12,
        eval_points=1,
        learning_rates=(),
        sweep_seeds=(),
        seeds=(0, 1),
        num_eval_prompts=1,
        max_iterations=2,
        overrides=(("num_generations", 2), ("prompts_per_device", 1)),
        budget_by_iterations=True,
    ),
}

PAPER = "paper: adaptive, tau 2.2, first 8, Euler"
SETTINGS: dict[str, dict] = {
    PAPER: {},
    "fixed 2": dict(merge="2"),
    "fixed 4": dict(merge="4"),
    "fixed 6": dict(merge="6"),
    "no merging": dict(merge="none"),
    "first 4": dict(num_active_steps=4),
    "second 8": dict(num_active_steps=8, first_active_step=8),
    "all 16": dict(num_active_steps=16),
    "tau 1.8": dict(entropy_threshold=1.8),
    "tau 2.0": dict(entropy_threshold=2.0),
    "tau 2.6": dict(entropy_threshold=2.6),
    "DPM++ 2M, 40% of steps": dict(completion_solver="dpmpp_2m", completion_steps_fraction=0.4),
    "granularities 1, 2": dict(completion_granularities=[1, 2]),
}
"""Setting label -> the EGRPOConfig fields it changes from the paper's recipe (all E-GRPO)."""

TABLES: dict[str, list[str]] = {
    "Merge strategy (tau 2.2, first 8 steps trained)": [PAPER, "fixed 2", "fixed 4", "fixed 6", "no merging"],
    "Trained steps (adaptive merging, tau 2.2)": ["first 4", PAPER, "second 8", "all 16"],
    "Entropy threshold tau (adaptive merging, first 8 steps trained)": ["tau 1.8", "tau 2.0", PAPER, "tau 2.6"],
    "Completion options (the paper's plan)": [PAPER, "DPM++ 2M, 40% of steps", "granularities 1, 2"],
}
"""Table title -> its settings, in the paper's order; each table's rows are compared with the paper's setting."""

CLAIMS: dict[str, list[tuple[str, str]]] = {
    "adaptive > fixed merges > none": [
        *[(PAPER, f"fixed {length}") for length in (2, 4, 6)],
        *[(f"fixed {length}", "no merging") for length in (2, 4, 6)],
    ],
    "first 8 > all > second 8": [(PAPER, "all 16"), ("all 16", "second 8")],
    "tau 2.2 best": [(PAPER, other) for other in ("tau 1.8", "tau 2.0", "tau 2.6")],
}
"""The paper's orderings as chains of claims ``A > B`` (in final gain at equal iterations)."""

RESOLUTION = 0.01
"""The difference each comparison should resolve at 2 standard errors."""


def chosen_learning_rate(out: str, mode_name: str) -> float | None:
    """The learning rate the learning-efficiency benchmark of mode ``mode_name`` chose for E-GRPO, if its JSON is
    in ``out``."""
    path = os.path.join(out, f"learning_efficiency_{mode_name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file).get("learning_rates", {}).get("e-grpo")


def compare(runs_by_setting: dict[str, list[dict]], a: str, b: str, num_resamples: int = 2000) -> dict:
    """``gain(a) - gain(b)`` at the final evaluation, paired over seeds: estimate, 95% interval, s.e., whether
    2 s.e. resolve :data:`RESOLUTION`, and the seeds that would."""
    result = power.paired_difference(runs_by_setting[a], runs_by_setting[b], power.final_gain, num_resamples)
    sd = result["se"] * math.sqrt(result["seeds"])
    result["resolves"] = 2 * result["se"] <= RESOLUTION
    result["seeds_to_resolve"] = power.seeds_to_resolve(sd, RESOLUTION) if result["seeds"] > 1 else None
    result["verdict"] = power.verdict(result)
    return result


def summarize(runs_by_setting: dict[str, list[dict]], num_resamples: int = 2000) -> dict:
    """Per setting: seeds, final gain ± s.e., merge plan, rows per iteration; per table row: the comparison with
    the paper's setting; per claim: its links' comparisons and the chain's verdict (claims whose settings are
    not all present are left out)."""
    settings = {}
    for label, runs in runs_by_setting.items():
        finals = [power.final_gain(run) for run in runs]
        settings[label] = dict(
            seeds=len(runs),
            final_gain=power.mean(finals),
            final_gain_se=power.standard_error(finals),
            merge_plan=runs[0]["merge_plan"],
            iterations=runs[0]["points"][-1]["iteration"],
            sampling_rows_per_iteration=runs[0]["sampling_rows_per_iteration"],
            update_rows_per_iteration=runs[0]["update_rows_per_iteration"],
            cpu_seconds=power.mean([run.get("cpu_seconds", run["seconds"]) for run in runs]),
        )
    against_paper = {
        label: compare(runs_by_setting, label, PAPER, num_resamples)
        for label in runs_by_setting
        if label != PAPER and PAPER in runs_by_setting
    }
    claims = {}
    for claim, links in CLAIMS.items():
        if all(a in runs_by_setting and b in runs_by_setting for a, b in links):
            compared = [dict(a=a, b=b, **compare(runs_by_setting, a, b, num_resamples)) for a, b in links]
            claims[claim] = dict(links=compared, verdict=power.chain_verdict([c["verdict"] for c in compared]))
    return dict(settings=settings, against_paper=against_paper, claims=claims)


def format_plan(plan: list) -> str:
    """A merge plan as the paper writes it: ``(k, l)`` pairs."""
    return " ".join(f"({start},{length})" for start, length in plan)


def _difference(result: dict) -> str:
    return f"{result['estimate']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]"


def markdown_report(
    summary: dict, mode_name: str, mode: Mode, backend: str, command: str, seconds: float, learning_rate: float
) -> str:
    """The claims' verdicts, then one table per ablation, with the settings that produced them."""
    overrides = "".join(f" This mode sets {name}={value}." for name, value in mode.overrides)
    lines = [
        f"# E-GRPO ablations ({mode_name} mode, {backend})",
        "",
        f"Command: `{command}`  ",
        f"Wall time of this call: {seconds:.0f} s. {mode.max_iterations} iterations per setting, evaluated "
        f"{mode.eval_points} times on {mode.num_eval_prompts} report-split prompts (deterministic ODE samples from "
        f"fixed seeds). Learning rate {learning_rate:g}.  ",
        shared_settings() + overrides,
        "",
        "Gains are final evaluation reward minus the reward before training, paired over seeds; intervals are "
        f"paired bootstrap 95% intervals; 'resolves' means 2 s.e. of the paired difference <= {RESOLUTION}.",
        "",
        "## The paper's orderings",
        "",
        "| claim | link | difference (95% interval) | 2 s.e. | seeds | seeds to resolve 0.01 | link verdict "
        "| claim verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for claim, entry in summary["claims"].items():
        for i, link in enumerate(entry["links"]):
            lines.append(
                f"| {claim if i == 0 else ''} | {link['a']} > {link['b']} | {_difference(link)} "
                f"| {2 * link['se']:.4f} | {link['seeds']} | {link['seeds_to_resolve'] or '-'} | {link['verdict']} "
                f"| {entry['verdict'] if i == 0 else ''} |"
            )
    for title, labels in TABLES.items():
        present = [label for label in labels if label in summary["settings"]]
        if not present:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| setting | merge plan (k, l) | sampling rows / it | update rows / it | seeds | final gain (± s.e.) "
            "| minus the paper's (95% interval) | resolves 0.01? |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in present:
            row = summary["settings"][label]
            comparison = summary["against_paper"].get(label)
            versus = "-" if comparison is None else _difference(comparison)
            resolves = "-" if comparison is None else ("yes" if comparison["resolves"] else "no")
            lines.append(
                f"| {label} | {format_plan(row['merge_plan'])} | {row['sampling_rows_per_iteration']:,.0f} "
                f"| {row['update_rows_per_iteration']:,.0f} | {row['seeds']} "
                f"| {row['final_gain']:+.4f} ± {row['final_gain_se']:.4f} | {versus} | {resolves} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs_by_setting: dict[str, list[dict]], path: str, title: str) -> None:
    """One panel per table: seed-mean gain (± s.e.) against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TABLES), figsize=(5 * len(TABLES), 4), sharey=True)
    for axis, (table, labels) in zip(axes, TABLES.items(), strict=True):
        for label in (label for label in labels if label in runs_by_setting):
            runs = runs_by_setting[label]
            curves = [power.gains([p["reward"] for p in run["points"]]) for run in runs]
            means = power.mean_curve(curves)
            errors = [power.standard_error([c[i] for c in curves]) for i in range(len(means))]
            xs = power.mean_curve([[p["iteration"] for p in run["points"]] for run in runs])
            style = dict(color="black", linewidth=2.5) if label == PAPER else dict(linewidth=1.2)
            axis.plot(xs, means, marker="o", markersize=3, label=label, **style)
            axis.fill_between(
                xs,
                [m - e for m, e in zip(means, errors, strict=True)],
                [m + e for m, e in zip(means, errors, strict=True)],
                alpha=0.15,
            )
        axis.set_title(table.split(" (")[0], fontsize=10)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_ylabel("report-split reward gain over the start")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__, with_learning_rate=True)
    command = ("python benchmarks/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    learning_rate = args.learning_rate or chosen_learning_rate(args.out, mode_name) or DEFAULT_LEARNING_RATE
    arms = available_arms(
        [(label, dict(algorithm="e-grpo", **fields)) for label, fields in SETTINGS.items()],
        args.arms.split(",") if args.arms else None,
    )
    backend_args = backend_arguments(args, mode)
    cache_dir = os.path.join(args.out, "cache", f"ablations_{mode_name}_{args.model}")
    start = time.perf_counter()
    jobs = [
        make_job(label, fields, learning_rate, seed, "report")
        for seed in report_seeds(args, mode)  # seed-major: a run cut short has every setting at its first seeds
        for label, fields in arms
    ]
    if args.report_only:
        runs = cached_runs(backend_args, jobs, mode, cache_dir)
    else:
        runs = run_jobs(backend_args, jobs, mode, args.workers, cache_dir)
    seconds = time.perf_counter() - start
    runs_by_setting = group_by_arm(runs, arms)
    if not runs_by_setting:
        raise SystemExit("No cached ablation runs yet: run without --report_only first.")
    summary = summarize(runs_by_setting)
    report = markdown_report(summary, mode_name, mode, args.model, command, seconds, learning_rate)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ablations_{mode_name}")
    with open(stem + ".md", "w") as file:
        file.write(report)
    with open(stem + ".json", "w") as file:
        json.dump(
            dict(
                mode=mode_name,
                model=args.model,
                command=command,
                seconds=seconds,
                learning_rate=learning_rate,
                shared=SHARED,
                summary=summary,
            ),
            file,
            indent=1,
        )
    seeds = sorted({len(runs) for runs in runs_by_setting.values()})
    plot(runs_by_setting, stem + ".png", f"E-GRPO ablations on the {args.model} ({mode_name}, {seeds} seeds)")
    print(report)
    print(f"wall time: {seconds:.1f} s; wrote {stem}.md, .png, .json")
    return summary


if __name__ == "__main__":
    main()
