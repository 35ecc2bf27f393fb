"""Flow-GRPO (Liu et al., 2025): G independent SDE trajectories per prompt, the first steps trained."""

from __future__ import annotations

import torch

from ..sde import gaussian_kl
from .trajectories import TrajectoryStrategy, first_steps, fraction_of


class FlowGRPO(TrajectoryStrategy):
    """Per prompt, ``G`` trajectories from ``G`` initial noises, every step an SDE step (METHOD.md section 2 with
    ``l = 1``, ``noise_level``); the group is the prompt's ``G`` trajectories, each trajectory's advantage
    applies to every trained step of it. Trained: the first ``int(T * timestep_fraction)`` steps (default
    fraction 0.99, as the Flow-GRPO configs). ``G * T`` transformer rows per prompt.

    Its official defaults when the config leaves them None: a KL penalty to the frozen base model with
    ``beta = 0.01`` (the official ``pickscore_sd3`` config, the human-preference reward; its GenEval and OCR
    configs use 0.04), and rewards normalized with each group's mean but the std of the whole batch
    (``advantage_std="batch"``, the official ``sample.global_std = True``). Its KL is the official one
    (:meth:`kl_to_reference`)."""

    name = "flow-grpo"
    default_timestep_fraction = 0.99
    default_beta = 0.01
    default_advantage_std = "batch"

    def trained_steps(self, iteration, generator):
        fraction = self.config.timestep_fraction or self.default_timestep_fraction
        num_steps = self.schedule.num_steps
        return first_steps(self.config.num_generations, num_steps, fraction_of(num_steps, fraction))

    def kl_to_reference(self, mean, reference_mean, std, start, length):
        """The official Flow-GRPO KL: ``mean((mu - mu_ref)^2) / (2 std_dev_t^2)``. Under its SDE ``std_dev_t`` is
        the diffusion coefficient ``c``, not the step's std ``c sqrt(sigma_k - sigma_{k+1})``: the KL between the
        step's two Gaussians (:func:`~trl_flow_egrpo.sde.gaussian_kl`) times the step's sigma decrease. Under CPS
        its ``std_dev_t`` is the step's std ``sigma_{k+1} sin(a pi / 2)``: exactly the KL between the two
        Gaussians. ``beta`` weighs it on the official scale."""
        if self.config.sde_type == "cps":
            return super().kl_to_reference(mean, reference_mean, std, start, length)
        sigmas = self.schedule.sigmas.to(device=mean.device, dtype=torch.float32)
        return gaussian_kl(mean, reference_mean, std) * (sigmas[start] - sigmas[start + length])

    def describe(self) -> str:
        return f"{super().describe()}; KL weight {self.beta:g}, reward std over the {self.advantage_std}"
