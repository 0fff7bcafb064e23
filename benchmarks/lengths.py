"""Sentence lengths and random token batches shared by the throughput benchmarks.

The PyTorch baseline (``benchmarks/torch_baseline.py``) and the JAX benchmark both draw their batches from
this module, so that for a given ``seed`` they process exactly the same sequence of batch lengths (and, when
they use :func:`make_batch` with a generator seeded the same way, the same token ids). Only numpy is used.

Length convention: a sentence of ``w`` whitespace words has ``ceil(w * tokens_per_word) + 1`` tokens (the
``+ 1`` is the EOS token that both the encoder input and the decoder target end with).

Synthetic fallback (no file given): a gamma distribution fitted by moments to the Penn Treebank
(Mikolov) test + valid splits, in words + EOS: shape ``k = 4.71``, scale ``theta = 4.65`` (mean 21.9,
std 10.1; the real splits have mean 21.9, median 21, 95th percentile 40, max 78). Draws are rounded and
clipped to ``[2, 80]`` and are fully determined by ``seed``.

Typical use::

    lengths = load_lengths("../shared/data/ptb/test.txt")           # or load_lengths() for synthetic
    plan = batches_of_lengths(lengths, batch_size=16, steps=warmup + steps, seed=0)
    rng = np.random.default_rng(seed)
    for batch_lengths in plan:
        batch = make_batch(batch_lengths, vocab_size=32128, pad_id=0, eos_id=1, decoder_start_id=0,
                           rng=rng, pad="longest")
"""

from __future__ import annotations

import math
import os
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

#: Gamma fit (shape, scale) of PTB sentence lengths in words + EOS; see the module docstring.
SYNTHETIC_GAMMA_SHAPE = 4.71
SYNTHETIC_GAMMA_SCALE = 4.65
#: Clip range of synthetic lengths (tokens, EOS included).
SYNTHETIC_MIN_LENGTH = 2
SYNTHETIC_MAX_LENGTH = 80
#: Default number of synthetic sentences (about the size of the PTB test split).
DEFAULT_NUM_SYNTHETIC = 4000


def _words_to_tokens(num_words: np.ndarray, tokens_per_word: float) -> np.ndarray:
    """Converts word counts to token counts including EOS: ``ceil(words * tokens_per_word) + 1``."""
    if tokens_per_word <= 0:
        raise ValueError(f"tokens_per_word must be positive, got {tokens_per_word}")
    scaled = np.ceil(np.asarray(num_words, dtype=np.float64) * tokens_per_word - 1e-9)
    return scaled.astype(np.int64) + 1


def synthetic_lengths(n: int = DEFAULT_NUM_SYNTHETIC, *, seed: int = 0, tokens_per_word: float = 1.0) -> np.ndarray:
    """Draws PTB-like sentence lengths from the fixed gamma fit (see module docstring).

    Args:
      n: number of sentences.
      seed: seed of the numpy generator; equal seeds give equal arrays.
      tokens_per_word: subword tokens per word; the EOS token is added after scaling.

    Returns:
      int64 array [n] of lengths in tokens, EOS included, in ``[2, ceil(79 * tokens_per_word) + 1]``.
    """
    rng = np.random.default_rng(seed)
    draws = rng.gamma(SYNTHETIC_GAMMA_SHAPE, SYNTHETIC_GAMMA_SCALE, size=n)
    with_eos = np.clip(np.rint(draws), SYNTHETIC_MIN_LENGTH, SYNTHETIC_MAX_LENGTH).astype(np.int64)
    return _words_to_tokens(with_eos - 1, tokens_per_word)


def load_lengths(
    path: PathLike | None = None,
    *,
    tokens_per_word: float = 1.0,
    seed: int = 0,
    n: int = DEFAULT_NUM_SYNTHETIC,
) -> np.ndarray:
    """Sentence lengths in tokens (EOS included), from a text file or the synthetic PTB-like fit.

    Args:
      path: text file with one sentence per line, words separated by whitespace; blank lines are skipped.
        ``None`` uses :func:`synthetic_lengths`. A path that does not exist raises ``FileNotFoundError``.
      tokens_per_word: subword tokens per whitespace word (1.0 = word-level, as PTB is distributed).
      seed: seed for the synthetic lengths (unused for a file).
      n: number of synthetic lengths (unused for a file, which gives one length per non-blank line).

    Returns:
      int64 array [num_sentences] of lengths ``ceil(words * tokens_per_word) + 1``.
    """
    if path is None:
        return synthetic_lengths(n, seed=seed, tokens_per_word=tokens_per_word)
    with open(os.fspath(path), encoding="utf-8") as f:
        words = [len(line.split()) for line in f if line.strip()]
    if not words:
        raise ValueError(f"no non-blank lines in {path}")
    return _words_to_tokens(np.asarray(words, dtype=np.int64), tokens_per_word)


