"""The sampling schedule (METHOD.md section 1).

Flow time ``sigma`` runs from 1 (pure noise) to 0 (data). A schedule of ``T`` steps is ``T + 1``
strictly decreasing sigmas ``1 = sigmas[0] > ... > sigmas[T] = 0`` plus the ``T`` timesteps the
transformer is conditioned on (diffusers' convention: ``timesteps = sigmas[:-1] * num_train_timesteps``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Schedule:
    """The sigmas and timesteps one sampling run uses.

    Attributes:
        sigmas: float32 tensor ``[T + 1]``, ``sigmas[0] = 1``, ``sigmas[T] = 0``, strictly decreasing.
        timesteps: float32 tensor ``[T]``, what the model is conditioned on at each step, exactly as
            the diffusers scheduler hands it to the pipeline (``sigmas[:-1] * num_train_timesteps``).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        """``T``, the number of sampling steps."""
        return len(self.timesteps)


def shift_sigmas(sigmas: np.ndarray | torch.Tensor, shift: float):
    r"""Static time shift of flow-matching schedules (SD3 / FLUX).

    .. math:: \sigma \mapsto \frac{s\,\sigma}{1 + (s - 1)\,\sigma}

    ``shift = 1`` is the identity; ``shift > 1`` spends more steps at high noise.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The FLUX-style schedule of METHOD.md section 1, in float64: ``linspace(1, 1/T, T)``, shifted,
    terminal 0 appended. ``shifted_sigmas(16, 3.0)`` reproduces METHOD.md's reference table."""
    base = np.linspace(1.0, 1.0 / num_steps, num_steps)
    return torch.from_numpy(np.append(shift_sigmas(base, shift), 0.0))


def dynamic_shift_mu(
    num_image_tokens: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` of a resolution-dependent (dynamic) shift: linear in the image's token count ``n``,
    ``mu = base_shift + (n - base_seq_len) * (max_shift - base_shift) / (max_seq_len - base_seq_len)``,
    as FLUX.1-dev's and SD3's pipelines compute it from their scheduler config (in the same order of float
    operations, so the schedule is bit-identical to theirs); the scheduler then shifts sigmas by ``exp(mu)``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return num_image_tokens * slope + intercept


def scheduler_schedule(scheduler, num_steps: int, shift: float | None = None, mu: float | None = None) -> Schedule:
    """The schedule a diffusers flow-matching scheduler produces, computed on a copy of it.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (or a compatible one); it is not modified.
        num_steps: ``T``.
        shift: a static shift; replaces the scheduler's own shift and disables its dynamic shifting.
            ``None`` keeps the scheduler's behaviour (then ``mu`` is needed if it shifts dynamically).
        mu: the resolution-dependent shift parameter of dynamically shifting schedulers (FLUX.1-dev).

    Returns:
        The :class:`Schedule` with float32 sigmas and timesteps, bit-identical to what the pipeline
        would sample with, because the pipeline's own scheduler code computes them.
    """
    if shift is not None:
        scheduler = type(scheduler).from_config(scheduler.config, shift=float(shift), use_dynamic_shifting=False)
    else:
        scheduler = copy.deepcopy(scheduler)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("This scheduler shifts its schedule dynamically: pass `mu` or a static `shift`.")
        kwargs["mu"] = mu
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), device="cpu", **kwargs)
    sigmas = scheduler.sigmas.detach().to(torch.float32).cpu()
    timesteps = scheduler.timesteps.detach().to(torch.float32).cpu()
    if len(sigmas) != num_steps + 1 or sigmas[-1] != 0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(
            f"The scheduler produced an unusable schedule {sigmas.tolist()}: expected {num_steps + 1} "
            "strictly decreasing sigmas ending in 0."
        )
    return Schedule(sigmas=sigmas, timesteps=timesteps)
