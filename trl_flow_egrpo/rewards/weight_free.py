"""Rewards that need no model weights.

They exist for demos, tests and users without a GPU: they run anywhere, offline, in milliseconds, and
training measurably moves them, so they show whether the RL loop works before any reward model is
downloaded. None of them measures image quality.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] -> ``[B, H, W, 3]`` uint8, rounding as PIL conversion does."""
    images = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def _jpeg_kilobytes(images: torch.Tensor, quality: int) -> list[float]:
    from PIL import Image

    sizes = []
    for array in _to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return sizes


class JpegCompressibilityReward:
    """Rewards images that JPEG-compress well: ``-size_kB`` of the image saved at ``quality``.

    This is DDPO's compressibility objective. It prefers flat, smooth, low-detail images, so it is a
    good sanity check that training moves *something*, and a bad objective for anything else.

    Args:
        quality: JPEG quality used for the encoding (DDPO uses 95).
    """

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> list[float]:
        return [-size for size in _jpeg_kilobytes(images, self.quality)]


class JpegIncompressibilityReward(JpegCompressibilityReward):
    """Rewards images that JPEG-compress badly: ``+size_kB`` at ``quality`` (DDPO's incompressibility).

    It prefers busy, high-frequency, noisy images.
    """

    name = "jpeg_incompressibility"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> list[float]:
        return _jpeg_kilobytes(images, self.quality)


class ColorReward:
    """Rewards images whose mean colour is close to ``target``: ``-||mean_rgb(image) - target||_2``.

    Range ``[-sqrt(3), 0]``; 0 means the image's average colour equals ``target`` exactly. Pure torch
    (not differentiable: the images are detached), microseconds per image: the default reward of the quickstart.

    Args:
        target: RGB colour in [0, 1] that the images should average to (default: pure red).
    """

    name = "color"

    def __init__(self, target: Sequence[float] = (1.0, 0.0, 0.0)):
        if len(target) != 3 or not all(0.0 <= float(c) <= 1.0 for c in target):
            raise ValueError(f"ColorReward target must be three RGB values in [0, 1], got {target!r}.")
        self.target = torch.tensor([float(c) for c in target])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        mean_rgb = images.detach().float().mean(dim=(2, 3))
        return -(mean_rgb - self.target.to(mean_rgb.device)).norm(dim=1)


class BrightnessReward:
    """Rewards bright images: the mean pixel value in [0, 1] (``1`` = all white)."""

    name = "brightness"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        return images.detach().float().mean(dim=(1, 2, 3))