def batches_of_lengths(lengths: np.ndarray, batch_size: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Random batches of lengths, drawn like a shuffled data loader, reproducible from ``seed``.

    The sentences are shuffled once per epoch (``numpy.random.default_rng(seed).permutation``) and cut into
    consecutive batches; an epoch's leftover (fewer than ``batch_size`` sentences) is dropped and a new epoch
    begins. Any two programs calling this with equal arguments get equal batches.

    Args:
      lengths: int array [N] of sentence lengths, N >= batch_size.
      batch_size: sentences per batch.
      steps: number of batches to return.
      seed: seed of the shuffling generator.

    Returns:
      list of ``steps`` int64 arrays, each [batch_size].
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size <= 0 or steps < 0:
        raise ValueError(f"need batch_size > 0 and steps >= 0, got {batch_size}, {steps}")
    if len(lengths) < batch_size:
        raise ValueError(f"only {len(lengths)} lengths for batch size {batch_size}")
    rng = np.random.default_rng(seed)
    per_epoch = len(lengths) // batch_size
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = rng.permutation(len(lengths))
        for i in range(min(per_epoch, steps - len(out))):
            out.append(lengths[order[i * batch_size : (i + 1) * batch_size]].copy())
    return out


def padded_length(lengths: np.ndarray, pad: str | int = "longest", multiple: int = 1) -> int:
    """Sequence length a batch is padded to.

    Args:
      lengths: int array [B] of lengths in tokens.
      pad: ``"longest"`` (longest sentence of the batch) or a fixed length (int, or a string of digits,
        e.g. 256 for the released Park & Lee recipe; longer sentences are truncated to it).
      multiple: round a ``"longest"`` length up to a multiple of this (static-shape buckets); ignored for a
        fixed length.

    Returns:
      the padded length S >= 1.
    """
    if isinstance(pad, str) and pad != "longest":
        if not pad.isdigit():
            raise ValueError(f"pad must be 'longest' or an integer, got {pad!r}")
        pad = int(pad)
    if pad == "longest":
        longest = int(np.max(lengths))
        return int(math.ceil(longest / multiple) * multiple)
    if int(pad) < 1:
        raise ValueError(f"pad length must be positive, got {pad}")
    return int(pad)


def padding_fraction(lengths: np.ndarray, seq_len: int) -> float:
    """Fraction of the ``B * seq_len`` positions that are padding (lengths truncated to ``seq_len``)."""
    lengths = np.minimum(np.asarray(lengths), seq_len)
    return float(1.0 - lengths.sum() / (len(lengths) * seq_len))


def random_token_batch(
    lengths: np.ndarray,
    vocab_size: int,
    pad_id: int,
    eos_id: int,
    rng: np.random.Generator,
    *,
    seq_len: int | None = None,
    low: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids for sentences of the given lengths, each ending in EOS, right-padded.

    Args:
      lengths: int array [B] of lengths (EOS included); truncated to ``seq_len`` (EOS stays last).
      vocab_size: ids are drawn uniformly from ``[low, vocab_size)``.
      pad_id: id written after each sentence.
      eos_id: id written at position ``length - 1``.
      rng: numpy generator (advanced by one ``integers`` call of shape [B, S]).
      seq_len: padded length S; defaults to ``max(lengths)``.
      low: smallest id drawn; defaults to ``max(pad_id, eos_id) + 1`` so no special ids appear inside.

    Returns:
      ``(tokens, mask)``: int32 arrays [B, S]; ``mask`` is 1 on real tokens (EOS included), 0 on padding.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if seq_len is None:
        seq_len = int(lengths.max())
    lengths = np.minimum(lengths, seq_len)
    if low is None:
        low = max(pad_id, eos_id) + 1
    if not 0 <= low < vocab_size:
        raise ValueError(f"empty id range [{low}, {vocab_size})")
    tokens = rng.integers(low, vocab_size, size=(len(lengths), seq_len), dtype=np.int64)
    positions = np.arange(seq_len)[None, :]
    mask = positions < lengths[:, None]
    tokens = np.where(positions == lengths[:, None] - 1, eos_id, tokens)
    tokens = np.where(mask, tokens, pad_id)
    return tokens.astype(np.int32), mask.astype(np.int32)


def make_batch(
    lengths: np.ndarray,
    *,
    vocab_size: int,
    pad_id: int,
    eos_id: int,
    decoder_start_id: int,
    rng: np.random.Generator,
    pad: str | int = "longest",
    multiple: int = 1,
) -> dict[str, np.ndarray]:
    """A random autoencoding batch in the ``flax_textvae.data`` layout (encoder input == decoder target).

    Args:
      lengths: int array [B] of lengths (EOS included).
      vocab_size, pad_id, eos_id: see :func:`random_token_batch`.
      decoder_start_id: first decoder input id (T5: pad id 0; BART: EOS id 2).
      rng: numpy generator, advanced by one :func:`random_token_batch` call.
      pad, multiple: padding rule, see :func:`padded_length`.

    Returns:
      dict of numpy arrays: ``input_ids`` [B,S] int32, ``attention_mask`` [B,S] int32,
      ``decoder_input_ids`` [B,S] int32 (start id + labels[:, :-1]), ``labels`` [B,S] int32,
      ``label_weights`` [B,S] float32, ``example_weight`` [B] float32 (all ones).
    """
    seq_len = padded_length(lengths, pad, multiple)
    tokens, mask = random_token_batch(lengths, vocab_size, pad_id, eos_id, rng, seq_len=seq_len)
    start = np.full((tokens.shape[0], 1), decoder_start_id, dtype=np.int32)
    return {
        "input_ids": tokens,
        "attention_mask": mask,
        "decoder_input_ids": np.concatenate([start, tokens[:, :-1]], axis=1),
        "labels": tokens,
        "label_weights": mask.astype(np.float32),
        "example_weight": np.ones((tokens.shape[0],), dtype=np.float32),
    }
