"""Shared machinery of the model-based rewards: optional imports, the base class, torch preprocessing.

Every model-based reward subclasses :class:`ModelReward`, which loads the model once on first call, moves it
to the scoring device and dtype, scores in batches without gradients and checks the scores. Preprocessing
runs in torch on the float images the trainer produces: the PIL round trip of the official scorers would
quantize to uint8 and copy to the CPU on every step. Two transforms cover the official ones: resize the
short side, center crop and normalize (open_clip, BLIP/ImageReward, transformers' CLIP processor), and
resize the long side, zero-pad and normalize (HPSv2's validation transform).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F

from ..scoring import check_scores

EXTRA_HINT = 'pip install "trl-flow-egrpo[rewards]"'

# Mean and std of the OpenAI CLIP training images, used by open_clip's ViT-H-14, HPSv2, PickScore's processor
# and BLIP/ImageReward alike.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MODEL_HINT = "The model weights or the images are broken, or the dtype overflows: try dtype=torch.float32."


def require(module: str, reward: str) -> ModuleType:
    """Import an optional dependency of a reward, or raise an ImportError that says how to install it.

    Args:
        module: the module to import, e.g. ``"open_clip"``.
        reward: the reward that needs it, named in the error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"The {reward} reward needs the optional package '{module}', which could not be "
            f"imported ({error}). Install the reward extras with: {EXTRA_HINT}"
        ) from error


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | None:
    """``torch.float16`` or its name (``"float16"``, ``"bfloat16"``, ``"float32"``) -> a floating torch dtype;
    ``"auto"`` -> None (decided by the device: see :meth:`ModelReward.model_dtype`)."""
    if dtype == "auto":
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}.")
    return resolved


def resize_center_crop_normalize(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    crop_rounding: str = "round",
) -> torch.Tensor:
    """The eval transform of CLIP-like models, in torch: resize, center crop to ``size`` x ``size``, normalize.

    It reproduces torchvision's ``Resize(size) -> CenterCrop(size) -> ToTensor -> Normalize`` on a PIL image
    (open_clip, BLIP) and transformers' ``CLIPImageProcessor``, up to uint8 rounding: those resize uint8
    images, so they round to 1/255 after each resampling pass, and this function does not.

    * Resize: ``"shortest"`` scales the short side to ``size`` and the long side to ``int(size * long /
      short)``, as torchvision does; ``"squash"`` resizes to ``size`` x ``size``. Resampling is antialiased,
      which makes torch's bicubic kernel PIL's (a = -0.5). It runs as two passes, width first, clamping to
      [0, 1] after each, because PIL resamples 8-bit images that way: its intermediate image saturates,
      which changes bicubic overshoot on sharp edges.
    * Crop: the top-left offset is ``round(margin / 2)`` in torchvision (``crop_rounding="round"``, Python's
      round half to even) and ``margin // 2`` in transformers (``"floor"``).

    Args:
        images: ``[B, 3, H, W]`` floats in [0, 1].
        size: side of the square output.
        mean: per-channel mean subtracted after cropping.
        std: per-channel standard deviation divided by after cropping.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        resize_mode: ``"shortest"`` or ``"squash"``.
        crop_rounding: ``"round"`` (torchvision) or ``"floor"`` (transformers).

    Returns:
        ``[B, 3, size, size]`` float tensor on the images' device.
    """
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}.")
    if crop_rounding not in ("round", "floor"):
        raise ValueError(f"crop_rounding must be 'round' or 'floor', got {crop_rounding!r}.")
    height, width = images.shape[-2:]
    if resize_mode == "shortest":
        short, long = min(height, width), max(height, width)
        new_long = int(size * long / short)
        new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    elif resize_mode == "squash":
        new_height, new_width = size, size
    else:
        raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}.")

    if new_width != width:
        images = F.interpolate(
            images, size=(height, new_width), mode=interpolation, antialias=True, align_corners=False
        ).clamp_(0, 1)
    if new_height != height:
        images = F.interpolate(
            images, size=(new_height, new_width), mode=interpolation, antialias=True, align_corners=False
        ).clamp_(0, 1)

    def offset(margin: int) -> int:
        return int(round(margin / 2)) if crop_rounding == "round" else margin // 2

    top, left = offset(new_height - size), offset(new_width - size)
    return normalize(images[..., top : top + size, left : left + size], mean, std)


