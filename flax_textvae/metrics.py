"""Model-agnostic estimators for held-out text-VAE metrics (docs/metrics.md).

Everything here works on arrays that a model produced: per-example reconstruction log-likelihoods,
posterior parameters and latent samples. Nothing here knows about BART/T5 or tokenizers.

* Importance-weighted log-marginal (``nll``): ``log p(x) ~= logsumexp_k(log w_k) - log K`` with
  ``log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)``, ``z_k ~ q(z|x)``. :func:`iw_log_marginal`
  does it in one shot; :func:`iw_init` / :func:`iw_update` / :func:`iw_result` do the same with a running
  log-sum-exp so ``K = 500`` samples can be drawn ``k`` at a time (exact, not an approximation: the
  partial log-sum-exps are combined with ``logaddexp``; results agree with the one-shot value to float
  rounding).
* Mutual information over a WHOLE split (:func:`mutual_information`), with the aggregate posterior
  built from all ``N`` posteriors, computed in blocks of the ``N x N`` log-density matrix (the reference
  code did this per batch of 256, which caps the estimate near ``log 256``; docs/method.md, defect 5).
* Active units (:func:`active_units`, :class:`ActiveUnitsAccumulator`), perplexity and the final
  summary dict (:func:`summarize`).

All log quantities are in nats (natural log).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

LOG_2PI = math.log(2.0 * math.pi)

SUMMARY_KEYS = (
    "rec",
    "kl",
    "neg_elbo",
    "nll",
    "ppl",
    "ppl_elbo",
    "mi",
    "au",
    "bleu",
    "num_examples",
    "num_tokens",
    "iw_samples",
)


# --------------------------------------------------------------------------------------------------
# Gaussian log-densities
# --------------------------------------------------------------------------------------------------


def log_normal_diag(z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Log density of a diagonal Gaussian, summed over the last axis.

    Args:
      z: points ``[..., D]``.
      mean: means, broadcastable to ``z``.
      logvar: log-variances, broadcastable to ``z``.

    Returns:
      ``[...]`` ``log N(z; mean, diag(exp(logvar)))``.
    """
    z = jnp.asarray(z)
    sq = jnp.square(z - mean) * jnp.exp(-logvar)
    return -0.5 * jnp.sum(LOG_2PI + logvar + sq, axis=-1)


def log_standard_normal(z: jax.Array) -> jax.Array:
    """Log density of ``N(0, I)``: ``z [..., D] -> [...]``."""
    z = jnp.asarray(z)
    return -0.5 * jnp.sum(LOG_2PI + jnp.square(z), axis=-1)


def sample_diag_gaussian(rng: jax.Array, mean: jax.Array, logvar: jax.Array, num_samples: int) -> jax.Array:
    """Draws ``num_samples`` reparameterised samples per row.

    Args:
      rng: a PRNG key.
      mean: ``[B, D]``.
      logvar: ``[B, D]``.
      num_samples: ``K``.

    Returns:
      ``[B, K, D]`` samples ``mean + exp(logvar / 2) * eps``.
    """
    eps = jax.random.normal(rng, (mean.shape[0], num_samples, mean.shape[-1]), dtype=mean.dtype)
    return mean[:, None, :] + jnp.exp(0.5 * logvar)[:, None, :] * eps


# --------------------------------------------------------------------------------------------------
# Importance-weighted log-likelihood
# --------------------------------------------------------------------------------------------------


