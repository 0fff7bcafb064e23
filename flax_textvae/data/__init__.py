"""Input pipeline: text files / TFDS array_record -> token ids -> static-shape length-bucketed batches.

No TensorFlow is needed at run time. ``TextVaeCorpora`` (the TFDS builder) and ``prepare_text_vae_corpora``
are loaded lazily, so importing this package does not import tensorflow_datasets.
"""
from flax_textvae.data.batching import (Batch, Batcher, BucketedIterator, EvalIterator, TrainIterator,
                                        bucket_index, collate, make_buckets, padding_fraction, round_up)
from flax_textvae.data.sources import DatasetNotBuiltError, parse_tfds_spec, read_examples
from flax_textvae.data.synthetic import synthetic_sentences, synthetic_vocabulary
from flax_textvae.data.tokenize import encode_texts, train_word_tokenizer

__all__ = [
    "Batch", "Batcher", "BucketedIterator", "DatasetNotBuiltError", "EvalIterator", "TrainIterator", "bucket_index",
    "collate",
    "make_buckets", "padding_fraction",
    "round_up", "parse_tfds_spec", "read_examples", "synthetic_sentences", "synthetic_vocabulary",
    "encode_texts", "train_word_tokenizer", "TextVaeCorpora", "prepare_text_vae_corpora",
]


def __getattr__(name: str):
    if name == "TextVaeCorpora":
        from flax_textvae.data.textvae_corpora import TextVaeCorpora
        return TextVaeCorpora
    if name == "prepare_text_vae_corpora":
        from flax_textvae.data.textvae_corpora import prepare
        return prepare
    raise AttributeError(f"module 'flax_textvae.data' has no attribute {name!r}")
