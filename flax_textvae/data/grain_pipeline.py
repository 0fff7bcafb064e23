"""Length-bucketed training and eval batches read through grain from random-access token sources.

The examples come from a *token source* (``flax_textvae.data.token_sources``: random access to token-id
arrays plus every example's length; ``ArraySource``, ``TfdsTokenSource``, ``PreparedSource``). Only the
lengths are needed to plan batches, so a corpus on disk is never held in memory; each host reads only its
own rows of every global batch.

:class:`Batcher` holds what planning and collation share: the buckets (``make_buckets`` over the lengths),
every example's bucket, the batch layout and this host's slice of every global batch (``B / shard_count``
consecutive rows). Training (:class:`GrainTrainIterator`) is infinite and epoch-based: epoch ``e`` shuffles
the examples with ``numpy.random.default_rng([seed, e])``, groups them stably by bucket, and cuts full
batches bucket by bucket from the shortest; the fewer-than-a-batch rest of a bucket moves on to the next
longer bucket (it fits there). The rest left after the longest bucket is completed with repeats of the
epoch's first examples (``remainder='reuse'``: every example is seen every epoch) or dropped (``'drop'``).
The batch order is then shuffled with the same generator. It stores a plan of ``N`` int32 row ids per epoch
instead of the examples. Batches are produced by a ``grain.MapDataset`` over the global batch number,
prefetched by threads and, optionally, by worker processes (``num_workers``; each worker computes every
``num_workers``-th batch); the state is ``{'epoch': e, 'position': p}`` and ``set_state`` resumes exactly.
:class:`GrainEvalIterator` yields every example exactly once, bucket by bucket in example order, a
bucket's rest moving on as in training; only the last batch is completed with filler rows.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags

from flax_textvae.data.batching import Batch, bucket_index, collate, make_buckets, round_up, start_id
from flax_textvae.data.token_sources import ArraySource, is_token_source

DEFAULT_THREADS = 2
DEFAULT_PREFETCH = 64
_ENDLESS = sys.maxsize // 2  # batch numbers of the (infinite) training stream


class Batcher:
    """Buckets and batch layout of a token source; builds this host's slice of any global batch.

    Args:
      source: a token source, or a sequence of token-id arrays (held in an ``ArraySource``).
      batch_size: the GLOBAL batch size (all hosts together); divisible by ``shard_count``.
      pad_id: padding id.
      decoder_start_token_id: first decoder input (BART: ``</s>`` = 2; T5: pad = 0); ``decoder_start_id``
        is an alias.
      bos_id: a leading token with this id gets label weight 0 (BART ``<s>``); None for T5.
      max_length: longest allowed example and last boundary (default: longest example rounded up to
        ``multiple``).
      num_buckets, boundaries, multiple: see ``make_buckets``.
      shard_index, shard_count: this host's slice of every global batch.
      num_examples: use only the first ``num_examples`` examples (None: all).
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        pad_id: int,
        decoder_start_token_id: int | None = None,
        decoder_start_id: int | None = None,
        bos_id: int | None = None,
        max_length: int | None = None,
        num_buckets: int = 8,
        boundaries: Sequence[int] | None = None,
        multiple: int = 4,
        shard_index: int = 0,
        shard_count: int = 1,
        num_examples: int | None = None,
    ):
        self.decoder_start_token_id = start_id(decoder_start_token_id, decoder_start_id)
        self.source = source if is_token_source(source) else ArraySource(source)
        lengths = np.asarray(self.source.lengths)
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
            raise ValueError(
                f"example {int(np.argmax(lengths))} has {longest} tokens > max_length={max_length}; "
                "truncate with encode_texts(..., max_length) first"
            )
        if batch_size < 1 or shard_count < 1 or batch_size % shard_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of shard_count={shard_count}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
        self.batch_size, self.shard_index, self.shard_count = int(batch_size), int(shard_index), int(shard_count)
        self.pad_id, self.bos_id, self.max_length = int(pad_id), bos_id, max_length
        self.boundaries = make_buckets(lengths, max_length, num_buckets, boundaries=boundaries, multiple=multiple)
        table = bucket_index(np.arange(max_length + 1), self.boundaries).astype(np.uint8)
        self.bucket_of = table[lengths]  # uint8 [N]

    @property
    def host_batch_size(self) -> int:
        """Rows per batch on this host (global batch / shard_count)."""
        return self.batch_size // self.shard_count

    @property
    def num_shapes(self) -> int:
        """At most how many distinct batch shapes the batches have: the buckets from the shortest holding
        examples to the longest holding examples (a bucket's leftover rows move to the next longer one)."""
        used = np.flatnonzero(np.bincount(self.bucket_of, minlength=len(self.boundaries)))
        return int(used.max() - used.min() + 1)

    def make_batch(self, rows: np.ndarray, bucket: int, *, with_index: bool = True) -> Batch:
        """This host's slice of one global batch.

        Args:
          rows: int ``[batch_size]`` example numbers of the global batch; -1 marks filler rows (only at the
            end; row 0 must be a real example).
          bucket: the bucket, whose boundary is the sequence length.
          with_index: eval batches: keep ``index``, zero the weights of filler rows; training batches have no
            ``index`` (and no filler).
        """
        b = self.host_batch_size
        mine = rows[self.shard_index * b : (self.shard_index + 1) * b]
        real = mine >= 0
        src = np.where(real, mine, rows[0])
        examples = self.source.__getitems__(src.tolist())
        batch = collate(
            examples,
            pad_id=self.pad_id,
            decoder_start_token_id=self.decoder_start_token_id,
            bos_id=self.bos_id,
            seq_len=self.boundaries[bucket],
        )
        if not with_index:
            del batch["index"]
            return batch
        batch["label_weights"] *= real[:, None]
        batch["example_weight"] = real.astype(np.float32)
        batch["index"] = np.where(real, mine, -1).astype(np.int32)
        return batch

    def train_iterator(self, seed: int = 0, *, remainder: str = "reuse", **grain_kw: Any) -> GrainTrainIterator:
        """The infinite, resumable training batches (``GrainTrainIterator``)."""
        return GrainTrainIterator(self, seed=seed, remainder=remainder, **grain_kw)

    def eval_iterator(self, **grain_kw: Any) -> GrainEvalIterator:
        """Every example exactly once, in a fixed order (``GrainEvalIterator``)."""
        return GrainEvalIterator(self, **grain_kw)


