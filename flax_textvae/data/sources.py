"""Reading raw text examples from plain text files or TFDS array_record data sets.

A *spec* names where the examples come from:

* a path to a UTF-8 text file, one example per line (``data/ptb/train.txt``); with ``column=k`` each line
  is split on tabs and column ``k`` (0-based) is the example;
* ``synthetic:N[:SEED]``: ``N`` sentences of the built-in grammar (``synthetic.synthetic_sentences``,
  seed 0 by default); a held-out split is another seed, e.g. ``synthetic:500:1``;
* ``tfds:NAME[/CONFIG][:SPLIT]`` (``tfds:text_vae_corpora/ptb:valid``), read with ``tfds.data_source``
  from a data set already prepared in the ``array_record`` file format (random access, no TensorFlow).
  ``SPLIT`` defaults to ``train``; the data directory is the ``data_dir`` argument, else the environment
  variable ``TFDS_DATA_DIR``, else TFDS's default (``~/tensorflow_datasets``). Nothing is downloaded.

Bad input is handled as follows (the behaviour is part of the API):

* a missing file raises ``FileNotFoundError`` naming the path;
* a TFDS name that is unknown raises ``ValueError``; one that is known but not built in the data directory
  raises :class:`DatasetNotBuiltError` (a ``ValueError``) naming the spec and the directory and giving the
  command that builds it, or the text-file flags to use instead;
* leading/trailing whitespace is stripped; lines that are then empty are skipped and counted
  (``stats['empty_skipped']``);
* a line that is not valid UTF-8 is, by default (``on_decode_error='skip'``), skipped and counted
  (``stats['undecodable_skipped']``), its ``file:line`` recorded in ``stats['undecodable_locations']``
  (first 20) and reported in ONE ``UnicodeWarning`` per file; with ``on_decode_error='raise'`` the first
  such line raises ``ValueError`` naming ``file:line``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings
from typing import Any, Sequence

from absl import logging as absl_logging

from flax_textvae.data.synthetic import synthetic_sentences

TFDS_PREFIX = "tfds:"
SYNTHETIC_PREFIX = "synthetic:"
DEFAULT_TEXT_FIELDS = ("text", "sentence")
_MAX_LOCATIONS = 20
_READ_CHUNK = 4096


class DataSpecError(ValueError):
    """A data spec that cannot be read: malformed (``synthetic:N[:SEED]``, ``tfds:NAME[/CONFIG][:SPLIT]``), or a
    ``tfds:`` spec naming data that is not there (not known to TFDS, or not prepared as array_record): a user
    error, with the fix in the message."""


class DatasetNotBuiltError(DataSpecError):
    """A ``tfds:`` spec names a data set that is not built (prepared) in the TFDS data directory."""


def new_stats() -> dict[str, Any]:
    """The counters ``read_examples`` returns, all zero."""
    return {"lines_read": 0, "empty_skipped": 0, "undecodable_skipped": 0, "undecodable_locations": [], "examples": 0}


def read_examples(
    spec: str | os.PathLike,
    *,
    column: int | None = None,
    max_examples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    text_field: str | None = None,
    on_decode_error: str = "skip",
) -> tuple[list[str], dict[str, Any]]:
    """Reads text examples from a text file or a TFDS array_record data set.

    Args:
      spec: a text file path, ``'synthetic:N[:SEED]'`` or ``'tfds:NAME[/CONFIG][:SPLIT]'``.
      column: for text files, the 0-based index of the tab-separated column holding the text
        (None: the whole line). A line with too few columns raises ``ValueError`` naming ``file:line``.
      max_examples: stop after this many (non-empty, decodable) examples; None reads everything.
      data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR``, else TFDS's default).
      text_field: TFDS feature holding the text (default: the first of 'text', 'sentence' present).
      on_decode_error: 'skip' (default; skip, count and warn with file:line) or 'raise'.

    Returns:
      (texts, stats): the examples as stripped ``str`` in source order, and a dict with
      ``lines_read`` (records looked at, empty and undecodable included), ``empty_skipped``,
      ``undecodable_skipped``, ``undecodable_locations`` (up to 20 ``'file:line'`` strings) and
      ``examples`` (== len(texts)).

    Raises:
      FileNotFoundError: the text file does not exist.
      ValueError: unknown / unprepared TFDS data set, unknown split or field, bad column, or an
        undecodable line with ``on_decode_error='raise'``.
    """
    if on_decode_error not in ("skip", "raise"):
        raise ValueError(f"on_decode_error must be 'skip' or 'raise', got {on_decode_error!r}")
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}")
    spec_str = os.fspath(spec)
    if spec_str.startswith(SYNTHETIC_PREFIX):
        return _read_synthetic(spec_str, max_examples=max_examples)
    if spec_str.startswith(TFDS_PREFIX):
        if column is not None:
            raise ValueError(
                f"column={column} only applies to text files, not to {spec_str!r}; "
                "use text_field= to pick the TFDS feature"
            )
        return _read_tfds(
            spec_str,
            max_examples=max_examples,
            data_dir=data_dir,
            text_field=text_field,
            on_decode_error=on_decode_error,
        )
    return _read_text_file(spec_str, column=column, max_examples=max_examples, on_decode_error=on_decode_error)


def _accept(text: str, stats: dict[str, Any], texts: list[str]) -> None:
    text = text.strip()
    if text:
        texts.append(text)
    else:
        stats["empty_skipped"] += 1


def _undecodable(where: str, err: UnicodeDecodeError, stats: dict[str, Any], on_decode_error: str) -> None:
    if on_decode_error == "raise":
        raise ValueError(
            f"{where}: not valid UTF-8 ({err.reason} at byte {err.start}); fix or remove the "
            "line, or pass on_decode_error='skip' to skip such lines"
        ) from err
    stats["undecodable_skipped"] += 1
    if len(stats["undecodable_locations"]) < _MAX_LOCATIONS:
        stats["undecodable_locations"].append(where)


def warn_undecodable(source: str, stats: dict[str, Any]) -> None:
    """One ``UnicodeWarning`` naming the first undecodable lines of ``source``, if ``stats`` counted any."""
    n = stats["undecodable_skipped"]
    if n:
        shown = ", ".join(stats["undecodable_locations"][:5])
        more = f" and {n - 5} more" if n > 5 else ""
        warnings.warn(
            f"{source}: skipped {n} line(s) that are not valid UTF-8: {shown}{more}", UnicodeWarning, stacklevel=3
        )


def _read_text_file(
    path: str, *, column: int | None, max_examples: int | None, on_decode_error: str
) -> tuple[list[str], dict[str, Any]]:
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"text file {str(p)!r} does not exist (resolved: {p.resolve()}); give a path "
            "to a UTF-8 file with one example per line, or 'tfds:NAME[/CONFIG][:SPLIT]'"
        )
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a directory; give a text file with one example per line")
    if column is not None and column < 0:
        raise ValueError(f"column must be >= 0, got {column}")
    stats = new_stats()
    texts: list[str] = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if max_examples is not None and len(texts) >= max_examples:
                break
            stats["lines_read"] += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                _undecodable(f"{p}:{lineno}", err, stats, on_decode_error)
                continue
            if lineno == 1:
                line = line.lstrip("\ufeff")  # byte-order mark
            line = line.rstrip("\r\n")
            if column is not None:
                fields = line.split("\t")
                if not line.strip():
                    fields = [""] * (column + 1)  # an empty line is empty, not malformed
                if column >= len(fields):
                    raise ValueError(
                        f"{p}:{lineno}: has {len(fields)} tab-separated column(s), column={column} "
                        "asked for; fix the line or choose another column"
                    )
                line = fields[column]
            _accept(line, stats, texts)
    stats["examples"] = len(texts)
    warn_undecodable(str(p), stats)
    return texts, stats


def parse_synthetic_spec(spec: str) -> tuple[int, int]:
    """``'synthetic:N[:SEED]'`` -> ``(N, SEED)`` (SEED 0 when left out).

    Raises:
      DataSpecError: not of that form, N < 1 or SEED < 0.
    """
    parts = spec[len(SYNTHETIC_PREFIX) :].split(":") if spec.startswith(SYNTHETIC_PREFIX) else []
    try:
        if not 1 <= len(parts) <= 2:
            raise ValueError
        n, seed = int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
        if n < 1 or seed < 0:
            raise ValueError
    except ValueError:
        raise DataSpecError(
            f"bad synthetic spec {spec!r}; expected 'synthetic:N[:SEED]' with N >= 1 examples and a SEED >= 0, "
            "e.g. 'synthetic:20000' or 'synthetic:500:1'"
        ) from None
    return n, seed


def _read_synthetic(spec: str, *, max_examples: int | None) -> tuple[list[str], dict[str, Any]]:
    n, seed = parse_synthetic_spec(spec)
    texts = synthetic_sentences(n if max_examples is None else min(n, max_examples), seed)
    stats = new_stats()
    stats["lines_read"] = stats["examples"] = len(texts)
    return texts, stats


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """Splits ``'tfds:NAME[/CONFIG][:SPLIT]'`` into (``'NAME[/CONFIG]'``, split); split defaults to 'train'."""
    body = spec[len(TFDS_PREFIX) :] if spec.startswith(TFDS_PREFIX) else spec
    name, _, split = body.partition(":")
    name, split = name.strip(), (split.strip() or "train")
    if not name or name.count("/") > 1 or ":" in split:
        raise DataSpecError(
            f"bad TFDS spec {spec!r}; expected 'tfds:NAME[/CONFIG][:SPLIT]', e.g. 'tfds:text_vae_corpora/ptb:valid'"
        )
    return name, split


def _prepare_hint(name: str, data_dir: str | None) -> str:
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    base = name.split("/")[0]
    if base == "text_vae_corpora":
        config = name.split("/")[1] if "/" in name else "ptb"
        return (
            f"prepare it with: python -m flax_textvae.data.textvae_corpora --config={config} "
            f"--manual_dir=DIR_WITH_{config}/{{train,valid,test}}.txt --data_dir={where} "
            "(array_record format; see flax_textvae/data/textvae_corpora.py)"
        )
    return (
        f"prepare it in the array_record format (random access, no TensorFlow at run time), e.g. "
        f"tfds.builder('{name}', data_dir='{where}', file_format='array_record').download_and_prepare() "
        f"or, where TensorFlow is installed, `tfds build {base} --file_format=array_record "
        f"--data_dir={where}`; then pass data_dir= or set TFDS_DATA_DIR"
    )


def _not_built_message(spec: str, name: str, data_dir: str, builder: Any) -> str:
    """What ``DatasetNotBuiltError`` says: the spec, the data dir, the build command, the text-file way."""
    other = []
    try:  # other versions built in the same folder (an older release of the builder)
        folder = os.path.dirname(os.fspath(builder.data_dir))
        other = sorted(v for v in os.listdir(folder) if os.path.isfile(os.path.join(folder, v, "dataset_info.json")))
    except (OSError, TypeError, AttributeError):
        pass
    found = f" (found only version(s) {', '.join(other)} there: rebuild it)" if other else ""
    if name.split("/")[0] == "text_vae_corpora":
        config = name.split("/")[1] if "/" in name else "ptb"
        build = (
            f"build it with:\n    python -m flax_textvae.data.textvae_corpora --config={config} "
            f"--manual_dir=DIR --data_dir={data_dir}\n  where DIR/{config}/train.txt, valid.txt and test.txt "
            "hold the corpus, one sentence per line (flax_textvae.data.textvae_corpora.prepare does the same "
            "from Python)"
        )
    else:
        build = _prepare_hint(name, data_dir)
    return (
        f"{spec!r}: TFDS data set {name!r} (version {getattr(builder, 'version', '?')}) is not built in "
        f"data_dir {data_dir}{found}; {build};\n  or train on text files (one example per line) instead: "
        "--config.data.train=PATH --config.data.eval=PATH"
    )


def record_value(record: Any, field: str) -> Any:
    """The ``field`` of a TFDS record as a Python ``bytes`` / ``str`` (numpy scalars unwrapped)."""
    value = record[field] if isinstance(record, dict) else record
    if hasattr(value, "item") and not isinstance(value, (bytes, str)):
        value = value.item()
    return value


@contextlib.contextmanager
def _quiet_absl():
    """absl logging at ERROR and above inside the block."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def tfds_problem(spec: str, *, data_dir: str | os.PathLike | None = None) -> str | None:
    """What is wrong with a ``tfds:`` spec's data (the `DataSpecError` message), or None when it opens."""
    try:
        open_tfds(spec, data_dir=data_dir)
    except DataSpecError as err:
        return str(err)
    return None


