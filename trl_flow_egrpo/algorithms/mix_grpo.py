"""MixGRPO (Li et al., 2025): SDE steps only inside a window that slides along the schedule during training."""

from __future__ import annotations

import torch

from .trajectories import TrajectoryStrategy


class MixGRPO(TrajectoryStrategy):
    """Per prompt, ``G`` trajectories from the same initial noise; the steps inside a window of
    ``mix_window_size`` steps are SDE steps (Flow-GRPO's SDE or CPS: ``noise_level``, ``sde_type``) and trained,
    the others are ODE steps. The official "progressive" strategy with roll-back (``GRPOTrainingStates`` with
    ``max_timesteps = T - 2``): the window starts at step 0, moves ``mix_window_stride`` steps later every
    ``mix_shift_interval`` iterations, never covers the last two steps (it is cut at step ``T - 2``, so it
    shortens near the end), and goes back to step 0 once it would start at step ``T - 2`` or later. The ODE
    steps before the window are the same for the whole group and are sampled once per prompt:
    ``w0 + G * (T - w0)`` rows per prompt for a window starting at ``w0``."""

    name = "mix-grpo"
    same_noise_in_group = True
    default_shift_interval = 25
    """``mix_shift_interval`` when the config leaves it None (the official MixGRPO script's ``iters_per_group``)."""

    def __init__(self, config, schedule):
        if schedule.num_steps < 3:  # first: the base class looks at the windows, which need 3 steps
            raise ValueError(
                f"algorithm={config.algorithm!r} needs num_inference_steps >= 3: its window never covers the last "
                f"two steps, so with {schedule.num_steps} steps nothing could be trained. Raise num_inference_steps."
            )
        super().__init__(config, schedule)

    @property
    def shift_interval(self) -> int:
        """Iterations between two moves of the window: ``mix_shift_interval``, or the algorithm's default."""
        return self.config.mix_shift_interval or self.default_shift_interval

    @property
    def window_limit(self) -> int:
        """``T - 2``: the window covers steps below it only (the official ``max_timesteps``)."""
        return self.schedule.num_steps - 2

    def window_positions(self) -> int:
        """How many start steps the window cycles through: ``0, s, 2s, ...`` below ``T - 2`` for stride ``s``
        (one, step 0, when the stride is 0: the frozen window)."""
        stride = self.config.mix_window_stride
        return 1 if stride == 0 else (self.window_limit - 1) // stride + 1

    def window_start(self, iteration: int) -> int:
        """First step of the window at ``iteration``."""
        moves = iteration // self.shift_interval
        return moves % self.window_positions() * self.config.mix_window_stride

    def window(self, iteration: int) -> range:
        """The window's steps at ``iteration``: from its start, ``mix_window_size`` steps cut at ``T - 2``."""
        start = self.window_start(iteration)
        return range(start, min(start + self.config.mix_window_size, self.window_limit))

    def stochastic_steps(self, iteration):
        steps = torch.zeros(self.schedule.num_steps, dtype=torch.bool)
        window = self.window(iteration)
        steps[window.start : window.stop] = True
        return steps

    def trained_steps(self, iteration, generator):
        return self.stochastic_steps(iteration).expand(self.config.num_generations, -1).clone()

    def describe(self) -> str:
        stride = self.config.mix_window_stride
        motion = (
            "frozen"
            if stride == 0
            else f"moving {stride} every {self.shift_interval} iterations, below step {self.window_limit}"
        )
        return (
            f"{self.name} (T={self.schedule.num_steps}): SDE window of {self.config.mix_window_size} steps from step "
            f"{self.window_start(0)}, {motion}"
        )
