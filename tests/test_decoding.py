"""flax_textvae.decoding on a hand-made bigram model, and through ``inference.decode_from_z`` on tiny random
from-scratch BART / T5 VAEs (CPU, a few compiles)."""

import ast
import importlib.util
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import decoding, inference, models
from flax_textvae.vae import TextVAE

V, EOS, PAD, BOS = 50, 2, 1, 0
BART_PROMPT = (EOS, BOS)  # decoder input [</s>, <s>, w1, ...] as the data pipeline trains BART
MAX_LEN = 8
LATENT = 4


def _bart_config():
    from transformers import BartConfig

    return BartConfig(
        vocab_size=V,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=0.3,
    )


def _make_vae(config, injection, eos, eos_bias=2.5, seed=0):
    """TextVAE with random params; EOS logit boosted so rows end at different lengths."""
    backbone = models.build_module(config)
    vae = TextVAE(backbone=backbone, latent_size=LATENT, injection=injection, num_memory_slots=2)
    ids = jnp.full((2, 5), 3, jnp.int32)
    z = jnp.zeros((2, LATENT), jnp.float32)
    # only the decoding path's parameters (no encoder / to_moments): all these tests need
    init = jax.jit(lambda key: vae.init(key, z, ids, method=TextVAE.decode))
    params = init(jax.random.PRNGKey(seed))["params"]
    bias_name = "final_logits_bias"
    if bias_name in params["backbone"]:
        params["backbone"][bias_name] = params["backbone"][bias_name].at[0, eos].add(eos_bias)
    else:  # T5: no logits bias; boost the EOS row of the tied embedding instead
        emb = params["backbone"]["shared"]["embedding"]
        params["backbone"]["shared"]["embedding"] = emb.at[eos].mul(4.0)
    return vae, params


def _z(n=6, seed=1):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, LATENT)) * 2.0, np.float32)


def _greedy_no_cache(vae, params, z, prompt, eos, pad, max_length):
    """Greedy by recomputing the whole (growing) prefix each step, no cache; pad after EOS."""
    width = len(prompt) - 1 + max_length
    ids = np.full((z.shape[0], width), pad, np.int32)
    ids[:, : len(prompt)] = prompt
    apply = jax.jit(lambda p, zz, x: vae.apply({"params": p}, zz, x, method=TextVAE.decode))
    out = np.full((z.shape[0], max_length), pad, np.int32)
    done = np.zeros(z.shape[0], bool)
    for t in range(max_length):
        pos = len(prompt) - 1 + t
        # causal decoder: positions > pos (not yet filled) cannot influence the logits at pos
        logits = np.asarray(apply(params, z, jnp.asarray(ids)))[:, pos]
        nxt = np.where(done, pad, logits.argmax(-1))
        out[:, t] = nxt
        done |= nxt == eos
        if pos + 1 < width:
            ids[:, pos + 1] = nxt
    return out


def _assert_padded_after_eos(tokens, eos, pad):
    for row in tokens:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert np.all(row[hits[0] + 1 :] == pad), row


@pytest.fixture(scope="module")
def bart_memory():
    return _make_vae(_bart_config(), ("memory",), EOS)


def test_init_vae_cache_is_backbone_cache_under_backbone(bart_memory):
    vae, _ = bart_memory
    cache = inference.init_vae_cache(vae, 3, 7)
    want = {"backbone": models.init_cache(vae.backbone, 3, 7)}
    assert jax.tree.structure(cache) == jax.tree.structure(want)
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, want)


@pytest.mark.parametrize("injection", [("memory",), ("cross_attention",), ("embedding",)])
def test_greedy_cached_equals_recomputed(injection, bart_memory):
    vae, params = bart_memory if injection == ("memory",) else _make_vae(_bart_config(), injection, EOS)
    z = _z()
    got, scores = inference.decode_from_z(
        vae, params, z, prompt=BART_PROMPT, eos_id=EOS, pad_id=PAD, max_length=MAX_LEN, return_scores=True
    )
    want = _greedy_no_cache(vae, params, z, BART_PROMPT, EOS, PAD, MAX_LEN)
    assert got.shape == (6, MAX_LEN) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    _assert_padded_after_eos(got, EOS, PAD)
    recomputed = inference.sequence_log_probs(vae, params, z, got, prompt=BART_PROMPT, eos_id=EOS)
    np.testing.assert_allclose(scores, recomputed, rtol=1e-4, atol=1e-4)
    if injection == ("memory",):  # the fixture is tuned so some rows stop early and some run to the end
        ended = (got == EOS).any(1)
        assert ended.any() and not ended.all()


