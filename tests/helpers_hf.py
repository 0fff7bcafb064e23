"""Tiny Hugging Face models and tokenizers for tests (torch + transformers, no network).

Shared by the BART and T5 tests. Every builder writes a complete checkpoint folder (config.json,
model.safetensors, tokenizer files) that `flax_textvae.models.load_pretrained` can read, and returns
the torch model in eval mode so tests can compare logits against it.

Functions:
  * `word_vocab(n_words)` -> a list of simple distinct words ("w0", "w1", ...).
  * `make_word_tokenizer(folder, vocab_words, family="bart")` -> PreTrainedTokenizerFast saved to folder.
  * `make_tiny_bart(folder, vocab_words=None, **overrides)` -> torch BartForConditionalGeneration.
  * `make_tiny_t5(folder, v1_1=False, tie=None, vocab_words=None, **overrides)` -> torch T5ForConditionalGeneration.
  * `make_hub_bart(folder, texts, **overrides)` / `make_hub_t5(folder, texts, **overrides)`: a tiny checkpoint
    in the files the hub holds for facebook/bart-base / t5-small: BART's weights saved from the bare
    `BartModel` with a byte-level BPE as vocab.json + merges.txt; T5 with a sentencepiece spiece.model (plus
    its 100 extra ids) smaller than the embedding; no tokenizer_config.json. Each returns the LM as
    transformers itself reads the folder.
  * `padded_batch(rng, lengths, vocab_size, pad_id, low=...)` -> (ids [B, L] int32, mask [B, L] int32).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in facebook/bart-base
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0..2 as in t5-small
# The tiny sizes and the special ids (those of facebook/bart-base / t5-small) of every test checkpoint.
TINY_BART = dict(
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
)
TINY_T5 = dict(
    d_model=16,
    d_kv=8,
    d_ff=32,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def word_vocab(n_words: int) -> list[str]:
    """Returns `n_words` distinct lowercase words usable with a whitespace WordLevel tokenizer."""
    return [f"w{i}" for i in range(n_words)]


def make_word_tokenizer(folder: str | os.PathLike, vocab_words: Sequence[str], family: str = "bart"):
    """Builds and saves a whitespace WordLevel fast tokenizer.

    BART layout: <s>=0, <pad>=1, </s>=2, <unk>=3, words..., <mask>=last; encodes "<s> x </s>".
    T5 layout: <pad>=0, </s>=1, <unk>=2, words...; encodes "x </s>".

    Args:
      folder: where tokenizer.json / tokenizer_config.json / special_tokens_map.json go.
      vocab_words: ordinary words (no special tokens).
      family: "bart" or "t5".

    Returns:
      The transformers.PreTrainedTokenizerFast (vocabulary size len(vocab_words) + 5 for BART, + 3 for T5).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    os.makedirs(folder, exist_ok=True)
    if family == "bart":
        tokens = BART_SPECIALS + list(vocab_words) + ["<mask>"]
    elif family == "t5":
        tokens = T5_SPECIALS + list(vocab_words)
    else:
        raise ValueError(f"unknown family {family!r}")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family == "bart":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
        specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(str(folder))
    return fast


def make_tiny_bart(folder: str | os.PathLike, vocab_words: Sequence[str] | None = None, seed: int = 0, **overrides):
    """Saves a tiny random BartForConditionalGeneration (safetensors) + word tokenizer into `folder`.

    Args:
      folder: output checkpoint folder.
      vocab_words: words of the tokenizer (default 59 words -> vocab 64).
      seed: torch seed for the random weights.
      **overrides: BartConfig fields (e.g. scale_embedding=True, tie_word_embeddings=False; untied models
        get one input embedding shared by encoder and decoder and a separate lm_head).

    Returns:
      The torch model (eval mode, float32).
    """
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    words = list(vocab_words) if vocab_words is not None else word_vocab(59)
    tokenizer = make_word_tokenizer(folder, words, "bart")
    kw = dict(
        TINY_BART,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(BartConfig(**kw)).eval()
    with torch.no_grad():  # random (non-zero) biases so the bias mapping is tested
        model.final_logits_bias.normal_(0.0, 0.1)
        if not model.config.tie_word_embeddings:
            # transformers 5 unties encoder/decoder embed_tokens from `shared` too; real untied BART
            # checkpoints (and the HF Flax layout) have one input embedding and a separate lm_head.
            model.model.encoder.embed_tokens.weight.copy_(model.model.shared.weight)
            model.model.decoder.embed_tokens.weight.copy_(model.model.shared.weight)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(folder))
    return model


