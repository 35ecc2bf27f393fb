"""MixGRPO (Li et al., 2025): SDE steps only inside a window that slides along the schedule during training."""

from __future__ import annotations

import torch

from .trajectories import TrajectoryStrategy


class MixGRPO(TrajectoryStrategy):
    """Per prompt, ``G`` trajectories from the same initial noise; the steps inside a window of
    ``mix_window_size`` steps are SDE steps (Flow-GRPO's SDE, ``noise_level``) and trained, the others are ODE
    steps. The window starts at step 0 and moves ``mix_window_stride`` steps later every ``mix_shift_interval``
    iterations, back to step 0 after reaching the end (the authors' "progressive" strategy with roll-back).
    The ODE steps before the window are the same for the whole group and are sampled once per prompt:
    ``w0 + G * (T - w0)`` rows per prompt for a window starting at ``w0``."""

    name = "mix-grpo"
    same_noise_in_group = True

    def window_start(self, iteration: int) -> int:
        """First step of the window at ``iteration``."""
        config = self.config
        positions = self.schedule.num_steps - config.mix_window_size + 1
        return (iteration // config.mix_shift_interval * config.mix_window_stride) % positions

    def stochastic_steps(self, iteration):
        start = self.window_start(iteration)
        steps = torch.zeros(self.schedule.num_steps, dtype=torch.bool)
        steps[start : start + self.config.mix_window_size] = True
        return steps

    def trained_steps(self, iteration, generator):
        return self.stochastic_steps(iteration).expand(self.config.num_generations, -1).clone()

    def describe(self) -> str:
        return (
            f"MixGRPO (T={self.schedule.num_steps}): SDE window of {self.config.mix_window_size} steps from step "
            f"{self.window_start(0)}, "
            f"moving {self.config.mix_window_stride} every {self.config.mix_shift_interval} iterations"
        )
