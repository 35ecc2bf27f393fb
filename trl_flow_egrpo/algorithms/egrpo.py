"""E-GRPO (entropy-aware GRPO): branches from a deterministic anchor at the merged steps of the entropy plan."""

from __future__ import annotations

import torch

from ..merging import format_merge_plan, plan_merges
from ..rollout import sample_rollouts
from ..sde import step_mean_std
from ..solvers import completion_evaluations
from .base import RolloutStrategy

PAPER_COMPLETION = ("euler", 1.0, [1])
"""``(completion_solver, completion_steps_fraction, completion_granularities)`` of the paper: full Euler, one stride."""


class EGRPO(RolloutStrategy):
    """METHOD.md sections 3-4: per prompt one initial noise and its ODE anchor; at each merged step of the plan
    ``(k, l)``, ``G`` branches leave the anchor with one SDE step over ``l`` intervals and follow the ODE. A group
    is one (prompt, merged step); only the merged step is trained, one forward per group for its ``G`` samples."""

    name = "e-grpo"

    def __init__(self, config, schedule):
        super().__init__(config, schedule)
        self.merge_plan = plan_merges(
            schedule.sigmas,
            config.noise_level,
            config.entropy_threshold,
            config.num_active_steps,
            config.merge_length,
            config.merge_windows,
            first_step=config.first_active_step,
            sde_type=config.sde_type,
        )

    def sample(self, adapter, model, conditioning, generators, iteration):
        config = self.config
        noise = torch.cat([adapter.initial_noise(1, generator) for generator in generators]).to(adapter.device)
        return sample_rollouts(
            adapter,
            model,
            self.schedule,
            self.merge_plan,
            conditioning,
            noise,
            config.num_generations,
            config.noise_level,
            generators,
            config.rollout_batch_size,
            config.decode_batch_size,
            completion_solver=config.completion_solver,
            completion_steps_fraction=config.completion_steps_fraction,
            completion_granularities=config.completion_granularities,
            sde_type=config.sde_type,
        )

    def step_distribution(self, latents, velocity, start, length):
        config = self.config
        return step_mean_std(
            latents, velocity, self.schedule.sigmas, start, length, config.noise_level, config.sde_type
        )

    @property
    def num_phases(self) -> int:
        return len(self.merge_plan)

    def trained_steps_per_phase(self, num_prompts: int) -> int:
        """One group (one trained step of G samples) per prompt and merged step."""
        return num_prompts

    def evaluations_per_prompt(self, iteration: int = 0) -> int:
        """``T`` for the anchor plus, per merged step and completion granularity, ``G`` times the completion's
        intervals: ``G * (T - k - l)`` with the default full completion (the branch step reuses the anchor's
        velocity; :func:`~trl_flow_egrpo.solvers.completion_evaluations` for a subset or a stride)."""
        config, num_steps = self.config, self.schedule.num_steps
        completions = sum(
            completion_evaluations(num_steps, step.end, config.completion_steps_fraction, granularity)
            for step in self.merge_plan
            if step.end < num_steps  # a branch landing at sigma 0 needs no completion
            for granularity in config.completion_granularities
        )
        return num_steps + config.num_generations * completions

    @property
    def group_labels(self) -> list[str]:
        """``step_<k>`` per merged step; with several completion granularities, the groups of every stride but the
        first are labelled ``step_<k>_stride<g>``."""
        granularities = self.config.completion_granularities
        return [
            f"step_{step.start}" if i == 0 else f"step_{step.start}_stride{granularity}"
            for i, granularity in enumerate(granularities)
            for step in self.merge_plan
        ]

    def describe(self) -> str:
        config = self.config
        return (
            f"E-GRPO merge plan (T={self.schedule.num_steps}, a={config.noise_level:.3g}, "
            f"tau={config.entropy_threshold:.3g}, {config.num_active_steps} active steps from step "
            f"{config.first_active_step}{', CPS sampler' if config.sde_type == 'cps' else ''}):\n"
            + format_merge_plan(self.merge_plan, self.schedule.sigmas)
            + self._describe_completion()
        )

    def _describe_completion(self) -> str:
        """One line on the completion after the branch step when it is not the paper's (full Euler, one stride)."""
        config = self.config
        completion = (config.completion_solver, config.completion_steps_fraction, list(config.completion_granularities))
        if completion == PAPER_COMPLETION:
            return ""
        return (
            f"\nCompletion: {config.completion_solver} on {config.completion_steps_fraction:.3g} of the remaining "
            f"steps, strides {list(config.completion_granularities)} (METHOD.md 4b)."
        )
