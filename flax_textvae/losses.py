"""Pure loss functions for text VAEs: token NLL, Gaussian KL, free bits, KL constraint, ELBO assembly.

Everything here is a pure, jit-able function of arrays (see docs/method.md). Only jax is imported, so users can
``import flax_textvae.losses`` into their own training code.

Conventions:
  * ``B`` batch, ``T`` target length, ``V`` vocabulary, ``Dz`` latent size.
  * The reconstruction term is the per-example SUM of token NLLs, averaged over EXAMPLES -- never over padded
    positions (docs/method.md, defect 3). Averages over padded final batches are exact through ``example_weight``.
  * All arithmetic is done in float32 whatever the input dtype.
"""

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Scalar = Union[float, Array]

KINDS = ("elbo", "free_bits", "constraint")
FREE_BITS_MODES = ("per_example", "batch")


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0 (NaN-free in value and gradient)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _weighted_mean(x: Array, example_weight: Optional[Array]) -> Array:
    """Mean over the leading axis of ``x`` [B, ...], weighted by ``example_weight`` [B] when given."""
    if example_weight is None:
        return jnp.mean(x, axis=0)
    ew = jnp.asarray(example_weight, jnp.float32)
    w = ew.reshape((-1,) + (1,) * (x.ndim - 1))
    total = jnp.sum(jnp.where(w > 0, x * w, 0.0), axis=0)
    return _safe_div(total, jnp.sum(ew))


def gaussian_kl(mean: Array, logvar: Array) -> Array:
    """Per-dimension KL( N(mean, exp(logvar)) || N(0, 1) ), in closed form.

    Args:
      mean: posterior means, shape [..., Dz].
      logvar: posterior log-variances, same shape as ``mean``.

    Returns:
      float32 array [..., Dz]: ``0.5 * (mean**2 + exp(logvar) - 1 - logvar)``, >= 0.
    """
    mean = jnp.asarray(mean, jnp.float32)
    logvar = jnp.asarray(logvar, jnp.float32)
    return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def token_nll(logits: Array, targets: Array, weights: Array) -> Array:
    """Per-example summed negative log-likelihood of the target tokens.

    Positions with ``weights == 0`` (padding) do not influence the value or the gradient, even when their
    logits are huge, inf or NaN, and their targets may be any integer (e.g. -100).

    Args:
      logits: decoder logits [B, T, V] (any float dtype; log-softmax is taken in float32).
      targets: target token ids [B, T], integer.
      weights: per-token weights [B, T]; 1 on real tokens (EOS included), 0 on padding.

    Returns:
      float32 [B]: ``sum_t weights[b, t] * -log softmax(logits[b, t])[targets[b, t]]``.
    """
    weights = jnp.asarray(weights, jnp.float32)
    valid = weights > 0
    logits = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
    targets = jnp.where(valid, targets, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, -target_logp * weights, 0.0), axis=-1)


HEAD_LAYOUTS = ("vd", "dv")


def _head_chunk(head: Array, start: Array, size: int, vocab_axis: int) -> Array:
    """Rows ``start .. start + size`` of the vocabulary of ``head`` as a [size, D] array."""
    chunk = jax.lax.dynamic_slice_in_dim(head, start, size, axis=vocab_axis)
    return chunk if vocab_axis == 0 else chunk.T


