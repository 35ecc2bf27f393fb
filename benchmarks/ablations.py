"""The E-GRPO paper's ablations on the testbed with paired seeds and verdicts, as one command.

    python benchmarks/ablations.py --quick            # 3 seeds, 6 iterations of 2 prompts (under 10 min, 2 cores)
    python benchmarks/ablations.py                    # 20 seeds, 30 iterations of 4 prompts (CPU-hours)
    python benchmarks/ablations.py --seeds 30         # add seeds to the cached full run
    python benchmarks/ablations.py --report_only      # rebuild the report from the cache, train nothing
    python benchmarks/ablations.py --smoke --model tiny   # seconds: checks the script works
    python benchmarks/ablations.py --base "e-grpo dpm++2m 0.4" --iterations 40   # on a variant that learns

Four tables, each varying one thing from the paper's recipe (tau = 2.2, adaptive merging, the first 8 of 16 steps
trained, Euler completions), every setting an arm (a label and the ``EGRPOConfig`` fields it changes):

- merge strategy: adaptive against fixed lengths 2, 4, 6 and no merging;
- trained steps: the first 4, the first 8, the second 8, all 16;
- entropy threshold tau in {1.8, 2.0, 2.2, 2.6};
- completion options: Euler on every step (the paper), DPM-Solver++ 2M on 40% of the steps, granularities [1, 2].

``--base LABEL`` layers the settings on another E-GRPO arm of benchmarks/learning_efficiency.py instead of the
paper's recipe: each setting's fields are the base's updated by the setting's, the reference row is the base itself,
and a setting that changes nothing on the base (DPM++ 2M on 40% of the steps on ``e-grpo dpm++2m 0.4``) is left out
rather than run twice. An arm that sets the merging, tau or the trained steps cannot be the base (the tables vary
those from the paper's values and their titles say so). Why: in the full learning-efficiency runs the paper's Euler
E-GRPO does not learn within the ablations' iterations (seed-mean gain -0.0056 at iteration 15, -0.0061 at 20), so
its ablations compare noise, while ``e-grpo dpm++2m 0.4`` does (+0.0110 at iteration 20, +0.0158 at 30, +0.0267 at
40; 20 seeds, s.e. about 0.005). That base wants about 40 iterations, hence ``--iterations N``, which replaces the
mode's iterations per run for the call (they are part of each run's cache key, so runs of different lengths never
mix). Another base writes ``ablations_<mode>_<base>.{md,png,json}`` and caches under
``cache/ablations_<mode>_<model>_<base>/`` (the base's label made file-safe).

Every setting trains E-GRPO for the same number of iterations (the paper's axis) with the shared hyperparameters of
benchmarks/learning_efficiency.py and one learning rate: ``--learning_rate``, by default the one the learning-
efficiency benchmark of the same mode chose for the base arm (its JSON), else :data:`DEFAULT_LEARNING_RATE`. Seeds
are paired (seed ``s`` gives every setting the same prompts and per-prompt random streams), runs are evaluated on
the report split of held-out prompts, and each comparison is the paired difference of final gains over seeds with a
bootstrap 95% interval, its paired standard error and the seeds that would resolve 0.01 at 2 s.e.

The paper's orderings get a verdict each (benchmarks/power.py): a claim ``A > B`` is *confirmed* when the
interval of ``gain(A) - gain(B)`` lies above 0, *refuted* when below, *unresolved* otherwise; a chain is refuted if
any link is, confirmed if all are. Runs are cached like the learning-efficiency runs (``<out>/cache/``). Writes
``<out>/ablations_<mode>.{md,png,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import power  # noqa: E402
from learning_efficiency import (  # noqa: E402
    ARMS,
    SHARED,
    Mode,
    available_arms,
    backend_arguments,
    cached_runs,
    group_by_arm,
    is_egrpo,
    make_job,
    parse_args,
    report_seeds,
    run_jobs,
    shared_settings,
)

DEFAULT_LEARNING_RATE = 1.25e-4
"""The learning rate when no learning-efficiency result of the same mode chose one for the base arm."""

DEFAULT_BASE = "e-grpo"
"""The arm of learning_efficiency.ARMS the settings are layered on by default: E-GRPO as the paper runs it."""

RECIPE_FIELDS = frozenset({"merge", "entropy_threshold", "num_active_steps", "first_active_step"})
"""The fields the merge, trained-steps and tau tables vary from the paper's values: a base may not set them, or the
tables' titles and the reference's label would be false."""

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
"""The paper's orderings as chains of claims ``A > B`` (in final gain at equal iterations); :data:`PAPER` stands for
the reference setting (see :func:`relabel`)."""

RESOLUTION = 0.01
"""The difference each comparison should resolve at 2 standard errors."""


def base_choices() -> list[str]:
    """The arms ``--base`` accepts: E-GRPO's arms of learning_efficiency.ARMS that leave :data:`RECIPE_FIELDS` at
    the paper's values."""
    return [label for label, fields in ARMS if is_egrpo(label) and not RECIPE_FIELDS & set(fields)]


