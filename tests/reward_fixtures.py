"""Tiny, random-weight stand-ins of the reward models, saved in each official file format.

The real checkpoints (HPSv2, PickScore, ImageReward, CLIP ViT-H-14) are gigabytes on the Hub; tests and the
benchmark build architecturally faithful miniatures instead, write them to disk the way the official files
are laid out, and load them through the rewards' real loading code. Used by ``tests/test_reward_models.py``
and ``benchmarks/rewards.py``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

# An open_clip ViT with the structure of ViT-H-14 (pre-norm ViT, causal text transformer, argmax pooling),
# shrunk to about 1.7M parameters.
TINY_OPEN_CLIP_NAME = "trl-egrpo-tiny-vit"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# ImageReward's BLIP at toy width: a ViT with BLIP's layout (mlp ratio 4, LayerNorm eps 1e-6) at the official
# 224 px / patch 16, and a 2-layer med.py BERT (BERT-base fields, smaller numbers).
TINY_BLIP_VISION = dict(
    hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=16
)
TINY_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "##s", "car", "tree", "sky"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_med_config(vocab_size: int) -> dict:
    """A med_config.json like ImageReward's (BERT config + ``encoder_width``/``add_cross_attention``), tiny."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
    }


def register_tiny_open_clip(directory: Path) -> str:
    """Register the tiny architecture with open_clip (``add_model_config``) and return its model name."""
    import open_clip

    path = Path(directory) / f"{TINY_OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_NAME


