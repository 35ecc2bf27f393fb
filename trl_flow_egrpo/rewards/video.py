"""Rewards for videos (``WanPipeline``): rewards get float videos ``[B, F, 3, H, W]`` in [0, 1].

Any image reward scores videos through :class:`FrameAverageReward` (each frame scored as an image, the scores
averaged per video); :class:`TemporalConsistencyReward` needs no weights and measures how little the frames
change, for tests and as a regularizer next to a per-frame reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..scoring import call_reward, reward_name


def check_videos(videos: torch.Tensor, reward: str) -> None:
    """A ValueError naming ``reward`` unless ``videos`` is ``[B, F, 3, H, W]``."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(
            f"Reward '{reward}' scores videos [B, F, 3, H, W] (a video pipeline's samples), got "
            f"{shape}. Give image rewards images directly."
        )


class FrameAverageReward:
    """A video's reward is the mean of an image reward over its frames:
    ``r(video) = (1 / |S|) sum_{t in S} r_image(frame_t)`` with ``S = {0, s, 2s, ...}`` (``s = frame_stride``).

    All scored frames of all videos go to the image reward together (in calls of ``frames_per_call`` frames),
    each with its video's prompt and dataset columns, so a model-based reward batches them as images. Every
    call's output is checked like a reward's (one finite float per frame).

    Args:
        image_reward: any image reward ``fn(images [N, 3, H, W], prompts, **columns)``, e.g. ``HPSv2Reward()``.
        frame_stride: score every ``frame_stride``-th frame (1: all; Wan's 81 frames with 8: 11 frames).
        frames_per_call: frames per image-reward call; None sends all frames in one call.

    The logged name is ``frames_<image reward's name>`` (``frames_hps``); ``build_reward("frames_hps")`` builds it.
    """

    def __init__(self, image_reward: Callable, frame_stride: int = 1, frames_per_call: int | None = None):
        if not callable(image_reward):
            raise ValueError(
                f"FrameAverageReward wraps an image reward fn(images, prompts, **columns); got {image_reward!r}."
            )
        if frame_stride < 1 or (frames_per_call is not None and frames_per_call < 1):
            raise ValueError(
                f"FrameAverageReward needs frame_stride >= 1 and frames_per_call >= 1 (or None); got "
                f"frame_stride={frame_stride}, frames_per_call={frames_per_call}."
            )
        self.image_reward = image_reward
        self.frame_stride = frame_stride
        self.frames_per_call = frames_per_call
        self.image_reward_name = reward_name(image_reward)
        self.name = f"frames_{self.image_reward_name}"

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        """Mean per-frame scores, float32 ``[B]`` on the CPU."""
        check_videos(videos, self.name)
        frames = videos[:, :: self.frame_stride]
        num_videos, num_frames = frames.shape[:2]
        frames = frames.flatten(0, 1)

        def per_frame(values: Sequence) -> list:
            return [value for value in values for _ in range(num_frames)]

        frame_prompts, frame_columns = per_frame(prompts), {name: per_frame(values) for name, values in columns.items()}
        step = self.frames_per_call or len(frames)
        scores = [
            call_reward(
                self.image_reward_name,
                self.image_reward,
                frames[begin : begin + step],
                frame_prompts[begin : begin + step],
                {name: values[begin : begin + step] for name, values in frame_columns.items()},
            )
            for begin in range(0, len(frames), step)
        ]
        return torch.cat(scores).view(num_videos, num_frames).mean(dim=1)


class TemporalConsistencyReward:
    """Rewards videos whose frames change little: minus the mean absolute difference of consecutive frames,
    ``r = -(1 / (F - 1)) sum_{t=1}^{F-1} mean|x_t - x_{t-1}|`` (pixel means over channels and positions).

    Range ``[-1, 0]``: 0 for a still video (and for a single frame), -1 for frames alternating black and white.
    Weight-free and instant; alone it rewards still videos, so use it in tests or, weighted, as a regularizer
    against flicker next to a per-frame reward.
    """

    name = "temporal_consistency"

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        """Scores, float32 ``[B]``."""
        check_videos(videos, self.name)
        videos = videos.detach().float()
        if videos.shape[1] < 2:
            return torch.zeros(len(videos), device=videos.device)
        return -(videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(dim=1)
