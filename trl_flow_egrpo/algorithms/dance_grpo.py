"""DanceGRPO (Xue et al., 2025): a constant-noise SDE, one initial noise per group, random steps trained."""

from __future__ import annotations

from ..sde import constant_noise_sde_mean_std
from .trajectories import TrajectoryStrategy, fraction_of, random_steps


class DanceGRPO(TrajectoryStrategy):
    """Per prompt, ``G`` trajectories from the same initial noise, every step an SDE step with a constant
    diffusion coefficient ``dance_eta`` (:func:`~trl_flow_egrpo.sde.constant_noise_sde_mean_std`); each
    trajectory trains ``int(T * timestep_fraction)`` of its steps drawn at random (default fraction 0.6, as the
    DanceGRPO scripts). ``G * T`` transformer rows per prompt."""

    name = "dance-grpo"
    same_noise_in_group = True
    default_timestep_fraction = 0.6

    def trained_steps(self, iteration, generator):
        fraction = self.config.timestep_fraction or self.default_timestep_fraction
        num_steps = self.schedule.num_steps
        return random_steps(self.config.num_generations, num_steps, fraction_of(num_steps, fraction), generator)

    def step_distribution(self, latents, velocity, start, length):
        return constant_noise_sde_mean_std(latents, velocity, self.schedule.sigmas, start, self.config.dance_eta)
