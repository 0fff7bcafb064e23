"""BART backbone: parity with HF PyTorch, cache decoding, injection hooks, the torch name table, bf16."""

import helpers_hf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flax_textvae.models import bart_weights, init_cache, init_params, load_pretrained

torch = pytest.importorskip("torch")

VARIANTS = {
    "base": {},
    "scaled": {"scale_embedding": True, "activation_function": "gelu_new"},
    "untied": {"tie_word_embeddings": False, "activation_function": "relu", "decoder_layers": 1},
}


@pytest.fixture(scope="session")
def tiny_barts(tmp_path_factory):
    """name -> (folder, torch model) for each variant."""
    out = {}
    for seed, (name, overrides) in enumerate(VARIANTS.items()):
        folder = tmp_path_factory.mktemp(f"bart_{name}")
        out[name] = (str(folder), helpers_hf.make_tiny_bart(folder, seed=seed, **overrides))
    return out


@pytest.fixture(scope="session")
def base(tiny_barts):
    folder, torch_model = tiny_barts["base"]
    return load_pretrained(folder), torch_model


_JITTED = {}


def _forward(pre, **kw):
    """Jitted full forward (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)."""
    key = (id(pre), tuple(sorted(kw)))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, *a: pre.module.apply({"params": p}, *a, **kw))
    return _JITTED[key]


def _decoder(pre, **kw):
    """Jitted decode(decoder_input_ids, decoder_attention_mask, memory, memory_mask, **kw)."""
    return jax.jit(lambda p, *a, **k: pre.module.apply({"params": p}, *a, method=pre.module.decode, **kw, **k))


def _batch(vocab, pad, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = helpers_hf.padded_batch(rng, [7, 3, 5], vocab, pad)
    dec, dmask = helpers_hf.padded_batch(rng, [4, 6, 2], vocab, pad)
    return ids, mask, dec, dmask


def _torch_logits(model, ids, mask, dec, dmask):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
            decoder_attention_mask=torch.from_numpy(dmask).long(),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_torch(tiny_barts, variant):
    folder, torch_model = tiny_barts[variant]
    pre = load_pretrained(folder)
    ids, mask, dec, dmask = _batch(pre.config.vocab_size, pre.config.pad_token_id)
    logits = _forward(pre)(pre.params, ids, mask, dec, dmask)
    assert logits.dtype == jnp.float32 and logits.shape == dec.shape + (pre.config.vocab_size,)
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(torch_model, ids, mask, dec, dmask), atol=1e-4, rtol=0)
    if variant != "base":
        return
    # encode == torch encoder states at real positions
    hidden = jax.jit(lambda p, i, m: pre.module.apply({"params": p}, i, m, method=pre.module.encode))(
        pre.params, ids, mask
    )
    with torch.no_grad():
        ref = torch_model.model.encoder(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden) * mask[..., None], ref * mask[..., None], atol=1e-4)


def test_parameter_layout_and_properties(tiny_barts, base):
    pre, _ = base
    flat = flatten_dict(pre.params)
    for path in [
        ("model", "shared", "embedding"),
        ("model", "encoder", "embed_positions", "embedding"),
        ("model", "encoder", "layers", "0", "self_attn", "q_proj", "kernel"),
        ("model", "encoder", "layernorm_embedding", "scale"),
        ("model", "decoder", "layers", "1", "encoder_attn", "out_proj", "bias"),
        ("model", "decoder", "layers", "1", "encoder_attn_layer_norm", "bias"),
        ("model", "decoder", "layers", "0", "fc1", "kernel"),
        ("final_logits_bias",),
    ]:
        assert path in flat, path
    assert flat[("final_logits_bias",)].shape == (1, pre.config.vocab_size)
    assert not any(k[0] == "lm_head" for k in flat)
    untied = load_pretrained(tiny_barts["untied"][0])
    assert untied.params["lm_head"]["kernel"].shape == (untied.config.d_model, untied.config.vocab_size)
    m = pre.module
    assert (m.d_model, m.num_decoder_layers, m.vocab_size) == (16, 2, 64)
    assert (m.pad_token_id, m.eos_token_id, m.decoder_start_token_id) == (1, 2, 2)
    # random init has exactly the pretrained tree
    fresh = jax.eval_shape(lambda key: init_params(m, key), jax.random.PRNGKey(0))  # no compile needed
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, pre.params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fresh))


