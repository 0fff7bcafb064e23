"""Tests for flax_textvae.data.tokenize: offline word tokenizers and encode_texts."""

import numpy as np
import pytest

from flax_textvae.data import encode_texts, synthetic_sentences, train_word_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran to the <unk> park", "the the cat", "birds fly"]


@pytest.fixture(scope="module", params=["bart", "t5"])
def tok(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    return request.param, train_word_tokenizer(TEXTS, folder, family=request.param, vocab_size=64)


def test_special_layout(tok):
    family, t = tok
    if family == "bart":
        assert (t.bos_token_id, t.pad_token_id, t.eos_token_id, t.unk_token_id, t.mask_token_id) == (0, 1, 2, 3, 4)
        assert [t.convert_ids_to_tokens(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    else:
        assert (t.pad_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2)
        assert t.bos_token_id is None
        assert [t.convert_ids_to_tokens(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]


def test_encode_layout_and_round_trip(tok):
    family, t = tok
    ids = t("the cat sat")["input_ids"]
    words = [t.convert_tokens_to_ids(w) for w in ["the", "cat", "sat"]]
    assert ids == ([0] + words + [2] if family == "bart" else words + [1])
    assert t.decode(ids, skip_special_tokens=True) == "the cat sat"
    for text in TEXTS:
        if "<unk>" not in text:
            assert t.decode(t(text)["input_ids"], skip_special_tokens=True) == text
    # unknown words map to <unk>; <unk> is special, so skip_special_tokens drops it (documented)
    ids = t("the zebra")["input_ids"]
    assert t.unk_token_id in ids
    assert t.decode(ids, skip_special_tokens=True) == "the"


def test_saved_folder_round_trips(tok, tmp_path):
    from transformers import AutoTokenizer

    _, t = tok
    t.save_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert t2("the cat sat")["input_ids"] == t("the cat sat")["input_ids"]
    assert t2.eos_token_id == t.eos_token_id and t2.pad_token_id == t.pad_token_id


def test_vocab_size_and_min_freq(tmp_path):
    t = train_word_tokenizer(["a a a b b c"], tmp_path / "v", family="bart", vocab_size=7)
    assert len(t) == 7  # 5 specials + 'a' + 'b' (most frequent first)
    assert t.convert_tokens_to_ids("a") == 5 and t.convert_tokens_to_ids("b") == 6
    t = train_word_tokenizer(["a a a b b c"], tmp_path / "f", family="t5", vocab_size=100, min_freq=2)
    assert len(t) == 5 and t("c")["input_ids"] == [2, 1]
    with pytest.raises(ValueError, match="family"):
        train_word_tokenizer(["a"], tmp_path / "x", family="gpt2")


def test_encode_texts_truncation_keeps_eos(tok):
    family, t = tok
    texts = ["the cat sat on the mat", "the cat", "birds fly birds fly birds fly birds fly"]
    ids, stats = encode_texts(t, texts, max_length=5)
    assert all(x.dtype == np.int32 and len(x) <= 5 for x in ids)
    assert all(x[-1] == t.eos_token_id for x in ids)
    assert stats["truncated"] == 2 and stats["examples"] == 3
    assert stats["tokens"] == sum(len(x) for x in ids)
    full = t(texts[0])["input_ids"]
    assert stats["max_length_seen"] == len(t(texts[2])["input_ids"])
    np.testing.assert_array_equal(ids[0], full[:4] + [t.eos_token_id])
    np.testing.assert_array_equal(ids[1], t("the cat")["input_ids"])
    with pytest.raises(ValueError, match="max_length"):
        encode_texts(t, texts, max_length=1)


def test_encode_texts_batched_equals_single(tmp_path):
    texts = synthetic_sentences(2100, seed=3)  # more than one tokenizer chunk
    t = train_word_tokenizer(texts, tmp_path, family="bart", vocab_size=128)
    ids, stats = encode_texts(t, texts, max_length=64)
    assert stats["examples"] == 2100 and stats["truncated"] == 0
    for i in (0, 1023, 1024, 2099):
        np.testing.assert_array_equal(ids[i], t(texts[i])["input_ids"])
        assert t.decode(ids[i], skip_special_tokens=True) == texts[i]
