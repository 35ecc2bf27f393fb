r"""The PPO-clip objective of the policy update (METHOD.md section 6).

.. math:: L = \mathrm{mean}_j \max\big(-A_j r_j,\; -A_j \,\mathrm{clip}(r_j, 1 - \epsilon, 1 + \epsilon)\big),
          \qquad r_j = \exp(\log p_\theta(x'_j) - \log p_{old}(x'_j))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLossOutput:
    """The loss and its statistics (statistics are detached).

    Attributes:
        loss: scalar PPO-clip loss (mean over samples), with gradient.
        ratio: the per-sample ratios ``r_j`` (detached).
        clipped: per-sample bool, True where the clipped term was the active one.
        approx_kl: ``mean(((r - 1) - log r))``, the non-negative k3 estimator of KL(old || new).
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    approx_kl: torch.Tensor


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> PolicyLossOutput:
    """PPO-clip loss (to minimize) for per-sample log-probabilities and advantages, all ``[N]``."""
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        is_clipped = clipped > unclipped
    return PolicyLossOutput(loss=loss, ratio=ratio.detach(), clipped=is_clipped, approx_kl=approx_kl)
