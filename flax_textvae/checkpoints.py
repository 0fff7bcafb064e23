"""Orbax checkpointing: the train state plus a JSON record of everything else needed to resume.

Layout of a workdir::

    WORKDIR/checkpoints/STEP/{state,meta}   the last ``keep`` checkpoints (rerunning resumes from the newest)
    WORKDIR/best_phase1/STEP/{state,meta}   the phase-1 checkpoint with the best validation reconstruction
    WORKDIR/model/                          config.json + tokenizer of the backbone (to rebuild the module)
    WORKDIR/config.json                     the run's ml_collections config
    WORKDIR/metrics.jsonl                   one row per logged step (and per evaluation)
    WORKDIR/.lock, data_fingerprint.json,   the training process's lock, the run's identity and the config
      config_changes.jsonl                  changes of its resumes (see ``flax_textvae.workdir``)

``meta`` holds the phase, the data-iterator state and the best phase-1 score, so a restart continues
with the same batches it would have seen without the interruption.

Each step folder also holds ``checksums.json`` (sha256 and size of every other file under it), written
once orbax has finished the step. Restoring verifies the newest step against it: a step that is corrupt
(a hash differs), incomplete (a file missing or truncated, the folder emptied) or unreadable by orbax is
named in one line on stderr and the newest intact step is used instead; when none is intact,
:class:`CheckpointError` (an ``OSError``: a user error, exit 2 in the command-line tools) says what is
wrong with each. Steps without a checksums file are accepted as they are once orbax can read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "meta")
CHECKSUMS_NAME = "checksums.json"  # in each step folder: {"algorithm", "files": {relative path: {sha256, size}}}
_CHUNK = 1 << 22  # bytes hashed at a time


class CheckpointError(OSError):
    """No usable checkpoint: the asked-for or every step is corrupt, incomplete, unreadable or non-finite."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files_under(folder: str) -> list[str]:
    """Every file under ``folder`` except the checksums file, as sorted relative paths."""
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != CHECKSUMS_NAME:
                out.append(rel)
    return sorted(out)


def write_checksums(step_dir: str) -> None:
    """Writes ``step_dir/checksums.json``: the sha256 and size of every other file under ``step_dir``.

    Args:
      step_dir: a finished checkpoint step folder (``WORKDIR/checkpoints/STEP``).
    """
    files = {
        rel: {"sha256": _sha256(os.path.join(step_dir, rel)), "size": os.path.getsize(os.path.join(step_dir, rel))}
        for rel in _files_under(step_dir)
    }
    save_json(os.path.join(step_dir, CHECKSUMS_NAME), {"algorithm": "sha256", "files": files})


def verify_step(step_dir: str, items: tuple[str, ...] = ITEMS) -> str | None:
    """What is wrong with a checkpoint step folder, or None when it looks intact.

    With a checksums file every listed file must be present with its size and sha256. Without one (a step
    saved before checksums were written) the folder must at least hold a non-empty folder per item.

    Args:
      step_dir: ``WORKDIR/checkpoints/STEP``.
      items: the item folders a step must hold.

    Returns:
      None, or a short description starting with ``corrupt`` or ``incomplete``.
    """
    if not os.path.isdir(step_dir):
        return "incomplete: the step folder is missing"
    path = os.path.join(step_dir, CHECKSUMS_NAME)
    if not os.path.exists(path):
        for item in items:
            d = os.path.join(step_dir, item)
            if not (os.path.isdir(d) and os.listdir(d)):
                return f"incomplete: no {item}/ data (and no {CHECKSUMS_NAME})"
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        expected = {rel: (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"corrupt: {CHECKSUMS_NAME} is unreadable ({type(e).__name__})"
    for rel, (size, digest) in expected.items():
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"incomplete: {rel} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"incomplete: {rel} is truncated ({actual} of {size} bytes)"
        if _sha256(full) != digest:
            return f"corrupt: {rel} does not match its sha256 checksum"
    return None


def _step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(mgr.directory), str(step))


def _restore_intact(
    mgr: ocp.CheckpointManager,
    step: int | None,
    restore: Callable[[int], Any],
    *,
    checked: dict | None = None,
    reported: set | None = None,
) -> tuple[int, Any]:
    """``(step, restore(step))`` for ``step``, or for the newest intact step when ``step`` is None.

    Each step found broken is named on stderr (once per ``reported`` set); ``checked`` caches the
    verdicts of :func:`verify_step` by step.

    Raises:
      CheckpointError: the given step, or every step, is broken (the message lists what is wrong with each).
      FileNotFoundError: there is no checkpoint at all, or none of the given step.
    """
    folder = str(mgr.directory)
    candidates = [step] if step is not None else sorted(mgr.all_steps(), reverse=True)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    if step is not None and not os.path.exists(_step_dir(mgr, step)):  # a step that was never saved (or kept)
        steps = ", ".join(str(s) for s in sorted(mgr.all_steps())) or "none"
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {folder} (its steps: {steps}); ask for one of those, or for none "
            "to take the newest"
        )
    checked = {} if checked is None else checked
    reported = set() if reported is None else reported
    problems = []
    for i, s in enumerate(candidates):
        if s not in checked:
            checked[s] = verify_step(_step_dir(mgr, s))
        problem = checked[s]
        if problem is None:
            try:
                return s, restore(s)
            except Exception as e:  # noqa: BLE001  (orbax raises many types on a damaged step)
                if os.path.exists(os.path.join(_step_dir(mgr, s), CHECKSUMS_NAME)):
                    raise  # the files are the ones written: the failure is not damage
                first = (str(e).strip().splitlines() or [""])[0][:200]
                problem = checked[s] = f"unreadable by orbax ({type(e).__name__}: {first})"
        problems.append(f"step {s}: {problem}")
        if s not in reported:
            reported.add(s)
            then = "; trying an older step" if i + 1 < len(candidates) else ""
            print(f"warning: checkpoint step {s} in {folder} is {problem}{then}", file=sys.stderr, flush=True)
    which = f"checkpoint step {step}" if step is not None else "no intact checkpoint"
    raise CheckpointError(
        f"{which} in {folder}: "
        + "; ".join(problems)
        + ". Restore the folder from a copy, pass --step=N of an intact step, or retrain."
    )


