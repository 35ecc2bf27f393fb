"""DanceGRPO (Xue et al., 2025): a constant-noise SDE, one initial noise per group, random steps trained."""

from __future__ import annotations

import torch

from ..sde import constant_noise_sde_mean_std
from .trajectories import TrajectoryStrategy, fraction_of, random_steps


class DanceGRPO(TrajectoryStrategy):
    """Per prompt, ``G`` trajectories from the same initial noise, every step an SDE step with a constant
    diffusion coefficient ``dance_eta`` (:func:`~trl_flow_egrpo.sde.constant_noise_sde_mean_std`). Each
    trajectory trains ``int((T - 1) * timestep_fraction)`` steps drawn at random from its first ``T - 1``: the
    official code keeps ``timesteps[:, :-1]`` (the last step is sampled but never trained) and trains
    ``int(len * timestep_fraction)`` of them (default fraction 0.6 as its scripts: 9 of the first 15 at
    ``T = 16``). ``G * T`` transformer rows per prompt. Its official code has no CPS form of this SDE, so
    ``sde_type="cps"`` is refused (:class:`~trl_flow_egrpo.EGRPOConfig`)."""

    name = "dance-grpo"
    same_noise_in_group = True
    default_timestep_fraction = 0.6

    def trainable_steps(self) -> int:
        """The steps the trained ones are drawn from: the first ``T - 1`` (at least one)."""
        return max(1, self.schedule.num_steps - 1)

    def trained_steps(self, iteration, generator):
        fraction = self.config.timestep_fraction or self.default_timestep_fraction
        candidates = self.trainable_steps()
        chosen = random_steps(self.config.num_generations, candidates, fraction_of(candidates, fraction), generator)
        trained = torch.zeros(self.config.num_generations, self.schedule.num_steps, dtype=torch.bool)
        trained[:, :candidates] = chosen
        return trained

    def step_distribution(self, latents, velocity, start, length):
        return constant_noise_sde_mean_std(latents, velocity, self.schedule.sigmas, start, self.config.dance_eta)
