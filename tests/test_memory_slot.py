"""The 'head_kv' memory slot equals Hugging Face's decoder given a length-1 ``past_key_values``.

The slot is one vector per decoder layer in head space ([heads, d_kv]) used as both key and value, with no
encoder states: exactly what a PyTorch BART / T5 decoder computes when handed ``past_key_values=((m, m),
...)``. For T5 the slot is relative position 0 and the tokens 1..T; for BART the tokens' learned positions
start at 1. Checked on a right-padded batch, teacher-forced and with the KV cache, and through the VAE.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import inference, models
from flax_textvae.vae import TextVAE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_hf  # noqa: E402

torch = pytest.importorskip("torch")

FAMILIES = {
    "bart": lambda folder: helpers_hf.make_tiny_bart(folder),
    "t5": lambda folder: helpers_hf.make_tiny_t5(folder),
    "t5_v1_1": lambda folder: helpers_hf.make_tiny_t5(folder, v1_1=True),
}


def _hf_logits(model, family: str, ids: np.ndarray, mask: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """PyTorch decoder logits with the slot as a length-1 self-attention cache and no encoder states.

    Args:
      slot: ``[L, B, H, 1, Dh]`` key = value of each decoder layer.
    """
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, m in enumerate(torch.tensor(slot)):
        cache.update(m, m, layer)
    ids_t = torch.tensor(ids, dtype=torch.long)
    full_mask = torch.tensor(np.concatenate([np.ones((ids.shape[0], 1), np.int64), mask], axis=1))
    with torch.no_grad():
        if family == "bart":
            h = model.model.decoder(
                input_ids=ids_t, attention_mask=full_mask, past_key_values=cache, use_cache=True
            ).last_hidden_state
            logits = model.lm_head(h) + model.final_logits_bias
        else:
            h = model.decoder(
                input_ids=ids_t, attention_mask=full_mask, past_key_values=cache, use_cache=True
            ).last_hidden_state
            if model.config.scale_decoder_outputs:
                h = h * model.config.d_model**-0.5
            logits = model.lm_head(h)
    return logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    torch_model = FAMILIES[request.param](folder)
    family = "bart" if request.param == "bart" else "t5"
    return family, torch_model, models.load_pretrained(folder)


def _batch(pre, rng):
    lengths = [7, 4, 1]
    ids, mask = helpers_hf.padded_batch(rng, lengths, pre.module.vocab_size, pre.module.pad_token_id, max_len=8)
    m = pre.module
    slot = rng.normal(
        0.0, 1.0, (m.num_decoder_layers, len(lengths), m.num_decoder_heads, 1, m.decoder_head_dim)
    ).astype(np.float32)
    return ids, mask, slot


def test_head_kv_slot_matches_hugging_face_past_key_values(checkpoint):
    family, torch_model, pre = checkpoint
    ids, mask, slot = _batch(pre, np.random.default_rng(0))
    want = _hf_logits(torch_model, family, ids, mask, slot)
    prefix_kv = jnp.asarray(np.transpose(slot, (1, 0, 3, 2, 4)))  # -> [B, L, 1, H, Dh]
    got = pre.module.apply(
        {"params": pre.params},
        jnp.asarray(ids),
        jnp.asarray(mask),
        None,
        None,
        prefix_kv=prefix_kv,
        method=pre.module.decode,
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4, rtol=1e-4)
    # The slot matters: without it the logits differ.
    plain = pre.module.apply(
        {"params": pre.params}, jnp.asarray(ids), jnp.asarray(mask), None, None, method=pre.module.decode
    )
    assert np.abs(np.asarray(plain)[real] - want[real]).max() > 1e-2


def test_head_kv_slot_with_the_kv_cache_equals_the_full_pass(checkpoint):
    family, _, pre = checkpoint
    ids, _, slot = _batch(pre, np.random.default_rng(1))
    prefix_kv = jnp.asarray(np.transpose(slot, (1, 0, 3, 2, 4)))
    m = pre.module
    full = m.apply({"params": pre.params}, jnp.asarray(ids), None, None, None, prefix_kv=prefix_kv, method=m.decode)
    cache = models.init_cache(m, ids.shape[0], ids.shape[1])
    steps = []
    for t in range(ids.shape[1]):
        logits, mut = m.apply(
            {"params": pre.params, "cache": cache},
            jnp.asarray(ids[:, t : t + 1]),
            None,
            None,
            None,
            prefix_kv=prefix_kv,
            decode=True,
            mutable=["cache"],
            method=m.decode,
        )
        cache = mut["cache"]
        steps.append(np.asarray(logits)[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), atol=1e-4, rtol=1e-4)


def test_vae_head_kv_projects_z_without_bias_and_decodes_with_the_cache(checkpoint):
    family, _, pre = checkpoint
    vae = TextVAE(backbone=pre.module, latent_size=4, injection=("memory",), memory_style="head_kv")
    ids = jnp.asarray(np.random.default_rng(2).integers(4, pre.module.vocab_size, (3, 6)), jnp.int32)
    params = vae.init(jax.random.key(0), ids, jnp.ones_like(ids), ids, sample=False)["params"]
    assert set(params["to_memory"]) == {"kernel"}  # bias-free, as in the released recipe
    m = pre.module
    assert params["to_memory"]["kernel"].shape == (4, m.num_decoder_layers * m.num_decoder_heads * m.decoder_head_dim)
    params = dict(params, backbone=pre.params)
    z = jax.random.normal(jax.random.key(1), (3, 4))
    # Two latents differing in one row change only that row's logits: rows never mix.
    z2 = z.at[1].add(1.0)
    a = vae.apply({"params": params}, z, ids, method=TextVAE.decode)
    b = vae.apply({"params": params}, z2, ids, method=TextVAE.decode)
    diff = np.abs(np.asarray(a) - np.asarray(b)).max(axis=(1, 2))
    assert diff[1] > 1e-4 and diff[0] == 0 and diff[2] == 0
    start = m.decoder_start_token_id
    prompt = (start,)
    greedy = inference.decode_from_z(
        vae, params, z, prompt=prompt, eos_id=m.eos_token_id, pad_id=m.pad_token_id, max_length=5, method="greedy"
    )
    # Teacher-forcing the greedy output reproduces its argmax at every step (cache == full pass).
    seq = np.asarray(greedy)
    inputs = np.concatenate([np.full((3, 1), start), seq[:, :-1]], axis=1)
    logits = np.asarray(vae.apply({"params": params}, z, jnp.asarray(inputs, jnp.int32), method=TextVAE.decode))
    for row in range(3):
        for t in range(seq.shape[1]):
            if t > 0 and seq[row, t - 1] in (m.eos_token_id, m.pad_token_id):
                break
            assert logits[row, t].argmax() == seq[row, t]