def check_finite(params: Any, step: int, where: str = "") -> None:
    """Raises :class:`CheckpointError` naming ``step`` unless every array of ``params`` is finite.

    Args:
      params: a pytree of arrays.
      step: the checkpoint step they came from (for the message).
      where: the checkpoint folder (for the message).
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    bad = [
        jax.tree_util.keystr(p)
        for p, x in leaves
        if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(np.asarray(x)).all()
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint step {step}{' in ' + where if where else ''} holds non-finite "
            f"parameters (NaN or inf in {len(bad)} of {len(leaves)} arrays, e.g. {bad[0]}); "
            "refusing to use it. Pass --step=N of an earlier checkpoint or retrain."
        )


def _manager(directory: str, keep: int | None) -> ocp.CheckpointManager:
    # Synchronous saves: orbax asks JAX's preemption service about the step it saves, from this thread, so in a
    # multi-host run that step is the one the loop has just reported (monitor.Preemption).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


class Checkpointer:
    """The run's checkpoints: recent ones (``keep``) and the best of phase 1.

    ``read_meta`` and ``restore`` use the newest intact step (see the module docstring); both agree on it.
    """

    def __init__(self, workdir: str, keep: int = 2):
        self.workdir = workdir
        self.recent = _manager(os.path.join(workdir, "checkpoints"), keep)
        self.best = _manager(os.path.join(workdir, "best_phase1"), 1)
        self._checked: dict[bool, dict[int, str | None]] = {False: {}, True: {}}  # verify_step verdicts by step
        self._reported: set = set()  # (best, step) already named on stderr

    def save(self, step: int, state: Any, meta: dict, *, best: bool = False) -> None:
        """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON-able) at ``step``, then its checksums.

        Blocks until written. A step that already exists is kept when intact and replaced when broken.
        """
        mgr = self.best if best else self.recent
        if step in mgr.all_steps():
            if verify_step(_step_dir(mgr, step)) is None:
                return
            mgr.delete(step)
        self._checked[best].pop(step, None)
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        mgr.wait_until_finished()
        if jax.process_index() == 0:
            write_checksums(_step_dir(mgr, step))

    def latest_step(self, *, best: bool = False) -> int | None:
        """The newest saved step, intact or not (None when there is none)."""
        return (self.best if best else self.recent).latest_step()

    def _restore(self, step: int | None, best: bool, restore: Callable[[ocp.CheckpointManager, int], Any]):
        mgr = self.best if best else self.recent
        reported = {s for b, s in self._reported if b == best}
        try:
            return _restore_intact(mgr, step, lambda s: restore(mgr, s), checked=self._checked[best], reported=reported)
        finally:
            self._reported |= {(best, s) for s in reported}

    def read_meta(self, step: int | None = None, *, best: bool = False) -> dict | None:
        """The JSON record of a checkpoint (the newest intact one when ``step`` is None), or None if there is none.

        Raises:
          CheckpointError: checkpoints exist but none (or not ``step``) is intact.
        """
        mgr = self.best if best else self.recent
        if step is None and mgr.latest_step() is None:
            return None
        _, meta = self._restore(
            step, best, lambda m, s: m.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        )
        return meta

    def restore(self, abstract_state: Any, step: int | None = None, *, best: bool = False):
        """Restores ``(state, meta)`` of ``step`` (default: the newest intact step).

        Args:
          abstract_state: gives structure, dtypes and shardings.
          step: the step, or None.
          best: restore the best phase-1 checkpoint instead of the recent ones.

        Raises:
          FileNotFoundError: there is no checkpoint.
          CheckpointError: none (or not ``step``) is intact.
        """
        mgr = self.best if best else self.recent
        if step is None and mgr.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint under {self.workdir}")
        _, out = self._restore(
            step,
            best,
            lambda m, s: m.restore(
                s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            ),
        )
        return out.state, out.meta

    def close(self) -> None:
        self.recent.close()
        self.best.close()


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs (with shardings when given) describing ``tree``, for restoring into it."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_json(path: str, obj: Any) -> None:
    """Atomic JSON write (process 0 only is the caller's job)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_params(workdir: str, step: int | None = None):
    """``(params, step)`` from a run's newest intact (or given) checkpoint, without rebuilding its optimizer.

    Args:
      workdir: the run's directory.
      step: the checkpoint step (default: the newest intact one; broken newer ones are named on stderr).

    Returns:
      The parameter pytree and the step it came from.

    Raises:
      FileNotFoundError: the run has no checkpoint.
      CheckpointError: no intact checkpoint (or ``step`` is broken), or its parameters are not finite.
    """
    folder = os.path.join(workdir, "checkpoints")
    mgr = _manager(folder, None)
    try:
        if step is None and mgr.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint in {folder}; train first with `python run_train.py --config=... --workdir={workdir}`"
            )
        step, state = _restore_intact(
            mgr, step, lambda s: mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        )
    finally:
        mgr.close()
    check_finite(state["params"], step, folder)
    return state["params"], step
