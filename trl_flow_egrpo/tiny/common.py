"""Pieces the tiny pipelines of several families share: in-memory tokenizers (CLIP, T5, Qwen), the CLIP text
encoder configuration, the FLUX.1-style VAE and the T5 text encoder."""

from __future__ import annotations

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


def tiny_clip_text_config():
    """The configuration of the tiny CLIP text encoders (FLUX.1's, SD3's two), on :func:`tiny_clip_tokenizer`'s
    vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
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


def tiny_sd_vae(shift_factor: float, scaling_factor: float):
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


def tiny_t5_encoder():
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


def byte_level_vocab() -> dict[str, int]:
    """The byte-level BPE base vocabulary (the GPT-2 / Tekken / Qwen alphabet) plus the results of
    :data:`BYTE_LEVEL_MERGES`, for the tiny Mistral-3 and Qwen tokenizers."""
    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for left, right in BYTE_LEVEL_MERGES:
        vocab.setdefault(left + right, len(vocab))
    return vocab


BYTE_LEVEL_MERGES = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("o", "n")]
"""The few merges of the tiny byte-level BPE tokenizers (the results are in :func:`byte_level_vocab`)."""

_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's chat layout (``enable_thinking=False`` opens an empty thinking block), reduced to text messages."""


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
    vocab, merges = byte_level_vocab(), list(BYTE_LEVEL_MERGES)
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
