"""``train_and_evaluate(config, workdir)``: the two-phase training loop (Park & Lee 2021).

Phase 1 (``config.phase1.steps > 0``): KL weight 0, the parameters matching ``config.phase1.frozen`` (the
decoder side) get no updates; evaluation keeps the checkpoint with the best validation reconstruction.
Phase 2 starts from that checkpoint with a fresh optimizer and trains everything with the configured
collapse remedy (``config.loss``). ``config.train_steps`` counts the steps of both phases.

Robustness: one training process per workdir (``WORKDIR/.lock``, see ``flax_textvae.workdir``); rerunning
with the same workdir resumes from the newest checkpoint (state, phase, data-iterator position) when the config
continues the same run, and starts afresh, discarding what an earlier start left, when there is no checkpoint;
``metrics.jsonl`` holds exactly one row per logged step across restarts; SIGTERM or Ctrl-C saves a checkpoint of the
current step and returns; a non-finite loss stops the run naming the step, and the checkpoints on disk stay
those of the last good state. Only process 0 writes logs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import jax

from flax_textvae import builders, checkpoints, compile_cache, evaluate, hardware, parallel, validation
from flax_textvae import workdir as rundir
from flax_textvae.monitor import MetricsLog, Preemption, Progress, note_start_step
from flax_textvae.step import TrainState, train_step
from flax_textvae.trainer import NonFiniteLossError, PhaseContext, Trainer

__all__ = ["TrainState", "Trainer", "train_step", "train_and_evaluate", "NonFiniteLossError"]


def _phases(config) -> list[tuple[int, int, int]]:
    """[(phase, first_step, end_step)] for the configured phases."""
    p1 = int(config.phase1.steps)
    if p1 >= config.train_steps:
        raise ValueError(f"phase1.steps={p1} must be smaller than train_steps={config.train_steps}")
    return ([(1, 0, p1)] if p1 > 0 else []) + [(2, p1, int(config.train_steps))]


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes) the run in ``workdir`` and returns the final evaluation metrics.

    Holds ``WORKDIR/.lock`` throughout (process 0), so a second training process on the same workdir stops
    at once with :class:`flax_textvae.workdir.WorkdirInUseError`. With a checkpoint in ``workdir`` the run
    resumes if ``config`` continues it (else :class:`~flax_textvae.validation.ConfigError`, before anything
    is written); without one it starts afresh.

    Args:
      config: the run's ConfigDict (see ``flax_textvae.configuration``).
      workdir: the run directory.

    Returns:
      The final metrics on ``config.data.eval``, or ``{'preempted': True, 'step': N}`` after SIGTERM / Ctrl-C.
    """
    validation.validate(config, workdir=workdir)  # every config / data-file problem at once, before any write
    compile_cache.enable(config.get("compile_cache_dir", "auto"))  # before the first compile
    parallel.initialize_distributed(config.parallel)
    validation.check_devices(config)  # starts the backend: after the distributed initialisation
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    # Process 0 holds the lock for the whole run: the other processes of a multi-host run write nothing.
    with rundir.WorkdirLock(workdir) if main else contextlib.nullcontext():
        return _train_locked(config, workdir, main)


