"""trl-flow-egrpo: E-GRPO (entropy-aware GRPO, arXiv 2601.00423) for flow-matching text-to-image models.

Quick use::

    from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer
    trainer = EGRPOTrainer(EGRPOConfig(...), pipeline, [reward_fn], dataset)
    trainer.train()
"""

import importlib

from . import log_filters

__version__ = "0.1.0"

log_filters.install()  # before torch, transformers and diffusers are imported by the submodules

# Public name -> the submodule that defines it. Loaded on first access (PEP 562), so that the console script's
# `--help` and `--version` answer without importing torch, diffusers and transformers (about 9 s on a loaded
# machine); `from trl_flow_egrpo import EGRPOTrainer` works as before.
_EXPORTS = {
    "EGRPOConfig": "config",
    "EGRPOTrainer": "trainer",
    "MergeStep": "merging",
    "SDEStepOutput": "sde",
    "Schedule": "schedule",
    "euler_step": "sde",
    "format_merge_plan": "merging",
    "group_advantages": "advantages",
    "plan_merges": "merging",
    "ppo_clip_loss": "loss",
    "sde_step": "sde",
    "shifted_sigmas": "schedule",
    "step_entropy": "merging",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """The public name ``name``, imported from its submodule on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trl_flow_egrpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included (for tab completion)."""
    return sorted(set(globals()) | set(_EXPORTS))
