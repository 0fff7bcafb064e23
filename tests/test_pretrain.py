"""Pretraining by text infilling (flax_textvae.pretrain): the corruption's properties, a tiny from-scratch run
whose held-out denoising loss falls, its Hugging Face export (transformers computes our logits), finetuning
that export into a VAE with configs/bart_vae.py, the command line's user errors, and resume after SIGTERM."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers import AutoTokenizer, BartForConditionalGeneration

from flax_textvae import checkpoints, denoise, models, pretrain, train
from flax_textvae import workdir as rundir
from flax_textvae.configuration import with_overrides
from flax_textvae.data import read_examples, synthetic_sentences, train_word_tokenizer
from flax_textvae.monitor import MetricsLog

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "pretrain_bart_small.py")

BOS, PAD, EOS, MASK = 0, 1, 2, 4  # the word tokenizer's BART layout
SPECIALS = (BOS, PAD, EOS, MASK)
FIRST_WORD = 10

# One compile per input shape; the rate and the span mean are traced.
INFILL = jax.jit(
    lambda key, ids, mask, rate, lam: denoise.text_infilling(key, ids, mask, rate, lam, SPECIALS, MASK, PAD)
)


# ------------------------------------------------------------------------------------------ the corruption
def numbered(lengths, width):
    """Rows ``<s> w w+1 ... </s>`` with distinct increasing word ids (so the output shows what was cut)."""
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n - 1] = BOS, EOS
        ids[b, 1 : n - 1] = np.arange(FIRST_WORD, FIRST_WORD + n - 2)
        mask[b, :n] = 1
    return ids, mask


def spans_of(row, n_words):
    """The span length behind each mask of one corrupted ``numbered`` row (0 for an inserted mask) and the
    number of words kept; checks the row's shape on the way (BOS first, EOS last, masks never adjacent)."""
    assert row[0] == BOS and row[-1] == EOS, row
    lengths, prev = [], FIRST_WORD - 1
    for i, t in enumerate(row):
        if t == MASK:
            assert row[i - 1] != MASK and row[i + 1] != MASK, row
            nxt = row[i + 1] if row[i + 1] != EOS else FIRST_WORD + n_words
            lengths.append(int(nxt - prev - 1))
        elif t >= FIRST_WORD:
            assert t > prev, row  # the kept words keep their order
            prev = t
    return lengths, int(np.sum(row >= FIRST_WORD))


def corrupt_rows(lengths, width, rate, lam, seed=0):
    ids, mask = numbered(lengths, width)
    out, out_mask = INFILL(jax.random.key(seed), ids, mask, rate, lam)
    out, out_mask = np.asarray(out), np.asarray(out_mask)
    return [row[:n] for row, n in zip(out, out_mask.sum(1))], out, out_mask


@pytest.mark.parametrize("rate", [0.3, 0.15])
def test_the_masked_fraction_is_the_rate(rate):
    # Long inputs: every row masks round(rate * m) words, rounded stochastically (so within 1 / m).
    rows, _, _ = corrupt_rows([512] * 96, 512, rate, 3.0)
    m = 510
    fractions = np.array([1 - spans_of(r, m)[1] / m for r in rows])
    assert np.all(np.abs(fractions - rate) <= 1 / m + 1e-9), fractions
    assert abs(fractions.mean() - rate) < 0.003
    # Short inputs of mixed lengths: the stochastic rounding keeps the overall fraction at the rate.
    lengths = np.random.default_rng(1).integers(3, 41, size=1500)
    rows, _, _ = corrupt_rows(lengths, 40, rate, 3.0, seed=1)
    kept = sum(spans_of(r, n - 2)[1] for r, n in zip(rows, lengths))
    assert abs(1 - kept / np.sum(lengths - 2) - rate) < 0.01


@pytest.mark.parametrize("lam", [3.0, 1.5])
def test_span_lengths_are_poisson_with_the_configured_mean(lam):
    rows, _, _ = corrupt_rows([512] * 128, 512, 0.3, lam, seed=2)
    spans = np.concatenate([spans_of(r, 510)[0] for r in rows])
    assert len(spans) > 4000
    # The last span of a row is cut to the masking budget, which pulls the mean down by about 1 %.
    assert abs(spans.mean() - lam) < 0.05 * lam + 0.05, spans.mean()
    assert abs(spans.var() - lam) < 0.15 * lam, spans.var()
    assert abs(np.mean(spans == 0) - math.exp(-lam)) < 0.02  # length-0 spans insert a mask


