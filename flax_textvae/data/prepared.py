"""Prepared (pre-tokenized) data sets: the folder format, its index, and a grain random-access source.

``python -m flax_textvae.data.prepare`` writes a folder ``DIR`` once; a config then names it as
``data.train = 'prepared:DIR'`` (or ``data.eval``). The folder holds:

* ``shard-NNNNN.array_record``: ArrayRecord files (``group_size:1``, uncompressed), one record per
  example, in example order across the shards: the token ids (special tokens included, truncated to
  ``max_length`` with the EOS kept last, exactly as ``encode_texts`` does) as little-endian ``uint16``
  bytes when the vocabulary has at most 65,536 entries, else ``int32``;
* ``lengths.npy``: ``uint16 [N]``, the token count of every example (bucketing reads only this);
* ``tokenizer/``: the tokenizer the ids come from (``save_pretrained``);
* ``index.json``, written last: ``format``, ``format_version``, ``num_examples``, ``dtype``,
  ``lengths_file``, ``shards`` (``[{'file', 'num_examples'}]``), ``tokenizer`` (``name``, ``hash``: see
  :func:`tokenizer_fingerprint`, ``vocab_size``, ``folder``), ``max_length``, ``column``, ``sources``
  (``[{'path', 'bytes', 'sha256'}]``, the input files in order), ``stats`` (``lines_read``,
  ``empty_skipped``, ``undecodable_skipped``, ``undecodable_locations``, ``truncated``, ``tokens``,
  ``max_length_seen``, ``mean_length``).

Example ``i`` is the ``i``-th example ``read_examples`` gives for the same files (empty and undecodable
lines skipped), so a prepared file and the text file give the same examples in the same order. A folder
without a readable ``index.json`` is not a prepared data set (``prepare`` writes into a temporary
folder and renames it into place when everything is written).

:class:`PreparedSource` reads it with random access (grain's ``RandomAccessDataSource`` protocol:
``len``, ``[i]``, ``__getitems__``), one shared ArrayRecord reader per shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

PREPARED_PREFIX = "prepared:"
FORMAT = "flax_textvae.prepared"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LENGTHS_NAME = "lengths.npy"
TOKENIZER_DIR = "tokenizer"
# Seek + read of one record without the reader's thread pool (random access is ~3 us per record).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:1"
_READER_BUFFER = 4096


def is_prepared_spec(spec: Any) -> bool:
    """Whether a data spec is ``'prepared:DIR'``."""
    return isinstance(spec, str) and spec.startswith(PREPARED_PREFIX)


def prepared_dir(spec: str | os.PathLike) -> str:
    """The folder of ``'prepared:DIR'`` (a bare path is returned as is), user home expanded."""
    s = os.fspath(spec)
    return os.path.expanduser(s[len(PREPARED_PREFIX) :] if s.startswith(PREPARED_PREFIX) else s)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides a tokenizer's ids: ``'sha256:<hex>'``.

    For fast tokenizers it hashes the backend's full serialization (normalizer, pre-tokenizer, model
    vocabulary / merges, post-processor, added tokens), without the call-time truncation and padding
    settings; a tokenizer saved with ``save_pretrained`` and loaded back has the same fingerprint. Slow
    tokenizers hash their class, vocabulary and special tokens. Both ``prepare`` and ``build_run`` use
    this function, so a prepared data set can be checked against a run's tokenizer.

    Args:
      tokenizer: a Hugging Face tokenizer.

    Returns:
      ``'sha256:'`` followed by 64 hex digits.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        state = {
            "class": type(tokenizer).__name__,
            "vocab": vocab,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        }
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def encode_ids(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int, int]:
    """The ids ``encode_texts`` gives, computed through the fast backend when there is one.

    Args:
      tokenizer: a Hugging Face tokenizer.
      texts: the examples.
      max_length: longest sequence (special tokens included); longer ones keep their first
        ``max_length - 1`` tokens and the final EOS.

    Returns:
      (ids, truncated, longest): one list of ints per text, how many were cut, longest length before
      truncation.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        seqs = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=True)]
    else:
        seqs = [list(x) for x in tokenizer(list(texts), add_special_tokens=True)["input_ids"]] if texts else []
    eos_id = getattr(tokenizer, "eos_token_id", None)
    truncated, longest = 0, 0
    for i, ids in enumerate(seqs):
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            truncated += 1
            seqs[i] = ids[: max_length - 1] + [eos_id] if eos_id is not None and ids[-1] == eos_id else ids[:max_length]
    return seqs, truncated, longest


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON to ``path`` through a temporary file, flushed to disk, then renamed over it."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``DIR/index.json`` of a prepared data set.

    Args:
      folder: the prepared folder (or ``'prepared:DIR'``).

    Returns:
      The index dict (see the module docstring).

    Raises:
      FileNotFoundError: the folder or its index is missing, or a shard or the lengths file is absent.
      ValueError: the index is unreadable or of another format version.
    """
    folder = prepared_dir(folder)
    path = os.path.join(folder, INDEX_NAME)
    how = (
        "prepare it with: python -m flax_textvae.data.prepare --input=FILE --tokenizer=TOKENIZER "
        f"--max_length=N --output={folder}"
    )
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"prepared data set {folder!r} does not exist; {how}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {INDEX_NAME}: it is not a (completely) prepared data set; {how}")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable index ({err}); prepare the data set again") from err
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} version {index.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}; prepare the data set again"
        )
    for name in [index["lengths_file"]] + [s["file"] for s in index["shards"]]:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder!r}: {name} listed in {INDEX_NAME} is missing; prepare it again")
    return index


def compatibility_problems(
    index: dict[str, Any], tokenizer: Any, max_length: int, *, spec: str, tokenizer_name: str
) -> list[str]:
    """Why a prepared data set cannot feed a run with this tokenizer and ``max_length`` ([] if it can).

    The ids must come from the same tokenizer (same :func:`tokenizer_fingerprint`), and the examples must
    be what ``encode_texts(tokenizer, texts, max_length)`` gives: the same ``max_length``, or, when no
    example was truncated, a ``max_length`` at least as long as the longest example.

    Args:
      index: ``read_index`` of the data set.
      tokenizer: the run's tokenizer.
      max_length: the run's ``data.max_length``.
      spec: the data spec, for the messages.
      tokenizer_name: how the run's tokenizer is known (hub id or folder), for the messages.

    Returns:
      One line per problem, naming both sides and the fix.
    """
    problems = []
    tok = index["tokenizer"]
    mine = tokenizer_fingerprint(tokenizer)
    if tok["hash"] != mine:
        problems.append(
            f"{spec!r} was prepared with tokenizer {tok['name']!r} ({tok['hash'][:19]}...), but the "
            f"model's tokenizer is {tokenizer_name!r} ({mine[:19]}...); prepare it again with "
            f"--tokenizer={tokenizer_name}"
        )
    prepared_max, stats = int(index["max_length"]), index["stats"]
    fits = stats["truncated"] == 0 and stats["max_length_seen"] <= max_length
    if prepared_max != max_length and not fits:
        problems.append(
            f"{spec!r} was prepared with max_length={prepared_max} ({stats['truncated']} examples "
            f"truncated, longest {stats['max_length_seen']} tokens), but the run's data.max_length={max_length}; "
            f"prepare it again with --max_length={max_length}, or train with data.max_length={prepared_max} "
            "(an evaluation uses the max_length its run was trained with)"
        )
    return problems


class PreparedSource:
    """Random access to the token ids of a prepared data set (grain ``RandomAccessDataSource`` protocol).

    ``source[i]`` is example ``i`` as an int32 array ``[L_i]``; ``source.__getitems__(keys)`` a list of them.
    Only the index and the lengths (``uint16 [N]``, memory-mapped) are held in memory; records are read
    from the shards on demand, by one reader per shard (its record index costs about 11 bytes per example)
    shared by all threads under a lock. Picklable: readers are reopened in the new process.

    Args:
      folder: the prepared folder or ``'prepared:DIR'``.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = prepared_dir(folder)
        self.index = read_index(self.folder)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        counts = [int(s["num_examples"]) for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._paths = [os.path.join(self.folder, s["file"]) for s in self.index["shards"]]
        self._lengths: np.ndarray | None = None
        self._open_readers()

    def _open_readers(self) -> None:
        self._readers: list[Any] = [None] * len(self._paths)
        self._locks = [threading.Lock() for _ in self._paths]
        self._open_lock = threading.Lock()

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every example, ``uint16 [N]`` (memory-mapped)."""
        if self._lengths is None:
            self._lengths = np.load(os.path.join(self.folder, self.index["lengths_file"]), mmap_mode="r")
        return self._lengths

    @property
    def tokenizer_folder(self) -> str:
        """The saved copy of the tokenizer the ids come from."""
        return os.path.join(self.folder, self.index["tokenizer"]["folder"])

    def __len__(self) -> int:
        return int(self.index["num_examples"])

    def _reader(self, shard: int) -> Any:
        if self._readers[shard] is None:
            with self._open_lock:
                if self._readers[shard] is None:
                    self._readers[shard] = ArrayRecordReader(
                        self._paths[shard], READER_OPTIONS, file_reader_buffer_size=_READER_BUFFER
                    )
        return self._readers[shard]

    def __getitem__(self, key: int) -> np.ndarray:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int]) -> list[np.ndarray]:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        n = len(self)
        if keys.size and (keys.min() < 0 or keys.max() >= n):
            raise IndexError(f"keys out of range [0, {n}) in {self.folder}")
        shards = np.searchsorted(self._starts, keys, side="right") - 1
        out = []
        for key, shard in zip(keys.tolist(), shards.tolist()):
            reader = self._reader(shard)
            with self._locks[shard]:  # seek + read is one positioned read
                reader.seek(key - int(self._starts[shard]))
                record = reader.read()
            out.append(np.frombuffer(record, dtype=self.dtype).astype(np.int32))
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_locks", "_open_lock", "_lengths")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lengths=None)
        self._open_readers()

    def __repr__(self) -> str:
        return f"PreparedSource({self.folder!r}, num_examples={len(self)})"


class DecodedTexts(Sequence[str]):
    """Lazy text view of a token-id source: ``texts[i]`` decodes example ``i`` (special tokens dropped).

    A truncated example reads as its kept tokens; a word-level tokenizer's ``<unk>`` is dropped.

    Args:
      source: a random-access source of token-id arrays (``PreparedSource``).
      tokenizer: decodes the ids.
    """

    def __init__(self, source: Any, tokenizer: Any):
        self.source, self.tokenizer = source, tokenizer

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            keys = list(range(len(self))[i])
            ids = self.source.__getitems__(keys) if keys else []
            return [t.strip() for t in self.tokenizer.batch_decode([x.tolist() for x in ids], skip_special_tokens=True)]
        if i < 0:
            i += len(self)
        return self.tokenizer.decode(self.source[i].tolist(), skip_special_tokens=True).strip()
