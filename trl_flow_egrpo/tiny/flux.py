"""The tiny FLUX.1 pipeline."""

from __future__ import annotations

import torch

from .common import tiny_clip_text_config, tiny_clip_tokenizer, tiny_sd_vae, tiny_t5_encoder, tiny_t5_tokenizer


def build_tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``FluxPipeline`` with random weights and FLUX.1-dev's shapes scaled down (about 0.1M parameters).

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.FluxPipeline`` on the CPU with every component in eval mode. Use images of 64x64
        (16 image tokens) or 128x128; sizes must be multiples of 16.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        vae = tiny_sd_vae(shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = CLIPTextModel(tiny_clip_text_config())
        text_encoder_2 = tiny_t5_encoder()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