def make_tiny_t5(
    folder: str | os.PathLike,
    v1_1: bool = False,
    tie: bool | None = None,
    vocab_words: Sequence[str] | None = None,
    seed: int = 0,
    **overrides,
):
    """Saves a tiny random T5ForConditionalGeneration (safetensors) + word tokenizer into `folder`.

    Args:
      folder: output checkpoint folder.
      v1_1: T5 v1.1 style (gated-gelu FFN, untied LM head) instead of original T5 (relu, tied).
      tie: override tie_word_embeddings (default: True for T5, False for v1.1).
      vocab_words: words of the tokenizer (default 61 words -> vocab 64).
      seed: torch seed for the random weights.
      **overrides: T5Config fields.

    Returns:
      The torch model (eval mode, float32).
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    words = list(vocab_words) if vocab_words is not None else word_vocab(61)
    tokenizer = make_word_tokenizer(folder, words, "t5")
    kw = dict(
        TINY_T5,
        vocab_size=len(tokenizer),
        dropout_rate=0.1,
        feed_forward_proj="gated-gelu" if v1_1 else "relu",
        tie_word_embeddings=(not v1_1) if tie is None else tie,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**kw)).eval()
    model.save_pretrained(str(folder))
    return model


def padded_batch(
    rng: np.random.Generator,
    lengths: Sequence[int],
    vocab_size: int,
    pad_id: int,
    low: int = 4,
    max_len: int | None = None,
):
    """Random right-padded id batch.

    Args:
      rng: numpy Generator.
      lengths: real length of each row (>= 1).
      vocab_size: ids are drawn from [low, vocab_size).
      pad_id: id written at padded positions.
      low: smallest id drawn (skip special tokens).
      max_len: row width (default max(lengths)).

    Returns:
      (ids [B, L] int32, mask [B, L] int32 with 1 on real tokens).
    """
    width = max_len or max(lengths)
    ids = np.full((len(lengths), width), pad_id, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(low, vocab_size, size=n)
        mask[b, :n] = 1
    return ids, mask


def make_bpe_tokenizer_files(folder: str | os.PathLike, texts: Sequence[str], vocab_size: int = 400) -> int:
    """Writes vocab.json + merges.txt of a byte-level BPE learned from ``texts`` (the tokenizer files of
    facebook/bart-base: <s> <pad> </s> <unk> are ids 0..3, <mask> the last id); returns the vocabulary size."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(folder, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, special_tokens=BART_SPECIALS)
    bpe.add_special_tokens(["<mask>"])
    bpe.save_model(str(folder))
    return bpe.get_vocab_size()


def make_spiece_model(folder: str | os.PathLike, texts: Sequence[str], vocab_size: int = 200) -> None:
    """Writes spiece.model, a unigram sentencepiece learned from ``texts`` with t5-small's special ids
    (<pad> 0, </s> 1, <unk> 2, no BOS)."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=os.path.join(str(folder), "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    os.remove(os.path.join(str(folder), "spiece.vocab"))


def make_hub_bart(folder: str | os.PathLike, texts: Sequence[str], seed: int = 0, **overrides):
    """A tiny BART in facebook/bart-base's files: config.json naming ``BartModel``, model.safetensors of the
    bare encoder-decoder (no ``model.`` prefix, no final_logits_bias), vocab.json + merges.txt.

    Returns:
      The torch BartForConditionalGeneration that transformers builds from the folder (eval mode).
    """
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BartModel

    vocab = make_bpe_tokenizer_files(folder, texts)
    kw = {**TINY_BART, "vocab_size": vocab, "max_position_embeddings": 128, "architectures": ["BartModel"], **overrides}
    torch.manual_seed(seed)
    model = BartModel(BartConfig(**kw))
    with torch.no_grad():  # random (non-zero) biases so their mapping is tested
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(folder))
    return BartForConditionalGeneration.from_pretrained(str(folder)).eval()


def make_hub_t5(folder: str | os.PathLike, texts: Sequence[str], seed: int = 0, **overrides):
    """A tiny T5 in t5-small's files: config.json, model.safetensors of T5ForConditionalGeneration (tied head),
    spiece.model; the tokenizer (pieces + 100 extra ids) is smaller than the embedding, as t5-small's 32100
    tokens are than its 32128 rows.

    Returns:
      The torch T5ForConditionalGeneration that transformers builds from the folder (eval mode).
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    make_spiece_model(folder, texts)
    tokens = len(T5Tokenizer.from_pretrained(str(folder)))
    kw = {**TINY_T5, "vocab_size": tokens + 28, "feed_forward_proj": "relu", **overrides}
    torch.manual_seed(seed)
    T5ForConditionalGeneration(T5Config(**kw)).save_pretrained(str(folder))
    return T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
