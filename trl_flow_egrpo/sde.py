r"""The (merged) SDE step and its log-probability (METHOD.md section 2).

A merged step starts at schedule index ``k``, spans ``l >= 1`` intervals and lands at ``k + l``. With
``s = sigmas[k]``, ``s' = sigmas[k + l]``, ``d = s' - s < 0`` and noise level ``a``:

.. math::

    c = a \sqrt{s / (1 - \tilde s)}, \qquad
    \mu = x + \Big(v + \frac{c^2}{2s}\big(x + (1 - s) v\big)\Big) d, \qquad
    \mathrm{std} = c \sqrt{-d}, \qquad x' = \mu + \mathrm{std}\,\varepsilon

where ``s~ = s`` except at ``s = 1``, where ``s~ = sigmas[1]`` (avoids the division by zero). Everything
runs in float32 whatever the model's dtype. ``a = 0`` is exactly the Euler (ODE) step.

``sde_type="cps"`` replaces this SDE by coefficient-preserving sampling (:func:`cps_mean_std`, Wang & Yu 2025):
the step re-noises the predicted clean image with noise of total scale exactly ``s'``, docs/concepts.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

SDE_TYPES = ("sde", "cps")
"""The samplers of the stochastic step (``EGRPOConfig.sde_type``): Flow-GRPO's SDE, or coefficient-preserving
sampling."""


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


def _step_end(latents, sigmas, start, merge_length) -> torch.Tensor:
    """The landing index ``start + merge_length`` ``[B]`` of merged steps, checked to lie inside the schedule."""
    end = start + _per_sample(merge_length, latents.shape[0], latents.device)
    if bool((end >= len(sigmas)).any()) or bool((end <= start).any()):
        raise ValueError(f"Merged steps must satisfy 1 <= merge_length and index + merge_length <= {len(sigmas) - 1}.")
    return end


def _gaussian_step(latents, velocity, sigmas, start, merge_length, c):
    """``mu = x + (v + c^2 / (2 s) (x + (1 - s) v)) d`` and ``std = c sqrt(-d)`` for per-sample ``c`` ``[B]``."""
    batch_size = latents.shape[0]
    end = _step_end(latents, sigmas, start, merge_length)
    view = (batch_size,) + (1,) * (latents.dim() - 1)
    x = latents.to(torch.float32)
    v = velocity.to(torch.float32)
    s = sigmas[start]
    d = (sigmas[end] - s).view(view)
    s = s.view(view)
    mean = x + (v + (c.view(view) ** 2 / (2 * s)) * (x + (1 - s) * v)) * d
    return mean, c * torch.sqrt(-d.view(batch_size))


def cps_angle(noise_level: float, merge_length) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(cos(theta_l), sin(theta_l))`` of a CPS step over ``merge_length`` intervals, float64: the effective angle
    with ``cos(theta_l) = cos(theta)^l`` and ``theta = a pi / 2`` (:func:`cps_mean_std`).

    ``sin(theta_l) = sqrt(1 - cos(theta)^{2l})``, the share of the landing sigma that is fresh noise.
    """
    if not 0 <= noise_level <= 1:
        raise ValueError(
            f"noise_level={noise_level!r} is not allowed with sde_type='cps': it must be in [0, 1] (the angle "
            "a * pi / 2 runs from the Euler step, a = 0, to fully fresh noise, a = 1)."
        )
    cos_l = math.cos(noise_level * math.pi / 2) ** torch.as_tensor(merge_length, dtype=torch.float64)
    return cos_l, torch.sqrt(1 - cos_l**2)