def _train_locked(config, workdir: str, main: bool) -> dict:
    """:func:`train_and_evaluate` once the workdir lock is taken; ``main`` is True on process 0, which holds it."""
    steps = rundir.checkpoint_steps(workdir)
    note_start_step(max(steps, default=0))  # multi-host: a SIGTERM while loading then stops at a reachable step
    resuming = bool(steps)
    changes = rundir.resume_changes(config, workdir) if resuming else []  # refuses before any write
    if main and not resuming:
        rundir.discard_unfinished(workdir)
        rundir.record_start(config, workdir)
    progress = Progress(config.train_steps)
    for line in hardware.device_lines():
        progress.say(line)
    with progress.working("loading the model, the tokenizer and the data"):
        run = builders.build_run(config, workdir)
    note = builders.attention_note(run)
    if note:
        progress.say(note)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    log = MetricsLog(workdir)
    meta = ckpt.read_meta()
    if meta is not None:
        run.train_iter.set_state(meta["data"])
        if meta["step"] >= config.train_steps:
            progress.say(f"{workdir} finished at step {meta['step']}: evaluating its final checkpoint")
        else:
            progress.say(f"Resuming from step {meta['step']} (phase {meta['phase']}) in {workdir}")
        if main:
            if not os.path.isfile(os.path.join(workdir, rundir.CONFIG_NAME)):
                rundir.record_start(config, workdir)
            rundir.record_changes(config, workdir, meta["step"], changes)
    best_meta = ckpt.read_meta(best=True) if meta is not None else None
    best = min((meta or {}).get("best_rec", float("inf")), (best_meta or {}).get("best_rec", float("inf")))
    log.truncate_after(meta["step"] if meta is not None else -1)
    with progress.working("initialising the parameters"):
        params = run.init_params(jax.random.key(config.seed))
    trained = False

    with Preemption() as preempt:
        ctx = PhaseContext(ckpt=ckpt, log=log, progress=progress, preempt=preempt, best=best)
        for phase, first, end in _phases(config):
            if meta is not None and (meta["phase"] > phase or meta["step"] >= end):
                continue  # finished before the restart
            trainer = Trainer(config, run, phase, first, end, params)
            with progress.working(f"preparing phase {phase} (optimizer state, checkpoint restore)"):
                state = _phase_start(trainer, ckpt, meta, params, jax.random.key(config.seed + 1))
            meta = None
            state, stopped = trainer.run_phase(trainer.place(state), ctx)
            params, trained = trainer.host_state(state).params, True
            if stopped:
                ckpt.close()
                return {"preempted": True, "step": int(trainer.host_state(state).step)}
    if not trained:  # the run had already finished: evaluate its final checkpoint
        params, _ = checkpoints.load_params(workdir)
    result = _final_evaluation(run, params, config.seed, progress)
    if trained or not log.has_row(int(config.train_steps), "eval"):  # a rerun of a finished run logs it once
        log.write({"step": int(config.train_steps), "phase": 2, "split": "eval", **result})
    if main:
        with progress.working("decoding the reconstructions"):
            _print_final(run, params, result)
    ckpt.close()
    return result


def _final_evaluation(run, params, seed: int, progress: Progress) -> dict:
    """The metrics of ``params`` on the run's eval split (no IW ``nll``; BLEU of greedy reconstructions)."""
    progress.say(
        f"Final evaluation on {run.eval_spec} ({len(run.eval_texts)} examples, greedy reconstructions for BLEU) ..."
    )
    start = time.time()
    with progress.working("running the final evaluation"):
        result = evaluate.evaluate_split(run, params, run.eval_batches, iw_samples=0, seed=seed, with_bleu=True)
    progress.say(f"  done in {time.time() - start:.1f} s")
    return result


def _phase_start(trainer: Trainer, ckpt, meta, params, key) -> TrainState:
    """The host state a phase starts from: the checkpoint it was interrupted at, the best phase-1
    parameters (phase 2), or ``params``."""
    state = trainer.new_state(params, trainer.first, key)
    if meta is not None and meta["phase"] == trainer.phase:
        state, _ = ckpt.restore(trainer.abstract(state))
        return state
    if trainer.phase == 2 and trainer.first > 0 and ckpt.latest_step(best=True) is not None:
        restored, best = ckpt.restore(checkpoints.abstract_like({"params": state.params}), best=True)
        print(
            f"Phase 2 starts from the phase-1 checkpoint of step {best['step']} (eval rec {best['best_rec']:.3f})",
            flush=True,
        )
        return trainer.new_state(restored["params"], trainer.first, key)
    return state


def _print_final(run, params, result) -> None:
    print("\nFinal evaluation on", run.eval_spec)
    for k, v in result.items():
        if k in ("nll", "ppl") and v is None:
            v = "run run_eval.py (importance-weighted, K = 500)"
        elif k == "iw_samples" and not v:
            v = "0 (nll / ppl need run_eval.py)"
        print(f"  {k:>14s}  {v:.4f}" if isinstance(v, float) else f"  {k:>14s}  {v}")
    pairs = evaluate.reconstruct_examples(run, params, n=5)
    print("\nReconstructions (z = posterior mean, greedy):")
    for src, out in pairs:
        print(f"  in : {src}\n  out: {out}")
    sys.stdout.flush()