def save_tiny_open_clip(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save one tiny random open_clip model twice, in the two formats the rewards read.

    Returns ``(hps_checkpoint, open_clip_checkpoint)``: a ``torch.save({"state_dict": ...})`` file laid out
    like ``HPS_v2.1_compressed.pt``, and a bare state dict like open_clip's ``open_clip_pytorch_model.bin``.
    """
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(register_tiny_open_clip(directory), pretrained=None)
    hps_path, clip_path = Path(directory) / "HPS_v2.1_compressed.pt", Path(directory) / "open_clip_model.bin"
    torch.save({"state_dict": model.state_dict()}, hps_path)
    torch.save(model.state_dict(), clip_path)
    return hps_path, clip_path


def tiny_clip_tokenizer():
    """A byte-level BPE ``CLIPTokenizer`` built in memory: 256 byte symbols, their ``</w>`` forms, a few merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def save_tiny_pickscore(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny ``CLIPModel`` and a processor configured like ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s.

    Returns ``(model_dir, processor_dir)``, both ``save_pretrained`` directories.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        # bos/eos ids of tiny_clip_tokenizer(): the text tower pools at the first end-of-text token.
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=518,
            max_position_embeddings=77,
            bos_token_id=516,
            eos_token_id=517,
            pad_token_id=517,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=32,
    )
    model_dir, processor_dir = Path(directory) / "pickscore_model", Path(directory) / "pickscore_processor"
    CLIPModel(config).save_pretrained(model_dir)
    # The image-processor fields of the laion ViT-H-14 preprocessor_config.json.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer()).save_pretrained(processor_dir)
    return model_dir, processor_dir


def official_image_reward_state_dict(vision: dict, med: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of the official ``ImageReward.pt``.

    The layout is that of ``ImageReward.state_dict()`` in the official code (``ImageReward/ImageReward.py``
    with ``models/BLIP``): ``blip`` is ``BLIP_Pretrain`` = ``visual_encoder`` (BLIP's timm-style ViT:
    ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2}``, ``norm``), ``text_encoder`` (med.py ``BertModel`` without pooler: embeddings with a
    persistent ``position_ids`` buffer and no token-type table, layers with ``attention``,
    ``crossattention`` whose key/value read the ViT width, ``intermediate``, ``output``), and the contrastive
    projections ``vision_proj``/``text_proj`` (to 256); ``mlp.layers`` is the head, an ``nn.Sequential`` of
    Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
    Linear(16, 1), so its linear layers sit at indices 0, 2, 4, 6, 7. ``vision``/``med`` give the sizes.

    Weights are scaled by ``fan_in ** -0.5`` and LayerNorms sit near identity, so activations stay O(1)
    through the stack and scores differ between inputs.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)

    def layer_norm(name: str, width: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (width,), (width,)

    width, patch = vision["hidden_size"], vision["patch_size"]
    tokens = (vision["image_size"] // patch) ** 2 + 1
    vit = "blip.visual_encoder"
    shapes[f"{vit}.cls_token"], shapes[f"{vit}.pos_embed"] = (1, 1, width), (1, tokens, width)
    shapes[f"{vit}.patch_embed.proj.weight"] = (width, 3, patch, patch)
    shapes[f"{vit}.patch_embed.proj.bias"] = (width,)
    for i in range(vision["num_hidden_layers"]):
        block = f"{vit}.blocks.{i}"
        layer_norm(f"{block}.norm1", width)
        linear(f"{block}.attn.qkv", width, 3 * width)
        linear(f"{block}.attn.proj", width, width)
        layer_norm(f"{block}.norm2", width)
        linear(f"{block}.mlp.fc1", width, vision["intermediate_size"])
        linear(f"{block}.mlp.fc2", vision["intermediate_size"], width)
    layer_norm(f"{vit}.norm", width)

    bert, hidden = "blip.text_encoder", med["hidden_size"]
    shapes[f"{bert}.embeddings.word_embeddings.weight"] = (med["vocab_size"], hidden)
    shapes[f"{bert}.embeddings.position_embeddings.weight"] = (med["max_position_embeddings"], hidden)
    layer_norm(f"{bert}.embeddings.LayerNorm", hidden)
    for i in range(med["num_hidden_layers"]):
        layer = f"{bert}.encoder.layer.{i}"
        for attention, kv_width in (("attention", hidden), ("crossattention", width)):
            linear(f"{layer}.{attention}.self.query", hidden, hidden)
            linear(f"{layer}.{attention}.self.key", kv_width, hidden)
            linear(f"{layer}.{attention}.self.value", kv_width, hidden)
            linear(f"{layer}.{attention}.output.dense", hidden, hidden)
            layer_norm(f"{layer}.{attention}.output.LayerNorm", hidden)
        linear(f"{layer}.intermediate.dense", hidden, med["intermediate_size"])
        linear(f"{layer}.output.dense", med["intermediate_size"], hidden)
        layer_norm(f"{layer}.output.LayerNorm", hidden)
    linear("blip.vision_proj", width, 256)
    linear("blip.text_proj", hidden, 256)
    widths = [hidden, 1024, 128, 64, 16, 1]
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), itertools.pairwise(widths), strict=True):
        linear(f"mlp.layers.{index}", fan_in, fan_out)

    state_dict = {}
    for key, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if "LayerNorm" in key or ".norm" in key:
            values = (1.0 if key.endswith("weight") else 0.0) + 0.1 * values
        elif key.endswith("bias"):
            values = 0.1 * values
        elif len(shape) >= 2 and not key.endswith(("embeddings.weight", "pos_embed", "cls_token")):
            values = values / math.prod(shape[1:]) ** 0.5
        state_dict[key] = values
    state_dict[f"{bert}.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).unsqueeze(0)
    return state_dict


def save_tiny_image_reward(directory: Path, seed: int = 0) -> dict:
    """Write a tiny ImageReward: ``ImageReward.pt`` (official layout), ``med_config.json``, a BERT tokenizer.

    Returns the ``ImageRewardReward`` keyword arguments that load it (``checkpoint``, ``med_config``,
    ``tokenizer``, ``vision_config``).
    """
    directory = Path(directory)
    tokenizer_dir = directory / "bert_tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.txt").write_text("\n".join(BERT_SPECIALS + TINY_WORDS) + "\n")
    # BLIP appends [DEC] and [ENC] to the BERT vocabulary: two more embedding rows.
    med = tiny_med_config(vocab_size=len(BERT_SPECIALS) + len(TINY_WORDS) + 2)
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))
    torch.save(official_image_reward_state_dict(TINY_BLIP_VISION, med, seed), directory / "ImageReward.pt")
    return dict(
        checkpoint=str(directory / "ImageReward.pt"),
        med_config=str(directory / "med_config.json"),
        tokenizer=str(tokenizer_dir),
        vision_config=dict(TINY_BLIP_VISION),
    )
