"""Prepared (pre-tokenized ArrayRecord) data sets, TFDS and text-file sources through the grain pipeline and
``input_pipeline.make_pipeline``: same batches from every source, exact resume, eval coverage."""

import itertools
import json
import pathlib

import numpy as np
import pytest

from flax_textvae import data
from flax_textvae.data import prepare as prep
from flax_textvae.data.grain_pipeline import GrainEvalIterator, GrainTrainIterator

MAX_LEN = 24
pytestmark = pytest.mark.filterwarnings("ignore:.*not valid UTF-8:UnicodeWarning")  # the corpus has one such line
BATCH = dict(batch_size=16, pad_id=1, decoder_start_token_id=2, bos_id=0, max_length=MAX_LEN, num_buckets=3)


def _corpus(n: int = 700, seed: int = 3) -> list[str]:
    lines = data.synthetic_sentences(n, seed)
    lines[4], lines[9] = "", "   "  # empty lines are skipped
    lines[11] = " ".join(["dog"] * 40)  # truncated to MAX_LEN
    lines[20] = "\ufeffno bom here"  # only a BOM on line 1 is removed; this one stays part of the text
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, text file, tokenizer folder, prepared folder, ids encode_texts gives for the text file)."""
    root = tmp_path_factory.mktemp("prepared")
    lines = _corpus()
    text = root / "train.txt"
    text.write_bytes(
        b"\xef\xbb\xbf" + "\n".join(lines[:30]).encode() + b"\n\xff\xfe bad\n" + "\n".join(lines[30:]).encode() + b"\n"
    )
    tok = data.train_word_tokenizer(lines, root / "tok", family="bart", vocab_size=128)
    index = data.prepare_dataset(
        str(text), str(root / "tok"), MAX_LEN, str(root / "prep"), num_workers=2, lines_per_shard=150, progress=False
    )
    texts, _ = data.read_examples(str(text))
    ids, stats = data.encode_texts(tok, texts, MAX_LEN)
    return root, text, tok, index, ids, stats


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_prepared_holds_the_text_files_examples(corpus):
    root, text, tok, index, ids, stats = corpus
    src = data.PreparedSource(root / "prep")
    assert len(src) == len(ids) == index["num_examples"] and len(index["shards"]) == 5
    assert all(np.array_equal(a, b) for a, b in zip(src.__getitems__(range(len(src))), ids))
    assert np.array_equal(src.lengths, [len(x) for x in ids]) and src[3].dtype == np.int32
    s = index["stats"]
    assert (s["empty_skipped"], s["undecodable_skipped"], s["truncated"]) == (2, 1, stats["truncated"]) != (2, 1, 0)
    assert s["undecodable_locations"] == [f"{text}:31"] and s["tokens"] == stats["tokens"]
    assert index["dtype"] == "<u2" and index["tokenizer"]["hash"] == data.tokenizer_fingerprint(tok)
    assert index["sources"][0]["sha256"] == data.prepared.file_sha256(text)
    on_disk = json.loads((root / "prep" / "index.json").read_text())
    assert on_disk["num_examples"] == len(ids) and not list(root.glob("prep.tmp-*"))
    texts = data.DecodedTexts(src, tok)
    assert texts[:2] == tok.batch_decode([x.tolist() for x in ids[:2]], skip_special_tokens=True)


def test_rerun_is_a_noop_and_changed_input_reprepares(corpus, tmp_path):
    root, text, _, index, _, _ = corpus
    again = data.prepare_dataset(str(text), str(root / "tok"), MAX_LEN, str(root / "prep"), num_workers=0)
    assert again["up_to_date"] and again["created"] == index["created"]
    small = tmp_path / "small.txt"
    small.write_text("the dog saw a cat\n")
    out = tmp_path / "p"
    first = data.prepare_dataset(str(small), str(root / "tok"), MAX_LEN, str(out), num_workers=0)
    small.write_text("the dog saw a cat\nthe cat slept\n")
    second = data.prepare_dataset(str(small), str(root / "tok"), MAX_LEN, str(out), num_workers=0)
    assert (first["num_examples"], second["num_examples"]) == (1, 2) and not second.get("up_to_date")
    with pytest.raises(FileExistsError, match="not a prepared data set"):
        data.prepare_dataset(str(small), str(root / "tok"), MAX_LEN, str(root), num_workers=0)


def test_interrupted_prepare_leaves_no_dataset(corpus, tmp_path, monkeypatch):
    root, text, _, _, _, _ = corpus
    out = tmp_path / "p"
    stale = tmp_path / "p.tmp-999999999"  # left by a killed run (no such process)
    stale.mkdir()
    (stale / "shard-00000.array_record").write_bytes(b"x")
    calls = []
    real = prep._write_shard

    def flaky(task):
        calls.append(task[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prep, "_write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_dataset(str(text), str(root / "tok"), MAX_LEN, str(out), num_workers=0, lines_per_shard=150)
    assert not out.exists() and not list(tmp_path.glob("p.*"))  # nothing half-written, stale folder removed
    out.mkdir()  # a folder without index.json is not prepared
    with pytest.raises(FileNotFoundError, match="not a .completely. prepared"):
        data.PreparedSource(out)
    monkeypatch.setattr(prep, "_write_shard", real)
    data.prepare_dataset(str(text), str(root / "tok"), MAX_LEN, str(out), num_workers=0, lines_per_shard=150)
    assert len(data.PreparedSource(out)) == len(data.PreparedSource(root / "prep"))


def test_cli_and_user_errors(corpus, tmp_path, capsys):
    root, text, _, _, ids, _ = corpus
    out = tmp_path / "cli"
    assert (
        prep.main(
            [
                f"--input={text}",
                f"--tokenizer={root / 'tok'}",
                f"--max_length={MAX_LEN}",
                f"--output={out}",
                "--num_workers=0",
            ]
        )
        == 0
    )
    assert len(data.PreparedSource(f"prepared:{out}")) == len(ids)
    assert f"prepared {len(ids)} examples" in capsys.readouterr().err
    assert (
        prep.main(
            [f"--input={tmp_path / 'nope*.txt'}", f"--tokenizer={root / 'tok'}", "--max_length=8", f"--output={out}"]
        )
        == 2
    )
    assert "matches nothing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    for tokenizer, needle in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "cannot load a tokenizer")):
        flags = [f"--input={text}", f"--tokenizer={tokenizer}", "--max_length=8", f"--output={tmp_path / 'o'}"]
        assert prep.main(flags) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --tokenizer='{tokenizer}': {needle}") and "hub id" in err, err
    assert not (tmp_path / "o").exists()


def test_column_and_int32_ids(tmp_path):
    words = [f"w{i}" for i in range(70000)]
    lines = [f"{i}\t" + " ".join(words[i * 700 : (i + 1) * 700]) for i in range(100)]
    (tmp_path / "big.tsv").write_text("\n".join(lines) + "\n")
    tok = data.train_word_tokenizer([" ".join(words)], tmp_path / "tok", family="t5", vocab_size=70003)
    index = data.prepare_dataset(
        str(tmp_path / "big.tsv"), str(tmp_path / "tok"), 1024, str(tmp_path / "p"), column=1, num_workers=0
    )
    texts, _ = data.read_examples(str(tmp_path / "big.tsv"), column=1)
    ids, _ = data.encode_texts(tok, texts, 1024)
    src = data.PreparedSource(tmp_path / "p")
    assert index["dtype"] == "<i4" and all(np.array_equal(a, b) for a, b in zip(src.__getitems__(range(100)), ids))


def test_fingerprint_survives_save_and_load_and_tells_tokenizers_apart(corpus, tmp_path):
    from transformers import AutoTokenizer

    root, _, tok, _, _, _ = corpus
    tok("a b c", truncation=True, max_length=2)  # call-time settings do not change the fingerprint
    tok.save_pretrained(tmp_path / "copy")
    saved = root / "prep" / "tokenizer"
    assert (
        data.tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "copy"))
        == data.tokenizer_fingerprint(tok)
        == data.tokenizer_fingerprint(AutoTokenizer.from_pretrained(saved))
    )
    other = data.train_word_tokenizer(data.synthetic_sentences(50, 9), tmp_path / "other", vocab_size=64)
    assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(tok)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encode_ids_equals_encode_texts(family, tmp_path):
    texts = data.synthetic_sentences(200, 1) + [" ".join(["cat"] * 60)]
    tok = data.train_word_tokenizer(texts, tmp_path / family, family=family, vocab_size=128)
    want, stats = data.encode_texts(tok, texts, 16)
    got, truncated, longest = data.prepared.encode_ids(tok, texts, 16)
    assert [list(x) for x in want] == got and (truncated, longest) == (stats["truncated"], stats["max_length_seen"])


@pytest.mark.parametrize("remainder,shard", [("reuse", (0, 1)), ("drop", (0, 1)), ("reuse", (1, 2))])
def test_same_batches_as_the_text_file(corpus, remainder, shard):
    root, _, _, _, ids, _ = corpus
    kw = dict(BATCH, seed=5, remainder=remainder, shard_index=shard[0], shard_count=shard[1])
    want = GrainTrainIterator(ids, num_threads=0, **kw)  # what a text-file run reads (tokenized in memory)
    got = GrainTrainIterator(data.PreparedSource(root / "prep"), **kw)
    assert got.steps_per_epoch == want.steps_per_epoch and got.boundaries == want.boundaries
    for _ in range(2 * want.steps_per_epoch + 3):  # across two epoch boundaries
        assert _equal(next(got), next(want))
        assert got.get_state() == want.get_state()
    got.close()


@pytest.fixture(scope="module")
def three_sources(corpus, tmp_path_factory):
    """The corpus's examples as a text file, a built TFDS data set and a prepared folder, each with a train
    split (every example) and a valid split (the first 150): {'text': (train, valid), 'tfds': ..., 'prepared':
    ...} specs, and the TFDS data dir."""
    from flax_textvae.data.textvae_corpora import prepare

    root, text, tok, _, _, _ = corpus
    base = tmp_path_factory.mktemp("three_sources")
    manual = base / "manual" / "ptb"
    manual.mkdir(parents=True)
    texts, _ = data.read_examples(str(text))
    texts = [t.replace("\ufeff", "") for t in texts]  # the TFDS builder drops byte-order marks
    for split, lines in (("train", texts), ("valid", texts[:150]), ("test", texts[:10])):
        (manual / f"{split}.txt").write_text("\n".join(lines) + "\n")
    prepare("ptb", base / "manual", base / "tfds")
    for split in ("train", "valid"):
        data.prepare_dataset(
            str(manual / f"{split}.txt"),
            str(root / "tok"),
            MAX_LEN,
            str(base / f"p_{split}"),
            num_workers=0,
            progress=False,
        )
    specs = {
        "text": tuple(str(manual / f"{s}.txt") for s in ("train", "valid")),
        "tfds": tuple(f"tfds:text_vae_corpora/ptb:{s}" for s in ("train", "valid")),
        "prepared": tuple(f"prepared:{base / f'p_{s}'}" for s in ("train", "valid")),
    }
    return specs, base / "tfds"


def _pipeline(specs, tfds_dir, tok, process_index=0, process_count=1, **overrides):
    from flax_textvae import input_pipeline

    config = _tiny(
        **{
            "data.train": specs[0],
            "data.eval": specs[1],
            "data.max_length": MAX_LEN,
            "data.num_buckets": 3,
            "data.tfds_data_dir": str(tfds_dir),
            "batch_size": 16,
            "seed": 5,
            **overrides,
        }
    )
    return input_pipeline.make_pipeline(
        config,
        tok,
        prompt=(2, 0),
        tokenizer_name=str(tok.name_or_path),
        process_index=process_index,
        process_count=process_count,
    )


def test_text_tfds_and_prepared_sources_give_the_same_batches(corpus, three_sources, capsys):
    specs, tfds_dir = three_sources
    tok, ids = corpus[2], corpus[4]
    layouts = [(0, 1), (0, 2), (1, 2)]  # (process_index, process_count)
    pipes, shown = {kind: {} for kind in specs}, {}
    for kind, lay in itertools.product(specs, layouts):
        pipes[kind][lay] = _pipeline(specs[kind], tfds_dir, tok, *lay)
        lines = capsys.readouterr().out.splitlines()  # one line per split, on process 0 only
        assert len(lines) == (2 if lay[0] == 0 else 0) and all(line.startswith("data ") for line in lines)
        shown[kind, lay] = [line.replace(spec, "SPEC") for line, spec in zip(lines, specs[kind])]
    assert shown["tfds", (0, 1)] == shown["prepared", (0, 1)] == shown["text", (0, 1)] == shown["text", (0, 2)]
    assert "truncated to data.max_length" in shown["text", (0, 1)][0]
    text = pipes["text"][(0, 1)]
    assert isinstance(pipes["tfds"][(0, 1)].train_iter.batcher.source, data.TfdsTokenSource)
    assert isinstance(pipes["prepared"][(0, 1)].eval.source, data.PreparedSource)
    steps = text.train_iter.steps_per_epoch
    assert steps == -(-len(ids) // 16) and text.train_iter.num_shapes <= 4
    train = {
        (kind, lay): [next(p.train_iter) for _ in range(3 * steps)]  # three epochs
        for kind, by_lay in pipes.items()
        for lay, p in by_lay.items()
    }
    for (kind, lay), stream in train.items():
        assert all(_equal(a, b) for a, b in zip(stream, train["text", lay], strict=True)), (kind, lay)
        assert pipes[kind][lay].train_iter.get_state() == {"epoch": 2, "position": steps}
    for a, b, whole in zip(train["text", (0, 2)], train["text", (1, 2)], train["text", (0, 1)], strict=True):
        assert _equal({k: np.concatenate([a[k], b[k]]) for k in a}, whole)  # the two processes' rows
    assert len({b["input_ids"].tobytes() for b in train["text", (0, 1)][:steps]}) == steps  # batches differ
    other_seed = next(_pipeline(specs["text"], tfds_dir, tok, seed=6).train_iter)
    assert not _equal(other_seed, train["text", (0, 1)][0])
    evals = {(kind, lay): list(p.eval_batches()) for kind, by_lay in pipes.items() for lay, p in by_lay.items()}
    for stream in evals.values():  # unsharded: every process reads whole batches, in example order
        assert all(_equal(a, b) for a, b in zip(stream, evals["text", (0, 1)], strict=True))
    whole = evals["text", (0, 1)]
    assert sorted(i for b in whole for i in b["index"].tolist() if i >= 0) == list(range(150))
    for kind in specs:
        mine = [list(pipes[kind][lay].eval_subset(0, sharded=True)()) for lay in layouts[1:]]
        for a, b, w in zip(*mine, whole, strict=True):
            assert a["input_ids"].shape[0] == 8 and _equal({k: np.concatenate([a[k], b[k]]) for k in a}, w)
        first = [list(pipes[kind][(0, 1)].eval_subset(40)()) for _ in range(2)]  # re-iterable
        assert all(_equal(a, b) and _equal(a, c) for a, b, c in zip(*first, text.eval_subset(40)(), strict=True))
        assert sorted(i for b in first[0] for i in b["index"].tolist() if i >= 0) == list(range(40))
    assert list(pipes["tfds"][(0, 1)].eval_texts[:150]) == list(text.eval_texts) and len(text.eval_texts) == 150
    assert pipes["tfds"][(0, 1)].eval_texts[-1] == text.eval_texts[149]
    decoded = tok.batch_decode(
        [x.tolist() for x in text.eval.source.__getitems__(range(150))], skip_special_tokens=True
    )
    assert list(pipes["prepared"][(0, 1)].eval_texts[:150]) == [t.strip() for t in decoded]
    for kind in specs:
        assert pipes[kind][(0, 1)].eval_stats["truncated"] == text.eval_stats["truncated"] > 0
        for p in pipes[kind].values():
            p.train_iter.close()


def test_make_pipeline_without_training_or_eval(corpus, three_sources):
    specs, tfds_dir = three_sources
    tok = corpus[2]
    from flax_textvae import input_pipeline

    fields = {
        "data.train": specs["tfds"][0],
        "data.eval": specs["tfds"][1],
        "data.max_length": MAX_LEN,
        "data.tfds_data_dir": str(tfds_dir),
    }
    with pytest.raises(ValueError, match="data.column=1 only applies to text files"):
        input_pipeline.make_pipeline(
            _tiny(**fields, **{"data.column": 1}),
            tok,
            prompt=(2, 0),
            tokenizer_name="tok",
            process_index=0,
            process_count=1,
        )
    config = _tiny(**fields)
    eval_only = input_pipeline.make_pipeline(
        config,
        tok,
        prompt=(2, 0),
        tokenizer_name="tok",
        process_index=0,
        process_count=1,
        train=False,
        eval_spec=specs["text"][1],
        eval_batch_size=48,
    )
    assert eval_only.train_iter is None and eval_only.eval_spec == specs["text"][1]
    batches = list(eval_only.eval_batches())
    assert all(b["input_ids"].shape[0] == 48 for b in batches)
    assert sum(b["example_weight"].sum() for b in batches) == 150
    none = input_pipeline.make_pipeline(
        config, tok, prompt=(2, 0), tokenizer_name="tok", process_index=0, process_count=1, train=False, with_eval=False
    )
    assert none.eval_batches is None and none.eval_spec == "" and list(none.eval_texts) == []
    with pytest.raises(ValueError, match="no eval split"):
        none.eval_subset(10)


def test_exact_resume(corpus):
    root, _, _, _, ids, _ = corpus
    src = data.PreparedSource(root / "prep")
    ref = GrainTrainIterator(src, seed=2, **BATCH)
    steps = ref.steps_per_epoch
    stream = [next(ref) for _ in range(2 * steps + 4)]
    for k in (0, 5, steps, steps + 1, 2 * steps):
        it = GrainTrainIterator(src, seed=2, **BATCH)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as the checkpoint's meta stores it
        fresh = GrainTrainIterator(data.PreparedSource(root / "prep"), seed=2, num_threads=0, **BATCH)
        fresh.set_state(state)
        assert all(_equal(next(fresh), stream[k + i]) for i in range(4)), k
        text_it = GrainTrainIterator(ids, seed=2, num_threads=0, **BATCH)  # states work across sources
        text_it.set_state(state)
        assert _equal(next(text_it), stream[k])
    with pytest.raises(ValueError, match="batches per epoch"):
        GrainTrainIterator(src, seed=2, **BATCH).set_state({"epoch": 0, "position": steps + 1})


def test_worker_processes_give_the_same_batches(corpus):
    root, _, _, _, ids, _ = corpus
    it = GrainTrainIterator(data.PreparedSource(root / "prep"), seed=4, num_workers=2, **BATCH)
    want = GrainTrainIterator(ids, seed=4, num_threads=0, **BATCH)
    try:
        assert all(_equal(next(it), next(want)) for _ in range(want.steps_per_epoch + 2))
    finally:
        it.close()


def test_eval_covers_every_example_once_also_sharded(corpus):
    root, _, _, _, ids, _ = corpus
    src = data.PreparedSource(root / "prep")
    for n in (None, 100):
        want = list(GrainEvalIterator(ids[:n] if n else ids, **BATCH))
        got = GrainEvalIterator(src, num_examples=n, **BATCH)
        assert len(got) == len(want) and all(_equal(a, b) for a, b in zip(got, want))
        assert all(_equal(a, b) for a, b in zip(got, want))  # re-iterable
    seen = []
    for shard in (0, 1):
        for b in GrainEvalIterator(src, shard_index=shard, shard_count=2, **BATCH):
            assert b["input_ids"].shape[0] == 8
            real = b["index"] >= 0
            assert np.array_equal(real, b["example_weight"] > 0) and not b["label_weights"][~real].any()
            for row, i in zip(b["input_ids"][real], b["index"][real]):
                assert np.array_equal(row[: len(ids[i])], ids[i])
            seen += b["index"][real].tolist()
    assert sorted(seen) == list(range(len(ids)))


def _tiny(**overrides):
    """``configs/tiny.py`` with dotted-key overrides."""
    import importlib.util

    from flax_textvae.configuration import with_overrides

    path = pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return with_overrides(module.get_config(), **overrides)


def test_build_run_reads_prepared_specs(corpus, tmp_path):
    from flax_textvae import builders, validation

    root, text, _, _, _, _ = corpus
    by_text = builders.build_run(
        _tiny(**{"data.train": str(text), "data.eval": str(text), "data.max_length": MAX_LEN}), str(tmp_path / "a")
    )
    # prepared with the tokenizer the text run trained (the same vocabulary, so the same fingerprint)
    data.prepare_dataset(str(text), str(tmp_path / "a" / "model"), MAX_LEN, str(tmp_path / "p"), num_workers=0)
    spec = f"prepared:{tmp_path / 'p'}"
    by_prep = builders.build_run(
        _tiny(**{"data.train": spec, "data.eval": spec, "data.max_length": MAX_LEN}), str(tmp_path / "b")
    )
    assert isinstance(by_prep.train_iter, GrainTrainIterator)
    assert all(_equal(next(by_prep.train_iter), next(by_text.train_iter)) for _ in range(5))
    assert all(_equal(a, b) for a, b in zip(by_prep.eval_batches(), by_text.eval_batches()))
    assert all(_equal(a, b) for a, b in zip(by_prep.eval_subset(40)(), by_text.eval_subset(40)()))
    shown = by_prep.eval_texts[:3]  # decoded from the ids: a truncated example shows its kept tokens
    assert len(shown) == 3 and all(full.startswith(t) and t for t, full in zip(shown, by_text.eval_texts))
    assert by_prep.eval_stats["truncated"] == by_text.eval_stats["truncated"] > 0
    # a prepared set made with another tokenizer is refused, naming both
    data.train_word_tokenizer(data.synthetic_sentences(50, 9), tmp_path / "other", vocab_size=64)
    data.prepare_dataset(str(text), str(tmp_path / "other"), MAX_LEN, str(tmp_path / "q"), num_workers=0)
    config = _tiny(**{"data.train": str(text), "data.eval": f"prepared:{tmp_path / 'q'}", "data.max_length": MAX_LEN})
    with pytest.raises(validation.ConfigError, match=r"(?s)prepared with tokenizer .*other.*model's tokenizer is"):
        builders.build_run(config, str(tmp_path / "c"))
    # examples truncated at MAX_LEN are not what a run with a longer max_length reads
    config = _tiny(**{"data.train": str(text), "data.eval": spec, "data.max_length": MAX_LEN + 8})
    with pytest.raises(validation.ConfigError) as refused:
        builders.build_run(config, str(tmp_path / "d"))
    # both fixes, the one an evaluation can take (prepare again) first
    message = str(refused.value)
    assert f"prepared with max_length={MAX_LEN}" in message and f"data.max_length={MAX_LEN + 8}" in message
    assert message.index(f"prepare it again with --max_length={MAX_LEN + 8}") < message.index(
        f"train with data.max_length={MAX_LEN}"
    ), message


def test_build_run_reads_tfds_specs_through_their_token_source(three_sources, tmp_path):
    from flax_textvae import builders

    specs, tfds_dir = three_sources
    common = {"data.max_length": MAX_LEN, "data.tfds_data_dir": str(tfds_dir)}
    by_text = builders.build_run(
        _tiny(**{"data.train": specs["text"][0], "data.eval": specs["text"][1], **common}), str(tmp_path / "a")
    )
    by_tfds = builders.build_run(
        _tiny(**{"data.train": specs["tfds"][0], "data.eval": specs["tfds"][1], **common}), str(tmp_path / "b")
    )
    assert isinstance(by_tfds.train_iter.batcher.source, data.TfdsTokenSource)  # not read into memory
    assert isinstance(by_tfds.data.eval.source, data.TfdsTokenSource) and by_tfds.eval_spec == specs["tfds"][1]
    # the word tokenizer of a from-scratch model is trained on the same texts either way
    assert data.tokenizer_fingerprint(by_tfds.tokenizer) == data.tokenizer_fingerprint(by_text.tokenizer)
    steps = by_text.train_iter.steps_per_epoch
    assert all(_equal(next(by_tfds.train_iter), next(by_text.train_iter)) for _ in range(steps + 2))
    assert by_tfds.train_iter.get_state() == by_text.train_iter.get_state() == {"epoch": 1, "position": 2}
    assert all(_equal(a, b) for a, b in zip(by_tfds.eval_batches(), by_text.eval_batches(), strict=True))
    assert all(_equal(a, b) for a, b in zip(by_tfds.eval_subset(40)(), by_text.eval_subset(40)(), strict=True))
    assert list(by_tfds.eval_texts) == list(by_text.eval_texts) and len(by_text.eval_texts) == 150
    assert by_tfds.eval_stats["truncated"] == by_text.eval_stats["truncated"] > 0
