r"""The (merged) SDE step and its log-probability (METHOD.md section 2).

A merged step starts at schedule index ``k``, spans ``l >= 1`` intervals and lands at ``k + l``. With
``s = sigmas[k]``, ``s' = sigmas[k + l]``, ``d = s' - s < 0`` and noise level ``a``:

.. math::

    c = a \sqrt{s / (1 - \tilde s)}, \qquad
    \mu = x + \Big(v + \frac{c^2}{2s}\big(x + (1 - s) v\big)\Big) d, \qquad
    \mathrm{std} = c \sqrt{-d}, \qquad x' = \mu + \mathrm{std}\,\varepsilon

where ``s~ = s`` except at ``s = 1``, where ``s~ = sigmas[1]`` (avoids the division by zero). Everything
runs in float32 whatever the model's dtype. ``a = 0`` is exactly the Euler (ODE) step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStepOutput:
    """Result of :func:`sde_step`.

    Attributes:
        sample: ``x'``, float32, shaped like the input latents.
        mean: ``mu``, float32, shaped like the input latents.
        std: the step's standard deviation, float32 ``[B]`` (one value per sample).
        log_prob: log-density of ``sample`` under ``N(mean, std^2 I)``, averaged over all latent elements
            of each sample, float32 ``[B]``. ``None`` when ``std == 0`` (noise level 0: the step is
            deterministic and has no density).
    """

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None


def _per_sample(value, batch_size: int, device) -> torch.Tensor:
    value = torch.as_tensor(value, device=device, dtype=torch.long)
    return value.expand(batch_size) if value.dim() == 0 else value


def diffusion_coefficient(sigmas: torch.Tensor, index, noise_level: float) -> torch.Tensor:
    """``c_k = a * sqrt(s / (1 - s~))`` at schedule index ``index`` (int or LongTensor), in the sigmas' dtype.

    ``s~ = s`` except at ``s = 1``, where ``s~ = sigmas[1]``: the coefficient is frozen at the left end
    of a (merged) interval, so it depends on the start index alone.
    """
    s = sigmas[index]
    s_tilde = torch.where(s >= 1.0, sigmas[1], s)
    return noise_level * torch.sqrt(s / (1.0 - s_tilde))


def sde_mean_std(
    latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index, merge_length, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one merged SDE step from ``sigmas[index]`` to ``sigmas[index + merge_length]``:
    its float32 mean ``mu`` (shaped like ``latents``) and per-sample ``std`` ``[B]`` (module docstring).

    Args:
        latents: ``x`` at ``sigmas[index]``, ``[B, ...]``, any float dtype.
        velocity: the model's velocity ``v(x, sigmas[index])``, same shape as ``latents``.
        sigmas: the schedule, ``[T + 1]``.
        index: start index ``k``: an int, or a LongTensor ``[B]`` (one start per sample).
        merge_length: ``l >= 1``: an int, or a LongTensor ``[B]``.
        noise_level: ``a``; 0 gives the deterministic Euler step (``std = 0``).
    """
    sigmas = sigmas.to(device=latents.device, dtype=torch.float32)
    start = _per_sample(index, latents.shape[0], latents.device)
    return _gaussian_step(
        latents, velocity, sigmas, start, merge_length, diffusion_coefficient(sigmas, start, noise_level)
    )


