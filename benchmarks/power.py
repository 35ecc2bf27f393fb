"""Statistics of the learning-efficiency and ablation benchmarks: paired seeds, gain curves, rows to reach a fixed
gain target, and paired bootstrap intervals.

Everything here is a pure function of per-seed curves (no torch), so that it is unit-tested on closed forms and
synthetic data (tests/test_benchmark_scripts.py).

Conventions:

- A *run* is one (arm, learning rate, seed) training curve: a list of evaluation points, each a dict with at least
  ``iteration``, ``total`` (cumulative transformer rows, sampling plus weighted update rows) and ``reward`` (the
  mean evaluation reward of the split it was evaluated on).
- *Paired seeds*: seed ``s`` gives every arm the same training prompts, in the same order, and the same per-prompt
  random streams (the trainer seeds both from ``config.seed``), and every evaluation uses the same prompts and
  noises. So arms are compared seed by seed, and a bootstrap resamples *seeds*, jointly across arms: one resampled
  index set is applied to every arm, keeping the pairing.
- The *gain* of a run at a point is its reward there minus its reward at point 0 (before training). All arms start
  from the same pipeline, so their point-0 rewards are equal at equal seed and the gain removes nothing but the
  common start.
- *Rows to reach*: the rows at which the **seed-mean** gain curve first reaches the target (linear interpolation
  between evaluations). Per-seed crossings are too noisy (a single seed's curve crosses and re-crosses a +0.02
  target at a seed sd of about 0.03), and a seed that never crosses has no value; the mean curve always has one
  value per bootstrap resample (infinite where it never reaches the target).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

INF = math.inf


def gains(rewards: Sequence[float]) -> list[float]:
    """``rewards[i] - rewards[0]``: a curve's gain over its own start."""
    if not rewards:
        raise ValueError("gains() needs a curve with at least one point (the evaluation before training).")
    return [value - rewards[0] for value in rewards]


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (a clear error on an empty sequence)."""
    if not values:
        raise ValueError("mean() of no values: an arm without runs has no mean; run it first.")
    return sum(values) / len(values)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean, ``sd / sqrt(n)`` with the ``n - 1`` sd; 0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    center = mean(values)
    return math.sqrt(sum((v - center) ** 2 for v in values) / (len(values) - 1) / len(values))


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Point-wise mean of curves, truncated to the shortest (runs cut short keep what they evaluated)."""
    length = min(len(curve) for curve in curves)
    return [mean([curve[i] for curve in curves]) for i in range(length)]


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> float:
    """The first ``x`` at which the piecewise-linear curve ``(xs, ys)`` reaches ``target``; ``inf`` if it never
    does. A curve at or above the target at its first point reaches it there."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"first_reach needs equally long, non-empty xs and ys (got {len(xs)} and {len(ys)}).")
    if ys[0] >= target:
        return float(xs[0])
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False):
        if y1 >= target:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    return INF


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """``y`` at ``x`` on the piecewise-linear curve (xs increasing); ``x`` outside ``[xs[0], xs[-1]]`` is an error,
    since extrapolating a learning curve says nothing."""
    if not xs[0] <= x <= xs[-1]:
        raise ValueError(f"x={x} is outside the curve's range [{xs[0]}, {xs[-1]}]: evaluate within it.")
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return float(ys[-1])


def rows_to_reach(runs: Sequence[dict], target_gain: float, x: str = "total") -> float:
    """Rows (or iterations, ``x="iteration"``) at which the seed-mean gain curve of ``runs`` first reaches
    ``target_gain``; ``inf`` if it never does within the runs' budget."""
    curves = [gains([point["reward"] for point in run["points"]]) for run in runs]
    xs = mean_curve([[point[x] for point in run["points"]] for run in runs])
    return first_reach(xs, mean_curve(curves), target_gain)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` of two rows-to-reach: ``inf`` when only the numerator never reached the target,
    0 when only the denominator never did, NaN when neither did (undefined)."""
    if math.isinf(numerator) and math.isinf(denominator):
        return math.nan
    if math.isinf(denominator):
        return 0.0
    return numerator / denominator


def order_statistic_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of ``values`` by order statistics (no interpolation, so infinite values are
    kept as such rather than turned into NaN); NaNs are dropped."""
    finite_or_inf = sorted(v for v in values if not math.isnan(v))
    if not finite_or_inf:
        return math.nan, math.nan
    n = len(finite_or_inf)
    alpha = (1 - level) / 2
    low = finite_or_inf[max(0, math.floor(alpha * n))]
    high = finite_or_inf[min(n - 1, math.ceil((1 - alpha) * n) - 1)]
    return low, high


def paired_resamples(num_seeds: int, num_resamples: int, seed: int = 0) -> list[list[int]]:
    """``num_resamples`` bootstrap index lists over ``num_seeds`` seeds (with replacement), the same lists for
    every arm: applying one list to all arms keeps each seed's runs together (the pairing)."""
    if num_seeds < 1:
        raise ValueError("paired_resamples needs at least one seed.")
    generator = random.Random(seed)
    return [[generator.randrange(num_seeds) for _ in range(num_seeds)] for _ in range(num_resamples)]


def paired_seeds(runs_by_arm: dict[str, Sequence[dict]]) -> list[int]:
    """The seeds every arm has a run of, sorted (the runs a paired statistic can use)."""
    common = None
    for runs in runs_by_arm.values():
        seeds = {run["seed"] for run in runs}
        common = seeds if common is None else common & seeds
    return sorted(common or ())


def align(runs_by_arm: dict[str, Sequence[dict]]) -> tuple[list[int], dict[str, list[dict]]]:
    """Each arm's runs of the common seeds, in seed order: ``(seeds, runs_by_arm)``."""
    seeds = paired_seeds(runs_by_arm)
    by_seed = {arm: {run["seed"]: run for run in runs} for arm, runs in runs_by_arm.items()}
    return seeds, {arm: [by_seed[arm][s] for s in seeds] for arm in runs_by_arm}


def paired_bootstrap(
    runs_by_arm: dict[str, Sequence[dict]],
    statistic: Callable[[dict[str, list[dict]]], float],
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """A statistic of several arms' runs with its paired bootstrap interval.

    ``statistic`` maps ``{arm: runs}`` (runs of the same seeds, in the same order in every arm) to a number. The
    estimate is the statistic of the common seeds' runs; the interval is the ``level`` percentile interval of the
    statistic over resamples of seeds, one resample applied to all arms jointly.

    Returns ``dict(estimate, low, high, seeds, undefined)``: ``undefined`` counts resamples where the statistic
    was NaN (left out of the interval).
    """
    seeds, aligned = align(runs_by_arm)
    if not seeds:
        raise ValueError(f"No seed is common to the arms {list(runs_by_arm)}: a paired statistic needs one.")
    estimate = statistic(aligned)
    values = [
        statistic({arm: [runs[i] for i in indices] for arm, runs in aligned.items()})
        for indices in paired_resamples(len(seeds), num_resamples, seed)
    ]
    low, high = order_statistic_interval(values, level)
    return dict(estimate=estimate, low=low, high=high, seeds=len(seeds), undefined=sum(math.isnan(v) for v in values))


def reach_ratio_statistic(numerator: str, denominator: str, target_gain: float, x: str = "total") -> Callable:
    """The statistic ``rows_to_reach(numerator) / rows_to_reach(denominator)`` (see :func:`ratio`)."""

    def statistic(runs_by_arm: dict[str, list[dict]]) -> float:
        return ratio(
            rows_to_reach(runs_by_arm[numerator], target_gain, x),
            rows_to_reach(runs_by_arm[denominator], target_gain, x),
        )

    return statistic


def gain_at(run: dict, x_value: float, x: str = "iteration") -> float:
    """The gain of one run at ``x_value`` of axis ``x`` (interpolated between evaluations)."""
    points = run["points"]
    return interpolate([p[x] for p in points], gains([p["reward"] for p in points]), x_value)


def final_gain(run: dict) -> float:
    """The gain of one run at its last evaluation."""
    rewards = [p["reward"] for p in run["points"]]
    return rewards[-1] - rewards[0]


def paired_difference(
    runs_a: Sequence[dict],
    runs_b: Sequence[dict],
    measure: Callable[[dict], float] = final_gain,
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Mean over common seeds of ``measure(run_a) - measure(run_b)``, with its paired bootstrap interval and its
    paired standard error (``se``): the difference the comparison can resolve at 2 s.e. is ``2 * se``."""
    both = {"a": runs_a, "b": runs_b}

    def statistic(runs: dict[str, list[dict]]) -> float:
        return mean([measure(a) - measure(b) for a, b in zip(runs["a"], runs["b"], strict=True)])

    result = paired_bootstrap(both, statistic, num_resamples, level, seed)
    _, aligned = align(both)
    result["se"] = standard_error([measure(a) - measure(b) for a, b in zip(aligned["a"], aligned["b"], strict=True)])
    return result


MIN_SEEDS_FOR_VERDICT = 10
"""Below this many paired seeds a bootstrap interval is too coarse to decide (3 seeds have 10 distinct resamples):
the verdict stays 'unresolved' whatever the interval."""


def verdict(interval: dict) -> str:
    """'confirmed' if a claimed positive difference has its whole interval above 0, 'refuted' if below 0,
    'unresolved' if the interval contains 0, is undefined, or rests on fewer than :data:`MIN_SEEDS_FOR_VERDICT`
    seeds (``interval["seeds"]``, when given)."""
    low, high = interval["low"], interval["high"]
    if math.isnan(low) or math.isnan(high) or interval.get("seeds", MIN_SEEDS_FOR_VERDICT) < MIN_SEEDS_FOR_VERDICT:
        return "unresolved"
    if low > 0:
        return "confirmed"
    if high < 0:
        return "refuted"
    return "unresolved"


def chain_verdict(verdicts: Sequence[str]) -> str:
    """The verdict of a chain of claims (``A > B > C`` as ``A > B`` and ``B > C``): refuted if any link is,
    confirmed if all are, unresolved otherwise."""
    if any(v == "refuted" for v in verdicts):
        return "refuted"
    if verdicts and all(v == "confirmed" for v in verdicts):
        return "confirmed"
    return "unresolved"


def seeds_to_resolve(sd_of_difference: float, difference: float = 0.01, standard_errors: float = 2.0) -> int:
    """Seeds a paired comparison needs so that ``standard_errors`` s.e. of the mean difference equal
    ``difference``: ``ceil((standard_errors * sd / difference)^2)``."""
    if difference <= 0:
        raise ValueError(f"difference={difference} must be positive.")
    return max(2, math.ceil((standard_errors * sd_of_difference / difference) ** 2))
