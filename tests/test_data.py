"""Tests for flax_textvae.data: sources, the TFDS builder, synthetic text, length bucketing and the batch plans."""

import json
import pathlib

import numpy as np
import pytest

from flax_textvae.data import (
    ArraySource,
    Batcher,
    GrainEvalIterator,
    GrainTrainIterator,
    collate,
    encode_texts,
    make_buckets,
    padding_fraction,
    read_examples,
    synthetic_sentences,
    train_word_tokenizer,
)

KEYS = {"input_ids", "attention_mask", "decoder_input_ids", "labels", "label_weights", "example_weight"}


# ----------------------------------------------------------------------------------------------- sources
def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_examples(str(path))


def test_empty_lines_skipped_and_counted(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\ufeffone two\n\n   \nthree four five \r\n\nsix\n", encoding="utf-8")
    texts, stats = read_examples(path)
    assert texts == ["one two", "three four five", "six"]
    assert stats["lines_read"] == 6 and stats["empty_skipped"] == 3 and stats["undecodable_skipped"] == 0
    assert stats["examples"] == 3
    texts, stats = read_examples(path, max_examples=2)
    assert texts == ["one two", "three four five"]


def test_undecodable_lines_skipped_with_location(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff\xfe line\nanother good\n\xc3\x28\n")
    with pytest.warns(UnicodeWarning, match=r"bad\.txt:2.*bad\.txt:4"):
        texts, stats = read_examples(path)
    assert texts == ["good line", "another good"]
    assert stats["undecodable_skipped"] == 2 and stats["lines_read"] == 4
    assert stats["undecodable_locations"] == [f"{path}:2", f"{path}:4"]
    with pytest.raises(ValueError, match=r"bad\.txt:2: not valid UTF-8"):
        read_examples(path, on_decode_error="raise")


def test_tab_column(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("1\tthe cat\tx\n2\ta dog\ty\n\n", encoding="utf-8")
    texts, stats = read_examples(path, column=1)
    assert texts == ["the cat", "a dog"] and stats["empty_skipped"] == 1
    with pytest.raises(ValueError, match=r"t\.tsv:1: has 3 tab-separated"):
        read_examples(path, column=5)


def test_unknown_tfds_name(tmp_path):
    with pytest.raises(ValueError, match="not known.*array_record"):
        read_examples("tfds:surely_no_such_dataset_xyz:train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="python -m flax_textvae.data.textvae_corpora"):
        read_examples("tfds:text_vae_corpora/yelp:valid", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="bad TFDS spec"):
        read_examples("tfds:", data_dir=str(tmp_path))


def test_tfds_spec_not_built_says_what_to_run(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from flax_textvae.data import DatasetNotBuiltError

    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    spec = "tfds:text_vae_corpora/ptb:valid"
    with pytest.raises(DatasetNotBuiltError) as info:
        read_examples(spec, data_dir=str(empty))
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and repr(spec) in msg and f"data_dir {empty}" in msg
    assert (
        f"python -m flax_textvae.data.textvae_corpora --config=ptb --manual_dir=DIR --data_dir={empty}\n" in msg
    ) and "DIR/ptb/train.txt, valid.txt and test.txt" in msg
    assert msg.endswith("--config.data.train=PATH --config.data.eval=PATH")
    # a data dir that does not exist, and another corpus config
    with pytest.raises(
        DatasetNotBuiltError,
        match=r"(?s)'tfds:text_vae_corpora/yelp'.*--config=yelp .*--data_dir=" + str(tmp_path / "nowhere"),
    ):
        read_examples("tfds:text_vae_corpora/yelp", data_dir=str(tmp_path / "nowhere"))
    # no data_dir and no TFDS_DATA_DIR: TFDS's default directory is searched and named (tfds itself would
    # fail here with a KeyError on empty splits)
    default = tmp_path / "default_tfds"
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(default))
    with pytest.raises(DatasetNotBuiltError, match=f"data_dir {default};.*\n.*--data_dir={default}\n"):
        read_examples("tfds:text_vae_corpora/snli:test")
    # only another version is built there: the message says so
    (empty / "text_vae_corpora" / "ptb" / "0.9.0").mkdir(parents=True)
    (empty / "text_vae_corpora" / "ptb" / "0.9.0" / "dataset_info.json").write_text("{}")
    with pytest.raises(DatasetNotBuiltError, match=r"found only version\(s\) 0\.9\.0 there: rebuild it"):
        read_examples(spec, data_dir=str(empty))


def test_tfds_builder_array_record_round_trip(tmp_path, monkeypatch):
    from flax_textvae.data.textvae_corpora import prepare

    manual = tmp_path / "manual" / "ptb"
    manual.mkdir(parents=True)
    lines = {s: [f"{s} sentence number {i}" for i in range(7)] for s in ("train", "valid", "test")}
    for split, ls in lines.items():
        (manual / f"{split}.txt").write_text("\n".join(ls[:3]) + "\n\n" + "\n".join(ls[3:]) + "\n")
    data_dir = tmp_path / "tfds"
    prepared = prepare("ptb", tmp_path / "manual", data_dir)
    assert any(".array_record-" in p.name for p in pathlib.Path(prepared).iterdir())
    texts, stats = read_examples("tfds:text_vae_corpora/ptb:valid", data_dir=str(data_dir))
    assert texts == lines["valid"]  # file order kept, empty line dropped at build time
    assert stats["examples"] == 7 and stats["lines_read"] == 7
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    texts, _ = read_examples("tfds:text_vae_corpora/ptb:test", max_examples=2)
    assert texts == lines["test"][:2]
    with pytest.raises(ValueError, match="split"):
        read_examples("tfds:text_vae_corpora/ptb:nosplit")
    with pytest.raises(ValueError, match="not among the features"):
        read_examples("tfds:text_vae_corpora/ptb:test", text_field="label")
    with pytest.raises(FileNotFoundError, match="missing corpus"):
        prepare("snli", tmp_path / "manual", data_dir)


def test_parse_line_strips_the_label_of_labelled_corpora():
    from flax_textvae.data.textvae_corpora import NO_LABEL, parse_line

    assert parse_line("3\tthe food was great .\n", labelled=True) == {"text": "the food was great .", "label": 3}
    assert parse_line("\ufeff0\t  why is the sky blue ?  \r\n", labelled=True) == {
        "text": "why is the sky blue ?",
        "label": 0,
    }
    assert parse_line("10\ta\tb", labelled=True) == {"text": "a\tb", "label": 10}  # only the first tab
    assert parse_line("no label here", labelled=True) == {"text": "no label here", "label": NO_LABEL}
    assert parse_line("x\tnot a label", labelled=True) == {"text": "x\tnot a label", "label": NO_LABEL}
    assert parse_line("4\t  \n", labelled=True) is None and parse_line("   \n", labelled=True) is None
    # PTB / SNLI lines are kept whole, a leading number included
    assert parse_line(" 3\tthe n years \n", labelled=False) == {"text": "3\tthe n years"}
    assert parse_line("\n", labelled=False) is None


@pytest.mark.parametrize("config", ["yelp", "yahoo"])
def test_tfds_builder_labelled_corpus_text_has_no_label(tmp_path, config):
    import tensorflow_datasets as tfds

    from flax_textvae.data.textvae_corpora import prepare

    manual = tmp_path / "manual" / config
    manual.mkdir(parents=True)
    rows = {s: [(i % 5, f"{s} review number {i} .") for i in range(6)] for s in ("train", "valid", "test")}
    for split, rs in rows.items():
        (manual / f"{split}.txt").write_text("".join(f"{y}\t{t}\n" for y, t in rs) + "\n", encoding="utf-8")
    data_dir = tmp_path / "tfds"
    prepare(config, tmp_path / "manual", data_dir)
    texts, stats = read_examples(f"tfds:text_vae_corpora/{config}:valid", data_dir=str(data_dir))
    assert texts == [t for _, t in rows["valid"]] and stats["examples"] == 6
    source = tfds.data_source(f"text_vae_corpora/{config}", split="test", data_dir=str(data_dir), download=False)
    records = [source[i] for i in range(len(source))]
    assert [int(r["label"]) for r in records] == [y for y, _ in rows["test"]]
    assert [r["text"].decode() if isinstance(r["text"], bytes) else r["text"] for r in records] == [
        t for _, t in rows["test"]
    ]


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_lengths():
    a = synthetic_sentences(300, seed=1)
    assert a == synthetic_sentences(300, seed=1) and a[:50] == synthetic_sentences(50, seed=1)
    assert a != synthetic_sentences(300, seed=2)
    lengths = np.array([len(s.split()) for s in a])
    assert lengths.min() >= 4 and lengths.max() <= 30 and 10 <= lengths.mean() <= 22 and lengths.std() > 4
    assert all(s == s.lower() and "  " not in s for s in a)


# ---------------------------------------------------------------------------------------------- batching
def _examples(lengths, bos=True, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:  # BART-like: <s>=0 ... </s>=2, words >= 5
        words = list(rng.integers(5, 100, size=n - (2 if bos else 1)))
        out.append(np.array(([0] if bos else []) + words + [2], dtype=np.int32))
    return out


def _batcher(examples, **kw):
    kw = {"batch_size": 8, "pad_id": 1, "decoder_start_token_id": 2, "bos_id": 0, "num_buckets": 4, **kw}
    return Batcher(examples, **kw)


def _check_batch(batch, ex, bos_id, start, pad):
    assert KEYS <= set(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and batch["label_weights"].dtype == np.float32
    B, S = ids.shape
    for key in ("attention_mask", "decoder_input_ids", "labels", "label_weights"):
        assert batch[key].shape == (B, S)
    assert batch["example_weight"].shape == (B,)
    np.testing.assert_array_equal(batch["labels"], ids)
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 0], start)
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    np.testing.assert_array_equal(ids[mask == 0], pad)
    assert np.all(np.diff(mask, axis=1) <= 0)  # right padding
    for r in range(B):
        if batch["example_weight"][r] == 0:
            assert batch["label_weights"][r].sum() == 0
            continue
        n = int(mask[r].sum())
        if ex is not None and "index" in batch:
            np.testing.assert_array_equal(ids[r, :n], ex[batch["index"][r]])
        has_bos = bos_id is not None and ids[r, 0] == bos_id
        assert batch["label_weights"][r].sum() == n - has_bos  # real tokens incl. EOS, minus BOS
        assert batch["label_weights"][r, 0] == (0 if has_bos else 1)


@pytest.mark.parametrize("bos", [True, False])
def test_batch_format(bos):
    ex = _examples(np.random.default_rng(0).integers(3, 30, size=50), bos=bos)
    start = 2 if bos else 1
    b = _batcher(ex, bos_id=0 if bos else None, decoder_start_token_id=start)
    assert b.boundaries[-1] == b.max_length and len(b.boundaries) <= 5
    it = b.train_iterator(seed=0)
    for _ in range(2 * it.steps_per_epoch):
        batch = next(it)
        assert set(batch) == KEYS and batch["input_ids"].shape[0] == 8
        assert batch["input_ids"].shape[1] in b.boundaries and np.all(batch["example_weight"] == 1)
        _check_batch(batch, None, 0 if bos else None, start, 1)
    for batch in b.eval_iterator():
        assert set(batch) == KEYS | {"index"}
        _check_batch(batch, ex, 0 if bos else None, start, 1)


def test_make_buckets():
    lens = np.random.default_rng(0).integers(3, 60, size=500)
    bnd = make_buckets(lens, 128, 6)
    assert bnd[-1] == 128 and len(bnd) <= 7 and all(x % 4 == 0 for x in bnd)
    assert all(np.diff(bnd) > 0) and bnd[-2] >= lens.max()
    assert make_buckets(lens, 64, boundaries=[16, 32]) == [16, 32, 64]
    assert make_buckets([5, 5, 5], 64, 8) == [8, 64]  # no useless buckets
    assert padding_fraction(lens, bnd) < padding_fraction(lens, make_buckets(lens, 128, 3))
    with pytest.raises(ValueError, match="max_length"):
        Batcher(_examples([10, 40]), batch_size=2, pad_id=1, decoder_start_token_id=2, max_length=32)


def _train_padding(examples, batch_size=32):
    b = Batcher(examples, batch_size=batch_size, pad_id=1, decoder_start_token_id=2, bos_id=0)
    it = b.train_iterator(seed=0)
    real = total = 0
    for _ in range(it.steps_per_epoch):
        m = next(it)["attention_mask"]
        real, total = real + m.sum(), total + m.size
    return 1 - real / total, b


def test_padding_fraction_synthetic(tmp_path):
    texts = synthetic_sentences(2000, seed=0)
    tok = train_word_tokenizer(texts, tmp_path, family="bart", vocab_size=128)
    ids, _ = encode_texts(tok, texts, max_length=64)
    frac, b = _train_padding(ids)
    assert frac < 0.15, (frac, b.boundaries)
    assert len({s for s in b.boundaries}) <= 9


def test_padding_fraction_ptb(shared_data, tmp_path):
    texts, _ = read_examples(shared_data / "ptb" / "valid.txt")
    tok = train_word_tokenizer(texts, tmp_path, family="bart", vocab_size=10000)
    ids, _ = encode_texts(tok, texts, max_length=128)
    frac, b = _train_padding(ids)
    assert frac < 0.15, (frac, b.boundaries)


def test_deterministic_and_resume():
    ex = _examples(np.random.default_rng(1).integers(3, 40, size=97))
    it1, it2 = _batcher(ex).train_iterator(seed=5), _batcher(ex).train_iterator(seed=5)
    steps = it1.steps_per_epoch
    for _ in range(steps + 3):  # crosses an epoch boundary
        a, b = next(it1), next(it2)
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    other = _batcher(ex).train_iterator(seed=6)
    assert any(not np.array_equal(next(other)["input_ids"], next(it1)["input_ids"]) for _ in range(3))
    for cut in (steps - 2, steps, 2 * steps + 1):
        it = _batcher(ex).train_iterator(seed=5)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(5)]
        resumed = _batcher(ex).train_iterator(seed=5)
        resumed.set_state(state)
        for e in expected:
            got = next(resumed)
            for k in KEYS:
                np.testing.assert_array_equal(got[k], e[k])


def test_epoch_covers_every_example():
    ex = _examples(np.random.default_rng(2).integers(3, 40, size=61))
    for remainder in ("reuse", "drop"):
        b = _batcher(ex)
        it = b.train_iterator(seed=0, remainder=remainder)
        # identify examples by content (ids are random enough to be unique)
        keys = {tuple(x): i for i, x in enumerate(ex)}
        seen = []
        for _ in range(it.steps_per_epoch):
            batch = next(it)
            for row, m in zip(batch["input_ids"], batch["attention_mask"]):
                seen.append(keys[tuple(row[m == 1])])
        if remainder == "reuse":
            assert set(seen) == set(range(61)) and len(seen) == 64
        else:
            assert len(seen) == 56 == len(set(seen))
        assert it.get_state() == {"epoch": 0, "position": it.steps_per_epoch}


def test_eval_iterator_covers_each_once():
    ex = _examples(np.random.default_rng(3).integers(3, 50, size=45))
    b = _batcher(ex)
    ev = b.eval_iterator()
    batches = list(ev)
    assert len(batches) == len(ev) and batches[0]["input_ids"].shape[0] == 8
    idx = np.concatenate([x["index"] for x in batches])
    w = np.concatenate([x["example_weight"] for x in batches])
    assert sorted(idx[idx >= 0].tolist()) == list(range(45))
    np.testing.assert_array_equal(w, (idx >= 0).astype(np.float32))
    assert [x["index"].tolist() for x in ev] == [x["index"].tolist() for x in batches]  # fixed order


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sharded_equals_global(mode):
    ex = _examples(np.random.default_rng(4).integers(3, 40, size=70))
    shards = [_batcher(ex, shard_index=i, shard_count=2) for i in range(2)]
    full = _batcher(ex)
    assert shards[0].host_batch_size == 4
    if mode == "train":
        its = [s.train_iterator(seed=3) for s in shards] + [full.train_iterator(seed=3)]
        n = its[-1].steps_per_epoch + 2
        streams = [[next(it) for _ in range(n)] for it in its]
    else:
        streams = [list(s.eval_iterator()) for s in shards + [full]]
    for p0, p1, g in zip(*streams):
        for k in g:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])
    with pytest.raises(ValueError, match="multiple of shard_count"):
        _batcher(ex, shard_count=3)


def test_synthetic_spec():
    texts, stats = read_examples("synthetic:20:1")
    assert texts == synthetic_sentences(20, seed=1) and stats["examples"] == 20
    assert read_examples("synthetic:20", max_examples=5)[0] == synthetic_sentences(5, seed=0)
    with pytest.raises(ValueError, match="synthetic:N"):
        read_examples("synthetic:abc")


def test_constructors_take_examples_sources_or_a_batcher():
    ex = _examples(np.random.default_rng(5).integers(3, 30, size=30))
    kw = {"batch_size": 8, "pad_id": 1, "bos_id": 0, "num_buckets": 4, "max_length": 32}
    batcher = Batcher(ex, decoder_start_token_id=2, **kw)
    streams = [
        GrainTrainIterator(ex, seed=2, decoder_start_id=2, **kw),
        batcher.train_iterator(seed=2),
        GrainTrainIterator(ArraySource(ex), seed=2, decoder_start_token_id=2, num_threads=0, **kw),
    ]
    for _ in range(5):
        a, *others = [next(it) for it in streams]
        for b in others:
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in KEYS)
    ev = [x["index"].tolist() for x in GrainEvalIterator(ex, decoder_start_id=2, **kw)]
    assert ev == [x["index"].tolist() for x in batcher.eval_iterator()]
    assert sorted(i for rows in ev for i in rows if i >= 0) == list(range(30))
    with pytest.raises(TypeError, match="not both"):
        Batcher(ex, decoder_start_token_id=2, decoder_start_id=2, **kw)
    with pytest.raises(TypeError, match="given together with a Batcher"):
        GrainTrainIterator(batcher, batch_size=8)
    batch = collate(ex[:3], pad_id=1, decoder_start_id=2, bos_id=0)
    assert batch["input_ids"].shape == (3, max(len(x) for x in ex[:3]))
    np.testing.assert_array_equal(batch["index"], [0, 1, 2])
    _check_batch(batch, ex, 0, 2, 1)
    with pytest.raises(ValueError, match="tokens > max_length=4"):
        collate(ex[:3], pad_id=1, decoder_start_id=2, seq_len=4)


