"""Accelerator-oriented fast paths, tested on CPU against their reference paths.

Chunked cross-entropy (alone and inside the training step), the dot_product attention implementation,
per-layer rematerialisation, the compilation cache and the device suite.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import compile_cache, losses
from flax_textvae import step as step_lib
from flax_textvae.models import attention as attn_lib
from flax_textvae.models import bart, t5
from flax_textvae.models.common import init_cache
from flax_textvae.vae import TextVAE

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------- chunked cross-entropy
def _problem(vocab=1000, d_model=16, seed=0, dtype=jnp.float32):
    """B=3, T=5; rows of length 5, 2, 3 (weights 0 on padding), one fractional weight; bias and head."""
    r = np.random.RandomState(seed)
    hidden = jnp.asarray(r.randn(3, 5, d_model), dtype)
    embedding = jnp.asarray(r.randn(vocab, d_model) * 0.5, jnp.float32)
    bias = jnp.asarray(r.randn(vocab), jnp.float32)
    targets = jnp.asarray(r.randint(0, vocab, (3, 5)), jnp.int32)
    weights = jnp.asarray([[1, 1, 1, 1, 0.5], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], jnp.float32)
    return hidden, embedding, bias, targets, weights


def _full(hidden, head, bias, targets, weights, scale, layout):
    spec = "btd,vd->btv" if layout == "vd" else "btd,dv->btv"
    logits = jnp.einsum(spec, hidden * scale, head, preferred_element_type=jnp.float32) + bias
    return losses.token_nll(logits, targets, weights)


def _assert_close(got, want, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("vocab,chunk", [(1000, 128), (512, 128), (300, 4096)])
def test_chunked_token_nll_equals_token_nll_in_value_and_gradient(layout, vocab, chunk):
    hidden, embedding, bias, targets, weights = _problem(vocab)
    head = embedding if layout == "vd" else embedding.T
    scale = 0.7

    def chunked(h, w, b):
        return losses.chunked_token_nll(
            h, w, targets, weights, bias=b, scale=scale, head_layout=layout, chunk_size=chunk
        )

    def full(h, w, b):
        return _full(h, w, b, targets, weights, scale, layout)

    _assert_close(jax.jit(chunked)(hidden, head, bias), full(hidden, head, bias))
    # A non-uniform cotangent per example, so the per-example scaling of the gradient is checked too.
    ct = jnp.asarray([1.0, -2.0, 0.5])
    g_chunked = jax.jit(jax.grad(lambda *a: jnp.dot(chunked(*a), ct), argnums=(0, 1, 2)))(hidden, head, bias)
    g_full = jax.grad(lambda *a: jnp.dot(full(*a), ct), argnums=(0, 1, 2))(hidden, head, bias)
    for got, want in zip(g_chunked, g_full):
        assert got.shape == want.shape and got.dtype == want.dtype
        _assert_close(got, want)


def test_chunked_token_nll_ignores_padding_contents():
    hidden, embedding, bias, targets, weights = _problem()
    pad = np.asarray(weights) == 0
    dirty_hidden = jnp.where(jnp.asarray(pad)[..., None], jnp.nan, hidden)
    dirty_targets = jnp.where(jnp.asarray(pad), -100, targets)

    def loss(h, w, t):
        return jnp.sum(losses.chunked_token_nll(h, w, t, weights, bias=bias, chunk_size=256))

    clean = jax.value_and_grad(loss, argnums=(0, 1))(hidden, embedding, targets)
    dirty = jax.value_and_grad(loss, argnums=(0, 1))(dirty_hidden, embedding, dirty_targets)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
        assert np.all(np.isfinite(b))
        np.testing.assert_array_equal(a, b)
    assert np.all(np.asarray(dirty[1][0])[pad] == 0), "no gradient reaches padding positions"


def test_chunked_token_nll_in_bfloat16_accumulates_in_float32():
    hidden, embedding, bias, targets, weights = _problem(dtype=jnp.bfloat16)
    got = losses.chunked_token_nll(hidden, embedding, targets, weights, bias=bias, chunk_size=128)
    assert got.dtype == jnp.float32
    # Reference: the same bf16 operands, float32 logits (what the models' LM heads compute).
    logits = (
        jnp.einsum("btd,vd->btv", hidden, embedding.astype(jnp.bfloat16), preferred_element_type=jnp.float32) + bias
    )
    _assert_close(got, losses.token_nll(logits, targets, weights), rtol=1e-4)
    g = jax.grad(
        lambda h, w: jnp.sum(losses.chunked_token_nll(h, w, targets, weights, chunk_size=128)), argnums=(0, 1)
    )(hidden, embedding)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(g[0], np.float32))) and np.all(np.isfinite(g[1]))


def test_chunked_token_nll_needs_far_less_temporary_memory():
    h = jax.ShapeDtypeStruct((8, 32, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((32128, 64), jnp.float32)
    t = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    m = jax.ShapeDtypeStruct((8, 32), jnp.float32)

    def temp_bytes(loss):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, t, m).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    full = temp_bytes(lambda h, w, t, m: jnp.sum(losses.token_nll(jnp.einsum("btd,vd->btv", h, w), t, m)))
    chunked = temp_bytes(lambda h, w, t, m: jnp.sum(losses.chunked_token_nll(h, w, t, m, chunk_size=2048)))
    logits_bytes = 8 * 32 * 32128 * 4
    assert full >= logits_bytes
    assert chunked < logits_bytes / 4, (chunked, full)


def test_chunked_token_nll_rejects_bad_arguments():
    hidden, embedding, _, targets, weights = _problem()
    with pytest.raises(ValueError, match="head_layout"):
        losses.chunked_token_nll(hidden, embedding, targets, weights, head_layout="kernel")
    with pytest.raises(ValueError, match="does not match"):
        losses.chunked_token_nll(hidden, embedding, targets, weights, head_layout="dv")
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_token_nll(hidden, embedding, targets, weights, chunk_size=0)


# ---------------------------------------------------------------------------------- attention implementations
def _tree_close(got, want, rtol):
    """Leaf by leaf within ``rtol``, the absolute slack scaled by the largest value of the whole tree (some
    gradients are exactly 0 in theory, e.g. of a key-projection bias, and only rounding noise in practice)."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    scale = max(float(np.max(np.abs(np.asarray(w, np.float32)), initial=0.0)) for w in want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=rtol * scale)


