"""trl-flow-egrpo: E-GRPO (entropy-aware GRPO, arXiv 2601.00423) for flow-matching text-to-image models.

Quick use::

    from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer
    trainer = EGRPOTrainer(EGRPOConfig(...), pipeline, [reward_fn], dataset)
    trainer.train()
"""

from .advantages import group_advantages
from .config import EGRPOConfig
from .loss import ppo_clip_loss
from .merging import MergeStep, format_merge_plan, plan_merges, step_entropy
from .schedule import Schedule, shifted_sigmas
from .sde import SDEStepOutput, euler_step, sde_step
from .trainer import EGRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "EGRPOConfig",
    "EGRPOTrainer",
    "MergeStep",
    "SDEStepOutput",
    "Schedule",
    "euler_step",
    "format_merge_plan",
    "group_advantages",
    "plan_merges",
    "ppo_clip_loss",
    "sde_step",
    "shifted_sigmas",
    "step_entropy",
]
