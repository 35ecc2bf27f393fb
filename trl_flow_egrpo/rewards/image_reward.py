"""ImageReward (Xu et al., 2023) rebuilt on transformers' BLIP modules, loading the official checkpoint.

The official package (``image-reward``) does not import with transformers 5, so the model is rebuilt here:

* image encoder: BLIP's ViT (ViT-L/16 at 224 px for ImageReward) = transformers ``BlipVisionModel``
  (LayerNorm eps 1e-6, exact GELU, final LayerNorm applied to every token);
* text encoder: BLIP's ``med.py`` BERT, whose layers cross-attend to the image tokens = transformers
  ``BlipTextModel`` (a port of ``med.py`` that keeps its parameter names), built with cross-attention
  layers and run with a bidirectional mask, as the official encoder runs;
* head: the official MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (linear layers only: the official ReLUs are
  commented out, its dropouts are inactive at inference).

The reward of an image is ``(head(text_encoder(prompt, image)[CLS]) - mean) / std`` with the official
constants below. Like the official ``ImageReward.score``/``inference_rank``, the prompt is tokenized with
``[CLS]`` first (the official scorer does not replace it by BLIP's ``[ENC]`` token).
"""

from __future__ import annotations

import itertools
import json
import logging
import re

import torch
from torch import nn

from ._common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelReward, resize_center_crop_normalize

logger = logging.getLogger(__name__)

IMAGE_REWARD_REPO_ID = "THUDM/ImageReward"
# Mean and std of the raw head output over the ImageReward training data (official ImageReward.py).
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
# The official scorer pads or truncates every prompt to 35 tokens.
PROMPT_LENGTH = 35

# BLIP's ViT-L/16 at 224 px, as ``BLIP_Pretrain(image_size=224, vit="large")`` builds it.
VISION_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
)
HEAD_WIDTHS = (1024, 128, 64, 16, 1)

