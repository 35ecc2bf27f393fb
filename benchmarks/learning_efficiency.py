"""Learning efficiency with power: every algorithm of the GRPO family on the testbed, paired seeds, a learning-rate
sweep per algorithm, bootstrap intervals.

    python benchmarks/learning_efficiency.py --quick            # 3 lrs x 1 sweep seed, 3 report seeds (< 15 min)
    python benchmarks/learning_efficiency.py                    # 5 lrs x 3 sweep seeds, 20 report seeds (CPU-hours)
    python benchmarks/learning_efficiency.py --arms awm --learning_rates 1e-3   # one arm, one more rate
    python benchmarks/learning_efficiency.py --seeds 40         # add report seeds to the cached full run
    python benchmarks/learning_efficiency.py --report_only      # rebuild the report from the cache, train nothing
    python benchmarks/learning_efficiency.py --smoke --model tiny   # seconds: checks the script works

An *arm* is a label and the ``EGRPOConfig`` fields it sets (:data:`ARMS`: the algorithms, MixGRPO-Flash, DiffusionNFT,
AWM, E-GRPO with its completion options, and with CPS or GRPO-Guard on its best variant). Every arm trains a LoRA on the
testbed (benchmarks/testbed, ColourPurityReward) with the shared hyperparameters (:data:`SHARED`), the same
``optimizer_step`` included, until its cumulative cost passes the budget. The cost is counted in transformer rows, the
same way for every arm:

- sampling rows: the trainer's ``trajectory_evaluations`` metric (the testbed has no CFG: ``transformer_rows`` too);
- update rows: ``len(rollouts.step_start)`` per inner epoch (the trainer's own closed form for its throughput);
- reference rows: with a KL term (Flow-GRPO's ``beta``), one no-grad forward of the frozen base per update row;
- total = sampling rows + 3 x update rows + reference rows (a backward pass costs about two forwards in FLOPs).

Two phases:

1. *Sweep*: each arm at every learning rate of the mode, on the sweep seeds, evaluated on the *validation* prompts
   (half of the testbed's held-out compositions); each arm's learning rate is the one with the largest mean gain
   over its evaluation points (the area under its gain curve on the rows axis).
2. *Report*: each arm at its own learning rate on the report seeds, evaluated on the *report* prompts (the other
   half of the held-out compositions, disjoint from training and validation).

Seeds are paired: ``config.seed = s`` gives every arm the same training prompts in the same order and the same
per-prompt random streams, and every evaluation the same prompts and noises (``EVAL_SEED + i``). Evaluations happen
at ``eval_points`` equal fractions of the budget, recording iterations and rows, so curves have both axes.

Statistics (benchmarks/power.py): rows to reach a fixed gain target (``TARGET_GAIN`` over the arm's own start)
on the seed-mean gain curve, and E-GRPO's ratio to the best baseline (the baseline that reaches the target in the
fewest rows, chosen inside every resample) with a paired bootstrap 95% interval over seeds; the per-iteration
ordering: every arm's gain at the last iteration all arms reached, with paired-difference intervals against
E-GRPO.

Each (arm, learning rate, split, seed) run writes its curve to ``<out>/cache/learning_efficiency_<mode>/`` as it
finishes; a later call skips the cached runs, so an interrupted run resumes and ``--seeds`` adds seeds. The report
is built from what is cached, for every arm (``--arms`` and ``--learning_rates`` choose what a call trains, not what
it reports), and says how many seeds each arm has. Writes
``<out>/learning_efficiency_<mode>.{md,png,json}``.

``--model tiny`` replaces the testbed with the library's random-weight tiny FLUX pipeline and ColorReward
(prompt-independent: it checks the machinery, it does not compare algorithms).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import power  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
UPDATE_ROW_COST = 3
"""Forward-row equivalents of one update row (a forward and a backward, the backward about twice the FLOPs)."""

TARGET_GAIN = 0.02
"""The fixed gain target: held-out reward 0.02 above the arm's own start (the untrained pipeline's reward)."""

SHARED: dict = dict(
    num_inference_steps=16,
    num_generations=8,
    prompts_per_device=4,
    optimizer_step="active_step",
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
"""Hyperparameters every arm shares (the testbed's recipe, ``benchmarks.testbed.egrpo_config``, with larger update
micro-batches for speed, which do not change the gradient), except the learning rate, swept per arm. One choice
matters: ``optimizer_step="active_step"`` for every arm, one optimizer step per phase of the algorithm (E-GRPO: per
merge-plan step; the trajectory baselines: per trained step index), as in the official code of every one of them,
so that the PPO clip acts from the second phase of an iteration on. With ``"iteration"`` every ratio is exactly 1,
the clip never acts and the algorithms' update rules lose what distinguishes them."""

EVAL_SEED = 1000
"""Evaluation prompt ``i`` is always sampled from the noise of seed ``EVAL_SEED + i``."""

DPM_0_2: dict = dict(algorithm="e-grpo", completion_solver="dpmpp_2m", completion_steps_fraction=0.2)
"""E-GRPO with DPM-Solver++ 2M completions on 0.2 of the steps: the parent of the CPS and GRPO-Guard arms."""