def open_tfds(
    spec: str, *, data_dir: str | os.PathLike | None = None, text_field: str | None = None
) -> tuple[Any, str]:
    """Opens a ``tfds:`` spec's split with ``tfds.data_source`` (random access, nothing downloaded).

    Returns:
      (the data source, the feature holding the text).

    Raises:
      DatasetNotBuiltError, ValueError: as ``read_examples`` (module docstring).
    """
    import tensorflow_datasets as tfds  # on use: importing it costs about 0.3 s, and only tfds: specs need it

    name, split = parse_tfds_spec(spec)
    data_dir = os.fspath(data_dir) if data_dir is not None else os.environ.get("TFDS_DATA_DIR") or None
    if name.split("/")[0] == "text_vae_corpora":
        # Imported on use, not at the top: the module also runs as `python -m flax_textvae.data.textvae_corpora`,
        # and importing it first through this package would register its TFDS builder a second time.
        from flax_textvae.data import textvae_corpora  # noqa: F401  (registers the builder)
    where = data_dir or "TFDS's default data dir"
    resolved = data_dir or os.path.expanduser(os.fspath(tfds.core.constants.DATA_DIR))
    builder = None
    try:
        with _quiet_absl():  # tfds logs a warning for each version folder it finds missing
            builder = tfds.builder(name, data_dir=data_dir)
            # Checked first: reading an unbuilt data set fails deep inside tfds (a KeyError on empty splits).
            prepared = builder.is_prepared()
        if not prepared:
            raise DatasetNotBuiltError(_not_built_message(spec, name, resolved, builder))
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except DatasetNotBuiltError:
        raise
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataSpecError(
            f"{spec!r}: TFDS data set {name!r} is not known and not prepared in {where}; "
            f"{_prepare_hint(name, data_dir)}"
        ) from err
    except KeyError as err:  # tfds: "`splits` is empty", i.e. the data set has not been generated
        raise DatasetNotBuiltError(_not_built_message(spec, name, resolved, builder)) from err
    except (AssertionError, NotImplementedError, FileNotFoundError) as err:
        raise DataSpecError(
            f"{spec!r}: TFDS data set {name!r} is not prepared as array_record in {where} "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            f"{_prepare_hint(name, data_dir)}"
        ) from err
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"{spec!r}: {err}") from err
        raise ValueError(f"{spec!r}: {err}; {_prepare_hint(name, data_dir)}") from err
    return source, _text_field(source, spec, text_field)


