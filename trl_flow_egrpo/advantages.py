r"""Multi-step group-normalized advantages (METHOD.md section 5).

A group is ``(prompt, merged step)``: the ``G`` rollouts that share the anchor prefix and branch with
the same merged SDE step. Within a group,

.. math:: A_j = \mathrm{clip}\Big(\frac{R_j - \mathrm{mean}(R)}{\mathrm{std}(R) + \epsilon}, -A_{max}, A_{max}\Big)

with the unbiased standard deviation. Only the terminal reward is used.

Flow-GRPO's ``global_std`` (``advantage_std="batch"``) keeps each group's mean but divides by the std of all
rewards of the batch (every group of the iteration):

.. math:: A_{gj} = \mathrm{clip}\Big(\frac{R_{gj} - \mathrm{mean}(R_g)}{\mathrm{std}(R) + \epsilon},
          -A_{max}, A_{max}\Big)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AGGREGATIONS = ("advantage", "sum")
STD_SCOPES = ("group", "batch")


def normalize_in_groups(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(R - mean(R)) / (std(R) + eps)`` along the group dimension (``dim=-1``), unbiased std."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + eps)


def normalize_with_batch_std(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(R - mean(R_group)) / (std(R_batch) + eps)`` for ``[..., num_groups, G]`` rewards: the mean along the
    group dimension (``dim=-1``), the unbiased std over the last two (all groups and members together)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.flatten(-2).std(dim=-1, unbiased=True)[..., None, None]
    return (rewards - mean) / (std + eps)


def group_advantages(
    rewards: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    aggregation: str = "advantage",
    clip: float | None = 5.0,
    eps: float = 1e-8,
    std: str = "group",
) -> torch.Tensor:
    """Group-normalized advantages from one or several rewards.

    Args:
        rewards: ``[num_groups, G]`` (one reward) or ``[num_groups, G, num_rewards]``.
        weights: one weight per reward (default: all 1).
        aggregation: with several rewards, ``"advantage"`` normalizes each reward within the group and
            takes the weighted sum of the normalized advantages (scale-free); ``"sum"`` takes the
            weighted sum of the raw rewards, then normalizes it.
        clip: ``A_max``; advantages are clipped to ``[-clip, clip]`` (``None``: no clipping).
        eps: added to the std.
        std: ``"group"`` divides by each group's std; ``"batch"`` by the std of all ``num_groups * G`` rewards
            (per reward with ``aggregation="advantage"``), each group keeping its own mean (Flow-GRPO's
            ``global_std``).

    Returns:
        float32 advantages ``[num_groups, G]``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"reward aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    if std not in STD_SCOPES:
        raise ValueError(f"advantage std must be one of {STD_SCOPES}, got {std!r}.")
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

    per_reward = rewards.permute(2, 0, 1)  # [rewards, groups, G]: normalize along G (and groups for "batch")
    normalize = normalize_in_groups if std == "group" else normalize_with_batch_std
    if aggregation == "advantage":
        advantages = (normalize(per_reward, eps) * weights[:, None, None]).sum(dim=0)
    else:
        advantages = normalize((per_reward * weights[:, None, None]).sum(dim=0), eps)
    return advantages if clip is None else advantages.clamp(-clip, clip)


def sum_advantages_into_targets(advantages: torch.Tensor, group_target: torch.Tensor) -> torch.Tensor:
    r"""Add each group's advantages to those of its target group: ``out[t] = sum_{g : target(g) = t} A_g``.

    E-GRPO's ``completion_granularities`` (METHOD.md 4b, the authors' ``granular_list``) complete every sample
    ``x'`` once per stride; each stride's completions form a group of their own, normalized on its own rewards,
    and the update trains the one stochastic step with the sum over strides, :math:`A_j = \sum_g A^{(g)}_j`
    (member ``j`` of every such group is the same sample). A group that is nobody's target keeps 0 in the result.

    Args:
        advantages: ``[num_groups, G]`` the group-normalized advantages.
        group_target: ``[num_groups]`` the target group of each group (itself when there is one granularity).

    Returns:
        ``[num_groups, G]``; equal to ``advantages`` when every group targets itself.
    """
    if group_target.shape != advantages.shape[:1]:
        raise ValueError(
            f"group_target must hold one target per group ({advantages.shape[0]}), got {tuple(group_target.shape)}."
        )
    target = group_target.to(advantages.device)
    return torch.zeros_like(advantages).index_add_(0, target, advantages)
