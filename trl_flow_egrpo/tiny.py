"""The embedded default: a tiny FLUX pipeline built offline, in memory, in milliseconds.

It has random weights but the real architecture and latent layout of FLUX.1-dev (16 latent channels,
8x VAE, 2x2 token packing, guidance embedding, dynamic-shift scheduler config), so everything the trainer
does on it is what it does on the real model, at a size that trains on a CPU in a minute. Its
tokenizers are built from an in-memory vocabulary (bytes plus a few merges for CLIP, characters for
T5); they tokenize any text without downloading anything.
"""

from __future__ import annotations

import torch

_T5_PIECES = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def _byte_unicode_chars() -> list[str]:
    # The printable stand-ins for the 256 bytes that byte-level BPE tokenizers use (GPT-2 / CLIP).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A byte-level BPE ``CLIPTokenizer`` built in memory (518 tokens; ids fit a vocab of 1000)."""
    from transformers import CLIPTokenizer

    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A Unigram ``T5Tokenizer`` built in memory from single characters (ids fit a vocab of 256)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _T5_PIECES] + [("▁" + c, -3.5) for c in _T5_PIECES]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``FluxPipeline`` with random weights and FLUX.1-dev's shapes scaled down (about 0.1M parameters).

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.FluxPipeline`` on the CPU with every component in eval mode. Use images of 64x64
        (16 image tokens) or 128x128; sizes must be multiples of 16.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True)
        vae = AutoencoderKL(
            sample_size=64, in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
            num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
            projection_dim=32, max_position_embeddings=77))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=256, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
                            text_encoder_2=text_encoder_2, tokenizer_2=tiny_t5_tokenizer(), transformer=transformer)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


def build_tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``StableDiffusion3Pipeline`` with random weights and SD3.5-medium's layout scaled down (about 0.1M
    parameters in the transformer).

    Like SD3.5-medium it has 16 latent channels, an 8x VAE, patch size 2, RMS-norm on queries and keys, a
    dual-attention (MMDiT-X) block, two CLIP encoders with projections plus a T5 encoder, and a
    static-shift scheduler (shift 3, no dynamic shifting), so the adapter drives it exactly as it drives
    the real model.

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.StableDiffusion3Pipeline`` on the CPU with every component in eval mode. Use images of
        64x64 (16 image tokens) or 128x128 (64 tokens; the position embedding allows up to 16x16 patches);
        sizes must be multiples of 16.
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
            num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
            projection_dim=32, max_position_embeddings=77))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # pooled_projection_dim = 2 x 32: the two CLIP projections are concatenated; the two CLIPs' hidden
        # states (2 x 32) are cut to joint_attention_dim = T5's d_model (32) by the pipeline.
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=16,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
        vae = AutoencoderKL(
            sample_size=64, in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5305)
        text_encoder, text_encoder_2 = clip_encoder(), clip_encoder()
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=256, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer(), transformer=transformer)
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
