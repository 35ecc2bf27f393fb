"""The testbed's FluxPipeline before training: its components and their configurations.

The pipeline is a real ``diffusers.FluxPipeline`` with FLUX.1's layout scaled down:

- transformer: ``FluxTransformer2DModel``, double-stream then single-stream blocks, 2x2-packed latent tokens,
  3-axis RoPE, 4 heads of 16 (width 64), no guidance embedding (the testbed is not guidance-distilled, so the
  embedding would carry nothing; FLUX.1-schnell has none either);
- VAE: ``AutoencoderKL`` with 3 blocks (4x downsampling) and 8 latent channels: a 32x32 image is an 8x8x8
  latent, 16 image tokens of 32 channels; trained on the synthetic images, its ``shift_factor`` and
  ``scaling_factor`` set from the latents' statistics as FLUX's are;
- text encoders: the library's tiny CLIP and T5 encoders (``trl_flow_egrpo.tiny``), random but fixed: the
  transformer learns to read their embeddings, and the tokenizers of :mod:`.text` make each grammar word one
  token;
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with the static shift 3 that the paper samples with, and that
  the transformer is trained for (so a plain pipeline call, ``shift: null`` and the trainer's default ``shift: 3``
  all sample the same schedule).
"""

from __future__ import annotations

import torch

from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

from .text import testbed_clip_tokenizer, testbed_t5_tokenizer

SHIFT = 3.0
"""The schedule's static time shift (sampling and training)."""


def build_transformer():
    """The untrained ``FluxTransformer2DModel`` (about 0.47M parameters), initialized from the global RNG."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=32,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
        guidance_embeds=False,
    )


def build_vae():
    """The untrained ``AutoencoderKL`` (4x downsampling, 8 latent channels, about 0.17M parameters), initialized
    from the global RNG; its latent normalization is set after training."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )


def build_scheduler():
    """The static-shift flow-matching scheduler (shift :data:`SHIFT`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT, use_dynamic_shifting=False)


def build_untrained_pipeline(seed: int = 0):
    """The testbed ``FluxPipeline`` before any training: seeded random transformer and VAE, the tiny library
    text encoders (seeded by the same ``seed``), the testbed tokenizers and scheduler; every module in eval mode.
    The global RNG is left as it was."""
    from diffusers import FluxPipeline

    text_encoders = build_tiny_flux_pipeline(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_transformer()
        vae = build_vae()
    pipeline = FluxPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=text_encoders.text_encoder,
        tokenizer=testbed_clip_tokenizer(),
        text_encoder_2=text_encoders.text_encoder_2,
        tokenizer_2=testbed_t5_tokenizer(),
        transformer=transformer,
    )
    for module in (transformer, vae, pipeline.text_encoder, pipeline.text_encoder_2):
        module.eval()
    return pipeline