def resize_longest_pad_normalize(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """HPSv2's validation transform, in torch: resize the longest side to ``size``, zero-pad to a square, normalize.

    The official ``hpsv2`` scorer builds its transform with ``light_augmentation=True``: ``ToTensor`` first,
    then ``ResizeMaxSize(size)``, then ``Normalize``. So it resamples a float tensor, and this function does
    the same operations on the same floats:

    * Resize: ``s = size / max(H, W)``, new sides ``round(H * s)`` and ``round(W * s)`` (Python's round,
      half to even), bicubic with antialiasing (torchvision's default for tensors since 0.17; PIL's kernel,
      a = -0.5) in one ``interpolate`` call. The result is not clamped: bicubic overshoot below 0 and above
      1 stays, as it does in the official float pipeline.
    * Pad: with zeros (black, before normalization) to ``size`` x ``size``, ``pad // 2`` on the left and top
      and the rest on the right and bottom, where ``pad = size - new side``.
    * Normalize: ``(x - mean) / std`` per channel.

    For a float image on the uint8 grid (``k / 255``) the result is the official transform of the PIL
    image of it; for other floats it differs only by the official scorer's uint8 quantization of its input,
    which this function skips. One deliberate difference: the official transform does nothing when the
    longest side already equals ``size``, which leaves a non-square image unpadded (and the model then fails
    on it); here such an image is padded like any other.

    Args:
        images: ``[B, 3, H, W]`` floats in [0, 1].
        size: side of the square output.
        mean: per-channel mean subtracted after padding.
        std: per-channel standard deviation divided by after padding.

    Returns:
        ``[B, 3, size, size]`` float tensor on the images' device.

    Raises:
        ValueError: when the short side would shrink to 0 pixels (an aspect ratio above ``2 * size``).
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if min(new_height, new_width) < 1:
        raise ValueError(
            f"An image of {height} x {width} pixels resized to fit {size} x {size} would be "
            f"{new_height} x {new_width}: its aspect ratio is too extreme for this model. Crop it first."
        )
    if (new_height, new_width) != (height, width):
        images = F.interpolate(
            images, size=(new_height, new_width), mode="bicubic", antialias=True, align_corners=False
        )
    pad_height, pad_width = size - new_height, size - new_width
    images = F.pad(
        images, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2), value=0.0
    )
    return normalize(images, mean, std)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` with per-channel ``mean`` and ``std``, for ``[B, C, H, W]`` images."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


class ModelReward(ABC):
    """Base class of the rewards backed by a neural network.

    Subclasses implement :meth:`_load` (build the model, on the CPU, and whatever else scoring needs) and
    :meth:`_score` (score one batch). This class makes the model load lazily and once, moves it to the
    scoring device and dtype, runs batches under ``torch.no_grad()`` and validates the scores.

    Args:
        batch_size: how many images go through the model at once; lower it if the device runs out of memory.
        device: where the model runs; ``None`` (default) means the device of the images of each call.
        dtype: dtype of the model weights and inputs. ``"auto"`` (default): float16 on a GPU (half the memory:
            HPS' ViT-H takes 1.8 instead of 3.7 GiB; the official HPS scorer runs in fp16 autocast too), float32
            on the CPU. Scores are returned as float32 either way.
    """

    name = "model_reward"

    def __init__(
        self, *, batch_size: int = 16, device: torch.device | str | None = None, dtype: torch.dtype | str = "auto"
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.dtype = resolve_dtype(dtype)
        self._model: torch.nn.Module | None = None

    @abstractmethod
    def _load(self) -> torch.nn.Module:
        """Build the model with its weights on the CPU (and set up tokenizer, preprocessing, ...); return it."""

    @abstractmethod
    def _score(self, model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score one batch: ``images`` ``[b, 3, H, W]`` float32 in [0, 1] on the model's device -> ``[b]``."""

    def model_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the model runs in on ``device``: ``dtype``, or with ``"auto"`` float16 on CUDA, else float32."""
        if self.dtype is not None:
            return self.dtype
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32

    def model(self, device: torch.device) -> torch.nn.Module:
        """The model, loaded on first use, in eval mode, without gradients, on ``device`` in its dtype."""
        if self._model is None:
            self._model = self._load().eval().requires_grad_(False)
        return self._model.to(device=device, dtype=self.model_dtype(device))

    def offload(self) -> None:
        """Move the loaded model to the CPU (the trainer does this for evaluation-only rewards between
        evaluations); the next call brings it back to the scoring device."""
        if self._model is not None:
            self._model.to("cpu")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns) -> torch.Tensor:
        """Score ``images`` (``[B, 3, H, W]`` in [0, 1]) against ``prompts`` (B strings).

        Other dataset ``columns`` are accepted and ignored. Returns a float32 tensor ``[B]`` on the images'
        device.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Reward '{self.name}' expects images of shape [B, 3, H, W], got {tuple(images.shape)}.")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"Reward '{self.name}' got {images.shape[0]} images but {len(prompts)} prompts.")
        device = self.device if self.device is not None else images.device
        model = self.model(device)
        prompts = list(prompts)
        scores = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                batch = images[start : start + self.batch_size].detach().to(device=device, dtype=torch.float32)
                scores.append(self._score(model, batch, prompts[start : start + self.batch_size]).float())
        scores = torch.cat(scores) if scores else torch.zeros(0)
        return check_scores(scores, images.shape[0], self.name, hint=_MODEL_HINT).to(images.device)
