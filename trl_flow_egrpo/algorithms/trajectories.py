"""What the trajectory algorithms (Flow-GRPO, DanceGRPO, MixGRPO) share: ``G`` whole trajectories per prompt
form a group, and every trained step is a one-interval SDE step of one trajectory."""

from __future__ import annotations

import torch

from ..rollout import sample_trajectories, trajectory_rollouts
from ..sde import step_mean_std
from .base import RolloutStrategy


class TrajectoryStrategy(RolloutStrategy):
    """Base of the trajectory algorithms. Subclasses choose the initial noises (:attr:`same_noise_in_group`),
    the stochastic and trained steps (:meth:`stochastic_steps`, :meth:`trained_steps`) and, when it is not
    Flow-GRPO's (METHOD.md section 2 with ``l = 1`` and ``noise_level``, or CPS with ``sde_type="cps"``), the SDE
    (:meth:`step_distribution`).

    Under ``sde_type="cps"`` the last step lands at sigma 0 with no noise: it is still sampled (it is then the
    Euler step) but cannot be trained, so a strategy that trains it is refused."""

    same_noise_in_group = False
    """Whether the ``G`` trajectories of a prompt start from the same initial noise."""

    def __init__(self, config, schedule):
        super().__init__(config, schedule)
        if config.sde_type == "cps" and bool(self.trained_steps(0, torch.Generator().manual_seed(0))[:, -1].any()):
            raise ValueError(
                f"algorithm={config.algorithm!r} with sde_type='cps' would train the last step, which lands at "
                "sigma 0 where the CPS step has no noise and no log-probability. Lower timestep_fraction so that "
                f"int(T * timestep_fraction) < T = {schedule.num_steps} (default 0.99), or use sde_type='sde'."
            )

    def stochastic_steps(self, iteration: int) -> torch.Tensor:
        """``[T]`` bool: the SDE steps at ``iteration`` (default: all of them)."""
        return torch.ones(self.schedule.num_steps, dtype=torch.bool)

    def ode_completion(self, iteration: int) -> list[int] | None:
        """The schedule indices DPM-Solver++ 2M visits after the last stochastic step, ending at ``T``
        (MixGRPO-Flash's compressed ODE), or None: Euler on every step (default)."""
        return None

    def trained_steps(self, iteration: int, generator: torch.Generator) -> torch.Tensor:
        """``[G, T]`` bool: the trained steps of one prompt's ``G`` trajectories (drawing from the prompt's
        ``generator`` if random), as many in every row, all stochastic."""
        raise NotImplementedError

    def step_distribution(self, latents, velocity, start, length):
        config = self.config
        return step_mean_std(
            latents, velocity, self.schedule.sigmas, start, length, config.noise_level, config.sde_type
        )

    @property
    def num_phases(self) -> int:
        return int(self.trained_steps(0, torch.Generator().manual_seed(0))[0].sum())

    def describe(self) -> str:
        noise = "one initial noise per group" if self.same_noise_in_group else "one initial noise per trajectory"
        return (
            f"{self.name} (T={self.schedule.num_steps}): {self.config.num_generations} trajectories per prompt, "
            f"{noise}, {self.num_phases} trained steps each"
        )

    def trained_steps_per_phase(self, num_prompts: int) -> int:
        """One trained step of every trajectory."""
        return num_prompts * self.config.num_generations

    def shared_prefix(self, iteration: int) -> int:
        """Leading steps that the ``G`` trajectories of a group share exactly (the same initial noise and no
        SDE step yet): they are sampled once per prompt."""
        stochastic = self.stochastic_steps(iteration)
        if not self.same_noise_in_group or not bool(stochastic.any()):
            return 0
        return int(stochastic.nonzero()[0])

    def evaluations_per_prompt(self, iteration: int = 0) -> int:
        """``p + G * (T - p)`` for a shared prefix of ``p`` steps; with a compressed ODE completion visiting
        ``m + 1`` indices from index ``c``, ``p + G * (c - p + m)``."""
        prefix = self.shared_prefix(iteration)
        completion = self.ode_completion(iteration)
        if completion is None:
            per_trajectory = self.schedule.num_steps - prefix
        else:
            per_trajectory = completion[0] - prefix + len(completion) - 1
        return prefix + self.config.num_generations * per_trajectory

    def sample(self, adapter, model, conditioning, generators, iteration):
        config = self.config
        num_prompts, num_generations, batch_size = len(generators), config.num_generations, config.rollout_batch_size
        trained = torch.cat([self.trained_steps(iteration, generator) for generator in generators])
        stochastic = self.stochastic_steps(iteration)
        prefix = self.shared_prefix(iteration)
        prompts = torch.arange(num_prompts, device=adapter.device)
        noises_per_prompt = 1 if self.same_noise_in_group else num_generations
        latents = torch.cat([adapter.initial_noise(noises_per_prompt, generator) for generator in generators])
        latents, evaluations, calls = latents.to(adapter.device), 0, 0
        if prefix:  # the group's shared ODE steps, once per prompt
            latents, _, evaluations, calls = sample_trajectories(
                adapter,
                model,
                self.schedule,
                conditioning,
                latents,
                prompts,
                self.step_distribution,
                stochastic,
                trained[:num_prompts],
                generators,
                batch_size,
                end_index=prefix,
            )
        if self.same_noise_in_group:
            latents = latents.repeat_interleave(num_generations, dim=0)
        final, steps, more_evaluations, more_calls = sample_trajectories(
            adapter,
            model,
            self.schedule,
            conditioning,
            latents,
            prompts.repeat_interleave(num_generations),
            self.step_distribution,
            stochastic,
            trained,
            generators,
            batch_size,
            first_index=prefix,
            completion=self.ode_completion(iteration),
        )
        return trajectory_rollouts(
            steps,
            final,
            adapter,
            num_prompts,
            num_generations,
            conditioning,
            evaluations + more_evaluations,
            calls + more_calls,
            config.decode_batch_size or batch_size,
        )


def first_steps(num_rows: int, num_steps: int, count: int) -> torch.Tensor:
    """``[N, T]`` bool: the first ``count`` of ``num_steps`` steps in every row."""
    mask = torch.zeros(num_rows, num_steps, dtype=torch.bool)
    mask[:, :count] = True
    return mask


def random_steps(num_rows: int, num_steps: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[N, T]`` bool: ``count`` steps of each row drawn uniformly without replacement."""
    chosen = torch.rand(num_rows, num_steps, generator=generator).argsort(dim=1)[:, :count]
    return torch.zeros(num_rows, num_steps, dtype=torch.bool).scatter_(1, chosen, True)


def fraction_of(num_steps: int, fraction: float) -> int:
    """How many of ``num_steps`` a ``fraction`` trains: ``int(T * fraction)``, at least 1."""
    return max(1, int(num_steps * fraction))