ARMS: list[tuple[str, dict]] = [
    ("e-grpo", dict(algorithm="e-grpo")),
    ("flow-grpo", dict(algorithm="flow-grpo")),
    ("dance-grpo", dict(algorithm="dance-grpo")),
    ("mix-grpo", dict(algorithm="mix-grpo")),
    ("mix-grpo-flash", dict(algorithm="mix-grpo-flash")),
    # Issue 21, beyond the GRPO family: trained on forward-noised ODE samples, each at its official defaults.
    ("diffusion-nft", dict(algorithm="diffusion-nft")),
    ("awm", dict(algorithm="awm")),
    ("e-grpo dpm++2m 0.4", dict(algorithm="e-grpo", completion_solver="dpmpp_2m", completion_steps_fraction=0.4)),
    ("e-grpo granular 1,2", dict(algorithm="e-grpo", completion_granularities=[1, 2])),
    # The cheapest completion MixGRPO-Flash uses (0.2 of the steps): the full report's dpm++2m 0.4 arm reached the
    # target in 0.67 of the best baseline's iterations at 1.5 times its rows per iteration.
    ("e-grpo dpm++2m 0.2", DPM_0_2),
    # Issue 21: one change each on top of the best E-GRPO variant (dpm++2m 0.2: the largest final gain and the
    # smallest rows ratio of the full report), so that each is compared with it seed by seed. Under CPS the paper's
    # tau = 2.2 merges no step (docs/concepts.md); 3.5 merges steps 2-7 in pairs, as the SDE's plan at 2.2 merges
    # most of them.
    ("e-grpo dpm++2m 0.2 cps tau 3.5", dict(DPM_0_2, sde_type="cps", entropy_threshold=3.5)),
    ("e-grpo dpm++2m 0.2 guard", dict(DPM_0_2, ratio_normalization=True, step_reweighting=True)),
]
"""(label, EGRPOConfig fields): every arm of the benchmark. Labels starting with 'e-grpo' are E-GRPO's; the others
are the baselines. An arm the installed library cannot configure is left out with its reason."""

PAIRED_COMPARISONS: list[tuple[str, str]] = [
    # One change each on a parent arm: what the change is worth.
    ("e-grpo dpm++2m 0.2 cps tau 3.5", "e-grpo dpm++2m 0.2"),
    ("e-grpo dpm++2m 0.2 guard", "e-grpo dpm++2m 0.2"),
    # The claims of DiffusionNFT ("3-25x" fewer samples than Flow-GRPO) and AWM (faster than Flow-GRPO).
    ("diffusion-nft", "flow-grpo"),
    ("awm", "flow-grpo"),
    # The paper's E-GRPO against the cheaper-completion variant that learns.
    ("e-grpo dpm++2m 0.2", "e-grpo dpm++2m 0.4"),
]
"""(arm, reference) pairs the report compares seed by seed: the final gain at the equal row budget minus the
reference's, and the rows to reach the target over the reference's, each with a paired bootstrap interval."""


def is_egrpo(label: str) -> bool:
    """Whether an arm is one of E-GRPO's (the others are baselines)."""
    return label.startswith("e-grpo")


@dataclass(frozen=True)
class Mode:
    """How much to run.

    Attributes: the budget in total rows (or ``max_iterations`` with ``budget_by_iterations``), evaluation points
    along it, the learning rates swept, the sweep seeds, the report seeds, the number of evaluation prompts per
    split, config fields that replace :data:`SHARED` ones, and whether the budget is in iterations.
    """

    budget: int
    eval_points: int
    seeds: tuple[int, ...]
    num_eval_prompts: int
    learning_rates: tuple[float, ...] = ()
    sweep_seeds: tuple[int, ...] = ()
    max_iterations: int | None = None
    overrides: tuple[tuple[str, object], ...] = ()
    budget_by_iterations: bool = False


