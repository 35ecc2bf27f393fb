"""The tiny FLUX.2 pipelines: FLUX.2 [dev] and FLUX.2 [klein]."""

from __future__ import annotations

import torch

from .common import BYTE_LEVEL_MERGES, byte_level_vocab, tiny_qwen_tokenizer

_FLUX2_TEXT_HIDDEN = 16
"""Hidden size of the tiny FLUX.2 text encoders; the transformer's ``joint_attention_dim`` is three times it
(the pipelines stack three of the encoder's hidden states per token)."""

_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
"""Mistral-Small-3.1's chat layout, reduced to what text-only conversations need."""


def tiny_mistral3_processor(model_max_length: int = 512):
    """A ``PixtralProcessor`` (FLUX.2 [dev]'s tokenizer class) around a byte-level BPE tokenizer built in memory,
    with Mistral's control tokens and a minimal chat template (ids fit a vocab of 300).

    FLUX.2's system message is one added token: the real tokenizer spends about 80 of its 512 tokens on it, a
    byte-level one would spend about 200, and tiny sequence lengths would then cut the prompt itself away.
    """
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=byte_level_vocab(), merges=BYTE_LEVEL_MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[
            "[INST]",
            "[/INST]",
            "[SYSTEM_PROMPT]",
            "[/SYSTEM_PROMPT]",
            "[IMG]",
            "[IMG_BREAK]",
            "[IMG_END]",
            SYSTEM_MESSAGE,
        ],
        model_max_length=model_max_length,
    )
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=16),
        tokenizer=tokenizer,
        patch_size=16,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def _tiny_flux2_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    # FLUX.2's layout: 32 latent channels 2x2-patchified into 128 token channels, double- then single-stream
    # blocks, 4-axis RoPE (time, row, column, text position) summing to the head dimension, no biases.
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _FLUX2_TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=guidance_embeds,
    )


def _tiny_flux2_vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=32, sample_size=32
    )
    # Latents are normalized by the VAE's batch-norm statistics; a fresh BatchNorm's (mean 0, variance 1) would
    # make a missing de-normalization invisible, so the tiny VAE gets statistics far from the identity.
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.25, 4.0)
    return vae


def _flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The FLUX.2 pipelines always pass mu = compute_empirical_mu(tokens, steps); the scheduler uses it when it
    # shifts dynamically, as the released FLUX.2 schedulers do.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def build_tiny_flux2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``Flux2Pipeline`` with random weights and FLUX.2 [dev]'s layout scaled down (about 0.1M parameters in
    the transformer).

    Like FLUX.2 [dev] it has a 32-channel 8x VAE with batch-norm latent statistics, 2x2 patchified latents packed
    into 128-channel tokens, a guidance-embedding transformer, a Mistral-3 vision-language text encoder whose
    hidden states 10, 20 and 30 are stacked per token (so it has 30 layers, of width 16), a ``PixtralProcessor``
    with a chat template, and a dynamically shifting scheduler.

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.

    Returns:
        A ``diffusers.Flux2Pipeline`` on the CPU with every component in eval mode. Sizes must be multiples of
        16; 32x32 gives 4 image tokens.
    """
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor = tiny_mistral3_processor()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _tiny_flux2_transformer(guidance_embeds=True)
        vae = _tiny_flux2_vae()
        text_encoder = Mistral3ForConditionalGeneration(
            Mistral3Config(
                text_config=dict(
                    model_type="mistral",
                    vocab_size=300,
                    hidden_size=_FLUX2_TEXT_HIDDEN,
                    intermediate_size=32,
                    num_hidden_layers=30,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    head_dim=8,
                    max_position_embeddings=1024,
                ),
                vision_config=dict(
                    model_type="pixtral",
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    head_dim=8,
                    image_size=32,
                    patch_size=16,
                ),
                image_token_index=processor.tokenizer.convert_tokens_to_ids("[IMG]"),
                spatial_merge_size=1,
            )
        )
    pipeline = Flux2Pipeline(
        scheduler=_flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=processor, transformer=transformer
    )
    for module in (transformer, vae, text_encoder):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


def build_tiny_flux2_klein_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, is_distilled: bool = False):
    """A ``Flux2KleinPipeline`` with random weights and FLUX.2 [klein]'s layout scaled down.

    The transformer and VAE are FLUX.2's (see :func:`build_tiny_flux2_pipeline`) without the guidance embedding;
    the text encoder is a Qwen3 causal LM whose hidden states 9, 18 and 27 are stacked per token (27 layers of
    width 16) with a ``Qwen2Tokenizer`` and a Qwen3 chat template.

    Args:
        seed: seeds the random weights, so the same seed gives the same pipeline.
        dtype: dtype of all components.
        is_distilled: like FLUX.2 [klein] 4B / 9B (step-distilled: no classifier-free guidance); False is the
            [klein] base models (true classifier-free guidance against the empty prompt).

    Returns:
        A ``diffusers.Flux2KleinPipeline`` on the CPU with every component in eval mode. Sizes must be
        multiples of 16.
    """
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _tiny_flux2_transformer(guidance_embeds=False)
        vae = _tiny_flux2_vae()
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=300,
                hidden_size=_FLUX2_TEXT_HIDDEN,
                intermediate_size=32,
                num_hidden_layers=27,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
            )
        )
    pipeline = Flux2KleinPipeline(
        scheduler=_flux2_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_qwen_tokenizer(),
        transformer=transformer,
        is_distilled=is_distilled,
    )
    for module in (transformer, vae, text_encoder):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
