r"""Per-step entropy and the merge plan (METHOD.md section 3).

A (merged) SDE step is Gaussian with covariance ``std^2 I``; its differential entropy per latent
dimension is ``h = 1/2 log(2 pi e std^2)``, so

.. math:: e^{h(k, l)} = \sqrt{2 \pi e}\; c_k \sqrt{\sigma_k - \sigma_{k+l}}

E-GRPO trains on the first ``num_active_steps`` start indices. A step whose single-interval entropy
clears the threshold ``tau`` is trained as is (``l = 1``); a low-entropy step is merged with the
following intervals until the merged step's entropy clears ``tau``: ``l_k = min{l : e^{h(k,l)} >= tau}``
(capped at the end of the schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sde import diffusion_coefficient

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


def step_entropy(sigmas: torch.Tensor, index: int, merge_length: int, noise_level: float) -> float:
    """``exp(h(k, l)) = sqrt(2 pi e) * c_k * sqrt(sigmas[k] - sigmas[k + l])`` for one merged step."""
    sigmas = sigmas.to(torch.float64)
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
) -> list[MergeStep]:
    """The list of (merged) SDE steps E-GRPO trains on.

    Args:
        sigmas: the sampling schedule ``[T + 1]`` (the sigmas actually used for sampling).
        noise_level: the SDE noise level ``a``.
        entropy_threshold: ``tau``; with ``merge="adaptive"`` a step's merge length is the smallest one
            whose entropy ``exp(h)`` reaches ``tau``. ``tau = 0`` means no merging.
        num_active_steps: only start indices ``first_step <= k < first_step + num_active_steps`` are
            trained (paper: the first 8 of 16). A window that starts among them may end after them.
        merge: ``"adaptive"`` (entropy-driven length), an int (every step spans that many intervals:
            the paper's fixed-merge ablations), or ``None`` (no merging, ``l = 1``).
        windows: ``"overlap"``: every active index starts its own step (Algorithm 1); ``"partition"``:
            the next step starts where the previous one landed.
        first_step: the first trained start index (0 = the paper's setting; 8 of 16 = its "second half"
            ablation).

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

    def length_at(k: int) -> int:
        longest = num_steps - k
        if merge is None:
            return 1
        if merge != "adaptive":
            return min(merge, longest)
        for length in range(1, longest + 1):
            if step_entropy(sigmas, k, length, noise_level) >= entropy_threshold:
                return length
        return longest

    plan, k = [], first_step
    while k < first_step + num_active_steps:
        length = length_at(k)
        plan.append(MergeStep(start=k, length=length, entropy=step_entropy(sigmas, k, length, noise_level)))
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
