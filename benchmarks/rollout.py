"""Batched rollout engine vs one-rollout-at-a-time sampling of the same work, side by side.

    python benchmarks/rollout.py [--prompts 2] [--generations 8] [--size 64] [--repeats 2] [--threads 1]

Both sample, for every prompt, the anchor ODE trajectory and G branches per merged step of the paper's
plan (T=16, shift 3, a=0.7, tau=2.2, 8 active steps) on the embedded tiny FLUX pipeline, then decode.
"one at a time" is the straightforward loop of research code: one transformer call per rollout per
step (batch 1), the branch step re-evaluating the velocity at the anchor latent. The batched engine
(`trl_flow_egrpo.rollout.sample_rollouts`) advances all trajectories in lock step, one call per tick with
per-sample timesteps, and reuses the anchor's velocity for the branch step. Before the times are
compared, the anchors (deterministic) are checked to be identical in both, and the number of rollouts to
match; the branches draw their noise in a different order, so they are the same distribution, not the same
samples.

Then the speed switches (docs/performance.md), side by side on the batched engine with the trainer's LoRA
(rank 8) under bf16 autocast, the trainer's sampling numerics: peft's LoRA input cast on and off, and the
transformer eager and regionally compiled (``torch.compile`` of its repeated blocks). Each variant samples
the same noise; the largest difference of its final latents from the eager, cast-on variant is printed
with its time. ``--json PATH`` also writes every number to a file.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trl_flow_egrpo import plan_merges  # noqa: E402
from trl_flow_egrpo.acceleration import compile_repeated_blocks, set_lora_input_cast  # noqa: E402
from trl_flow_egrpo.adapters import get_adapter, select_rows  # noqa: E402
from trl_flow_egrpo.rollout import sample_rollouts  # noqa: E402
from trl_flow_egrpo.sde import euler_step, sde_step  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline  # noqa: E402


@torch.no_grad()
def one_at_a_time(adapter, model, schedule, plan, conditioning, noise, num_generations, generator):
    """Reference loop: every rollout alone, every step its own batch-1 transformer call."""
    sigmas, timesteps = schedule.sigmas, schedule.timesteps
    calls, images = 0, []

    def velocity(latents, index, prompt):
        nonlocal calls
        calls += 1
        return adapter.velocity(
            model, latents, timesteps[index].view(1), select_rows(conditioning, torch.tensor([prompt]))
        )

    for prompt in range(len(noise)):
        anchor = [noise[prompt : prompt + 1]]
        for index in range(schedule.num_steps):
            anchor.append(euler_step(anchor[-1], velocity(anchor[-1], index, prompt), sigmas, index))
        for step in plan:
            for _ in range(num_generations):
                x = anchor[step.start]
                x = sde_step(
                    x, velocity(x, step.start, prompt), sigmas, step.start, step.length, 0.7, generator=generator
                ).sample
                for index in range(step.end, schedule.num_steps):
                    x = euler_step(x, velocity(x, index, prompt), sigmas, index)
                images.append(adapter.decode(x))
        images.append(adapter.decode(anchor[-1]))
    return images, calls


def best_times(functions, repeats: int) -> list[float]:
    """The best wall time of each of ``functions`` over ``repeats`` rounds, the functions interleaved within
    each round, so that a change of the machine's load during the run hits all of them alike."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, fn_times in zip(functions, times, strict=True):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [min(fn_times) for fn_times in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64, help="rows per transformer call (batched engine)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip_switches", action="store_true", help="only batched vs one at a time")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build_tiny_flux_pipeline()
    adapter = get_adapter(pipe, height=args.size, width=args.size, max_sequence_length=32)
    schedule = adapter.schedule(16, 3.0)
    plan = plan_merges(schedule.sigmas, 0.7, 2.2, 8)
    conditioning = adapter.encode_prompts([f"prompt number {i}" for i in range(args.prompts)])
    noise = adapter.initial_noise(args.prompts, torch.Generator().manual_seed(0))

    def run_batched():
        return sample_rollouts(
            adapter,
            pipe.transformer,
            schedule,
            plan,
            conditioning,
            noise,
            args.generations,
            0.7,
            torch.Generator().manual_seed(1),
            args.batch_size,
        )

    def run_single():
        return one_at_a_time(
            adapter,
            pipe.transformer,
            schedule,
            plan,
            conditioning,
            noise,
            args.generations,
            torch.Generator().manual_seed(1),
        )

    batched, (single_images, single_calls) = run_batched(), run_single()  # warm-up and equivalence check
    # Both draw the branch noise in a different order, so compare the deterministic anchors exactly and the
    # branch images statistically (same distribution, same count).
    torch.testing.assert_close(
        batched.anchor_images[0], single_images[len(plan) * args.generations][0], rtol=1e-4, atol=1e-4
    )
    assert batched.images.flatten(0, 1).shape[0] + len(batched.anchor_images) == len(single_images)

    batched_seconds, single_seconds = best_times([run_batched, run_single], args.repeats)
    rollouts = args.prompts * len(plan) * args.generations
    print(
        f"tiny FLUX {args.size}x{args.size}, {args.prompts} prompts x {len(plan)} merged steps x G={args.generations} "
        f"= {rollouts} rollouts (+{args.prompts} anchors), torch threads {torch.get_num_threads()}"
    )
    print(f"one at a time : {single_seconds:8.3f} s   {single_calls} transformer calls, {single_calls} rows")
    print(
        f"batched engine: {batched_seconds:8.3f} s   {batched.num_model_calls} transformer calls, "
        f"{batched.num_evaluations} rows"
    )
    print(f"speed-up      : {single_seconds / batched_seconds:8.2f}x")
    results = dict(
        size=args.size,
        prompts=args.prompts,
        generations=args.generations,
        rollouts=rollouts,
        threads=torch.get_num_threads(),
        one_at_a_time_s=single_seconds,
        batched_s=batched_seconds,
        batched_speedup=single_seconds / batched_seconds,
        rows=batched.num_evaluations,
    )
    if not args.skip_switches:
        results["switches"] = compare_switches(args, schedule, plan, noise)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def lora_pipeline(size: int):
    """The tiny FLUX pipeline (seeded weights) with a seeded rank-8 LoRA on the adapter's target modules."""
    from peft import LoraConfig

    pipe = build_tiny_flux_pipeline(seed=0)
    adapter = get_adapter(pipe, height=size, width=size, max_sequence_length=32)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(
        LoraConfig(
            r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=list(adapter.default_lora_target_modules)
        )
    )
    return pipe, adapter