def iw_log_weights(log_px_given_z: jax.Array, z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Log importance weights ``log p(x|z_k) + log p(z_k) - log q(z_k|x)``.

    Args:
      log_px_given_z: ``[B, K]`` decoder log-likelihood of each example under each sample
        (i.e. minus the summed token NLL).
      z: ``[B, K, D]`` samples from ``q(z|x)``.
      mean: ``[B, D]`` posterior means.
      logvar: ``[B, D]`` posterior log-variances.

    Returns:
      ``[B, K]`` log weights.
    """
    log_pz = log_standard_normal(z)
    log_qz = log_normal_diag(z, mean[:, None, :], logvar[:, None, :])
    return log_px_given_z + log_pz - log_qz


def iw_log_marginal(log_px_given_z: jax.Array, z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Importance-weighted estimate of ``log p(x)`` from ``K`` samples (all at once).

    Args:
      log_px_given_z: ``[B, K]``.
      z: ``[B, K, D]`` samples from ``q(z|x)``.
      mean: ``[B, D]``.
      logvar: ``[B, D]``.

    Returns:
      ``[B]`` ``logsumexp_k(log w_k) - log K``; ``nll = -`` this.
    """
    log_w = iw_log_weights(log_px_given_z, z, mean, logvar)
    return jax.nn.logsumexp(log_w, axis=-1) - jnp.log(float(log_w.shape[-1]))


class IWState(NamedTuple):
    """Running state of a chunked importance-weighted estimate (a pytree; jit-able).

    Attributes:
      lse: ``[B]`` log-sum-exp of all log weights seen so far (``-inf`` before the first chunk).
      count: scalar int32, number of samples per example seen so far.
    """

    lse: jax.Array
    count: jax.Array


def iw_init(batch_size: int, dtype=jnp.float32) -> IWState:
    """Empty running state for ``batch_size`` examples."""
    return IWState(lse=jnp.full((batch_size,), -jnp.inf, dtype=dtype), count=jnp.zeros((), jnp.int32))


def iw_update(state: IWState, log_px_given_z: jax.Array, z: jax.Array, mean: jax.Array, logvar: jax.Array) -> IWState:
    """Adds a chunk of ``k`` samples per example to the running estimate.

    Args:
      state: running :class:`IWState`.
      log_px_given_z: ``[B, k]`` for this chunk.
      z: ``[B, k, D]`` this chunk's samples from ``q(z|x)``.
      mean: ``[B, D]``.
      logvar: ``[B, D]``.

    Returns:
      The updated state: ``lse <- logaddexp(lse, logsumexp_k log w_k)``, ``count += k``.
    """
    log_w = iw_log_weights(log_px_given_z, z, mean, logvar)
    chunk_lse = jax.nn.logsumexp(log_w, axis=-1).astype(state.lse.dtype)
    return IWState(lse=jnp.logaddexp(state.lse, chunk_lse), count=state.count + jnp.asarray(log_w.shape[-1], jnp.int32))


def iw_result(state: IWState) -> jax.Array:
    """``[B]`` estimate of ``log p(x)``: ``lse - log(count)``."""
    return state.lse - jnp.log(state.count.astype(state.lse.dtype))


# --------------------------------------------------------------------------------------------------
# Mutual information over a whole split
# --------------------------------------------------------------------------------------------------


def _blocks(a: np.ndarray, block: int, fill: float) -> np.ndarray:
    """Pads axis 0 of ``a [N, ...]`` to a multiple of ``block`` and reshapes to ``[nb, block, ...]``."""
    n = a.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        a = np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)], axis=0)
    return a.reshape((nb, block) + a.shape[1:])


@jax.jit
def _log_qagg_sum_rows(
    z_rows: jax.Array, mean_blocks: jax.Array, logvar_blocks: jax.Array, valid_blocks: jax.Array
) -> jax.Array:
    """``logsumexp_n log q(z_i | x_n)`` over all valid columns, for a block of rows.

    Args:
      z_rows: ``[R, D]`` one block of samples.
      mean_blocks: ``[nb, C, D]`` all posterior means, in column blocks.
      logvar_blocks: ``[nb, C, D]``.
      valid_blocks: ``[nb, C]`` bool, False on padding columns.

    Returns:
      ``[R]``; memory is ``O(R * C * D)`` whatever ``N`` is.
    """

    def body(carry, blk):
        m, lv, valid = blk
        lq = log_normal_diag(z_rows[:, None, :], m[None, :, :], lv[None, :, :])  # [R, C]
        lq = jnp.where(valid[None, :], lq, -jnp.inf)
        return jnp.logaddexp(carry, jax.nn.logsumexp(lq, axis=1)), None

    init = jnp.full((z_rows.shape[0],), -jnp.inf, z_rows.dtype)
    out, _ = jax.lax.scan(body, init, (mean_blocks, logvar_blocks, valid_blocks))
    return out