def _batcher(source: Any, layout_kw: dict[str, Any]) -> Batcher:
    if isinstance(source, Batcher):
        if layout_kw:
            raise TypeError(f"Batcher arguments {sorted(layout_kw)} given together with a Batcher")
        return source
    return Batcher(source, **layout_kw)


class _Plan:
    """One epoch's (or the eval pass's) batches as ``seq`` cut into consecutive rows, in ``order``.

    ``seq`` is the example order with examples stably grouped by bucket, so full batch ``j`` is
    ``seq[j*B:(j+1)*B]`` and belongs to the bucket of its last row; ``tail`` is the completed (or
    filler-padded) last batch, if any.
    """

    def __init__(
        self, seq: np.ndarray, bucket_of: np.ndarray, batch_size: int, tail: np.ndarray | None, order: np.ndarray | None
    ):
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
        rows = self.seq[j * self.batch_size : (j + 1) * self.batch_size].astype(np.int64)
        return int(self.bucket_of[rows[-1]]), rows


def _grouped(order: np.ndarray, bucket_of: np.ndarray) -> np.ndarray:
    """``order`` stably regrouped by bucket (shortest bucket first), as int32 when it fits."""
    by_bucket = np.argsort(bucket_of[order], kind="stable")
    dtype = np.int32 if len(order) < 2**31 else np.int64
    return order[by_bucket].astype(dtype, copy=False)


def train_plan(bucket_of: np.ndarray, batch_size: int, seed: int, epoch: int, remainder: str) -> _Plan:
    """The batches of training epoch ``epoch`` (module docstring), in the order they are yielded."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(bucket_of))
    seq = _grouped(perm, bucket_of)
    rest = len(seq) % batch_size
    tail = None
    if rest and remainder == "reuse":  # complete the last partial batch with the epoch's first examples
        tail = np.concatenate([seq[len(seq) - rest :], np.resize(perm, batch_size - rest)]).astype(np.int64)
    del perm
    order = rng.permutation(len(seq) // batch_size + (tail is not None))
    return _Plan(seq, bucket_of, batch_size, tail, order)


def eval_plan(bucket_of: np.ndarray, batch_size: int) -> _Plan:
    """Every example once, bucket by bucket in example order; the last batch padded with filler (-1)."""
    seq = _grouped(np.arange(len(bucket_of)), bucket_of)
    rest = len(seq) % batch_size
    tail = None
    if rest:
        tail = np.concatenate([seq[len(seq) - rest :], np.full(batch_size - rest, -1)]).astype(np.int64)
    return _Plan(seq, bucket_of, batch_size, tail, None)


class _TrainBatches:
    """Global batch number -> this host's batch dict (the map function of the grain pipeline)."""

    def __init__(self, batcher: Batcher, seed: int, remainder: str, steps_per_epoch: int):
        self.batcher, self.seed, self.remainder, self.steps_per_epoch = batcher, seed, remainder, steps_per_epoch
        self._plans: dict[int, _Plan] = {}
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> _Plan:
        with self._lock:
            if epoch not in self._plans:
                for old in [e for e in self._plans if e < epoch - 1]:  # keep the previous epoch for prefetch
                    del self._plans[old]
                self._plans[epoch] = train_plan(
                    self.batcher.bucket_of, self.batcher.batch_size, self.seed, epoch, self.remainder
                )
            return self._plans[epoch]

    def __call__(self, step: int) -> Batch:
        epoch, position = divmod(int(step), self.steps_per_epoch)
        bucket, rows = self.plan(epoch).batch(position)
        return self.batcher.make_batch(rows, bucket, with_index=False)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "batcher": self.batcher,
            "seed": self.seed,
            "remainder": self.remainder,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch))