def test_repeated_calls_do_not_retrace(bart_memory):
    vae, params = bart_memory
    z = _z()
    kw = dict(prompt=BART_PROMPT, eos_id=EOS, pad_id=PAD, max_length=MAX_LEN)
    a = inference.decode_from_z(vae, params, z, **kw)
    n, traces = decoding.compiled_count(), decoding.trace_count()
    b = inference.decode_from_z(vae, {"params": params}, z, **kw)  # wrapped variables accepted too
    np.testing.assert_array_equal(a, b)
    assert decoding.compiled_count() == n and decoding.trace_count() == traces
    inference.decode_from_z(vae, params, z + 1.0, **kw)  # new values of traced arguments: no retrace either
    assert decoding.trace_count() == traces
    inference.decode_from_z(vae, params, z, **dict(kw, max_length=MAX_LEN - 1))  # a new static setting traces
    assert decoding.trace_count() == traces + 1


def test_beam_width_one_equals_greedy(bart_memory):
    vae, params = bart_memory
    z = _z()
    kw = dict(prompt=BART_PROMPT, eos_id=EOS, pad_id=PAD, max_length=MAX_LEN)
    greedy = inference.decode_from_z(vae, params, z, **kw)
    beam = inference.decode_from_z(vae, params, z, method="beam", beam_size=1, length_penalty=0.7, **kw)
    np.testing.assert_array_equal(beam, greedy)


def test_beam_scores_at_least_greedy(bart_memory):
    vae, params = bart_memory
    z = _z()
    kw = dict(prompt=BART_PROMPT, eos_id=EOS, pad_id=PAD, max_length=MAX_LEN)
    greedy = inference.decode_from_z(vae, params, z, **kw)
    beam, beam_scores = inference.decode_from_z(
        vae, params, z, method="beam", beam_size=3, length_penalty=0.0, return_scores=True, **kw
    )
    _assert_padded_after_eos(beam, EOS, PAD)
    lp_greedy = inference.sequence_log_probs(vae, params, z, greedy, prompt=BART_PROMPT, eos_id=EOS)
    lp_beam = inference.sequence_log_probs(vae, params, z, beam, prompt=BART_PROMPT, eos_id=EOS)
    np.testing.assert_allclose(beam_scores, lp_beam, rtol=1e-4, atol=1e-4)
    assert np.all(lp_beam >= lp_greedy - 1e-4), (lp_beam, lp_greedy)
    assert np.any(lp_beam > lp_greedy + 1e-3)  # beam search actually found something better somewhere


def test_beam_is_exact_when_it_covers_the_vocabulary(bart_memory):
    """max_length 2 and beam_size V: every 1-token prefix survives, so beam search is exhaustive."""
    vae, params = bart_memory
    z = _z(3, seed=5)
    tokens, scores = inference.decode_from_z(
        vae,
        params,
        z,
        prompt=BART_PROMPT,
        eos_id=EOS,
        pad_id=PAD,
        max_length=2,
        method="beam",
        beam_size=V,
        length_penalty=0.0,
        return_scores=True,
    )
    # all (t1, t2) continuations at once: rows b * V + t1 feed [prompt, t1]
    n = z.shape[0]
    ids = np.concatenate(
        [np.tile(np.asarray(BART_PROMPT, np.int32), (n * V, 1)), np.tile(np.arange(V, dtype=np.int32), n)[:, None]], 1
    )
    apply = jax.jit(lambda p, zz, x: vae.apply({"params": p}, zz, x, method=TextVAE.decode))
    logits = apply(params, jnp.asarray(np.repeat(z, V, 0)), jnp.asarray(ids))
    logp = np.asarray(jax.nn.log_softmax(logits, -1)).reshape(n, V, len(BART_PROMPT) + 1, V)
    for b in range(n):
        first, second = logp[b, 0, -2], logp[b, :, -1]  # [V], [V (t1), V (t2)]
        total = first[:, None] + second
        total[EOS, :] = -np.inf
        total[EOS, PAD] = first[EOS]  # (EOS, pad) is the only continuation of an early EOS
        t1, t2 = np.unravel_index(np.argmax(total), total.shape)
        np.testing.assert_array_equal(tokens[b], [t1, t2])
        np.testing.assert_allclose(scores[b], total[t1, t2], rtol=1e-4, atol=1e-4)