def _reference_plan(ex, boundaries, batch_size, seed, epochs, remainder):
    """(bucket, global rows) of every training batch of ``epochs`` epochs, written out step by step from the
    rules in ``grain_pipeline``'s docstring: the batch sequence that text-file runs have always had."""
    bucket_of = [next(k for k, b in enumerate(boundaries) if len(x) <= b) for x in ex]
    plan = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(len(ex)).tolist()
        batches, carry = [], []
        for k in range(len(boundaries)):  # shortest bucket first; a bucket's rest moves on to the next one
            pool = carry + [i for i in perm if bucket_of[i] == k]
            while len(pool) >= batch_size:
                batches.append((k, pool[:batch_size]))
                pool = pool[batch_size:]
            carry = pool
        if carry and remainder == "reuse":  # completed with the epoch's first examples
            rows = carry + [perm[j % len(perm)] for j in range(batch_size - len(carry))]
            batches.append((max(bucket_of[i] for i in rows), rows))
        plan += [batches[i] for i in rng.permutation(len(batches))]
    return plan


@pytest.mark.parametrize("seed,remainder,shards", [(0, "reuse", 1), (7, "drop", 1), (3, "reuse", 2)])
def test_training_batches_follow_the_documented_plan(seed, remainder, shards):
    ex = _examples(np.random.default_rng(6).integers(3, 40, size=83))
    full = _batcher(ex)
    plan = _reference_plan(ex, full.boundaries, 8, seed, 3, remainder)
    for shard in range(shards):
        it = _batcher(ex, shard_index=shard, shard_count=shards).train_iterator(seed=seed, remainder=remainder)
        assert len(plan) == 3 * it.steps_per_epoch
        rows_per_host = 8 // shards
        for k, rows in plan:
            mine = rows[shard * rows_per_host : (shard + 1) * rows_per_host]
            want = collate(
                [ex[i] for i in mine], pad_id=1, decoder_start_token_id=2, bos_id=0, seq_len=full.boundaries[k]
            )
            del want["index"]
            got = next(it)
            assert got.keys() == want.keys() and all(np.array_equal(got[key], want[key]) for key in want)
        assert it.get_state() == {"epoch": 2, "position": it.steps_per_epoch}
        it.close()


def test_eval_batches_follow_the_documented_order():
    ex = _examples(np.random.default_rng(7).integers(3, 50, size=45))
    b = _batcher(ex)
    bucket_of = [next(k for k, x in enumerate(b.boundaries) if len(e) <= x) for e in ex]
    order = sorted(range(45), key=lambda i: bucket_of[i])  # stable: example order within a bucket
    rows = [order[i : i + 8] for i in range(0, 45, 8)]
    got = [x["index"].tolist() for x in b.eval_iterator()]
    assert got == rows[:-1] + [rows[-1] + [-1] * (8 - len(rows[-1]))]
    shapes = [x["input_ids"].shape[1] for x in b.eval_iterator()]
    assert shapes == [b.boundaries[max(bucket_of[i] for i in r)] for r in rows]
