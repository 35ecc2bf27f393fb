"""The tiny Qwen-Image pipeline."""

from __future__ import annotations

import torch

from .common import tiny_qwen_tokenizer


def build_tiny_qwenimage_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``QwenImagePipeline`` with random weights and Qwen-Image's layout scaled down (about 0.1M parameters in the
    transformer).

    Like Qwen-Image it has the Wan-style 3D causal VAE (8x spatial downsampling, 16 latent channels, Qwen-Image's
    per-channel ``latents_mean`` / ``latents_std``, one-frame latents ``[B, 16, 1, H/8, W/8]``), 2x2-packed
    64-channel tokens, an MMDiT with 3-axis RoPE, a Qwen2.5-VL text encoder (2 layers of width 32, multimodal
    RoPE) read at its last hidden state, a ``Qwen2Tokenizer`` that splits the pipeline's prompt template into the
    34 tokens the pipeline drops (as the real tokenizer does), and Qwen-Image's scheduler (dynamic shift with
    ``max_shift`` 0.9 up to 8192 tokens, ``shift_terminal`` 0.02).

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.QwenImagePipeline`` on the CPU with every component in eval mode. Sizes must be multiples
        of 16; 32x32 gives 4 image tokens.
    """
    from diffusers import QwenImagePipeline

    # The pipeline sets its prompt template in __init__: read it from an empty instance.
    template = QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None
    ).prompt_template_encode
    pipeline = QwenImagePipeline(**tiny_qwenimage_components(seed, template))
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


def tiny_qwenimage_components(seed: int, template: str) -> dict:
    """The components of the tiny Qwen-Image pipelines (see :func:`build_tiny_qwenimage_pipeline`): scheduler, VAE,
    text encoder, transformer, and a tokenizer whose vocabulary makes each word of ``template`` (the pipeline's
    prompt template, which it drops by token count) one token."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer(chat_template=None, whole_words=template.format(""))
    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_tokens(vision_tokens, special_tokens=True)
    vision_start, vision_end, image_pad, video_pad = tokenizer.convert_tokens_to_ids(vision_tokens)
    hidden = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=hidden,
            axes_dims_rope=(4, 6, 6),
        )
        # Qwen-Image's latents_mean / latents_std are the class defaults.
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=dict(
                    vocab_size=max(512, len(tokenizer)),
                    hidden_size=hidden,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    max_position_embeddings=2048,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                    bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                    eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    pad_token_id=tokenizer.pad_token_id,
                ),
                vision_config=dict(
                    depth=1,
                    hidden_size=16,
                    intermediate_size=32,
                    num_heads=2,
                    out_hidden_size=hidden,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                    fullatt_block_indexes=[0],
                ),
                image_token_id=image_pad,
                video_token_id=video_pad,
                vision_start_token_id=vision_start,
                vision_end_token_id=vision_end,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