def test_sampling_top_k_one_equals_greedy(bart_memory):
    vae, params = bart_memory
    z = _z()
    kw = dict(prompt=BART_PROMPT, eos_id=EOS, pad_id=PAD, max_length=MAX_LEN)
    greedy = inference.decode_from_z(vae, params, z, **kw)
    sampled = inference.decode_from_z(
        vae, params, z, method="sample", rng=jax.random.PRNGKey(3), top_k=1, temperature=2.0, **kw
    )
    np.testing.assert_array_equal(sampled, greedy)


def test_sampling_is_reproducible_and_rng_dependent(bart_memory):
    vae, params = bart_memory
    z = _z()
    kw = dict(prompt=BART_PROMPT, eos_id=EOS, pad_id=PAD, max_length=MAX_LEN, method="sample", top_p=0.95)
    a = inference.decode_from_z(vae, params, z, rng=jax.random.PRNGKey(0), **kw)
    b = inference.decode_from_z(vae, params, z, rng=jax.random.PRNGKey(0), **kw)
    c = inference.decode_from_z(vae, params, z, rng=jax.random.PRNGKey(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    _assert_padded_after_eos(c, EOS, PAD)
    with pytest.raises(ValueError, match="rng"):
        inference.decode_from_z(vae, params, z, **kw)


def test_filter_logits():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.25, 0.05]]))
    keep = lambda x: np.asarray(x[0] > -1e8)  # noqa: E731
    np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_k=2)), [1, 0, 1, 0])
    np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_p=0.7)), [1, 0, 1, 0])
    np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_p=0.76)), [1, 1, 1, 0])
    np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_p=0.1)), [1, 0, 0, 0])
    # top-p acts on the renormalised top-k distribution: 0.5/0.95 + 0.25/0.95 = 0.79 >= 0.76
    np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_k=3, top_p=0.76)), [1, 0, 1, 0])
    np.testing.assert_array_equal(keep(decoding.filter_logits(logits, top_k=1, top_p=1.0)), [1, 0, 0, 0])
    np.testing.assert_allclose(decoding.length_penalty_factor(7, 1.0), 2.0)
    np.testing.assert_allclose(decoding.length_penalty_factor(7, 0.0), 1.0)


def test_bad_arguments(bart_memory):
    vae, params = bart_memory
    z = _z(2)
    kw = dict(prompt=BART_PROMPT, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="method"):
        inference.decode_from_z(vae, params, z, max_length=4, method="nucleus", **kw)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        inference.decode_from_z(vae, params, z, max_length=40, **kw)
    with pytest.raises(ValueError, match="z must be"):
        inference.decode_from_z(vae, params, z[:, :2], max_length=4, **kw)


@pytest.mark.skipif(importlib.util.find_spec("flax_textvae.models.t5") is None, reason="no T5 backbone")
def test_t5_greedy_and_beam():
    from transformers import T5Config

    config = T5Config(
        vocab_size=V,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        initializer_factor=8.0,
    )
    vae, params = _make_vae(config, ("memory", "embedding"), eos=1)
    z = _z()
    kw = dict(prompt=(0,), eos_id=1, pad_id=0, max_length=MAX_LEN)
    got = inference.decode_from_z(vae, params, z, **kw)
    np.testing.assert_array_equal(got, _greedy_no_cache(vae, params, z, (0,), 1, 0, MAX_LEN))
    _assert_padded_after_eos(got, 1, 0)
    beam = inference.decode_from_z(vae, params, z, method="beam", beam_size=1, **kw)
    np.testing.assert_array_equal(beam, got)


# ------------------------------------------------------------------------- the model-free core, by hand
TOY_V, TOY_PAD, TOY_EOS, TOY_START, TOY_A, TOY_B = 5, 0, 1, 2, 3, 4


