"""The tiny Stable Diffusion 3 pipeline."""

from __future__ import annotations

import torch

from .common import tiny_clip_text_config, tiny_clip_tokenizer, tiny_sd_vae, tiny_t5_encoder, tiny_t5_tokenizer


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
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    def clip_encoder():
        return CLIPTextModelWithProjection(tiny_clip_text_config())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # pooled_projection_dim = 2 x 32: the two CLIP projections are concatenated; the two CLIPs' hidden
        # states (2 x 32) are cut to joint_attention_dim = T5's d_model (32) by the pipeline.
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae = tiny_sd_vae(shift_factor=0.0609, scaling_factor=1.5305)
        text_encoder, text_encoder_2 = clip_encoder(), clip_encoder()
        text_encoder_3 = tiny_t5_encoder()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