_MHA_CASES = {
    # name: (MultiHeadAttention keywords, call keywords builder)
    "bart_self_padding": (dict(scale_query=True), lambda a: dict(mask=a["key_mask"])),
    "bart_causal_padding": (dict(scale_query=True), lambda a: dict(mask=a["key_mask"], causal=True)),
    "bart_cross": (dict(scale_query=True), lambda a: dict(kv=a["memory"], mask=a["memory_mask"])),
    "bart_hidden_slots": (
        dict(scale_query=True),
        lambda a: dict(
            mask=a["key_mask"], causal=True, slots=attn_lib.LatentSlots(states=a["slot_states"], mask=a["slot_mask"])
        ),
    ),
    "t5_relative_causal": (
        dict(
            scale_query=False,
            use_bias=False,
            relative_bias=attn_lib.RelativePositionBias(8, 16, bidirectional=False, init_std=1.0),
        ),
        lambda a: dict(mask=a["key_mask"], causal=True),
    ),
    "t5_relative_bidirectional": (
        dict(
            scale_query=False,
            use_bias=False,
            relative_bias=attn_lib.RelativePositionBias(8, 16, bidirectional=True, init_std=1.0),
        ),
        lambda a: dict(mask=a["key_mask"]),
    ),
    "t5_head_kv_slots": (
        dict(
            scale_query=False,
            use_bias=False,
            relative_bias=attn_lib.RelativePositionBias(8, 16, bidirectional=False, init_std=1.0),
        ),
        lambda a: dict(
            mask=a["key_mask"], causal=True, slots=attn_lib.LatentSlots(kv=a["slot_kv"], mask=a["slot_mask"])
        ),
    ),
}


