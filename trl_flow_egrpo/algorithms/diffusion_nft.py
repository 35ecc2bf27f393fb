"""DiffusionNFT (Zheng et al., 2025, arXiv 2509.16117): negative-aware fine-tuning on the forward process.

Also the base of the forward-process strategies (:class:`ForwardProcessStrategy`, shared with AWM): they sample
clean images with the deterministic ODE, with no log-probability of any sampling step, and train on
forward-noised copies ``x_t = (1 - t) x0 + t eps`` of them with a flow-matching-type loss.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..loss import (
    PolicyLossOutput,
    flow_matching_log_likelihood,
    forward_noise,
    nft_loss,
    nft_optimality,
    old_policy_decay,
)
from ..rollout import Rollouts, batched_velocity, decode_in_chunks, prompt_noise, sample_trajectories
from .base import RolloutStrategy
from .trajectories import fraction_of


class ForwardProcessStrategy(RolloutStrategy):
    """Per prompt, ``G`` deterministic (Euler ODE) samples from ``G`` initial noises; the group is the prompt's
    ``G`` samples. Each sample ``x0`` is trained at ``n = int(T * timestep_fraction)`` of the schedule's times
    ``t = sigma_k``, drawn without replacement per sample, each with its own forward noise ``eps`` (all from the
    prompt's generator, so a resumed run draws the same); its ``j``-th time is trained in phase ``j``. The sampler
    also evaluates the sampling policy's velocity at every ``x_t`` (:attr:`Rollouts.step_velocity`): the update's
    "old" velocity. ``G * (T + n)`` rows per prompt."""

    trains_forward_process = True
    default_timestep_fraction: ClassVar[float] = 0.99
    """``timestep_fraction`` when the config leaves it None."""

    @property
    def num_train_timesteps(self) -> int:
        """``n``: the trained times per sample, ``int(T * timestep_fraction)`` (at least 1)."""
        fraction = self.config.timestep_fraction or self.default_timestep_fraction
        return fraction_of(self.schedule.num_steps, fraction)

    def train_indices(self, generator: torch.Generator) -> torch.Tensor:
        """``[G, n]`` schedule indices of the trained times of one prompt's ``G`` samples, each row ``n`` distinct
        indices drawn uniformly from the ``T`` (the official per-sample permutation of the schedule's times)."""
        num_steps, count = self.schedule.num_steps, self.num_train_timesteps
        return torch.stack(
            [torch.randperm(num_steps, generator=generator)[:count] for _ in range(self.config.num_generations)]
        )

    def step_distribution(self, latents, velocity, start, length):
        """Not defined: every sampling step is deterministic and none is trained."""
        raise NotImplementedError(f"{self.name} samples with the ODE only: it has no stochastic step to train.")

    def sample(self, adapter, model, conditioning, generators, iteration):
        config = self.config
        num_prompts, num_generations, batch_size = len(generators), config.num_generations, config.rollout_batch_size
        num_steps, device = self.schedule.num_steps, adapter.device
        latents = torch.cat([adapter.initial_noise(num_generations, generator) for generator in generators])
        rollout_prompt = torch.arange(num_prompts, device=device).repeat_interleave(num_generations)
        clean, _, evaluations, calls = sample_trajectories(
            adapter,
            model,
            self.schedule,
            conditioning,
            latents.to(device),
            rollout_prompt,
            self.step_distribution,
            torch.zeros(num_steps, dtype=torch.bool),
            torch.zeros(len(rollout_prompt), num_steps, dtype=torch.bool),
            generators,
            batch_size,
        )
        indices = torch.cat([self.train_indices(generator) for generator in generators])  # [P * G, n]
        count = indices.shape[1]
        step_rollout = torch.arange(len(clean), device=device).repeat_interleave(count)  # rollout-major
        step_prompt = rollout_prompt[step_rollout]
        starts = indices.flatten().to(device)
        noise = prompt_noise(generators, step_prompt, clean.shape[1:], device)
        clean_rows = clean[step_rollout]
        noisy = forward_noise(clean_rows, noise, self.schedule.sigmas.to(device)[starts])
        timesteps = self.schedule.timesteps.to(device)[starts]
        velocity = batched_velocity(adapter, model, noisy, timesteps, conditioning, step_prompt, batch_size).float()
        images = decode_in_chunks(adapter, clean, config.decode_batch_size or batch_size)
        groups = torch.arange(num_prompts, device=device)
        evaluations += len(noisy)
        calls += -(-len(noisy) // batch_size)
        return Rollouts(
            num_prompts=num_prompts,
            group_prompt=groups,
            group_step=torch.zeros_like(groups),
            images=images.view(num_prompts, num_generations, *images.shape[1:]),
            anchor_images=images[:0],
            anchor_latents=clean[:0],
            step_latents=clean_rows,
            step_start=starts,
            step_length=torch.ones_like(starts),
            step_prompt=step_prompt,
            step_phase=torch.arange(count, device=device).repeat(len(clean)),
            samples=noise.unsqueeze(1),
            log_probs=flow_matching_log_likelihood(velocity, clean_rows, noise).unsqueeze(1),
            sample_group=step_prompt.unsqueeze(1),
            sample_member=(step_rollout % num_generations).unsqueeze(1),
            conditioning=conditioning,
            num_evaluations=evaluations,
            num_model_calls=calls,
            num_transformer_rows=evaluations * adapter.transformer_rows_per_evaluation,
            step_velocity=velocity,
        )

    @property
    def num_phases(self) -> int:
        return self.num_train_timesteps

    def trained_steps_per_phase(self, num_prompts: int) -> int:
        """One trained time of every sample."""
        return num_prompts * self.config.num_generations

    def evaluations_per_prompt(self, iteration: int = 0) -> int:
        """``G * (T + n)``: the ``G`` ODE samples, then the sampling policy's velocity at each of their ``n``
        forward-noised copies."""
        return self.config.num_generations * (self.schedule.num_steps + self.num_train_timesteps)

    def describe(self) -> str:
        return (
            f"{self.name} (T={self.schedule.num_steps}): {self.config.num_generations} ODE samples per prompt, each "
            f"trained at {self.num_train_timesteps} forward-noised times drawn per sample; KL weight {self.beta:g}"
        )


class DiffusionNFT(ForwardProcessStrategy):
    """DiffusionNFT: the sampling ("old") policy is an EMA of the trained one; each sample's group advantage,
    clipped to ``advantage_clip``, becomes an optimality probability ``r`` (:func:`~trl_flow_egrpo.loss.nft_optimality`)
    and the loss (:func:`~trl_flow_egrpo.loss.nft_loss`) fits the implicit positive policy
    ``(1 - nft_beta) v_old + nft_beta v`` to the sample with weight ``r`` and the implicit negative one
    ``(1 + nft_beta) v_old - nft_beta v`` with weight ``1 - r``. After every iteration the old policy moves to
    ``decay * old + (1 - decay) * current`` with ``decay = min(old_policy_decay_rate * steps,
    old_policy_decay_max)`` after ``steps`` optimizer steps in all (official ``decay_type=1``).

    Official defaults (``config/nft.py``): ``nft_beta = 1`` (0.1 for OCR), a velocity KL to the base model with
    ``beta = 1e-4``, advantages clipped to 5, ``int(T * 0.99)`` trained times per sample. Its ratio statistic
    ``exp(log p - log p_old)`` (flow-matching log-likelihoods,
    :func:`~trl_flow_egrpo.loss.flow_matching_log_likelihood`) is a diagnostic of the drift from the old policy:
    nothing is clipped."""

    name = "diffusion-nft"
    default_beta = 1e-4
    keeps_old_policy = True

    def forward_process_loss(self, velocity, old_velocity, noisy, clean, noise, sigma, advantages):
        config = self.config
        optimality = nft_optimality(advantages, config.advantage_clip)
        loss = nft_loss(velocity, old_velocity, noisy, clean, sigma, optimality, config.nft_beta, config.advantage_clip)
        with torch.no_grad():
            log_ratio = flow_matching_log_likelihood(velocity, clean, noise) - flow_matching_log_likelihood(
                old_velocity, clean, noise
            )
            ratio = torch.exp(log_ratio)
            approx_kl = ((ratio - 1) - log_ratio).mean()
        return PolicyLossOutput(
            loss=loss, ratio=ratio, clipped=torch.zeros_like(ratio, dtype=torch.bool), approx_kl=approx_kl
        )

    def old_policy_decay(self, optimizer_steps: int) -> float:
        return old_policy_decay(optimizer_steps, self.config.old_policy_decay_rate, self.config.old_policy_decay_max)

    def describe(self) -> str:
        config = self.config
        return (
            f"{super().describe()}; nft_beta {config.nft_beta:g}, old policy EMA decay min("
            f"{config.old_policy_decay_rate:g} * steps, {config.old_policy_decay_max:g})"
        )
