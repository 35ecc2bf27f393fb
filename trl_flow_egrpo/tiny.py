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
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer(model_max_length: int = 77, merges: list[tuple[str, str]] | None = None):
    """A byte-level BPE ``CLIPTokenizer`` built in memory: the 256 byte characters, the same with ``</w>``, each
    merge's result, then ``<|startoftext|>`` and ``<|endoftext|>`` last (518 tokens with the default five merges;
    ids fit a vocab of 1000). ``merges`` replaces the default ones (e.g. to make whole words single tokens)."""
    from transformers import CLIPTokenizer

    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    if merges is None:
        merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512, extra_pieces: tuple[tuple[str, float], ...] = ()):
    """A Unigram ``T5Tokenizer`` built in memory from single characters (ids fit a vocab of 256), plus
    ``extra_pieces`` (``(piece, score)`` pairs, e.g. whole words) after them."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _T5_PIECES] + [("▁" + c, -3.5) for c in _T5_PIECES] + list(extra_pieces)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _tiny_sd_vae(shift_factor: float, scaling_factor: float):
    """The tiny 16-channel ``AutoencoderKL`` (8x downsampling) of FLUX.1, SD3 and Z-Image, with the family's
    latent normalization."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def _tiny_t5_encoder():
    """The tiny T5 text encoder (2 layers of width 32, vocab 256) of the FLUX.1 and SD3 tiny pipelines."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=256,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            is_encoder_decoder=False,
            use_cache=False,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


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
    from transformers import CLIPTextConfig, CLIPTextModel

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
        vae = _tiny_sd_vae(shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=2,
                hidden_size=32,
                intermediate_size=37,
                layer_norm_eps=1e-5,
                num_attention_heads=4,
                num_hidden_layers=2,
                pad_token_id=1,
                vocab_size=1000,
                hidden_act="gelu",
                projection_dim=32,
                max_position_embeddings=77,
            )
        )
        text_encoder_2 = _tiny_t5_encoder()
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
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip_encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=2,
                hidden_size=32,
                intermediate_size=37,
                layer_norm_eps=1e-5,
                num_attention_heads=4,
                num_hidden_layers=2,
                pad_token_id=1,
                vocab_size=1000,
                hidden_act="gelu",
                projection_dim=32,
                max_position_embeddings=77,
            )
        )

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
        vae = _tiny_sd_vae(shift_factor=0.0609, scaling_factor=1.5305)
        text_encoder, text_encoder_2 = clip_encoder(), clip_encoder()
        text_encoder_3 = _tiny_t5_encoder()
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


# --- FLUX.2 --------------------------------------------------------------------------------------------------

_FLUX2_TEXT_HIDDEN = 16
"""Hidden size of the tiny FLUX.2 text encoders; the transformer's ``joint_attention_dim`` is three times it
(the pipelines stack three of the encoder's hidden states per token)."""


def _byte_level_vocab() -> dict[str, int]:
    # Byte-level BPE base vocabulary (the GPT-2 / Tekken / Qwen alphabet) plus a few merges' results.
    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for left, right in _BYTE_LEVEL_MERGES:
        vocab.setdefault(left + right, len(vocab))
    return vocab


_BYTE_LEVEL_MERGES = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("o", "n")]

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

_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's chat layout (``enable_thinking=False`` opens an empty thinking block), reduced to text messages."""


def tiny_mistral3_processor(model_max_length: int = 512):
    """A ``PixtralProcessor`` (FLUX.2 [dev]'s tokenizer class) around a byte-level BPE tokenizer built in memory,
    with Mistral's control tokens and a minimal chat template (ids fit a vocab of 300).

    FLUX.2's system message is one added token: the real tokenizer spends about 80 of its 512 tokens on it, a
    byte-level one would spend about 200, and tiny sequence lengths would then cut the prompt itself away.
    """
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_byte_level_vocab(), merges=_BYTE_LEVEL_MERGES))
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


def tiny_qwen_tokenizer(
    model_max_length: int = 512, chat_template: str | None = _QWEN3_CHAT_TEMPLATE, whole_words: str = ""
):
    """A byte-level BPE ``Qwen2Tokenizer`` (the class Qwen3 and Qwen2.5-VL use) built in memory, with Qwen's
    chat tokens and a minimal Qwen3 chat template (ids fit a vocab of 300, or 512 with ``whole_words``).

    Args:
        model_max_length: the tokenizer's maximum length.
        chat_template: the Jinja chat template (None: none).
        whole_words: text whose words (as the tokenizer's pre-tokenizer splits it) each become one token, as
            common words are in the real vocabulary. Qwen-Image drops its prompt template by token count (the
            first 34), so the tiny tokenizer must split that template into as many tokens as the real one does.
    """
    import re

    from transformers import Qwen2Tokenizer

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    vocab, merges = _byte_level_vocab(), list(_BYTE_LEVEL_MERGES)
    if whole_words:
        pre_tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges)).backend_tokenizer.pre_tokenizer
        text = re.sub("|".join(map(re.escape, specials)), "\n", whole_words)
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
        vocab = {c: i for i, c in enumerate(_byte_unicode_chars())}
        word_merges = []
        for piece in pieces:  # each word is built left to right; these merges rank first
            for end in range(2, len(piece) + 1):
                if piece[:end] not in vocab:
                    word_merges.append((piece[: end - 1], piece[end - 1]))
                    vocab[piece[:end]] = len(vocab)
        merges = word_merges + [(left, right) for left, right in merges if left + right not in vocab]
        for left, right in merges[len(word_merges) :]:
            vocab[left + right] = len(vocab)
    for token in specials + ("<think>", "</think>"):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        chat_template=chat_template,
        model_max_length=model_max_length,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
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


# --- Qwen-Image ----------------------------------------------------------------------------------------------


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
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # The pipeline sets its prompt template in __init__: read it from an empty instance.
    template = QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None
    ).prompt_template_encode
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
                    vocab_size=512,
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
    pipeline = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    for module in (transformer, vae, text_encoder):
        module.eval()
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


# --- Wan (text-to-video) -------------------------------------------------------------------------------------


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


# --- Z-Image -------------------------------------------------------------------------------------------------


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
        vae = _tiny_sd_vae(shift_factor=0.1159, scaling_factor=0.3611)
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
