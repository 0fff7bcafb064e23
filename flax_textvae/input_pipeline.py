"""A run's data from its config and tokenizer: every split read through the same grain iterators.

``make_pipeline(config, tokenizer, prompt=..., tokenizer_name=..., process_index=..., process_count=...)``
opens ``data.train`` and the eval split as random-access sources of token-id rows and batches them with
``data.GrainTrainIterator`` / ``data.GrainEvalIterator``: the static length buckets of ``data.num_buckets``,
a per-epoch shuffle keyed by ``seed``, each process's rows of every global training batch, exact resume from
the iterator's ``get_state()``, every eval example exactly once. A split is

* a text file (``data.column`` picks a tab-separated column) or ``synthetic:N[:SEED]``: read
  (``read_examples``) and tokenized (``encode_texts``) in memory into an ``ArraySource``;
* ``tfds:NAME[/CONFIG][:SPLIT]`` (``data.tfds_data_dir``, ``data.text_field``): a ``TfdsTokenSource``, which
  keeps only the lengths and record numbers and tokenizes the records as they are batched;
* ``prepared:DIR``: a ``PreparedSource``, refused unless prepared with this tokenizer and ``data.max_length``.

The same examples give the same batches from every source. Opening a split prints one line on process 0:
what was read, skipped and truncated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

from flax_textvae import data as data_lib
from flax_textvae.data.batching import Batch
from flax_textvae.data.grain_pipeline import GrainEvalIterator, GrainTrainIterator
from flax_textvae.data.sources import TFDS_PREFIX
from flax_textvae.data.token_sources import ArraySource, TfdsTokenSource
from flax_textvae.validation import ConfigError


class TextReader:
    """``read_examples`` with a config's ``data.column``, ``data.text_field`` and ``data.tfds_data_dir``.

    Each spec is read at most once, so a training file read to train a word tokenizer is not read again for
    its batches.

    Args:
      data_config: the run's ``config.data``.
    """

    def __init__(self, data_config: Any):
        self.data_config = data_config
        self._read: dict[str, tuple[list[str], dict[str, Any]]] = {}

    def __call__(self, spec: str) -> tuple[list[str], dict[str, Any]]:
        """(texts, ``read_examples`` stats) of ``spec``."""
        if spec not in self._read:
            c = self.data_config
            self._read[spec] = data_lib.read_examples(
                spec,
                column=None if c.column < 0 else c.column,
                text_field=c.text_field or None,
                data_dir=c.tfds_data_dir or None,
            )
        return self._read[spec]


@dataclasses.dataclass
class Split:
    """One opened split.

    Attributes:
      spec: the data spec.
      source: its token source (``ArraySource``, ``TfdsTokenSource`` or ``PreparedSource``).
      texts: the examples' texts in example order (for ``prepared:DIR``, decoded from the ids).
      stats: ``read_examples``' counters (``lines_read``, ``empty_skipped``, ``undecodable_skipped``, ...) and
        ``encode_texts``' (``examples``, ``truncated``, ``tokens``, ``max_length_seen``, ``mean_length``).
    """

    spec: str
    source: Any
    texts: Sequence[str]
    stats: dict


def open_split(
    data_config: Any,
    spec: str,
    tokenizer: Any,
    *,
    tokenizer_name: str,
    name: str,
    reader: TextReader | None = None,
    report: bool = True,
) -> Split:
    """Opens ``spec`` as a token source of the tokenizer's ids, truncated to ``data_config.max_length``.

    Args:
      data_config: the run's ``config.data``.
      spec: a text file, ``synthetic:N[:SEED]``, ``tfds:NAME[/CONFIG][:SPLIT]`` or ``prepared:DIR``.
      tokenizer: the model's tokenizer.
      tokenizer_name: how the tokenizer is known (hub id or folder), for the messages.
      name: the split's config field (``train`` or ``eval``), for the messages.
      reader: reads text files and ``synthetic:`` specs (default: a new ``TextReader``).
      report: print the split's line (what was read, skipped and truncated).

    Raises:
      ConfigError: a prepared data set made with another tokenizer or ``max_length``.
      FileNotFoundError, ValueError: a missing file, an unbuilt TFDS data set, a bad spec (``read_examples``).
    """
    max_length = data_config.max_length
    if data_lib.is_prepared_spec(spec):
        source = data_lib.PreparedSource(spec)
        problems = data_lib.prepared.compatibility_problems(
            source.index, tokenizer, max_length, spec=spec, tokenizer_name=tokenizer_name
        )
        if problems:
            raise ConfigError(problems, subject=f"data.{name}")
        split = Split(
            spec, source, data_lib.DecodedTexts(source, tokenizer), dict(source.index["stats"], examples=len(source))
        )
    elif spec.startswith(TFDS_PREFIX):
        if data_config.column >= 0:
            raise ValueError(
                f"data.column={data_config.column} only applies to text files, not to {spec!r}; "
                "data.text_field picks the TFDS feature"
            )
        source = TfdsTokenSource(
            spec,
            tokenizer,
            max_length,
            data_dir=data_config.tfds_data_dir or None,
            text_field=data_config.text_field or None,
        )
        split = Split(spec, source, source.texts, source.stats)
    else:
        texts, read_stats = (reader or TextReader(data_config))(spec)
        ids, tok_stats = data_lib.encode_texts(tokenizer, texts, max_length)
        split = Split(spec, ArraySource(ids), texts, {**read_stats, **tok_stats})
    if report:
        _report(name, split, max_length)
    return split


def _report(name: str, split: Split, max_length: int) -> None:
    """The split's line: examples, mean length, what was skipped and truncated."""
    s = split.stats
    skipped = [
        f"{s.get(k, 0)} {what}"
        for k, what in (("empty_skipped", "empty lines skipped"), ("undecodable_skipped", "undecodable lines skipped"))
        if s.get(k, 0)
    ]
    if s.get("truncated", 0):
        skipped.append(f"{s['truncated']} truncated to data.max_length={max_length}")
    print(
        f"data {name}: {split.spec}: {s.get('examples', 0)} examples, mean {s.get('mean_length', 0):.1f} tokens"
        + (f" ({', '.join(skipped)})" if skipped else ""),
        flush=True,
    )


