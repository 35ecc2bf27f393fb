"""Flow-GRPO (Liu et al., 2025): G independent SDE trajectories per prompt, the first steps trained."""

from __future__ import annotations

from .trajectories import TrajectoryStrategy, first_steps, fraction_of


class FlowGRPO(TrajectoryStrategy):
    """Per prompt, ``G`` trajectories from ``G`` initial noises, every step an SDE step (METHOD.md section 2 with
    ``l = 1``, ``noise_level``); the group is the prompt's ``G`` trajectories, each trajectory's advantage
    applies to every trained step of it. Trained: the first ``int(T * timestep_fraction)`` steps (default
    fraction 0.99, as the Flow-GRPO configs). ``G * T`` transformer rows per prompt."""

    name = "flow-grpo"
    default_timestep_fraction = 0.99

    def trained_steps(self, iteration, generator):
        fraction = self.config.timestep_fraction or self.default_timestep_fraction
        num_steps = self.schedule.num_steps
        return first_steps(self.config.num_generations, num_steps, fraction_of(num_steps, fraction))
