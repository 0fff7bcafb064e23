"""Tokenize text files once into a prepared data set (ArrayRecord shards of token ids + ``index.json``).

Command line::

    python -m flax_textvae.data.prepare --input='data/big/*.txt' [--column=N] --tokenizer=FOLDER_OR_HUB_ID \\
        --max_length=64 --output=DIR [--num_workers=K] [--lines_per_shard=100000]

The input lines are cut into shards of ``lines_per_shard`` lines; worker processes decode, clean (the
rules of ``read_examples``: strip, skip empty and undecodable lines, optional tab column), tokenize
(``encode_texts``'s ids and truncation) and write one ArrayRecord shard each, while the main process reads
ahead and prints a progress line with an ETA on stderr. The format is described in
``flax_textvae.data.prepared``.

Re-running with the same input bytes (SHA-256), tokenizer (``tokenizer_fingerprint``), ``max_length`` and
``column`` does nothing. Everything is written into ``DIR.tmp-PID`` and renamed to ``DIR`` only when
complete (``index.json`` last), so an interrupted run never leaves a folder that looks prepared; its
temporary folder is removed by the next run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
import transformers
from array_record.python.array_record_module import ArrayRecordWriter

from flax_textvae.data import prepared as fmt
from flax_textvae.data.prepared import encode_ids
from flax_textvae.models.loading import names_a_local_path

DEFAULT_LINES_PER_SHARD = 100_000
WRITER_OPTIONS = "group_size:1,uncompressed"
_MAX_LOCATIONS = 20
_worker: dict[str, Any] = {}  # per-process state of the shard workers (tokenizer, settings)


def clean_lines(
    blob: bytes, *, where: str, first_line: int, column: int | None, on_decode_error: str, stats: dict[str, Any]
) -> list[str]:
    """The examples of a block of raw lines, by the rules of ``read_examples`` for text files.

    Args:
      blob: complete lines (``b'\\n'``-terminated, the last one possibly not).
      where: the file name, for messages; first_line: the 1-based line number of the first line.
      column: 0-based tab-separated column, or None for the whole line.
      on_decode_error: 'skip' (count it and record ``file:line``) or 'raise'.
      stats: updated in place: ``lines_read``, ``empty_skipped``, ``undecodable_skipped``,
        ``undecodable_locations``.
    """
    lines = blob.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for lineno, raw in enumerate(lines, start=first_line):
        stats["lines_read"] += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if on_decode_error == "raise":
                raise ValueError(f"{where}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
            stats["undecodable_skipped"] += 1
            if len(stats["undecodable_locations"]) < _MAX_LOCATIONS:
                stats["undecodable_locations"].append(f"{where}:{lineno}")
            continue
        if lineno == 1:
            line = line.lstrip("\ufeff")
        line = line.rstrip("\r\n")
        if column is not None:
            fields = line.split("\t") if line.strip() else [""] * (column + 1)
            if column >= len(fields):
                raise ValueError(
                    f"{where}:{lineno}: has {len(fields)} tab-separated column(s), column={column} "
                    "asked for; fix the line or choose another column"
                )
            line = fields[column]
        line = line.strip()
        if line:
            out.append(line)
        else:
            stats["empty_skipped"] += 1
    return out


def _init_worker(tokenizer_folder: str, settings: dict[str, Any]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker.update(settings, tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_folder))


def _write_shard(task: tuple[int, str, int, bytes]) -> dict[str, Any]:
    """Cleans, tokenizes and writes one shard; returns its lengths and statistics."""
    shard, where, first_line, blob = task
    stats = {"lines_read": 0, "empty_skipped": 0, "undecodable_skipped": 0, "undecodable_locations": []}
    texts = clean_lines(
        blob,
        where=where,
        first_line=first_line,
        column=_worker["column"],
        on_decode_error=_worker["on_decode_error"],
        stats=stats,
    )
    ids, truncated, longest = encode_ids(_worker["tokenizer"], texts, _worker["max_length"])
    name = f"shard-{shard:05d}.array_record"
    if ids:
        dtype = np.dtype(_worker["dtype"])
        writer = ArrayRecordWriter(os.path.join(_worker["folder"], name), WRITER_OPTIONS)
        for x in ids:
            writer.write(np.asarray(x, dtype=dtype).tobytes())
        writer.close()
    lengths = np.fromiter((len(x) for x in ids), dtype=np.uint16, count=len(ids))
    return dict(stats, file=name, lengths=lengths, truncated=truncated, longest=longest, bytes=len(blob))


def resolve_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Input files from paths and globs (``','``-separated in one string allowed), in order, globs sorted."""
    items = inputs.split(",") if isinstance(inputs, str) else list(inputs)
    files = []
    for item in (os.path.expanduser(s.strip()) for s in items if s.strip()):
        matched = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matched or not all(os.path.isfile(m) for m in matched):
            raise FileNotFoundError(
                f"--input {item!r}: no such file" + (" (the glob matches nothing)" if glob.has_magic(item) else "")
            )
        files += matched
    if not files:
        raise FileNotFoundError("no input files given")
    return files