def _toy_table():
    """Bigram log-probs [prev, next]: start -> A 0.6 / B 0.4; A -> uniform over 1..4; B -> EOS.

    Greedy takes A then EOS (0.6 * 0.25 = 0.15); beam search finds B then EOS (0.4).
    """
    eps = 1e-6
    probs = np.full((TOY_V, TOY_V), eps)
    probs[TOY_START, TOY_A], probs[TOY_START, TOY_B] = 0.6, 0.4 - 3 * eps
    probs[TOY_A, 1:] = (1 - eps) / 4
    probs[TOY_B, TOY_EOS] = 1 - 4 * eps
    probs[:2] = 1.0 / TOY_V
    return jnp.asarray(np.log(probs), jnp.float32)


class _Bigram:
    """A model-free logits function: table[previous token] plus a per-row bias; the cache counts steps."""

    def tokens_to_logits(self, params, cache, tokens, bias):
        new = {"steps": cache["steps"] + 1, "seen": cache["seen"] + 1}  # shared counter, per-row counts
        return params[tokens[:, 0]] + bias, new

    def sequence_logits(self, params, tokens, bias):
        return params[tokens] + bias[:, None]


def _toy_cache(rows):
    return {"steps": jnp.zeros((), jnp.int32), "seen": jnp.zeros((rows,), jnp.int32)}


def _toy_bias():
    return jnp.zeros((2, TOY_V), jnp.float32).at[1, TOY_B].set(10.0)  # row 1 strongly prefers B


TOY_KW = dict(prompt=(TOY_START,), eos_id=TOY_EOS, pad_id=TOY_PAD, max_length=2)


def test_core_greedy_and_beam_over_a_hand_made_bigram():
    model, table, bias = _Bigram(), _toy_table(), _toy_bias()
    greedy, g_scores = decoding.decode(model.tokens_to_logits, table, _toy_cache(2), bias, return_scores=True, **TOY_KW)
    np.testing.assert_array_equal(greedy, [[TOY_A, TOY_EOS], [TOY_B, TOY_EOS]])
    np.testing.assert_allclose(g_scores[0], np.log(0.6 * 0.25), rtol=1e-4)
    beam, b_scores = decoding.decode(
        model.tokens_to_logits,
        table,
        _toy_cache(2),
        bias,
        method="beam",
        beam_size=2,
        length_penalty=0.0,
        return_scores=True,
        **TOY_KW,
    )
    np.testing.assert_array_equal(beam, [[TOY_B, TOY_EOS], [TOY_B, TOY_EOS]])
    np.testing.assert_allclose(b_scores[0], np.log(0.4), rtol=1e-4)
    scored = decoding.sequence_log_probs(model.sequence_logits, table, beam, bias, prompt=(TOY_START,), eos_id=TOY_EOS)
    np.testing.assert_allclose(b_scores, scored, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        g_scores,
        decoding.sequence_log_probs(model.sequence_logits, table, greedy, bias, prompt=(TOY_START,), eos_id=TOY_EOS),
        rtol=1e-5,
        atol=1e-5,
    )


def test_core_compiled_programs_are_keyed_on_the_owner_of_the_logits_function():
    model, table, bias = _Bigram(), _toy_table(), _toy_bias()
    decoding.decode(model.tokens_to_logits, table, _toy_cache(2), bias, **TOY_KW)
    traces = decoding.trace_count()
    # a fresh bound method of the same object, new cache / inputs values: the same program
    decoding.decode(model.tokens_to_logits, table, _toy_cache(2), bias + 1.0, **TOY_KW)
    assert decoding.trace_count() == traces
    decoding.decode(_Bigram().tokens_to_logits, table, _toy_cache(2), bias, **TOY_KW)  # another owner
    assert decoding.trace_count() == traces + 1


def test_core_rejects_cache_and_inputs_with_different_rows():
    model = _Bigram()
    with pytest.raises(ValueError, match="rows first"):
        decoding.decode(model.tokens_to_logits, _toy_table(), _toy_cache(3), _toy_bias(), **TOY_KW)
    with pytest.raises(ValueError, match="prompt"):
        decoding.decode(model.tokens_to_logits, _toy_table(), _toy_cache(2), _toy_bias(), **dict(TOY_KW, prompt=()))


def test_decoding_imports_no_package_module():
    tree = ast.parse(inspect.getsource(decoding))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("flax_textvae")], names
