"""The E-GRPO paper's ablations on the testbed, as one command.

    python benchmarks/ablations.py --quick            # 3 seeds, 6 iterations of 2 prompts (about 4 min, 2 cores)
    python benchmarks/ablations.py                    # 3 seeds, more iterations (longer)
    python benchmarks/ablations.py --smoke --model tiny   # seconds: checks the script works

Three tables, laid out as the paper's (each varies one thing from the paper's recipe: tau = 2.2, adaptive
merging, the first 8 of 16 steps trained):

- entropy threshold tau in {0 (no merging), 1.8, 2.0, 2.2, 2.6};
- fixed merge lengths {2, 4, 6} against adaptive merging;
- trained (active) steps: the first 4, the first 8, the second 8, all 16.

Every setting trains E-GRPO on the testbed for the same number of iterations with the hyperparameters of
benchmarks/learning_efficiency.py (:data:`learning_efficiency.SHARED`), and is evaluated on held-out prompts
(deterministic samples from fixed noise seeds) along the way. A setting shared by two tables (tau = 2.2, first
8 steps) runs once. The tables also give each setting's merge plan and its sampling and update rows per
iteration, since the settings differ in cost. Writes ``benchmarks/results/ablations_<mode>.{md,png,json}``.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from learning_efficiency import (  # noqa: E402
    SHARED,
    Mode,
    backend_arguments,
    mean_curve,
    parse_args,
    result_suffix,
    run_jobs,
    shared_settings,
)

NO_LIMIT = 10**12

MODES: dict[str, Mode] = {
    "full": Mode(budget=NO_LIMIT, eval_points=6, seeds=(0, 1, 2), num_eval_prompts=64, max_iterations=30),
    "quick": Mode(
        budget=NO_LIMIT,
        eval_points=3,
        seeds=(0, 1, 2),
        num_eval_prompts=48,
        max_iterations=6,
        overrides=(("prompts_per_device", 2),),
    ),
    "smoke": Mode(
        budget=NO_LIMIT,
        eval_points=1,
        seeds=(0,),
        num_eval_prompts=1,
        max_iterations=2,
        overrides=(("num_generations", 2), ("prompts_per_device", 1)),
    ),
}

PAPER = "tau = 2.2, adaptive, first 8 (paper)"
ABLATIONS: dict[str, list[tuple[str, dict]]] = {
    "Entropy threshold tau (adaptive merging, first 8 steps trained)": [
        ("tau = 0 (no merging)", dict(entropy_threshold=0.0)),
        ("tau = 1.8", dict(entropy_threshold=1.8)),
        ("tau = 2.0", dict(entropy_threshold=2.0)),
        (PAPER, {}),
        ("tau = 2.6", dict(entropy_threshold=2.6)),
    ],
    "Fixed merge length (first 8 steps trained)": [
        ("fixed l = 2", dict(merge="2")),
        ("fixed l = 4", dict(merge="4")),
        ("fixed l = 6", dict(merge="6")),
        (PAPER, {}),
    ],
    "Trained steps (tau = 2.2, adaptive merging)": [
        ("first 4", dict(num_active_steps=4)),
        (PAPER, {}),
        ("second 8", dict(num_active_steps=8, first_active_step=8)),
        ("all 16", dict(num_active_steps=16)),
    ],
}
"""Table title -> (setting, the EGRPOConfig fields it changes from the paper's recipe)."""


def unique_settings() -> list[dict]:
    """Every distinct setting of :data:`ABLATIONS` once, in table order."""
    settings: list[dict] = []
    for rows in ABLATIONS.values():
        for _, fields in rows:
            if fields not in settings:
                settings.append(fields)
    return settings


def format_plan(plan: list[tuple[int, int]]) -> str:
    """A merge plan as the paper writes it: ``(k, l)`` pairs."""
    return " ".join(f"({start},{length})" for start, length in plan)


def setting_summary(runs: list[dict]) -> dict:
    """Seed-mean final evaluation reward, its standard error, the reward before training and the costs."""
    _, means, errors = mean_curve(runs)
    return dict(
        initial_reward=means[0],
        final_reward=means[-1],
        final_se=errors[-1],
        merge_plan=runs[0]["merge_plan"],
        iterations=runs[0]["points"][-1]["iteration"],
        sampling_rows_per_iteration=runs[0]["sampling_rows_per_iteration"],
        update_rows_per_iteration=runs[0]["update_rows_per_iteration"],
    )


def markdown_report(
    summaries: dict[str, dict],
    mode_name: str,
    mode: Mode,
    backend: str,
    command: str,
    seconds: float,
    learning_rate: float,
) -> str:
    """One table per ablation, with the settings that produced them."""
    lines = [
        f"# E-GRPO ablations ({mode_name} mode, {backend})",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {seconds:.0f} s. Seeds: {list(mode.seeds)}. {mode.max_iterations} iterations per setting. "
        f"Evaluation: {mode.num_eval_prompts} held-out prompts, deterministic ODE samples from fixed seeds.  ",
        shared_settings(learning_rate)
        + ("".join(f" This mode sets {name}={value}." for name, value in mode.overrides)),
    ]
    for title, rows in ABLATIONS.items():
        lines += [
            "",
            f"## {title}",
            "",
            "| setting | merge plan (k, l) | sampling rows / iteration | update rows / iteration "
            "| eval reward at 0 | final eval reward (± s.e. over seeds) | gain |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, _ in rows:
            row = summaries[label]
            error = f" ± {row['final_se']:.4f}" if len(mode.seeds) > 1 else ""  # no spread from one seed
            lines.append(
                f"| {label} | {format_plan(row['merge_plan'])} | {row['sampling_rows_per_iteration']:,.0f} "
                f"| {row['update_rows_per_iteration']:,.0f} | {row['initial_reward']:.4f} "
                f"| {row['final_reward']:.4f}{error} "
                f"| {row['final_reward'] - row['initial_reward']:+.4f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: str, title: str) -> None:
    """One panel per ablation: seed-mean evaluation reward against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(ABLATIONS), figsize=(5 * len(ABLATIONS), 4), sharey=True)
    for axis, (table, rows) in zip(axes, ABLATIONS.items(), strict=True):
        for label, _ in rows:
            xs, means, errors = mean_curve(results[label], "iteration")
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
    axes[0].set_ylabel("held-out evaluation reward")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__)
    command = ("python benchmarks/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    settings = unique_settings()
    if args.from_json:
        with open(args.from_json) as file:
            saved = json.load(file)
        mode_name, runs, seconds, model = saved["mode"], saved["runs"], saved["seconds"], saved["model"]
        command = saved.get("command", f"python benchmarks/ablations.py --{mode_name}")  # older files
        learning_rate = runs[0]["config"]["learning_rate"]
    else:
        mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
        start = time.perf_counter()
        learning_rate, model = args.learning_rate, args.model
        configs = [
            dict(algorithm="e-grpo", seed=seed, learning_rate=learning_rate, **fields)
            for fields in settings
            for seed in MODES[mode_name].seeds
        ]
        runs = run_jobs(
            backend_arguments(args, MODES[mode_name]),
            configs,
            MODES[mode_name],
            args.workers,
            budget_by_iterations=True,
        )
        seconds = time.perf_counter() - start
    mode = MODES[mode_name]
    by_setting = {
        label: [runs[settings.index(fields) * len(mode.seeds) + i] for i in range(len(mode.seeds))]
        for rows in ABLATIONS.values()
        for label, fields in rows
    }
    summaries = {label: setting_summary(setting_runs) for label, setting_runs in by_setting.items()}
    report = markdown_report(summaries, mode_name, mode, model, command, seconds, learning_rate)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ablations_{mode_name}" + result_suffix(learning_rate))
    with open(stem + ".md", "w") as file:
        file.write(report)
    with open(stem + ".json", "w") as file:
        json.dump(
            dict(
                mode=mode_name,
                model=model,
                command=command,
                seconds=seconds,
                shared=SHARED,
                summaries=summaries,
                runs=runs,
            ),
            file,
            indent=1,
        )
    plot(by_setting, stem + ".png", f"E-GRPO ablations on the {model} ({mode_name}, seeds {list(mode.seeds)})")
    print(report)
    print(f"wall time: {seconds:.1f} s; wrote {stem}.md, .png, .json")
    return summaries


if __name__ == "__main__":
    main()