def base_fields(base: str) -> dict:
    """The EGRPOConfig fields of arm ``base``; an arm ``--base`` does not accept exits naming the ones it does."""
    if base not in base_choices():
        raise SystemExit(
            f"--base {base!r} is not an E-GRPO arm of learning_efficiency.ARMS that keeps the paper's merging, tau "
            f"and trained steps: choose among {base_choices()}."
        )
    return dict(dict(ARMS)[base])


def reference_label(base: str) -> str:
    """The label of the setting every other is compared with: :data:`PAPER` on the default base, else the base's
    label with the recipe it keeps (its completions are its own, not necessarily Euler's), without commas so that
    ``--arms`` can name it."""
    return PAPER if base == DEFAULT_BASE else f"{base}: adaptive; tau 2.2; first 8"


def relabel(label: str, reference: str) -> str:
    """A label of :data:`TABLES` or :data:`CLAIMS` as it runs: :data:`PAPER` is the reference setting."""
    return reference if label == PAPER else label


def settings_on(base: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """The settings layered on arm ``base``: ``(label, fields)`` per setting, each setting's fields updating the
    base's (the reference under :func:`reference_label`), and the labels left out because their fields
    are the reference's (the same run twice)."""
    fields = base_fields(base)
    reference = reference_label(base)
    kept, left_out = [], []
    for label, changes in SETTINGS.items():
        merged = {**fields, **changes}
        if label != PAPER and merged == {**fields, **SETTINGS[PAPER]}:
            left_out.append(label)
        else:
            kept.append((relabel(label, reference), merged))
    return kept, left_out


def file_suffix(base: str) -> str:
    """What the names of a base's outputs and cache add: nothing for the default base, else ``_`` and the base's
    label made file-safe (the rule of learning_efficiency.cache_path)."""
    return "" if base == DEFAULT_BASE else "_" + re.sub(r"[^A-Za-z0-9.+-]+", "_", base)


def mode_with(mode_name: str, iterations: int | None) -> Mode:
    """The mode ``mode_name`` with ``iterations`` replacing its iterations per run, if given."""
    if iterations is None:
        return MODES[mode_name]
    if iterations < 1:
        raise SystemExit(f"--iterations {iterations}: give a positive number of iterations per run.")
    return dataclasses.replace(MODES[mode_name], max_iterations=iterations)


def chosen_learning_rate(out: str, mode_name: str, arm: str) -> float | None:
    """The learning rate the learning-efficiency benchmark of mode ``mode_name`` chose for ``arm``, if its JSON is
    in ``out``."""
    path = os.path.join(out, f"learning_efficiency_{mode_name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file).get("learning_rates", {}).get(arm)


def compare(runs_by_setting: dict[str, list[dict]], a: str, b: str, num_resamples: int = 2000) -> dict:
    """``gain(a) - gain(b)`` at the final evaluation, paired over seeds: estimate, 95% interval, s.e., whether
    2 s.e. resolve :data:`RESOLUTION`, and the seeds that would."""
    result = power.paired_difference(runs_by_setting[a], runs_by_setting[b], power.final_gain, num_resamples)
    sd = result["se"] * math.sqrt(result["seeds"])
    result["resolves"] = 2 * result["se"] <= RESOLUTION
    result["seeds_to_resolve"] = power.seeds_to_resolve(sd, RESOLUTION) if result["seeds"] > 1 else None
    result["verdict"] = power.verdict(result)
    return result


def summarize(runs_by_setting: dict[str, list[dict]], num_resamples: int = 2000, reference: str = PAPER) -> dict:
    """Per setting: seeds, final gain ± s.e., merge plan, rows per iteration; per table row: the comparison with
    the ``reference`` setting; per claim: its links' comparisons and the chain's verdict (claims whose settings
    are not all present are left out)."""
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
    against_reference = {
        label: compare(runs_by_setting, label, reference, num_resamples)
        for label in runs_by_setting
        if label != reference and reference in runs_by_setting
    }
    claims = {}
    for claim, paper_links in CLAIMS.items():
        links = [(relabel(a, reference), relabel(b, reference)) for a, b in paper_links]
        if all(a in runs_by_setting and b in runs_by_setting for a, b in links):
            compared = [dict(a=a, b=b, **compare(runs_by_setting, a, b, num_resamples)) for a, b in links]
            claims[claim] = dict(links=compared, verdict=power.chain_verdict([c["verdict"] for c in compared]))
    return dict(settings=settings, against_reference=against_reference, claims=claims)


def format_plan(plan: list) -> str:
    """A merge plan as the paper writes it: ``(k, l)`` pairs."""
    return " ".join(f"({start},{length})" for start, length in plan)


def _difference(result: dict) -> str:
    return f"{result['estimate']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]"


def markdown_report(
    summary: dict,
    mode_name: str,
    mode: Mode,
    backend: str,
    command: str,
    seconds: float,
    learning_rate: float,
    base: str = DEFAULT_BASE,
    left_out: tuple[str, ...] = (),
) -> str:
    """The claims' verdicts, then one table per ablation, with the settings that produced them: the base arm and
    its fields, and the settings ``left_out`` because they are the base itself."""
    overrides = "".join(f" This mode sets {name}={value}." for name, value in mode.overrides)
    reference = reference_label(base)
    fields = ", ".join(f"{name}={value}" for name, value in base_fields(base).items())
    same = "".join(f" Left out: '{label}' (its fields are the base's: the reference run twice)." for label in left_out)
    lines = [
        f"# E-GRPO ablations ({mode_name} mode, {backend})",
        "",
        f"Command: `{command}`  ",
        f"Base arm: `{base}` ({fields}); every setting changes its fields and is compared with the reference "
        f"'{reference}'.{same}  ",
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
        present = [relabel(label, reference) for label in labels if relabel(label, reference) in summary["settings"]]
        if not present:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| setting | merge plan (k, l) | sampling rows / it | update rows / it | seeds | final gain (± s.e.) "
            "| minus the reference's (95% interval) | resolves 0.01? |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in present:
            row = summary["settings"][label]
            comparison = summary["against_reference"].get(label)
            versus = "-" if comparison is None else _difference(comparison)
            resolves = "-" if comparison is None else ("yes" if comparison["resolves"] else "no")
            lines.append(
                f"| {label} | {format_plan(row['merge_plan'])} | {row['sampling_rows_per_iteration']:,.0f} "
                f"| {row['update_rows_per_iteration']:,.0f} | {row['seeds']} "
                f"| {row['final_gain']:+.4f} ± {row['final_gain_se']:.4f} | {versus} | {resolves} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs_by_setting: dict[str, list[dict]], path: str, title: str, reference: str = PAPER) -> None:
    """One panel per table: seed-mean gain (± s.e.) against iterations, the ``reference`` setting in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TABLES), figsize=(5 * len(TABLES), 4), sharey=True)
    for axis, (table, labels) in zip(axes, TABLES.items(), strict=True):
        for label in (relabel(label, reference) for label in labels if relabel(label, reference) in runs_by_setting):
            runs = runs_by_setting[label]
            curves = [power.gains([p["reward"] for p in run["points"]]) for run in runs]
            means = power.mean_curve(curves)
            errors = [power.standard_error([c[i] for c in curves]) for i in range(len(means))]
            xs = power.mean_curve([[p["iteration"] for p in run["points"]] for run in runs])
            style = dict(color="black", linewidth=2.5) if label == reference else dict(linewidth=1.2)
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
        if axis.lines:  # a panel whose settings were not asked for (--arms) stays empty
            axis.legend(fontsize=7)
    axes[0].set_ylabel("report-split reward gain over the start")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_ablation_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: learning_efficiency.parse_args's options (shared with that benchmark) and the ablations'
    own ``--base`` and ``--iterations``, parsed first and listed in ``--help``'s description."""
    own = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS, allow_abbrev=False)
    group = own.add_argument_group("the ablations' own options")
    group.add_argument(
        "--base",
        default=DEFAULT_BASE,
        metavar="LABEL",
        help=f"The E-GRPO arm the settings are layered on (default: {DEFAULT_BASE}, the paper's recipe): one of "
        f"{base_choices()}.",
    )
    group.add_argument(
        "--iterations", type=int, default=None, metavar="N", help="Iterations per run (default: the mode's)."
    )
    known, rest = own.parse_known_args(argv)
    args = parse_args(rest, __doc__.split("\n\n")[0] + "\n" + own.format_help(), with_learning_rate=True)
    args.base, args.iterations = known.base, known.iterations
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_ablation_args(argv)
    command = ("python benchmarks/ablations.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = mode_with(mode_name, args.iterations)
    settings, left_out = settings_on(args.base)
    for label in left_out:
        print(f"setting '{label}' is left out: its fields are the base's ({args.base}), the reference run twice.")
    reference = reference_label(args.base)
    learning_rate = args.learning_rate or chosen_learning_rate(args.out, mode_name, args.base) or DEFAULT_LEARNING_RATE
    arms = available_arms(settings, args.arms.split(",") if args.arms else None)
    backend_args = backend_arguments(args, mode)
    suffix = file_suffix(args.base)
    cache_dir = os.path.join(args.out, "cache", f"ablations_{mode_name}_{args.model}{suffix}")
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
    summary = summarize(runs_by_setting, reference=reference)
    report = markdown_report(
        summary, mode_name, mode, args.model, command, seconds, learning_rate, args.base, tuple(left_out)
    )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ablations_{mode_name}{suffix}")
    with open(stem + ".md", "w") as file:
        file.write(report)
    with open(stem + ".json", "w") as file:
        json.dump(
            dict(
                mode=mode_name,
                model=args.model,
                command=command,
                seconds=seconds,
                iterations=mode.max_iterations,
                learning_rate=learning_rate,
                base=args.base,
                base_fields=base_fields(args.base),
                left_out=left_out,
                shared=SHARED,
                summary=summary,
            ),
            file,
            indent=1,
        )
    seeds = sorted({len(runs) for runs in runs_by_setting.values()})
    title = f"E-GRPO ablations on the {args.model}, base {args.base} ({mode_name}, {seeds} seeds)"
    plot(runs_by_setting, stem + ".png", title, reference)
    print(report)
    print(f"wall time: {seconds:.1f} s; wrote {stem}.md, .png, .json")
    return summary


if __name__ == "__main__":
    main()
