"""Train state, optimizer and the pure training step (jit over a mesh, or pmap).

``train_step(state, batch, *, static...) -> (state, metrics)`` is one pure function; the loop binds its static
parts with ``functools.partial`` and compiles it once per bucket shape. The same function body serves both
parallel modes: under ``pmap`` the gradients and metrics are averaged with ``lax.pmean`` over ``axis_name``.

Randomness: each step folds the step number into the run key; latent noise, denoising and word dropout are
then drawn per example from keys folded with the example's global row index, so the numbers an example sees
do not depend on the number of devices or on the parallel mode. Dropout inside the backbone uses its own
stream (``'dropout'``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from flax_textvae import denoise, losses, schedules
from flax_textvae.vae import TextVAE


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed as one pytree)."""

    step: jax.Array  # int32 scalar, global optimizer step over all phases
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2] run key (raw key data, checkpoint friendly)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) settings of one phase's step."""

    kind: str = "elbo"  # loss kind given to losses.vae_loss
    free_bits: float = 0.0
    free_bits_mode: str = "per_example"
    beta: float = 1.0
    phase_start: int = 0  # global step at which this phase began (schedules count from here)
    delete_rate: float = 0.0
    mask_rate: float = 0.0
    word_dropout: float = 0.0
    special_ids: tuple = ()  # never deleted / masked / dropped: BOS, EOS, PAD, mask (not <unk>)
    pad_id: int = 0
    mask_id: int = -1
    unk_id: int = -1
    grad_accum_steps: int = 1
    frozen: tuple = ()  # regexes of parameter paths that get no gradient in this phase
    # > 0: the reconstruction NLL applies the LM head this many vocabulary entries at a time
    # (losses.chunked_token_nll), never holding the [B, T, V] float32 logits; 0: full logits.
    vocab_chunk_size: int = 0


# ----------------------------------------------------------------------------------------- optimizer


