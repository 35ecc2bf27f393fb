"""Stable Diffusion 3 specifics, on the tiny offline SD3 pipeline: the schedule is the scheduler's static shift, and
a scheduler with dynamic shifting gets the pipeline's mu. The checks every family shares (the anchor is the
pipeline's own sample with and without classifier-free guidance, on-policy ratios, training, LoRA round trip, clear
errors) are in ``test_conformance.py``."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from families import SD3
from trl_flow_egrpo.tiny import build_tiny_sd3_pipeline


def test_default_schedule_is_the_schedulers_static_shift():
    adapter = SD3.adapter(build_tiny_sd3_pipeline())
    # The tiny scheduler's own static shift 3 (shift=None keeps it), as SD3.5's released scheduler config has.
    torch.testing.assert_close(
        adapter.schedule(6, shift=None).sigmas, adapter.schedule(6, shift=3.0).sigmas, rtol=0, atol=0
    )


def test_dynamic_shift_schedule_is_the_pipelines():
    # SD3 checkpoints ship static-shift schedulers; one with dynamic shifting must get the pipeline's mu.
    pipe = build_tiny_sd3_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64
    )
    adapter = SD3.adapter(pipe, guidance_scale=1.0)
    schedule = adapter.schedule(4, shift=None)
    SD3.sample(pipe, adapter, ["a cat"], adapter.initial_noise(1, torch.Generator().manual_seed(0)), 4, "latent")
    torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    assert not torch.allclose(schedule.sigmas, adapter.schedule(4, shift=3.0).sigmas)  # mu mattered