def _chunk_logits(
    hidden: Array, head: Array, bias: Array, c: Array, size: int, vocab: int, vocab_axis: int
) -> Tuple[Array, Array, Array, Array]:
    """float32 logits [N, size] of vocabulary chunk ``c`` and its bookkeeping.

    The last chunk is shifted left to end at ``vocab`` (so every slice has the static ``size``); the columns it
    shares with the previous chunk are flagged in ``fresh`` and must be ignored.

    Returns:
      ``(logits, ids, fresh, start)``: logits [N, size] (-inf on stale columns), the vocabulary ids [size] of
      the columns, the bool mask [size] of columns this chunk owns, and the chunk's first id.
    """
    start = jnp.minimum(c * size, vocab - size)
    w = _head_chunk(head, start, size, vocab_axis).astype(hidden.dtype)  # [size, D]
    logits = jnp.einsum("nd,vd->nv", hidden, w, preferred_element_type=jnp.float32)
    logits = logits + jax.lax.dynamic_slice_in_dim(bias, start, size).astype(jnp.float32)[None, :]
    ids = start + jnp.arange(size)
    fresh = ids >= c * size
    return jnp.where(fresh[None, :], logits, -jnp.inf), ids, fresh, start


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_nll(hidden: Array, head: Array, bias: Array, targets: Array, size: int, vocab_axis: int) -> Array:
    """Per-position NLL [N] of ``targets`` [N] under logits ``hidden @ head_vd.T + bias``, by vocabulary chunks."""
    return _chunked_nll_fwd(hidden, head, bias, targets, size, vocab_axis)[0]


