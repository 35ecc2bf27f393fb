"""FLUX.2 specifics, on the tiny offline FLUX.2 [dev] pipeline: the schedule's shift follows the pipeline's
``compute_empirical_mu`` at every step count, and a static shift replaces it. The checks every family shares (for
[dev] and [klein]: the anchor is the pipeline's own sample with the guidance embedding, with and without
classifier-free guidance and step-distilled; on-policy ratios; training; LoRA round trip; clear errors; the recipes'
merge plans) are in ``test_conformance.py``."""

import numpy as np
import torch

from families import FLUX2, PROMPTS
from trl_flow_egrpo.tiny import build_tiny_flux2_pipeline


def test_schedule_shift_depends_on_the_number_of_steps():
    # FLUX.2's mu grows as the step count falls (compute_empirical_mu); the schedule must follow the pipeline's.
    pipe = build_tiny_flux2_pipeline()
    adapter = FLUX2.adapter(pipe)
    for num_steps in (4, 28):
        schedule = adapter.schedule(num_steps, shift=None)
        noise = adapter.initial_noise(1, torch.Generator().manual_seed(0))
        FLUX2.sample(pipe, adapter, PROMPTS[:1], noise, num_steps, "latent")
        torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    base = np.linspace(1.0, 0.25, 4)
    static = adapter.schedule(4, shift=3.0).sigmas[:-1].double().numpy()
    torch.testing.assert_close(static, 3 * base / (1 + 2 * base), rtol=0, atol=1e-6)  # a static shift replaces it
