"""Length-bucketed training and eval batches read through grain from random-access token sources.

A *token source* is any grain random-access source of token-id arrays that also knows every example's
length: ``len(source)``, ``source.__getitems__(keys) -> [int array [L_k], ...]`` and ``source.lengths``
(``[N]``). Two are provided: ``PreparedSource`` (a prepared folder) and :class:`TfdsTokenSource` (a TFDS
array_record split read with ``tfds.data_source`` and tokenized on the fly). Only the lengths are needed
to plan batches, so the corpus is never held in memory; each host reads only its own rows of every
global batch.

:class:`GrainTrainIterator` yields exactly the batches of ``batching.TrainIterator`` over the same
examples (same ``seed``, batch size, buckets, sharding): the same buckets (``make_buckets`` over the
lengths), the same per-epoch plan (``numpy.random.default_rng([seed, epoch])`` shuffles the examples and
then the batch order; batches are cut bucket by bucket, a bucket's rest moving on to the next longer one,
the epoch's last partial batch completed with its first examples or dropped), the same batch dicts
(``batching.collate``). It stores a plan of ``N`` int32 row ids per epoch instead of the examples.
Batches are produced by a ``grain.MapDataset`` over the global batch number, prefetched by threads and,
optionally, by worker processes (``num_workers``; each worker computes every ``num_workers``-th batch).
:class:`GrainEvalIterator` is ``batching.EvalIterator`` over a source: every example exactly once,
filler rows in the last batch only.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags

from flax_textvae.data import sources
from flax_textvae.data.batching import Batch, bucket_index, collate, make_buckets, round_up
from flax_textvae.data.prepared import encode_ids

DEFAULT_THREADS = 2
DEFAULT_PREFETCH = 64
_ENDLESS = sys.maxsize // 2  # batch numbers of the (infinite) training stream
_TFDS_CHUNK = 4096  # records read and tokenized at a time while measuring a TFDS split


class _Layout:
    """What batch planning and collation share: buckets, every example's bucket, the batch format."""

    def __init__(self, source: Any, *, batch_size: int, pad_id: int, decoder_start_token_id: int | None = None,
                 decoder_start_id: int | None = None, bos_id: int | None = None, max_length: int | None = None,
                 num_buckets: int = 8, boundaries: Sequence[int] | None = None, multiple: int = 4,
                 shard_index: int = 0, shard_count: int = 1, num_examples: int | None = None):
        start = decoder_start_token_id if decoder_start_token_id is not None else decoder_start_id
        if start is None:
            raise TypeError("give decoder_start_token_id (or decoder_start_id)")
        if decoder_start_token_id is not None and decoder_start_id is not None:
            raise TypeError("give decoder_start_token_id or decoder_start_id, not both")
        self.source = source
        lengths = np.asarray(source.lengths)
        if num_examples is not None:
            lengths = lengths[:num_examples]
        self.num_examples = int(len(lengths))
        if not self.num_examples:
            raise ValueError("no examples to batch")
        longest, shortest = int(lengths.max()), int(lengths.min())
        if shortest < 1:
            raise ValueError(f"example {int(np.argmin(lengths))} is empty; every example needs >= 1 token")
        max_length = round_up(longest, multiple) if max_length is None else int(max_length)
        if longest > max_length:
            raise ValueError(f"example {int(np.argmax(lengths))} has {longest} tokens > max_length={max_length}")
        if batch_size < 1 or shard_count < 1 or batch_size % shard_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of shard_count={shard_count}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
        self.batch_size, self.shard_index, self.shard_count = int(batch_size), int(shard_index), int(shard_count)
        self.pad_id, self.bos_id, self.decoder_start_token_id = int(pad_id), bos_id, int(start)
        self.max_length = max_length
        self.boundaries = make_buckets(lengths, max_length, num_buckets, boundaries=boundaries, multiple=multiple)
        table = bucket_index(np.arange(max_length + 1), self.boundaries).astype(np.uint8)
        self.bucket_of = table[lengths]  # uint8 [N]

    @property
    def host_batch_size(self) -> int:
        return self.batch_size // self.shard_count

    def make_batch(self, rows: np.ndarray, bucket: int, *, with_index: bool) -> Batch:
        """This host's slice of the global batch ``rows`` (-1: filler), as ``Batcher.make_batch`` builds it."""
        b = self.host_batch_size
        mine = rows[self.shard_index * b:(self.shard_index + 1) * b]
        real = mine >= 0
        src = np.where(real, mine, rows[0])
        examples = self.source.__getitems__(src.tolist())
        batch = collate(examples, pad_id=self.pad_id, decoder_start_token_id=self.decoder_start_token_id,
                        bos_id=self.bos_id, seq_len=self.boundaries[bucket])
        if not with_index:
            del batch["index"]
            return batch
        batch["label_weights"] *= real[:, None]
        batch["example_weight"] = real.astype(np.float32)
        batch["index"] = np.where(real, mine, -1).astype(np.int32)
        return batch