def _mha_inputs(dtype):
    """B=3, Q=K=6, M=4, D=16, H=4: padded keys (row 2 fully padded), 2 slots (one hidden for row 1)."""
    r = np.random.RandomState(0)
    key_mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [0] * 6], np.int32)
    return {
        "x": jnp.asarray(r.randn(3, 6, 16), dtype),
        "memory": jnp.asarray(r.randn(3, 4, 16), dtype),
        "key_mask": attn_lib.padding_mask(key_mask),
        "memory_mask": attn_lib.padding_mask(np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])),
        "slot_states": jnp.asarray(r.randn(3, 2, 16), dtype),
        "slot_kv": jnp.asarray(r.randn(3, 2, 4, 4), dtype),
        "slot_mask": jnp.asarray([[1, 1], [1, 0], [1, 1]], jnp.int32),
    }


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", sorted(_MHA_CASES))
def test_dot_product_attention_equals_explicit(case, dtype, rtol):
    """The same parameters through both implementations: equal outputs and gradients (incl. the bias table).

    Row 2 has no visible key in the padding / causal cases: both give the values' uniform average there, but
    the explicit path still sends a (meaningless) gradient into scores it has overwritten with the mask, the
    fused one none; so row 2's outputs get no cotangent (no loss reads a row that sees nothing).
    """
    module_kw, call_kw = _MHA_CASES[case]
    a = _mha_inputs(dtype)
    kw = call_kw(a)
    kv = kw.pop("kv", None)
    make = lambda impl: attn_lib.MultiHeadAttention(
        num_heads=4, head_dim=4, out_features=16, dtype=dtype, attention=impl, **module_kw
    )
    params = make("explicit").init(jax.random.key(0), a["x"], kv, **kw)["params"]

    def loss(impl, p, x):
        out, _ = make(impl).apply({"params": p}, x, kv, **kw)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)) * jnp.asarray([1.0, 1.0, 0.0])[:, None, None]), out

    results = {
        impl: jax.jit(jax.value_and_grad(lambda p, x, i=impl: loss(i, p, x), argnums=(0, 1), has_aux=True))(
            params, a["x"]
        )
        for impl in ("explicit", "dot_product")  # 'cudnn' needs a GPU: tests/test_attention_cudnn.py
    }
    (_, out_ref), grads_ref = results["explicit"]
    (_, out_dot), grads_dot = results["dot_product"]
    assert out_dot.dtype == dtype
    _tree_close(out_dot, out_ref, rtol)
    _tree_close(grads_dot, grads_ref, rtol)


def test_dot_product_attention_with_dropout_is_the_explicit_path():
    """Attention dropout drawn: both settings give the same numbers (dot_product falls back)."""
    a = _mha_inputs(jnp.float32)
    make = lambda impl: attn_lib.MultiHeadAttention(
        num_heads=4, head_dim=4, out_features=16, dropout_rate=0.3, attention=impl
    )
    params = make("explicit").init(jax.random.key(0), a["x"], mask=a["key_mask"])["params"]
    outs = [
        make(impl).apply(
            {"params": params},
            a["x"],
            mask=a["key_mask"],
            causal=True,
            deterministic=False,
            rngs={"dropout": jax.random.key(5)},
        )[0]
        for impl in ("explicit", "dot_product")
    ]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    with pytest.raises(ValueError, match="attention implementation"):
        make("flash").apply({"params": params}, a["x"])


def _tiny_bart(**kw):
    return transformers.BartConfig(
        vocab_size=70,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        dropout=0.1,
        attention_dropout=0.1,
        **kw,
    )