def cps_mean_std(
    latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index, merge_length, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The Gaussian of one merged coefficient-preserving (CPS) step from ``s = sigmas[index]`` to
    ``s' = sigmas[index + merge_length]``: float32 mean (shaped like ``latents``) and per-sample std ``[B]``.

    With the predicted clean image ``x0 = x - s v`` and noise ``e = x + (1 - s) v`` (so ``x = (1 - s) x0 + s e``),
    ``theta = a pi / 2`` and ``cos(theta_l) = cos(theta)^l``:

    .. math:: \mu = (1 - s') \hat x_0 + s' \cos(	heta_l)\, \hat e, \qquad
              \mathrm{std} = s' \sin(	heta_l) = s' \sqrt{1 - \cos(	heta)^{2l}}

    ``l = 1`` is the CPS step (std ``s' sin(theta)``, mean ``(1 - s') x0 + sqrt(s'^2 - std^2) e``). A merged step
    is ``l`` CPS steps with the clean-image prediction ``x0`` frozen at the left end (the one velocity
    evaluation): each one maps the noise part ``e`` to ``cos(theta) e + sin(theta) eps_j``, so after ``l`` of them
    it is ``cos(theta)^l e + sqrt(1 - cos(theta)^{2l}) eps``, a single CPS step of angle ``theta_l``. The noise
    part keeps unit variance (the "coefficient" of noise is exactly ``s'``) whenever ``e`` has it. ``a = 0`` is
    the Euler step over the merged interval; landing at ``s' = 0`` gives ``std = 0`` (no density: such a step
    can be sampled but not trained). Arguments as :func:`sde_mean_std`, with ``0 <= noise_level <= 1``.
    """
    batch_size = latents.shape[0]
    sigmas = sigmas.to(device=latents.device, dtype=torch.float32)
    start = _per_sample(index, batch_size, latents.device)
    end = _step_end(latents, sigmas, start, merge_length)
    # The angle in float64 on the CPU: 1 - cos^2l loses digits in float32 for small noise levels.
    cos_l, sin_l = (
        value.to(device=latents.device, dtype=torch.float32)
        for value in cps_angle(noise_level, _per_sample(merge_length, batch_size, "cpu"))
    )
    view = (batch_size,) + (1,) * (latents.dim() - 1)
    x = latents.to(torch.float32)
    v = velocity.to(torch.float32)
    s, s_next = sigmas[start].view(view), sigmas[end]
    clean, noise = x - s * v, x + (1 - s) * v
    mean = (1 - s_next.view(view)) * clean + (s_next * cos_l).view(view) * noise
    return mean, s_next * sin_l


def step_mean_std(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigmas: torch.Tensor,
    index,
    merge_length,
    noise_level: float,
    sde_type: str = "sde",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of a merged stochastic step under the sampler ``sde_type``: :func:`sde_mean_std` (``"sde"``)
    or :func:`cps_mean_std` (``"cps"``). Other arguments as :func:`sde_mean_std`."""
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type={sde_type!r} is not allowed: sde_type must be one of {SDE_TYPES}.")
    step = cps_mean_std if sde_type == "cps" else sde_mean_std
    return step(latents, velocity, sigmas, index, merge_length, noise_level)


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
    sde_type: str = "sde",
) -> SDEStepOutput:
    """One merged stochastic step from ``sigmas[index]`` to ``sigmas[index + merge_length]``: the Gaussian of
    :func:`step_mean_std`, a draw ``x' = mu + std * eps`` from it, and the draw's log-density.

    Args:
        latents, velocity, sigmas, index, merge_length, noise_level: as :func:`sde_mean_std`.
        noise: ``eps``, the standard normal noise to use (``sample = mean + std * noise``); drawn from
            ``generator`` when omitted.
        generator: random generator for ``noise``. Noise is drawn on the generator's device, then moved.
        sample: evaluate ``log_prob`` at this given ``x'`` instead of drawing one (training recomputes
            the log-probability of the stored samples under the current model this way).
        sde_type: the sampler, ``"sde"`` (Flow-GRPO's SDE) or ``"cps"`` (coefficient-preserving sampling).

    Returns:
        :class:`SDEStepOutput` with the float32 ``sample``, ``mean``, per-sample ``std`` and ``log_prob``.
    """
    mean, std = step_mean_std(latents, velocity, sigmas, index, merge_length, noise_level, sde_type)
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
