"""Batched, jitted greedy / sampling / beam search over a one-token logits function and a cache.

The search knows nothing of the model behind it. The caller supplies

  * ``tokens_to_logits(params, cache, tokens, inputs) -> (logits, new_cache)``: feeds one token per row
    (``tokens [R, 1]`` int32) and returns the float32 next-token ``logits [R, V]`` and the updated cache;
  * ``cache``: the initial cache pytree for B rows, with room for ``cache_length(prompt, max_length)`` tokens.
    Every leaf of rank >= 1 is per row (leading axis B); rank-0 leaves (step counters) are shared by all rows;
  * ``inputs``: the per-row extra inputs (a pytree of ``[B, ...]`` arrays such as latent codes z, or None),
    passed unchanged to every ``tokens_to_logits`` call;
  * ``params``: everything else the function reads (any pytree, shared by all rows).

Public:

  * ``decode(tokens_to_logits, params, cache, inputs, *, prompt, eos_id, pad_id, max_length, method='greedy',
    ...)`` -> token ids ``[B, max_length]``: greedy, sampling (temperature / top-k / nucleus) or beam search.
  * ``sequence_log_probs(sequence_logits, params, tokens, inputs, *, prompt, eos_id)`` -> teacher-forced
    summed log-probabilities of continuations as ``decode`` returns them.
  * ``cache_length(prompt, max_length)``, ``filter_logits(logits, top_k, top_p)``,
    ``length_penalty_factor(length, alpha)``; ``trace_count()``, ``compiled_count()``, ``clear_compiled_cache()``.

How one call runs: the forced decoder prefix ``prompt`` (e.g. ``(decoder_start,)`` for T5, ``(</s>, <s>)`` for
BART as our data pipeline trains it) is fed one token at a time through the cache; the logits after its last
token give the first generated token. Each ``jax.lax.while_loop`` iteration feeds one token (the first
``len(prompt) - 1`` iterations feed the prompt and ignore the logits, so the compiled program holds a single
copy of the model); the loop stops early once every row (every beam) has emitted EOS.

The whole call is one ``jax.jit`` per (logits function, method, prompt, eos / pad ids, max_length, top_k,
nucleus on / off, beam size). The logits function is identified by its owner: for a bound method the object
it is bound to (and the method), otherwise the function object itself; pass the same function (or a method of
the same object) to reuse the compiled program, as a fresh closure per call compiles every time. ``params``,
``cache``, ``inputs``, the rng, ``temperature``, ``top_p`` and ``length_penalty`` are traced, so changing their
values does not recompile. Compiled functions are kept in a small module-level cache (``clear_compiled_cache()``
empties it).

Outputs hold only the continuation after the prompt: EOS included, ``pad_id`` after it; rows that never emit
EOS are cut at ``max_length``.

Beam search keeps ``beam_size`` hypotheses per example as ``B * beam_size`` rows (row ``b * beam_size + w``
holds example b; the cache and ``inputs`` are repeated per beam). A finished beam stays in the beam with its
score frozen and a pad continuation of cost 0, competing with the live ones. Candidates are ranked by
``score / length_penalty_factor(length, length_penalty)`` with the GNMT penalty ``((5 + length) / 6) ** alpha``
(Wu et al. 2016), where ``length`` counts generated tokens (EOS included; live candidates: tokens so far).
``length_penalty=0`` ranks by the raw summed log-probability. The best beam per example (by the same
normalised score) is returned.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("greedy", "sample", "beam")
_NEG = -1.0e9  # finite "minus infinity" for dead beams / impossible continuations (no inf - inf NaNs)
_MAX_COMPILED = 32
_COMPILED: "collections.OrderedDict[tuple, tuple[Any, Any, Callable]]" = collections.OrderedDict()

# tokens_to_logits(params, cache, tokens [R, 1], inputs) -> (logits [R, V] float32, new cache)
TokensToLogits = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, Any]]
# sequence_logits(params, tokens [R, T], inputs) -> logits [R, T, V]
SequenceLogits = Callable[[Any, jax.Array, Any], jax.Array]

__all__ = [
    "METHODS",
    "TokensToLogits",
    "SequenceLogits",
    "decode",
    "sequence_log_probs",
    "cache_length",
    "filter_logits",
    "length_penalty_factor",
    "clear_compiled_cache",
    "trace_count",
    "compiled_count",
]


# ------------------------------------------------------------------------------------------------ helpers
def cache_length(prompt: Sequence[int], max_length: int) -> int:
    """Positions a cache needs to decode ``max_length`` tokens after ``prompt``: ``len(prompt) - 1 + max_length``.

    Raises:
      ValueError: for an empty prompt or ``max_length < 1``.
    """
    if not len(prompt):
        raise ValueError("prompt must hold at least the decoder start token")
    if int(max_length) < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return len(prompt) - 1 + int(max_length)


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


def _num_rows(*trees: Any) -> int:
    """The common leading axis of every rank >= 1 leaf of ``trees`` (ValueError if they differ or none has one)."""
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(trees) if jnp.ndim(x)}
    if len(sizes) != 1:
        raise ValueError(
            f"every cache / inputs leaf of rank >= 1 must have the rows first; leading axes: {sorted(sizes) or 'none'}"
        )
    return sizes.pop()


def _per_row(fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
    """Applies ``fn`` to the per-row (rank >= 1) leaves of ``tree``; rank-0 leaves are shared and kept."""
    return jax.tree.map(lambda x: fn(x) if jnp.ndim(x) else x, tree)


def _forced_or(
    step_in_prompt: jax.Array, prompt: tuple[int, ...], rows: int, forced_rest: tuple, generate: Callable[[], tuple]
) -> tuple:
    """Loop iterations 0..len(prompt)-2 feed the prompt: the next input is prompt[i + 1] and the rest of the
    state is unchanged (``forced_rest``); later iterations run ``generate()``. The model call itself is
    outside this switch, so the compiled program holds one copy of the model."""
    if len(prompt) == 1:
        return generate()
    prompt_arr = jnp.asarray(prompt, jnp.int32)

    def forced(_):
        nxt = jnp.full((rows,), prompt_arr[jnp.minimum(step_in_prompt + 1, len(prompt) - 1)], jnp.int32)
        return (nxt,) + forced_rest

    return jax.lax.cond(step_in_prompt < len(prompt) - 1, forced, lambda _: generate(), None)


def _step(tokens_to_logits: TokensToLogits, params: Any, cache: Any, tok: jax.Array, inputs: Any):
    """Feeds one token per row ``tok [R]``; returns (float32 logits [R, V], new cache)."""
    logits, cache = tokens_to_logits(params, cache, tok[:, None].astype(jnp.int32), inputs)
    return logits.astype(jnp.float32), cache


# ------------------------------------------------------------------------------------- greedy / sampling
def _build_ancestral(tokens_to_logits, method, prompt, eos_id, pad_id, max_length, top_k, use_top_p):
    num_forced = len(prompt) - 1  # prompt tokens fed before the first generated token is chosen
    cache_len = num_forced + max_length

    def run(params, cache, inputs, rng, temperature, top_p, length_penalty):
        del length_penalty
        batch = _num_rows(cache, inputs)
        tok = jnp.full((batch,), prompt[0], jnp.int32)
        out = jnp.full((batch, max_length), pad_id, jnp.int32)
        state = (jnp.zeros((), jnp.int32), cache, tok, out, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32))

        def cond(s):
            return jnp.logical_and(s[0] < cache_len, jnp.logical_not(jnp.all(s[4])))

        def body(s):
            i, cache, tok, out, finished, total = s
            logits, cache = _step(tokens_to_logits, params, cache, tok, inputs)
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
                return (nxt, new_out, jnp.logical_or(finished, nxt == eos_id), total + jnp.where(finished, 0.0, gained))

            nxt, out, finished, total = _forced_or(i, prompt, batch, (out, finished, total), generate)
            return i + 1, cache, nxt, out, finished, total

        s = jax.lax.while_loop(cond, body, state)
        return s[3], s[5]

    return _jit_counting_traces(run)


# ------------------------------------------------------------------------------------------- beam search
def _beam_candidates(logits, t, scores, finished, lengths, seqs, pad_id, eos_id, length_penalty):
    """One beam-search expansion: the W best of the W * V candidates of each example.

    Args:
      logits: ``[B * W, V]`` float32 next-token logits; ``t`` the index of the token chosen now.
      scores, finished, lengths: ``[B, W]`` summed log-probs, EOS emitted, generated tokens.
      seqs: ``[B, W, max_length]`` tokens so far.

    Returns:
      ``(tokens [B * W], parent rows [B * W], seqs, scores, finished, lengths)`` of the new beams.
    """
    batch, width = scores.shape
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(batch, width, vocab)
    pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, _NEG).astype(jnp.float32)
    logp = jnp.where(finished[..., None], pad_only, logp)  # finished: pad at cost 0, score frozen
    cand = scores[..., None] + logp  # [B, W, V]
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
    return (token.reshape(-1), flat_parent, new_seqs, new_scores, jnp.logical_or(parent_done, token == eos_id), new_len)


def _build_beam(tokens_to_logits, prompt, eos_id, pad_id, max_length, beam_size):
    num_forced = len(prompt) - 1
    cache_len = num_forced + max_length
    width = beam_size

    def run(params, cache, inputs, rng, temperature, top_p, length_penalty):
        del rng, temperature, top_p
        batch = _num_rows(cache, inputs)
        rows = batch * width
        repeat = functools.partial(jnp.repeat, repeats=width, axis=0)  # row b * W + w holds example b
        cache, inputs = _per_row(repeat, cache), _per_row(repeat, inputs)
        tok = jnp.full((rows,), prompt[0], jnp.int32)
        seqs = jnp.full((batch, width, max_length), pad_id, jnp.int32)
        # only beam 0 is alive at the start, so the W beams do not all expand the same prefix
        scores = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, _NEG)[None], (batch, 1)).astype(jnp.float32)
        state = (
            jnp.zeros((), jnp.int32),
            cache,
            tok,
            seqs,
            scores,
            jnp.zeros((batch, width), bool),
            jnp.zeros((batch, width), jnp.int32),
        )

        def cond(s):
            return jnp.logical_and(s[0] < cache_len, jnp.logical_not(jnp.all(s[5])))

        def body(s):
            i, cache, tok, seqs, scores, finished, lengths = s
            logits, cache = _step(tokens_to_logits, params, cache, tok, inputs)
            t = i - num_forced
            generate = functools.partial(
                _beam_candidates, logits, t, scores, finished, lengths, seqs, pad_id, eos_id, length_penalty
            )
            keep = jnp.arange(rows)
            nxt, flat_parent, seqs, scores, finished, lengths = _forced_or(
                i, prompt, rows, (keep, seqs, scores, finished, lengths), generate
            )
            cache = _per_row(lambda x: x[flat_parent], cache)  # cache rows follow their parent beams
            return i + 1, cache, nxt, seqs, scores, finished, lengths

        s = jax.lax.while_loop(cond, body, state)
        _, _, _, seqs, scores, _, lengths = s
        final = scores / length_penalty_factor(jnp.maximum(lengths, 1), length_penalty)
        best = jnp.argmax(final, axis=1)
        out = jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
        return out, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]

    return _jit_counting_traces(run)


# ---------------------------------------------------------------------------------- compiled functions
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


def _owner(fn: Callable) -> tuple[Any, Any]:
    """``(owner, function)`` identifying a logits function: a bound method's object and underlying function,
    else ``(fn, fn)``."""
    owner = getattr(fn, "__self__", None)
    return (fn, fn) if owner is None else (owner, getattr(fn, "__func__", fn))


def _compiled(fn: Callable, key: tuple, build: Callable[[], Callable]) -> Callable:
    """Compiled function for (the owner of ``fn``, static settings); the entry keeps the owner alive so its id
    stays unique."""
    owner, func = _owner(fn)
    full = (id(owner), id(func)) + key
    hit = _COMPILED.get(full)
    if hit is not None and hit[0] is owner and hit[1] is func:
        _COMPILED.move_to_end(full)
        return hit[2]
    compiled = build()
    _COMPILED[full] = (owner, func, compiled)
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return compiled


def clear_compiled_cache() -> None:
    """Drops every compiled decoding function (and the logits functions' owners they hold)."""
    _COMPILED.clear()


def _program(
    tokens_to_logits: TokensToLogits, method: str, static: tuple, *, rng, temperature, top_k, top_p, beam_size
) -> Callable:
    """The compiled search for ``method`` and the static settings ``(prompt, eos_id, pad_id, max_length)``,
    after checking the method's own arguments."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "beam":
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        return _compiled(
            tokens_to_logits,
            ("beam",) + static + (int(beam_size),),
            lambda: _build_beam(tokens_to_logits, *static, int(beam_size)),
        )
    if method == "sample":
        if rng is None:
            raise ValueError("method='sample' needs an explicit rng")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (use method='greedy' for argmax), got {temperature}")
        use_top_p = float(top_p) < 1.0
        return _compiled(
            tokens_to_logits,
            ("sample",) + static + (int(top_k), use_top_p),
            lambda: _build_ancestral(tokens_to_logits, "sample", *static, int(top_k), use_top_p),
        )
    return _compiled(
        tokens_to_logits, ("greedy",) + static, lambda: _build_ancestral(tokens_to_logits, "greedy", *static, 0, False)
    )


def _static_settings(
    prompt: Sequence[int], eos_id: int, pad_id: int, max_length: int, cache: Any, inputs: Any
) -> tuple[tuple[int, ...], int, int, int]:
    """A search's static ``(prompt, eos_id, pad_id, max_length)`` as ints, checked, as are the rows of cache/inputs."""
    prompt = tuple(int(t) for t in prompt)
    cache_length(prompt, max_length)
    _num_rows(cache, inputs)
    return prompt, int(eos_id), int(pad_id), int(max_length)


# ---------------------------------------------------------------------------------------------- public
def decode(
    tokens_to_logits: TokensToLogits,
    params: Any,
    cache: Any,
    inputs: Any = None,
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
    """Decodes token ids with ``tokens_to_logits``, one token per row per step.

    Args:
      tokens_to_logits: ``(params, cache, tokens [R, 1] int32, inputs) -> (logits [R, V] float32, new cache)``;
        R is B, or ``B * beam_size`` for beam search.
      params: what ``tokens_to_logits`` reads besides the cache and the per-row inputs (shared by all rows).
      cache: initial cache for B rows with room for ``cache_length(prompt, max_length)`` tokens; rank >= 1
        leaves have the rows first, rank-0 leaves are shared.
      inputs: per-row extra inputs, a pytree of ``[B, ...]`` arrays (e.g. latent codes ``z [B, Dz]``), or None.
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
    fixed = _static_settings(prompt, eos_id, pad_id, max_length, cache, inputs)
    fn = _program(
        tokens_to_logits, method, fixed, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p, beam_size=beam_size
    )
    if method != "sample":
        rng = jax.random.PRNGKey(0)
    tokens, scores = fn(
        params, cache, inputs, rng, jnp.float32(temperature), jnp.float32(top_p), jnp.float32(length_penalty)
    )
    return (np.asarray(tokens), np.asarray(scores)) if return_scores else np.asarray(tokens)


def sequence_log_probs(
    sequence_logits: SequenceLogits, params: Any, tokens: Any, inputs: Any = None, *, prompt: Sequence[int], eos_id: int
) -> np.ndarray:
    """Teacher-forced ``log p(tokens | inputs)`` of continuations as ``decode`` returns them (no cache).

    Args:
      sequence_logits: ``(params, ids [B, T'] int32, inputs) -> logits [B, T', V]``, the whole-sequence
        (teacher-forced) counterpart of ``tokens_to_logits``.
      params, inputs: as for ``decode``.
      tokens: ``[B, T]`` continuation after ``prompt``; scored up to and including the first EOS (all T
        tokens when there is none).
      prompt: the forced decoder prefix.
      eos_id: end-of-sequence id; positions after the first EOS (padding) are not scored.

    Returns:
      ``np.ndarray [B]`` float32 summed log-probabilities.
    """
    prompt = tuple(int(t) for t in prompt)
    fn = _compiled(
        sequence_logits, ("score", prompt, int(eos_id)), lambda: _build_scorer(sequence_logits, prompt, int(eos_id))
    )
    return np.asarray(fn(params, jnp.asarray(tokens, jnp.int32), inputs))


def _build_scorer(sequence_logits: SequenceLogits, prompt: tuple[int, ...], eos_id: int) -> Callable:
    def score(params, tokens, inputs):
        batch = tokens.shape[0]
        prefix = jnp.tile(jnp.asarray(prompt, jnp.int32)[None], (batch, 1))
        ids = jnp.concatenate([prefix, tokens[:, :-1]], axis=1)
        logits = sequence_logits(params, ids, inputs)[:, len(prompt) - 1 :].astype(jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
        is_eos = (tokens == eos_id).astype(jnp.int32)
        upto_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # positions up to and including the first EOS
        return jnp.sum(jnp.where(upto_eos, logp, 0.0), axis=1)

    return _jit_counting_traces(score)
