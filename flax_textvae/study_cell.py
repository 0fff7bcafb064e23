"""One cell of a study grid: its record, the skip / re-evaluate decision, its training and held-out evaluation.

``flax_textvae.study.run_study`` calls :func:`run_cell` for each cell in order. The record
``CELL_DIR/study_cell.json`` (:data:`RECORD_NAME`) keeps the cell's config, the evaluation settings
(:func:`eval_settings`), the steps trained and the minutes; a cell whose record matches its config (up to the
loop-only fields a resume may change) and the study's evaluation, and whose eval json exists, is skipped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from flax_textvae import builders, evaluate, plots, train
from flax_textvae import workdir as rundir

RECORD_NAME = "study_cell.json"


def _learned(config) -> dict:
    """The config as a flat dict without the loop-only fields a resume may change."""
    flat = rundir.dotted_keys(config if isinstance(config, dict) else rundir.config_dict(config))
    return {k: v for k, v in flat.items() if k not in rundir.SAFE_FIELDS and not k.startswith(rundir.SAFE_SECTIONS)}


def eval_settings(study: Any, config: Any) -> dict:
    """What a cell's held-out evaluation depends on (compared with the record to decide on a rerun).

    Args:
      study: the ``flax_textvae.study.Study``.
      config: the cell's config (for its seed).

    Returns:
      ``{'data', 'max_examples', 'name', 'iw_samples', 'seed'}``.
    """
    return {
        "data": study.eval_data,
        "max_examples": int(study.eval_max_examples),
        "name": eval_name(study),
        "iw_samples": int(study.iw_samples),
        "seed": int(config.seed),
    }


def eval_name(study: Any) -> str:
    """The held-out results' name: ``study.eval_name`` or the split's (``test.txt`` -> ``test``).

    Args:
      study: the ``flax_textvae.study.Study``.

    Returns:
      The stem of the cell's ``eval/NAME.json``.
    """
    return study.eval_name or builders.split_name(study.eval_data)


def read_record(cell_dir: str) -> dict | None:
    """The study's record of a cell.

    Args:
      cell_dir: the cell's run directory.

    Returns:
      The parsed ``CELL_DIR/study_cell.json``, or None when it is absent or unreadable.
    """
    try:
        with open(os.path.join(cell_dir, RECORD_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_record(cell_dir: str, record: dict) -> None:
    rundir.write_atomic(os.path.join(cell_dir, RECORD_NAME), json.dumps(record, indent=2, sort_keys=True))


def _train_steps_done(cell_dir: str, default: int) -> int:
    path = os.path.join(cell_dir, "metrics.jsonl")
    steps = (
        [r["step"] for r in plots.read_metrics_jsonl(path) if r.get("split", "train") == "train"]
        if os.path.isfile(path)
        else []
    )
    return int(max(steps)) if steps else int(default)


def _skipped_row(name: str, record: dict, result_path: str) -> dict:
    """The row of a cell finished earlier: its record's steps and minutes, the metrics of its eval json."""
    with open(result_path) as f:
        return {
            "cell": name,
            "steps": record.get("steps"),
            "minutes": record.get("minutes"),
            "skipped": True,
            **json.load(f),
        }


def _train_cell(config: Any, cell_dir: str, tag: str, log: Callable[[str], None], t0: float) -> dict | None:
    """Trains (or resumes) the cell and writes its new record; the record, or None after SIGTERM or Ctrl-C."""
    log(f"{tag}: training in {cell_dir}")
    out = train.train_and_evaluate(config, cell_dir)
    if out.get("preempted"):
        log(f"{tag}: stopped (SIGTERM or Ctrl-C) at step {out.get('step')}; rerun the study to resume it")
        return None
    record = {
        "config": rundir.config_dict(config),
        "train_minutes": (time.time() - t0) / 60,
        "steps": _train_steps_done(cell_dir, config.train_steps),
    }
    _write_record(cell_dir, record)
    return record


def run_cell(
    study: Any, config: Any, name: str, cell_dir: str, held_out: str, tag: str, log: Callable[[str], None]
) -> dict | None:
    """Trains (or resumes) and evaluates one cell, skipping what its record shows as done.

    Args:
      study: the ``flax_textvae.study.Study`` the cell belongs to.
      config: the cell's locked config.
      name: the cell's name.
      cell_dir: its run directory (``WORKDIR/cells/NAME``).
      held_out: the (cut) held-out split it is evaluated on.
      tag: the prefix of its progress lines.
      log: where progress lines go.

    Returns:
      Its row ``{'cell', 'steps', 'minutes', 'skipped', **metrics}``, or None when SIGTERM or Ctrl-C stopped it.
    """
    record = read_record(cell_dir) or {}
    settings = eval_settings(study, config)
    result_path = os.path.join(cell_dir, "eval", f"{settings['name']}.json")
    trained = record.get("config") is not None and _learned(record["config"]) == _learned(config)
    if trained and record.get("eval") == settings and os.path.isfile(result_path):
        log(f"{tag}: finished earlier ({record.get('minutes', 0):.1f} min), skipped")
        return _skipped_row(name, record, result_path)
    t0 = time.time()
    if not trained:
        record = _train_cell(config, cell_dir, tag, log, t0)
        if record is None:
            return None
    log(
        f"{tag}: evaluating on {study.eval_data}"
        + (f" (first {study.eval_max_examples})" if study.eval_max_examples else "")
        + f", iw_samples={study.iw_samples}"
    )
    t1 = time.time()
    result = evaluate.evaluate(
        config, cell_dir, data=held_out, name=settings["name"], iw_samples=study.iw_samples, seed=settings["seed"]
    )
    record.update(eval=settings, eval_minutes=(time.time() - t1) / 60)
    record["minutes"] = record.get("train_minutes", 0.0) + record["eval_minutes"]
    _write_record(cell_dir, record)
    log(
        f"{tag}: done in {(time.time() - t0) / 60:.1f} min  (rec {result['rec']:.2f}  kl {result['kl']:.2f}  "
        f"au {result['au']})"
    )
    return {"cell": name, "steps": record["steps"], "minutes": record["minutes"], "skipped": False, **result}