class GrainTrainIterator:
    """Infinite, resumable training batches from a token source (module docstring).

    Yields batch dicts without ``index`` and with every ``example_weight`` 1.

    Args:
      source: a token source (``ArraySource``, ``PreparedSource``, ``TfdsTokenSource``, ...), a sequence of
        token-id arrays, or a ``Batcher`` (then without layout arguments).
      seed: non-negative shuffling seed (identical on every host).
      remainder: 'reuse' (complete the epoch's last partial batch with repeated examples) or 'drop'
        (skip its examples this epoch).
      num_threads: grain prefetch threads (0: batches are built on ``next``).
      prefetch: batches read ahead.
      num_workers: worker processes building batches (0: none).
      **layout_kw: the ``Batcher`` arguments (``batch_size``, ``pad_id``, ``decoder_start_token_id`` (alias
        ``decoder_start_id``), ``bos_id``, ``max_length``, ``num_buckets``, ``boundaries``, ``multiple``,
        ``shard_index``, ``shard_count``, ``num_examples``).
    """

    def __init__(
        self,
        source: Any,
        *,
        seed: int = 0,
        remainder: str = "reuse",
        num_threads: int = DEFAULT_THREADS,
        prefetch: int = DEFAULT_PREFETCH,
        num_workers: int = 0,
        **layout_kw: Any,
    ):
        if remainder not in ("reuse", "drop"):
            raise ValueError(f"remainder must be 'reuse' or 'drop', got {remainder!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.batcher = _batcher(source, layout_kw)
        self.boundaries = self.batcher.boundaries
        self.seed, self.remainder = int(seed), remainder
        n, bs = self.batcher.num_examples, self.batcher.batch_size
        self._steps = n // bs + (n % bs > 0 and remainder == "reuse")
        if not self._steps:
            raise ValueError(f"no full batch of {bs} examples with remainder='drop'")
        self._fn = _TrainBatches(self.batcher, self.seed, remainder, self._steps)
        self._threads, self._prefetch, self._workers = num_threads, prefetch, num_workers
        self._step = 0
        self._it: Any = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return self._steps

    @property
    def num_shapes(self) -> int:
        """At most how many distinct batch shapes the iterator yields (``Batcher.num_shapes``)."""
        return self.batcher.num_shapes

    def _open(self) -> None:
        ds = grain.MapDataset.range(self._step, _ENDLESS).map(self._fn)
        it = ds.to_iter_dataset(_read_options(self._threads, self._prefetch))
        if self._workers > 0:
            if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags (defaults outside an app)
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        self._it = iter(it)

    def __iter__(self) -> GrainTrainIterator:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._open()
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """``{'epoch': e, 'position': p}``: p batches of epoch e have been yielded."""
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
            raise ValueError(
                f"state position {position} > {self._steps} batches per epoch; "
                "was the state saved with other data or batch size?"
            )
        self.close()
        self._step = epoch * self._steps + position

    def close(self) -> None:
        """Stops prefetching (threads, worker processes); the next batch restarts the pipeline."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


class _EvalBatches:
    """Eval batch number -> this host's batch dict."""

    def __init__(self, batcher: Batcher, plan: _Plan):
        self.batcher, self.plan = batcher, plan

    def __call__(self, position: int) -> Batch:
        bucket, rows = self.plan.batch(int(position))
        return self.batcher.make_batch(rows, bucket, with_index=True)


class GrainEvalIterator:
    """Every example of a token source exactly once (module docstring), re-iterable.

    With ``shard_count = n`` each host gets its rows of every global batch, so the hosts together cover
    every example once. ``len()`` is the number of batches.

    Args:
      source: a token source, a sequence of token-id arrays, or a ``Batcher`` (then without layout arguments).
      num_threads, prefetch: as for ``GrainTrainIterator``.
      **layout_kw: the ``Batcher`` arguments, ``num_examples`` (only the first ones) included.
    """

    def __init__(
        self, source: Any, *, num_threads: int = DEFAULT_THREADS, prefetch: int = DEFAULT_PREFETCH, **layout_kw: Any
    ):
        self.batcher = _batcher(source, layout_kw)
        self.boundaries = self.batcher.boundaries
        self._plan = eval_plan(self.batcher.bucket_of, self.batcher.batch_size)
        self._threads, self._prefetch = num_threads, prefetch

    def __len__(self) -> int:
        return len(self._plan)

    def __iter__(self) -> Iterator[Batch]:
        ds = grain.MapDataset.range(len(self._plan)).map(_EvalBatches(self.batcher, self._plan))
        return iter(ds.to_iter_dataset(_read_options(self._threads, self._prefetch)))