def test_cached_greedy_decoding_equals_full_recompute(base):
    pre, _ = base
    module, params = pre.module, pre.params
    ids, mask, _, _ = _batch(pre.config.vocab_size, pre.config.pad_token_id)
    batch, steps, d = ids.shape[0], 5, module.d_model
    memory = module.apply({"params": params}, ids, mask, method=module.encode)
    rng = np.random.default_rng(1)
    prefix = jnp.asarray(rng.normal(size=(batch, module.num_decoder_layers, 2, d)), jnp.float32)
    offset = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
    kw = dict(prefix_states=prefix, embed_offset=offset)

    @jax.jit
    def step(cache, tok):
        logits, state = module.apply(
            {"params": params, "cache": cache},
            tok,
            None,
            memory,
            mask,
            decode=True,
            mutable=["cache"],
            method=module.decode,
            **kw,
        )
        return logits[:, -1], state["cache"]

    cache = init_cache(module, batch, steps)
    tokens = np.full((batch, 1), module.decoder_start_token_id, np.int32)
    cached_logits = []
    for _ in range(steps):
        logits, cache = step(cache, jnp.asarray(tokens[:, -1:]))
        cached_logits.append(np.asarray(logits))
        tokens = np.concatenate([tokens, np.asarray(jnp.argmax(logits, -1))[:, None].astype(np.int32)], 1)
    # full recomputation: position t only sees tokens <= t, so one fixed-width buffer serves every step
    full_decode = _decoder(pre, **kw)
    full = full_decode(params, jnp.asarray(tokens[:, :-1]), None, memory, mask)
    np.testing.assert_allclose(np.asarray(full), np.stack(cached_logits, 1), atol=1e-5)
    greedy = np.full((batch, steps), module.pad_token_id, np.int32)
    greedy[:, 0] = module.decoder_start_token_id
    for t in range(steps):
        out = np.asarray(full_decode(params, jnp.asarray(greedy), None, memory, mask))
        nxt = np.argmax(out[:, t], -1)
        if t + 1 < steps:
            greedy[:, t + 1] = nxt
    np.testing.assert_array_equal(np.concatenate([greedy, nxt[:, None]], 1), tokens)
    assert int(cache["model"]["decoder"]["cache_index"]) == steps


def _only_row_changes(a, b, row):
    diff = np.abs(np.asarray(a) - np.asarray(b)).reshape(a.shape[0], -1).max(-1)
    assert diff[row] > 1e-4, diff
    assert np.all(np.delete(diff, row) == 0.0), diff