def _tiny_t5(separate_head=False):
    """v1.0 (relu, tied head rescaled by d_model**-0.5) or v1.1 (gated-gelu, separate lm_head)."""
    config = transformers.T5Config(
        vocab_size=70,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu" if separate_head else "relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.1,
        tie_word_embeddings=not separate_head,
    )
    config.scale_decoder_outputs = not separate_head  # where transformers 5 keeps the flag (see t5.py)
    assert t5.separate_head(config) == separate_head
    return config


BACKBONES = {
    "bart": lambda: (bart.BartForConditionalGeneration, _tiny_bart()),
    "bart_untied": lambda: (bart.BartForConditionalGeneration, _tiny_bart(tie_word_embeddings=False)),
    "t5": lambda: (t5.T5ForConditionalGeneration, _tiny_t5()),
    "t5_untied": lambda: (t5.T5ForConditionalGeneration, _tiny_t5(separate_head=True)),
}


def _seq_batch(seed=0, b=3, s=7, t=6):
    r = np.random.RandomState(seed)
    ids = jnp.asarray(r.randint(3, 70, (b, s)), jnp.int32)
    mask = jnp.asarray((np.arange(s)[None] < np.array([s, 4, 2])[:, None]).astype(np.int32))
    dec = jnp.asarray(r.randint(3, 70, (b, t)), jnp.int32)
    dec_mask = jnp.asarray((np.arange(t)[None] < np.array([t, 5, 3])[:, None]).astype(np.int32))
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_backbones_equal_under_both_attention_implementations(family):
    """Full forward, decoder with hidden / head-space slots and cross memory, and cached decoding."""
    cls, config = BACKBONES[family]()
    ids, mask, dec, dec_mask = _seq_batch()
    ref = cls(config, attention="explicit")
    params = ref.init(jax.random.key(0), ids, mask, dec, dec_mask)["params"]
    r = np.random.RandomState(1)
    layers, heads, head_dim = ref.num_decoder_layers, ref.num_decoder_heads, ref.decoder_head_dim
    slots = {
        "prefix_states": dict(
            prefix_states=jnp.asarray(r.randn(3, layers, 2, 16), jnp.float32),
            prefix_mask=jnp.asarray([[1, 1], [0, 1], [0, 0]]),
        ),
        "prefix_kv": dict(prefix_kv=jnp.asarray(r.randn(3, layers, 1, heads, head_dim), jnp.float32)),
    }
    memory = jnp.asarray(r.randn(3, 4, 16), jnp.float32)
    memory_mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])

    def outputs(impl):
        m = cls(config, attention=impl)
        out = {"full": m.apply({"params": params}, ids, mask, dec, dec_mask)}
        for name, kw in slots.items():
            out[name] = m.apply({"params": params}, dec, dec_mask, memory, memory_mask, method=m.decode, **kw)
        # cached decoding with head-space slots (the cache continues after the P slot positions)
        step = jax.jit(
            lambda c, tok: m.apply(
                {"params": params, "cache": c},
                tok,
                None,
                memory,
                memory_mask,
                decode=True,
                mutable=["cache"],
                method=m.decode,
                **slots["prefix_kv"],
            )
        )
        cache, steps = init_cache(m, 3, dec.shape[1]), []
        for i in range(dec.shape[1]):
            logits, state = step(cache, dec[:, i : i + 1])
            cache = state["cache"]
            steps.append(logits[:, 0])
        out["cached"] = jnp.stack(steps, 1)
        return out

    want, got = outputs("explicit"), outputs("dot_product")
    _tree_close(got, want, 2e-5)
    full_kv = cls(config, attention="explicit").apply(
        {"params": params}, dec, None, memory, memory_mask, method=ref.decode, **slots["prefix_kv"]
    )
    _assert_close(got["cached"], full_kv, rtol=2e-5)


