"""AWM, Advantage Weighted Matching (Xue et al., 2025, arXiv 2509.25050): the policy gradient as an
advantage-weighted flow-matching loss on forward-noised copies of the rollouts' clean samples."""

from __future__ import annotations

from ..loss import flow_matching_log_likelihood, ppo_clip_loss
from .diffusion_nft import ForwardProcessStrategy


class AWM(ForwardProcessStrategy):
    """AWM: sampling and trained times as :class:`~trl_flow_egrpo.algorithms.diffusion_nft.ForwardProcessStrategy`
    (on-policy: the current policy samples). The policy's log-likelihood of a clean sample ``x0`` is replaced by
    the negated flow-matching loss ``-mean((v(x_t) - (eps - x0))^2)`` at one forward-noised ``x_t``
    (:func:`~trl_flow_egrpo.loss.flow_matching_log_likelihood`), and the PPO-clip loss
    (:func:`~trl_flow_egrpo.loss.ppo_clip_loss`, ``clip_range``) acts on ``exp(log p - log p_old)``, ``log p_old``
    from the sampling policy's velocity at the same ``x_t``: the gradient is the flow-matching gradient weighted by
    the advantage, and the clip is what anchors the policy to the sampling one (with ``beta``, a velocity KL to the
    base model as well).

    Defaults, those of Flow-Factory's AWM trainer (``AWMTrainingArguments``): the uniform time weighting, the ratio
    clipped to ``1 +- 1e-4`` (this library's ``clip_range`` default), advantages clipped to 5 and normalized with the
    std of the whole batch (``advantage_std="batch"``, its ``global_std=True``), no KL (``beta = 0``), ``int(T *
    0.9)`` trained times per sample."""

    name = "awm"
    default_timestep_fraction = 0.9
    default_advantage_std = "batch"

    def forward_process_loss(self, velocity, old_velocity, noisy, clean, noise, sigma, advantages):
        return ppo_clip_loss(
            flow_matching_log_likelihood(velocity, clean, noise),
            flow_matching_log_likelihood(old_velocity, clean, noise),
            advantages,
            self.config.clip_range,
        )

    def describe(self) -> str:
        return f"{super().describe()}; ratio clip {self.config.clip_range:g}, reward std over the {self.advantage_std}"
