"""MixGRPO-Flash (Li et al., 2025): MixGRPO with a compressed DPM-Solver++ 2M ODE after the window."""

from __future__ import annotations

from ..solvers import evenly_spaced_indices
from .mix_grpo import MixGRPO


class MixGRPOFlash(MixGRPO):
    """MixGRPO (its window, SDE and trained steps unchanged), but the ODE after the window runs DPM-Solver++ 2M
    (:func:`~trl_flow_egrpo.solvers.dpmpp_2m_step`) on fewer steps: of the ``n`` intervals after the window it
    keeps ``max(1, int((n + 1) * mix_flash_fraction) - 1)``, evenly spaced in index
    (:func:`flash_intervals`, the official ``dpm_post_compress_ratio`` count). The ODE before the window stays
    Euler, shared by the group as in MixGRPO. Official settings: fraction 0.4 with the window moving 1 step every
    20 iterations (MixGRPO-Flash), fraction 0.2 with the window frozen at step 0 (MixGRPO-Flash*:
    ``mix_window_stride=0``). Only the deterministic part after the trained steps changes, so the on-policy
    ratio stays 1. ``w0 + G * (len(window) + m)`` rows per prompt for a window at ``w0`` and ``m`` kept
    intervals."""

    name = "mix-grpo-flash"
    default_shift_interval = 20
    """The official MixGRPO-Flash scripts' ``iters_per_group``."""

    def ode_completion(self, iteration: int) -> list[int] | None:
        """The indices the DPM-Solver++ 2M ODE visits from the window's end to ``T`` (None if the window reaches
        the last step, which MixGRPO's windows never do)."""
        start, num_steps = self.window(iteration).stop, self.schedule.num_steps
        remaining = num_steps - start
        if remaining < 1:
            return None
        return evenly_spaced_indices(start, num_steps, flash_intervals(remaining, self.config.mix_flash_fraction))

    def describe(self) -> str:
        completion = self.ode_completion(0)
        return (
            f"{super().describe()}; after the window DPM-Solver++ 2M on {len(completion) - 1} intervals (fraction "
            f"{self.config.mix_flash_fraction:g}) at iteration 0"
        )


def flash_intervals(remaining: int, fraction: float) -> int:
    """Intervals MixGRPO-Flash keeps of the ``remaining`` ones after its window: the official code rebuilds the
    schedule after the window's last step ``k`` with ``int(max((T - k) * fraction, 1))`` sigmas from
    ``sigmas[k + 1]`` to 0, i.e. one interval fewer, and ``T - k = remaining + 1``. At least 1, so that the
    trajectory still reaches sigma 0 (the official count can be 0 there)."""
    return max(1, int((remaining + 1) * fraction) - 1)