# ---------------------------------------------------------------------------------- chunked NLL in the step
def _vae_problem(family, **module_kw):
    cls, config = BACKBONES[family]()
    vae = TextVAE(cls(config, **module_kw), latent_size=8, injection=("memory",), memory_style="hidden")
    ids, mask, dec, dec_mask = _seq_batch(seed=3)
    labels = jnp.asarray(np.random.RandomState(4).randint(3, 70, dec.shape), jnp.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": dec,
        "decoder_attention_mask": dec_mask,
        "labels": labels,
        "label_weights": dec_mask.astype(jnp.float32),
        "example_weight": jnp.asarray([1.0, 1.0, 0.0]),
    }  # a filler row
    params = vae.init({"params": jax.random.key(0)}, ids, mask, dec, sample=False)["params"]
    return vae, params, batch


def _step_fn(vae, batch, **step_kw):
    """The jitted value-and-gradient of the training objective (free bits, word dropout, backbone dropout)."""
    cfg = step_lib.StepConfig(kind="free_bits", free_bits=0.1, word_dropout=0.2, special_ids=(0, 1, 2), **step_kw)
    fn = jax.value_and_grad(step_lib.loss_and_metrics, has_aux=True)
    return jax.jit(
        lambda p: fn(
            p,
            batch,
            jax.random.key(1),
            jax.random.key(2),
            jnp.arange(3),
            model=vae,
            cfg=cfg,
            kl_weight=0.7,
            kl_target=0.0,
        )
    )


def _step_loss_and_grads(vae, params, batch, **step_kw):
    return _step_fn(vae, batch, **step_kw)(params)


_REFERENCE_STEPS = {}


def _reference_step(family):
    """(vae, params, batch, ((loss, aux), grads)) of the plain step: full logits, no remat (computed once)."""
    if family not in _REFERENCE_STEPS:
        vae, params, batch = _vae_problem(family)
        _REFERENCE_STEPS[family] = vae, params, batch, _step_loss_and_grads(vae, params, batch)
    return _REFERENCE_STEPS[family]


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_chunked_step_equals_full_logits_step(family):
    """Training objective with chunked NLL == with full logits: loss, every aux value, every gradient
    (dropout on, so both paths draw the same masks); tied and untied heads of both families."""
    vae, params, batch, ((loss_ref, aux_ref), grads_ref) = _reference_step(family)
    # V = 70: five chunks of 16, the last one shifted left to end at V (its first 10 columns ignored)
    (loss, aux), grads = _step_loss_and_grads(vae, params, batch, vocab_chunk_size=16)
    _assert_close(loss, loss_ref, rtol=1e-5)
    assert set(aux) == set(aux_ref)
    _tree_close(aux, aux_ref, 1e-5)
    _tree_close(grads, grads_ref, 1e-5)
    assert float(jnp.max(jnp.abs(_head_gradient(grads, family)))) > 0, "the head is trained through the chunks"


def _head_gradient(grads, family):
    backbone = grads["backbone"]
    if "untied" in family:
        return backbone["lm_head"]["kernel"]
    return backbone["model"]["shared"]["embedding"] if family == "bart" else backbone["shared"]["embedding"]


# ---------------------------------------------------------------------------------- rematerialisation
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_remat_gives_the_same_step_gradients(family):
    """model.remat: the same loss and gradients, and the program really checkpoints every encoder and decoder
    layer (an optimization barrier per layer; XLA:CPU removes them again, GPUs and TPUs keep them)."""
    vae, params, batch, ((loss_ref, _), grads_ref) = _reference_step(family)
    remat_vae, _, _ = _vae_problem(family, remat=True)
    fn = _step_fn(remat_vae, batch)
    (loss, _), grads = fn(params)
    _assert_close(loss, loss_ref, rtol=1e-5)
    _tree_close(grads, grads_ref, 1e-5)
    config = vae.backbone.config
    layers = (
        config.encoder_layers + config.decoder_layers
        if family == "bart"
        else config.num_layers + config.num_decoder_layers
    )
    assert fn.lower(params).as_text().count("optimization_barrier") == layers
    assert _step_fn(vae, batch).lower(params).as_text().count("optimization_barrier") == 0