def param_labels(params, frozen: Sequence[str]):
    """'frozen' for parameters whose 'a/b/c' path matches any regex in ``frozen``, else 'train'."""
    pats = [re.compile(p) for p in frozen]

    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return "frozen" if any(p.search(name) for p in pats) else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_fn(opt_cfg, phase_steps: int) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then linear / cosine decay to 0 at the end of the phase, or hold."""
    peak = opt_cfg.learning_rate
    warm = min(opt_cfg.warmup_steps, max(phase_steps - 1, 0))
    rest = max(phase_steps - warm, 1)
    decays = {
        "linear": lambda: optax.linear_schedule(peak, 0.0, rest),
        "cosine": lambda: optax.cosine_decay_schedule(peak, rest),
        "constant": lambda: optax.constant_schedule(peak),
    }
    if opt_cfg.decay not in decays:
        raise ValueError(f"optimizer.decay={opt_cfg.decay!r}; choose one of {sorted(decays)}")
    if warm == 0:
        return decays[opt_cfg.decay]()
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decays[opt_cfg.decay]()], [warm])


def make_optimizer(opt_cfg, phase_steps: int, params, frozen: Sequence[str] = ()):
    """AdamW (+ global-norm clipping, weight decay on matrices only); frozen parameters get zero updates."""
    lr = learning_rate_fn(opt_cfg, phase_steps)
    decay_mask = jax.tree.map(lambda p: p.ndim > 1, params)
    parts = [optax.clip_by_global_norm(opt_cfg.grad_clip)] if opt_cfg.grad_clip > 0 else []
    parts.append(optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if frozen:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, param_labels(params, frozen))
    return tx, lr


# -------------------------------------------------------------------------------------------- step


def per_example_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)


def noisy_inputs(batch: dict, keys: jax.Array, cfg: StepConfig):
    """Encoder-input deletion / masking and decoder word dropout, each example with its own key."""
    ids, mask, dec_in = batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
    k_del, k_mask, k_wd = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in (1, 2, 3))
    one = lambda f: jax.vmap(lambda k, *xs: jax.tree.map(lambda y: y[0], f(k, *(x[None] for x in xs))))
    if cfg.delete_rate > 0:
        ids, mask = one(lambda k, i, m: denoise.delete_tokens(k, i, m, cfg.delete_rate, cfg.special_ids, cfg.pad_id))(
            k_del, ids, mask
        )
    if cfg.mask_rate > 0:
        ids = one(lambda k, i, m: denoise.mask_tokens(k, i, m, cfg.mask_rate, cfg.special_ids, cfg.mask_id))(
            k_mask, ids, mask
        )
    if cfg.word_dropout > 0:
        dec_in = one(lambda k, d: denoise.word_dropout(k, d, cfg.word_dropout, cfg.unk_id, cfg.special_ids))(
            k_wd, dec_in
        )
    return ids, mask, dec_in


def loss_and_metrics(
    params,
    batch: dict,
    example_rng: jax.Array,
    dropout_rng: jax.Array,
    rows: jax.Array,
    *,
    model: TextVAE,
    cfg: StepConfig,
    kl_weight,
    kl_target,
):
    """The training objective on one (micro-)batch; differentiable in ``params``.

    ``example_rng`` is folded with each example's global row (latent noise, denoising); ``dropout_rng`` is
    the backbone's dropout stream for this device and micro-batch. Frozen parameters are wrapped in
    ``stop_gradient`` so XLA does not even compute their weight gradients.
    """
    if cfg.frozen:
        labels = param_labels(params, cfg.frozen)
        params = jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params, labels)
    keys = per_example_keys(example_rng, rows)
    ids, mask, dec_in = noisy_inputs(batch, keys, cfg)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (model.latent_size,)))(keys)
    chunked = cfg.vocab_chunk_size > 0
    out = model.apply(
        {"params": params},
        ids,
        mask,
        dec_in,
        batch.get("decoder_attention_mask"),
        eps=eps,
        deterministic=False,
        rngs={"dropout": dropout_rng},
        hidden=chunked,
    )
    nll_fn = (
        chunked_nll_fn(params, out["hidden"], batch["labels"], model, cfg.vocab_chunk_size)
        if chunked
        else lambda w: losses.token_nll(out["logits"], batch["labels"], w)
    )
    loss, aux = losses.vae_loss_from_nll(
        nll_fn,
        batch["label_weights"],
        out["mean"],
        out["logvar"],
        kind=cfg.kind,
        weight=kl_weight,
        threshold=cfg.free_bits,
        free_bits_mode=cfg.free_bits_mode,
        target=kl_target,
        beta=cfg.beta,
        example_weight=batch.get("example_weight"),
    )
    return loss, aux


def chunked_nll_fn(params, hidden: jax.Array, labels: jax.Array, model: TextVAE, chunk_size: int) -> Callable:
    """``token_weights -> [B]`` summed NLL of ``labels`` through the backbone's LM head, by vocabulary chunks.

    Args:
      params: the VAE parameters (the head is read from ``params['backbone']``).
      hidden: ``[B, T, D]`` decoder hidden states (``TextVAE.decode(..., hidden=True)``).
      labels: ``[B, T]`` target ids.
      model: the ``TextVAE``.
      chunk_size: vocabulary entries per chunk (``losses.chunked_token_nll``); never the ``[B, T, V]`` logits.
    """
    head = model.backbone.apply({"params": params["backbone"]}, method="lm_head_weights")
    return lambda w: losses.chunked_token_nll(
        hidden, head.head, labels, w, bias=head.bias, scale=head.scale, head_layout=head.layout, chunk_size=chunk_size
    )


# Auxiliary outputs of losses.vae_loss that are sums over the batch (added over micro-batches); the others
# are means (averaged over micro-batches).
SUMMED_AUX = ("rec_sum", "kl_sum", "num_tokens", "num_examples")


def accumulate_gradients(
    grad_fn: Callable,
    params,
    batch: dict,
    example_rng: jax.Array,
    dropout_rng: jax.Array,
    rows: jax.Array,
    *,
    steps: int,
    **kw,
):
    """Gradient accumulation: ``grad_fn`` over ``steps`` micro-batches in a ``lax.scan``.

    Args:
      grad_fn: ``value_and_grad(loss_and_metrics, has_aux=True)``.
      params: the parameters.
      batch: ``[B, ...]`` arrays, split row-wise into ``steps`` micro-batches of ``B / steps`` rows (row ``i``
        goes to micro-batch ``i % steps``).
      example_rng, dropout_rng: the step's keys; micro-batch ``j`` draws dropout from ``fold_in(dropout_rng,
        j)``, while per-example draws stay keyed by each example's global row, as without accumulation.
      rows: ``[B]`` global row index of each example.
      steps: number of micro-batches.
      **kw: the keyword arguments of ``grad_fn``.

    Returns:
      ``(loss, aux, grads)``: loss and gradients averaged over the micro-batches; ``aux`` entries in
      ``SUMMED_AUX`` summed, the others averaged.
    """
    b = rows.shape[0]
    if b % steps:
        raise ValueError(f"per-device batch {b} is not divisible by grad_accum_steps={steps}")
    split = lambda x: jnp.moveaxis(x.reshape((b // steps, steps) + x.shape[1:]), 1, 0)
    micro = jax.tree.map(split, (batch, rows)) + (jnp.arange(steps),)

    def body(carry, mb):
        (loss, aux), grads = grad_fn(params, mb[0], example_rng, jax.random.fold_in(dropout_rng, mb[2]), mb[1], **kw)
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (loss0, aux0), grads0 = jax.eval_shape(lambda: grad_fn(params, first[0], example_rng, dropout_rng, first[1], **kw))
    zeros = jax.tree.map(jnp.zeros_like, (loss0, aux0, grads0))
    (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
    aux = {k: (v if k in SUMMED_AUX else v / steps) for k, v in aux.items()}
    return loss / steps, aux, jax.tree.map(lambda g: g / steps, grads)


def apply_if_finite(state: TrainState, grads, loss: jax.Array, tx: optax.GradientTransformation):
    """One optimizer update of ``state`` by ``grads``, kept only when ``loss`` and the gradient norm are finite.

    Returns:
      ``(new_state, grad_norm, ok)``: the state one step on (its parameters and optimizer state unchanged
      where ``ok`` is False), the global gradient norm, and whether the update was applied.
    """
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state)
    )
    return new_state, grad_norm, ok


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: TextVAE,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    kl_weight_fn: Callable,
    kl_target_fn: Callable,
    lr_fn: Callable,
    axis_name: str | None = None,
):
    """One optimizer step.

    Args:
      state: the current TrainState.
      batch: dict of ``[B, ...]`` arrays (see ``flax_textvae.data``); under pmap the per-device slice.
      model, tx, cfg, kl_weight_fn, kl_target_fn, lr_fn: static, bound with ``functools.partial``.
      axis_name: the pmap axis name (None under jit).

    Returns:
      ``(new_state, metrics)``; metrics are scalars averaged over the global batch. A non-finite loss or
      gradient leaves the state unchanged and sets ``metrics['nonfinite'] = 1``.
    """
    b = batch["labels"].shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    rows = offset + jnp.arange(b)
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    example_rng, dropout_rng = jax.random.split(step_rng)  # two streams that never collide
    if axis_name is not None:  # each device draws its own dropout masks
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    phase_step = state.step - cfg.phase_start
    kl_weight, kl_target = kl_weight_fn(phase_step), kl_target_fn(phase_step)
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    kw = dict(model=model, cfg=cfg, kl_weight=kl_weight, kl_target=kl_target)

    args = (batch, example_rng, dropout_rng, rows)
    if cfg.grad_accum_steps == 1:
        (loss, aux), grads = grad_fn(state.params, *args, **kw)
    else:
        loss, aux, grads = accumulate_gradients(grad_fn, state.params, *args, steps=cfg.grad_accum_steps, **kw)
    if axis_name is not None:
        grads, loss, aux = jax.lax.pmean((grads, loss, aux), axis_name)

    # The norm of what the optimizer sees (frozen gradients are zero by stop_gradient anyway).
    new_state, grad_norm, ok = apply_if_finite(state, grads, loss, tx)
    param_norm = optax.global_norm(state.params)
    return new_state, _step_metrics(loss, aux, grad_norm, param_norm, lr_fn(phase_step), ok, axis_name)


def _step_metrics(
    loss: jax.Array,
    aux: dict,
    grad_norm: jax.Array,
    param_norm: jax.Array,
    learning_rate: jax.Array,
    ok: jax.Array,
    axis_name: str | None,
) -> dict:
    """The metrics ``train_step`` returns, from the (device-averaged) loss and ``aux`` of ``loss_and_metrics``."""
    metrics = {
        "loss": loss,
        "rec": aux["rec"],
        "kl": aux["kl"],
        "kl_term": aux["kl_term"],
        # What multiplies the KL term (the schedule's weight; beta for the constraint) and the target C.
        "kl_weight": jnp.asarray(aux["kl_weight"], jnp.float32),
        "kl_target": jnp.asarray(aux["kl_target"], jnp.float32),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "learning_rate": jnp.asarray(learning_rate, jnp.float32),
        "num_tokens": aux["num_tokens"],
        "nonfinite": (~ok).astype(jnp.int32),
    }
    if axis_name is not None:
        metrics["num_tokens"] = aux["num_tokens"] * jax.lax.psum(1, axis_name)  # pmean -> global sum
    return metrics


def kl_weight_schedule(sched_cfg):
    """The phase-2 KL weight schedule from ``config.loss.kl_schedule`` (fields documented there)."""
    c = sched_cfg
    builders = {
        "constant": lambda: schedules.constant(c.value),
        "linear": lambda: schedules.linear(c.start, c.value, c.steps),
        "cyclical": lambda: schedules.cyclical(c.value, c.steps, ratio_increase=c.ratio_increase, min_value=c.start),
        "sigmoid": lambda: schedules.sigmoid(c.value, midpoint=c.steps, steepness=c.steepness),
    }
    if c.kind not in builders:
        raise ValueError(f"loss.kl_schedule.kind={c.kind!r}; choose one of {sorted(builders)}")
    return builders[c.kind]()


def kl_fns(loss_cfg, phase: int):
    """(weight_fn, target_fn) for a phase: phase 1 is KL-free; phase 2 follows the config."""
    zero = schedules.constant(0.0)
    if phase == 1:
        return zero, zero
    if loss_cfg.kind != "constraint":
        return kl_weight_schedule(loss_cfg.kl_schedule), zero
    if loss_cfg.target_ramp_steps > 0:
        return zero, schedules.capacity(loss_cfg.target, loss_cfg.target_ramp_steps)
    return zero, schedules.constant(loss_cfg.target)
