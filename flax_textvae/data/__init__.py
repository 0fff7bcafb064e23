"""Input pipeline: text files / TFDS array_record -> token ids -> static-shape length-bucketed batches.

``prepared:DIR`` data sets (``prepare_dataset`` / ``python -m flax_textvae.data.prepare``) are read
through grain by ``GrainTrainIterator`` / ``GrainEvalIterator``, which give the same batches as
``TrainIterator`` / ``EvalIterator`` without holding the corpus in memory.

No TensorFlow is needed at run time. ``TextVaeCorpora`` (the TFDS builder) and ``prepare_text_vae_corpora``
are loaded lazily, so importing this package does not import tensorflow_datasets.
"""
from flax_textvae.data.batching import (
    Batch,
    Batcher,
    BucketedIterator,
    EvalIterator,
    TrainIterator,
    bucket_index,
    collate,
    make_buckets,
    padding_fraction,
    round_up,
)
from flax_textvae.data.prepared import (
    PREPARED_PREFIX,
    DecodedTexts,
    PreparedSource,
    is_prepared_spec,
    tokenizer_fingerprint,
)
from flax_textvae.data.sources import DatasetNotBuiltError, parse_tfds_spec, read_examples
from flax_textvae.data.synthetic import synthetic_sentences, synthetic_vocabulary
from flax_textvae.data.tokenize import encode_texts, train_word_tokenizer

__all__ = [
    "Batch", "Batcher", "BucketedIterator", "DatasetNotBuiltError", "EvalIterator", "TrainIterator", "bucket_index",
    "collate",
    "make_buckets", "padding_fraction",
    "round_up", "parse_tfds_spec", "read_examples", "synthetic_sentences", "synthetic_vocabulary",
    "encode_texts", "train_word_tokenizer", "TextVaeCorpora", "prepare_text_vae_corpora",
    "PREPARED_PREFIX", "DecodedTexts", "PreparedSource", "is_prepared_spec", "tokenizer_fingerprint",
    "GrainTrainIterator", "GrainEvalIterator", "TfdsTokenSource", "prepare_dataset",
]
# Loaded on first use: grain (the iterators), tensorflow_datasets (TfdsTokenSource) and the prepare module,
# which also runs as ``python -m flax_textvae.data.prepare``.
_LAZY = {"GrainTrainIterator": "grain_pipeline", "GrainEvalIterator": "grain_pipeline",
         "TfdsTokenSource": "grain_pipeline", "prepare_dataset": "prepare"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"flax_textvae.data.{_LAZY[name]}"), name)
    if name == "TextVaeCorpora":
        from flax_textvae.data.textvae_corpora import TextVaeCorpora
        return TextVaeCorpora
    if name == "prepare_text_vae_corpora":
        from flax_textvae.data.textvae_corpora import prepare
        return prepare
    raise AttributeError(f"module 'flax_textvae.data' has no attribute {name!r}")