class _Plan:
    """One epoch's (or the eval pass's) batches as ``seq`` cut into consecutive rows, in ``order``.

    ``seq`` is the example order with examples stably grouped by bucket, so full batch ``j`` is
    ``seq[j*B:(j+1)*B]`` and belongs to the bucket of its last row; ``tail`` is the completed (or
    filler-padded) last batch, if any.
    """

    def __init__(self, seq: np.ndarray, bucket_of: np.ndarray, batch_size: int, tail: np.ndarray | None,
                 order: np.ndarray | None):
        self.seq, self.bucket_of, self.batch_size = seq, bucket_of, batch_size
        self.num_full = len(seq) // batch_size
        self.tail = tail
        self.tail_bucket = int(bucket_of[tail[tail >= 0]].max()) if tail is not None else -1
        self.order = order

    def __len__(self) -> int:
        return self.num_full + (self.tail is not None)

    def batch(self, position: int) -> tuple[int, np.ndarray]:
        """(bucket, global rows ``[B]``) of the ``position``-th batch."""
        j = int(self.order[position]) if self.order is not None else position
        if j >= self.num_full:
            return self.tail_bucket, self.tail
        rows = self.seq[j * self.batch_size:(j + 1) * self.batch_size].astype(np.int64)
        return int(self.bucket_of[rows[-1]]), rows


def _grouped(order: np.ndarray, bucket_of: np.ndarray) -> np.ndarray:
    """``order`` stably regrouped by bucket (shortest bucket first), as int32 when it fits."""
    by_bucket = np.argsort(bucket_of[order], kind="stable")
    dtype = np.int32 if len(order) < 2**31 else np.int64
    return order[by_bucket].astype(dtype, copy=False)


def train_plan(bucket_of: np.ndarray, batch_size: int, seed: int, epoch: int, remainder: str) -> _Plan:
    """The batches of training epoch ``epoch``, exactly as ``batching.BucketedIterator`` plans them."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(bucket_of))
    seq = _grouped(perm, bucket_of)
    rest = len(seq) % batch_size
    tail = None
    if rest and remainder == "reuse":  # complete the last partial batch with the epoch's first examples
        tail = np.concatenate([seq[len(seq) - rest:], np.resize(perm, batch_size - rest)]).astype(np.int64)
    del perm
    order = rng.permutation(len(seq) // batch_size + (tail is not None))
    return _Plan(seq, bucket_of, batch_size, tail, order)


def eval_plan(bucket_of: np.ndarray, batch_size: int) -> _Plan:
    """Every example once, bucket by bucket in example order; the last batch padded with filler (-1)."""
    seq = _grouped(np.arange(len(bucket_of)), bucket_of)
    rest = len(seq) % batch_size
    tail = None
    if rest:
        tail = np.concatenate([seq[len(seq) - rest:], np.full(batch_size - rest, -1)]).astype(np.int64)
    return _Plan(seq, bucket_of, batch_size, tail, None)


class _TrainBatches:
    """Global batch number -> this host's batch dict (the map function of the grain pipeline)."""

    def __init__(self, layout: _Layout, seed: int, remainder: str, steps_per_epoch: int):
        self.layout, self.seed, self.remainder, self.steps_per_epoch = layout, seed, remainder, steps_per_epoch
        self._plans: dict[int, _Plan] = {}
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> _Plan:
        with self._lock:
            if epoch not in self._plans:
                for old in [e for e in self._plans if e < epoch - 1]:  # keep the previous epoch for prefetch
                    del self._plans[old]
                self._plans[epoch] = train_plan(self.layout.bucket_of, self.layout.batch_size, self.seed, epoch,
                                                self.remainder)
            return self._plans[epoch]

    def __call__(self, step: int) -> Batch:
        epoch, position = divmod(int(step), self.steps_per_epoch)
        bucket, rows = self.plan(epoch).batch(position)
        return self.layout.make_batch(rows, bucket, with_index=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"layout": self.layout, "seed": self.seed, "remainder": self.remainder,
                "steps_per_epoch": self.steps_per_epoch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch))


