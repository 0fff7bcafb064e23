"""Random-access token sources: token-id arrays of a split, each example's length known without reading it.

A *token source* is any grain random-access source of token-id arrays that also knows every example's
length: ``len(source)``, ``source.__getitems__(keys) -> [int array [L_k], ...]`` and ``source.lengths``
(``[N]``). This module holds :class:`ArraySource` (examples tokenized in memory: text files, ``synthetic:``)
and :class:`TfdsTokenSource` (a TFDS array_record split read with ``tfds.data_source`` and tokenized on the
fly); ``PreparedSource`` (a prepared folder) is in ``flax_textvae.data.prepared``. The batches are planned
from the lengths alone and read through grain by ``flax_textvae.data.grain_pipeline``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from flax_textvae.data import sources
from flax_textvae.data.prepared import encode_ids

_TFDS_CHUNK = 4096  # records read and tokenized at a time while measuring a TFDS split


class ArraySource:
    """Token ids held in memory (grain ``RandomAccessDataSource`` protocol plus ``lengths``).

    Args:
      examples: token-id arrays (``encode_texts`` output); each is kept as an int32 array.
    """

    def __init__(self, examples: Sequence[np.ndarray]):
        self._examples = [np.asarray(x, dtype=np.int32).reshape(-1) for x in examples]
        self.lengths = np.fromiter((len(x) for x in self._examples), dtype=np.int64, count=len(self._examples))

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, key: int) -> np.ndarray:
        return self._examples[key]

    def __getitems__(self, keys: Sequence[int]) -> list[np.ndarray]:
        return [self._examples[k] for k in keys]

    def __repr__(self) -> str:
        return f"ArraySource(num_examples={len(self)})"


def is_token_source(obj: Any) -> bool:
    """Whether ``obj`` is a token source (random access plus ``lengths``) rather than a list of examples."""
    return hasattr(obj, "__getitems__") and hasattr(obj, "lengths")


class TfdsTokenSource:
    """Token ids of a TFDS split (grain ``RandomAccessDataSource`` protocol plus ``lengths``).

    Construction makes one pass that tokenizes every record to learn its length, keeping only the lengths
    and the record number of every example (empty and undecodable texts are skipped and counted, as
    ``read_examples`` does, with its ``UnicodeWarning``), so example ``i`` is the ``i``-th text
    ``read_examples`` gives; ``__getitems__`` reads the records again and tokenizes them (``encode_texts``'s
    ids and truncation).

    Args:
      spec: ``'tfds:NAME[/CONFIG][:SPLIT]'``.
      tokenizer: the run's tokenizer.
      max_length: longest example (special tokens included); longer ones are truncated, EOS kept.
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR``, else TFDS's default).
      text_field: the feature holding the text (default: the first of 'text', 'sentence' present).

    Attributes:
      lengths: ``[N]`` token counts.
      stats: ``read_examples``' counters (``lines_read``, ``empty_skipped``, ``undecodable_skipped``,
        ``undecodable_locations``, ``examples``) and ``encode_texts``' (``truncated``, ``tokens``,
        ``max_length_seen``, ``mean_length``).
      texts: the examples' texts, read on access (``texts[i]``, slices).
    """

    def __init__(
        self,
        spec: str,
        tokenizer: Any,
        max_length: int,
        *,
        data_dir: str | os.PathLike | None = None,
        text_field: str | None = None,
    ):
        self.spec, self.tokenizer, self.max_length = spec, tokenizer, int(max_length)
        self._source, self.field = sources.open_tfds(spec, data_dir=data_dir, text_field=text_field)
        n = len(self._source)
        stats = sources.new_stats()
        records, lengths = [], []
        truncated = longest = 0
        for start in range(0, n, _TFDS_CHUNK):
            got = self._source.__getitems__(list(range(start, min(n, start + _TFDS_CHUNK))))
            texts = [
                (start + k, sources.record_text(r, self.field, where=f"{spec}:{start + k}", stats=stats))
                for k, r in enumerate(got)
            ]
            kept = [(k, t) for k, t in texts if t is not None]
            ids, cut, top = encode_ids(tokenizer, [t for _, t in kept], self.max_length)
            truncated, longest = truncated + cut, max(longest, top)
            records.append(np.array([k for k, _ in kept], dtype=np.int64))
            lengths.append(np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids)))
        self._records = np.concatenate(records + [np.zeros(0, np.int64)]).astype(np.int32 if n < 2**31 else np.int64)
        self.lengths = np.concatenate(lengths + [np.zeros(0, np.int32)]).astype(
            np.uint16 if max_length < 2**16 else np.int32
        )
        tokens = int(self.lengths.sum(dtype=np.int64))
        stats.update(
            lines_read=n,
            examples=len(self.lengths),
            truncated=truncated,
            tokens=tokens,
            max_length_seen=longest,
            mean_length=tokens / max(len(self.lengths), 1),
        )
        self.stats = stats
        sources.warn_undecodable(spec, stats)
        self.texts = _TfdsTexts(self)

    def __len__(self) -> int:
        return int(len(self.lengths))

    def __getitem__(self, key: int) -> np.ndarray:
        return self.__getitems__([key])[0]

    def read_texts(self, keys: Sequence[int]) -> list[str]:
        """The texts of examples ``keys``."""
        got = self._source.__getitems__(self._records[np.asarray(keys, dtype=np.int64)].tolist())
        return [sources.record_text(r, self.field) for r in got]

    def __getitems__(self, keys: Sequence[int]) -> list[np.ndarray]:
        ids, _, _ = encode_ids(self.tokenizer, self.read_texts(keys), self.max_length)
        return [np.asarray(x, dtype=np.int32) for x in ids]


class _TfdsTexts(Sequence[str]):
    """The texts of a ``TfdsTokenSource``'s examples, read from its records on access."""

    def __init__(self, source: TfdsTokenSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            keys = list(range(len(self))[i])
            return self.source.read_texts(keys) if keys else []
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"text {i} out of range [0, {len(self)})")
        return self.source.read_texts([i])[0]