def mutual_information(
    means: np.ndarray, logvars: np.ndarray, z: np.ndarray, *, chunk: int = 256, column_chunk: int = 1024
) -> float:
    """``I(x; z)`` under ``q`` over a whole split (``mi`` in docs/metrics.md).

    ``mi = mean_i [log q(z_i|x_i) - log q_agg(z_i)]`` with
    ``log q_agg(z) = logsumexp_n log q(z|x_n) - log N`` and one sample ``z_i ~ q(z|x_i)`` per example.
    The ``N x N`` matrix of ``log q(z_i|x_n)`` is never materialised: rows are processed ``chunk`` at a
    time and, inside one jitted call, columns ``column_chunk`` at a time with a running log-sum-exp.
    ``chunk`` only changes how rows are grouped; per-row values and the float64 final mean do not depend
    on it. The estimate is bounded above by ``log N``.

    Args:
      means: ``[N, D]`` posterior means of every example in the split (no filler rows).
      logvars: ``[N, D]`` posterior log-variances.
      z: ``[N, D]`` one posterior sample per example.
      chunk: rows per jitted call.
      column_chunk: columns per scan step (sets peak memory ``chunk * column_chunk * D`` floats).

    Returns:
      The estimate in nats, a python float.
    """
    means = np.asarray(means, np.float32)
    logvars = np.asarray(logvars, np.float32)
    z = np.asarray(z, np.float32)
    if not (means.shape == logvars.shape == z.shape and means.ndim == 2):
        raise ValueError(f"means/logvars/z must all be [N, D]; got {means.shape}, {logvars.shape}, {z.shape}")
    n = means.shape[0]
    if n == 0:
        raise ValueError("mutual_information needs at least one example")
    column_chunk = max(1, min(column_chunk, n))
    chunk = max(1, min(chunk, n))
    mean_blocks = jnp.asarray(_blocks(means, column_chunk, 0.0))
    logvar_blocks = jnp.asarray(_blocks(logvars, column_chunk, 0.0))
    valid_blocks = jnp.asarray(_blocks(np.ones((n,), bool), column_chunk, False))
    z_row_blocks = _blocks(z, chunk, 0.0)

    lse = np.empty((z_row_blocks.shape[0] * chunk,), np.float64)
    for i, z_rows in enumerate(z_row_blocks):
        lse[i * chunk : (i + 1) * chunk] = np.asarray(
            _log_qagg_sum_rows(jnp.asarray(z_rows), mean_blocks, logvar_blocks, valid_blocks)
        )
    lse = lse[:n]
    log_q_own = np.asarray(_log_q_own(jnp.asarray(z), jnp.asarray(means), jnp.asarray(logvars)), np.float64)
    log_q_agg = lse - math.log(n)
    return float(np.mean(log_q_own - log_q_agg))


@jax.jit
def _log_q_own(z: jax.Array, means: jax.Array, logvars: jax.Array) -> jax.Array:
    """``[N]`` ``log q(z_i | x_i)``."""
    return log_normal_diag(z, means, logvars)


# --------------------------------------------------------------------------------------------------
# Active units
# --------------------------------------------------------------------------------------------------


def posterior_mean_variance(means: np.ndarray) -> np.ndarray:
    """``[D]`` population variance (``ddof=0``) across examples of ``E_q[z_d]``, in float64.

    Args:
      means: ``[N, D]`` posterior means.
    """
    return np.var(np.asarray(means, np.float64), axis=0, ddof=0)


def active_units(means: np.ndarray, threshold: float = 0.01) -> int:
    """Number of latent dims with ``Var_x(E_q[z_d|x]) > threshold`` (population variance, ddof=0).

    Args:
      means: ``[N, D]`` posterior means over the whole split.
      threshold: 0.01 in docs/metrics.md (Burda et al. 2016).

    Returns:
      A python int in ``[0, D]``.
    """
    return int(np.sum(posterior_mean_variance(means) > threshold))