class GrainTrainIterator:
    """Infinite, resumable training batches from a token source; the same batches as ``TrainIterator``.

    Args:
      source: a token source (``PreparedSource``, ``TfdsTokenSource``, ...).
      seed: non-negative shuffling seed (identical on every host).
      remainder: 'reuse' or 'drop' (see ``batching.BucketedIterator``).
      batch_size, pad_id, decoder_start_token_id (alias ``decoder_start_id``), bos_id, max_length,
        num_buckets, boundaries, multiple, shard_index, shard_count: as for ``batching.Batcher``.
      num_threads: grain prefetch threads (0: batches are built on ``next``).
      prefetch: batches read ahead.
      num_workers: worker processes building batches (0: none).
    """

    def __init__(self, source: Any, *, seed: int = 0, remainder: str = "reuse", num_threads: int = DEFAULT_THREADS,
                 prefetch: int = DEFAULT_PREFETCH, num_workers: int = 0, **layout_kw: Any):
        if remainder not in ("reuse", "drop"):
            raise ValueError(f"remainder must be 'reuse' or 'drop', got {remainder!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.layout = _Layout(source, **layout_kw)
        self.boundaries = self.layout.boundaries
        self.seed, self.remainder = int(seed), remainder
        n, bs = self.layout.num_examples, self.layout.batch_size
        self._steps = n // bs + (n % bs > 0 and remainder == "reuse")
        if not self._steps:
            raise ValueError(f"no full batch of {bs} examples with remainder='drop'")
        self._fn = _TrainBatches(self.layout, self.seed, remainder, self._steps)
        self._threads, self._prefetch, self._workers = num_threads, prefetch, num_workers
        self._step = 0
        self._it: Any = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return self._steps

    def _open(self) -> None:
        ds = grain.MapDataset.range(self._step, _ENDLESS).map(self._fn)
        it = ds.to_iter_dataset(_read_options(self._threads, self._prefetch))
        if self._workers > 0:
            if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags (defaults outside an app)
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        self._it = iter(it)

    def __iter__(self) -> "GrainTrainIterator":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._open()
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """``{'epoch': e, 'position': p}``: p batches of epoch e have been yielded (as ``TrainIterator``)."""
        epoch, position = divmod(self._step, self._steps)
        if position == 0 and epoch > 0:  # the end of an epoch, before the next one starts
            epoch, position = epoch - 1, self._steps
        return {"epoch": int(epoch), "position": int(position)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a ``get_state()`` dict; the next batch is the one that followed it."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"bad iterator state {state}")
        if position > self._steps:
            raise ValueError(f"state position {position} > {self._steps} batches per epoch; "
                             "was the state saved with other data or batch size?")
        self.close()
        self._step = epoch * self._steps + position

    def close(self) -> None:
        """Stops prefetching (threads, worker processes); the next batch restarts the pipeline."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


class _EvalBatches:
    """Eval batch number -> this host's batch dict."""

    def __init__(self, layout: _Layout, plan: _Plan):
        self.layout, self.plan = layout, plan

    def __call__(self, position: int) -> Batch:
        bucket, rows = self.plan.batch(int(position))
        return self.layout.make_batch(rows, bucket, with_index=True)


class GrainEvalIterator:
    """Every example of a token source exactly once (``batching.EvalIterator``'s batches), re-iterable.

    With ``shard_count = n`` each host gets its rows of every global batch, so the hosts together cover
    every example once. ``len()`` is the number of batches.

    Args:
      source: a token source.
      num_examples: use only the first ``num_examples`` examples (None: all).
      num_threads, prefetch: as for ``GrainTrainIterator``.
      **layout_kw: ``batch_size``, ``pad_id``, ``decoder_start_token_id`` (alias ``decoder_start_id``),
        ``bos_id``, ``max_length``, ``num_buckets``, ``boundaries``, ``multiple``, ``shard_index``,
        ``shard_count``.
    """

    def __init__(self, source: Any, *, num_examples: int | None = None, num_threads: int = DEFAULT_THREADS,
                 prefetch: int = DEFAULT_PREFETCH, **layout_kw: Any):
        self.layout = _Layout(source, num_examples=num_examples, **layout_kw)
        self.boundaries = self.layout.boundaries
        self._plan = eval_plan(self.layout.bucket_of, self.layout.batch_size)
        self._threads, self._prefetch = num_threads, prefetch

    def __len__(self) -> int:
        return len(self._plan)

    def __iter__(self) -> Iterator[Batch]:
        ds = grain.MapDataset.range(len(self._plan)).map(_EvalBatches(self.layout, self._plan))
        return iter(ds.to_iter_dataset(_read_options(self._threads, self._prefetch)))


def _tfds_text(record: Any, field: str) -> str | None:
    """The stripped text of a record; None when it is empty or not valid UTF-8."""
    value = sources.record_value(record, field)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    value = str(value).strip()
    return value or None


class TfdsTokenSource:
    """Token ids of a TFDS split (grain ``RandomAccessDataSource`` protocol plus ``lengths``).

    Construction makes one pass that tokenizes every record to learn its length, keeping only the lengths
    and the record number of every example (empty and undecodable texts are skipped, as ``read_examples``
    does), so example ``i`` is the ``i``-th text ``read_examples`` gives; ``__getitems__`` reads the records
    again and tokenizes them (``encode_texts``'s ids and truncation).

    Args:
      spec: ``'tfds:NAME[/CONFIG][:SPLIT]'``.
      tokenizer: the run's tokenizer.
      max_length: longest example (special tokens included); longer ones are truncated, EOS kept.
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR``, else TFDS's default).
      text_field: the feature holding the text (default: the first of 'text', 'sentence' present).

    Attributes:
      lengths: ``[N]`` token counts; ``stats``: ``lines_read``, ``skipped``, ``truncated``, ``tokens``,
      ``max_length_seen``, ``examples``.
    """

    def __init__(self, spec: str, tokenizer: Any, max_length: int, *, data_dir: str | os.PathLike | None = None,
                 text_field: str | None = None):
        import tensorflow_datasets as tfds  # lazy: only TFDS sources pay for the import

        # Opening with max_examples=0 checks the spec, the data set and the field with read_examples' errors.
        sources.read_examples(spec, max_examples=0, data_dir=data_dir, text_field=text_field)
        name, split = sources.parse_tfds_spec(spec)
        data_dir = os.fspath(data_dir) if data_dir is not None else os.environ.get("TFDS_DATA_DIR") or None
        self.spec, self.tokenizer, self.max_length = spec, tokenizer, int(max_length)
        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        features = getattr(getattr(self._source, "dataset_info", None), "features", None)
        keys = list(features.keys()) if features is not None and hasattr(features, "keys") else []
        self.field = text_field or next((k for k in sources.DEFAULT_TEXT_FIELDS if k in keys),
                                        sources.DEFAULT_TEXT_FIELDS[0])
        records, lengths = [], []
        truncated = longest = skipped = 0
        n = len(self._source)
        for start in range(0, n, _TFDS_CHUNK):
            got = self._source.__getitems__(list(range(start, min(n, start + _TFDS_CHUNK))))
            texts = [(start + k, t) for k, t in enumerate(_tfds_text(r, self.field) for r in got)]
            kept = [(k, t) for k, t in texts if t is not None]
            skipped += len(texts) - len(kept)
            ids, cut, top = encode_ids(tokenizer, [t for _, t in kept], self.max_length)
            truncated, longest = truncated + cut, max(longest, top)
            records.append(np.array([k for k, _ in kept], dtype=np.int64))
            lengths.append(np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids)))
        self._records = np.concatenate(records + [np.zeros(0, np.int64)]).astype(np.int32 if n < 2**31 else np.int64)
        self.lengths = np.concatenate(lengths + [np.zeros(0, np.int32)]).astype(np.uint16 if max_length < 2**16
                                                                               else np.int32)
        self.stats = {"lines_read": n, "skipped": skipped, "truncated": truncated, "examples": len(self.lengths),
                      "tokens": int(self.lengths.sum(dtype=np.int64)), "max_length_seen": longest}

    def __len__(self) -> int:
        return int(len(self.lengths))

    def __getitem__(self, key: int) -> np.ndarray:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int]) -> list[np.ndarray]:
        got = self._source.__getitems__(self._records[np.asarray(keys, dtype=np.int64)].tolist())
        ids, _, _ = encode_ids(self.tokenizer, [_tfds_text(r, self.field) for r in got], self.max_length)
        return [np.asarray(x, dtype=np.int32) for x in ids]
