"""The backbones' 16-bit dropout: the keep rate and the expectation are those of nn.Dropout."""

import jax
import jax.numpy as jnp
import numpy as np

from flax_textvae.models.common import Dropout


def _apply(rate, x, key=0, deterministic=False):
    return Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": jax.random.key(key)})


def test_keep_fraction_and_scale():
    x = jnp.ones((64, 1001))  # odd size: the 16-bit halves are cut to the array's length
    for rate in (0.1, 0.3, 0.5):
        y = np.asarray(_apply(rate, x))
        kept = y != 0
        se = np.sqrt(rate * (1 - rate) / y.size)
        assert abs(kept.mean() - (1 - rate)) < 5 * se, (rate, kept.mean())
        np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-4)
        assert abs(y.mean() - 1.0) < 5 * se / (1 - rate)  # inverted dropout keeps the expectation


def test_deterministic_rate_zero_and_rate_one():
    x = jax.random.normal(jax.random.key(1), (3, 5))
    np.testing.assert_array_equal(_apply(0.3, x, deterministic=True), x)
    np.testing.assert_array_equal(_apply(0.0, x), x)
    np.testing.assert_array_equal(_apply(1.0, x), jnp.zeros_like(x))


def test_masks_depend_on_the_key_and_are_reproducible():
    x = jnp.ones((8, 128))
    a, b, c = _apply(0.5, x, 0), _apply(0.5, x, 0), _apply(0.5, x, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert _apply(0.5, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