# ---------------------------------------------------------------------------------- config fields
def test_fast_path_config_fields_default_and_validation():
    from flax_textvae import configuration, validation

    c = configuration.base_config()
    assert c.model.attention == attn_lib.DEFAULT_ATTENTION and c.model.remat is False
    assert c.loss.vocab_chunk_size == 0 and c.data.prefetch == 0
    assert step_lib.StepConfig().vocab_chunk_size == 0
    assert validation.config_problems(c, check_data=False) == []
    tree = c.to_dict()
    tree["model"].update(attention="flash", remat=1)
    tree["data"]["prefetch"] = -1
    tree["loss"]["vocab_chunk_size"] = 2.5
    problems = validation.config_problems(tree, check_data=False)
    for field in ("model.attention", "model.remat", "data.prefetch", "loss.vocab_chunk_size"):
        assert sum(p.startswith(field + "=") for p in problems) == 1, (field, problems)
    for field in ("model.attention", "model.remat", "data.prefetch", "loss.vocab_chunk_size"):  # older configs
        section, name = field.split(".")
        del tree[section][name]
    assert validation.config_problems(tree, check_data=False) == []


# ---------------------------------------------------------------------------------- compilation cache
def test_compile_cache_resolves_directories(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(None) == str(tmp_path / "xdg" / "flax_textvae" / "jax")
    assert compile_cache.resolve("auto") == compile_cache.resolve(None)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.resolve(None) == os.path.join(os.path.expanduser("~"), ".cache", "flax_textvae", "jax")
    for off in ("", "off", "OFF", "none"):
        assert compile_cache.resolve(off) is None
    assert compile_cache.resolve(str(tmp_path / "c")) == str(tmp_path / "c")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve(None) == str(tmp_path / "env")
    assert compile_cache.resolve(str(tmp_path / "c")) == str(tmp_path / "c"), "an explicit folder wins"
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve(None) is None


_CACHE_CHILD = """
import json, sys
import jax, jax.numpy as jnp
from flax_textvae import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0)(jnp.ones((4, 4))))
print(json.dumps({"folder": folder, "enabled": compile_cache.is_enabled(),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _cache_child(*args, env=None):
    out = subprocess.run(
        [sys.executable, "-c", _CACHE_CHILD, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compile_cache_is_written_then_hit_by_a_second_process(tmp_path):
    folder = tmp_path / "cache"
    first = _cache_child(str(folder))
    assert first["folder"] == str(folder) and first["enabled"]
    assert first["hits"] == 0 and first["misses"] >= 1
    entries = sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache"))
    assert any(name.startswith("jit__lambda") for name in entries), entries
    second = _cache_child(str(folder))
    assert second["hits"] >= 1 and second["misses"] == 0, second
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache")) == entries


def test_compile_cache_env_variable_and_off(tmp_path):
    folder = tmp_path / "from_env"
    via_env = _cache_child(env={compile_cache.ENV_VAR: str(folder)})
    assert via_env["folder"] == str(folder) and any(folder.iterdir())
    off_home = tmp_path / "home"
    off = _cache_child("off", env={"XDG_CACHE_HOME": str(off_home), "HOME": str(off_home)})
    assert off["folder"] is None and not off["enabled"] and off["hits"] == off["misses"] == 0
    assert not off_home.exists(), "'off' writes nothing"


_TRAIN_TWICE = """
import sys
import jax
sys.path.insert(0, sys.argv[1])
import tiny
from flax_textvae.configuration import with_overrides
from flax_textvae.train import train_and_evaluate
config = with_overrides(tiny.get_config(), **{"train_steps": 4, "phase1.steps": 2, "log_every": 2,
                        "eval_every": 0, "checkpoint_every": 4, "data.eval": "synthetic:16:1"})
for name in ("first", "second"):
    print("== " + name, flush=True)
    train_and_evaluate(config, sys.argv[2] + "/" + name)
    jax.clear_caches()  # the second run finds nothing in memory: only the folder can spare its compiles
"""


READY_LINE = re.compile(r"^  (compiled|loaded from the compilation cache) in [\d.]+ s$")


def test_a_repeated_run_says_its_steps_came_from_the_compilation_cache(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN_TWICE, os.path.join(REPO, "configs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, **{compile_cache.ENV_VAR: str(tmp_path / "cache")}),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    first, second = (part.splitlines() for part in out.stdout.split("== second"))

    def outcomes(lines):  # what each "compiling the phase-N step ..." line ended with (past its heartbeats)
        ends = [line.strip() for line in lines if line.startswith("compiling the phase-") or READY_LINE.match(line)]
        return [end for start, end in zip(ends, ends[1:]) if start.startswith("compiling the phase-")]

    compiled, loaded = outcomes(first), outcomes(second)
    assert len(compiled) >= 2 and all(line.startswith("compiled in ") for line in compiled), first
    assert len(loaded) == len(compiled), second
    assert all(line.startswith("loaded from the compilation cache in ") for line in loaded), second


# ---------------------------------------------------------------------------------- device suite
def test_device_suite_refuses_to_run_without_an_accelerator(tmp_path):
    out = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "device_suite.sh"), f"--out-dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 2
    assert "no accelerator" in out.stderr and "--smoke" in out.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before the check"


def test_device_suite_smoke_run_writes_json_with_figures(tmp_path):
    out = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "device_suite.sh"), "--smoke", f"--out-dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    env = files.pop("environment")
    assert env["smoke"] is True and env["backend"] == "cpu"
    expected = {
        "train_tiny_bfloat16_b8": ("real_tokens_per_s", "examples_per_s", "compile_s", "peak_memory_mb"),
        "train_tiny_float32_b8_fast": ("real_tokens_per_s", "examples_per_s", "compile_s", "xla_temp_mb_longest"),
        "torch_tiny-t5_b4": ("real_tokens_per_s", "examples_per_s", "peak_memory_mb"),
        "eval_tiny_k4": ("examples_per_s", "decoded_tokens_per_s", "first_pass_s"),
    }
    assert set(expected) | {"xent_tiny", "attn_tiny_float32"} == set(files), sorted(files)
    for name, keys in expected.items():
        for key in keys:
            assert files[name][key] > 0, (name, key, files[name].get(key))
    assert 0 <= files["train_tiny_bfloat16_b8"]["padding_fraction"] < 1
    assert (
        1 <= files["train_tiny_bfloat16_b8"]["num_shapes"] <= 4
    )  # a shape per bucket (the smoke run's few), never one per batch
    assert files["train_tiny_bfloat16_b8"]["dtype"] == "bfloat16"
    fast = files["train_tiny_float32_b8_fast"]
    assert (fast["attention"], fast["remat"], fast["vocab_chunk_size"]) == ("explicit", True, 64)
    assert files["train_tiny_bfloat16_b8"]["attention"] == attn_lib.DEFAULT_ATTENTION
    assert "| explicit, remat, vocab chunk 64 |" in out.stdout, out.stdout[-2000:]
    for path, row in files["xent_tiny"]["paths"].items():
        assert row["step_ms"] > 0 and row["temp_mb"] >= 0, path
    assert "| tiny | bfloat16 | 8 |" in out.stdout, out.stdout[-2000:]
    attn = files["attn_tiny_float32"]
    assert attn["implementations"] == ["explicit", "dot_product"]  # no cudnn without a GPU
    for program in ("layer", "model"):
        row = attn[program]["dot_product"]
        assert row["wall_ms"] > 0 and row["agrees_with_explicit"], (program, row)
        assert row["max_rel_diff_vs_explicit"] <= attn["tolerance"]
    assert "| layer | dot_product |" in out.stdout, out.stdout[-2000:]
