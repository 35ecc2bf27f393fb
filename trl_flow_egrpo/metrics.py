"""The numbers logged every iteration, as pure functions of the iteration's (gathered) tensors."""

from __future__ import annotations

import torch


def rollout_metrics(
    rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
    group_step: torch.Tensor,
    advantages: torch.Tensor,
    reward_weights: torch.Tensor,
    reward_names: list[str],
    group_labels: list[str],
) -> dict[str, float]:
    """Reward and advantage statistics of one iteration.

    Args:
        rewards: ``[groups, G, R]`` every rollout's rewards.
        anchor_rewards: ``[prompts or 0, R]`` E-GRPO's anchors' rewards (logged, never trained on).
        group_step: ``[groups]`` each group's label index (E-GRPO: its step's position in the merge plan).
        advantages: ``[groups, G]`` the group-normalized advantages.
        reward_weights: ``[R]`` the rewards' weights.
        reward_names: the rewards' logged names.
        group_labels: names of the labels (E-GRPO: ``step_<k>``, logged as ``reward/<name>/step_<k>``, the mean
            reward of the groups branching at ``k``); empty to log no per-label means.

    Returns:
        ``reward/weighted_mean|std``, per reward ``mean``, ``std``, ``anchor_mean`` (with anchors) and the labels,
        ``zero_std_fraction`` (the share of groups whose advantages are all 0: their rewards have no spread,
        so they carry no learning signal) and ``advantage/mean|std|abs_max``.
    """
    weighted = (rewards * reward_weights.to(rewards.device)).sum(-1)
    metrics = {"reward/weighted_mean": weighted.mean().item(), "reward/weighted_std": weighted.std().item()}
    for r, name in enumerate(reward_names):
        metrics[f"reward/{name}/mean"] = rewards[..., r].mean().item()
        metrics[f"reward/{name}/std"] = rewards[..., r].std().item()
        if len(anchor_rewards):
            metrics[f"reward/{name}/anchor_mean"] = anchor_rewards[:, r].mean().item()
        for i, label in enumerate(group_labels):
            metrics[f"reward/{name}/{label}"] = rewards[group_step == i][..., r].mean().item()
    metrics["zero_std_fraction"] = (advantages == 0).all(dim=1).float().mean().item()
    metrics.update(
        {
            "advantage/mean": advantages.mean().item(),
            "advantage/std": advantages.std().item(),
            "advantage/abs_max": advantages.abs().max().item(),
        }
    )
    return metrics


def update_metrics(
    ratio: torch.Tensor,
    clipped: torch.Tensor,
    approx_kl: torch.Tensor,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    on_policy_deviation: torch.Tensor,
    kl: torch.Tensor | None = None,
) -> dict[str, float]:
    """Statistics of one iteration's policy update, from the values of all micro-batches (all processes).

    Args:
        ratio: every rollout's ratio, at every micro-batch.
        clipped: 1 where the clip acted on a ratio, else 0.
        approx_kl: the loss's approximate KL, one per micro-batch.
        loss: the loss, one per micro-batch.
        grad_norm: the gradient norm before clipping, one per optimizer step (NaN where unknown).
        on_policy_deviation: ``max |r - 1|`` of the micro-batches of the first optimizer step, whose policy
            is the sampling policy (METHOD.md section 6: must be ~0).
        kl: the KL to the reference model per group, or None when there is no KL penalty.
    """
    metrics = {
        "loss": loss.mean().item(),
        "ratio/mean": ratio.mean().item(),
        "ratio/min": ratio.min().item(),
        "ratio/max": ratio.max().item(),
        "ratio/on_policy_max_abs_dev": on_policy_deviation.max().item(),
        "clip_fraction": clipped.float().mean().item(),
        "approx_kl": approx_kl.mean().item(),
        "grad_norm": grad_norm.mean().item(),
    }
    if kl is not None:
        metrics["kl_to_reference"] = kl.mean().item()
    return metrics


DEPRECATED_ALIASES = {
    "transformer_evaluations": "trajectory_evaluations",
    "transformer_evaluations_per_rollout": "trajectory_evaluations_per_rollout",
}
"""Metric names kept for one release after their rename, each logging the value of the name it maps to (the old
``transformer_evaluations`` counted trajectory evaluations, not the transformer's rows). Removed in the next
release (CHANGELOG.md)."""


def sampling_cost_metrics(trajectory_evaluations: int, transformer_rows: int, num_rollouts: int) -> dict[str, float]:
    """What an iteration's sampling cost, in the two units that differ under classifier-free guidance.

    Args:
        trajectory_evaluations: velocity evaluations of all processes, one per trajectory per step (the unit of
            ``evaluations_per_prompt`` and of the algorithms' closed-form costs).
        transformer_rows: rows of the transformer's forward batches of all processes: the evaluations times 2
            under true classifier-free guidance (a conditional and a negative row), else equal.
        num_rollouts: rollouts of all processes (``groups * G``).

    Returns:
        ``trajectory_evaluations``, ``transformer_rows``, both per rollout (``..._per_rollout``), and the
        :data:`DEPRECATED_ALIASES`.
    """
    metrics = {
        "trajectory_evaluations": trajectory_evaluations,
        "transformer_rows": transformer_rows,
        "trajectory_evaluations_per_rollout": trajectory_evaluations / num_rollouts,
        "transformer_rows_per_rollout": transformer_rows / num_rollouts,
    }
    metrics.update({old: metrics[new] for old, new in DEPRECATED_ALIASES.items()})
    return metrics


def throughput_metrics(
    sampling_rows: int,
    sampling_seconds: float,
    update_rows: int,
    update_seconds: float,
    flops_per_row: int | None = None,
    peak_tflops: float | None = None,
) -> dict[str, float]:
    """Transformer throughput of one process's iteration, and the sampling phase's MFU when it is known.

    Args:
        sampling_rows: rows of the transformer's forward batches this process sampled (two per trajectory
            evaluation under classifier-free guidance).
        sampling_seconds: the sampling phase's wall time (transformer, SDE steps and VAE decoding).
        update_rows: rows of the update's policy forwards, counted alike (each also pays a backward).
        update_seconds: the update phase's wall time.
        flops_per_row: FLOPs of one row of the transformer's forward, or None.
        peak_tflops: the device's dense peak in TFLOP/s, or None.

    Returns:
        ``time/sampling_rows_per_s`` and ``time/update_rows_per_s`` (rows / s), and with both
        ``flops_per_row`` and ``peak_tflops``: ``time/sampling_mfu`` = ``sampling_rows * flops_per_row /
        sampling_seconds / (peak_tflops * 1e12)``, the share of the peak that the sampling phase's transformer
        FLOPs reach (decoding and the SDE count as time, not as FLOPs, so it is a lower bound of the
        transformer's own MFU).
    """
    metrics = {
        "time/sampling_rows_per_s": sampling_rows / sampling_seconds,
        "time/update_rows_per_s": update_rows / update_seconds,
    }
    if flops_per_row and peak_tflops:
        metrics["time/sampling_mfu"] = sampling_rows * flops_per_row / sampling_seconds / (peak_tflops * 1e12)
    return metrics
