r"""The PPO-clip objective of the policy update (METHOD.md section 6), with GRPO-Guard's ratio normalization as an
option; and the objectives of the forward-process methods (DiffusionNFT, AWM), trained on forward-noised clean
samples instead of the rollouts' stochastic steps.

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
        ratio: the per-sample ratios ``r_j`` the clip acts on (GRPO-Guard's normalized ratios when enabled; detached).
        clipped: per-sample bool, True where the clipped term was the active one.
        approx_kl: ``mean(((r - 1) - log r))`` of the raw (unnormalized) ratios, the non-negative k3 estimator of
            KL(old || new).
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    approx_kl: torch.Tensor


@dataclass
class RatioNormalization:
    """What GRPO-Guard's ratio normalization needs of each sample's Gaussian step, all ``[N]``.

    Attributes:
        mean_drift: ``mean((mu_theta - mu_old)^2)`` over the latent elements, the squared drift of the step's mean
            since sampling, with gradient through ``mu_theta`` (:func:`mean_drift`).
        std: the step's std ``s`` (shared by the old and the current policy: it depends on the schedule only).
    """

    mean_drift: torch.Tensor
    std: torch.Tensor


def mean_drift(mean: torch.Tensor, old_mean: torch.Tensor) -> torch.Tensor:
    """``mean((mean - old_mean)^2)`` over each row's elements, ``[B]``: the averaged squared drift of a Gaussian
    step's mean, on the element-averaged scale of :func:`~trl_flow_egrpo.sde.gaussian_log_prob`."""
    return (mean - old_mean.detach()).pow(2).flatten(1).mean(dim=1)


