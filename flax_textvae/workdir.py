"""The run directory: one training process at a time, the run's identity, and what a restart keeps.

Files this module owns in a workdir::

    WORKDIR/.lock                  flock held by the training process; its pid and host inside
    WORKDIR/config.json            the run's config (written at the first start, updated by allowed changes)
    WORKDIR/data_fingerprint.json  size, mtime and a hash of the first MiB of the ``data.train`` file
    WORKDIR/config_changes.jsonl   one row per field changed on a resume: step, field, old, new

Rules: a start that finds no checkpoint is a first start, and whatever an earlier start left without
reaching its first checkpoint (``model/``, ``metrics.jsonl``, ``config.json``, ...) is discarded rather
than reused. A start that finds a checkpoint resumes, and only with a config that continues the same run:
:func:`resume_changes` compares it with ``config.json`` before anything is written, refuses a change to the
model, data or recipe, and returns the allowed ones (loop cadences, longer training, parallel layout).
Evaluation and inference read a workdir without the lock.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Any, Iterable, Mapping

from flax_textvae import configuration
from flax_textvae.validation import READER_PREFIXES, ConfigError

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
FINGERPRINT_NAME = "data_fingerprint.json"
CHANGES_NAME = "config_changes.jsonl"
# Fields a resumed run may change: they steer the loop or how the step is computed (the attention
# implementation, rematerialisation: equal within float rounding), not what is learned. ``train_steps`` may grow.
SAFE_FIELDS = (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "data.eval",
    "data.eval_max_examples",
    "model.attention",
    "model.remat",
)
SAFE_SECTIONS = ("parallel.",)
# What a start that never reached a checkpoint leaves, and the next first start removes.
_RUN_FILES = ("metrics.jsonl", CHANGES_NAME, FINGERPRINT_NAME)
_RUN_DIRS = ("best_phase1", "checkpoints")
# Removed only when config.json shows the folder is a run's (a foreign folder keeps its own files).
_OWNED_WHEN_RUN = ("model", "tensorboard", CONFIG_NAME)
_HASH_BYTES = 1 << 20
_ABSENT = object()  # a field one of two configs does not have


class WorkdirInUseError(OSError):
    """Another live process holds the workdir's lock (a user error: the CLI exits with code 2)."""


class ResumeConfigError(ConfigError):
    """A resume whose config would change the run (a user error: the CLI exits with code 2).

    Attributes:
      problems: one line per refused change, ``field: saved value -> new value``.
    """

    def __init__(self, problems: list[str], workdir: str):
        self.problems = list(problems)
        n = len(self.problems)
        ValueError.__init__(
            self,
            "\n".join(
                [
                    f"--workdir={workdir} holds a run trained with another config; resuming it would change "
                    f"{n} setting{'s' if n > 1 else ''} that decide{'' if n > 1 else 's'} what is learned:"
                ]
                + [f"  - {p}" for p in self.problems]
                + [
                    f"A resumed run keeps the model, data and training recipe. To train with these settings use a new "
                    f"--workdir; to resume {workdir}, drop these overrides. Nothing in {workdir} was changed."
                ]
            ),
        )


@dataclasses.dataclass(frozen=True)
class Change:
    """One config field whose value differs from the saved run's."""

    field: str
    old: Any
    new: Any


# ------------------------------------------------------------------------------------------ the lock