def _text_field(source: Any, spec: str, text_field: str | None) -> str:
    """The feature of a TFDS source that holds the text: ``text_field``, else the first default present."""
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    keys: Sequence[str] = list(features.keys()) if features is not None and hasattr(features, "keys") else []
    if text_field is None:
        field = next((k for k in DEFAULT_TEXT_FIELDS if k in keys), None)
        if field is None and keys:
            raise ValueError(
                f"{spec!r}: none of the default text fields {DEFAULT_TEXT_FIELDS} among the "
                f"features {list(keys)}; pass text_field="
            )
        return field or DEFAULT_TEXT_FIELDS[0]
    if keys and text_field not in keys:
        raise ValueError(f"{spec!r}: text_field {text_field!r} not among the features {list(keys)}")
    return text_field


def record_text(
    record: Any, field: str, *, where: str = "", stats: dict[str, Any] | None = None, on_decode_error: str = "skip"
) -> str | None:
    """The stripped text of a TFDS record; None for an empty or (with 'skip') undecodable one.

    Args:
      record: a record of a TFDS data source.
      field: the feature holding the text.
      where: the record's ``spec:number``, for the messages.
      stats: when given, counts what is skipped (``empty_skipped``, ``undecodable_skipped``,
        ``undecodable_locations``) as ``read_examples`` does.
      on_decode_error: 'skip' or 'raise' (``ValueError`` naming ``where``).
    """
    value = record_value(record, field)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            _undecodable(where, err, new_stats() if stats is None else stats, on_decode_error)
            return None
    value = str(value).strip()
    if not value and stats is not None:
        stats["empty_skipped"] += 1
    return value or None


def _read_tfds(
    spec: str,
    *,
    max_examples: int | None,
    data_dir: str | os.PathLike | None,
    text_field: str | None,
    on_decode_error: str,
) -> tuple[list[str], dict[str, Any]]:
    source, field = open_tfds(spec, data_dir=data_dir, text_field=text_field)
    stats = new_stats()
    texts: list[str] = []
    n = len(source)
    for start in range(0, n, _READ_CHUNK):
        if max_examples is not None and len(texts) >= max_examples:
            break
        records = source.__getitems__(list(range(start, min(n, start + _READ_CHUNK))))
        for offset, record in enumerate(records):
            if max_examples is not None and len(texts) >= max_examples:
                break
            stats["lines_read"] += 1
            text = record_text(
                record, field, where=f"{spec}:{start + offset}", stats=stats, on_decode_error=on_decode_error
            )
            if text is not None:
                texts.append(text)
    stats["examples"] = len(texts)
    warn_undecodable(spec, stats)
    return texts, stats
