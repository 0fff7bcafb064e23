"""Input pipeline: text files / TFDS array_record / prepared folders -> token ids -> length-bucketed batches.

Every split is a random-access source of token ids (``ArraySource`` for examples tokenized in memory,
``TfdsTokenSource``, ``PreparedSource`` for ``prepared:DIR`` data sets written by ``prepare_dataset`` /
``python -m flax_textvae.data.prepare``), batched through grain by ``GrainTrainIterator`` /
``GrainEvalIterator`` (``Batcher`` holds the buckets and the batch layout); the same examples give the same
batches whatever the source. ``flax_textvae.input_pipeline`` opens a run's splits from its config.

No TensorFlow is needed at run time (tensorflow_datasets reads array_record files without it).
``prepare_dataset``, ``TextVaeCorpora`` (the TFDS builder) and ``prepare_text_vae_corpora`` are loaded on first
use: their modules also run with ``python -m``.
"""

from flax_textvae.data.batching import Batch, bucket_index, collate, make_buckets, padding_fraction, round_up
from flax_textvae.data.grain_pipeline import Batcher, GrainEvalIterator, GrainTrainIterator
from flax_textvae.data.prepared import (
    PREPARED_PREFIX,
    DecodedTexts,
    PreparedSource,
    is_prepared_spec,
    tokenizer_fingerprint,
)
from flax_textvae.data.sources import DatasetNotBuiltError, DataSpecError, parse_tfds_spec, read_examples
from flax_textvae.data.synthetic import synthetic_sentences, synthetic_vocabulary
from flax_textvae.data.token_sources import ArraySource, TfdsTokenSource
from flax_textvae.data.tokenize import encode_texts, train_word_tokenizer

__all__ = [
    "Batch",
    "DatasetNotBuiltError",
    "DataSpecError",
    "bucket_index",
    "collate",
    "make_buckets",
    "padding_fraction",
    "round_up",
    "parse_tfds_spec",
    "read_examples",
    "synthetic_sentences",
    "synthetic_vocabulary",
    "encode_texts",
    "train_word_tokenizer",
    "TextVaeCorpora",
    "prepare_text_vae_corpora",
    "PREPARED_PREFIX",
    "DecodedTexts",
    "PreparedSource",
    "is_prepared_spec",
    "tokenizer_fingerprint",
    "ArraySource",
    "Batcher",
    "GrainTrainIterator",
    "GrainEvalIterator",
    "TfdsTokenSource",
    "prepare_dataset",
]


def __getattr__(name: str):
    # The two modules that also run as `python -m flax_textvae.data.prepare` / `.textvae_corpora` are imported
    # on first use: imported by the package first, `-m` would run a second copy of them (and register the
    # TFDS builder twice).
    if name == "prepare_dataset":
        from flax_textvae.data.prepare import prepare_dataset

        return prepare_dataset
    if name == "TextVaeCorpora":
        from flax_textvae.data.textvae_corpora import TextVaeCorpora

        return TextVaeCorpora
    if name == "prepare_text_vae_corpora":
        from flax_textvae.data.textvae_corpora import prepare

        return prepare
    raise AttributeError(f"module 'flax_textvae.data' has no attribute {name!r}")
