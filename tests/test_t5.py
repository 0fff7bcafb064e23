"""T5 backbone: parameter mapping, parity with PyTorch, cache decoding, per-example injection, bf16."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax.traverse_util import flatten_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from flax_textvae.models import t5, t5_weights  # noqa: E402
from flax_textvae.models.common import init_cache  # noqa: E402
from tests.helpers_hf import make_tiny_t5, padded_batch  # noqa: E402

ENC_LENGTHS, DEC_LENGTHS = (20, 7, 3), (11, 5, 8)  # 20 > max_distance 16: far buckets too


class Tiny:
    """A saved tiny checkpoint with its torch reference, config, Flax module and mapped params."""

    def __init__(self, folder, torch_model):
        self.folder, self.torch_model = str(folder), torch_model
        self.config = transformers.T5Config.from_pretrained(self.folder)
        self.state = load_file(os.path.join(self.folder, "model.safetensors"))
        self.module = t5.T5ForConditionalGeneration(self.config)
        self.params = t5_weights.params_from_torch(self.state, self.config)


@pytest.fixture(scope="session")
def tiny_v10(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_v10")
    return Tiny(folder, make_tiny_t5(folder, seed=1))


@pytest.fixture(scope="session")
def tiny_v11(tmp_path_factory):
    """v1.1 (gated-gelu) with a genuinely separate lm_head, as google/t5-v1_1-* checkpoints have.

    transformers 5 always ties T5 heads on save, so a distinct lm_head.weight is written into the file and
    the config flag restored; the torch reference is reloaded from that folder (it then unties the head).
    """
    folder = tmp_path_factory.mktemp("t5_v11")
    make_tiny_t5(folder, v1_1=True, seed=2)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = np.random.default_rng(0).normal(size=state["shared.weight"].shape).astype(np.float32)
        save_file(state, path, metadata={"format": "pt"})
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tie_word_embeddings"] = False
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
    return Tiny(folder, model)


@pytest.fixture(params=["v10", "v11"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = padded_batch(rng, ENC_LENGTHS, config.vocab_size, pad_id=0, low=3)
    dec, dec_mask = padded_batch(rng, DEC_LENGTHS, config.vocab_size, pad_id=0, low=3)
    dec[:, 0] = config.decoder_start_token_id
    return ids, mask, dec, dec_mask


def _torch_logits(model, ids, mask, dec, dec_mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
            decoder_attention_mask=torch.tensor(dec_mask),
        )
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


def _run(module, variables, *args, **kwargs):
    """module.apply, eagerly (one-off calls: op-by-op dispatch is cached across tests, jit is not)."""
    return module.apply(variables, *args, **kwargs)


def _shapes(tree):
    return {k: tuple(v.shape) for k, v in flatten_dict(tree, sep="/").items()}


# ------------------------------------------------------------------------------------------- mapping
def test_bucket_table_matches_torch():
    rel = np.arange(-300, 300)
    for buckets, dist in ((8, 16), (32, 128), (16, 40)):
        for bidirectional in (True, False):
            want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets, max_distance=dist
            ).numpy()
            got = np.asarray(t5.relative_position_bucket(jnp.asarray(rel), bidirectional, buckets, dist))
            np.testing.assert_array_equal(got, want)


def test_param_tree_is_hf_flax_layout(tiny):
    args = [jnp.asarray(x) for x in _batch(tiny.config)]
    init = jax.eval_shape(lambda: tiny.module.init(jax.random.PRNGKey(0), *args))["params"]
    assert _shapes(tiny.params) == _shapes(init)
    names = set(_shapes(tiny.params))
    assert "encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding" in names
    assert "encoder/block/1/layer/0/SelfAttention/relative_attention_bias/embedding" not in names
    assert "decoder/block/1/layer/1/EncDecAttention/q/kernel" in names
    assert "encoder/final_layer_norm/weight" in names and "shared/embedding" in names
    gated = tiny.config.feed_forward_proj == "gated-gelu"
    assert ("decoder/block/0/layer/2/DenseReluDense/wi_0/kernel" in names) == gated
    assert ("encoder/block/0/layer/1/DenseReluDense/wi/kernel" in names) == (not gated)
    assert ("lm_head/kernel" in names) == gated
    np.testing.assert_array_equal(
        tiny.params["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["kernel"],
        tiny.state["encoder.block.0.layer.0.SelfAttention.q.weight"].T,
    )


def test_mapping_accepts_duplicated_tied_keys(tiny_v10):
    state = dict(tiny_v10.state)
    shared = state.pop("shared.weight")
    state.update(
        {"encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared, "lm_head.weight": shared}
    )
    params = t5_weights.params_from_torch(state, tiny_v10.config)
    assert _shapes(params) == _shapes(tiny_v10.params) and "lm_head" not in params
    np.testing.assert_array_equal(params["shared"]["embedding"], shared)


def test_separate_head_copied_when_transformers5_saved_it_tied(tiny_v11):
    state = {k: v for k, v in tiny_v11.state.items() if k != "lm_head.weight"}
    params = t5_weights.params_from_torch(state, tiny_v11.config)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], state["shared.weight"].T)


def test_mapping_errors_list_every_bad_key(tiny_v10):
    state = dict(tiny_v10.state)
    del state["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    del state["encoder.final_layer_norm.weight"]
    state["encoder.block.0.layer.0.SelfAttention.k.weight"] = np.zeros((3, 3), np.float32)
    state["decoder.extra.weight"] = np.zeros(2, np.float32)
    state["lm_head.weight"] = state["shared.weight"] + 1.0  # tied config, different head
    with pytest.raises(ValueError) as err:
        t5_weights.params_from_torch(state, tiny_v10.config)
    msg = str(err.value)
    for key in (
        "decoder.block.1.layer.2.DenseReluDense.wo.weight",
        "encoder.final_layer_norm.weight",
        "encoder.block.0.layer.0.SelfAttention.k.weight",
        "decoder.extra.weight",
        "lm_head.weight",
    ):
        assert key in msg


# ------------------------------------------------------------------------------------------- parity
def test_logits_match_torch(tiny):
    ids, mask, dec, dec_mask = _batch(tiny.config)
    want, want_enc = _torch_logits(tiny.torch_model, ids, mask, dec, dec_mask)
    got = _run(tiny.module, {"params": tiny.params}, ids, mask, dec, dec_mask)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    enc = _run(tiny.module, {"params": tiny.params}, ids, mask, method=tiny.module.encode)
    np.testing.assert_allclose(np.asarray(enc), want_enc, atol=1e-5, rtol=0)


def test_load_pretrained_matches_torch(tiny):
    from flax_textvae.models import load_pretrained

    loaded = load_pretrained(tiny.folder)
    assert isinstance(loaded.module, t5.T5ForConditionalGeneration)
    ids, mask, dec, dec_mask = _batch(tiny.config, seed=3)
    want, _ = _torch_logits(tiny.torch_model, ids, mask, dec, dec_mask)
    got = _run(
        loaded.module,
        {"params": loaded.params},
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=dec,
        decoder_attention_mask=dec_mask,
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_properties(tiny_v10):
    m = tiny_v10.module
    assert (m.d_model, m.num_decoder_layers, m.vocab_size) == (16, 2, tiny_v10.config.vocab_size)
    assert (m.pad_token_id, m.eos_token_id, m.decoder_start_token_id) == (0, 1, 0)


# ------------------------------------------------------------------------------- decoding / injection
def _inputs(tiny, seed=0):
    ids, mask, _, _ = _batch(tiny.config)
    memory = _run(tiny.module, {"params": tiny.params}, ids, mask, method=tiny.module.encode)
    rng = np.random.default_rng(seed)
    b, d, layers = len(ENC_LENGTHS), tiny.config.d_model, tiny.config.num_decoder_layers
    prefix = jnp.asarray(rng.normal(size=(b, layers, 2, d)), jnp.float32)
    offset = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    return memory, jnp.asarray(mask), prefix, offset


def test_cached_greedy_decoding_equals_full_recompute(tiny):
    m, p = tiny.module, tiny.params
    memory, mem_mask, prefix, offset = _inputs(tiny)
    b, steps = memory.shape[0], 9
    kw = dict(prefix_states=prefix, prefix_mask=jnp.array([[1, 1], [1, 0], [0, 0]]), embed_offset=offset)
    cache_mask = jnp.ones((b, steps), jnp.int32)  # decode=True: key mask over the cache slots
    step = jax.jit(
        lambda c, tok: m.apply(
            {"params": p, "cache": c},
            tok,
            cache_mask,
            memory,
            mem_mask,
            decode=True,
            mutable=["cache"],
            method=m.decode,
            **kw,
        )
    )
    cache = init_cache(m, b, steps)
    toks, cached = jnp.full((b, 1), m.decoder_start_token_id, jnp.int32), []
    for _ in range(steps):
        logits, cache = step(cache, toks[:, -1:])
        cache = cache["cache"]
        cached.append(logits[:, 0])
        toks = jnp.concatenate([toks, jnp.argmax(logits, -1).astype(jnp.int32)], axis=1)
    # causal: full-sequence logits at position i are those of the prefix toks[:, :i + 1]
    full = _run(m, {"params": p}, toks[:, :-1], None, memory, mem_mask, method=m.decode, **kw)
    np.testing.assert_allclose(np.asarray(jnp.stack(cached, 1)), np.asarray(full), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full, -1)), np.asarray(toks[:, 1:]))


def test_changing_one_example_changes_only_its_logits(tiny_v10):
    m, p = tiny_v10.module, tiny_v10.params
    memory, mem_mask, prefix, offset = _inputs(tiny_v10)
    _, _, dec, dec_mask = _batch(tiny_v10.config)

    def run(mem, pre, off):
        return np.asarray(
            _run(m, {"params": p}, dec, dec_mask, mem, mem_mask, prefix_states=pre, embed_offset=off, method=m.decode)
        )

    base = run(memory, prefix, offset)
    variants = [
        (memory.at[1].add(1.0), prefix, offset),
        (memory, prefix.at[1].add(1.0), offset),
        (memory, prefix, offset.at[1].add(1.0)),
    ]
    for args in variants:
        out = run(*args)
        np.testing.assert_array_equal(out[[0, 2]], base[[0, 2]])
        assert np.abs(out[1] - base[1]).max() > 1e-4
    # [B, T, D] offsets and decoding without any cross-attention memory also work per example
    no_mem = np.asarray(
        _run(
            m,
            {"params": p},
            dec,
            dec_mask,
            None,
            None,
            prefix_states=prefix,
            embed_offset=jnp.broadcast_to(offset[:, None], dec.shape + (16,)),
            method=m.decode,
        )
    )
    assert np.isfinite(no_mem).all() and np.abs(no_mem - base).max() > 1e-4


def test_fully_masked_prefix_equals_no_prefix(tiny_v11):
    m, p = tiny_v11.module, tiny_v11.params
    memory, mem_mask, prefix, _ = _inputs(tiny_v11)
    _, _, dec, dec_mask = _batch(tiny_v11.config)
    plain = _run(m, {"params": p}, dec, dec_mask, memory, mem_mask, method=m.decode)
    masked = _run(
        m,
        {"params": p},
        dec,
        dec_mask,
        memory,
        mem_mask,
        prefix_states=prefix,
        prefix_mask=jnp.zeros((3, 2), jnp.int32),
        method=m.decode,
    )
    np.testing.assert_allclose(np.asarray(masked), np.asarray(plain), atol=2e-5)


# ---------------------------------------------------------------------------------- dropout / bf16
def test_dropout_only_when_not_deterministic(tiny_v10):
    m, p = tiny_v10.module, tiny_v10.params
    ids, mask, dec, dec_mask = _batch(tiny_v10.config)
    train = jax.jit(
        lambda rng: m.apply({"params": p}, ids, mask, dec, dec_mask, deterministic=False, rngs={"dropout": rng})
    )
    a = train(jax.random.key(1, impl="rbg"))  # rbg: much faster to compile than threefry on CPU
    b = _run(m, {"params": p}, ids, mask, dec, dec_mask)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_bfloat16_close_to_float32(tiny):
    ids, mask, dec, dec_mask = _batch(tiny.config)
    ref = _run(tiny.module, {"params": tiny.params}, ids, mask, dec, dec_mask)
    m16 = t5.T5ForConditionalGeneration(tiny.config, dtype=jnp.bfloat16)
    got = _run(m16, {"params": tiny.params}, ids, mask, dec, dec_mask)
    assert got.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(got - ref).max()) < 0.05 * scale + 0.05
    enc = _run(m16, {"params": tiny.params}, ids, mask, method=m16.encode)
    assert enc.dtype == jnp.bfloat16


def test_bfloat16_cached_step(tiny_v11):
    """A cached bf16 step with prefix slots and offsets equals the first position of the full bf16 pass."""
    m16 = t5.T5ForConditionalGeneration(tiny_v11.config, dtype=jnp.bfloat16)
    memory, mem_mask, prefix, offset = _inputs(tiny_v11)
    dec = _batch(tiny_v11.config)[2]
    kw = dict(prefix_states=prefix, embed_offset=offset)
    step, _ = _run(
        m16,
        {"params": tiny_v11.params, "cache": init_cache(m16, 3, 4)},
        dec[:, :1],
        None,
        memory,
        mem_mask,
        decode=True,
        mutable=["cache"],
        method=m16.decode,
        **kw,
    )
    full = _run(m16, {"params": tiny_v11.params}, dec[:, :4], None, memory, mem_mask, method=m16.decode, **kw)
    assert step.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, 0]), atol=0.05)
