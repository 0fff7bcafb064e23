"""Input corruption for text VAEs: encoder-input deletion / masking and decoder word dropout (docs/method.md).

All functions are pure jnp, jit-able and shape-preserving, and act on right-padded batches. Randomness comes
only from the explicit ``rng``. ``special_ids`` (BOS / EOS / PAD / mask / decoder start) is a static tuple of
ids that are never deleted or replaced; pass it through ``functools.partial`` or ``static_argnames`` when
jitting. ``<unk>`` does not belong in it: it is an ordinary token (about 5% of PTB) and is corrupted like
any word.

Unlike Park & Lee's released code, the corrupted ids and their attention mask stay consistent
(docs/method.md, defect 1):
after :func:`delete_tokens`, ``mask == 1`` exactly on the surviving tokens, which sit at the left in their
original order, and every other position holds ``pad_id``.

:func:`text_infilling` (and :func:`infill_example` for one sequence) is BART's pretraining corruption: spans
with Poisson lengths, each replaced by a single mask token, used by ``flax_textvae.pretrain``.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _is_special(ids: Array, special_ids: Sequence[int]) -> Array:
    """Boolean [B, S]: ids that are in ``special_ids``."""
    special_ids = tuple(int(i) for i in special_ids)
    if not special_ids:
        return jnp.zeros(ids.shape, bool)
    return jnp.isin(ids, jnp.asarray(special_ids, ids.dtype))


def _corruptible(rng: Array, ids: Array, mask: Array, max_rate, special_ids: Sequence[int]) -> Array:
    """Boolean [B, S] of tokens to corrupt: rate r_b ~ U(0, max_rate) per example, then Bernoulli(r_b) per
    real, non-special token."""
    rate_rng, token_rng = jax.random.split(rng)
    rate = jax.random.uniform(rate_rng, (ids.shape[0], 1)) * jnp.asarray(max_rate, jnp.float32)
    hit = jax.random.uniform(token_rng, ids.shape) < rate
    return hit & (mask > 0) & ~_is_special(ids, special_ids)


def delete_tokens(
    rng: Array, ids: Array, mask: Array, max_rate, special_ids: Sequence[int], pad_id: int
) -> Tuple[Array, Array]:
    """Randomly deletes tokens from a right-padded batch and re-packs the survivors to the left.

    Each example b draws a rate r_b ~ U(0, max_rate); each real (mask 1), non-special token is deleted with
    probability r_b (expected fraction deleted: max_rate / 2). Survivors keep their order and move to the
    left; the freed tail holds ``pad_id`` with mask 0.

    Args:
      rng: PRNG key.
      ids: token ids [B, S], integer, right-padded.
      mask: attention mask [B, S], 1 on real tokens, 0 on padding.
      max_rate: upper bound p of the per-example deletion rate (may be traced).
      special_ids: ids never deleted (static tuple).
      pad_id: id written into the freed positions.

    Returns:
      ``(ids, mask)``, same shapes and dtypes as the inputs; ``mask == 1`` exactly where a surviving token is,
      and ids are ``pad_id`` wherever the mask is 0.
    """
    keep = (mask > 0) & ~_corruptible(rng, ids, mask, max_rate, special_ids)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :]
    # Kept tokens sort first by position; dropped / padded ones after all of them. Keys are unique.
    sort_key = jnp.where(keep, positions, positions + ids.shape[1])
    order = jnp.argsort(sort_key, axis=1)
    new_ids = jnp.take_along_axis(ids, order, axis=1)
    new_keep = jnp.take_along_axis(keep, order, axis=1)
    new_ids = jnp.where(new_keep, new_ids, jnp.asarray(pad_id, ids.dtype))
    return new_ids, new_keep.astype(mask.dtype)


def mask_tokens(rng: Array, ids: Array, mask: Array, max_rate, special_ids: Sequence[int], mask_id: int) -> Array:
    """Randomly replaces tokens with ``mask_id``; the attention mask does not change.

    Each example b draws a rate r_b ~ U(0, max_rate); each real, non-special token is replaced with
    probability r_b.

    Args:
      rng: PRNG key.
      ids: token ids [B, S], integer, right-padded.
      mask: attention mask [B, S], 1 on real tokens, 0 on padding.
      max_rate: upper bound p of the per-example masking rate (may be traced).
      special_ids: ids never replaced (static tuple).
      mask_id: replacement id (BART ``<mask>``; for T5 e.g. a sentinel or ``<unk>``).

    Returns:
      ids [B, S], same dtype.
    """
    hit = _corruptible(rng, ids, mask, max_rate, special_ids)
    return jnp.where(hit, jnp.asarray(mask_id, ids.dtype), ids)


def word_dropout(
    rng: Array, decoder_input_ids: Array, rate, unk_id: int, special_ids: Sequence[int], mask: Optional[Array] = None
) -> Array:
    """Decoder word dropout (Bowman et al. 2016): replaces teacher-forced decoder INPUT tokens with ``unk_id``.

    Each token is replaced independently with probability ``rate``, except position 0 (the decoder start
    token), ids in ``special_ids`` and, when ``mask`` is given, padded positions. The targets are untouched.

    Args:
      rng: PRNG key.
      decoder_input_ids: [B, T] integer ids (decoder start + target[:-1]).
      rate: replacement probability in [0, 1] (may be traced).
      unk_id: replacement id (``<unk>``, or ``<mask>`` for BART).
      special_ids: ids never replaced (static tuple; include PAD and the decoder start id).
      mask: optional [B, T] decoder attention mask; positions with 0 are never replaced.

    Returns:
      ids [B, T], same dtype.
    """
    ids = decoder_input_ids
    hit = jax.random.uniform(rng, ids.shape) < jnp.asarray(rate, jnp.float32)
    hit = hit & ~_is_special(ids, special_ids) & (jnp.arange(ids.shape[1]) > 0)[None, :]
    if mask is not None:
        hit = hit & (mask > 0)
    return jnp.where(hit, jnp.asarray(unk_id, ids.dtype), ids)


def infill_example(
    rng: Array, ids: Array, mask: Array, rate, poisson_lambda, special_ids: Sequence[int], mask_id: int, pad_id: int
) -> Tuple[Array, Array]:
    """BART text infilling of one right-padded sequence: spans of Poisson length become one mask token each.

    Let ``m`` be the number of real (mask 1), non-special tokens. ``k`` of them are masked, ``k`` the
    stochastic rounding of ``rate * m`` (so ``E[k] = rate * m`` at every length). Span lengths are drawn
    i.i.d. from Poisson(``poisson_lambda``) until they add up to ``k``, the last one cut to fit; a span of
    length 0 is kept and inserts a mask token. The spans and the ``m - k`` untouched tokens are arranged
    in a uniformly random order with no two spans adjacent (each span takes its own gap between untouched
    tokens; only when there are more spans than gaps do several share one, and those merge). Every span
    turns into exactly one ``mask_id`` in the output. Special tokens are never masked, and no mask is
    placed before the first or after the last maskable token, so ``<s> ... </s>`` keep their places.

    The output has the input's static length ``S``: it is re-packed to the left and padded with
    ``pad_id``. Deletion shortens the sequence; if the zero-length insertions would push it past ``S``,
    the last insertions are dropped, so the result always fits.

    Args:
      rng: PRNG key (the result is a pure function of it and the inputs).
      ids: token ids [S], integer, right-padded.
      mask: attention mask [S], 1 on real tokens, 0 on padding.
      rate: fraction of maskable tokens to mask, in [0, 1] (may be traced).
      poisson_lambda: mean span length (> 0; may be traced).
      special_ids: ids never masked (static tuple: BOS, EOS, PAD, mask, decoder start).
      mask_id: the replacement id (BART ``<mask>``).
      pad_id: the id written after the end.

    Returns:
      ``(ids, mask)`` [S], the input dtypes: the corrupted sequence at the left, ``mask == 1`` exactly on
      it, ``pad_id`` elsewhere.
    """
    s = ids.shape[0]
    k_round, k_len, k_gap = jax.random.split(rng, 3)
    real = mask > 0
    maskable = real & ~_is_special(ids, special_ids)
    m = jnp.sum(maskable, dtype=jnp.int32)
    k = jnp.floor(jnp.asarray(rate, jnp.float32) * m + jax.random.uniform(k_round)).astype(jnp.int32)
    k = jnp.clip(k, 0, m)

    kept_rank, emit_rank = _span_layout(k_len, k_gap, k, m, s, poisson_lambda)
    return _pack(ids, mask, real, maskable, kept_rank, emit_rank, m, mask_id, pad_id)


def _span_layout(k_len: Array, k_gap: Array, k: Array, m: Array, s: int, poisson_lambda):
    """Where the spans of :func:`infill_example` go, over the ranks 0..m of the maskable tokens:
    ``(kept_rank, emit_rank)`` [s + 2], whether the token of each rank is kept, and whether a mask token is
    emitted right before it (rank m: after the last maskable token)."""
    positions = jnp.arange(s, dtype=jnp.int32)
    # Span lengths: s draws always suffice (each non-empty span covers a token); the last draw takes whatever
    # the others leave of k, so the masked count is exactly k.
    draws = jax.random.poisson(k_len, jnp.asarray(poisson_lambda, jnp.float32), (s,)).astype(jnp.int32)
    before = jnp.cumsum(draws) - draws  # tokens covered by the spans drawn earlier
    left = jnp.maximum(k - before, 0)
    lengths = jnp.where(positions < s - 1, jnp.minimum(draws, left), left)
    used = before < k  # the spans needed to reach k (length-0 ones included)

    # The u = m - k untouched tokens leave u + 1 gaps; span j takes gap order[j] of a random order of them.
    u = m - k
    gap_ids = jnp.arange(s + 1, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(gap_ids <= u, jax.random.uniform(k_gap, (s + 1,)), 2.0))
    gap = order[jnp.mod(positions, u + 1)]
    span_len = jnp.zeros(s + 1, jnp.int32).at[gap].add(jnp.where(used, lengths, 0))
    occupied = jnp.zeros(s + 1, jnp.int32).at[gap].max(used.astype(jnp.int32)) > 0
    covered_before = jnp.cumsum(span_len) - span_len
    # In the order of the maskable tokens ("ranks" 0..m-1): untouched token g has rank g + tokens masked
    # before it; the mask of gap g goes right before rank g + covered_before[g] (rank m: after the last one).
    dump = s + 1
    kept_rank = jnp.zeros(s + 2, bool).at[jnp.where(gap_ids < u, gap_ids + covered_before + span_len, dump)].set(True)
    emit_rank = jnp.zeros(s + 2, bool).at[jnp.where(occupied, gap_ids + covered_before, dump)].set(True)
    return kept_rank, emit_rank


def _pack(
    ids: Array,
    mask: Array,
    real: Array,
    maskable: Array,
    kept_rank: Array,
    emit_rank: Array,
    m: Array,
    mask_id: int,
    pad_id: int,
) -> Tuple[Array, Array]:
    """The corrupted sequence of :func:`infill_example` from its span layout, re-packed to the left."""
    s = ids.shape[0]
    positions = jnp.arange(s, dtype=jnp.int32)
    dump = s + 1
    rank = jnp.cumsum(maskable) - 1
    safe_rank = jnp.where(maskable, rank, dump)
    keep = real & (~maskable | kept_rank[safe_rank])
    replaces = maskable & ~kept_rank[safe_rank]  # a masked token (the first of a span carries the mask)
    emit = jnp.zeros(s + 1, bool).at[:s].set(maskable & emit_rank[safe_rank])
    last = jnp.max(jnp.where(maskable, positions, -1))
    emit = emit.at[jnp.where(emit_rank[m] & (m > 0), last + 1, s)].max(emit_rank[m] & (m > 0))

    # Insertions (masks that replace nothing) are what can make the output longer than s: drop the last ones.
    keep_ext = jnp.concatenate([keep, jnp.zeros(1, bool)])
    insert = emit & ~jnp.concatenate([replaces, jnp.zeros(1, bool)])
    overflow = jnp.maximum(jnp.sum(emit) + jnp.sum(keep) - s, 0)
    from_end = jnp.cumsum(insert[::-1])[::-1]
    emit = emit & ~(insert & (from_end <= overflow))

    # Assemble: at each position, its mask (if any) and then its token (if kept).
    count = emit.astype(jnp.int32) + keep_ext.astype(jnp.int32)
    start = jnp.cumsum(count) - count
    ext_ids = jnp.concatenate([ids, jnp.full((1,), pad_id, ids.dtype)])
    out = jnp.full((s + 1,), pad_id, ids.dtype)
    out = out.at[jnp.where(emit, start, s)].set(jnp.asarray(mask_id, ids.dtype))
    out = out.at[jnp.where(keep_ext, start + emit, s)].set(ext_ids)
    length = jnp.sum(count)
    out = jnp.where(jnp.arange(s + 1) < length, out, jnp.asarray(pad_id, ids.dtype))[:s]
    return out, (positions < length).astype(mask.dtype)


def text_infilling(
    rng: Array, ids: Array, mask: Array, rate, poisson_lambda, special_ids: Sequence[int], mask_id: int, pad_id: int
) -> Tuple[Array, Array]:
    """:func:`infill_example` on every row of a batch; row ``b`` draws from ``fold_in(rng, b)``.

    Args:
      rng: PRNG key.
      ids: token ids [B, S], integer, right-padded.
      mask: attention mask [B, S].
      rate, poisson_lambda, special_ids, mask_id, pad_id: as for :func:`infill_example`.

    Returns:
      ``(ids, mask)`` [B, S].
    """
    keys = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(ids.shape[0]))
    return jax.vmap(lambda key, i, m: infill_example(key, i, m, rate, poisson_lambda, special_ids, mask_id, pad_id))(
        keys, ids, mask
    )
