"""Tokenizers whose vocabularies hold the testbed's words as single tokens.

The library's tiny tokenizers (``trl_flow_egrpo.tiny``) split text into characters: ``"a red circle top
left"`` is 20 CLIP tokens, and the position of a word in the sequence shifts with the length of the words
before it. A transformer reading random-but-fixed text encoders learns far faster from one token per word,
so the testbed extends both tokenizers: every grammar word becomes one token, anything else still tokenizes
into characters (so any text is accepted, as with the tiny tokenizers).
"""

from __future__ import annotations

from collections.abc import Sequence

from trl_flow_egrpo.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

from .grammar import WORDS

_WORD_PIECE_SCORE = -1.0
"""Unigram log-probability of a whole-word piece; characters score -3 to -3.5 each, so the whole word wins."""


def _bpe_symbols(word: str, merge_ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE of one word as CLIP applies it: characters (the last with ``</w>``), then repeatedly merge the adjacent
    pair with the lowest merge rank until no adjacent pair is a merge."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        adjacent = zip(symbols, symbols[1:], strict=False)
        pairs = [(merge_ranks.get(pair, len(merge_ranks)), i) for i, pair in enumerate(adjacent)]
        rank, i = min(pairs)
        if rank == len(merge_ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def whole_word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which each of ``words`` is a single token.

    Word by word, while BPE (with the merges so far) leaves the word in several symbols, the merge of its first
    two symbols is appended. A new merge has the highest rank, so it never fires inside an earlier word: BPE
    picks the lowest-ranked applicable merge, and an earlier word always has one of its own until it is whole.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(symbols := _bpe_symbols(word, {pair: rank for rank, pair in enumerate(merges)})) > 1:
            merges.append((symbols[0], symbols[1]))
    return merges


def testbed_clip_tokenizer(model_max_length: int = 77):
    """The tiny byte-level BPE ``CLIPTokenizer`` whose merges make every grammar word one token.

    ``<|endoftext|>`` has the largest id: the tiny CLIP text config has the legacy ``eos_token_id=2``, for which
    ``CLIPTextModel`` pools at the largest id of the sequence, i.e. at ``<|endoftext|>``.
    """
    return tiny_clip_tokenizer(model_max_length, merges=whole_word_merges(WORDS))


def testbed_t5_tokenizer(model_max_length: int = 512):
    """The tiny Unigram ``T5Tokenizer``'s character pieces plus one piece ``"▁<word>"`` per grammar word, scored
    so that a grammar word is always tokenized whole."""
    return tiny_t5_tokenizer(
        model_max_length, extra_pieces=tuple(("▁" + word, _WORD_PIECE_SCORE) for word in WORDS if len(word) > 1)
    )