class WorkdirLock:
    """An exclusive ``flock`` on ``WORKDIR/.lock`` for as long as the holder runs.

    The kernel drops the lock when the holder's file descriptor closes, which includes every way a process
    ends (SIGKILL too), so a lock file left behind by a dead process is simply locked again. The holder
    writes ``{"pid", "host", "started"}`` into the file and empties it on a clean release; content found at
    acquisition therefore names a holder that died, and is reported as stale.

    Use as a context manager, or call :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock without waiting.

        Returns:
          self.

        Raises:
          WorkdirInUseError: a live process holds it; the message names the workdir and that process.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                print(
                    f"warning: cannot lock {self.path} ({err.strerror}); training without a lock, so make "
                    "sure no other run uses this workdir",
                    flush=True,
                )
                return self
            who = (
                f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started', '?')})"
                if holder
                else "another process"
            )
            raise WorkdirInUseError(
                f"--workdir={self.workdir} is in use: {who} is training in it and holds {self.path}. Wait for "
                f"it to finish or stop it (kill {holder.get('pid', 'PID')}), or train in another --workdir. "
                "Evaluation (run_eval.py) and flax_textvae.load can read the run meanwhile."
            ) from None
        stale = _read_holder(fd)
        if stale:
            print(
                f"{self.path}: re-acquired a stale lock of process {stale.get('pid')} on host "
                f"{stale.get('host')}, which is no longer running",
                flush=True,
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file and unlocks it (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    """The holder record in an open lock file ({} when empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return {}
    if not text:
        return {}
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {"pid": text}
    except ValueError:
        return {"pid": text}


# ------------------------------------------------------------------------------------------ first start


def checkpoint_steps(workdir: str) -> list[int]:
    """The finished checkpoint steps in ``WORKDIR/checkpoints``, sorted.

    Orbax renames a step folder into place only when it is complete, so an unfinished save does not count.
    """
    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir):
        return []
    return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())


def is_run_config(path: str) -> bool:
    """Whether ``path`` is a JSON file holding a run config of this library (model, vae and data sections)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("model", "vae", "data"))


def discard_unfinished(workdir: str) -> list[str]:
    """Removes what earlier starts left in a workdir that has no checkpoint; returns the names removed.

    A start that never reached its first checkpoint trained nothing anyone can load, but its
    ``model/`` (tokenizer and backbone config), ``metrics.jsonl`` rows, ``config.json`` and phase-1 best
    checkpoint would otherwise be taken up by the next start, which may use other data or another model.
    ``model/``, ``tensorboard/`` and ``config.json`` are removed only when ``config.json`` is a run config,
    so a folder that merely happens to hold such names keeps them.

    Args:
      workdir: the run directory (no finished checkpoint in it; the caller holds the lock).

    Returns:
      The entries removed, e.g. ``['metrics.jsonl', 'model']``.
    """
    if checkpoint_steps(workdir):
        raise ValueError(f"{workdir} has checkpoints; it is resumed, not started afresh")
    names = list(_RUN_FILES) + list(_RUN_DIRS)
    if is_run_config(os.path.join(workdir, CONFIG_NAME)):
        names += list(_OWNED_WHEN_RUN)
    removed = []
    for name in names:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    if removed:
        print(
            f"{workdir}: no checkpoint yet, so this is a first start; discarded what an earlier start left "
            f"({', '.join(sorted(removed))})",
            flush=True,
        )
    return removed


def record_start(config: Any, workdir: str) -> None:
    """Writes the run's identity at its first start: ``config.json`` and the data fingerprint."""
    _write_json(os.path.join(workdir, CONFIG_NAME), config_dict(config))
    _write_json(os.path.join(workdir, FINGERPRINT_NAME), {"data.train": data_fingerprint(config.data.train)})


def data_fingerprint(spec: str) -> dict | None:
    """``{path, size, mtime, sha256_first_mib}`` of a data file spec; None for reader specs (``tfds:`` ...).

    Args:
      spec: a data spec as in ``data.train``.

    Returns:
      The fingerprint, or None when ``spec`` is not a file path or the file cannot be read.
    """
    if not isinstance(spec, str) or spec.startswith(READER_PREFIXES):
        return None
    path = os.path.abspath(os.path.expanduser(spec))
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            head = hashlib.sha256(f.read(_HASH_BYTES)).hexdigest()
    except OSError:
        return None
    return {"path": path, "size": st.st_size, "mtime": st.st_mtime, "sha256_first_mib": head}


# ------------------------------------------------------------------------------------------ resume


def config_dict(config: Any) -> dict:
    """A ConfigDict as the plain JSON object saved in ``config.json`` (tuples become lists)."""
    return json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))


