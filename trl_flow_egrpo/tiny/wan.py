"""The tiny Wan (text-to-video) pipeline."""

from __future__ import annotations

import torch

from .common import tiny_t5_tokenizer


def build_tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``WanPipeline`` (text-to-video) with random weights and Wan 2.1's layout scaled down (about 23k parameters
    in the transformer).

    Like Wan 2.1 T2V it has the 3D causal VAE (8x spatial and 4x temporal downsampling, 16 latent channels, Wan's
    per-channel ``latents_mean`` / ``latents_std``, latents ``[B, 16, (F - 1)/4 + 1, H/8, W/8]``), a
    ``WanTransformer3DModel`` patchifying ``1 x 2 x 2`` with 3-axis RoPE, self- and cross-attention and RMS
    query/key norms, a UMT5 text encoder (2 layers of width 32) with a T5 tokenizer built in memory, and the
    released checkpoints' scheduler: ``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift`` 3.0 (the
    480p setting).

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.WanPipeline`` on the CPU with every component in eval mode. Sizes must be multiples of 16
        and frame counts ``4k + 1``; 32x32 with 5 frames gives 8 video tokens.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        # Wan's latents_mean / latents_std are the class defaults.
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=256, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
            )
        )
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipeline = WanPipeline(
        tokenizer=tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    for module in (transformer, vae, text_encoder):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