MODES: dict[str, Mode] = {
    "full": Mode(
        budget=60_000,
        eval_points=12,
        # 5e-4 added after E-GRPO, MixGRPO and MixGRPO-Flash scored best at 2.5e-4, the grid's edge.
        learning_rates=(3e-5, 6e-5, 1.25e-4, 2.5e-4, 5e-4),
        sweep_seeds=(100, 101, 102),
        seeds=tuple(range(20)),
        num_eval_prompts=48,
    ),
    "quick": Mode(
        budget=12_000,
        eval_points=6,
        learning_rates=(6e-5, 1.25e-4, 2.5e-4),
        sweep_seeds=(100,),
        seeds=(0, 1, 2),
        num_eval_prompts=16,
        overrides=(("prompts_per_device", 2),),
    ),
    "smoke": Mode(
        budget=10**9,
        eval_points=1,
        learning_rates=(5e-4, 1e-3),
        sweep_seeds=(100,),
        seeds=(0, 1),
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
    """What a run trains on: a fresh pipeline per run, the reward, the training prompts, the evaluation prompts of
    each split ('validation' and 'report', disjoint from each other and from training), config fields."""

    name: str
    build_pipeline: object
    reward: object
    train_prompts: list[str]
    eval_prompts: dict[str, list[str]]
    config_fields: dict = field(default_factory=dict)


def split_heldout(heldout: list[str], num_prompts: int) -> dict[str, list[str]]:
    """The testbed's held-out prompts as two disjoint evaluation splits of ``num_prompts`` each.

    The held-out prompts come in pairs (one composition in both orders, consecutive): compositions alternate
    between 'validation' and 'report', so no composition is in both; each split is then thinned evenly."""
    compositions = [heldout[i : i + 2] for i in range(0, len(heldout), 2)]
    splits = {
        "validation": [p for pair in compositions[0::2] for p in pair],
        "report": [p for pair in compositions[1::2] for p in pair],
    }
    for name, prompts in splits.items():
        if num_prompts > len(prompts):
            raise ValueError(f"{num_prompts} evaluation prompts asked, the {name} split has {len(prompts)}.")
        stride = len(prompts) // num_prompts
        splits[name] = prompts[::stride][:num_prompts]
    return splits


def testbed_backend(testbed_root: str, num_eval_prompts: int, checkpoint: str | None = None) -> Backend:
    """The testbed: its pretrained pipeline (the committed one, or the one saved in ``checkpoint``),
    ColourPurityReward (dense and graded, with headroom: see docs/testbed.md), its training prompts and its
    held-out prompts split into validation and report prompts."""
    testbed = import_testbed(testbed_root)
    from benchmarks.testbed.rewards import ColourPurityReward

    directory = checkpoint or testbed.CHECKPOINT_DIR
    return Backend(
        "testbed",
        lambda: testbed.load_testbed_pipeline(directory, build_if_missing=False),
        ColourPurityReward(),
        testbed.train_prompts(),
        split_heldout(testbed.heldout_prompts(), num_eval_prompts),
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
        {"validation": [TINY_PROMPTS[4]] * num_eval_prompts, "report": [TINY_PROMPTS[5]] * num_eval_prompts},
        dict(height=64, width=64, max_sequence_length=32),
    )


def make_backend(model: str, testbed_root: str, checkpoint: str | None, num_eval_prompts: int) -> Backend:
    """``model``: 'testbed' or 'tiny' (which ignores ``testbed_root`` and ``checkpoint``)."""
    if model == "testbed":
        return testbed_backend(testbed_root, num_eval_prompts, checkpoint)
    return tiny_backend(num_eval_prompts)


# ---------------------------------------------------------------------------------------------- arms


def unavailable_reason(fields: dict) -> str | None:
    """Why the installed library cannot run an arm (an unknown config field, or a value its validation refuses),
    or None if it can."""
    from trl_flow_egrpo import EGRPOConfig

    known = {f.name for f in dataclasses.fields(EGRPOConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        return f"EGRPOConfig has no field {', '.join(unknown)} (not in this version of the library)"
    with tempfile.TemporaryDirectory() as output_dir:
        try:
            EGRPOConfig(output_dir=output_dir, **{**SHARED, "learning_rate": 1e-4, **fields})
        except (ValueError, TypeError) as error:
            return f"EGRPOConfig refuses it: {str(error).splitlines()[0]}"
    return None


def available_arms(arms: list[tuple[str, dict]], only: list[str] | None = None) -> list[tuple[str, dict]]:
    """The arms the installed library can run (each one left out is printed with its reason), restricted to the
    labels in ``only`` if given."""
    if only:
        unknown = sorted(set(only) - {label for label, _ in arms})
        if unknown:
            raise SystemExit(f"Unknown arm(s) {unknown}: choose among {[label for label, _ in arms]}.")
        arms = [arm for arm in arms if arm[0] in only]
    kept = []
    for label, fields in arms:
        reason = unavailable_reason(fields)
        if reason:
            print(f"arm '{label}' is unavailable and left out: {reason}", flush=True)
        else:
            kept.append((label, fields))
    return kept


# ---------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    """One run: an arm at a learning rate and seed, evaluated on one split."""

    arm: str
    fields: tuple[tuple[str, object], ...]
    learning_rate: float
    seed: int
    split: str

    def config_fields(self) -> dict:
        """The EGRPOConfig fields this run sets on top of the shared ones."""
        return dict(self.fields, learning_rate=self.learning_rate, seed=self.seed)


def make_job(arm: str, fields: dict, learning_rate: float, seed: int, split: str) -> Job:
    """A hashable :class:`Job` (list values become tuples)."""
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))
    return Job(arm, frozen, learning_rate, seed, split)


def count_update_rows(trainer) -> list[int]:
    """Make ``trainer`` record the update rows of each iteration: ``len(rollouts.step_start)`` trained-step
    inputs, each forwarded (and back-propagated) once per inner epoch (the closed form the trainer's throughput
    metrics use). Returns the list it appends to. With a KL term the reference model forwards each of these rows
    once more, without gradient: :func:`reference_row_cost`."""
    rows: list[int] = []
    update = trainer.update

    def counting_update(rollouts, advantages):
        rows.append(len(rollouts.step_start) * trainer.config.num_inner_epochs)
        return update(rollouts, advantages)

    trainer.update = counting_update
    return rows


def reference_row_cost(fields: dict) -> int:
    """Reference-model forwards per update row of an arm with config ``fields``: 1 when its KL weight (``beta``,
    or its algorithm's default when ``beta`` is unset) is positive, else 0."""
    from trl_flow_egrpo.algorithms import ALGORITHMS

    beta = fields.get("beta")
    if beta is None:
        beta = ALGORITHMS[fields.get("algorithm", "e-grpo")].default_beta
    return int(beta > 0)


def evaluation_reward(trainer, reward, prompts: list[str]) -> float:
    """Mean reward of deterministic samples of ``prompts`` (prompt ``i`` from seed ``EVAL_SEED + i``)."""
    images = trainer.sample_images(prompts, [EVAL_SEED + i for i in range(len(prompts))])
    return float(reward(images, prompts).float().mean())


def evaluation_due(progress: float, next_point: int, scale: float, eval_points: int) -> bool:
    """Whether ``progress`` (rows or iterations) has reached evaluation point ``next_point`` of ``eval_points``
    equal fractions of ``scale``."""
    return progress >= next_point * scale / eval_points


def run_curve(backend: Backend, job: Job, mode: Mode) -> dict:
    """Train one job until its total rows pass ``mode.budget`` (or for ``mode.max_iterations``), evaluating on the
    job's split at 0 and each time the progress crosses one of ``mode.eval_points`` equal fractions of the budget
    (of ``mode.max_iterations`` with ``mode.budget_by_iterations``).

    Returns the run: its job, its curve (per evaluation: iteration, sampling rows, update rows, total, evaluation
    reward, the training reward of that iteration), wall and CPU seconds, merge plan and rows per iteration.
    """
    import torch

    from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer

    torch.set_num_threads(1)
    quiet_libraries()
    start, cpu_start = time.perf_counter(), time.process_time()
    prompts = backend.eval_prompts[job.split]
    with tempfile.TemporaryDirectory() as output_dir:
        values = {**SHARED, **dict(mode.overrides), **backend.config_fields, **job.config_fields()}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        config = EGRPOConfig(output_dir=output_dir, **values)
        trainer = EGRPOTrainer(config, backend.build_pipeline(), [backend.reward], backend.train_prompts)
        update_rows = count_update_rows(trainer)
        reference_cost = reference_row_cost(values)
        sampling, updates, iteration = 0, 0, 0
        points = [
            dict(
                iteration=0,
                sampling_rows=0,
                update_rows=0,
                reference_rows=0,
                total=0,
                train_reward=None,
                reward=evaluation_reward(trainer, backend.reward, prompts),
            )
        ]
        scale = mode.max_iterations if mode.budget_by_iterations else mode.budget
        next_point = 1
        while True:
            metrics = trainer.step()
            iteration += 1
            sampling += int(metrics["trajectory_evaluations"])
            updates += update_rows[-1]
            total = sampling + UPDATE_ROW_COST * updates + reference_cost * updates
            progress = iteration if mode.budget_by_iterations else total
            done = (not mode.budget_by_iterations and total >= mode.budget) or (
                mode.max_iterations is not None and iteration >= mode.max_iterations
            )
            if done or evaluation_due(progress, next_point, scale, mode.eval_points):
                while evaluation_due(progress, next_point, scale, mode.eval_points):
                    next_point += 1
                points.append(
                    dict(
                        iteration=iteration,
                        sampling_rows=sampling,
                        update_rows=updates,
                        reference_rows=reference_cost * updates,
                        total=total,
                        reward=evaluation_reward(trainer, backend.reward, prompts),
                        train_reward=metrics["reward/weighted_mean"],
                    )
                )
            if done:
                break
    return dict(
        arm=job.arm,
        fields=dict(job.fields),
        learning_rate=job.learning_rate,
        seed=job.seed,
        split=job.split,
        points=points,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        merge_plan=[(step.start, step.length) for step in trainer.merge_plan],
        sampling_rows_per_iteration=sampling / iteration,
        update_rows_per_iteration=updates / iteration,
        reference_rows_per_iteration=reference_cost * updates / iteration,
    )


def quiet_libraries() -> None:
    """No loading progress bars or per-run info logs: the runs' output is the tables."""
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("trl_flow_egrpo").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------- the job cache


def curve_settings(mode: Mode) -> dict:
    """The settings of ``mode`` a run's curve depends on: not which learning rates and seeds the mode lists (each
    run's own are in its job), so widening the sweep or adding seeds keeps the cached runs."""
    settings = dataclasses.asdict(mode)
    for name in ("learning_rates", "sweep_seeds", "seeds"):
        settings.pop(name)
    return settings


def fingerprint(job: Job, mode: Mode, backend_args: tuple) -> str:
    """A hash of everything a run's curve depends on (the job, the mode, the shared fields, the backend): a cached
    run is reused only if it matches."""
    model, _, checkpoint, _ = backend_args
    parts = [dataclasses.asdict(job), curve_settings(mode), SHARED, UPDATE_ROW_COST, EVAL_SEED, model, checkpoint]
    reference_cost = reference_row_cost({**SHARED, **dict(mode.overrides), **job.config_fields()})
    if reference_cost:  # counted since the KL arms' reference forwards were added: those runs' old totals are stale
        parts.append(dict(reference_row_cost=reference_cost))
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, job: Job) -> str:
    """Where one job's run is cached: ``<arm>__lr<lr>__<split>__s<seed>.json`` (arm label made file-safe)."""
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", job.arm)
    return os.path.join(cache_dir, f"{slug}__lr{job.learning_rate:g}__{job.split}__s{job.seed}.json")


def load_cached(cache_dir: str, job: Job, key: str) -> dict | None:
    """The cached run of ``job`` if there is one with fingerprint ``key`` (a stale one is ignored)."""
    path = cache_path(cache_dir, job)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        run = json.load(file)
    return run if run.get("fingerprint") == key else None


_WORKER_BACKEND: dict = {}


def _run_job(task: tuple) -> str:
    """Worker entry: build (once per process) the backend, run one job, write it to the cache atomically."""
    backend_args, job, mode, cache_dir, key = task
    if backend_args not in _WORKER_BACKEND:
        _WORKER_BACKEND.clear()
        _WORKER_BACKEND[backend_args] = make_backend(*backend_args)
    run = run_curve(_WORKER_BACKEND[backend_args], job, mode)
    run["fingerprint"] = key
    path = cache_path(cache_dir, job)
    with open(path + ".tmp", "w") as file:
        json.dump(run, file, indent=1)
    os.replace(path + ".tmp", path)
    return f"{job.arm} lr={job.learning_rate:g} {job.split} seed={job.seed}: {run['cpu_seconds']:.0f} CPU-s"


def run_jobs(backend_args: tuple, jobs: list[Job], mode: Mode, workers: int, cache_dir: str) -> list[dict]:
    """Every job's run: cached ones are read, the others run (``workers`` single-threaded processes in parallel,
    each run cached as it finishes). Results in input order."""
    os.makedirs(cache_dir, exist_ok=True)
    keys = [fingerprint(job, mode, backend_args) for job in jobs]
    missing = [
        (backend_args, job, mode, cache_dir, key)
        for job, key in zip(jobs, keys, strict=True)
        if load_cached(cache_dir, job, key) is None
    ]
    if missing:
        print(f"{len(jobs) - len(missing)} of {len(jobs)} runs cached; running {len(missing)}.", flush=True)
        if workers <= 1:
            for task in missing:
                print(_run_job(task), flush=True)
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for message in pool.imap_unordered(_run_job, missing, chunksize=1):
                    print(message, flush=True)
    return [load_cached(cache_dir, job, key) for job, key in zip(jobs, keys, strict=True)]


def cached_runs(backend_args: tuple, jobs: list[Job], mode: Mode, cache_dir: str) -> list[dict]:
    """The cached runs of ``jobs`` (those not cached are skipped): what ``--report_only`` reports."""
    runs = [load_cached(cache_dir, job, fingerprint(job, mode, backend_args)) for job in jobs]
    return [run for run in runs if run is not None]


# ---------------------------------------------------------------------------------------------- analysis


def sweep_score(run: dict) -> float:
    """How well a sweep run learned: its mean gain over the evaluation points after the start (the area under
    its gain curve, the points being equally spaced in rows): less noisy than the final gain alone."""
    gains = power.gains([p["reward"] for p in run["points"]])[1:]
    return power.mean(gains) if gains else 0.0


def lowest_gain(run: dict) -> float:
    """The lowest gain of a run at any of its evaluations: how far it fell (a collapse shows here first)."""
    return min(power.gains([p["reward"] for p in run["points"]]))


def choose_learning_rates(sweep: list[dict]) -> dict[str, dict]:
    """Per arm: every swept learning rate's mean score (:func:`sweep_score`), s.e. over sweep seeds and lowest
    gain of any seed at any evaluation (:func:`lowest_gain`), and the best learning rate (largest mean score)."""
    runs_by: dict[str, dict] = {}
    for run in sweep:
        runs_by.setdefault(run["arm"], {}).setdefault(run["learning_rate"], []).append(run)
    result = {}
    for arm, by_lr in runs_by.items():
        scores = {}
        for lr, runs in by_lr.items():
            values = [sweep_score(run) for run in runs]
            scores[lr] = dict(
                mean=power.mean(values),
                se=power.standard_error(values),
                seeds=len(values),
                lowest=min(lowest_gain(run) for run in runs),
            )
        result[arm] = dict(scores=scores, best=max(scores, key=lambda lr: scores[lr]["mean"]))
    return result


def best_baseline_ratio(egrpo: str, baselines: list[str], target: float, x: str = "total"):
    """The statistic ``rows_to_reach(egrpo) / min over baselines of rows_to_reach`` (the best baseline chosen
    within each resample, so the interval includes the uncertainty of which baseline is best)."""

    def statistic(runs_by_arm: dict[str, list[dict]]) -> float:
        best = min(power.rows_to_reach(runs_by_arm[b], target, x) for b in baselines)
        return power.ratio(power.rows_to_reach(runs_by_arm[egrpo], target, x), best)

    return statistic


def final_gain_lead(egrpo: str, baselines: list[str]):
    """The statistic ``mean final gain(egrpo) - max over baselines of mean final gain``: E-GRPO's lead at the equal
    row budget over the best baseline (chosen again within each resample, like :func:`best_baseline_ratio`)."""

    def statistic(runs_by_arm: dict[str, list[dict]]) -> float:
        best = max(power.mean([power.final_gain(run) for run in runs_by_arm[b]]) for b in baselines)
        return power.mean([power.final_gain(run) for run in runs_by_arm[egrpo]]) - best

    return statistic


def common_iteration(runs_by_arm: dict[str, list[dict]]) -> int:
    """The last iteration every run of every arm evaluated at or beyond (the per-iteration comparison's x)."""
    return min(run["points"][-1]["iteration"] for runs in runs_by_arm.values() for run in runs)


def summarize(runs_by_arm: dict[str, list[dict]], target: float = TARGET_GAIN, num_resamples: int = 2000) -> dict:
    """The report's numbers from the report runs of each arm (at its chosen learning rate).

    Per arm: seeds, rows and iterations per run, the start reward, the final gain (± s.e.), rows and iterations to
    reach ``target`` (seed-mean curve). Then, for each E-GRPO arm, its ratio of rows to reach the target to the
    best baseline's with a paired bootstrap interval, and its final gain minus the best baseline's; the
    per-iteration ordering: each arm's gain at the common iteration with the paired difference to 'e-grpo' and its
    interval; and for each pair of :data:`PAIRED_COMPARISONS`, the paired final-gain difference and rows ratio of
    the arm to its reference.
    """
    rows = {}
    for arm, runs in runs_by_arm.items():
        finals = [power.final_gain(run) for run in runs]
        rows[arm] = dict(
            seeds=len(runs),
            initial_reward=power.mean([run["points"][0]["reward"] for run in runs]),
            final_gain=power.mean(finals),
            final_gain_se=power.standard_error(finals),
            final_total=power.mean([run["points"][-1]["total"] for run in runs]),
            iterations=max(run["points"][-1]["iteration"] for run in runs),
            rows_to_reach=power.rows_to_reach(runs, target, "total"),
            iterations_to_reach=power.rows_to_reach(runs, target, "iteration"),
            lowest_gain=min(lowest_gain(run) for run in runs),
            sampling_rows_per_iteration=power.mean([run["sampling_rows_per_iteration"] for run in runs]),
            update_rows_per_iteration=power.mean([run["update_rows_per_iteration"] for run in runs]),
            cpu_seconds=power.mean([run.get("cpu_seconds", run["seconds"]) for run in runs]),
        )
    baselines = [arm for arm in runs_by_arm if not is_egrpo(arm)]
    ratios = {}
    if baselines:
        for arm in (a for a in runs_by_arm if is_egrpo(a)):
            arms = {a: runs_by_arm[a] for a in [arm, *baselines]}
            for x in ("total", "iteration"):
                ratios.setdefault(arm, {})[x] = power.paired_bootstrap(
                    arms, best_baseline_ratio(arm, baselines, target, x), num_resamples
                )
            ratios[arm]["final_gain_lead"] = power.paired_bootstrap(
                arms, final_gain_lead(arm, baselines), num_resamples
            )
    comparisons = []
    for arm, reference in PAIRED_COMPARISONS:
        if arm in runs_by_arm and reference in runs_by_arm:
            pair = {arm: runs_by_arm[arm], reference: runs_by_arm[reference]}
            comparisons.append(
                dict(
                    arm=arm,
                    reference=reference,
                    final_gain_difference=power.paired_difference(
                        runs_by_arm[arm], runs_by_arm[reference], power.final_gain, num_resamples
                    ),
                    rows_ratio=power.paired_bootstrap(
                        pair, power.reach_ratio_statistic(arm, reference, target, "total"), num_resamples
                    ),
                )
            )
    ordering = {}
    if "e-grpo" in runs_by_arm and len(runs_by_arm) > 1:
        at = common_iteration(runs_by_arm)
        ordering = dict(iteration=at, arms={})
        for arm, runs in runs_by_arm.items():
            per_seed = [power.gain_at(run, at) for run in runs]
            entry = dict(gain=power.mean(per_seed), se=power.standard_error(per_seed))
            if arm != "e-grpo":
                entry["difference_to_e_grpo"] = power.paired_difference(
                    runs, runs_by_arm["e-grpo"], lambda run: power.gain_at(run, at), num_resamples
                )
            ordering["arms"][arm] = entry
    return dict(
        target_gain=target, rows=rows, ratios=ratios, ordering=ordering, comparisons=comparisons, baselines=baselines
    )


# ---------------------------------------------------------------------------------------------- report


def _number(value: float | None, digits: int = 0) -> str:
    """A count or ratio for the tables: 'not reached' for inf (or None), 'undefined' for NaN."""
    if value is None or math.isinf(value):
        return "not reached"
    return "undefined" if math.isnan(value) else f"{value:,.{digits}f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _signed_interval(result: dict) -> str:
    return f"[{result['low']:+.4f}, {result['high']:+.4f}]"


def _interval(result: dict, digits: int = 2) -> str:
    low, high = result["low"], result["high"]
    if math.isnan(low):
        return "undefined"
    return f"[{low:.{digits}f}, {'inf' if math.isinf(high) else f'{high:.{digits}f}'}]"


def shared_settings(extra: dict | None = None) -> str:
    """The shared hyperparameters of a report."""
    values = {**SHARED, **(extra or {})}
    return (
        "Shared hyperparameters: "
        + ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("mixed_precision", "save_steps", "disable_tqdm"))
        + "."
    )


