"""Tokenizing text for the VAE, and training small offline word-level tokenizers.

``encode_texts`` turns strings into token-id arrays with the checkpoint's own special tokens
(BART: ``<s> ... </s>``; T5: ``... </s>``), truncated to ``max_length`` with the EOS kept last.

``train_word_tokenizer`` builds a whitespace word-level tokenizer with the special-token layout of BART or
T5, saved as a Hugging Face tokenizer folder, for from-scratch models and tests that need no download.
Note: a literal ``<unk>`` in the text (as in PTB) is the tokenizer's unknown token, so it is encoded as
``unk_token_id`` and, like every special token, dropped by ``decode(..., skip_special_tokens=True)``.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Sequence

import numpy as np
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from flax_textvae.models import families

_ENCODE_CHUNK = 1024


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Tokenizes texts with the tokenizer's special tokens and truncates them, keeping the EOS last.

    Args:
      tokenizer: a Hugging Face tokenizer (called as ``tokenizer(list_of_texts, add_special_tokens=True)``).
      texts: the examples.
      max_length: the longest allowed sequence, special tokens included (>= 2).

    Returns:
      (ids, stats): ``ids[i]`` is an int32 array ``[L_i]`` with ``L_i <= max_length``, e.g. BART
      ``[<s>, w1, ..., wn, </s>]``, T5 ``[w1, ..., wn, </s>]``; a truncated sequence keeps its first
      ``max_length - 1`` tokens and its final EOS. ``stats``: ``examples``, ``truncated`` (how many were
      cut), ``tokens`` (sum of L_i after truncation), ``max_length_seen`` (longest before truncation),
      ``mean_length`` (after truncation).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
    texts = list(texts)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    out: list[np.ndarray] = []
    truncated = 0
    longest = 0
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = texts[start : start + _ENCODE_CHUNK]
        encoded = tokenizer(chunk, add_special_tokens=True)["input_ids"]
        for ids in encoded:
            longest = max(longest, len(ids))
            if len(ids) > max_length:
                truncated += 1
                if eos_id is not None and ids[-1] == eos_id:
                    ids = list(ids[: max_length - 1]) + [eos_id]
                else:
                    ids = ids[:max_length]
            out.append(np.asarray(ids, dtype=np.int32))
    tokens = int(sum(len(x) for x in out))
    stats = {
        "examples": len(out),
        "truncated": truncated,
        "tokens": tokens,
        "max_length_seen": longest,
        "mean_length": tokens / max(len(out), 1),
    }
    return out, stats


def train_word_tokenizer(
    texts: Sequence[str], folder: str | os.PathLike, *, family: str = "bart", vocab_size: int = 30000, min_freq: int = 1
) -> Any:
    """Trains a whitespace word-level tokenizer offline, saves it to ``folder`` and loads it back.

    Special-token layouts (ids fixed; ``families.get(family).tokenizer_layout``):
      * ``'bart'``: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4; encoding gives
        ``<s> w1 .. wn </s>``.
      * ``'t5'``: ``<pad>``=0, ``</s>``=1, ``<unk>``=2; encoding gives ``w1 .. wn </s>``.
    Words follow in order of decreasing frequency (ties: first seen) up to ``vocab_size`` entries in all;
    words seen fewer than ``min_freq`` times map to ``<unk>``. Decoding with ``skip_special_tokens=True``
    gives the words joined by single spaces.

    Args:
      texts: training sentences (split on whitespace).
      folder: where ``save_pretrained`` writes the tokenizer files (created if needed).
      family: a model_type of ``families.FAMILIES`` ('bart' or 't5').
      vocab_size: total vocabulary size, special tokens included.
      min_freq: minimum count for a word to get its own id.

    Returns:
      ``transformers.AutoTokenizer.from_pretrained(folder)`` (a ``PreTrainedTokenizerFast``).
    """
    if family not in families.FAMILIES:
        raise ValueError(f"family must be one of {sorted(families.FAMILIES)}, got {family!r}")
    layout = families.get(family).tokenizer_layout
    specials = list(layout.specials)
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for words after {len(specials)} special tokens")
    # The vocabulary is counted here rather than by tokenizers' WordLevelTrainer, which leaves a hole in
    # the special ids when a special token (PTB's literal <unk>) also occurs in the text.
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(text.split())
    words = [w for w, c in counts.most_common() if c >= min_freq and w not in specials]  # stable on ties
    vocab = {s: i for i, s in enumerate(specials)}
    for w in words[: vocab_size - len(specials)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=layout.special_tokens["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    ids = {s: i for i, s in enumerate(specials)}
    used = [s for s in specials if s in layout.single or s in layout.pair]
    tok.post_processor = processors.TemplateProcessing(
        single=layout.single, pair=layout.pair, special_tokens=[(s, ids[s]) for s in used]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=1024, padding_side="right", **layout.special_tokens
    )
    os.makedirs(folder, exist_ok=True)
    wrapped.save_pretrained(os.fspath(folder))
    return transformers.AutoTokenizer.from_pretrained(os.fspath(folder))