def test_special_tokens_are_never_masked_and_the_rest_keeps_its_order():
    # Pair-encoded rows put specials in the middle too: <s> a b </s> </s> c d </s>.
    rng = np.random.default_rng(3)
    width, rows = 48, []
    for _ in range(256):
        a, b = rng.integers(0, 20, size=2)
        rows.append(
            [BOS]
            + list(range(FIRST_WORD, FIRST_WORD + a))
            + [EOS, EOS]
            + list(range(FIRST_WORD + a, FIRST_WORD + a + b))
            + [EOS]
        )
    ids = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    out, out_mask = map(np.asarray, INFILL(jax.random.key(4), ids, mask, 0.5, 2.0))
    masked_some = 0
    for r, o, om in zip(rows, out, out_mask):
        n = int(om.sum())
        got = o[:n]
        assert np.all(o[n:] == PAD) and np.all(om[:n] == 1) and PAD not in got
        assert got[0] == BOS and got[-1] == EOS
        assert [t for t in got if t in (BOS, EOS)] == [t for t in r if t in (BOS, EOS)]
        words = [t for t in got if t >= FIRST_WORD]
        assert words == sorted(words) and set(words) <= set(r)
        masked_some += len(words) < len(r) - 4
    assert masked_some > 200


def test_the_output_never_exceeds_the_static_length():
    # Full rows with mostly empty spans: the insertions alone would overflow; the last ones are dropped.
    width = 64
    rows, out, out_mask = corrupt_rows([width] * 64, width, 0.3, 0.2, seed=5)
    assert out.shape == (64, width)
    lengths = out_mask.sum(1)
    assert lengths.max() == width  # the overflow case happened and was cut to fit
    for row in rows:
        spans_of(row, width - 2)  # still <s> ... </s> with single masks
    assert np.all(out_mask == (np.arange(width)[None] < lengths[:, None]))
    # Typical settings shorten a sequence: one mask per span of about three words.
    rows, _, out_mask = corrupt_rows([width] * 64, width, 0.3, 3.0, seed=6)
    assert out_mask.sum(1).max() < width