def normalized_log_ratio(log_ratio: torch.Tensor, mean_drift: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r"""GRPO-Guard's ratio normalization (RatioNorm) of the element-averaged log-ratio of Gaussian steps, ``[N]``.

    For ``x' = mu_old + s eps`` (``eps ~ N(0, I)``, ``D`` elements) and the current mean ``mu = mu_old + d``:

    .. math:: \log r = \frac{\overline{\epsilon\, d}}{s} - \frac{\overline{d^2}}{2 s^2}, \qquad
              \log \hat r = s\Big(\log r + \frac{\overline{d^2}}{2 s^2}\Big) = \overline{\epsilon\, d}

    (bars: means over the elements). The raw log-ratio's mean ``-mean(d^2) / (2 s^2)`` and its spread
    ``rms(d) / (s sqrt(D))`` both grow as the step's std ``s`` shrinks: low-noise steps' ratios drift below 1 and
    scatter, so the clip misses their positive-advantage samples. Adding the mean shift back and scaling by ``s``
    leaves ``mean(eps d)``: mean 0 and spread ``rms(d) / sqrt(D)`` at every step, whatever its noise level.
    On-policy (``d = 0``) it is exactly 0. Its gradient is ``mean(eps * dmu)``: ``s`` times the raw one.
    """
    return (log_ratio + mean_drift / (2 * std**2)) * std


def step_weights(sigmas: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    r"""GRPO-Guard's gradient reweighting of Gaussian steps spanning ``sigmas[start]`` to ``sigmas[start + length]``,
    ``[B]``, for a schedule of ``T = len(sigmas) - 1`` steps from 1 to 0:

    .. math:: w = \frac{1}{T\,(\sigma_{k} - \sigma_{k + l})}

    A step's mean moves with its velocity by a multiple of its interval ``sigma_k - sigma_{k+l}``, so the gradient
    of the normalized ratio (``mean(eps * dmu)``, :func:`normalized_log_ratio`) is proportional to the interval:
    ``1 / interval`` gives every step the same weight per unit of velocity. The ``1 / T`` keeps a uniform
    schedule's weights at 1, so the learning rate and ``max_grad_norm`` keep their scale (the paper's weight is
    ``1 / interval`` alone).
    """
    intervals = sigmas[start] - sigmas[start + length]
    return 1.0 / ((len(sigmas) - 1) * intervals)


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    normalization: RatioNormalization | None = None,
    weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO-clip loss (to minimize) for per-sample log-probabilities and advantages, all ``[N]``.

    With ``normalization``, the clip acts on GRPO-Guard's normalized ratio ``exp(normalized_log_ratio(...))``
    (:func:`normalized_log_ratio`) instead of the raw one. ``weights`` ``[N]`` (e.g. :func:`step_weights`) weight
    each sample's term in the mean.
    """
    log_ratio = log_prob - old_log_prob.detach()
    raw_ratio = torch.exp(log_ratio)
    if normalization is None:
        ratio = raw_ratio
    else:
        ratio = torch.exp(normalized_log_ratio(log_ratio, normalization.mean_drift, normalization.std))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = (per_sample if weights is None else weights * per_sample).mean()
    with torch.no_grad():
        approx_kl = ((raw_ratio - 1) - log_ratio).mean()
        is_clipped = clipped > unclipped
    return PolicyLossOutput(loss=loss, ratio=ratio.detach(), clipped=is_clipped, approx_kl=approx_kl)


# --- forward-process objectives (DiffusionNFT, AWM): trained on forward-noised clean samples -----------------


def forward_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process ``x_t = (1 - t) x0 + t eps`` at ``t = sigma`` (``[B]``), in float32."""
    t = sigma.to(torch.float32).view(-1, *[1] * (clean.dim() - 1))
    return (1 - t) * clean.to(torch.float32) + t * noise.to(torch.float32)


def flow_matching_log_likelihood(velocity: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``-mean((v - (eps - x0))^2)`` over each row's elements, ``[B]``: the flow-matching loss negated, which AWM
    uses as the policy's log-likelihood of its clean sample ``x0`` (up to constants and the time weighting)."""
    target = noise.to(torch.float32) - clean.to(torch.float32)
    return -(velocity.to(torch.float32) - target).pow(2).flatten(1).mean(dim=1)


def nft_optimality(advantages: torch.Tensor, advantage_clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r = clamp(A / (2 A_max) + 1/2, 0, 1)`` of clipped advantages:
    ``A = 0`` (the group's mean) is 1/2, ``A = +-A_max`` are 1 and 0."""
    return torch.clamp(advantages / (2 * advantage_clip) + 0.5, 0.0, 1.0)


def _x0_regression(prediction: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``mean((x0_hat - x0)^2) / sg(mean|x0_hat - x0|)`` per row, ``[B]``: DiffusionNFT's adaptively weighted x0
    regression. The stop-gradient weight (at least 1e-5) evens out the loss's scale across timesteps and samples,
    whose x0 errors differ by orders of magnitude."""
    error = prediction - clean
    weight = error.detach().abs().flatten(1).mean(dim=1).clamp(min=1e-5)
    return error.pow(2).flatten(1).mean(dim=1) / weight


def nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    sigma: torch.Tensor,
    optimality: torch.Tensor,
    nft_beta: float,
    advantage_clip: float,
) -> torch.Tensor:
    r"""DiffusionNFT's loss (to minimize), a scalar: the mean over the batch of

    .. math:: \frac{A_{max}}{\beta}\Big(r\, \ell(v^+) + (1 - r)\, \ell(v^-)\Big), \quad
              v^+ = (1 - \beta) v_{old} + \beta v_\theta, \quad v^- = (1 + \beta) v_{old} - \beta v_\theta

    where ``l(v)`` regresses ``x_t - t v`` on the clean sample ``x0`` (:func:`_x0_regression`; the x0 error is
    ``t`` times the velocity error against ``eps - x0``). A sample of optimality ``r = 1`` pulls the implicit
    positive policy ``v+`` to it, ``r = 0`` the implicit negative one ``v-``, i.e. pushes ``v_theta`` away:
    the two cancel at ``r = 1/2``. ``old_velocity`` is the sampling ("old") policy's, without gradient.
    ``A_max / beta`` keeps the gradient's scale independent of ``beta`` and of the advantage clip (official)."""
    t = sigma.to(torch.float32).view(-1, *[1] * (clean.dim() - 1))
    velocity, old_velocity = velocity.to(torch.float32), old_velocity.detach().to(torch.float32)
    positive = (1 - nft_beta) * old_velocity + nft_beta * velocity
    negative = (1 + nft_beta) * old_velocity - nft_beta * velocity
    clean = clean.to(torch.float32)
    per_sample = optimality * _x0_regression(noisy - t * positive, clean) + (1 - optimality) * _x0_regression(
        noisy - t * negative, clean
    )
    return (per_sample * advantage_clip / nft_beta).mean()


def velocity_kl(velocity: torch.Tensor, reference_velocity: torch.Tensor) -> torch.Tensor:
    """``mean((v - v_ref)^2)`` over each row's elements, ``[B]``: the velocity-space KL penalty of the
    forward-process methods (DiffusionNFT's and AWM's official form, without the Gaussian's ``1 / (2 s^2)``)."""
    return (velocity.to(torch.float32) - reference_velocity.detach().to(torch.float32)).pow(2).flatten(1).mean(dim=1)


def old_policy_decay(optimizer_steps: int, rate: float, maximum: float) -> float:
    """The EMA decay of DiffusionNFT's old policy after ``optimizer_steps`` optimizer steps: ``min(rate * steps,
    maximum)``. It starts at 0 (the old policy is the current one: on-policy) and lets the old policy lag more as
    training goes on (official ``decay_type=1``: rate 0.001, maximum 0.5)."""
    return min(rate * optimizer_steps, maximum)


@torch.no_grad()
def ema_update_(old: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """In place, ``old <- decay * old + (1 - decay) * current`` for every tensor of ``old`` (same names)."""
    for name, tensor in old.items():
        tensor.mul_(decay).add_(current[name].detach().to(tensor.dtype), alpha=1 - decay)
