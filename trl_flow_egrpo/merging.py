r"""Per-step entropy and the merge plan (METHOD.md section 3).

A (merged) SDE step is Gaussian with covariance ``std^2 I``; its differential entropy per latent
dimension is ``h = 1/2 log(2 pi e std^2)``, so

.. math:: e^{h(k, l)} = \sqrt{2 \pi e}\; c_k \sqrt{\sigma_k - \sigma_{k+l}}

under the SDE (``sde_type="sde"``), and under coefficient-preserving sampling (``sde_type="cps"``, std
``sigma_{k+l} sqrt(1 - cos(a pi / 2)^{2l})``, :func:`~trl_flow_egrpo.sde.cps_mean_std`)

.. math:: e^{h(k, l)} = \sqrt{2 \pi e}\; \sigma_{k+l} \sqrt{1 - \cos(a \pi / 2)^{2l}}

E-GRPO trains on the first ``num_active_steps`` start indices. A step whose single-interval entropy
clears the threshold ``tau`` is trained as is (``l = 1``); a low-entropy step is merged with the
following intervals until the merged step's entropy clears ``tau``: ``l_k = min{l : e^{h(k,l)} >= tau}``
(capped at the end of the schedule). When no length clears ``tau``, the length of largest entropy is taken:
under the SDE the entropy grows with ``l``, so that is the longest one (the cap); under CPS it is not monotone
(the angle term grows, ``sigma_{k+l}`` falls), so the most exploratory step is the one of largest entropy.
Under CPS no trained step may land at sigma 0 (std 0, no log-probability): lengths are capped one interval
earlier, and a plan that would have to train step ``T - 1`` is refused (docs/concepts.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sde import SDE_TYPES, cps_angle, diffusion_coefficient

_SQRT_2PI_E = math.sqrt(2 * math.pi * math.e)


@dataclass(frozen=True)
class MergeStep:
    """One trained (merged) SDE step of the plan.

    Attributes:
        start: schedule index ``k`` where the step starts (the branch point from the anchor trajectory).
        length: ``l``, the number of schedule intervals the step spans; it lands at ``start + length``.
        entropy: ``exp(h(k, l))``, the per-dimension entropy power of the merged step.
    """

    start: int
    length: int
    entropy: float

    @property
    def end(self) -> int:
        """The schedule index where the step lands (``start + length``)."""
        return self.start + self.length


def step_entropy(
    sigmas: torch.Tensor, index: int, merge_length: int, noise_level: float, sde_type: str = "sde"
) -> float:
    """``exp(h(k, l))`` of one merged step, ``sqrt(2 pi e)`` times its std (per latent dimension):
    ``sqrt(2 pi e) * c_k * sqrt(sigmas[k] - sigmas[k + l])`` under the SDE (``sde_type="sde"``),
    ``sqrt(2 pi e) * sigmas[k + l] * sqrt(1 - cos(a pi / 2)^{2l})`` under CPS (``sde_type="cps"``)."""
    sigmas = sigmas.to(torch.float64)
    if sde_type == "cps":
        _, sin_l = cps_angle(noise_level, merge_length)
        return float(_SQRT_2PI_E * sigmas[index + merge_length] * sin_l)
    c = diffusion_coefficient(sigmas, index, noise_level)
    return float(_SQRT_2PI_E * c * torch.sqrt(sigmas[index] - sigmas[index + merge_length]))


def plan_merges(
    sigmas: torch.Tensor,
    noise_level: float,
    entropy_threshold: float,
    num_active_steps: int,
    merge: str | int | None = "adaptive",
    windows: str = "overlap",
    first_step: int = 0,
    sde_type: str = "sde",
) -> list[MergeStep]:
    """The list of (merged) SDE steps E-GRPO trains on.

    Args:
        sigmas: the sampling schedule ``[T + 1]`` (the sigmas actually used for sampling).
        noise_level: the SDE noise level ``a``.
        entropy_threshold: ``tau``; with ``merge="adaptive"`` a step's merge length is the smallest one
            whose entropy ``exp(h)`` reaches ``tau``. ``tau = 0`` means no merging.
        num_active_steps: only start indices ``first_step <= k < first_step + num_active_steps`` are
            trained (paper: the first 8 of 16). A window that starts among them may end after them.
        merge: ``"adaptive"`` (entropy-driven length; the length of largest entropy when none reaches ``tau``),
            an int (every step spans that many intervals:
            the paper's fixed-merge ablations), or ``None`` (no merging, ``l = 1``).
        windows: ``"overlap"``: every active index starts its own step (Algorithm 1); ``"partition"``:
            the next step starts where the previous one landed.
        first_step: the first trained start index (0 = the paper's setting; 8 of 16 = its "second half"
            ablation).
        sde_type: the sampler whose entropy is thresholded, ``"sde"`` or ``"cps"`` (:func:`step_entropy`).
            Under ``"cps"`` a step may not land at sigma 0 (std 0): lengths stop one interval before the end
            and a plan that contains start index ``T - 1`` is refused.

    Returns:
        The plan, a list of :class:`MergeStep` ordered by start index. Lengths are capped so that no
        step runs past the end of the schedule.

    Example (METHOD.md's table, T=16, shift 3, a=0.7)::

        >>> [(s.start, s.length) for s in plan_merges(shifted_sigmas(16, 3.0), 0.7, 2.2, 8)]
        [(0, 1), (1, 1), (2, 2), (3, 2), (4, 2), (5, 3), (6, 3), (7, 3)]
    """
    num_steps = len(sigmas) - 1
    if not 1 <= num_active_steps <= num_steps - first_step or first_step < 0:
        raise ValueError(
            f"num_active_steps must be between 1 and the number of inference steps ({num_steps}) minus "
            f"first_step ({first_step}), got {num_active_steps}."
        )
    if windows not in ("overlap", "partition"):
        raise ValueError(f"windows must be 'overlap' or 'partition', got {windows!r}.")
    if isinstance(merge, int) and not isinstance(merge, bool):
        if merge < 1:
            raise ValueError(f"A fixed merge length must be >= 1, got {merge}.")
    elif merge not in ("adaptive", None):
        raise ValueError(f"merge must be 'adaptive', a positive int or None, got {merge!r}.")
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type={sde_type!r} is not allowed: sde_type must be one of {SDE_TYPES}.")
    # Under CPS a step landing at sigma 0 has std 0 and no log-probability: it can never be trained.
    last_landing = num_steps - 1 if sde_type == "cps" else num_steps
    if first_step + num_active_steps > last_landing:
        raise ValueError(
            f"With sde_type='cps' the last step (start index {num_steps - 1}) lands at sigma 0, where the CPS step "
            f"has no noise and no log-probability, so it cannot be trained; first_step + num_active_steps "
            f"({first_step} + {num_active_steps}) must be <= {last_landing}. Lower num_active_steps or "
            f"first_active_step."
        )

    def entropy(k: int, length: int) -> float:
        return step_entropy(sigmas, k, length, noise_level, sde_type)

    def length_at(k: int) -> int:
        lengths = range(1, last_landing - k + 1)
        if merge is None:
            return 1
        if merge != "adaptive":
            return min(merge, lengths[-1])
        shortest = next((length for length in lengths if entropy(k, length) >= entropy_threshold), None)
        return shortest or max(lengths, key=lambda length: entropy(k, length))

    plan, k = [], first_step
    while k < first_step + num_active_steps:
        length = length_at(k)
        plan.append(MergeStep(start=k, length=length, entropy=entropy(k, length)))
        k += length if windows == "partition" else 1
    return plan


def format_merge_plan(plan: list[MergeStep], sigmas: torch.Tensor) -> str:
    """The plan as a Markdown table (for logs and the model card)."""
    rows = ["| step | start k | length l | sigma_k -> sigma_{k+l} | exp(h) |", "|---|---|---|---|---|"]
    for i, step in enumerate(plan):
        rows.append(
            f"| {i} | {step.start} | {step.length} | {float(sigmas[step.start]):.4f} -> "
            f"{float(sigmas[step.end]):.4f} | {step.entropy:.3f} |"
        )
    return "\n".join(rows)