def test_the_corruption_is_a_pure_function_of_the_key():
    ids, mask = numbered([30, 12, 64, 5], 64)
    a = INFILL(jax.random.key(7), ids, mask, 0.3, 3.0)
    b = INFILL(jax.random.key(7), ids, mask, 0.3, 3.0)
    c = INFILL(jax.random.key(8), ids, mask, 0.3, 3.0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # Row b of the batch is infill_example with fold_in(key, b).
    one_row = jax.jit(lambda key, i, m: denoise.infill_example(key, i, m, 0.3, 3.0, SPECIALS, MASK, PAD))
    for row in range(len(ids)):
        one = one_row(jax.random.fold_in(jax.random.key(7), row), ids[row], mask[row])
        np.testing.assert_array_equal(one[0], a[0][row])
        np.testing.assert_array_equal(one[1], a[1][row])


# ------------------------------------------------------------------------------------------ a tiny run
def load_config_file(path=CONFIG_FILE):
    spec = importlib.util.spec_from_file_location("pretrain_config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


TINY = {
    "model.scratch.d_model": 32,
    "model.scratch.num_heads": 2,
    "model.scratch.ffn_dim": 64,
    "model.scratch.num_layers": 1,
    "model.scratch.dropout": 0.1,
    "data.train": "synthetic:512",
    "data.eval": "synthetic:64:1",
    "data.max_length": 32,
    "data.num_buckets": 1,
    "data.eval_max_examples": 0,
    "batch_size": 16,
    "train_steps": 200,
    "log_every": 50,
    "eval_every": 100,
    "checkpoint_every": 100,
    "optimizer.learning_rate": 3e-3,
    "optimizer.warmup_steps": 5,
}


def tiny_config(**overrides):
    return with_overrides(load_config_file(), **{**TINY, **overrides})


def rows_of(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r.get("split") != "eval"], [r for r in rows if r.get("split") == "eval"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain") / "run")
    config = tiny_config()
    result = pretrain.pretrain(config, workdir)
    params, step = checkpoints.load_params(workdir)
    return {"config": config, "workdir": workdir, "result": result, "params": params, "step": step}


def test_pretraining_lowers_the_held_out_denoising_loss(pretrained):
    train_rows, eval_rows = rows_of(pretrained["workdir"])
    assert [r["step"] for r in eval_rows] == [0, 100, 200]
    with open(os.path.join(pretrained["workdir"], "model", "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    first, last = eval_rows[0]["loss"], eval_rows[-1]["loss"]
    assert abs(first - math.log(vocab)) < 0.5, (first, vocab)  # untrained: close to uniform
    assert last < first - 0.8, (first, last)
    assert eval_rows[-1]["num_examples"] == 64
    assert pretrained["result"]["eval"] == {k: v for k, v in eval_rows[-1].items() if k not in ("step", "split")}
    assert [r["step"] for r in train_rows] == [50, 100, 150, 200]
    for r in train_rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "accuracy", "grad_norm", "param_norm"))
        assert 0.5 < r["input_ratio"] < 0.95  # the encoder read shortened, masked text
    assert pretrained["step"] == 200 == pretrained["result"]["step"]


def test_the_export_loads_in_transformers_with_equal_logits(pretrained):
    d = pretrained["result"]["export"]
    assert d == os.path.join(pretrained["workdir"], pretrain.EXPORT_FOLDER)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", pretrain.INFO_NAME):
        assert os.path.isfile(os.path.join(d, name)), name
    with open(os.path.join(d, pretrain.INFO_NAME)) as f:
        info = json.load(f)
    assert info["step"] == 200 and info["eval"] == pretrained["result"]["eval"]
    assert info["config"]["pretrain"] == {"mask_rate": 0.3, "poisson_lambda": 3.0}

    torch_model, loading = BartForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), loading
    tokenizer = AutoTokenizer.from_pretrained(d)
    assert tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id == MASK
    text = synthetic_sentences(1, seed=9)[0]
    trained_tok = AutoTokenizer.from_pretrained(os.path.join(pretrained["workdir"], "model"))
    assert tokenizer(text)["input_ids"] == trained_tok(text)["input_ids"]

    pre = models.load_pretrained(d)
    want = flatten_dict(pretrained["params"], sep="/")
    got = flatten_dict(pre.params, sep="/")
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    rng = np.random.default_rng(0)
    pad = pre.config.pad_token_id
    ids, mask = helpers_hf.padded_batch(rng, [9, 4, 7], pre.config.vocab_size, pad)
    dec, dmask = helpers_hf.padded_batch(rng, [6, 8, 3], pre.config.vocab_size, pad)
    ours = pre.module.apply({"params": pretrained["params"]}, ids, mask, dec, dmask)
    with torch.no_grad():
        theirs = torch_model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
            decoder_attention_mask=torch.from_numpy(dmask).long(),
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_the_export_finetunes_into_a_vae_with_the_bart_vae_config(pretrained, tmp_path):
    for name, n, seed in (("train.txt", 64, 3), ("valid.txt", 16, 4)):
        (tmp_path / name).write_text("\n".join(synthetic_sentences(n, seed=seed)) + "\n")
    export = pretrained["result"]["export"]
    sys.path.insert(0, os.path.join(REPO, "configs"))
    bart_vae = importlib.import_module("bart_vae")
    config = with_overrides(
        bart_vae.get_config(),
        **{
            "model.name_or_path": export,
            "data.train": str(tmp_path / "train.txt"),
            "data.eval": str(tmp_path / "valid.txt"),
            "data.max_length": 32,
            "data.num_buckets": 1,
            "batch_size": 8,
            "train_steps": 6,
            "phase1.steps": 2,
            "eval_every": 0,
            "checkpoint_every": 6,
            "log_every": 2,
            "optimizer.warmup_steps": 1,
            "loss.kl_schedule.steps": 2,
        },
    )
    workdir = str(tmp_path / "vae")
    result = train.train_and_evaluate(config, workdir)
    for key in ("rec", "kl", "neg_elbo", "ppl_elbo", "au", "bleu"):
        assert key in result and math.isfinite(result[key]), (key, result)
    train_rows, eval_rows = rows_of(workdir)
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["rec"]) for r in train_rows)
    assert eval_rows[-1]["step"] == 6
    # The VAE's backbone started from the export: six small AdamW steps moved it a little, not to a new init.
    params, _ = checkpoints.load_params(workdir)
    tuned = flatten_dict(params["backbone"], sep="/")
    start = flatten_dict(pretrained["params"], sep="/")
    assert set(tuned) == set(start)
    moved = max(float(np.max(np.abs(np.asarray(tuned[k]) - np.asarray(start[k])))) for k in start)
    assert 0 < moved < 5e-3, moved


# ------------------------------------------------------------------------------------------ command line
def run_cli(*flags, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "flax_textvae.pretrain", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--config=configs/no_such_config.py"], "no_such_config.py"),
        (["--config.pretrain.mask_rat=0.3"], "mask_rat"),
        (["--config.pretrain.mask_rate=1.5"], "pretrain.mask_rate=1.5"),
    ],
    ids=["missing-config", "unknown-field", "bad-value"],
)
def test_user_errors_exit_2_without_a_traceback(tmp_path, flags, needle):
    workdir = tmp_path / "run"
    p = run_cli(*flags, f"--workdir={workdir}")
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert needle in p.stderr, p.stderr
    assert not workdir.exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------ resume