class _Progress:
    """One progress line on stderr (rewritten in place on a terminal) with rate and ETA."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled, self.t0, self.last = max(total_bytes, 1), enabled, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done_bytes: int, lines: int, final: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last, dt = now, max(now - self.t0, 1e-9)
        frac = done_bytes / self.total
        eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
        msg = f"prepare: {lines:,} lines ({100 * frac:.1f}%), {lines / dt:,.0f} lines/s, " + (
            f"done in {dt:.0f}s" if final else f"ETA {eta:.0f}s"
        )
        sys.stderr.write(("\r" + msg + " " * 8) if self.tty else msg + "\n")
        if final and self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def _remove_stale(output: str) -> None:
    for path in glob.glob(glob.escape(output) + ".tmp-*") + glob.glob(glob.escape(output) + ".old-*"):
        suffix = path.rsplit("-", 1)[-1]
        if not suffix.isdigit() or not _pid_alive(int(suffix)) or int(suffix) == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


def _check_settings(max_length: int, column: int | None, on_decode_error: str, lines_per_shard: int) -> None:
    if not 2 <= max_length <= np.iinfo(np.uint16).max:
        raise ValueError(f"max_length must be in [2, 65535], got {max_length}")
    if column is not None and column < 0:
        raise ValueError(f"column must be >= 0, got {column}")
    if on_decode_error not in ("skip", "raise"):
        raise ValueError(f"on_decode_error must be 'skip' or 'raise', got {on_decode_error!r}")
    if lines_per_shard < 1:
        raise ValueError(f"lines_per_shard must be >= 1, got {lines_per_shard}")


def _up_to_date(output: str, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The index of ``output`` when it was prepared by the same recipe (inputs, tokenizer, max_length, column).

    Raises:
      FileExistsError: ``output`` is a non-empty folder that is not a prepared data set.
    """
    if not os.path.exists(output):
        return None
    try:
        old = fmt.read_index(output)
    except (OSError, ValueError):
        if os.listdir(output):
            raise FileExistsError(
                f"--output {output!r} exists and is not a prepared data set; choose another folder or remove it"
            ) from None
        return None
    same = {
        "tokenizer_hash": old["tokenizer"]["hash"],
        "max_length": old["max_length"],
        "column": old["column"],
        "sha256": [s["sha256"] for s in old["sources"]],
    } == recipe
    return old if same else None


def prepare_dataset(
    inputs: str | Sequence[str],
    tokenizer: str,
    max_length: int,
    output: str,
    *,
    column: int | None = None,
    num_workers: int | None = None,
    lines_per_shard: int = DEFAULT_LINES_PER_SHARD,
    on_decode_error: str = "skip",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenizes text files into a prepared data set at ``output`` (a no-op when it is up to date).

    Args:
      inputs: text files / globs (one example per line), read in order.
      tokenizer: a tokenizer folder or hub id (``AutoTokenizer.from_pretrained``).
      max_length: longest example in tokens, special tokens included (2..65535).
      output: the folder to write (replaced only if it holds an older prepared data set).
      column: 0-based tab-separated column holding the text (None: the whole line).
      num_workers: tokenizing processes (default: the CPU count; 0 tokenizes in this process).
      lines_per_shard: input lines per ArrayRecord shard (and per task).
      on_decode_error: 'skip' (count and record undecodable lines) or 'raise'.
      progress: print the progress line on stderr.

    Returns:
      The index (the content of ``output/index.json``), with ``'up_to_date': True`` added when nothing
      had to be done.
    """
    _check_settings(max_length, column, on_decode_error, lines_per_shard)
    output = os.path.abspath(os.path.expanduser(output))
    files = resolve_inputs(inputs)
    tok = _load_tokenizer(tokenizer)
    sources, recipe = _sources_and_recipe(files, tok, max_length, column)
    old = _up_to_date(output, recipe)
    if old is not None:
        if progress:
            print(f"prepare: {output} is up to date ({old['num_examples']:,} examples)", file=sys.stderr)
        return dict(old, up_to_date=True)
    _remove_stale(output)
    tmp = f"{output}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    t0 = time.time()
    try:
        index = _write_all(
            files, sources, tok, tokenizer, recipe, tmp, num_workers, lines_per_shard, on_decode_error, progress
        )
        index["seconds"] = round(time.time() - t0, 2)
        fmt.write_json_atomic(os.path.join(tmp, fmt.INDEX_NAME), index)
        _replace_folder(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _sources_and_recipe(
    files: Sequence[str], tok: Any, max_length: int, column: int | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the index's ``sources``: path, size and SHA-256 of every input; the recipe ``_up_to_date`` compares)."""
    sources = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "sha256": fmt.file_sha256(p)} for p in files]
    recipe = {
        "tokenizer_hash": fmt.tokenizer_fingerprint(tok),
        "max_length": int(max_length),
        "column": column,
        "sha256": [s["sha256"] for s in sources],
    }
    return sources, recipe


