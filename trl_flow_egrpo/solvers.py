r"""Deterministic ODE solvers for the completion after a stochastic step (METHOD.md section 4b).

E-GRPO completes every rollout with the deterministic ODE from the index ``k + l`` its merged SDE step lands at
down to sigma 0. The completion only has to rank the ``G`` members of a group by reward, so it may be
approximate: besides Euler on every remaining step (:func:`~trl_flow_egrpo.sde.euler_step`, the paper's
default) this module offers DPM-Solver++ 2M on a subset of the remaining sigmas (:func:`completion_indices`,
:func:`dpmpp_2m_step`). MixGRPO-Flash's compressed ODE after its window uses the same two functions.

Flow-matching convention: ``x_sigma = (1 - sigma) x0 + sigma * noise`` and the model's velocity is
``v = noise - x0``, so the data prediction is ``x0 = x - sigma * v``.
"""

from __future__ import annotations

import math

import torch

#: The completion solvers :func:`~trl_flow_egrpo.config.EGRPOConfig` accepts.
COMPLETION_SOLVERS = ("euler", "dpmpp_2m")


def completion_indices(num_steps: int, start: int, fraction: float) -> list[int]:
    """The schedule indices (into ``sigmas[0..T]``) a completion from index ``start`` to ``T = num_steps`` visits.

    The ``n = num_steps - start`` remaining intervals are replaced by ``m = max(1, ceil(fraction * n))``
    intervals (at least the asked share), evenly spaced in index: the ``i``-th visited index is
    ``start + round(i * n / m)`` for ``i = 0..m`` (halves round up). Since ``n / m >= 1`` the indices are
    strictly increasing; they always begin at ``start`` and end at ``num_steps`` (sigma 0). ``fraction = 1``
    visits every index. Evenly spaced in index (not in sigma) follows the sampler's own, already shifted,
    spacing. A completion visiting ``m + 1`` indices costs ``m`` transformer evaluations (one per interval, none
    at sigma 0). With the testbed's setting (T = 16, tau = 2.2, G = 8, 4 prompts) the ceiling gives 1,216 rows
    per iteration at 0.4, the count METHOD.md 4b quotes (2,720 at 1.0).

    Args:
        num_steps: ``T``, the schedule's number of steps.
        start: the index the completion starts at, ``0 <= start < num_steps``.
        fraction: the share of the remaining intervals to keep, ``0 < fraction <= 1``.

    Returns:
        The visited indices, ``[start, ..., num_steps]``.
    """
    if not 0 <= start < num_steps:
        raise ValueError(f"completion_indices needs 0 <= start < num_steps, got start={start}, num_steps={num_steps}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"completion_steps_fraction must be in (0, 1], got {fraction}.")
    remaining = num_steps - start
    # Rounded to 9 decimals before the ceiling so that float error (0.4 * 15 = 6.000000000000001) does not add one.
    return evenly_spaced_indices(start, num_steps, max(1, math.ceil(round(fraction * remaining, 9))))


def evenly_spaced_indices(start: int, end: int, num_intervals: int) -> list[int]:
    """``num_intervals + 1`` integer indices from ``start`` to ``end``, evenly spaced: the ``i``-th is
    ``start + round(i * (end - start) / num_intervals)``, halves rounded up. Strictly increasing for
    ``1 <= num_intervals <= end - start``; :func:`completion_indices` with the number of intervals given directly
    (for a caller whose count rule differs, e.g. MixGRPO-Flash's)."""
    span = end - start
    if not 1 <= num_intervals <= span:
        raise ValueError(f"evenly_spaced_indices needs 1 <= num_intervals <= end - start, got {num_intervals}, {span}.")
    return [start + (2 * i * span + num_intervals) // (2 * num_intervals) for i in range(num_intervals + 1)]


def completion_evaluations(num_steps: int, start: int, fraction: float, granularity: int = 1) -> int:
    """Transformer evaluations of one completion from ``start`` to ``num_steps``: its number of intervals.

    With ``granularity = g > 1`` (the authors' stride option) the completion first keeps every ``g``-th index
    of the remaining schedule (``start, start + g, ...``, always ending at ``num_steps``), then ``fraction``
    of those intervals (:func:`completion_indices` on the strided schedule).
    """
    return len(strided_completion_indices(num_steps, start, fraction, granularity)) - 1


def strided_completion_indices(num_steps: int, start: int, fraction: float, granularity: int = 1) -> list[int]:
    """:func:`completion_indices` on the schedule strided by ``granularity``: the remaining indices
    ``start, start + g, start + 2g, ...`` with ``num_steps`` appended when the stride misses it, thinned to
    ``fraction`` of their intervals. ``granularity = 1`` is :func:`completion_indices` itself."""
    if granularity < 1:
        raise ValueError(f"completion granularities must be integers >= 1, got {granularity}.")
    strided = list(range(start, num_steps, granularity)) + [num_steps]
    positions = completion_indices(len(strided) - 1, 0, fraction)
    return [strided[position] for position in positions]


def _per_sample_sigma(sigma, latents: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a float, a 0-d tensor or a ``[B]`` tensor) as a float32 ``[B, 1, ..., 1]`` tensor."""
    batch_size = latents.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    sigma = sigma.expand(batch_size) if sigma.dim() == 0 else sigma
    if sigma.shape != (batch_size,):
        raise ValueError(f"Per-sample sigmas must have shape [{batch_size}], got {tuple(sigma.shape)}.")
    return sigma.view((batch_size,) + (1,) * (latents.dim() - 1))


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """``lambda = log((1 - sigma) / sigma)``, the half log signal-to-noise ratio of the flow convention
    (``alpha = 1 - sigma``): ``-inf`` at sigma 1 (pure noise), ``+inf`` at sigma 0 (data)."""
    return torch.log1p(-sigma) - torch.log(sigma)


def dpmpp_2m_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    previous_x0: torch.Tensor | None = None,
    sigma_previous=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One DPM-Solver++ 2M step (data prediction, multistep) of the flow-matching ODE from ``sigma`` to
    ``sigma_next``; returns ``(next_latents, x0)`` in float32, ``x0`` to be passed back as ``previous_x0``.

    With ``alpha = 1 - sigma`` and the half log-SNR ``lambda = log(alpha / sigma)``, the probability-flow ODE in
    data prediction ``x0(x, sigma) = x - sigma * v`` integrates exactly to

    .. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s + \sigma_t \int_{\lambda_s}^{\lambda_t} e^{\lambda} x_0\,d\lambda.

    Holding ``x0`` constant over the step (first order, DPM-Solver++ 1 = DDIM) gives, with ``h = lambda_t -
    lambda_s``,

    .. math:: x_t = \frac{\sigma_t}{\sigma_s} x_s - \alpha_t (e^{-h} - 1) D
              = \frac{\sigma_t}{\sigma_s} x_s + \Big(\alpha_t - \alpha_s \frac{\sigma_t}{\sigma_s}\Big) D,
              \qquad D = x_0(x_s, \sigma_s).

    For this convention that is exactly the Euler step ``x_s + (sigma_t - sigma_s) v``. The second order (2M)
    keeps the same update but with ``x0`` linearly extrapolated in ``lambda`` from the previous step's data
    prediction ``x0_prev`` at ``sigma_previous``: with ``h_prev = lambda_s - lambda_prev`` and ``r = h_prev / h``,

    .. math:: D = \Big(1 + \frac{1}{2r}\Big) x_0 - \frac{1}{2r} x_{0,\mathrm{prev}}.

    The first order is used where there is no previous step (``previous_x0`` is None, or ``sigma_previous`` is
    1, where ``lambda = -inf``) and on the last step to ``sigma_next = 0``, which then lands exactly on ``x0``
    (``alpha_t = 1``, ``sigma_t = 0``): the completion ends on the model's own data prediction.

    Args:
        latents: ``x`` at ``sigma``, ``[B, ...]``.
        velocity: ``v(x, sigma)``, same shape.
        sigma: the current sigma: a float or a ``[B]`` tensor (one per sample, ``0 < sigma <= 1``).
        sigma_next: the target sigma, ``0 <= sigma_next < sigma``, a float or ``[B]``.
        previous_x0: the previous step's ``x0`` (second element of this function's result), or None.
        sigma_previous: the sigma ``previous_x0`` was predicted at (``> sigma``), a float or ``[B]``; required
            with ``previous_x0``.
    """
    x = latents.to(torch.float32)
    s = _per_sample_sigma(sigma, x)
    t = _per_sample_sigma(sigma_next, x)
    if bool((t >= s).any()) or bool((t < 0).any()) or bool((s > 1).any()):
        raise ValueError("dpmpp_2m_step needs 1 >= sigma > sigma_next >= 0 for every sample.")
    x0 = x - s * velocity.to(torch.float32)
    data = x0
    if previous_x0 is not None:
        if sigma_previous is None:
            raise ValueError("dpmpp_2m_step needs sigma_previous together with previous_x0.")
        p = _per_sample_sigma(sigma_previous, x)
        if bool((p <= s).any()):
            raise ValueError("dpmpp_2m_step needs sigma_previous > sigma for every sample.")
        # Second order only where both log-SNR gaps are finite; elsewhere 1/(2r) = 0 (first order).
        second_order = (t > 0) & (p < 1)
        safe_t = torch.where(second_order, t, s / 2)
        safe_p = torch.where(second_order, p, (1 + s) / 2)
        h = half_log_snr(safe_t) - half_log_snr(s)
        h_previous = half_log_snr(s) - half_log_snr(safe_p)
        weight = torch.where(second_order, h / (2 * h_previous), torch.zeros_like(h))
        data = x0 + weight * (x0 - previous_x0.to(torch.float32))
    ratio = t / s
    next_latents = ratio * x + ((1 - t) - (1 - s) * ratio) * data
    return next_latents, x0


def integrate_ode(velocity_fn, latents: torch.Tensor, sigmas: list[float], solver: str = "euler") -> torch.Tensor:
    """Integrate the flow ODE through the decreasing ``sigmas`` (one shared path for the whole batch) with
    ``solver`` (``"euler"`` or ``"dpmpp_2m"``); ``velocity_fn(x, sigma) -> v``. A reference implementation for
    tests and benchmarks: the rollout engine advances per-sample paths in lock step instead."""
    if solver not in COMPLETION_SOLVERS:
        raise ValueError(f"Unknown completion solver {solver!r}; choose one of {COMPLETION_SOLVERS}.")
    x = latents.to(torch.float32)
    previous_x0 = previous_sigma = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        velocity = velocity_fn(x, sigma)
        if solver == "euler":
            x = x + (sigma_next - sigma) * velocity.to(torch.float32)
        else:
            x, x0 = dpmpp_2m_step(x, velocity, sigma, sigma_next, previous_x0, previous_sigma)
            previous_x0, previous_sigma = x0, sigma
    return x
