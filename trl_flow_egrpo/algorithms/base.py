"""The rollout-strategy interface: how an algorithm of the GRPO family samples and what it trains.

Everything else (rewards, group advantages, the PPO-clip loss, optimizer steps, logging, checkpoints, the Hub)
is shared by the trainer. A strategy decides: the initial noises, which steps are stochastic (SDE) and which
deterministic (ODE), which stochastic steps are trained, how rollouts form groups, and the Gaussian of a
trained step (so that the update recomputes the same log-probability the sampler drew with). A forward-process
strategy (:attr:`RolloutStrategy.trains_forward_process`: DiffusionNFT, AWM) instead samples clean images with the
ODE and trains on forward-noised copies of them with its own loss, optionally against an EMA "old" policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..adapters import Conditioning, ModelAdapter
from ..loss import PolicyLossOutput
from ..rollout import Rollouts
from ..schedule import Schedule
from ..sde import gaussian_kl


class RolloutStrategy(ABC):
    """One algorithm's sampling and choice of trained steps.

    Args:
        config: the run's :class:`~trl_flow_egrpo.EGRPOConfig` (its ``num_generations``, ``noise_level`` and
            the algorithm's own fields).
        schedule: the sampling schedule.
    """

    name: ClassVar[str] = ""
    """The value of ``EGRPOConfig.algorithm`` that selects this strategy."""

    default_beta: ClassVar[float] = 0.0
    """The KL weight ``EGRPOConfig.beta = None`` stands for with this algorithm."""

    default_advantage_std: ClassVar[str] = "group"
    """The reward std ``EGRPOConfig.advantage_std = None`` stands for with this algorithm."""

    trains_forward_process: ClassVar[bool] = False
    """Whether the update trains on forward-noised clean samples (:meth:`forward_process_loss`, DiffusionNFT and
    AWM) instead of the PPO-clip loss of the rollouts' stochastic steps (:meth:`step_distribution`)."""

    keeps_old_policy: ClassVar[bool] = False
    """Whether the strategy samples with an "old" policy: an EMA copy of the trained parameters that the trainer
    keeps, checkpoints and moves after every iteration by :meth:`old_policy_decay` (DiffusionNFT). False: it
    samples with the current policy."""

    def __init__(self, config, schedule: Schedule):
        self.config = config
        self.schedule = schedule

    @property
    def beta(self) -> float:
        """The KL-penalty weight of this run: ``config.beta``, or the algorithm's default when it is None."""
        return self.default_beta if self.config.beta is None else float(self.config.beta)

    @property
    def advantage_std(self) -> str:
        """``"group"`` or ``"batch"``: ``config.advantage_std``, or the algorithm's default when it is None."""
        return self.config.advantage_std or self.default_advantage_std

    @abstractmethod
    def sample(
        self,
        adapter: ModelAdapter,
        model,
        conditioning: Conditioning,
        generators: list[torch.Generator],
        iteration: int,
    ) -> Rollouts:
        """Sample iteration ``iteration``'s rollouts of the prompts (rows of ``conditioning``); everything random
        about prompt ``p`` comes from ``generators[p]`` (:func:`~trl_flow_egrpo.rollout.prompt_generators`)."""

    @abstractmethod
    def step_distribution(
        self, latents: torch.Tensor, velocity: torch.Tensor, start: torch.Tensor, length: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and per-sample std of the trained steps starting at ``start`` over ``length`` intervals, with
        the policy's ``velocity`` at ``latents``: the Gaussian the samples were drawn from."""

    def kl_to_reference(
        self, mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor, start: torch.Tensor, length
    ) -> torch.Tensor:
        """The KL penalty ``[B]`` of trained steps whose Gaussians have means ``mean`` (policy) and
        ``reference_mean`` (frozen base) and the same ``std``: :func:`~trl_flow_egrpo.sde.gaussian_kl`."""
        return gaussian_kl(mean, reference_mean, std)

    def forward_process_loss(
        self,
        velocity: torch.Tensor,
        old_velocity: torch.Tensor,
        noisy: torch.Tensor,
        clean: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        advantages: torch.Tensor,
    ) -> PolicyLossOutput:
        """The loss of a micro-batch of forward-process samples (only with :attr:`trains_forward_process`): the
        policy's ``velocity`` (with gradient) and the sampling policy's ``old_velocity`` at ``noisy = (1 - sigma)
        clean + sigma noise``, and each sample's advantage, all ``[B, ...]`` / ``[B]``."""
        raise NotImplementedError(f"{type(self).__name__} trains the rollouts' stochastic steps, not x0 samples.")

    def old_policy_decay(self, optimizer_steps: int) -> float:
        """The EMA decay of the old policy's update after ``optimizer_steps`` optimizer steps in all (only with
        :attr:`keeps_old_policy`): ``old <- decay * old + (1 - decay) * current``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no old policy.")

    @property
    @abstractmethod
    def num_phases(self) -> int:
        """Optimizer steps per iteration and inner epoch with ``optimizer_step='active_step'`` (one per phase
        of :attr:`Rollouts.step_phase`)."""

    @abstractmethod
    def trained_steps_per_phase(self, num_prompts: int) -> int:
        """Trained steps (update forward rows) in one phase of an iteration over ``num_prompts`` prompts."""

    @abstractmethod
    def evaluations_per_prompt(self, iteration: int = 0) -> int:
        """Transformer rows the rollouts of one prompt cost at ``iteration``."""

    @property
    def group_labels(self) -> list[str]:
        """Names of the values of :attr:`Rollouts.group_step` (reward metrics per label); empty if one label."""
        return []

    @abstractmethod
    def describe(self) -> str:
        """A few lines for the log and the model card: what is stochastic and what is trained."""