def _replace_folder(tmp: str, output: str) -> None:
    """Renames the complete ``tmp`` to ``output``; an older ``output`` is moved aside first, then removed."""
    old_dir = f"{output}.old-{os.getpid()}"
    if os.path.exists(output):
        os.rename(output, old_dir)
    os.rename(tmp, output)
    shutil.rmtree(old_dir, ignore_errors=True)


def _tasks(files: Sequence[str], lines_per_shard: int):
    """(shard, file, first line number, blob of lines) over all files; shards never span files."""
    shard = 0
    for path in files:
        first = 1
        with open(path, "rb") as f:
            while True:
                lines = list(itertools.islice(f, lines_per_shard))
                if not lines:
                    break
                yield shard, path, first, b"".join(lines)
                shard, first = shard + 1, first + len(lines)


def _write_all(
    files: Sequence[str],
    sources: list[dict[str, Any]],
    tok: Any,
    tokenizer_name: str,
    recipe: dict[str, Any],
    tmp: str,
    num_workers: int | None,
    lines_per_shard: int,
    on_decode_error: str,
    progress: bool,
) -> dict[str, Any]:
    """Writes the tokenizer copy, the shards and the lengths into ``tmp``; returns the index (but ``seconds``)."""
    tok_folder = _save_tokenizer(tok, tokenizer_name, recipe["tokenizer_hash"], tmp)
    dtype = "<u2" if len(tok) <= 1 << 16 else "<i4"
    settings = {
        "folder": tmp,
        "column": recipe["column"],
        "max_length": recipe["max_length"],
        "on_decode_error": on_decode_error,
        "dtype": dtype,
    }
    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    bar = _Progress(sum(s["bytes"] for s in sources), progress)
    results = _collect(_shard_results(files, lines_per_shard, workers, tok_folder, settings), bar)
    lengths = np.concatenate([r["lengths"] for r in results] + [np.zeros(0, np.uint16)])
    np.save(os.path.join(tmp, fmt.LENGTHS_NAME), lengths)
    stats = _merged_stats(results, lengths)
    if stats["undecodable_skipped"] and progress:
        print(
            f"prepare: skipped {stats['undecodable_skipped']} line(s) that are not valid UTF-8: "
            + ", ".join(stats["undecodable_locations"][:5]),
            file=sys.stderr,
        )
    return {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "num_examples": int(len(lengths)),
        "dtype": dtype,
        "lengths_file": fmt.LENGTHS_NAME,
        "shards": [{"file": r["file"], "num_examples": int(len(r["lengths"]))} for r in results if len(r["lengths"])],
        "tokenizer": {
            "name": str(tokenizer_name),
            "hash": recipe["tokenizer_hash"],
            "vocab_size": len(tok),
            "folder": fmt.TOKENIZER_DIR,
        },
        "max_length": recipe["max_length"],
        "column": recipe["column"],
        "sources": list(sources),
        "stats": stats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _load_tokenizer(name: str) -> Any:
    """``AutoTokenizer.from_pretrained(name)``, with a message naming the fix when it cannot load."""
    path = os.path.expanduser(str(name))
    fix = "pass a checkpoint folder (or a run's WORKDIR/model) that holds the tokenizer files, or a hub id"
    if not os.path.isdir(path) and names_a_local_path(path):
        raise FileNotFoundError(f"--tokenizer={name!r}: no such folder; {fix}")
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise OSError(f"--tokenizer={name!r}: cannot load a tokenizer from it ({first}); {fix}") from err


def _save_tokenizer(tok: Any, tokenizer_name: str, tokenizer_hash: str, tmp: str) -> str:
    """Saves the copy of the tokenizer the workers load into ``tmp``; returns its folder.

    Raises:
      ValueError: the tokenizer loaded back from the copy has another fingerprint.
    """
    tok_folder = os.path.join(tmp, fmt.TOKENIZER_DIR)
    tok.save_pretrained(tok_folder)  # the workers tokenize with this copy; it must be the same tokenizer
    if fmt.tokenizer_fingerprint(transformers.AutoTokenizer.from_pretrained(tok_folder)) != tokenizer_hash:
        raise ValueError(
            f"tokenizer {tokenizer_name!r} changes when saved and loaded again "
            "(save_pretrained / from_pretrained), so runs could not check prepared ids against it"
        )
    return tok_folder


def _shard_results(
    files: Sequence[str], lines_per_shard: int, workers: int, tok_folder: str, settings: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """``_write_shard``'s result for every shard, in shard order: in this process (``workers <= 0``) or a pool."""
    if workers <= 0:
        _init_worker(tok_folder, settings)
        for task in _tasks(files, lines_per_shard):
            yield _write_shard(task)
        return
    methods = multiprocessing.get_all_start_methods()
    # fork: workers start at once (nothing has started threads here); spawn elsewhere.
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok_folder, settings)) as pool:
        pending: collections.deque = collections.deque()
        for task in _tasks(files, lines_per_shard):  # at most 2 tasks per worker read ahead
            pending.append(pool.apply_async(_write_shard, (task,)))
            while len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _collect(results: Iterator[dict[str, Any]], bar: _Progress) -> list[dict[str, Any]]:
    """All shard results, the progress line updated after each one and once more at the end."""
    collected, done_bytes, done_lines = [], 0, 0
    for r in results:
        collected.append(r)
        done_bytes, done_lines = done_bytes + r["bytes"], done_lines + r["lines_read"]
        bar.update(done_bytes, done_lines)
    bar.update(done_bytes, done_lines, final=True)
    return collected


