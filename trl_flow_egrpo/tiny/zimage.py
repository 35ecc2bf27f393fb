"""The tiny Z-Image pipeline."""

from __future__ import annotations

import torch

from .common import tiny_qwen_tokenizer, tiny_sd_vae


def build_tiny_zimage_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``ZImagePipeline`` with random weights and Z-Image's layout scaled down.

    Like Z-Image it has FLUX.1's VAE layout (8x, 16 latent channels, ``scaling_factor`` 0.3611, ``shift_factor``
    0.1159), a single-stream DiT whose noise and context refiners run before the joint blocks, 2x2 patches, 3-axis
    RoPE over (caption or frame position, row, column), a Qwen3 text encoder read at its second-to-last hidden
    state (3 layers of width 32) behind a ``Qwen2Tokenizer`` with Qwen3's chat template, and the released
    scheduler config (static shift 3.0).

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.ZImagePipeline`` on the CPU with every component in eval mode. Sizes must be multiples of
        16; 32x32 gives 4 image tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny_qwen_tokenizer()
    hidden = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Z-Image's RoPE axes lengths: captions take positions 1..L on the first axis, the image the next one.
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=hidden,
            axes_dims=[4, 6, 6],
            axes_lens=[1024, 512, 512],
        )
        vae = tiny_sd_vae(shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=300,
                hidden_size=hidden,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipeline = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    for module in (transformer, vae, text_encoder):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