def _chunked_nll_fwd(hidden, head, bias, targets, size, vocab_axis):
    vocab = head.shape[vocab_axis]
    n = hidden.shape[0]

    def body(carry, c):
        run_max, run_sum, target_logit = carry
        logits, ids, fresh, _ = _chunk_logits(hidden, head, bias, c, size, vocab, vocab_axis)
        new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1)
        hit = (ids[None, :] == targets[:, None]) & fresh[None, :]
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        return (new_max, run_sum, target_logit), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    num_chunks = -(-vocab // size)
    (run_max, run_sum, target_logit), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    lse = run_max + jnp.log(run_sum)
    return lse - target_logit, (hidden, head, bias, targets, lse)


def _chunked_nll_bwd(size, vocab_axis, res, g):
    hidden, head, bias, targets, lse = res
    vocab = head.shape[vocab_axis]
    g = g.astype(jnp.float32)

    def body(carry, c):
        d_hidden, d_head, d_bias = carry
        logits, ids, fresh, start = _chunk_logits(hidden, head, bias, c, size, vocab, vocab_axis)
        onehot = (ids[None, :] == targets[:, None]) & fresh[None, :]
        # d nll / d logits = softmax - onehot; stale columns have softmax exp(-inf) = 0 and no target.
        d_logits = (jnp.exp(logits - lse[:, None]) - onehot) * g[:, None]  # [N, size] float32
        d_bias = jax.lax.dynamic_update_slice_in_dim(
            d_bias, jax.lax.dynamic_slice_in_dim(d_bias, start, size) + jnp.sum(d_logits, axis=0), start, 0
        )
        d_low = d_logits.astype(hidden.dtype)
        w = _head_chunk(head, start, size, vocab_axis).astype(hidden.dtype)  # [size, D]
        d_hidden = d_hidden + jnp.einsum("nv,vd->nd", d_low, w, preferred_element_type=jnp.float32)
        d_w = jnp.einsum("nv,nd->vd", d_low, hidden, preferred_element_type=jnp.float32)  # [size, D]
        if vocab_axis == 1:
            d_w = d_w.T
        old = jax.lax.dynamic_slice_in_dim(d_head, start, size, axis=vocab_axis)
        d_head = jax.lax.dynamic_update_slice_in_dim(d_head, old + d_w, start, vocab_axis)
        return (d_hidden, d_head, d_bias), None

    init = (
        jnp.zeros(hidden.shape, jnp.float32),
        jnp.zeros(head.shape, jnp.float32),
        jnp.zeros(bias.shape, jnp.float32),
    )
    num_chunks = -(-vocab // size)
    (d_hidden, d_head, d_bias), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    return d_hidden.astype(hidden.dtype), d_head.astype(head.dtype), d_bias.astype(bias.dtype), None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def chunked_token_nll(
    hidden: Array,
    head: Array,
    targets: Array,
    weights: Array,
    *,
    bias: Optional[Array] = None,
    scale: Scalar = 1.0,
    head_layout: str = "vd",
    chunk_size: int = 8192,
) -> Array:
    """:func:`token_nll` of the logits ``(scale * hidden) @ head + bias``, without forming those logits.

    The LM head is applied one vocabulary chunk at a time inside a scan that keeps, per position, a running maximum,
    a running sum of exponentials (an online log-sum-exp) and the target's logit, so the float32 logits that exist
    at once are [B * T, chunk_size] instead of [B, T, V]. The gradient has its own rule that recomputes each chunk's
    logits from the saved log-sum-exp, so the backward pass does not keep them either. Matmuls run in the dtype of
    ``hidden`` (the head is cast to it chunk by chunk) with float32 accumulation; all softmax arithmetic is float32.
    ``V`` need not be a multiple of ``chunk_size``.

    The models of ``flax_textvae.models`` map to the arguments as follows (``params`` is the backbone's tree,
    ``hidden`` the decoder output before ``lm_logits``):

      * BART, tied head (``tie_word_embeddings`` True, the usual case): ``head = params['model']['shared']
        ['embedding']`` [V, D], ``head_layout='vd'``, ``bias = params['final_logits_bias']`` ([1, V] is accepted),
        ``scale=1``. Untied: ``head = params['lm_head']['kernel']`` [D, V], ``head_layout='dv'``, the same bias.
      * T5, tied (original T5): ``head = params['shared']['embedding']`` [V, D], ``head_layout='vd'``, ``scale =
        d_model ** -0.5``, no bias. Untied (v1.1 / Flan-T5): ``head = params['lm_head']['kernel']`` [D, V],
        ``head_layout='dv'``, ``scale=1``, no bias.

    Args:
      hidden: decoder hidden states [B, T, D] (float32 or bfloat16; the compute dtype).
      head: the LM head, [V, D] (an embedding table) or [D, V] (a dense kernel), see ``head_layout``.
      targets: target ids [B, T], integer; any value on padding.
      weights: per-token weights [B, T]; 1 on real tokens, 0 on padding.
      bias: optional logit bias [V] or [1, V].
      scale: multiplier of ``hidden`` before the head, applied in the compute dtype (T5's tied head).
      head_layout: ``'vd'`` when ``head`` is [V, D], ``'dv'`` when it is [D, V].
      chunk_size: vocabulary entries per chunk (clipped to V); a static Python int.

    Returns:
      float32 [B]: ``sum_t weights[b, t] * -log softmax(logits[b, t])[targets[b, t]]``, equal to :func:`token_nll`
      of the full logits. Positions with ``weights == 0`` influence neither the value nor any gradient, whatever
      their hidden states hold.

    Raises:
      ValueError: for an unknown ``head_layout``, a non-positive ``chunk_size`` or mismatched shapes.
    """
    vocab_axis = _check_chunked_args(hidden, head, head_layout, chunk_size)
    batch, length, d_model = hidden.shape
    vocab = head.shape[vocab_axis]
    bias = jnp.zeros((vocab,), jnp.float32) if bias is None else jnp.reshape(bias, (vocab,))
    hidden, targets, weights, valid = _mask_padding(hidden, targets, weights, scale)
    size = min(int(chunk_size), vocab)
    nll = _chunked_nll(hidden.reshape(batch * length, d_model), head, bias, targets.reshape(-1), size, vocab_axis)
    return jnp.sum(jnp.where(valid, nll.reshape(batch, length) * weights, 0.0), axis=-1)


def _mask_padding(hidden: Array, targets: Array, weights: Array, scale: Scalar) -> Tuple[Array, Array, Array, Array]:
    """``(hidden, targets, weights, valid)`` for :func:`chunked_token_nll`: float32 ``weights``, ``valid = weights >
    0``, and ``hidden`` (then multiplied by ``scale`` in its own dtype) and int32 ``targets`` zeroed on padding."""
    weights = jnp.asarray(weights, jnp.float32)
    valid = weights > 0
    hidden = jnp.where(valid[..., None], hidden, jnp.zeros((), hidden.dtype))
    if not (isinstance(scale, (int, float)) and scale == 1):
        hidden = hidden * jnp.asarray(scale, hidden.dtype)
    targets = jnp.where(valid, targets, 0).astype(jnp.int32)
    return hidden, targets, weights, valid


def _check_chunked_args(hidden: Array, head: Array, head_layout: str, chunk_size: int) -> int:
    """The vocabulary axis of ``head`` (0 for ``'vd'``, 1 for ``'dv'``) after checking the arguments."""
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    vocab_axis = 0 if head_layout == "vd" else 1
    d_model = hidden.shape[-1]
    if hidden.ndim != 3 or head.ndim != 2 or head.shape[1 - vocab_axis] != d_model:
        raise ValueError(
            f"head of shape {head.shape} does not match layout {head_layout!r} and hidden states "
            f"of shape {hidden.shape} ([B, T, D])"
        )
    return vocab_axis


def free_bits(kl: Array, threshold: Scalar, mode: str = "per_example", example_weight: Optional[Array] = None) -> Array:
    """Free bits / KL thresholding with a per-dimension floor ``lambda = threshold``.

    Args:
      kl: per-dimension KL [B, Dz] (e.g. from :func:`gaussian_kl`).
      threshold: lambda, nats per latent dimension; a scalar or a [Dz] array.
      mode: ``'per_example'`` (Park & Lee 2021): value[b] = sum_d max(kl[b, d], lambda); gradient 1 where
        kl[b, d] > lambda, else 0.
        ``'batch'`` (Kingma et al. 2016; Li et al. 2019): with m_d = mean_b kl[b, d] (weighted by
        ``example_weight`` when given), value[b] = sum_d (kl[b, d] if m_d > lambda else lambda), so the
        (weighted) mean over b equals sum_d max(m_d, lambda); dimensions whose batch mean is under the floor
        get zero gradient, the others the plain gradient of the mean.
      example_weight: optional [B] row weights (0 for filler rows); only used by ``'batch'`` to form m_d.

    Returns:
      float32 [B] per-example values; average them (with the same ``example_weight``) for the loss term.

    Raises:
      ValueError: if ``mode`` is not one of ``'per_example'``, ``'batch'``.
    """
    if mode not in FREE_BITS_MODES:
        raise ValueError(f"free_bits mode must be one of {FREE_BITS_MODES}, got {mode!r}")
    kl = jnp.asarray(kl, jnp.float32)
    lam = jnp.asarray(threshold, jnp.float32)
    if mode == "per_example":
        above = kl > lam
    else:
        above = (_weighted_mean(kl, example_weight) > lam)[None, :]
    return jnp.sum(jnp.where(above, kl, jnp.broadcast_to(lam, kl.shape)), axis=-1)


def kl_constraint(kl: Array, target: Scalar, beta: Scalar = 1.0, example_weight: Optional[Array] = None) -> Array:
    """Prokhorov et al. (2019) KL constraint ``beta * |mean_b kl[b] - C|``.

    Args:
      kl: per-example total KL [B] (sum over latent dimensions).
      target: C, the KL (nats per example) the latent should carry; may come from a schedule.
      beta: multiplier of the constraint.
      example_weight: optional [B] row weights (0 for filler rows) for an exact mean.

    Returns:
      float32 scalar.
    """
    mean_kl = _weighted_mean(jnp.asarray(kl, jnp.float32), example_weight)
    return jnp.asarray(beta, jnp.float32) * jnp.abs(mean_kl - jnp.asarray(target, jnp.float32))


def vae_loss(
    logits: Array,
    targets: Array,
    weights: Array,
    mean: Array,
    logvar: Array,
    *,
    kind: str = "elbo",
    weight: Scalar = 1.0,
    threshold: Scalar = 0.0,
    free_bits_mode: str = "per_example",
    target: Scalar = 0.0,
    beta: Scalar = 1.0,
    example_weight: Optional[Array] = None,
) -> Tuple[Array, Dict[str, Any]]:
    """Assembles the text-VAE objective ``loss = mean_x rec(x) + KL_term`` (docs/method.md).

    ``rec(x)`` is the summed token NLL of example x; the mean is over examples (weighted by ``example_weight``).
    ``KL_term`` depends on ``kind``:

      * ``'elbo'``: ``weight * mean_x sum_d kl_d(x)`` (plain or annealed ELBO).
      * ``'free_bits'``: ``weight * mean_x free_bits(kl(x), threshold, free_bits_mode)``.
      * ``'constraint'``: ``beta * |mean_x sum_d kl_d(x) - target|`` (``weight`` is not used).

    ``weight``, ``threshold``, ``target`` and ``beta`` may be traced scalars (e.g. schedule values at the current
    step); ``kind`` and ``free_bits_mode`` are static Python strings. :func:`vae_loss_from_nll` is the same objective
    with the reconstruction computed by the caller (e.g. by :func:`chunked_token_nll`).

    Args:
      logits: decoder logits [B, T, V].
      targets: target ids [B, T].
      weights: token weights [B, T]; 1 on real target tokens (EOS included), 0 on padding.
      mean: posterior means [B, Dz].
      logvar: posterior log-variances [B, Dz].
      kind: ``'elbo'``, ``'free_bits'`` or ``'constraint'``.
      weight: KL weight (beta of the annealed ELBO) for ``'elbo'`` and ``'free_bits'``.
      threshold: free-bits floor lambda per latent dimension (``'free_bits'`` only).
      free_bits_mode: ``'per_example'`` or ``'batch'`` (see :func:`free_bits`).
      target: the constraint's C in nats per example (``'constraint'`` only).
      beta: the constraint's multiplier (``'constraint'`` only).
      example_weight: optional [B] row weights; 0 for filler rows of a padded final batch. Rows with weight 0 have
        no effect on any value or gradient, whatever their contents.

    Returns:
      ``(loss, aux)``: ``loss`` a float32 scalar; ``aux`` a dict of float32 scalars: ``loss``; ``rec`` mean summed NLL
      per example; ``kl`` mean total KL per example (unclamped); ``neg_elbo`` = rec + kl; ``kl_term`` the KL part of
      the loss; ``kl_weight`` the multiplier applied (``weight``, or ``beta`` for ``'constraint'``); ``kl_target``
      (``target`` for ``'constraint'``, else 0); ``num_examples`` sum of example weights; ``num_tokens`` sum of token
      weights over real rows; ``rec_sum`` and ``kl_sum`` weighted sums over examples (for exact aggregation over many
      batches); ``nll_per_token`` = rec_sum / num_tokens.

    Raises:
      ValueError: for an unknown ``kind`` or ``free_bits_mode``.
    """
    settings = _KLSettings(kind, weight, threshold, free_bits_mode, target, beta)
    return _vae_objective(lambda w: token_nll(logits, targets, w), weights, mean, logvar, example_weight, settings)


def vae_loss_from_nll(
    nll_fn: Callable[[Array], Array],
    weights: Array,
    mean: Array,
    logvar: Array,
    *,
    kind: str = "elbo",
    weight: Scalar = 1.0,
    threshold: Scalar = 0.0,
    free_bits_mode: str = "per_example",
    target: Scalar = 0.0,
    beta: Scalar = 1.0,
    example_weight: Optional[Array] = None,
) -> Tuple[Array, Dict[str, Any]]:
    """:func:`vae_loss` with the per-example reconstruction NLL computed by ``nll_fn``.

    Args:
      nll_fn: ``token_weights [B, T] -> float32 [B]`` summed NLL per example under those weights, e.g.
        ``lambda w: chunked_token_nll(hidden, head, targets, w, ...)``. It receives ``weights`` with the
        filler rows (``example_weight`` 0) already zeroed, so whatever those rows hold cannot reach the loss.
      weights, mean, logvar, kind, weight, threshold, free_bits_mode, target, beta, example_weight: as in
        :func:`vae_loss`.

    Returns:
      ``(loss, aux)`` as :func:`vae_loss`.

    Raises:
      ValueError: for an unknown ``kind`` or ``free_bits_mode``.
    """
    settings = _KLSettings(kind, weight, threshold, free_bits_mode, target, beta)
    return _vae_objective(nll_fn, weights, mean, logvar, example_weight, settings)


class _KLSettings(NamedTuple):
    """The KL-term arguments of :func:`vae_loss`: ``kind`` and ``free_bits_mode`` static, the others maybe traced."""

    kind: str
    weight: Scalar
    threshold: Scalar
    free_bits_mode: str
    target: Scalar
    beta: Scalar


def _vae_objective(
    nll_fn: Callable[[Array], Array],
    weights: Array,
    mean: Array,
    logvar: Array,
    example_weight: Optional[Array],
    settings: _KLSettings,
) -> Tuple[Array, Dict[str, Any]]:
    """``(loss, aux)`` of :func:`vae_loss_from_nll` (and so of :func:`vae_loss`) for the KL ``settings``."""
    if settings.kind not in KINDS:
        raise ValueError(f"vae_loss kind must be one of {KINDS}, got {settings.kind!r}")
    if settings.free_bits_mode not in FREE_BITS_MODES:
        raise ValueError(f"free_bits_mode must be one of {FREE_BITS_MODES}, got {settings.free_bits_mode!r}")
    ew, weights, mean, logvar = _isolate_filler_rows(weights, mean, logvar, example_weight)
    nll = nll_fn(weights)  # [B]
    kl_dim = gaussian_kl(mean, logvar)  # [B, Dz]
    kl = jnp.sum(kl_dim, axis=-1)  # [B]
    sums = {
        "num_examples": jnp.sum(ew),
        "num_tokens": jnp.sum(ew * jnp.sum(weights, axis=-1)),
        "rec_sum": jnp.sum(ew * nll),
        "kl_sum": jnp.sum(ew * kl),
    }
    kl_term, kl_weight, kl_target = _kl_term(settings, kl_dim, kl, ew, sums["num_examples"])
    rec = _safe_div(sums["rec_sum"], sums["num_examples"])
    kl_mean = _safe_div(sums["kl_sum"], sums["num_examples"])
    loss = rec + kl_term
    aux = {
        "loss": loss,
        "rec": rec,
        "kl": kl_mean,
        "neg_elbo": rec + kl_mean,
        "kl_term": kl_term,
        "kl_weight": kl_weight,
        "kl_target": kl_target,
        **sums,
        "nll_per_token": _safe_div(sums["rec_sum"], sums["num_tokens"]),
    }
    return loss, aux


def _isolate_filler_rows(
    weights: Array, mean: Array, logvar: Array, example_weight: Optional[Array]
) -> Tuple[Array, Array, Array, Array]:
    """(example weights [B], token weights, mean, logvar) in float32 with the filler rows' inputs zeroed.

    Zeroing the inputs themselves (not only their contributions) keeps NaN / inf of filler rows out of the
    values and the gradients.
    """
    batch = weights.shape[0]
    ew = jnp.ones((batch,), jnp.float32) if example_weight is None else jnp.asarray(example_weight, jnp.float32)
    row = (ew > 0)[:, None]
    return (
        ew,
        jnp.where(row, jnp.asarray(weights, jnp.float32), 0.0),
        jnp.where(row, jnp.asarray(mean, jnp.float32), 0.0),
        jnp.where(row, jnp.asarray(logvar, jnp.float32), 0.0),
    )


def _kl_term(
    settings: _KLSettings, kl_dim: Array, kl: Array, ew: Array, num_examples: Array
) -> Tuple[Array, Array, Array]:
    """(KL part of the loss, the multiplier applied, the target C) for ``settings``; see :func:`vae_loss`."""
    weight = jnp.asarray(settings.weight, jnp.float32)
    if settings.kind == "elbo":
        return weight * _safe_div(jnp.sum(ew * kl), num_examples), weight, jnp.zeros((), jnp.float32)
    if settings.kind == "free_bits":
        fb = free_bits(kl_dim, settings.threshold, settings.free_bits_mode, example_weight=ew)
        return weight * _safe_div(jnp.sum(ew * fb), num_examples), weight, jnp.zeros((), jnp.float32)
    beta = jnp.asarray(settings.beta, jnp.float32)
    return kl_constraint(kl, settings.target, beta, example_weight=ew), beta, jnp.asarray(settings.target, jnp.float32)
