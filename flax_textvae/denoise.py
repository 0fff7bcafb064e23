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


def delete_tokens(rng: Array, ids: Array, mask: Array, max_rate, special_ids: Sequence[int],
                  pad_id: int) -> Tuple[Array, Array]:
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


def mask_tokens(rng: Array, ids: Array, mask: Array, max_rate, special_ids: Sequence[int],
                mask_id: int) -> Array:
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


def word_dropout(rng: Array, decoder_input_ids: Array, rate, unk_id: int, special_ids: Sequence[int],
                 mask: Optional[Array] = None) -> Array:
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
