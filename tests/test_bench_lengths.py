"""Tests of benchmarks/lengths.py and a tiny smoke run of benchmarks/torch_baseline.py."""

import importlib
import json
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    """Imports ``benchmarks.lengths`` with the repository root temporarily on sys.path."""
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("benchmarks.lengths")


def test_file_parsing(bench, tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(" a b c \n\n  one\nx y z w v\n", encoding="utf-8")
    np.testing.assert_array_equal(bench.load_lengths(path), [4, 2, 6])
    np.testing.assert_array_equal(bench.load_lengths(str(path), tokens_per_word=1.5), [6, 3, 9])
    with pytest.raises(FileNotFoundError):
        bench.load_lengths(tmp_path / "missing.txt")


def test_synthetic_deterministic_and_ptb_like(bench):
    a = bench.load_lengths(seed=3)
    np.testing.assert_array_equal(a, bench.load_lengths(seed=3))
    assert not np.array_equal(a, bench.load_lengths(seed=4))
    assert len(a) == bench.DEFAULT_NUM_SYNTHETIC and a.dtype == np.int64
    assert a.min() >= 2 and a.max() <= 80
    assert 20.0 < a.mean() < 24.0 and 8.0 < a.std() < 12.0
    assert len(bench.load_lengths(n=10)) == 10


def test_batches_deterministic_epochwise(bench):
    lengths = np.arange(10)
    plan = bench.batches_of_lengths(lengths, batch_size=3, steps=7, seed=0)
    again = bench.batches_of_lengths(lengths, batch_size=3, steps=7, seed=0)
    assert len(plan) == 7 and all(b.shape == (3,) for b in plan)
    assert all(np.array_equal(x, y) for x, y in zip(plan, again))
    # three batches per epoch, no repeats inside an epoch
    assert len(set(np.concatenate(plan[:3]).tolist())) == 9
    other = bench.batches_of_lengths(lengths, batch_size=3, steps=7, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(plan, other))
    with pytest.raises(ValueError):
        bench.batches_of_lengths(lengths, batch_size=11, steps=1)


def test_padding_and_batches(bench):
    lengths = np.array([3, 5, 1])
    assert bench.padded_length(lengths) == 5
    assert bench.padded_length(lengths, "longest", multiple=4) == 8
    assert bench.padded_length(lengths, "256") == 256 == bench.padded_length(lengths, 256)
    with pytest.raises(ValueError):
        bench.padded_length(lengths, "max")
    assert bench.padding_fraction(lengths, 5) == pytest.approx(1 - 9 / 15)

    tokens, mask = bench.random_token_batch(lengths, 50, pad_id=0, eos_id=1, rng=np.random.default_rng(0))
    assert tokens.shape == (3, 5) and tokens.dtype == np.int32
    np.testing.assert_array_equal(mask.sum(1), lengths)
    np.testing.assert_array_equal(tokens[np.arange(3), lengths - 1], [1, 1, 1])
    assert (tokens[mask == 0] == 0).all() and (tokens[mask == 1] != 0).all()

    b = bench.make_batch(
        lengths, vocab_size=50, pad_id=1, eos_id=2, decoder_start_id=2, rng=np.random.default_rng(0), pad=8
    )
    assert b["input_ids"].shape == (3, 8) == b["decoder_input_ids"].shape
    np.testing.assert_array_equal(b["decoder_input_ids"][:, 0], [2, 2, 2])
    np.testing.assert_array_equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    np.testing.assert_array_equal(b["label_weights"].sum(1), lengths)
    assert b["label_weights"].dtype == np.float32 and b["example_weight"].shape == (3,)
    again = bench.make_batch(
        lengths, vocab_size=50, pad_id=1, eos_id=2, decoder_start_id=2, rng=np.random.default_rng(0), pad=8
    )
    np.testing.assert_array_equal(b["input_ids"], again["input_ids"])


def test_ptb_file_if_present(bench, shared_data):
    path = shared_data / "ptb" / "test.txt"
    if not path.is_file():
        pytest.skip("PTB test split not present")
    lengths = bench.load_lengths(path)
    assert len(lengths) > 1000 and lengths.min() >= 2
    assert 18.0 < lengths.mean() < 26.0


def test_torch_baseline_smoke(monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(REPO))
    torch = importlib.import_module("torch")
    tb = importlib.import_module("benchmarks.torch_baseline")
    threads = torch.get_num_threads()
    try:  # main() sets the torch thread count; put it back for the rest of the session
        tb.main(["--arch=tiny-t5", "--batch=4", "--steps=2", "--warmup=1", "--threads=1", "--json"])
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("examples_per_s", "real_tokens_per_s", "padding_fraction", "peak_memory_mb"):
        assert out[key] > 0 or key == "padding_fraction"
    assert out["framework"] == "torch" and out["arch"] == "tiny-t5"
    assert (out["batch"], out["steps"], out["pad"]) == (4, 2, "longest")
    assert 0.0 <= out["padding_fraction"] < 1.0 and np.isfinite(out["final_loss"])
