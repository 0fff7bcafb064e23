"""TextVAE: masked pooling, the batch-mixing bug (docs/method.md, defect 2) cannot happen, encode / decode alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from flax_textvae import models
from flax_textvae.vae import TextVAE, masked_pool

INJECTIONS = [("memory",), ("cross_attention",), ("embedding",), ("memory", "cross_attention", "embedding")]


def _backbone(family):
    if family == "bart":
        cfg = transformers.BartConfig(
            vocab_size=40,
            d_model=16,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        )
    else:
        cfg = transformers.T5Config(
            vocab_size=40,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    return models.build_module(cfg)


def _batch(b=4, s=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 40, size=(b, s)).astype(np.int32)
    lengths = rng.integers(2, s + 1, size=b)
    lengths[0] = s
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, ids, 1)
    return jnp.asarray(ids), jnp.asarray(mask)


def _init(vae, ids, mask):
    return vae.init({"params": jax.random.key(0)}, ids, mask, ids, sample=False)["params"]


def test_masked_pool_ignores_padding():
    h = jax.random.normal(jax.random.key(1), (3, 5, 4))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    garbage = jnp.where(mask[..., None] == 1, h, jnp.where(jnp.arange(5)[None, :, None] % 2 == 0, 1e6, -1e6))
    for kind in ("mean", "max", "first"):
        np.testing.assert_array_equal(masked_pool(h, mask, kind), masked_pool(garbage, mask, kind))
    np.testing.assert_allclose(masked_pool(h, mask, "mean")[0], h[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(masked_pool(h, mask, "max")[2], h[2, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        masked_pool(h, mask, "sum")


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_encoder_output_at_padding_does_not_change_posterior(pooling):
    """Changing padded input tokens (hence padded encoder states) leaves (mean, logvar) unchanged."""
    vae = TextVAE(backbone=_backbone("bart"), latent_size=4, pooling=pooling)
    ids, mask = _batch()
    params = _init(vae, ids, mask)
    other = jnp.where(mask == 1, ids, 17)
    a = vae.apply({"params": params}, ids, mask, method=TextVAE.encode)
    b = vae.apply({"params": params}, other, mask, method=TextVAE.encode)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("injection", INJECTIONS, ids=lambda x: "+".join(x))
def test_permuting_the_batch_permutes_outputs(family, injection):
    vae = TextVAE(backbone=_backbone(family), latent_size=4, injection=injection, num_memory_slots=2)
    ids, mask = _batch(b=5)
    params = _init(vae, ids, mask)
    eps = jax.random.normal(jax.random.key(3), (5, 4))
    perm = np.array([3, 0, 4, 1, 2])
    out = vae.apply({"params": params}, ids, mask, ids, mask, eps=eps)
    outp = vae.apply({"params": params}, ids[perm], mask[perm], ids[perm], mask[perm], eps=eps[perm])
    for k in ("logits", "mean", "logvar", "z"):
        np.testing.assert_allclose(out[k][perm], outp[k], atol=2e-5, err_msg=k)


@pytest.mark.parametrize("injection", INJECTIONS, ids=lambda x: "+".join(x))
def test_each_example_decodes_only_its_own_z(injection):
    """Changing z of one example changes that example's logits and no other's."""
    vae = TextVAE(backbone=_backbone("bart"), latent_size=4, injection=injection)
    ids, mask = _batch()
    params = _init(vae, ids, mask)
    z = jax.random.normal(jax.random.key(5), (4, 4))
    z2 = z.at[2].add(3.0)
    a = vae.apply({"params": params}, z, ids, mask, method=TextVAE.decode)
    b = vae.apply({"params": params}, z2, ids, mask, method=TextVAE.decode)
    diff = np.abs(np.asarray(a - b)).max(axis=(1, 2))
    assert diff[2] > 1e-4
    np.testing.assert_array_equal(np.delete(diff, 2), 0.0)


def test_deterministic_and_sampled_z():
    vae = TextVAE(backbone=_backbone("bart"), latent_size=4)
    ids, mask = _batch()
    params = _init(vae, ids, mask)
    det = vae.apply({"params": params}, ids, mask, ids, sample=False)
    np.testing.assert_array_equal(det["z"], det["mean"])
    s1 = vae.apply({"params": params}, ids, mask, ids, rngs={"latent": jax.random.key(1)})
    s2 = vae.apply({"params": params}, ids, mask, ids, rngs={"latent": jax.random.key(1)})
    np.testing.assert_array_equal(s1["z"], s2["z"])
    assert not np.allclose(s1["z"], det["z"])
    assert det["logits"].dtype == jnp.float32 and det["logits"].shape == (4, 7, 40)


def test_bad_settings_are_errors():
    ids, mask = _batch()
    with pytest.raises(ValueError, match="injection"):
        _init(TextVAE(backbone=_backbone("bart"), injection=("prefix",)), ids, mask)
    with pytest.raises(ValueError, match="pooling"):
        _init(TextVAE(backbone=_backbone("bart"), pooling="avg"), ids, mask)
