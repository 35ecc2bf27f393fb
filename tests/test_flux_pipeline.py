"""FLUX.1 specifics of the rollout engine: branches leave the anchor with one stochastic step and rejoin the ODE;
an unsupported pipeline is a clear error. The checks every family shares (the anchor is ``FluxPipeline.__call__``'s
sample, on-policy ratios, LoRA round trip, ...) are in ``test_conformance.py``."""

import pytest
import torch

from trl_flow_egrpo import plan_merges
from trl_flow_egrpo.adapters import get_adapter
from trl_flow_egrpo.rollout import sample_rollouts
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

PROMPTS = ["a red apple", "a fire truck on a bridge"]


def test_branches_leave_the_anchor_with_one_stochastic_step():
    pipe = build_tiny_flux_pipeline(seed=1)
    adapter = get_adapter(pipe, height=64, width=64, max_sequence_length=32)
    schedule = adapter.schedule(16, 3.0)
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(0))
    conditioning = adapter.encode_prompts(PROMPTS)
    plan = plan_merges(schedule.sigmas, 0.7, 2.2, 8)
    G = 3
    rollouts = sample_rollouts(
        adapter,
        pipe.transformer,
        schedule,
        plan,
        conditioning,
        noise,
        G,
        0.7,
        torch.Generator().manual_seed(1),
        batch_size=16,
    )
    assert rollouts.images.shape == (2 * len(plan), G, 3, 64, 64)
    assert float(rollouts.images.min()) >= 0 and float(rollouts.images.max()) <= 1
    # Evaluation count: T per anchor, G * (T - k - l) per group (the SDE step reuses the anchor's velocity).
    assert rollouts.num_evaluations == 2 * (16 + G * sum(16 - s.end for s in plan))
    # Each group branches from the anchor's latents at its start index, and its members differ.
    anchor_states = {}
    latents = noise.clone()
    from trl_flow_egrpo.sde import euler_step

    for k in range(8):
        anchor_states[k] = latents
        timesteps = schedule.timesteps[k].expand(2)
        latents = euler_step(
            latents, adapter.velocity(pipe.transformer, latents, timesteps, conditioning), schedule.sigmas, k
        )
    for g in range(rollouts.num_groups):
        k, p = int(rollouts.step_start[g]), int(rollouts.group_prompt[g])
        torch.testing.assert_close(rollouts.step_latents[g], anchor_states[k][p], rtol=1e-5, atol=1e-5)
        samples = rollouts.samples[g]
        assert not torch.allclose(samples[0], samples[1])
    # One branch continued by hand with the ODE from k + l (not k + 1) lands on the stored final image.
    g = 5
    k, length, p = int(rollouts.step_start[g]), int(rollouts.step_length[g]), int(rollouts.group_prompt[g])
    latents = rollouts.samples[g, 1:2]
    for index in range(k + length, 16):
        velocity = adapter.velocity(
            pipe.transformer,
            latents,
            schedule.timesteps[index].view(1),
            {name: t[p : p + 1] for name, t in conditioning.items()},
        )
        latents = euler_step(latents, velocity, schedule.sigmas, index)
    torch.testing.assert_close(adapter.decode(latents)[0], rollouts.images[g, 1], rtol=1e-4, atol=1e-4)


def test_unsupported_pipeline_is_a_clear_error():
    class StableCascadePipeline:
        pass

    with pytest.raises(ValueError, match="does not support StableCascadePipeline.*Supported pipelines: FluxPipeline"):
        get_adapter(StableCascadePipeline(), height=64, width=64)
