"""Accelerator-oriented fast paths, tested on CPU: chunked cross-entropy, compilation cache, device suite."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import compile_cache, losses

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
        return losses.chunked_token_nll(h, w, targets, weights, bias=b, scale=scale, head_layout=layout,
                                        chunk_size=chunk)

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
    logits = jnp.einsum("btd,vd->btv", hidden, embedding.astype(jnp.bfloat16),
                        preferred_element_type=jnp.float32) + bias
    _assert_close(got, losses.token_nll(logits, targets, weights), rtol=1e-4)
    g = jax.grad(lambda h, w: jnp.sum(losses.chunked_token_nll(h, w, targets, weights, chunk_size=128)),
                 argnums=(0, 1))(hidden, embedding)
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
    out = subprocess.run([sys.executable, "-c", _CACHE_CHILD, *args], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=dict(os.environ, **(env or {})))
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


# ---------------------------------------------------------------------------------- device suite
def test_device_suite_refuses_to_run_without_an_accelerator(tmp_path):
    out = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "device_suite.sh"), f"--out-dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2
    assert "no accelerator" in out.stderr and "--smoke" in out.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before the check"


def test_device_suite_smoke_run_writes_json_with_figures(tmp_path):
    out = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "device_suite.sh"), "--smoke",
                          f"--out-dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    env = files.pop("environment")
    assert env["smoke"] is True and env["backend"] == "cpu"
    expected = {
        "train_tiny_bfloat16_b8": ("real_tokens_per_s", "examples_per_s", "compile_s", "peak_memory_mb"),
        "torch_tiny-t5_b4": ("real_tokens_per_s", "examples_per_s", "peak_memory_mb"),
        "eval_tiny_k4": ("examples_per_s", "decoded_tokens_per_s", "first_pass_s"),
    }
    assert set(expected) | {"xent_tiny"} == set(files), sorted(files)
    for name, keys in expected.items():
        for key in keys:
            assert files[name][key] > 0, (name, key, files[name].get(key))
    assert 0 <= files["train_tiny_bfloat16_b8"]["padding_fraction"] < 1
    assert files["train_tiny_bfloat16_b8"]["dtype"] == "bfloat16"
    for path, row in files["xent_tiny"]["paths"].items():
        assert row["step_ms"] > 0 and row["temp_mb"] >= 0, path
    assert "| tiny | bfloat16 | 8 |" in out.stdout, out.stdout[-2000:]