def test_sigterm_then_a_rerun_resumes_and_ends_where_an_uninterrupted_run_does(
    pretrained, tmp_path, monkeypatch, capsys
):
    workdir = str(tmp_path / "run")
    write = MetricsLog.write

    def write_then_preempt(self, row):  # SIGTERM arrives right after the training row of step 150
        write(self, row)
        if row.get("split") != "eval" and row["step"] == 150:
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "write", write_then_preempt)
        assert pretrain.pretrain(pretrained["config"], workdir) == {"preempted": True, "step": 150}
    assert "SIGTERM: saved the checkpoint of step 150" in capsys.readouterr().out
    assert rundir.checkpoint_steps(workdir) == [100, 150]  # 150 is off the cadence: SIGTERM saved it
    assert not os.path.exists(os.path.join(workdir, pretrain.EXPORT_FOLDER))

    result = pretrain.pretrain(pretrained["config"], workdir)
    assert "Resuming from step 150" in capsys.readouterr().out
    assert result["step"] == 200
    train_rows, eval_rows = rows_of(workdir)
    assert [r["step"] for r in train_rows] == [50, 100, 150, 200]  # each logged step once across the restart
    assert [r["step"] for r in eval_rows] == [0, 100, 200]
    params, _ = checkpoints.load_params(workdir)
    for k, v in flatten_dict(pretrained["params"], sep="/").items():
        np.testing.assert_allclose(
            np.asarray(flatten_dict(params, sep="/")[k]), np.asarray(v), rtol=0, atol=1e-6, err_msg=k
        )
    assert result["eval"]["loss"] == pytest.approx(pretrained["result"]["eval"]["loss"], abs=1e-5)

    # A rerun of the finished run trains nothing: it re-evaluates and writes the export where it is asked to.
    again = pretrain.pretrain(pretrained["config"], workdir, export_dir=str(tmp_path / "elsewhere"))
    assert "finished at step 200" in capsys.readouterr().out
    assert again["step"] == 200 and again["eval"] == result["eval"]
    assert os.path.isfile(os.path.join(tmp_path, "elsewhere", "model.safetensors"))
    assert rows_of(workdir) == (train_rows, eval_rows)


def test_an_export_folder_in_the_way_is_refused_before_training(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier pretraining export"):
        pretrain.pretrain(tiny_config(), str(tmp_path / "run"), export_dir=str(tmp_path / "taken"))
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ the shipped config
def test_the_shipped_config_is_a_small_bart_on_the_ted_talks(shared_data, tmp_path):
    config = load_config_file()
    assert os.path.realpath(config.data.train) == os.path.realpath(shared_data / "ted" / "train.txt")
    assert os.path.realpath(config.data.eval) == os.path.realpath(shared_data / "ted" / "test.txt")
    assert (config.pretrain.mask_rate, config.pretrain.poisson_lambda) == (0.3, 3.0)
    assert pretrain.config_problems(config) == []
    texts, _ = read_examples(config.data.train)
    tokenizer = train_word_tokenizer(texts, tmp_path / "tok", family="bart", vocab_size=config.model.scratch.vocab_size)
    assert tokenizer.mask_token_id == MASK and len(tokenizer) == config.model.scratch.vocab_size
    hf_config = models.families.get("bart").scratch_config(config.model.scratch, tokenizer, config.data.max_length)
    shapes = models.param_shapes(models.build_module(hf_config))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert 5e6 < count < 2e7, count  # small enough for tens of minutes of CPU pretraining


@pytest.mark.slow
def test_the_command_line_survives_sigterm_and_finishes_on_a_rerun(tmp_path):
    workdir, export = tmp_path / "run", tmp_path / "bart-small"
    tiny = [f"--config.{k}={v}" for k, v in TINY.items() if k not in ("train_steps", "checkpoint_every")]
    flags = [
        f"--workdir={workdir}",
        f"--export={export}",
        "--config.train_steps=3000",
        "--config.checkpoint_every=100000",
        *tiny,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen(
        [sys.executable, "-m", "flax_textvae.pretrain", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if log.exists() and sum(1 for r in log.read_text().splitlines() if '"eval"' not in r) >= 2:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=240)[0]
    assert p.returncode == 0, out
    assert "SIGTERM: saved the checkpoint of step" in out
    saved = rundir.checkpoint_steps(str(workdir))
    assert len(saved) == 1 and 100 <= saved[0] < 3000, (saved, out)
    done = run_cli(*flags, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Resuming from step {saved[0]}" in done.stdout
    assert "Pretrained to step 3000" in done.stdout
    assert os.path.isfile(export / "model.safetensors")