def test_injection_hooks_are_per_example(base):
    pre, _ = base
    module, params = pre.module, pre.params
    _, _, dec, dmask = _batch(pre.config.vocab_size, pre.config.pad_token_id)
    rng = np.random.default_rng(2)
    batch, d, layers = dec.shape[0], module.d_model, module.num_decoder_layers
    memory = rng.normal(size=(batch, 3, d)).astype(np.float32)
    memory_mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]], np.int32)
    prefix = rng.normal(size=(batch, layers, 2, d)).astype(np.float32)
    offset = rng.normal(size=(batch, d)).astype(np.float32)

    decode = _decoder(pre)

    def run(memory=memory, prefix=prefix, offset=offset):
        return decode(params, dec, dmask, memory, memory_mask, prefix_states=prefix, embed_offset=offset)

    ref = run()
    for name, arr in (("memory", memory), ("prefix", prefix), ("offset", offset)):
        changed = arr.copy()
        changed[1] += rng.normal(size=arr.shape[1:])  # not a constant: layernorm_embedding removes those
        _only_row_changes(ref, run(**{name: changed}), row=1)
    # prefix_mask 0 for example 0 == no prefix at all for example 0
    no_prefix = decode(params, dec, dmask, memory, memory_mask, embed_offset=offset)
    p_mask = np.array([[0, 0], [1, 1], [1, 0]], np.int32)
    masked_prefix = decode(
        params, dec, dmask, memory, memory_mask, prefix_states=prefix, prefix_mask=p_mask, embed_offset=offset
    )
    np.testing.assert_allclose(np.asarray(masked_prefix[0]), np.asarray(no_prefix[0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(masked_prefix[1]), np.asarray(ref[1]))
    # [B, T, D] offset equal to the broadcast [B, D] one gives the same logits
    per_token = np.broadcast_to(offset[:, None], dec.shape + (d,))
    np.testing.assert_allclose(np.asarray(run(offset=per_token)), np.asarray(ref), atol=1e-6)
    # masked memory slots have no effect; memory None skips cross-attention (and differs)
    masked = memory.copy()
    masked[2, 1:] += 5.0
    np.testing.assert_array_equal(np.asarray(run(memory=masked)), np.asarray(ref))
    no_memory = decode(params, dec, dmask, None, None)
    assert np.all(np.isfinite(np.asarray(no_memory)))
    assert np.abs(np.asarray(no_memory) - np.asarray(ref)).max() > 1e-3


def test_dropout_needs_rng_and_changes_logits(tiny_barts):
    pre = load_pretrained(tiny_barts["untied"][0])  # the smallest variant: dropout compiles slowly on CPU
    ids, mask, dec, dmask = _batch(pre.config.vocab_size, pre.config.pad_token_id)
    train = jax.jit(
        lambda p, rng: pre.module.apply(
            {"params": p}, ids, mask, dec, dmask, deterministic=False, rngs={"dropout": rng}
        )
    )
    a = train(pre.params, jax.random.key(0, impl="rbg"))
    b = train(pre.params, jax.random.key(1, impl="rbg"))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(
            lambda p: pre.module.apply({"params": p}, ids, mask, dec, dmask, deterministic=False), pre.params
        )


def _state_dict(torch_model):
    return {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


def test_tied_layouts_both_load(base):
    pre, torch_model = base
    sd = _state_dict(torch_model)
    shared = sd["model.shared.weight"]
    once = {k: v for k, v in sd.items() if not k.endswith("embed_tokens.weight") and k != "lm_head.weight"}
    dup = dict(
        once,
        **{
            "model.encoder.embed_tokens.weight": shared,
            "model.decoder.embed_tokens.weight": shared,
            "lm_head.weight": shared,
        },
    )
    alias_only = {k: v for k, v in dup.items() if k != "model.shared.weight"}
    ref = flatten_dict(pre.params)
    for layout in (once, dup, alias_only):
        got = flatten_dict(bart_weights.params_from_torch(layout, pre.config))
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]))


def test_mapping_errors_list_every_bad_key(base):
    pre, torch_model = base
    sd = _state_dict(torch_model)
    del sd["model.decoder.layers.1.fc2.bias"]
    del sd["final_logits_bias"]  # an LM's state dict must have it
    sd["model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
    sd["model.encoder.some_extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError) as err:
        bart_weights.params_from_torch(sd, pre.config)
    msg = str(err.value)
    for name in (
        "model.decoder.layers.1.fc2.bias",
        "final_logits_bias",
        "model.encoder.some_extra.weight",
        "model.encoder.layers.0.self_attn.q_proj.weight",
        "missing",
        "unexpected",
        "shape mismatch",
    ):
        assert name in msg, msg

    # A bare BartModel's names (no `model.`, no final_logits_bias) are read as the LM's, the bias at zeros;
    # a state dict with both kinds of names is not: its bare names are unexpected, not silently used.
    sd = _state_dict(torch_model)
    bare = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    params = bart_weights.params_from_torch(bare, pre.config)
    assert not np.any(np.asarray(params["final_logits_bias"]))
    np.testing.assert_array_equal(params["model"]["shared"]["embedding"], sd["model.shared.weight"])
    with pytest.raises(ValueError, match=r"unexpected \(1\):\n    shared.weight"):
        bart_weights.params_from_torch({**sd, "shared.weight": np.ones_like(sd["model.shared.weight"])}, pre.config)


def test_bfloat16_compute_close_to_float32(tiny_barts, base):
    pre, _ = base
    pre16 = load_pretrained(tiny_barts["base"][0], dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pre16.params))
    ids, mask, dec, dmask = _batch(pre.config.vocab_size, pre.config.pad_token_id)
    l32 = np.asarray(_forward(pre)(pre.params, ids, mask, dec, dmask))
    l16 = _forward(pre16)(pre16.params, ids, mask, dec, dmask)
    hidden = jax.eval_shape(
        lambda p: pre16.module.apply({"params": p}, ids, mask, method=pre16.module.encode), pre16.params
    )
    assert l16.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    assert np.abs(np.asarray(l16) - l32).max() < 0.05 * np.abs(l32).max() + 0.05
