"""CLIP score with open_clip models: cosine similarity of image and prompt embeddings."""

from __future__ import annotations

from abc import abstractmethod

import torch

from ._common import ModelReward, require, resize_center_crop_normalize


class OpenCLIPCosineReward(ModelReward):
    """Base of the open_clip rewards: cosine similarity of the normalized image and text embeddings.

    Subclasses build the model in :meth:`_create_model`. Tokenization uses ``open_clip.get_tokenizer
    (model_name)`` (its BPE vocabulary ships with open_clip, so it works offline), and preprocessing follows
    the model's own open_clip preprocessing config (size, mean, std, interpolation, resize mode); a
    subclass whose official scorer transforms images differently overrides :meth:`preprocess` and
    :meth:`_preprocess_arguments`.

    Args:
        model_name: open_clip architecture, e.g. ``"ViT-H-14"``, or a name registered with
            ``open_clip.add_model_config``.
        batch_size, device, dtype: see :class:`~trl_flow_egrpo.rewards._common.ModelReward`.
    """

    def __init__(
        self,
        model_name: str,
        *,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = "auto",
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.model_name = model_name
        # Fail at construction, not after the first batch of images has been generated.
        self._open_clip = require("open_clip", self.name)

    @abstractmethod
    def _create_model(self) -> torch.nn.Module:
        """The open_clip model with its weights, on the CPU."""

    def _load(self) -> torch.nn.Module:
        model = self._create_model()
        self._tokenizer = self._open_clip.get_tokenizer(self.model_name)
        self._preprocess = self._preprocess_arguments(self._open_clip.get_model_preprocess_cfg(model))
        return model

    def _preprocess_arguments(self, cfg: dict) -> dict:
        """Keyword arguments of :meth:`preprocess` from the model's open_clip preprocessing config: those of
        :func:`resize_center_crop_normalize`, open_clip's eval transform."""
        return dict(
            size=self._square_size(cfg),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
        )

    def _square_size(self, cfg: dict) -> int:
        """The side of the model's square input, from its open_clip preprocessing config."""
        size = cfg["size"]
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"Reward '{self.name}' supports square input sizes only, got {tuple(size)}.")
            size = size[0]
        return int(size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input pixels ``[b, 3, S, S]`` of images ``[b, 3, H, W]`` in [0, 1] (after the first call)."""
        return resize_center_crop_normalize(images, **self._preprocess)

    def cosine(self, model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity ``[b]`` of each image (``[b, 3, H, W]`` in [0, 1]) with its own prompt."""
        dtype = next(model.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        tokens = self._tokenizer(prompts).to(images.device)
        image_features = model.encode_image(pixels, normalize=True).float()
        text_features = model.encode_text(tokens, normalize=True).float()
        # The diagonal of image_features @ text_features.T, without computing the off-diagonal pairs.
        return (image_features * text_features).sum(dim=-1)

    def _score(self, model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.cosine(model, images, prompts)


class CLIPScoreReward(OpenCLIPCosineReward):
    """CLIP score: how well the image matches its prompt, as judged by an open_clip CLIP model.

    The default score is the raw cosine similarity of the normalized image and text embeddings, in
    [-1, 1]; for ViT-H-14 and matching image-prompt pairs it is typically 0.2-0.4, the scale on which the
    E-GRPO paper reports its CLIP scores. With ``scale=w`` the score is ``w * max(cos, 0)`` instead:
    ``w=2.5`` is the CLIP-S of the CLIPScore paper (Hessel et al., 2021), ``w=100`` the convention of
    torchmetrics.

    Weights come from open_clip: ``pretrained`` is an open_clip tag, downloaded from the Hub on first call,
    or a local checkpoint file (``.bin``/``.pt``/``.safetensors`` state dict) for machines without Hub
    access. ``model_name`` may also be ``"local-dir:/path"`` (a directory with ``open_clip_config.json``
    and the weights) or ``"hf-hub:org/repo"``; open_clip then ignores ``pretrained``.

    Args:
        model_name: open_clip architecture (default ``"ViT-H-14"``).
        pretrained: open_clip pretrained tag (default ``"laion2b_s32b_b79k"``) or local checkpoint path.
        scale: ``None`` (default) for the raw cosine, or ``w`` for ``w * max(cos, 0)``.
        batch_size, device, dtype: see :class:`~trl_flow_egrpo.rewards._common.ModelReward`.
    """

    name = "clip_score"

    def __init__(
        self,
        model_name: str = "ViT-H-14",
        pretrained: str = "laion2b_s32b_b79k",
        *,
        scale: float | None = None,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = "auto",
    ):
        super().__init__(model_name, batch_size=batch_size, device=device, dtype=dtype)
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be positive or None, got {scale}.")
        self.pretrained = pretrained
        self.scale = scale

    def _create_model(self) -> torch.nn.Module:
        return self._open_clip.create_model(self.model_name, pretrained=self.pretrained, require_pretrained=True)

    def _score(self, model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cosine = self.cosine(model, images, prompts)
        return cosine if self.scale is None else self.scale * cosine.clamp(min=0)
