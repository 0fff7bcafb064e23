"""The text-infilling objective of ``flax_textvae.pretrain``: the corruption, the training step, the evaluator.

``DenoisingConfig`` holds the static settings of BART's text infilling (``denoise.infill_example``),
:func:`pretrain_step` is one pure optimizer step of the teacher-forced reconstruction loss over the corrupted
batch, and :func:`make_evaluator` scores a held-out split with a corruption that depends only on the seed
and each example's index.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_textvae import denoise, losses
from flax_textvae.step import TrainState, apply_if_finite, per_example_keys

__all__ = ["DenoisingConfig", "pretrain_step", "make_evaluator"]

_EVAL_STREAM = 7  # folded into the seed for the eval corruption, apart from the training streams


@dataclasses.dataclass(frozen=True)
class DenoisingConfig:
    """Static (hashable) settings of the corruption.

    Attributes:
      rate: fraction of maskable tokens masked.
      poisson_lambda: mean span length.
      special_ids: ids never masked (BOS, EOS, PAD, mask, decoder start).
      mask_id: the ``<mask>`` id.
      pad_id: the padding id.
    """

    rate: float
    poisson_lambda: float
    special_ids: tuple
    mask_id: int
    pad_id: int

    def corrupt(self, keys: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Text infilling of each row ``b`` of ``ids`` / ``mask`` [B, S] with its own key ``keys[b]``."""
        return jax.vmap(
            lambda k, i, m: denoise.infill_example(
                k, i, m, self.rate, self.poisson_lambda, self.special_ids, self.mask_id, self.pad_id
            )
        )(keys, ids, mask)


def _denoising_sums(params, batch: dict, enc_ids, enc_mask, *, module, deterministic: bool, dropout_rng=None):
    """(summed target NLL, target tokens, correctly predicted target tokens) of one batch."""
    rngs = None if deterministic else {"dropout": dropout_rng}
    logits = module.apply(
        {"params": params}, enc_ids, enc_mask, batch["decoder_input_ids"], deterministic=deterministic, rngs=rngs
    )
    weights = batch["label_weights"]
    nll = jnp.sum(losses.token_nll(logits, batch["labels"], weights))
    correct = jnp.sum(jnp.where(jnp.argmax(logits, axis=-1) == batch["labels"], weights, 0.0))
    return nll, jnp.sum(weights), correct


def _step_inputs(
    state: TrainState, batch: dict, cfg: DenoisingConfig, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(corrupted encoder ids, their mask, this device's dropout key) of one training step."""
    b = batch["labels"].shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    rows = offset + jnp.arange(b)
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    noise_rng, dropout_rng = jax.random.split(step_rng)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    enc_ids, enc_mask = cfg.corrupt(per_example_keys(noise_rng, rows), batch["input_ids"], batch["attention_mask"])
    return enc_ids, enc_mask, dropout_rng


def pretrain_step(
    state: TrainState,
    batch: dict,
    *,
    module,
    tx: optax.GradientTransformation,
    cfg: DenoisingConfig,
    lr_fn: Callable,
    axis_name: str | None = None,
):
    """One optimizer step of the denoising objective (pure; jit over a mesh, or pmap with ``axis_name``).

    Each example is corrupted with a key folded from the step's key and its global row, so the corruption
    does not depend on the device count. The loss is the mean cross-entropy per target token of the batch
    (under pmap: the mean of the per-device means). A non-finite loss or gradient leaves the state unchanged
    and sets ``metrics['nonfinite']``.

    Args:
      state: the current ``step.TrainState`` (its ``params`` are the backbone's).
      batch: a training batch of ``flax_textvae.data`` (``input_ids``, ``attention_mask``, ``labels``,
        ``label_weights``, ``decoder_input_ids``).
      module, tx, cfg, lr_fn: static: the seq2seq module, the optimizer, the corruption and the schedule.
      axis_name: the pmap axis (None under jit).

    Returns:
      ``(new_state, metrics)`` with scalar ``loss``, ``accuracy``, ``num_tokens``, ``input_ratio`` (corrupted
      over original encoder length), ``grad_norm``, ``param_norm``, ``learning_rate`` and ``nonfinite``.
    """
    enc_ids, enc_mask, dropout_rng = _step_inputs(state, batch, cfg, axis_name)

    def loss_fn(params):
        nll, tokens, correct = _denoising_sums(
            params, batch, enc_ids, enc_mask, module=module, deterministic=False, dropout_rng=dropout_rng
        )
        return nll / jnp.maximum(tokens, 1.0), (tokens, correct)

    (loss, (tokens, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ratio = jnp.sum(enc_mask) / jnp.maximum(jnp.sum(batch["attention_mask"]), 1)
    if axis_name is not None:
        grads, loss, ratio = jax.lax.pmean((grads, loss, ratio), axis_name)
        tokens, correct = jax.lax.psum((tokens, correct), axis_name)
    new_state, grad_norm, ok = apply_if_finite(state, grads, loss, tx)
    metrics = {
        "loss": loss,
        "accuracy": correct / jnp.maximum(tokens, 1.0),
        "num_tokens": tokens,
        "input_ratio": ratio.astype(jnp.float32),
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(state.params),
        "learning_rate": jnp.asarray(lr_fn(state.step), jnp.float32),
        "nonfinite": (~ok).astype(jnp.int32),
    }
    return new_state, metrics


def make_evaluator(module, cfg: DenoisingConfig, seed: int) -> Callable[[Any, Callable[[], Iterator[dict]]], dict]:
    """``evaluate(params, batches_fn) -> metrics``: the held-out denoising loss over a split.

    Example ``i`` of the split (its ``index`` in the eval batches) is corrupted with a key from ``seed`` and
    ``i`` only, so every evaluation of a run scores the same corrupted inputs, whatever the batch layout.

    Args:
      module: the seq2seq module (its ``apply`` takes the backbone's params).
      cfg: the corruption.
      seed: the run's seed; the eval corruption draws from its own stream of it.

    Returns:
      A function giving ``{'loss': nats per target token, 'ppl': exp(loss), 'accuracy': teacher-forced
      next-token accuracy, 'num_examples', 'num_tokens'}``.
    """
    base = jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM)

    @jax.jit
    def sums(params, batch):
        keys = per_example_keys(base, jnp.maximum(batch["index"], 0))
        enc_ids, enc_mask = cfg.corrupt(keys, batch["input_ids"], batch["attention_mask"])
        nll, tokens, correct = _denoising_sums(params, batch, enc_ids, enc_mask, module=module, deterministic=True)
        return jnp.stack([nll, tokens, correct, jnp.sum(batch["example_weight"])])

    def evaluate(params, batches_fn) -> dict:
        total = np.zeros(4, np.float64)
        for batch in batches_fn():
            batch = {
                k: v
                for k, v in batch.items()
                if k
                in (
                    "input_ids",
                    "attention_mask",
                    "labels",
                    "label_weights",
                    "decoder_input_ids",
                    "example_weight",
                    "index",
                )
            }
            total += np.asarray(jax.device_get(sums(params, batch)), np.float64)
        nll, tokens, correct, examples = total
        loss = float(nll / max(tokens, 1.0))
        return {
            "loss": loss,
            "ppl": float(math.exp(min(loss, 700.0))),
            "accuracy": float(correct / max(tokens, 1.0)),
            "num_examples": int(round(examples)),
            "num_tokens": int(round(tokens)),
        }

    return evaluate