def dotted_keys(tree: Mapping, prefix: str = "") -> dict:
    """A nested mapping as one flat dict keyed by dotted paths: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _allowed(change: Change) -> bool:
    if change.field == "train_steps":
        return isinstance(change.old, int) and isinstance(change.new, int) and change.new > change.old
    return change.field in SAFE_FIELDS or change.field.startswith(SAFE_SECTIONS)


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def resume_changes(config: Any, workdir: str) -> list[Change]:
    """The config changes a resume of ``workdir`` may make; raises when one would change the run.

    Compares ``config`` with ``WORKDIR/config.json`` field by field (a field the saved config lacks counts
    as its ``base_config()`` default) and the ``data.train`` file with the fingerprint taken at the first
    start (its size and the hash of its first MiB). Reads only: nothing in the workdir changes.

    Args:
      config: the config of the start that found a checkpoint in ``workdir``.
      workdir: the run directory.

    Returns:
      The allowed changes (``SAFE_FIELDS``, ``parallel.*``, a larger ``train_steps``), in field order.

    Raises:
      ResumeConfigError: (a ``ConfigError``) a change to the model, data or training recipe (``vae.*``,
        ``model.*``, ``data.*``, ``batch_size``, ``seed``, ``optimizer.*``, ``loss.*``, ``denoise.*``,
        ``phase1.*``, a smaller ``train_steps``, ...), or a ``data.train`` file whose contents changed; the
        message names each field with its saved and new values.
    """
    path = os.path.join(workdir, CONFIG_NAME)
    if not os.path.isfile(path):
        return []  # nothing to compare with; the start records the config it runs
    with open(path) as f:
        saved = dotted_keys(json.load(f))
    new = dotted_keys(config_dict(config))
    defaults = dotted_keys(config_dict(configuration.base_config()))
    changes = []
    for field in sorted(set(saved) | set(new)):
        old_v = saved.get(field, defaults.get(field, _ABSENT))
        new_v = new.get(field, defaults.get(field, _ABSENT))
        if old_v != new_v:
            changes.append(Change(field, old_v, new_v))
    problems = [f"{c.field}: {_show(c.old)} in the saved run -> {_show(c.new)} now" for c in changes if not _allowed(c)]
    problems += _data_file_problems(config, workdir)
    if problems:
        raise ResumeConfigError(problems, workdir)
    return changes


def _data_file_problems(config: Any, workdir: str) -> list[str]:
    path = os.path.join(workdir, FINGERPRINT_NAME)
    try:
        with open(path) as f:
            old = json.load(f).get("data.train")
    except (OSError, ValueError, AttributeError):
        return []
    spec = config.data.train
    new = data_fingerprint(spec)
    if not old or not new or old.get("path") != new["path"]:
        return []
    if (old.get("size"), old.get("sha256_first_mib")) == (new["size"], new["sha256_first_mib"]):
        return []
    head = "same" if old.get("sha256_first_mib") == new["sha256_first_mib"] else "differs"
    return [
        f"data.train: the file {new['path']} changed since the run started (size {old.get('size')} -> "
        f"{new['size']} bytes, first MiB {head})"
    ]


def record_changes(config: Any, workdir: str, step: int, changes: Iterable[Change]) -> None:
    """Appends ``{step, field, old, new}`` rows to ``config_changes.jsonl`` and saves the new config.json.

    Args:
      config: the config the resumed run uses.
      workdir: the run directory.
      step: the checkpoint step the run resumes from.
      changes: from :func:`resume_changes`.
    """
    changes = list(changes)
    if not changes:
        return
    rows = "".join(
        json.dumps(
            {
                "step": int(step),
                "field": c.field,
                "old": None if c.old is _ABSENT else c.old,
                "new": None if c.new is _ABSENT else c.new,
            }
        )
        + "\n"
        for c in changes
    )
    with open(os.path.join(workdir, CHANGES_NAME), "a") as f:
        f.write(rows)
        f.flush()
        os.fsync(f.fileno())
    _write_json(os.path.join(workdir, CONFIG_NAME), config_dict(config))
    for c in changes:
        print(f"config change on resume at step {step}: {c.field} {_show(c.old)} -> {_show(c.new)}", flush=True)


# ------------------------------------------------------------------------------------------ atomic files


def write_atomic(path: str, text: str) -> None:
    """Replaces ``path`` with ``text`` so a reader (or a crash) sees the old file or the new one, never half.

    Writes a temporary file in the same folder, flushes and fsyncs it, then ``os.replace``-s it over ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
