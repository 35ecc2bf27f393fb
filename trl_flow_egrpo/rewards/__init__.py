"""Reward functions for E-GRPO.

A reward is any callable ``fn(images, prompts, **columns)`` that returns one float per image:
``images`` is a float tensor ``[B, 3, H, W]`` with values in [0, 1], ``prompts`` the ``B`` prompts, and
``columns`` the dataset's other columns for those prompts (lists of length ``B``). An optional
``name`` attribute names the reward in the logs. For video pipelines (Wan) ``images`` are videos
``[B, F, 3, H, W]``: :class:`FrameAverageReward` scores them with any image reward, frame by frame. Editing
datasets hand rewards the image before the edit in a column (``source_image``): :class:`EditConsistencyReward`
scores edits with it, weight-free.

Model-based rewards load their weights lazily, on first call; importing this package needs none of their
optional dependencies (``pip install "trl-flow-egrpo[rewards]"`` for the open_clip ones, ``[ocr]`` for
:class:`OCRReward`). Rewards served from
another process, GPU or machine (:class:`RemoteReward`) and vision-language-model judges
(:class:`VLMJudgeReward`) are described in ``docs/remote-rewards.md``.
"""

from .clip_score import CLIPScoreReward
from .edit import EditConsistencyReward
from .hps import HPSv2Reward
from .image_reward import ImageRewardReward
from .ocr import OCRReward
from .pickscore import PickScoreReward
from .remote import RemoteReward, RemoteRewardError
from .video import FrameAverageReward, TemporalConsistencyReward
from .vlm import VLMJudgeError, VLMJudgeReward
from .weight_free import BrightnessReward, ColorReward, JpegCompressibilityReward, JpegIncompressibilityReward

__all__ = [
    "BrightnessReward",
    "CLIPScoreReward",
    "ColorReward",
    "EditConsistencyReward",
    "FrameAverageReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "JpegCompressibilityReward",
    "JpegIncompressibilityReward",
    "OCRReward",
    "PickScoreReward",
    "RemoteReward",
    "RemoteRewardError",
    "TemporalConsistencyReward",
    "VLMJudgeError",
    "VLMJudgeReward",
]