def constant_noise_sde_mean_std(
    latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One step of the SDE with a constant diffusion coefficient ``eta`` (DanceGRPO's form), from
    ``sigmas[index]`` to ``sigmas[index + 1]``: float32 mean and per-sample std.

    The reverse-time SDE ``dx = (v - eta^2 / 2 * score) dsigma + eta dW`` with the score of the flow-matching
    marginal, ``score = -(x + (1 - s) v) / s``, discretized by Euler-Maruyama over ``d = s' - s``:

    .. math:: \mu = x + \Big(v + \frac{\eta^2}{2s}\big(x + (1 - s) v\big)\Big) d, \qquad
              \mathrm{std} = \eta \sqrt{-d}

    i.e. the step of the module docstring with ``c`` held at ``eta`` instead of ``a sqrt(s / (1 - s))``: the
    noise is the same at every noise level, where Flow-GRPO's grows towards pure noise.
    """
    batch_size = latents.shape[0]
    sigmas = sigmas.to(device=latents.device, dtype=torch.float32)
    start = _per_sample(index, batch_size, latents.device)
    return _gaussian_step(
        latents, velocity, sigmas, start, 1, torch.full((batch_size,), float(eta), device=latents.device)
    )


def _gaussian_step(latents, velocity, sigmas, start, merge_length, c):
    """``mu = x + (v + c^2 / (2 s) (x + (1 - s) v)) d`` and ``std = c sqrt(-d)`` for per-sample ``c`` ``[B]``."""
    batch_size = latents.shape[0]
    end = start + _per_sample(merge_length, batch_size, latents.device)
    if bool((end >= len(sigmas)).any()) or bool((end <= start).any()):
        raise ValueError(f"Merged steps must satisfy 1 <= merge_length and index + merge_length <= {len(sigmas) - 1}.")
    view = (batch_size,) + (1,) * (latents.dim() - 1)
    x = latents.to(torch.float32)
    v = velocity.to(torch.float32)
    s = sigmas[start]
    d = (sigmas[end] - s).view(view)
    s = s.view(view)
    mean = x + (v + (c.view(view) ** 2 / (2 * s)) * (x + (1 - s) * v)) * d
    return mean, c * torch.sqrt(-d.view(batch_size))


def sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigmas: torch.Tensor,
    index,
    merge_length,
    noise_level: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sample: torch.Tensor | None = None,
) -> SDEStepOutput:
    """One merged SDE step from ``sigmas[index]`` to ``sigmas[index + merge_length]``: the Gaussian of
    :func:`sde_mean_std`, a draw ``x' = mu + std * eps`` from it, and the draw's log-density.

    Args:
        latents, velocity, sigmas, index, merge_length, noise_level: as :func:`sde_mean_std`.
        noise: ``eps``, the standard normal noise to use (``sample = mean + std * noise``); drawn from
            ``generator`` when omitted.
        generator: random generator for ``noise``. Noise is drawn on the generator's device, then moved.
        sample: evaluate ``log_prob`` at this given ``x'`` instead of drawing one (training recomputes
            the log-probability of the stored samples under the current model this way).

    Returns:
        :class:`SDEStepOutput` with the float32 ``sample``, ``mean``, per-sample ``std`` and ``log_prob``.
    """
    mean, std = sde_mean_std(latents, velocity, sigmas, index, merge_length, noise_level)
    return sample_gaussian_step(mean, std, noise, generator, sample)


def sample_gaussian_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sample: torch.Tensor | None = None,
) -> SDEStepOutput:
    """Draw ``x' = mean + std * eps`` (or take the given ``sample``) and its log-density; ``std == 0``
    everywhere gives no density (``log_prob=None``). Arguments as :func:`sde_step`."""
    view = (mean.shape[0],) + (1,) * (mean.dim() - 1)
    if sample is None:
        if noise is None:
            gen_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
        sample = mean + std.view(view) * noise.to(device=mean.device, dtype=torch.float32)
    else:
        sample = sample.to(torch.float32)
    if not bool((std > 0).any()):
        return SDEStepOutput(sample=sample, mean=mean, std=std, log_prob=None)
    return SDEStepOutput(sample=sample, mean=mean, std=std, log_prob=gaussian_log_prob(sample, mean, std))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``sample`` under ``N(mean, std^2 I)`` with all constants, averaged over each
    sample's elements: ``mean(-(x' - mu)^2 / (2 std^2) - log(std) - log(sqrt(2 pi)))``, ``[B]``.

    Averaging (not summing) fixes the scale that the tiny PPO clip range (1e-4) is tuned for.
    """
    view = (sample.shape[0],) + (1,) * (sample.dim() - 1)
    std = std.view(view)
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.flatten(1).mean(dim=1)


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL divergence between ``N(mean, std^2 I)`` and ``N(reference_mean, std^2 I)``, averaged over
    each sample's elements like the log-probability: ``mean((mu - mu_ref)^2) / (2 std^2)``, ``[B]``."""
    squared = (mean - reference_mean).pow(2).flatten(1).mean(dim=1)
    return squared / (2 * std.pow(2))


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index) -> torch.Tensor:
    """The deterministic ODE step ``x + (sigmas[k + 1] - sigmas[k]) * v``, in float32; ``index`` may be an
    int or a LongTensor ``[B]``.

    For a float32 pipeline this is exactly ``FlowMatchEulerDiscreteScheduler.step``. For a bf16/fp16
    pipeline it is not: the pipeline casts each step's result back to the model dtype (rounding the
    trajectory at every step), while rollouts keep the trajectory in float32 and round only the model's
    input.
    """
    batch_size = latents.shape[0]
    sigmas = sigmas.to(device=latents.device, dtype=torch.float32)
    start = _per_sample(index, batch_size, latents.device)
    dt = (sigmas[start + 1] - sigmas[start]).view((batch_size,) + (1,) * (latents.dim() - 1))
    return latents.to(torch.float32) + dt * velocity.to(torch.float32)
