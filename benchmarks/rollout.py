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
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trl_flow_egrpo import plan_merges  # noqa: E402
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
        return adapter.velocity(model, latents, timesteps[index].view(1), select_rows(conditioning, torch.tensor([prompt])))

    for prompt in range(len(noise)):
        anchor = [noise[prompt:prompt + 1]]
        for index in range(schedule.num_steps):
            anchor.append(euler_step(anchor[-1], velocity(anchor[-1], index, prompt), sigmas, index))
        for step in plan:
            for _ in range(num_generations):
                x = anchor[step.start]
                x = sde_step(x, velocity(x, step.start, prompt), sigmas, step.start, step.length, 0.7,
                             generator=generator).sample
                for index in range(step.end, schedule.num_steps):
                    x = euler_step(x, velocity(x, index, prompt), sigmas, index)
                images.append(adapter.decode(x))
        images.append(adapter.decode(anchor[-1]))
    return images, calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64, help="rows per transformer call (batched engine)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build_tiny_flux_pipeline()
    adapter = get_adapter(pipe, height=args.size, width=args.size, max_sequence_length=32)
    schedule = adapter.schedule(16, 3.0)
    plan = plan_merges(schedule.sigmas, 0.7, 2.2, 8)
    conditioning = adapter.encode_prompts([f"prompt number {i}" for i in range(args.prompts)])
    noise = adapter.initial_noise(args.prompts, torch.Generator().manual_seed(0))

    def run_batched():
        return sample_rollouts(adapter, pipe.transformer, schedule, plan, conditioning, noise, args.generations,
                               0.7, torch.Generator().manual_seed(1), args.batch_size)

    def run_single():
        return one_at_a_time(adapter, pipe.transformer, schedule, plan, conditioning, noise, args.generations,
                             torch.Generator().manual_seed(1))

    batched, (single_images, single_calls) = run_batched(), run_single()  # warm-up and equivalence check
    # Both draw the branch noise in a different order, so compare the deterministic anchors exactly and the
    # branch images statistically (same distribution, same count).
    torch.testing.assert_close(batched.anchor_images[0], single_images[len(plan) * args.generations][0],
                               rtol=1e-4, atol=1e-4)
    assert batched.images.flatten(0, 1).shape[0] + len(batched.anchor_images) == len(single_images)

    def best_time(fn):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    batched_seconds, single_seconds = best_time(run_batched), best_time(run_single)
    rollouts = args.prompts * len(plan) * args.generations
    print(f"tiny FLUX {args.size}x{args.size}, {args.prompts} prompts x {len(plan)} merged steps x G={args.generations} "
          f"= {rollouts} rollouts (+{args.prompts} anchors), torch threads {torch.get_num_threads()}")
    print(f"one at a time : {single_seconds:8.3f} s   {single_calls} transformer calls, {single_calls} rows")
    print(f"batched engine: {batched_seconds:8.3f} s   {batched.num_model_calls} transformer calls, "
          f"{batched.num_evaluations} rows")
    print(f"speed-up      : {single_seconds / batched_seconds:8.2f}x")


if __name__ == "__main__":
    main()
