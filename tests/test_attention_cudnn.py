"""model.attention='cudnn': the adapter around cuDNN's fused kernel, tested on CPU.

cuDNN itself runs only on a CUDA GPU (benchmarks/attention.py compares it there with the explicit path). What
runs here is everything of ours around it: the mask and bias folded into one bias of full shape, odd lengths
padded to even ones, the dtype rule, the fallbacks (decoding, drawn dropout) and the config checks. The
kernel is replaced by jax's XLA formulation of the same call, so the numbers must equal the explicit path's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import configuration, validation
from flax_textvae.models import attention as attn_lib

_KERNEL = jax.nn.dot_product_attention


@pytest.fixture
def kernel_calls(monkeypatch):
    """Replaces the fused kernel by XLA's version of the same call; records what each call was given."""
    calls = []

    def stand_in(query, key, value, bias=None, mask=None, *, scale=None, implementation=None, **kw):
        calls.append(
            dict(
                implementation=implementation,
                query=query.shape,
                key=key.shape,
                dtypes={query.dtype, key.dtype, value.dtype} | ({bias.dtype} if bias is not None else set()),
                bias=None if bias is None else bias.shape,
                mask=mask,
            )
        )
        return _KERNEL(query, key, value, bias=bias, mask=mask, scale=scale, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    return calls


def _reference(query, key, value, mask, bias, scale):
    """softmax(q k^T * scale + bias, masked) v written out, float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * scale
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value)


@pytest.mark.parametrize("q_len,k_len", [(5, 7), (6, 8), (5, 8), (6, 7)])
def test_cudnn_attention_equals_the_written_out_attention_in_value_and_gradient(kernel_calls, q_len, k_len):
    """Odd and even lengths, key padding, a causal band and a float bias with gradients to all four inputs."""
    r = np.random.RandomState(0)
    b, h, d = 3, 2, 8
    q = jnp.asarray(r.randn(b, q_len, h, d), jnp.float32)
    k = jnp.asarray(r.randn(b, k_len, h, d), jnp.float32)
    v = jnp.asarray(r.randn(b, k_len, h, d), jnp.float32)
    bias = jnp.asarray(r.randn(1, h, q_len, k_len), jnp.float32)
    lengths = np.array([k_len, 3, 1])
    key_mask = (np.arange(k_len)[None] < lengths[:, None])[:, None, None, :]
    band = np.arange(k_len)[None, :] <= np.arange(q_len)[:, None] + (k_len - q_len)
    mask = jnp.asarray(key_mask & band[None, None])
    scale = 0.3
    weights = jnp.asarray(r.randn(b, q_len, h, d), jnp.float32)

    def ours(q, k, v, bias):
        return jnp.sum(attn_lib.cudnn_attention(q, k, v, mask=mask, bias=bias, scale=scale) * weights)

    def reference(q, k, v, bias):
        return jnp.sum(_reference(q, k, v, mask, bias, scale) * weights)

    ours = jax.value_and_grad(ours, argnums=(0, 1, 2, 3))(q, k, v, bias)
    want = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for got, ref in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))

    call = kernel_calls[0]
    assert call["implementation"] == "cudnn" and call["mask"] is None
    q_even, k_even = q_len + q_len % 2, k_len + k_len % 2
    assert call["query"][1] == q_even and call["key"][1] == k_even
    assert call["bias"][2:] == (q_even, k_even)  # full length on both axes, as the kernel checks
    assert call["dtypes"] == {jnp.dtype(jnp.float32)}


def test_cudnn_attention_bias_stays_finite_in_half_precision(kernel_calls):
    """A masked score plus a large bias must not overflow to -inf in bfloat16 / float16 (a row of -inf is NaN)."""
    q = jnp.ones((1, 2, 1, 8), jnp.float16)
    kv = jnp.ones((1, 2, 1, 8), jnp.float16)
    mask = jnp.asarray([[[[False, False], [True, False]]]])
    bias = jnp.full((1, 1, 2, 2), -6e4, jnp.float32)  # near float16's most negative value
    out = attn_lib.cudnn_attention(q, kv, kv, mask=mask, bias=bias, scale=1.0)
    assert out.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(out)))
    assert kernel_calls[0]["dtypes"] == {jnp.dtype(jnp.float16)}


def _layer_inputs(q_len):
    r = np.random.RandomState(1)
    key_mask = np.array([[1] * q_len, [1] * 3 + [0] * (q_len - 3)], np.int32)
    return (
        jnp.asarray(r.randn(2, q_len, 16), jnp.float32),
        attn_lib.padding_mask(key_mask),
        attn_lib.LatentSlots(kv=jnp.asarray(r.randn(2, 1, 4, 4), jnp.float32), mask=jnp.ones((2, 1), jnp.int32)),
    )


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_a_layer_with_cudnn_attention_equals_the_explicit_layer_in_bfloat16(kernel_calls, family):
    """A decoder self-attention layer (causal, key padding, one head-space slot: 1 + T keys, odd for even T)."""
    t5 = family == "t5"
    relative = attn_lib.RelativePositionBias(8, 16, bidirectional=False, init_std=1.0) if t5 else None
    make = lambda impl: attn_lib.MultiHeadAttention(
        num_heads=4,
        head_dim=4,
        out_features=16,
        use_bias=not t5,
        scale_query=not t5,
        relative_bias=relative,
        dtype=jnp.bfloat16,
        attention=impl,
    )
    x, mask, slots = _layer_inputs(6)
    params = make("explicit").init(jax.random.key(0), x, mask=mask, causal=True, slots=slots)["params"]

    def loss(impl, p, x):
        out, _ = make(impl).apply({"params": p}, x, mask=mask, causal=True, slots=slots)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    results = {
        impl: jax.value_and_grad(lambda p, x, i=impl: loss(i, p, x), argnums=(0, 1), has_aux=True)(params, x)
        for impl in ("explicit", "cudnn")
    }
    assert [c["implementation"] for c in kernel_calls] == ["cudnn"]
    assert kernel_calls[0]["key"][1] == 8  # 1 slot + 6 tokens, padded to even
    (_, out_ref), grads_ref = results["explicit"]
    (_, out), grads = results["cudnn"]
    assert out.dtype == jnp.bfloat16
    for got, ref in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((out_ref, grads_ref))):
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2 * scale
        )


def test_cudnn_attention_decodes_and_draws_dropout_on_the_other_paths(kernel_calls):
    """A cache (decoding) goes through XLA's dot_product; drawn attention dropout through the explicit path."""
    x, mask, _ = _layer_inputs(4)
    m = attn_lib.MultiHeadAttention(
        num_heads=4, head_dim=4, out_features=16, dtype=jnp.bfloat16, attention="cudnn", dropout_rate=0.2
    )
    variables = m.init(jax.random.key(0), x, causal=True, decode=True)
    kernel_calls.clear()
    out, cache = m.apply(variables, x[:, :1], causal=True, decode=True, mutable=["cache"])
    assert [c["implementation"] for c in kernel_calls] == [None] and out[0].shape == (2, 1, 16)

    kernel_calls.clear()
    m.apply({"params": variables["params"]}, x, mask=mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert kernel_calls == []


def test_cudnn_attention_in_float32_is_refused_with_the_fix():
    x, mask, _ = _layer_inputs(4)
    m = attn_lib.MultiHeadAttention(num_heads=4, head_dim=4, out_features=16, attention="cudnn")
    with pytest.raises(ValueError, match=r"bfloat16 or float16, not float32.*--config\.model\.dtype=bfloat16"):
        m.init(jax.random.key(0), x, mask=mask)


def test_resolve_attention_maps_cudnn_off_gpus_only():
    assert attn_lib.resolve_attention("cudnn", "cpu") == "dot_product"
    assert attn_lib.resolve_attention("cudnn", "tpu") == "dot_product"
    assert attn_lib.resolve_attention("cudnn", "gpu") == "cudnn"
    assert attn_lib.resolve_attention("explicit", "cpu") == "explicit"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attn_lib.resolve_attention("flash", "gpu")


def test_training_config_with_cudnn_attention_needs_a_gpu_and_bfloat16(monkeypatch):
    c = configuration.base_config()
    c.model.name_or_path = "scratch"
    c.model.attention = "cudnn"
    problems = validation.config_problems(c, check_data=False)
    assert problems == [
        "model.attention='cudnn': needs a CUDA GPU, and jax's backend here is 'cpu'; "
        "use --config.model.attention=dot_product (the default)"
    ]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    (problem,) = validation.config_problems(c, check_data=False)
    assert "with model.dtype=float32:" in problem and "--config.model.dtype=bfloat16" in problem
    c.model.dtype = "bfloat16"
    assert validation.config_problems(c, check_data=False) == []
