"""evaluate(config, workdir): the docs/metrics.md JSON on a real (tiny) trained run, deterministic, batch-size free."""

import json
import math
import os

import numpy as np
import pytest
from _trained_run import trained_run

from flax_textvae import builders, checkpoints, evaluate, losses, metrics
from flax_textvae.data import synthetic_sentences

IW = 20  # importance samples: small, the checks below do not need the default of 500
NUM_SENTENCES = 40
LONG = (3, 17, 29)  # held-out lines made longer than data.max_length (32 tokens: 30 words + <s> </s>)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A small eval text file of synthetic sentences (a seed the run never trained on)."""
    texts = synthetic_sentences(NUM_SENTENCES, seed=7)
    extra = iter(synthetic_sentences(100, seed=8))
    for i in LONG:
        while len(texts[i].split()) <= 34:
            texts[i] += " " + next(extra)
    path = tmp_path_factory.mktemp("heldout") / "heldout_small.txt"
    path.write_text("\n".join(texts) + "\n")
    return str(path), texts


@pytest.fixture(scope="module")
def results(tiny_run, heldout):
    """Three evaluate() calls on the text file: batch 7 twice (JSON as written), then batch 64."""
    config, workdir = tiny_run
    path, _ = heldout
    out = os.path.join(workdir, "eval", "heldout_small.json")
    written = []
    for bs in (7, 7, 64):
        returned = evaluate.evaluate(config, workdir, data=path, iw_samples=IW, batch_size=bs)
        with open(out) as f:
            written.append((f.read(), returned))
    return written


def test_split_name_defaults():
    assert builders.split_name("data/ptb/test.txt") == "test"
    assert builders.split_name("/a/b/valid.tsv") == "valid"
    assert builders.split_name("tfds:text_vae_corpora/ptb:validation") == "validation"
    assert builders.split_name("tfds:text_vae_corpora/ptb:test") == "test"
    assert builders.split_name("tfds:lm1b") == "train"
    assert builders.split_name("synthetic:64:1") == "synthetic"


def test_json_has_exactly_the_design_keys_and_is_deterministic(results):
    (text_a, ret_a), (text_b, _), _ = results
    data = json.loads(text_a)
    assert set(data) == set(evaluate.RESULT_KEYS) == set(metrics.SUMMARY_KEYS) | {"max_length", "num_truncated"}
    assert data == ret_a
    assert data["iw_samples"] == IW and data["num_examples"] == NUM_SENTENCES
    assert all(data[k] is not None for k in metrics.SUMMARY_KEYS)
    assert text_a == text_b, "two evaluations of the same checkpoint must write identical JSON"


def test_results_do_not_depend_on_the_batch_size(results):
    a, b = json.loads(results[0][0]), json.loads(results[2][0])
    for k in evaluate.RESULT_KEYS:
        if isinstance(a[k], float):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            assert a[k] == b[k], k


def test_metric_relations_on_a_real_run(results, heldout, tiny_run):
    config, workdir = tiny_run
    r = json.loads(results[0][0])
    _, texts = heldout
    n = r["num_examples"]
    # the BART-layout word tokenizer: <s> w1 .. wn </s>; targets are the words and EOS (BOS and padding not)
    max_len = config.data.max_length
    expected_tokens = sum(min(len(t.split()) + 2, max_len) - 1 for t in texts)
    assert r["num_tokens"] == expected_tokens
    assert r["neg_elbo"] == pytest.approx(r["rec"] + r["kl"], rel=1e-9)
    assert r["nll"] <= r["neg_elbo"] + 1e-3 * abs(r["neg_elbo"]), r
    assert r["ppl"] == pytest.approx(math.exp(r["nll"] * n / r["num_tokens"]), rel=1e-9)
    assert r["ppl_elbo"] == pytest.approx(math.exp(r["neg_elbo"] * n / r["num_tokens"]), rel=1e-9)
    assert 0 <= r["au"] <= config.vae.latent_size
    assert -1e-4 <= r["mi"] <= math.log(n) + 1e-4
    assert 0.0 <= r["bleu"] <= 100.0 and r["kl"] >= 0.0
    with open(os.path.join(workdir, "eval", "heldout_small.meta.json")) as f:
        meta = json.load(f)
    assert meta["tokenizer"] and meta["step"] == config.train_steps


def test_json_records_max_length_and_truncated_count(results, heldout, tiny_run):
    config, _ = tiny_run
    _, texts = heldout
    data, returned = json.loads(results[0][0]), results[0][1]
    max_len = config.data.max_length
    assert max_len == 32
    # BART layout: a line of n words is n + 2 tokens; exactly the LONG lines are over 32 and get cut
    assert [i for i, t in enumerate(texts) if len(t.split()) + 2 > max_len] == list(LONG)
    assert data["max_length"] == returned["max_length"] == 32
    assert data["num_truncated"] == returned["num_truncated"] == len(LONG) == 3
    assert data["num_examples"] == NUM_SENTENCES


def test_iw_nll_does_not_depend_on_the_chunk_size(tiny_run, heldout):
    """The K importance samples of an example are the same however many are drawn per decoder pass."""
    config, workdir = tiny_run
    path, _ = heldout
    run = builders.build_run(config, workdir, train=False, eval_spec=path, eval_batch_size=16)
    params, _ = checkpoints.load_params(workdir)
    kw = dict(iw_samples=6, seed=3, mi_au=False)
    first16 = run.eval_subset(16)  # one batch is enough
    whole = evaluate.evaluate_split(run, params, first16, iw_chunk=6, **kw)
    chunked = evaluate.evaluate_split(run, params, first16, iw_chunk=3, **kw)
    assert whole["num_examples"] == 16
    np.testing.assert_allclose(chunked["nll"], whole["nll"], rtol=1e-5)
    assert chunked["rec"] == whole["rec"]


def test_vocabulary_chunked_evaluation_equals_full_logits(tiny_run, heldout, monkeypatch):
    """``vocab_chunk_size`` > 0 scores -log p(x|z) through the LM head by vocabulary chunks: the same metrics."""
    traced = []
    chunked_nll = losses.chunked_token_nll
    monkeypatch.setattr(
        losses, "chunked_token_nll", lambda *a, **k: traced.append(k["chunk_size"]) or chunked_nll(*a, **k)
    )
    config, workdir = tiny_run
    path, _ = heldout
    run = builders.build_run(config, workdir, train=False, eval_spec=path, eval_batch_size=16)
    params, _ = checkpoints.load_params(workdir)
    assert int(config.loss.get("vocab_chunk_size", 0)) == 0  # the run's default: full logits
    kw = dict(iw_samples=6, seed=3, mi_au=False)
    first16 = run.eval_subset(16)
    full = evaluate.evaluate_split(run, params, first16, **kw)
    chunk = max(1, run.vocab_size // 3)  # three chunks, the last one partial
    assert run.vocab_size % chunk
    chunked = evaluate.evaluate_split(run, params, first16, vocab_chunk_size=chunk, **kw)
    assert full["num_examples"] == chunked["num_examples"] == 16
    for key in ("rec", "nll", "neg_elbo", "kl", "ppl"):
        np.testing.assert_allclose(chunked[key], full[key], rtol=1e-5, err_msg=key)
    assert chunked["rec"] != 0
    assert traced and set(traced) == {chunk}, "the chunked path was not the one evaluated"