def markdown_report(
    summary: dict | None, choices: dict, mode_name: str, mode: Mode, backend: str, command: str, seconds: float
) -> str:
    """The sweep table, the report table, the ratios and the per-iteration ordering, with their settings
    (``summary`` None: the sweep table only)."""
    target = TARGET_GAIN
    overrides = "".join(f" This mode sets {name}={value}." for name, value in mode.overrides)
    lines = [
        f"# Learning efficiency ({mode_name} mode, {backend})",
        "",
        f"Command: `{command}`  ",
        f"Wall time of this call: {seconds:.0f} s. Budget: {mode.budget:,} total rows (total = sampling rows + "
        f"{UPDATE_ROW_COST} x update rows + one reference forward per update row for arms with a KL term), "
        f"{mode.eval_points} evaluation points. Evaluation: {mode.num_eval_prompts} "
        "prompts per split, deterministic ODE samples from fixed seeds; the learning rate is chosen on the "
        "validation split, the results below are on the report split (both held-out compositions, disjoint).  ",
        shared_settings() + overrides,
        "",
        "## Learning-rate sweep (validation split; score: mean gain over the evaluation points)",
        "",
        "| arm | " + " | ".join(f"lr {lr:g}" for lr in mode.learning_rates) + " | chosen |",
        "|---|" + "---|" * len(mode.learning_rates) + "---|",
    ]
    for arm, choice in choices.items():
        cells = []
        for lr in mode.learning_rates:
            score = choice["scores"].get(lr)
            cells.append("-" if score is None else f"{score['mean']:+.4f} ± {score['se']:.4f} ({score['seeds']})")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {choice['best']:g} |")
    lines += [
        "",
        "Stability: the lowest validation gain of any sweep seed at any evaluation point (a run that collapses, "
        "or swings, shows here).",
        "",
        "| arm | " + " | ".join(f"lr {lr:g}" for lr in mode.learning_rates) + " |",
        "|---|" + "---|" * len(mode.learning_rates),
    ]
    for arm, choice in choices.items():
        cells = [_signed(choice["scores"].get(lr, {}).get("lowest")) for lr in mode.learning_rates]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if summary is None:
        return "\n".join([*lines, "", "No report runs are cached yet (run without --phase sweep)."]) + "\n"
    lines += [
        "",
        f"## Report split, each arm at its chosen learning rate (target: gain +{target} over the start)",
        "",
        "| arm | lr | seeds | sampling rows / it | update rows / it | iterations | reward at 0 "
        "| final gain (± s.e.) | lowest gain of any seed | rows to reach target | iterations to reach target "
        "| CPU-s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary["rows"].items():
        lines.append(
            f"| {arm} | {choices[arm]['best']:g} | {row['seeds']} | {row['sampling_rows_per_iteration']:,.0f} "
            f"| {row['update_rows_per_iteration']:,.0f} | {row['iterations']} | {row['initial_reward']:.4f} "
            f"| {row['final_gain']:+.4f} ± {row['final_gain_se']:.4f} | {row['lowest_gain']:+.4f} "
            f"| {_number(row['rows_to_reach'])} "
            f"| {_number(row['iterations_to_reach'], 1)} | {row['cpu_seconds']:.0f} |"
        )
    if summary["ratios"]:
        lines += [
            "",
            "## E-GRPO / best baseline, rows (and iterations) to reach the target",
            "",
            "Seed-mean gain curves; the best baseline is the one that reaches the target first, chosen again in each "
            "of the paired bootstrap resamples of seeds (95% percentile interval; inf: E-GRPO's curve does not "
            "reach the target within the budget in that share of resamples; 0: no baseline's does while E-GRPO's does; "
            "undefined: neither reaches it). "
            "Goal: the interval of the rows ratio below 0.5. Last columns: the arm's final gain (at the equal row "
            "budget) minus the best baseline's, the baseline with the largest final gain in each resample.",
            "",
            "| E-GRPO arm | rows ratio | 95% interval | below 0.5? | iterations ratio | 95% interval "
            "| final-gain lead | 95% interval | seeds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, by_axis in summary["ratios"].items():
            rows_ratio, iteration_ratio, lead = by_axis["total"], by_axis["iteration"], by_axis["final_gain_lead"]
            goal = "yes" if rows_ratio["high"] < 0.5 else "no"
            lines.append(
                f"| {arm} | {_number(rows_ratio['estimate'], 2)} | {_interval(rows_ratio)} | {goal} "
                f"| {_number(iteration_ratio['estimate'], 2)} | {_interval(iteration_ratio)} "
                f"| {lead['estimate']:+.4f} | {_signed_interval(lead)} | {rows_ratio['seeds']} |"
            )
    if summary["ordering"]:
        ordering = summary["ordering"]
        lines += [
            "",
            f"## Per-iteration ordering: gain at iteration {ordering['iteration']} (the last all runs reached)",
            "",
            "| arm | gain (± s.e.) | paired difference to e-grpo | 95% interval | verdict 'arm > e-grpo' |",
            "|---|---|---|---|---|",
        ]
        for arm, entry in sorted(ordering["arms"].items(), key=lambda item: -item[1]["gain"]):
            difference = entry.get("difference_to_e_grpo")
            if difference is None:
                lines.append(f"| {arm} | {entry['gain']:+.4f} ± {entry['se']:.4f} | - | - | - |")
            else:
                lines.append(
                    f"| {arm} | {entry['gain']:+.4f} ± {entry['se']:.4f} | {difference['estimate']:+.4f} "
                    f"| {_signed_interval(difference)} | {power.verdict(difference)} |"
                )
    if summary.get("comparisons"):
        lines += [
            "",
            "## Paired comparisons (one change on a parent arm; a method's claim against its baseline)",
            "",
            "Final gain at the equal row budget, minus the reference's (95% paired bootstrap interval), and rows to "
            "reach the target over the reference's (inf: the arm's mean curve does not reach it in that share of "
            "resamples; 0: the reference's does not while the arm's does; undefined: neither does).",
            "",
            "| arm | reference | final-gain difference | 95% interval | verdict 'arm > reference' | rows ratio "
            "| 95% interval | seeds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for comparison in summary["comparisons"]:
            difference, rows_ratio = comparison["final_gain_difference"], comparison["rows_ratio"]
            lines.append(
                f"| {comparison['arm']} | {comparison['reference']} | {difference['estimate']:+.4f} "
                f"| {_signed_interval(difference)} | {power.verdict(difference)} "
                f"| {_number(rows_ratio['estimate'], 2)} | {_interval(rows_ratio)} | {difference['seeds']} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs_by_arm: dict[str, list[dict]], target: float, path: str, title: str) -> None:
    """Seed-mean gain (± s.e. band) against total rows and against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, x, label in (
        (axes[0], "total", f"total rows (sampling + {UPDATE_ROW_COST} x update + KL reference)"),
        (axes[1], "iteration", "iteration"),
    ):
        for arm, runs in runs_by_arm.items():
            curves = [power.gains([p["reward"] for p in run["points"]]) for run in runs]
            means = power.mean_curve(curves)
            errors = [power.standard_error([c[i] for c in curves]) for i in range(len(means))]
            xs = power.mean_curve([[p[x] for p in run["points"]] for run in runs])
            style = dict(linewidth=2.2) if is_egrpo(arm) else dict(linewidth=1.2, linestyle="--")
            axis.plot(xs, means, marker="o", markersize=3, label=f"{arm} ({len(runs)} seeds)", **style)
            axis.fill_between(
                xs,
                [m - e for m, e in zip(means, errors, strict=True)],
                [m + e for m, e in zip(means, errors, strict=True)],
                alpha=0.15,
            )
        axis.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target +{target}")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("report-split reward gain over the start")
    axes[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_seeds(runs_by_arm: dict[str, list[dict]], path: str, title: str) -> None:
    """One panel per arm: every seed's gain curve against total rows (thin) and their mean (thick), so that a
    seed that collapses or swings is seen, not averaged away."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = math.ceil(len(runs_by_arm) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), sharex=True, sharey=True, squeeze=False)
    for axis, (arm, runs) in zip(axes.flat, runs_by_arm.items(), strict=False):  # spare panels stay empty
        curves = [power.gains([p["reward"] for p in run["points"]]) for run in runs]
        for run, curve in zip(runs, curves, strict=True):
            axis.plot([p["total"] for p in run["points"]], curve, linewidth=0.6, alpha=0.5)
        xs = power.mean_curve([[p["total"] for p in run["points"]] for run in runs])
        axis.plot(xs, power.mean_curve(curves), color="black", linewidth=2)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_title(f"{arm} ({len(runs)} seeds)", fontsize=9)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(runs_by_arm) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("total rows")
    for axis in axes[:, 0]:
        axis.set_ylabel("gain over the start")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None, description: str = __doc__, with_learning_rate: bool = False):
    """The command line of both benchmark scripts (``with_learning_rate``: the ablations' ``--learning_rate``;
    the learning-efficiency benchmark sweeps it instead)."""
    parser = argparse.ArgumentParser(
        description=description.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="The quick mode (under 15 minutes on 2 idle cores).")
    group.add_argument("--smoke", action="store_true", help="2 iterations per run: checks that the script works.")
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
        "--checkpoint", default=None, help="A testbed pipeline saved elsewhere (default: the committed one)."
    )
    parser.add_argument(
        "--arms",
        default=None,
        help="Comma-separated arm labels to train (default: all available).",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="Report seeds 0..N-1 (default: the mode's); more adds to the cache."
    )
    parser.add_argument(
        "--phase",
        choices=["all", "sweep", "report"],
        default="all",
        help="Run only the sweep, or only the report runs (the sweep must be cached), or both (default).",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="Train nothing: build the report from the cached runs."
    )
    if not with_learning_rate:
        parser.add_argument(
            "--learning_rates",
            default=None,
            help="Comma-separated learning rates this call sweeps instead of the mode's grid (e.g. only the parent's "
            "best and its neighbours for an arm that changes one thing on a tuned arm, or one more rate at the grid's "
            "edge). The report chooses each arm's rate among all its cached sweep rates, of the grid and these.",
        )
    else:
        parser.add_argument(
            "--learning_rate",
            type=float,
            default=None,
            help="The learning rate of every run (default: E-GRPO's chosen by the learning-efficiency benchmark).",
        )
    parser.add_argument("--workers", type=int, default=2, help="Runs in parallel (one thread each).")
    parser.add_argument("--out", default=RESULTS_DIR, help="Where the report, plot, JSON and cache/ are written.")
    return parser.parse_args(argv)


def mode_of(args, modes: dict[str, Mode]) -> tuple[str, Mode]:
    """The mode the flags select: ``(name, mode)``."""
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    return name, modes[name]


def report_seeds(args, mode: Mode) -> tuple[int, ...]:
    """The report seeds: ``0..--seeds-1`` if given, else the mode's."""
    return tuple(range(args.seeds)) if args.seeds else mode.seeds


def backend_arguments(args, mode: Mode) -> tuple:
    """The arguments of :func:`make_backend` (a tuple: each worker process builds the backend from them)."""
    checkpoint = os.path.abspath(args.checkpoint) if args.checkpoint else None
    return args.model, os.path.abspath(args.testbed_root), checkpoint, mode.num_eval_prompts


def group_by_arm(runs: list[dict], arms: list[tuple[str, dict]]) -> dict[str, list[dict]]:
    """Runs grouped by arm label, in the order of ``arms`` (arms without runs left out)."""
    grouped = {label: [run for run in runs if run["arm"] == label] for label, _ in arms}
    return {label: runs for label, runs in grouped.items() if runs}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = ("python benchmarks/learning_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    mode_name, mode = mode_of(args, MODES)
    arms = available_arms(ARMS)
    to_train = available_arms(arms, args.arms.split(",")) if args.arms else arms
    grid = tuple(float(value) for value in args.learning_rates.split(",")) if args.learning_rates else None
    # The rates this call trains; the report chooses among every rate of the mode's grid and these, as cached.
    mode_trained = dataclasses.replace(mode, learning_rates=grid) if grid else mode
    mode = dataclasses.replace(mode, learning_rates=tuple(sorted({*mode.learning_rates, *(grid or ())})))
    backend_args = backend_arguments(args, mode)
    cache_dir = os.path.join(args.out, "cache", f"learning_efficiency_{mode_name}_{args.model}")
    start = time.perf_counter()
    train = not args.report_only

    def sweep_jobs(arms: list[tuple[str, dict]], mode: Mode) -> list[Job]:
        return [
            make_job(label, fields, lr, seed, "validation")
            for label, fields in arms
            for lr in mode.learning_rates
            for seed in mode.sweep_seeds
        ]

    def report_jobs(arms: list[tuple[str, dict]], choices: dict) -> list[Job]:
        return [
            make_job(label, fields, choices[label]["best"], seed, "report")
            for seed in report_seeds(args, mode)  # seed-major: a run cut short has every arm at its first seeds
            for label, fields in arms
            if label in choices
        ]

    if train and args.phase != "report":
        run_jobs(backend_args, sweep_jobs(to_train, mode_trained), mode, args.workers, cache_dir)
    # The report covers every arm with cached runs, not only those this call trains (--arms, --learning_rates).
    sweep = cached_runs(backend_args, sweep_jobs(arms, mode), mode, cache_dir)
    choices = choose_learning_rates(sweep)
    missing = [label for label, _ in arms if label not in choices]
    if missing:
        print(f"No cached sweep runs of {missing} yet: they are left out (run --phase sweep).", flush=True)
    if train and args.phase != "sweep":
        run_jobs(backend_args, report_jobs(to_train, choices), mode, args.workers, cache_dir)
    report_runs = cached_runs(backend_args, report_jobs(arms, choices), mode, cache_dir)
    arms = [arm for arm in arms if arm[0] in choices]
    seconds = time.perf_counter() - start
    runs_by_arm = group_by_arm(report_runs, arms)
    summary = summarize(runs_by_arm) if runs_by_arm else None  # None: the sweep only, so far
    report = markdown_report(summary, choices, mode_name, mode, args.model, command, seconds)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"learning_efficiency_{mode_name}")
    with open(stem + ".md", "w") as file:
        file.write(report)
    with open(stem + ".json", "w") as file:
        json.dump(
            dict(
                mode=mode_name,
                model=args.model,
                command=command,
                seconds=seconds,
                shared=SHARED,
                learning_rates={arm: choice["best"] for arm, choice in choices.items()},
                sweep={arm: {f"{lr:g}": s for lr, s in c["scores"].items()} for arm, c in choices.items()},
                summary=summary,
                cpu_seconds_per_run={
                    arm: power.mean([run.get("cpu_seconds", run["seconds"]) for run in runs])
                    for arm, runs in group_by_arm(sweep + report_runs, arms).items()
                },
            ),
            file,
            indent=1,
        )
    if runs_by_arm:
        seeds = sorted({len(runs) for runs in runs_by_arm.values()})
        title = f"Learning efficiency on the {args.model} ({mode_name}, {seeds} seeds)"
        plot(runs_by_arm, TARGET_GAIN, stem + ".png", title)
        plot_seeds(runs_by_arm, stem + "_seeds.png", f"Every report seed's curve ({mode_name}, {args.model})")
    print(report)
    print(f"wall time: {seconds:.1f} s; wrote {stem}.md, .png, .json")
    return dict(summary=summary, choices=choices)


if __name__ == "__main__":
    main()
