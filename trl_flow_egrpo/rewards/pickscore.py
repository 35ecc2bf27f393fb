"""PickScore: a CLIP-H model fine-tuned on the Pick-a-Pic human preferences."""

from __future__ import annotations

import torch

from ._common import ModelReward, resize_center_crop_normalize

# PIL resampling codes (PILImageResampling) that the torch preprocessing reproduces.
_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}


class PickScoreReward(ModelReward):
    """PickScore v1: how much people would pick this image for its prompt (Kirstain et al., 2023).

    The score is the published one: ``logit_scale.exp() * cos(image_embedding, text_embedding)`` of the
    transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1``, whose ``logit_scale.exp()`` is about 100. It
    lies in [-100, 100]; images of current text-to-image models typically score about 20-23, and higher is
    better. A softmax over several images of one prompt gives preference probabilities.

    Preprocessing and tokenization follow the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
    (resize the short side to 224 with bicubic, center crop 224, OpenAI CLIP mean/std; prompts truncated
    to 77 tokens), the one PickScore was trained and published with. The preprocessing runs in torch; its
    parameters are read from the processor's image processor.

    Both ``model`` and ``processor`` accept Hub ids or local directories (``save_pretrained`` output), so
    a machine without Hub access can load copies made elsewhere.

    Args:
        model: Hub id or local directory of the ``CLIPModel`` weights.
        processor: Hub id or local directory of the CLIP processor (tokenizer and image processor config).
        batch_size, device, dtype: see :class:`~trl_flow_egrpo.rewards._common.ModelReward`.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        *,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = "auto",
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.model_id = model
        self.processor_id = processor

    def _load(self) -> torch.nn.Module:
        from transformers import AutoProcessor, CLIPModel

        processor = AutoProcessor.from_pretrained(self.processor_id)
        self._tokenizer = processor.tokenizer
        self._preprocess = _clip_processor_preprocess(processor.image_processor, self.name)
        return CLIPModel.from_pretrained(self.model_id)

    def _score(self, model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = resize_center_crop_normalize(images, **self._preprocess).to(model.dtype)
        text = self._tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = text.to(images.device)
        image_embeds = projected_embeddings(model.get_image_features(pixel_values=pixels)).float()
        text_embeds = projected_embeddings(
            model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        ).float()
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp().float() * (image_embeds * text_embeds).sum(dim=-1)


def projected_embeddings(features) -> torch.Tensor:
    """The projected embeddings ``[B, D]`` returned by ``CLIPModel.get_image_features``/``get_text_features``.

    transformers 4.x returns them as a tensor; transformers 5 returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds them (and whose ``last_hidden_state`` is the tower's, unprojected).
    """
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _clip_processor_preprocess(image_processor, reward: str) -> dict:
    """Arguments of :func:`resize_center_crop_normalize` equivalent to a transformers CLIP image processor."""
    shortest_edge = (image_processor.size or {}).get("shortest_edge")
    crop = image_processor.crop_size or {}
    resample = int(image_processor.resample)
    # The trainer's images are floats in [0, 1], i.e. uint8 images already rescaled by 1/255.
    supported = (
        image_processor.do_resize
        and image_processor.do_center_crop
        and image_processor.do_normalize
        and image_processor.do_rescale
        and abs(image_processor.rescale_factor - 1 / 255) < 1e-9
        and shortest_edge is not None
        and crop.get("height") == crop.get("width") == shortest_edge
        and resample in _RESAMPLE_NAMES
    )
    if not supported:
        raise ValueError(
            f"Reward '{reward}' supports CLIP image processors that resize the shortest edge to S "
            "(bicubic or bilinear), center crop S x S, rescale by 1/255 and normalize; got size="
            f"{image_processor.size}, crop_size={image_processor.crop_size}, resample={resample}."
        )
    return dict(
        size=shortest_edge,
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
        interpolation=_RESAMPLE_NAMES[resample],
        crop_rounding="floor",
    )
