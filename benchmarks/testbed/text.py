"""Tokenizers whose vocabularies hold the testbed's words as single tokens.

The library's tiny tokenizers (``trl_flow_egrpo.tiny``) split text into characters: ``"a red circle top
left"`` is 20 CLIP tokens, and the position of a word in the sequence shifts with the length of the words
before it. A transformer reading random-but-fixed text encoders learns far faster from one token per word,
so the testbed extends both tokenizers: every grammar word becomes one token, anything else still tokenizes
into characters (so any text is accepted, as with the tiny tokenizers).
"""

from __future__ import annotations

from collections.abc import Sequence

from trl_flow_egrpo.tiny import _T5_PIECES, _byte_unicode_chars

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
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
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
    """A byte-level BPE ``CLIPTokenizer`` built in memory whose merges make every grammar word one token.

    Vocabulary: the 256 byte characters, the same with ``</w>``, each merge's result, then ``<|startoftext|>``
    and ``<|endoftext|>`` last: the tiny CLIP text config has the legacy ``eos_token_id=2``, for which
    ``CLIPTextModel`` pools at the largest id of the sequence, i.e. at ``<|endoftext|>``.
    """
    from transformers import CLIPTokenizer

    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = whole_word_merges(WORDS)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def testbed_t5_tokenizer(model_max_length: int = 512):
    """A Unigram ``T5Tokenizer`` built in memory: the tiny T5 tokenizer's character pieces plus one piece
    ``"▁<word>"`` per grammar word, scored so that a grammar word is always tokenized whole."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _T5_PIECES] + [("▁" + c, -3.5) for c in _T5_PIECES]
    pieces += [("▁" + word, _WORD_PIECE_SCORE) for word in WORDS if len(word) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
