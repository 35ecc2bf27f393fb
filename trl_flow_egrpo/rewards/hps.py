"""HPSv2 / HPSv2.1: the Human Preference Score, an open_clip ViT-H-14 fine-tuned on human preferences."""

from __future__ import annotations

import torch

from ._common import resize_longest_pad_normalize
from .clip_score import OpenCLIPCosineReward

HPS_REPO_ID = "xswu/HPSv2"
# The checkpoint file of each HPS version in HPS_REPO_ID (the mapping of the official hpsv2 package).
HPS_CHECKPOINTS = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}


class HPSv2Reward(OpenCLIPCosineReward):
    """Human Preference Score v2.1 (default) or v2.0: how much people would like the image for its prompt.

    The score is what the official scorer computes: the cosine similarity of the normalized image and text
    embeddings of an open_clip ViT-H-14 fine-tuned on HPD v2 (the diagonal of ``image_features @
    text_features.T``). It lies in [-1, 1]; images of current text-to-image models typically score about
    0.2-0.35, and higher is better. Scores of the two versions are not comparable with each other.

    Weights: the checkpoint ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt`` for ``version="v2.0"``)
    is downloaded from the Hub repo ``xswu/HPSv2`` on first call, unless ``checkpoint`` names a local copy.
    The file is a ``torch.save`` dict whose ``"state_dict"`` entry holds open_clip ViT-H-14 weights under
    open_clip's own key names (a bare state dict is accepted too). The architecture is built with
    ``open_clip.create_model(model_name, pretrained=None)`` and loaded strictly; the ``hpsv2`` package is not
    needed. The official scorer runs in fp16 autocast on GPU; ``dtype=torch.float16`` comes closest to it.

    Preprocessing is the official scorer's validation transform (``light_augmentation=True``), not open_clip's
    standard resize-and-crop: the longest side is resized to the model's input size (224 for ViT-H-14) with
    antialiased bicubic, not clamped, the image is zero-padded to a square (``pad // 2`` left and top), then
    normalized with the OpenAI CLIP mean/std; see :func:`~trl_flow_egrpo.rewards._common.
    resize_longest_pad_normalize`. A non-square image is thus scored whole, with black bars.

    Args:
        version: ``"v2.1"`` (default) or ``"v2.0"``; picks the Hub file. Never switched silently.
        checkpoint: local path of the checkpoint file; ``None`` downloads ``version``'s file from the Hub.
        model_name: open_clip architecture of the checkpoint (``"ViT-H-14"``); override only for tests or
            re-trained variants on another architecture.
        batch_size, device, dtype: see :class:`~trl_flow_egrpo.rewards._common.ModelReward`.
    """

    def __init__(
        self,
        version: str = "v2.1",
        *,
        checkpoint: str | None = None,
        model_name: str = "ViT-H-14",
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = "auto",
    ):
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"HPS version must be one of {sorted(HPS_CHECKPOINTS)}, got {version!r}.")
        self.version = version
        self.name = f"hps_{version}"
        super().__init__(model_name, batch_size=batch_size, device=device, dtype=dtype)
        self.checkpoint = checkpoint

    def _create_model(self) -> torch.nn.Module:
        path = self.checkpoint
        if path is None:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(HPS_REPO_ID, HPS_CHECKPOINTS[self.version])
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = checkpoint.get("state_dict", checkpoint)
        model = self._open_clip.create_model(self.model_name, pretrained=None)
        model.load_state_dict(state_dict)
        return model

    def _preprocess_arguments(self, cfg: dict) -> dict:
        """Keyword arguments of :func:`resize_longest_pad_normalize`: the model's input size, mean and std."""
        return dict(size=self._square_size(cfg), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The official validation transform (longest side resized, zero-padded square, normalized)."""
        return resize_longest_pad_normalize(images, **self._preprocess)
