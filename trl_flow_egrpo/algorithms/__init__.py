"""The GRPO family behind one switch (``EGRPOConfig.algorithm``): one file per algorithm, registered here.

E-GRPO is the default; Flow-GRPO, DanceGRPO, MixGRPO and MixGRPO-Flash are the baselines, sharing
the rollout engine, rewards, advantages, loss, logging, checkpoints and Hub code. DiffusionNFT and AWM, beyond the
GRPO family, train on forward-noised ODE samples through the same interface. docs/algorithms.md compares them
side by side.
"""

from __future__ import annotations

from .awm import AWM
from .base import RolloutStrategy
from .dance_grpo import DanceGRPO
from .diffusion_nft import DiffusionNFT
from .egrpo import EGRPO
from .flow_grpo import FlowGRPO
from .mix_grpo import MixGRPO
from .mix_grpo_flash import MixGRPOFlash

ALGORITHMS: dict[str, type[RolloutStrategy]] = {
    cls.name: cls for cls in (EGRPO, FlowGRPO, DanceGRPO, MixGRPO, MixGRPOFlash, DiffusionNFT, AWM)
}
"""Rollout strategies by ``EGRPOConfig.algorithm`` name."""


def build_strategy(config, schedule) -> RolloutStrategy:
    """The rollout strategy of ``config.algorithm`` on ``schedule``."""
    if config.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={config.algorithm!r} is not allowed: algorithm must be one of {list(ALGORITHMS)}.")
    return ALGORITHMS[config.algorithm](config, schedule)


__all__ = [
    "ALGORITHMS",
    "AWM",
    "DanceGRPO",
    "DiffusionNFT",
    "EGRPO",
    "FlowGRPO",
    "MixGRPO",
    "MixGRPOFlash",
    "RolloutStrategy",
    "build_strategy",
]