def _merged_stats(results: Sequence[dict[str, Any]], lengths: np.ndarray) -> dict[str, Any]:
    """The index's ``stats``: the shards' counters summed, their first undecodable lines, token counts."""
    stats: dict[str, Any] = {
        k: int(sum(r[k] for r in results)) for k in ("lines_read", "empty_skipped", "undecodable_skipped", "truncated")
    }
    stats["undecodable_locations"] = [x for r in results for x in r["undecodable_locations"]][:_MAX_LOCATIONS]
    stats["tokens"] = int(lengths.sum(dtype=np.int64))
    stats["max_length_seen"] = int(max([r["longest"] for r in results] + [0]))
    stats["mean_length"] = stats["tokens"] / max(len(lengths), 1)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a user error)."""
    p = argparse.ArgumentParser(prog="python -m flax_textvae.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        required=True,
        action="append",
        help="text file or glob, one example per line (repeat or separate with commas)",
    )
    p.add_argument("--column", type=int, default=-1, help="0-based tab-separated column (-1: the whole line)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id (the model's)")
    p.add_argument("--max_length", type=int, required=True, help="tokens per example incl. specials")
    p.add_argument("--output", required=True, help="folder to write; use it as data.train=prepared:DIR")
    p.add_argument("--num_workers", type=int, default=None, help="tokenizing processes (default: CPU count)")
    p.add_argument("--lines_per_shard", type=int, default=DEFAULT_LINES_PER_SHARD)
    p.add_argument("--on_decode_error", choices=("skip", "raise"), default="skip")
    args = p.parse_args(argv)
    try:
        index = prepare_dataset(
            [s for item in args.input for s in item.split(",")],
            args.tokenizer,
            args.max_length,
            args.output,
            column=None if args.column < 0 else args.column,
            num_workers=args.num_workers,
            lines_per_shard=args.lines_per_shard,
            on_decode_error=args.on_decode_error,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not index.get("up_to_date"):
        s = index["stats"]
        print(
            f"prepared {index['num_examples']:,} examples in {len(index['shards'])} shard(s) at {args.output} "
            f"({s['empty_skipped']} empty, {s['undecodable_skipped']} undecodable lines skipped, "
            f"{s['truncated']} truncated to {index['max_length']}, mean {s['mean_length']:.1f} tokens) "
            f"in {index['seconds']:.0f}s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