class ActiveUnitsAccumulator:
    """Streaming active units: float64 running count, sum and sum of squares per dim.

    Example::

        acc = ActiveUnitsAccumulator()
        for batch in split:
            acc.update(mean, mask=batch['example_weight'] > 0)
        au = acc.count(0.01)
    """

    def __init__(self) -> None:
        self.n = 0
        self.total: Optional[np.ndarray] = None
        self.total_sq: Optional[np.ndarray] = None

    def update(self, means: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """Adds ``means [B, D]``; rows where ``mask [B]`` is False (filler rows) are ignored."""
        m = np.asarray(means, np.float64)
        if mask is not None:
            m = m[np.asarray(mask, bool)]
        if self.total is None:
            self.total = np.zeros((m.shape[-1],), np.float64)
            self.total_sq = np.zeros((m.shape[-1],), np.float64)
        self.n += m.shape[0]
        self.total += m.sum(axis=0)
        self.total_sq += np.square(m).sum(axis=0)

    def variance(self) -> np.ndarray:
        """``[D]`` population variance of the posterior means seen so far."""
        if not self.n:
            raise ValueError("ActiveUnitsAccumulator.variance: no examples seen")
        mu = self.total / self.n
        return np.maximum(self.total_sq / self.n - np.square(mu), 0.0)

    def count(self, threshold: float = 0.01) -> int:
        """Number of dims whose variance exceeds ``threshold``."""
        return int(np.sum(self.variance() > threshold))


# --------------------------------------------------------------------------------------------------
# Perplexity and the summary dict
# --------------------------------------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: float) -> float:
    """``exp(total_nll / total_tokens)`` (``inf`` on overflow).

    Args:
      total_nll: sum over examples of a per-example NLL (nats) — IW ``nll`` or ``neg_elbo``.
      total_tokens: sum over examples of ``T(x)`` (target tokens incl. EOS, no padding).
    """
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs a positive token count, got {total_tokens}")
    try:
        return math.exp(float(total_nll) / float(total_tokens))
    except OverflowError:
        return math.inf


def summarize(
    rec: np.ndarray,
    kl: np.ndarray,
    nll: Optional[np.ndarray],
    num_tokens: np.ndarray,
    *,
    mi: Optional[float],
    au: Optional[int],
    bleu: Optional[float],
    iw_samples: int,
) -> dict:
    """Assembles the docs/metrics.md dict from per-example arrays accumulated over a split.

    Args:
      rec: ``[N]`` per-example ``-log p(x|z)``, ``z ~ q(z|x)`` (summed over tokens).
      kl: ``[N]`` per-example closed-form ``KL(q(z|x) || p(z))`` (summed over latent dims).
      nll: ``[N]`` per-example IW estimate of ``-log p(x)``; None when IW was skipped
        (then ``nll`` and ``ppl`` are None and ``iw_samples`` should be 0).
      num_tokens: ``[N]`` ``T(x)`` per example.
      mi: mutual information (nats) over the split, or None.
      au: active units, or None.
      bleu: corpus BLEU, or None.
      iw_samples: ``K`` used for ``nll``.

    Returns:
      Dict with exactly the keys :data:`SUMMARY_KEYS`; values are python floats/ints
      (None only for the optional inputs given as None).
    """
    rec = np.asarray(rec, np.float64).reshape(-1)
    kl = np.asarray(kl, np.float64).reshape(-1)
    tokens = np.asarray(num_tokens, np.float64).reshape(-1)
    n = rec.shape[0]
    if n == 0 or kl.shape[0] != n or tokens.shape[0] != n:
        raise ValueError(
            f"summarize: need equal non-empty lengths, got rec {rec.shape}, kl {kl.shape}, num_tokens {tokens.shape}"
        )
    total_tokens = float(tokens.sum())
    neg_elbo = rec + kl
    nll_mean, ppl = _iw_nll_and_ppl(nll, n, total_tokens)
    return {
        "rec": float(rec.mean()),
        "kl": float(kl.mean()),
        "neg_elbo": float(neg_elbo.mean()),
        "nll": nll_mean,
        "ppl": ppl,
        "ppl_elbo": perplexity(float(neg_elbo.sum()), total_tokens),
        "mi": None if mi is None else float(mi),
        "au": None if au is None else int(au),
        "bleu": None if bleu is None else float(bleu),
        "num_examples": int(n),
        "num_tokens": int(round(total_tokens)),
        "iw_samples": int(iw_samples),
    }


def _iw_nll_and_ppl(nll: Optional[np.ndarray], n: int, total_tokens: float) -> tuple[Optional[float], Optional[float]]:
    """``(mean, perplexity)`` of the per-example IW estimates ``nll`` of :func:`summarize` (``(None, None)`` without).

    Raises:
      ValueError: if ``nll`` does not hold ``n`` examples.
    """
    if nll is None:
        return None, None
    nll = np.asarray(nll, np.float64).reshape(-1)
    if nll.shape[0] != n:
        raise ValueError(f"summarize: nll has {nll.shape[0]} examples, expected {n}")
    return float(nll.mean()), perplexity(float(nll.sum()), total_tokens)


__all__ = [
    "SUMMARY_KEYS",
    "log_normal_diag",
    "log_standard_normal",
    "sample_diag_gaussian",
    "iw_log_weights",
    "iw_log_marginal",
    "IWState",
    "iw_init",
    "iw_update",
    "iw_result",
    "mutual_information",
    "posterior_mean_variance",
    "active_units",
    "ActiveUnitsAccumulator",
    "perplexity",
    "summarize",
]
