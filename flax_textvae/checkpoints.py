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
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "meta")


def _manager(directory: str, keep: int | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


class Checkpointer:
    """The run's checkpoints: recent ones (``keep``) and the best of phase 1."""

    def __init__(self, workdir: str, keep: int = 2):
        self.workdir = workdir
        self.recent = _manager(os.path.join(workdir, "checkpoints"), keep)
        self.best = _manager(os.path.join(workdir, "best_phase1"), 1)

    def save(self, step: int, state: Any, meta: dict, *, best: bool = False) -> None:
        """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON-able) at ``step``; blocks until written."""
        mgr = self.best if best else self.recent
        if step in mgr.all_steps():
            return
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        mgr.wait_until_finished()

    def latest_step(self, *, best: bool = False) -> int | None:
        return (self.best if best else self.recent).latest_step()

    def read_meta(self, step: int | None = None, *, best: bool = False) -> dict | None:
        """The JSON record of a checkpoint (the newest when ``step`` is None), or None if there is none."""
        mgr = self.best if best else self.recent
        step = mgr.latest_step() if step is None else step
        if step is None:
            return None
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, abstract_state: Any, step: int | None = None, *, best: bool = False):
        """Restores ``(state, meta)``; ``abstract_state`` gives structure, dtypes and shardings."""
        mgr = self.best if best else self.recent
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.workdir}")
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
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
    """``(params, step)`` from a run's newest (or given) checkpoint, without rebuilding its optimizer."""
    mgr = _manager(os.path.join(workdir, "checkpoints"), None)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first with "
            f"`python run_train.py --config=... --workdir={workdir}`")
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    mgr.close()
    return state["params"], step