@dataclasses.dataclass
class Pipeline:
    """A run's batches: the training iterator and the eval split's batches.

    Attributes:
      train_iter: ``GrainTrainIterator`` over ``data.train`` (None when made without ``train``); its
        ``get_state()`` / ``set_state()`` are what a checkpoint stores of the data position.
      eval: the opened eval split (None when made without ``with_eval``).
      eval_layout: the ``Batcher`` arguments of the eval batches (batch size, ids, buckets).
      process_index, process_count: this process and how many read the training batches together.
    """

    train_iter: GrainTrainIterator | None = None
    eval: Split | None = None
    eval_layout: dict = dataclasses.field(default_factory=dict)
    process_index: int = 0
    process_count: int = 1
    _eval_iterators: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def eval_spec(self) -> str:
        """The eval split's spec ('' without one)."""
        return self.eval.spec if self.eval is not None else ""

    @property
    def eval_texts(self) -> Sequence[str]:
        """The eval examples' texts, in example order."""
        return self.eval.texts if self.eval is not None else []

    @property
    def eval_stats(self) -> dict:
        """What reading the eval split counted (``Split.stats``)."""
        return self.eval.stats if self.eval is not None else {}

    @property
    def eval_batches(self) -> Callable[[], Iterator[Batch]] | None:
        """``eval_subset(0)``: every eval example once (None without an eval split)."""
        return self.eval_subset(0) if self.eval is not None else None

    def eval_subset(self, n: int = 0, *, sharded: bool = False) -> Callable[[], Iterator[Batch]]:
        """The batches of the eval split's first ``n`` examples in example order (0: all), each exactly once.

        Args:
          n: how many examples (0: all).
          sharded: this process's rows of every global batch, so the processes together read each example
            once (the batch size must be divisible by ``process_count``); otherwise every process reads whole
            batches.

        Returns:
          A callable that returns a fresh pass over the batches.
        """
        if self.eval is None:
            raise ValueError("this pipeline has no eval split (it was made with with_eval=False)")
        key = (int(n), bool(sharded))
        if key not in self._eval_iterators:
            shard = dict(shard_index=self.process_index, shard_count=self.process_count) if sharded else {}
            self._eval_iterators[key] = GrainEvalIterator(
                self.eval.source, num_examples=n or None, **self.eval_layout, **shard
            )
        batches = self._eval_iterators[key]
        return lambda: iter(batches)


def make_pipeline(
    config: Any,
    tokenizer: Any,
    *,
    prompt: Sequence[int],
    tokenizer_name: str,
    process_index: int,
    process_count: int,
    train: bool = True,
    eval_spec: str | None = None,
    eval_batch_size: int | None = None,
    with_eval: bool = True,
    reader: TextReader | None = None,
) -> Pipeline:
    """Opens a run's splits and builds its training iterator and eval batches.

    Args:
      config: the run's ConfigDict (``data.*``, ``batch_size``, ``seed``).
      tokenizer: the model's tokenizer (its ``pad_token_id`` pads the batches).
      prompt: the decoder prompt, ``(decoder_start,)`` or ``(decoder_start, bos)``: the decoder start id of
        the batches and, with two ids, the leading BOS whose label weight is 0.
      tokenizer_name: how the tokenizer is known (hub id or folder), for the messages.
      process_index, process_count: this process and the number of processes; each reads its
        ``batch_size / process_count`` rows of every global training batch.
      train: build the training iterator over ``data.train``.
      eval_spec, eval_batch_size: the eval split (default ``data.eval``) and its batch size (default ``batch_size``).
      with_eval: open the eval split.
      reader: a ``TextReader`` that may hold texts already read (default: a new one).

    Returns:
      The ``Pipeline`` with the training iterator (when ``train``) and the opened eval split (when ``with_eval``).
    """
    c = config.data
    layout = _batch_layout(c, tokenizer, prompt)
    opened = functools.partial(
        open_split,
        c,
        tokenizer=tokenizer,
        tokenizer_name=tokenizer_name,
        reader=reader or TextReader(c),
        report=process_index == 0,
    )
    pipeline = Pipeline(process_index=int(process_index), process_count=int(process_count))
    if train:
        pipeline.train_iter = GrainTrainIterator(
            opened(c.train, name="train").source,
            batch_size=config.batch_size,
            seed=config.seed,
            shard_index=process_index,
            shard_count=process_count,
            **layout,
        )
    if with_eval:
        pipeline.eval = opened(eval_spec or c.eval, name="eval")
        pipeline.eval_layout = dict(layout, batch_size=eval_batch_size or config.batch_size)
    return pipeline


def _batch_layout(data_config: Any, tokenizer: Any, prompt: Sequence[int]) -> dict:
    """The batch arguments that the training and the eval batches share: padding, decoder prompt ids, buckets."""
    return dict(
        pad_id=tokenizer.pad_token_id,
        decoder_start_id=prompt[0],
        bos_id=prompt[1] if len(prompt) > 1 else None,
        max_length=data_config.max_length,
        num_buckets=data_config.num_buckets,
    )
