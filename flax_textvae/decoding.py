"""Batched, jitted decoding from latent codes z with the decoder's key/value cache.

Array-level API (``flax_textvae.generate`` builds the text-level ``TrainedTextVAE`` on top of it):

  * ``init_vae_cache(vae, batch_size, max_length)`` -> the ``'cache'`` collection for
    ``vae.apply({'params': p, 'cache': c}, z, tok[B,1], decode=True, mutable=['cache'], method=TextVAE.decode)``;
    the backbone's cache lives under ``'backbone'`` (``{'backbone': models.init_cache(vae.backbone, B, L)}``).
  * ``decode_from_z(vae, params, z, *, prompt, eos_id, pad_id, max_length, method='greedy', ...)`` -> token ids
    ``[B, max_length]``: greedy, sampling (temperature / top-k / nucleus) or beam search.
  * ``sequence_log_probs(vae, params, z, tokens, *, prompt, eos_id)`` -> teacher-forced ``log p(tokens|z)``.
  * ``filter_logits(logits, top_k=0, top_p=1.0)``, ``length_penalty_factor(length, alpha)``.

How one call runs: the forced decoder prefix ``prompt`` (e.g. ``(decoder_start,)`` for T5, ``(</s>, <s>)`` for
BART as our data pipeline trains it) is fed one token at a time through the cache; the logits after its last
token give the first generated token. Each ``jax.lax.while_loop`` iteration feeds one token (the first
``len(prompt) - 1`` iterations feed the prompt and ignore the logits, so the compiled program holds a single
copy of the decoder); the loop stops early once every row (every beam) has emitted EOS.
The whole call is one ``jax.jit`` per
(vae, method, prompt, eos/pad ids, max_length, top_k, nucleus on/off, beam size); ``params``, ``z``, the rng,
``temperature``, ``top_p`` and ``length_penalty`` are traced, so changing them does not recompile. Compiled
functions are kept in a small module-level cache (``clear_compiled_cache()`` empties it).

Outputs hold only the continuation after the prompt: EOS included, ``pad_id`` after it; rows that never emit
EOS are cut at ``max_length``. The cache holds ``len(prompt) - 1 + max_length`` positions, which must not exceed
the family's ``Family.max_decode_positions`` (BART: ``max_position_embeddings``; T5: no limit).

Beam search keeps ``beam_size`` hypotheses per example as ``B * beam_size`` rows (z repeated). A finished beam
stays in the beam with its score frozen and a pad continuation of cost 0, competing with the live ones.
Candidates are ranked by ``score / length_penalty_factor(length, length_penalty)`` with the GNMT penalty
``((5 + length) / 6) ** alpha`` (Wu et al. 2016), where ``length`` counts generated tokens (EOS included;
live candidates: tokens so far). ``length_penalty=0`` ranks by the raw summed log-probability. The best beam
per example (by the same normalised score) is returned.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_textvae.models import families
from flax_textvae.vae import TextVAE

METHODS = ("greedy", "sample", "beam")
_NEG = -1.0e9  # finite "minus infinity" for dead beams / impossible continuations (no inf - inf NaNs)
_MAX_COMPILED = 32
_COMPILED: "collections.OrderedDict[tuple, tuple[Any, Callable]]" = collections.OrderedDict()

__all__ = ["METHODS", "init_vae_cache", "decode_from_z", "sequence_log_probs", "filter_logits",
           "length_penalty_factor", "clear_compiled_cache", "trace_count", "compiled_count"]


# ------------------------------------------------------------------------------------------------ helpers
def init_vae_cache(vae: TextVAE, batch_size: int, max_length: int) -> Any:
    """Zero decoding cache of ``vae`` for ``batch_size`` rows and ``max_length`` decoder positions.

    Args:
      vae: the TextVAE module.
      batch_size: B (rows decoded together; ``B * beam_size`` for beam search).
      max_length: number of decoder tokens the cache can hold (prompt included).

    Returns:
      The ``'cache'`` collection (zeros, every ``cache_index`` 0), ``{'backbone': {...}}``.
    """
    z = jnp.zeros((batch_size, vae.latent_size), jnp.float32)
    ids = jnp.zeros((batch_size, max_length), jnp.int32)

    def _init():
        return vae.init(jax.random.PRNGKey(0), z, ids, decode=True, method=TextVAE.decode)

    shapes = jax.eval_shape(_init)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def length_penalty_factor(length: jax.Array, alpha: Any) -> jax.Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` (1 when alpha is 0); float32, shape of ``length``."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** jnp.asarray(alpha, jnp.float32)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: Any = 1.0, *, use_top_p: bool = True) -> jax.Array:
    """Top-k then nucleus (top-p) filtering; removed entries become a large negative number.

    Args:
      logits: ``[..., V]`` float logits (already divided by the temperature).
      top_k: keep the ``top_k`` largest (ties with the k-th kept); 0 disables. Static.
      top_p: keep the smallest set of most likely tokens whose probability mass reaches ``top_p`` (the most
        likely token is always kept); 1.0 keeps everything. May be traced. Applied after top-k, i.e. to
        the renormalised top-k distribution (as Hugging Face's warpers do).
      use_top_p: static switch; False skips the sort entirely.

    Returns:
      ``[..., V]`` float32 filtered logits.
    """
    logits = logits.astype(jnp.float32)
    neg = jnp.asarray(_NEG, jnp.float32)
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if use_top_p:
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p).at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def _unwrap(params: Any) -> Any:
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def _step(vae: TextVAE, params: Any, z: jax.Array, cache: Any, tok: jax.Array):
    """Feeds one token per row ``tok [R]``; returns (float32 logits [R, V], new cache)."""
    logits, mutated = vae.apply({"params": params, "cache": cache}, z, tok[:, None].astype(jnp.int32),
                                decode=True, mutable=["cache"], method=TextVAE.decode)
    return logits[:, -1].astype(jnp.float32), mutated["cache"]


def _forced_or(step_in_prompt: jax.Array, prompt: tuple[int, ...], rows: int, forced_rest: tuple,
               generate: Callable[[], tuple]) -> tuple:
    """Loop iterations 0..len(prompt)-2 feed the prompt: the next input is prompt[i + 1] and the rest of the
    state is unchanged (``forced_rest``); later iterations run ``generate()``. The decoder call itself is
    outside this switch, so the compiled program holds one copy of the decoder."""
    if len(prompt) == 1:
        return generate()
    prompt_arr = jnp.asarray(prompt, jnp.int32)

    def forced(_):
        nxt = jnp.full((rows,), prompt_arr[jnp.minimum(step_in_prompt + 1, len(prompt) - 1)], jnp.int32)
        return (nxt,) + forced_rest

    return jax.lax.cond(step_in_prompt < len(prompt) - 1, forced, lambda _: generate(), None)


# ------------------------------------------------------------------------------------- greedy / sampling
def _build_ancestral(vae, method, prompt, eos_id, pad_id, max_length, top_k, use_top_p):
    num_forced = len(prompt) - 1  # prompt tokens fed before the first generated token is chosen
    cache_len = num_forced + max_length

    def run(params, z, rng, temperature, top_p, length_penalty):
        del length_penalty
        batch = z.shape[0]
        cache = init_vae_cache(vae, batch, cache_len)
        tok = jnp.full((batch,), prompt[0], jnp.int32)
        out = jnp.full((batch, max_length), pad_id, jnp.int32)
        state = (jnp.zeros((), jnp.int32), cache, tok, out, jnp.zeros((batch,), bool),
                 jnp.zeros((batch,), jnp.float32))

        def cond(s):
            return jnp.logical_and(s[0] < cache_len, jnp.logical_not(jnp.all(s[4])))

        def body(s):
            i, cache, tok, out, finished, total = s
            logits, cache = _step(vae, params, z, cache, tok)
            t = i - num_forced  # index of the token chosen now (negative while feeding the prompt)

            def generate():
                logp = jax.nn.log_softmax(logits, axis=-1)
                if method == "greedy":
                    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                else:
                    filtered = filter_logits(logits / temperature, top_k, top_p, use_top_p=use_top_p)
                    key = jax.random.fold_in(rng, t)
                    nxt = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
                nxt = jnp.where(finished, pad_id, nxt)
                gained = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
                new_out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, jnp.maximum(t, 0)))
                return (nxt, new_out, jnp.logical_or(finished, nxt == eos_id),
                        total + jnp.where(finished, 0.0, gained))

            nxt, out, finished, total = _forced_or(i, prompt, batch, (out, finished, total), generate)
            return i + 1, cache, nxt, out, finished, total

        s = jax.lax.while_loop(cond, body, state)
        return s[3], s[5]

    return _jit_counting_traces(run)


# ------------------------------------------------------------------------------------------- beam search
def _build_beam(vae, prompt, eos_id, pad_id, max_length, beam_size):
    num_forced = len(prompt) - 1
    cache_len = num_forced + max_length
    width = beam_size

    def run(params, z, rng, temperature, top_p, length_penalty):
        del rng, temperature, top_p
        batch = z.shape[0]
        rows = batch * width
        z_rep = jnp.repeat(z, width, axis=0)  # row b * W + w holds example b
        cache = init_vae_cache(vae, rows, cache_len)
        tok = jnp.full((rows,), prompt[0], jnp.int32)
        seqs = jnp.full((batch, width, max_length), pad_id, jnp.int32)
        # only beam 0 is alive at the start, so the W beams do not all expand the same prefix
        scores = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, _NEG)[None], (batch, 1)).astype(jnp.float32)
        state = (jnp.zeros((), jnp.int32), cache, tok, seqs, scores, jnp.zeros((batch, width), bool),
                 jnp.zeros((batch, width), jnp.int32))

        def cond(s):
            return jnp.logical_and(s[0] < cache_len, jnp.logical_not(jnp.all(s[5])))

        def body(s):
            i, cache, tok, seqs, scores, finished, lengths = s
            logits, cache = _step(vae, params, z_rep, cache, tok)
            t = i - num_forced

            def generate():
                vocab = logits.shape[-1]
                logp = jax.nn.log_softmax(logits, axis=-1).reshape(batch, width, vocab)
                pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, _NEG).astype(jnp.float32)
                logp_ = jnp.where(finished[..., None], pad_only, logp)  # finished: pad at cost 0, score frozen
                cand = scores[..., None] + logp_  # [B, W, V]
                cand_len = jnp.where(finished, lengths, t + 1)[..., None]
                rank = cand / length_penalty_factor(cand_len, length_penalty)
                _, idx = jax.lax.top_k(rank.reshape(batch, width * vocab), width)  # [B, W]
                parent, token = idx // vocab, (idx % vocab).astype(jnp.int32)
                new_scores = jnp.take_along_axis(cand.reshape(batch, -1), idx, axis=1)
                parent_done = jnp.take_along_axis(finished, parent, axis=1)
                new_len = jnp.where(parent_done, jnp.take_along_axis(lengths, parent, axis=1), t + 1)
                new_seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1)
                new_seqs = jax.lax.dynamic_update_slice(new_seqs, token[..., None], (0, 0, jnp.maximum(t, 0)))
                flat_parent = (jnp.arange(batch)[:, None] * width + parent).reshape(-1)
                return (token.reshape(-1), flat_parent, new_seqs, new_scores,
                        jnp.logical_or(parent_done, token == eos_id), new_len)

            keep = jnp.arange(rows)
            nxt, flat_parent, seqs, scores, finished, lengths = _forced_or(
                i, prompt, rows, (keep, seqs, scores, finished, lengths), generate)
            # reorder the cache rows to follow their parent beams (the step counters are scalars)
            cache = jax.tree.map(lambda x: x[flat_parent] if x.ndim and x.shape[0] == rows else x, cache)
            return i + 1, cache, nxt, seqs, scores, finished, lengths

        s = jax.lax.while_loop(cond, body, state)
        _, _, _, seqs, scores, _, lengths = s
        final = scores / length_penalty_factor(jnp.maximum(lengths, 1), length_penalty)
        best = jnp.argmax(final, axis=1)
        out = jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
        return out, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]

    return _jit_counting_traces(run)


_TRACES = [0]  # how many times jax has traced a decoding program in this process


def _jit_counting_traces(fn: Callable) -> Callable:
    """``jax.jit(fn)``, counting each trace (the Python body runs only while jax traces it)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        _TRACES[0] += 1
        return fn(*args, **kwargs)

    return jax.jit(traced)


def trace_count() -> int:
    """How many decoding programs jax has traced in this process (a repeated call should add none)."""
    return _TRACES[0]


def compiled_count() -> int:
    """How many compiled decoding functions the module-level cache holds (at most 32)."""
    return len(_COMPILED)


def _compiled(vae: TextVAE, key: tuple, build: Callable[[], Callable]) -> Callable:
    """Compiled function for (vae, static settings); the entry keeps vae alive so its id stays unique."""
    full = (id(vae),) + key
    hit = _COMPILED.get(full)
    if hit is not None and hit[0] is vae:
        _COMPILED.move_to_end(full)
        return hit[1]
    fn = build()
    _COMPILED[full] = (vae, fn)
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return fn


def clear_compiled_cache() -> None:
    """Drops every compiled decoding function (and the module references they hold)."""
    _COMPILED.clear()


# ---------------------------------------------------------------------------------------------- public
def decode_from_z(
    vae: TextVAE,
    params: Any,
    z: Any,
    *,
    prompt: Sequence[int],
    eos_id: int,
    pad_id: int,
    max_length: int,
    method: str = "greedy",
    rng: Optional[jax.Array] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    return_scores: bool = False,
):
    """Decodes token ids from latent codes.

    Args:
      vae: the TextVAE module.
      params: its parameters (``variables['params']``; a ``{'params': ...}`` dict is accepted too).
      z: ``[B, Dz]`` latent codes.
      prompt: forced decoder prefix, e.g. ``(decoder_start,)`` (T5) or ``(</s>, <s>)`` (BART); not returned.
      eos_id: end-of-sequence id (a row stops after emitting it).
      pad_id: id written after EOS.
      max_length: number of generated tokens (output width), EOS included.
      method: ``'greedy'``, ``'sample'`` or ``'beam'``.
      rng: PRNG key, required for ``'sample'`` (step t uses ``fold_in(rng, t)``).
      temperature: ``'sample'``: logits are divided by it (> 0).
      top_k: ``'sample'``: keep the k most likely tokens (0: all).
      top_p: ``'sample'``: nucleus mass (1.0: all).
      beam_size: ``'beam'``: beams per example.
      length_penalty: ``'beam'``: alpha of the GNMT penalty ``((5 + len) / 6) ** alpha`` (0: raw log-prob).
      return_scores: also return ``[B]`` float32 log-probabilities of the returned tokens under the model
        (temperature 1, unfiltered; for beam search the summed log-prob of the chosen beam, no penalty).

    Returns:
      ``np.ndarray [B, max_length]`` int32 (continuation after the prompt, EOS included, ``pad_id`` after);
      with ``return_scores``, ``(tokens, scores)``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    prompt = tuple(int(t) for t in prompt)
    if not prompt:
        raise ValueError("prompt must hold at least the decoder start token")
    max_length = int(max_length)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    config = getattr(vae.backbone, "config", None)
    family = families.FAMILIES.get(getattr(config, "model_type", None))
    positions = None if family is None else family.max_decode_positions(config)
    needed = vae.num_slot_positions + len(prompt) - 1 + max_length  # a head-space slot takes position 0
    if positions is not None and needed > positions:
        raise ValueError(f"the memory slot + len(prompt) - 1 + max_length = {needed} exceeds the backbone's "
                         f"{positions} decoder positions (max_position_embeddings)")
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != vae.latent_size:
        raise ValueError(f"z must be [B, {vae.latent_size}], got {z.shape}")
    static = (prompt, int(eos_id), int(pad_id), max_length)
    if method == "beam":
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        fn = _compiled(vae, ("beam",) + static + (int(beam_size),),
                       lambda: _build_beam(vae, *static, int(beam_size)))
        rng = jax.random.PRNGKey(0)
    elif method == "sample":
        if rng is None:
            raise ValueError("method='sample' needs an explicit rng")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (use method='greedy' for argmax), got {temperature}")
        use_top_p = float(top_p) < 1.0
        fn = _compiled(vae, ("sample",) + static + (int(top_k), use_top_p),
                       lambda: _build_ancestral(vae, "sample", *static, int(top_k), use_top_p))
    else:
        fn = _compiled(vae, ("greedy",) + static, lambda: _build_ancestral(vae, "greedy", *static, 0, False))
        rng = jax.random.PRNGKey(0)
    tokens, scores = fn(_unwrap(params), z, rng, jnp.float32(temperature), jnp.float32(top_p),
                        jnp.float32(length_penalty))
    tokens = np.asarray(tokens)
    return (tokens, np.asarray(scores)) if return_scores else tokens


def sequence_log_probs(vae: TextVAE, params: Any, z: Any, tokens: Any, *, prompt: Sequence[int],
                       eos_id: int) -> np.ndarray:
    """Teacher-forced ``log p(tokens | z)`` of continuations as ``decode_from_z`` returns them (no cache).

    Args:
      vae, params: as for ``decode_from_z``.
      z: ``[B, Dz]``.
      tokens: ``[B, T]`` continuation after ``prompt``; scored up to and including the first EOS (all T
        tokens when there is none).
      prompt: the forced decoder prefix.
      eos_id: end-of-sequence id; positions after the first EOS (padding) are not scored.

    Returns:
      ``np.ndarray [B]`` float32 summed log-probabilities.
    """
    prompt = tuple(int(t) for t in prompt)
    fn = _compiled(vae, ("score", prompt, int(eos_id)), lambda: _build_scorer(vae, prompt, int(eos_id)))
    return np.asarray(fn(_unwrap(params), jnp.asarray(z, jnp.float32), jnp.asarray(tokens, jnp.int32)))


def _build_scorer(vae: TextVAE, prompt: tuple[int, ...], eos_id: int) -> Callable:
    def score(params, z, tokens):
        batch = tokens.shape[0]
        prefix = jnp.tile(jnp.asarray(prompt, jnp.int32)[None], (batch, 1))
        inputs = jnp.concatenate([prefix, tokens[:, :-1]], axis=1)
        logits = vae.apply({"params": params}, z, inputs, method=TextVAE.decode)[:, len(prompt) - 1:]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
        is_eos = (tokens == eos_id).astype(jnp.int32)
        upto_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # positions up to and including the first EOS
        return jnp.sum(jnp.where(upto_eos, logp, 0.0), axis=1)

    return _jit_counting_traces(score)