def compare_switches(args, schedule, plan, noise) -> list[dict]:
    """Time the batched engine under bf16 autocast with the LoRA input cast on / off, eager and compiled.

    Returns one dict per variant: seconds (best of ``--repeats``, the variants interleaved), rows per second,
    and the largest absolute difference of its images from the eager cast-on variant's (the same noise, the
    same generator).
    """
    eager_pipe, adapter = lora_pipeline(args.size)
    compiled_pipe, compiled_adapter = lora_pipeline(args.size)
    start = time.perf_counter()
    compile_repeated_blocks(compiled_pipe.transformer)
    conditioning = adapter.encode_prompts([f"prompt number {i}" for i in range(args.prompts)])
    variants = [
        ("eager, LoRA input cast on", eager_pipe, adapter, True),
        ("eager, LoRA input cast off", eager_pipe, adapter, False),
        ("compiled, LoRA input cast on", compiled_pipe, compiled_adapter, True),
        ("compiled, LoRA input cast off", compiled_pipe, compiled_adapter, False),
    ]

    def runner(pipe, variant_adapter, cast):
        def run():
            set_lora_input_cast(pipe.transformer, cast)
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                return sample_rollouts(
                    variant_adapter,
                    pipe.transformer,
                    schedule,
                    plan,
                    conditioning,
                    noise,
                    args.generations,
                    0.7,
                    torch.Generator().manual_seed(1),
                    args.batch_size,
                )

        return run

    runs = [runner(pipe, variant_adapter, cast) for _, pipe, variant_adapter, cast in variants]
    outputs = [run() for run in runs]  # warm-up: compiles both cast settings (each is a guard of the graph)
    compile_seconds = time.perf_counter() - start
    seconds = best_times(runs, args.repeats)
    print(
        f"\nspeed switches: batched engine, LoRA r=8, bf16 autocast, {args.batch_size} rows per call "
        f"(compilation and warm-up took {compile_seconds:.1f} s, not counted)"
    )
    results = []
    for (name, *_), output, variant_seconds in zip(variants, outputs, seconds, strict=True):
        difference = (output.images.float() - outputs[0].images.float()).abs().max().item()
        results.append(
            dict(
                variant=name,
                seconds=variant_seconds,
                rows_per_s=output.num_evaluations / variant_seconds,
                max_abs_image_difference=difference,
                compile_seconds=compile_seconds,
            )
        )
        print(
            f"{name:30s}: {variant_seconds:8.3f} s   {output.num_evaluations / variant_seconds:8.1f} rows/s   "
            f"max |image - eager cast-on image| {difference:.1e}"
        )
    eager, compiled = results[1]["seconds"], results[3]["seconds"]
    print(f"cast off vs on (eager)      : {results[0]['seconds'] / eager:8.2f}x")
    print(f"cast off vs on (compiled)   : {results[2]['seconds'] / compiled:8.2f}x")
    print(f"compiled vs eager (cast off): {eager / compiled:8.2f}x")
    return results


if __name__ == "__main__":
    main()
