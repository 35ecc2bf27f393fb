r"""Multi-step group-normalized advantages (METHOD.md section 5).

A group is ``(prompt, merged step)``: the ``G`` rollouts that share the anchor prefix and branch with
the same merged SDE step. Within a group,

.. math:: A_j = \mathrm{clip}\Big(\frac{R_j - \mathrm{mean}(R)}{\mathrm{std}(R) + \epsilon}, -A_{max}, A_{max}\Big)

with the unbiased standard deviation. Only the terminal reward is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AGGREGATIONS = ("advantage", "sum")


def normalize_in_groups(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(R - mean(R)) / (std(R) + eps)`` along the group dimension (``dim=-1``), unbiased std."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + eps)


def group_advantages(
    rewards: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    aggregation: str = "advantage",
    clip: float | None = 5.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Group-normalized advantages from one or several rewards.

    Args:
        rewards: ``[num_groups, G]`` (one reward) or ``[num_groups, G, num_rewards]``.
        weights: one weight per reward (default: all 1).
        aggregation: with several rewards, ``"advantage"`` normalizes each reward within the group and
            takes the weighted sum of the normalized advantages (scale-free); ``"sum"`` takes the
            weighted sum of the raw rewards, then normalizes it.
        clip: ``A_max``; advantages are clipped to ``[-clip, clip]`` (``None``: no clipping).
        eps: added to the group std.

    Returns:
        float32 advantages ``[num_groups, G]``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"reward aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    rewards = rewards.to(torch.float32)
    if rewards.dim() == 2:
        rewards = rewards.unsqueeze(-1)
    if rewards.dim() != 3 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must be [num_groups, G(>=2)] or [num_groups, G, num_rewards], got {tuple(rewards.shape)}."
        )
    num_rewards = rewards.shape[-1]
    weights = torch.ones(num_rewards) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (num_rewards,):
        raise ValueError(f"Expected {num_rewards} reward weights, got {weights.numel()}.")
    weights = weights.to(rewards.device)

    per_reward = rewards.transpose(1, 2)  # [groups, rewards, G]: normalize along G
    if aggregation == "advantage":
        advantages = (normalize_in_groups(per_reward, eps) * weights[:, None]).sum(dim=1)
    else:
        advantages = normalize_in_groups((per_reward * weights[:, None]).sum(dim=1), eps)
    return advantages if clip is None else advantages.clamp(-clip, clip)
