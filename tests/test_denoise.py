"""Tests for flax_textvae.denoise: invariants of deletion / masking / word dropout and their mean rates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import denoise
from flax_textvae.data import synthetic_sentences

BOS, PAD, EOS, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL = (BOS, PAD, EOS)


def _batch(batch=64, length=16, seed=0):
    """Right-padded BART-style rows: BOS, distinct content tokens (>= 10), EOS, PAD...; lengths vary."""
    r = np.random.RandomState(seed)
    ids = np.full((batch, length), PAD, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for b in range(batch):
        n = r.randint(0, length - 1)  # content tokens; row length n + 2 <= length
        row = [BOS] + list(r.permutation(np.arange(10, 100))[:n]) + [EOS]
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return ids, mask


def _is_subsequence(sub, seq):
    it = iter(seq)
    return all(x in it for x in sub)


delete = jax.jit(denoise.delete_tokens, static_argnames=("special_ids", "pad_id"))
mask_fn = jax.jit(denoise.mask_tokens, static_argnames=("special_ids", "mask_id"))
dropout = jax.jit(denoise.word_dropout, static_argnames=("special_ids", "unk_id"))


@pytest.mark.parametrize("max_rate", [0.3, 1.0])
def test_delete_tokens_invariants(max_rate):
    ids, mask = _batch()
    new_ids, new_mask = delete(jax.random.PRNGKey(1), ids, mask, max_rate, special_ids=SPECIAL, pad_id=PAD)
    new_ids, new_mask = np.asarray(new_ids), np.asarray(new_mask)
    assert new_ids.shape == ids.shape and new_mask.shape == mask.shape
    assert new_ids.dtype == ids.dtype and new_mask.dtype == mask.dtype
    np.testing.assert_array_equal(new_mask, (new_ids != PAD).astype(np.int32))  # ids and mask consistent
    deleted_any = False
    for b in range(ids.shape[0]):
        n = int(new_mask[b].sum())
        assert np.all(new_mask[b, :n] == 1) and np.all(new_mask[b, n:] == 0)  # still right-padded
        old = ids[b][mask[b] == 1]
        new = new_ids[b, :n]
        assert new[0] == BOS and new[-1] == EOS  # specials kept
        assert _is_subsequence(list(new), list(old))  # survivors in their original order
        deleted_any |= n < len(old)
    assert deleted_any


def test_delete_tokens_zero_rate_is_identity_and_normalises_padding():
    ids, mask = _batch(batch=8)
    dirty = ids.copy()
    dirty[mask == 0] = 77  # junk under mask 0 becomes pad_id
    new_ids, new_mask = delete(jax.random.PRNGKey(0), dirty, mask, 0.0, special_ids=SPECIAL, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(new_ids), ids)
    np.testing.assert_array_equal(np.asarray(new_mask), mask)


def _content(ids, mask):
    return (mask == 1) & ~np.isin(ids, SPECIAL)


def test_delete_tokens_mean_rate_is_half_max_rate():
    ids, mask = _batch(batch=2000, length=24, seed=3)
    max_rate = 0.4
    _, new_mask = delete(jax.random.PRNGKey(7), ids, mask, max_rate, special_ids=SPECIAL, pad_id=PAD)
    before = _content(ids, mask).sum()
    after = np.asarray(new_mask).sum() - 2 * ids.shape[0]  # BOS and EOS always survive
    rate = 1.0 - after / before
    assert abs(rate - max_rate / 2) < 0.015, rate  # ~4 standard errors


def test_delete_tokens_rate_varies_per_example():
    ids = np.tile(np.concatenate([[BOS], np.arange(10, 108), [EOS]]).astype(np.int32), (400, 1))
    mask = np.ones_like(ids)
    _, new_mask = delete(jax.random.PRNGKey(2), ids, mask, 0.6, special_ids=SPECIAL, pad_id=PAD)
    per_row = 1.0 - (np.asarray(new_mask).sum(1) - 2) / 98.0
    # U(0, 0.6) rates: spread across rows (std 0.6 / sqrt(12) ~ 0.17), all inside [0, 0.6] up to noise.
    assert 0.12 < per_row.std() < 0.22 and per_row.min() < 0.05 and per_row.max() < 0.8


def test_mask_tokens_invariants_and_rate():
    ids, mask = _batch(batch=2000, length=24, seed=4)
    new_ids = np.asarray(mask_fn(jax.random.PRNGKey(3), ids, mask, 0.5, special_ids=SPECIAL, mask_id=MASK))
    assert new_ids.shape == ids.shape and new_ids.dtype == ids.dtype
    changed = new_ids != ids
    assert np.all(new_ids[changed] == MASK)
    assert not np.any(changed & ~_content(ids, mask))  # specials and padding untouched
    rate = changed.sum() / _content(ids, mask).sum()
    assert abs(rate - 0.25) < 0.015, rate
    same = mask_fn(jax.random.PRNGKey(3), ids, mask, 0.0, special_ids=SPECIAL, mask_id=MASK)
    np.testing.assert_array_equal(np.asarray(same), ids)


def test_word_dropout_invariants_and_rate():
    ids, mask = _batch(batch=2000, length=24, seed=5)
    dec_in = np.full_like(ids, PAD)
    dec_in[:, 0] = EOS  # BART decoder start = EOS
    dec_in[:, 1:] = ids[:, :-1]
    dec_mask = np.zeros_like(mask)
    dec_mask[:, 0] = 1
    dec_mask[:, 1:] = mask[:, :-1]
    out = np.asarray(dropout(jax.random.PRNGKey(4), dec_in, 0.3, unk_id=UNK, special_ids=SPECIAL))
    assert out.shape == dec_in.shape and out.dtype == dec_in.dtype
    changed = out != dec_in
    assert np.all(out[changed] == UNK)
    assert not np.any(changed[:, 0])
    assert not np.any(changed & np.isin(dec_in, SPECIAL))
    candidates = ~np.isin(dec_in, SPECIAL)
    candidates[:, 0] = False
    rate = changed.sum() / candidates.sum()
    assert abs(rate - 0.3) < 0.01, rate
    # Position 0 is kept even when it is not a special id; with a mask, masked positions are kept.
    fn = jax.jit(functools.partial(denoise.word_dropout, unk_id=UNK, special_ids=()))
    full = np.asarray(fn(jax.random.PRNGKey(0), jnp.full((3, 5), 50, jnp.int32), 1.0))
    np.testing.assert_array_equal(full[:, 0], 50)
    np.testing.assert_array_equal(full[:, 1:], UNK)
    m = jnp.array([[1, 1, 0, 0, 0]] * 3)
    part = np.asarray(fn(jax.random.PRNGKey(0), jnp.full((3, 5), 50, jnp.int32), 1.0, mask=m))
    np.testing.assert_array_equal(part, [[50, UNK, 50, 50, 50]] * 3)
    np.testing.assert_array_equal(
        np.asarray(dropout(jax.random.PRNGKey(1), dec_in, 0.0, unk_id=UNK, special_ids=SPECIAL)), dec_in
    )


def test_denoise_deterministic_given_rng_and_traced_rate():
    ids, mask = _batch(batch=16)

    @jax.jit
    def f(rng, rate):
        return denoise.delete_tokens(rng, ids, mask, rate, SPECIAL, PAD)

    a = f(jax.random.PRNGKey(9), jnp.float32(0.5))
    b = f(jax.random.PRNGKey(9), jnp.float32(0.5))
    c = f(jax.random.PRNGKey(10), jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


# ------------------------------------------------------------------ <unk> is an ordinary token in real runs
# every third word is a literal <unk> (as in PTB), which the word tokenizer encodes as unk_token_id
UNK_TEXTS = [
    " ".join("<unk>" if (i + j) % 3 == 0 else w for j, w in enumerate(s.split()))
    for i, s in enumerate(synthetic_sentences(96, seed=5))
]


@pytest.fixture(scope="module", params=["bart", "t5"])
def word_run(request, tmp_path_factory):
    """A from-scratch run (word tokenizer with <unk>, BART or T5 layout) and a collated batch of UNK_TEXTS."""
    from _trained_run import tiny_config

    from flax_textvae import builders
    from flax_textvae import data as data_lib

    config = tiny_config(**{"model.scratch.family": request.param, "data.train": "synthetic:128"})
    run = builders.build_run(config, str(tmp_path_factory.mktemp(f"unk_{request.param}")), with_eval=False)
    ids, _ = data_lib.encode_texts(run.tokenizer, UNK_TEXTS, run.max_length)
    batch = data_lib.collate(
        ids, pad_id=run.pad_id, decoder_start_id=run.prompt[0], bos_id=run.prompt[1] if len(run.prompt) > 1 else None
    )
    return request.param, run, {k: np.asarray(v) for k, v in batch.items()}


def test_run_protected_ids_are_bos_eos_pad_mask_not_unk(word_run):
    family, run, batch = word_run
    tok = run.tokenizer
    assert tok.unk_token_id is not None and run.unk_id == tok.unk_token_id
    assert tok.unk_token_id not in run.special_ids
    if family == "bart":  # <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4
        assert run.special_ids == (0, 1, 2, 4) and run.mask_id == 4 and run.unk_id == 3
    else:  # <pad>=0 </s>=1 <unk>=2; no mask token, so masking writes <unk>
        assert run.special_ids == (0, 1) and run.mask_id == 2 and run.unk_id == 2
    assert (batch["input_ids"] == run.unk_id).sum() > 300  # the batch really holds many <unk>


def _noisy(run, batch, **rates):
    from flax_textvae import step

    cfg = step.StepConfig(
        special_ids=run.special_ids, pad_id=run.pad_id, mask_id=run.mask_id, unk_id=run.unk_id, **rates
    )
    keys = step.per_example_keys(jax.random.key(0), jnp.arange(batch["input_ids"].shape[0]))
    out = step.noisy_inputs({k: jnp.asarray(v) for k, v in batch.items()}, keys, cfg)
    return tuple(np.asarray(x) for x in out)


def _protected_positions(run, ids, mask):
    return (mask == 1) & np.isin(ids, run.special_ids)


def test_training_deletion_removes_unk_like_any_word_and_keeps_specials(word_run):
    _, run, batch = word_run
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new_ids, new_mask, _ = _noisy(run, batch, delete_rate=1.0)
    unk_before = ((ids == run.unk_id) & (mask == 1)).sum()
    unk_after = ((new_ids == run.unk_id) & (new_mask == 1)).sum()
    content = (mask == 1) & ~np.isin(ids, run.special_ids)
    words_before = (content & (ids != run.unk_id)).sum()
    words_after = ((new_mask == 1) & ~np.isin(new_ids, run.special_ids + (run.unk_id,))).sum()
    unk_rate, word_rate = 1 - unk_after / unk_before, 1 - words_after / words_before
    # rates r_b ~ U(0, 1): about half of every kind of ordinary token goes, <unk> included
    assert 0.35 < unk_rate < 0.65 and abs(unk_rate - word_rate) < 0.08, (unk_rate, word_rate)
    for b in range(ids.shape[0]):  # every BOS / EOS of a row survives, in order
        old = ids[b][_protected_positions(run, ids, mask)[b]]
        new = new_ids[b][_protected_positions(run, new_ids, new_mask)[b]]
        np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(new_ids[new_mask == 0], run.pad_id)


def test_training_masking_replaces_unk_and_keeps_specials(word_run):
    family, run, batch = word_run
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new_ids, new_mask, _ = _noisy(run, batch, mask_rate=1.0)
    np.testing.assert_array_equal(new_mask, mask)
    changed = new_ids != ids
    keep = _protected_positions(run, ids, mask) | (mask == 0)
    np.testing.assert_array_equal(new_ids[keep], ids[keep])  # BOS / EOS / PAD untouched
    assert np.all(new_ids[changed] == run.mask_id)
    if family == "bart":  # <mask> != <unk>: an <unk> that got masked is visible
        unk = (ids == run.unk_id) & (mask == 1)
        content = (mask == 1) & ~np.isin(ids, run.special_ids)
        unk_rate, all_rate = changed[unk].mean(), changed[content].mean()
        assert 0.35 < unk_rate < 0.65 and abs(unk_rate - all_rate) < 0.08, (unk_rate, all_rate)


def test_word_dropout_replaces_unk_and_keeps_specials(word_run):
    _, run, batch = word_run
    dec_in = batch["decoder_input_ids"]
    dec_mask = (batch["label_weights"] > 0).astype(np.int32)  # decoder input t is real iff target t is
    # the training path at rate 1: every decoder input but position 0 and BOS / EOS / PAD becomes <unk>
    _, _, out = _noisy(run, batch, word_dropout=1.0)
    keep = np.isin(dec_in, run.special_ids)
    keep[:, 0] = True
    np.testing.assert_array_equal(out, np.where(keep, dec_in, run.unk_id))
    # the run's protected set with a replacement id other than <unk>, so that replacing an <unk> shows
    repl = run.vocab_size - 1
    fn = jax.jit(denoise.word_dropout, static_argnames=("special_ids", "unk_id"))
    got = np.asarray(fn(jax.random.PRNGKey(0), dec_in, 1.0, unk_id=repl, special_ids=run.special_ids, mask=dec_mask))
    expected = np.where(keep | (dec_mask == 0), dec_in, repl)
    np.testing.assert_array_equal(got, expected)
    assert (got[dec_in == run.unk_id] == repl).all() and (dec_in == run.unk_id).sum() > 300