# Official checkpoint keys that scoring does not use: the image-text contrastive projections of BLIP
# pretraining and the position_ids buffer, which BlipTextModel rebuilds itself.
_UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")
# Official key prefix -> module key prefix, first match wins.
_KEY_RULES = [
    (re.compile(r"^blip\.visual_encoder\.cls_token$"), "vision.embeddings.class_embedding"),
    (re.compile(r"^blip\.visual_encoder\.pos_embed$"), "vision.embeddings.position_embedding"),
    (re.compile(r"^blip\.visual_encoder\.patch_embed\.proj\."), "vision.embeddings.patch_embedding."),
    (re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\."), r"vision.encoder.layers.\1.layer_norm1."),
    (re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\."), r"vision.encoder.layers.\1.self_attn.qkv."),
    (
        re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\."),
        r"vision.encoder.layers.\1.self_attn.projection.",
    ),
    (re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\."), r"vision.encoder.layers.\1.layer_norm2."),
    (re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\."), r"vision.encoder.layers.\1.mlp.\2."),
    (re.compile(r"^blip\.visual_encoder\.norm\."), "vision.post_layernorm."),
    # BlipTextModel keeps med.py's names (embeddings.*, encoder.layer.N.{attention,crossattention,...}).
    (re.compile(r"^blip\.text_encoder\."), "text."),
    # The official nn.Sequential interleaves Dropout modules (indices 1, 3, 5) between the linear layers.
    (re.compile(r"^mlp\.layers\.0\."), "head.0."),
    (re.compile(r"^mlp\.layers\.2\."), "head.1."),
    (re.compile(r"^mlp\.layers\.4\."), "head.2."),
    (re.compile(r"^mlp\.layers\.6\."), "head.3."),
    (re.compile(r"^mlp\.layers\.7\."), "head.4."),
]


def official_key_to_module_key(key: str) -> str | None:
    """The :class:`ImageRewardModel` key of an official ``ImageReward.pt`` key.

    Returns ``None`` for the official keys that scoring does not use (``blip.vision_proj.*``,
    ``blip.text_proj.*``, ``blip.text_encoder.embeddings.position_ids``).

    Raises:
        KeyError: for a key outside the official layout.
    """
    if _UNUSED_KEYS.match(key):
        return None
    for pattern, replacement in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    raise KeyError(key)


class ImageRewardModel(nn.Module):
    """ImageReward's network: BLIP image encoder, BLIP text encoder cross-attending to it, MLP head.

    Args:
        vision_config: ``transformers.BlipVisionConfig`` of the image encoder.
        text_config: ``transformers.BlipTextConfig`` of the text encoder; ``encoder_hidden_size`` must be the
            image encoder's width and ``is_decoder`` True, which is what makes ``BlipTextModel`` build its
            cross-attention layers.
    """

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        widths = (text_config.hidden_size, *HEAD_WIDTHS)
        self.head = nn.Sequential(*[nn.Linear(i, o) for i, o in itertools.pairwise(widths)])

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw (unnormalized) rewards ``[B]`` of preprocessed images ``[B, 3, S, S]`` and tokenized prompts."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        # is_decoder=False: bidirectional self-attention, like the official encoder (mode "multimodal").
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return self.head(text.last_hidden_state[:, 0]).squeeze(-1)


def text_config_from_med_config(med_config: dict, encoder_width: int):
    """A ``BlipTextConfig`` from ImageReward's ``med_config.json`` (a BERT config with BLIP's extra fields).

    ``encoder_width`` is the image encoder's width: like ``BLIP_Pretrain``, it overrides the file's
    ``encoder_width``.
    """
    from transformers import BlipTextConfig

    if not med_config.get("add_cross_attention", False):
        raise ValueError(
            "med_config must have add_cross_attention: true; ImageReward's text encoder cross-attends to the image."
        )
    fields = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "layer_norm_eps",
        "hidden_act",
        "pad_token_id",
    )
    # The BOS/EOS/SEP ids only matter for generation; leaving them unset keeps tiny vocabularies valid.
    return BlipTextConfig(
        **{f: med_config[f] for f in fields},
        encoder_hidden_size=encoder_width,
        is_decoder=True,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )


def load_official_state_dict(model: ImageRewardModel, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load an official ``ImageReward.pt`` state dict into ``model`` through the explicit key mapping.

    Every weight of ``model`` must come from the file. Keys of the file that the model does not use are
    skipped, as the official loader (``load_state_dict(strict=False)``) skips them: the known unused ones
    (``blip.vision_proj.*``, ``blip.text_proj.*``, ``position_ids``) silently, any other one with a warning
    that lists it, since it may mean the file is a variant the mapping does not know.

    Returns:
        the file's keys that were neither loaded nor known to be unused (the ones the warning lists).

    Raises:
        ValueError: listing the model keys the file gives no value.
    """
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        try:
            module_key = official_key_to_module_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if module_key is not None:
            mapped[module_key] = (key, value)
    result = model.load_state_dict({module_key: value for module_key, (_, value) in mapped.items()}, strict=False)
    if result.missing_keys:
        raise ValueError(
            "The checkpoint does not have the official ImageReward layout: it gives no value to "
            f"{len(result.missing_keys)} model weights, e.g. {result.missing_keys[:10]}. Pass the "
            "official ImageReward.pt of THUDM/ImageReward (and its med_config.json)."
        )
    # Keys that a mapping rule renamed but the model has no parameter for are unused too.
    unknown += [mapped[module_key][0] for module_key in result.unexpected_keys]
    if unknown:
        logger.warning(
            "ImageReward checkpoint: ignoring %d keys the model does not use (the official loader "
            "ignores them too): %s",
            len(unknown),
            ", ".join(unknown),
        )
    return unknown


class ImageRewardReward(ModelReward):
    """ImageReward v1.0: a BLIP-based human preference reward for text-to-image generation.

    The score is the official one: the MLP head's output for the ``[CLS]`` token of the prompt encoded
    with cross-attention to the image, standardized with the official constants, ``(raw - 0.16717) /
    1.03334``. It is unbounded but roughly a z-score over the ImageReward training images: 0 is an average
    image, most images fall in about [-2, 2], and higher is better.

    Weights: ``ImageReward.pt`` and ``med_config.json`` are downloaded from the Hub repo ``THUDM/ImageReward``
    on first call, unless ``checkpoint`` and ``med_config`` name local copies. The checkpoint is the flat
    state dict of the official ``ImageReward`` module (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``blip.vision_proj.*``, ``blip.text_proj.*``, ``mlp.layers.*``); it is loaded through an explicit key
    mapping. A model weight missing from the file is an error; a key of the file that the model does not
    use is skipped, as the official loader (``strict=False``) skips it, and logged with a warning when it is
    not one of the known unused keys.

    Preprocessing is the official one in torch: resize the short side to 224 (bicubic), center crop 224,
    OpenAI CLIP mean/std. Prompts are tokenized with ``bert-base-uncased`` plus the ``[DEC]`` and ``[ENC]``
    special tokens that BLIP adds, padded or truncated to 35 tokens.

    Args:
        checkpoint: local path of ``ImageReward.pt``; ``None`` downloads it from the Hub.
        med_config: local path of ``med_config.json``; ``None`` downloads it from the Hub.
        tokenizer: Hub id or local directory of the BERT tokenizer (default ``"bert-base-uncased"``).
        vision_config: overrides of the image encoder's ``BlipVisionConfig`` fields (default: ViT-L/16 at
            224 px, as the official model); for tests and re-trained variants only.
        batch_size, device, dtype: see :class:`~trl_flow_egrpo.rewards._common.ModelReward`.
    """

    name = "image_reward"

    def __init__(
        self,
        checkpoint: str | None = None,
        med_config: str | None = None,
        *,
        tokenizer: str = "bert-base-uncased",
        vision_config: dict | None = None,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = "auto",
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.checkpoint = checkpoint
        self.med_config = med_config
        self.tokenizer_id = tokenizer
        self.vision_config = {**VISION_CONFIG, **(vision_config or {})}

    def _load(self) -> torch.nn.Module:
        from huggingface_hub import hf_hub_download
        from transformers import BertTokenizer, BlipVisionConfig

        med_path = self.med_config or hf_hub_download(IMAGE_REWARD_REPO_ID, "med_config.json")
        checkpoint_path = self.checkpoint or hf_hub_download(IMAGE_REWARD_REPO_ID, "ImageReward.pt")
        with open(med_path) as f:
            med_config = json.load(f)
        vision_config = BlipVisionConfig(**self.vision_config)
        model = ImageRewardModel(vision_config, text_config_from_med_config(med_config, vision_config.hidden_size))
        load_official_state_dict(model, torch.load(checkpoint_path, map_location="cpu", weights_only=True))

        tokenizer = BertTokenizer.from_pretrained(self.tokenizer_id)
        # BLIP's init_tokenizer: [DEC] as BOS and [ENC] as an extra special token (ids 30522 and 30523 for
        # bert-base-uncased, the last rows of the 30524-row embedding table). They only change how a
        # prompt containing the literal strings "[DEC]" or "[ENC]" is split.
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(tokenizer) > med_config["vocab_size"]:
            raise ValueError(
                f"Reward '{self.name}': the tokenizer has {len(tokenizer)} tokens but the text encoder "
                f"only {med_config['vocab_size']} embeddings; is it the matching tokenizer?"
            )
        self._tokenizer = tokenizer
        return model

    def _score(self, model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        pixels = resize_center_crop_normalize(
            images, self.vision_config["image_size"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        ).to(dtype)
        text = self._tokenizer(
            prompts, padding="max_length", truncation=True, max_length=PROMPT_LENGTH, return_tensors="pt"
        ).to(images.device)
        raw = model(pixels, text.input_ids, text.attention_mask).float()
        return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
