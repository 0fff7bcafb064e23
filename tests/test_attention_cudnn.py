"""model.attention='cudnn': the adapter around cuDNN's fused kernel, tested on CPU.

cuDNN itself runs only on a CUDA GPU (benchmarks/attention.py compares it there with the explicit path). What
runs here is everything of ours around it: the mask and bias folded into one bias of full shape, odd lengths
padded to even ones, the dtype rule, the fallbacks (decoding, drawn dropout) and the config checks. The
kernel is replaced by jax's XLA formulation of the same call, so the numbers must equal the explicit path's.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks

from flax_textvae import builders, configuration, models, validation
from flax_textvae import workdir as rundir
from flax_textvae.models import attention as attn_lib

_KERNEL = jax.nn.dot_product_attention


@pytest.fixture
def kernel_calls(monkeypatch):
    """Replaces the fused kernel by XLA's version of the same call; records what each call was given.

    A cuDNN call first goes through jax's own layout check of the fused kernel (ranks, dtypes, matching
    shapes, the bias's lengths), which needs no GPU.
    """
    calls = []

    def stand_in(query, key, value, bias=None, mask=None, *, scale=None, implementation=None, **kw):
        if implementation == "cudnn":
            # the exactness tests run in float32, which the kernel refuses: its checks see them as bfloat16
            half = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.dtype == jnp.float32 else x.dtype)
            layout = cudnn_checks.AttentionLayout.BTNH
            cudnn_checks.check_layout(*map(half, (query, key, value, bias)), *[None] * 6, layout)
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


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_cudnn_attention_in_half_precision_is_finite_and_close_to_float32(kernel_calls, dtype):
    """The masked value stays finite in the kernel's dtypes (the most negative one would overflow to -inf and
    a row of -inf is NaN); a fully masked row (row 0 of the queries) is finite too."""
    r = np.random.RandomState(3)
    q, k, v = (jnp.asarray(r.randn(2, 3, 2, 8), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.array([[False] * 3, [True, False, False], [True, True, False]])[None, None])
    bias = jnp.asarray(r.randn(1, 2, 3, 3) * 30 - 200, jnp.float32)
    out = attn_lib.cudnn_attention(q.astype(dtype), k, v, mask=mask, bias=bias, scale=0.35)
    assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out)))
    want = _reference(q, k, v, mask, bias, 0.35)
    np.testing.assert_allclose(np.asarray(out[:, 1:], np.float32), np.asarray(want[:, 1:]), atol=0.05)
    assert kernel_calls[0]["dtypes"] == {jnp.dtype(dtype)}


def _layer_inputs(q_len):
    """x [2, q_len, 16], key padding, one head-space slot for H=2 heads of Dh=8 (cuDNN's smallest head size)."""
    r = np.random.RandomState(1)
    key_mask = np.array([[1] * q_len, [1] * 3 + [0] * (q_len - 3)], np.int32)
    return (
        jnp.asarray(r.randn(2, q_len, 16), jnp.float32),
        attn_lib.padding_mask(key_mask),
        attn_lib.LatentSlots(kv=jnp.asarray(r.randn(2, 1, 2, 8), jnp.float32), mask=jnp.ones((2, 1), jnp.int32)),
    )


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_a_layer_with_cudnn_attention_equals_the_explicit_layer_in_bfloat16(kernel_calls, family):
    """A decoder self-attention layer (causal, key padding, one head-space slot: 1 + T keys, odd for even T)."""
    t5 = family == "t5"
    relative = attn_lib.RelativePositionBias(8, 16, bidirectional=False, init_std=1.0) if t5 else None
    make = lambda impl: attn_lib.MultiHeadAttention(
        num_heads=2,
        head_dim=8,
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
        num_heads=2, head_dim=8, out_features=16, dtype=jnp.bfloat16, attention="cudnn", dropout_rate=0.2
    )
    variables = m.init(jax.random.key(0), x, causal=True, decode=True)
    kernel_calls.clear()
    out, cache = m.apply(variables, x[:, :1], causal=True, decode=True, mutable=["cache"])
    assert [c["implementation"] for c in kernel_calls] == [None] and out[0].shape == (2, 1, 16)

    kernel_calls.clear()
    m.apply({"params": variables["params"]}, x, mask=mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert kernel_calls == []


def test_cudnn_attention_with_a_head_size_the_kernel_lacks_is_refused_with_the_fix():
    x, mask, _ = _layer_inputs(4)
    m = attn_lib.MultiHeadAttention(num_heads=4, head_dim=4, out_features=16, attention="cudnn", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"multiple of 8.*this model's is 4; use --config\.model\.attention="):
        m.init(jax.random.key(0), x, mask=mask)


def test_cudnn_attention_in_float32_is_refused_with_the_fix():
    x, mask, _ = _layer_inputs(4)
    m = attn_lib.MultiHeadAttention(num_heads=2, head_dim=8, out_features=16, attention="cudnn")
    with pytest.raises(ValueError, match=r"bfloat16 or float16, not float32.*--config\.model\.dtype=bfloat16"):
        m.init(jax.random.key(0), x, mask=mask)


def _device(platform, version, capability):
    return types.SimpleNamespace(
        platform=platform, client=types.SimpleNamespace(platform_version=version), compute_capability=capability
    )


def test_cudnn_is_available_on_cuda_gpus_from_compute_capability_8_only():
    assert attn_lib.cudnn_available(_device("gpu", "PJRT C API\ncuda 12080", "9.0"))
    assert attn_lib.cudnn_available(_device("gpu", "cuda 12040", "8.0"))
    assert not attn_lib.cudnn_available(_device("gpu", "cuda 12040", "7.5"))  # before Ampere
    assert not attn_lib.cudnn_available(_device("gpu", "rocm 60200", "gfx90a"))
    assert not attn_lib.cudnn_available(_device("tpu", "TFRT TPU v5", None))
    assert not attn_lib.cudnn_available()  # this machine's CPU


def test_resolve_attention_maps_cudnn_where_it_cannot_run_only():
    assert attn_lib.resolve_attention("cudnn") == "dot_product"  # here
    assert attn_lib.resolve_attention("cudnn", cudnn=False) == "dot_product"
    assert attn_lib.resolve_attention("cudnn", cudnn=True) == "cudnn"
    assert attn_lib.resolve_attention("explicit", cudnn=False) == "explicit"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attn_lib.resolve_attention("flash", cudnn=True)


def _cudnn_config():
    c = configuration.base_config()
    c.model.name_or_path = "scratch"
    c.model.attention = "cudnn"
    return c


def test_a_cudnn_config_needs_bfloat16_and_its_check_starts_no_backend(monkeypatch):
    """config_problems runs before a multi-host run's distributed initialisation: it must not touch devices."""

    def no_backend(*args, **kwargs):
        raise AssertionError("config_problems started jax's backend")

    monkeypatch.setattr(jax, "devices", no_backend)
    monkeypatch.setattr(jax, "default_backend", no_backend)
    monkeypatch.setattr(attn_lib, "cudnn_available", no_backend)
    c = _cudnn_config()
    (problem,) = validation.config_problems(c, check_data=False)
    assert "with model.dtype=float32:" in problem and "--config.model.dtype=bfloat16" in problem
    c.model.dtype = "bfloat16"
    assert validation.config_problems(c, check_data=False) == []


def test_training_with_cudnn_attention_off_a_cuda_gpu_is_a_config_error(monkeypatch, tmp_path):
    c = _cudnn_config()
    c.model.dtype = "bfloat16"
    assert validation.device_problems(c) == [
        "model.attention='cudnn': needs a CUDA GPU of compute capability 8.0 or newer, and this machine's device "
        "is 'cpu' (cpu); use --config.model.attention=dot_product (the default)"
    ]
    with pytest.raises(validation.ConfigError, match="needs a CUDA GPU"):
        validation.check_devices(c)
    c.model.attention = "dot_product"
    assert validation.device_problems(c) == []
    monkeypatch.setattr(attn_lib, "cudnn_available", lambda device=None: True)
    c.model.attention = "cudnn"
    assert validation.device_problems(c) == []


def test_a_resumed_run_may_switch_the_attention_implementation(tmp_path):
    """The fix the refusal names (dot_product) must be accepted by a resume of a run trained with cuDNN."""
    c = _cudnn_config()
    c.model.dtype = "bfloat16"
    c.data.train = "synthetic:64"
    rundir.record_start(c, str(tmp_path))
    c.model.attention, c.model.remat = "dot_product", True
    changes = rundir.resume_changes(c, str(tmp_path))
    assert {ch.field for ch in changes} == {"model.attention", "model.remat"}


def test_a_t5_backbone_that_draws_attention_dropout_says_cudnn_will_not_run_in_training():
    t5 = transformers.T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    bart = transformers.BartConfig(
        vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_dropout=0.0,
    )  # fmt: skip

    def run(hf, attention):
        backbone = models.build_module(hf, jnp.bfloat16, attention=attention)
        return types.SimpleNamespace(model=types.SimpleNamespace(backbone=backbone))

    note = builders.attention_note(run(t5, "cudnn"))
    assert note and "draws attention dropout (0.1)" in note and "explicit path" in note
    assert builders.attention_note(run(t5, "dot_product")) is None
    assert builders.attention_note(run(bart, "cudnn")) is None
