"""``train_and_evaluate(config, workdir)``: the two-phase training loop (Park & Lee 2021).

Phase 1 (``config.phase1.steps > 0``): KL weight 0, the parameters matching ``config.phase1.frozen`` (the
decoder side) get no updates; evaluation keeps the checkpoint with the best validation reconstruction.
Phase 2 starts from that checkpoint with a fresh optimizer and trains everything with the configured
collapse remedy (``config.loss``). ``config.train_steps`` counts the steps of both phases.

Robustness: one training process per workdir (``WORKDIR/.lock``, see ``flax_textvae.workdir``); rerunning
with the same workdir resumes from the newest checkpoint (state, phase, data-iterator position) when the config
continues the same run, and starts afresh, discarding what an earlier start left, when there is no checkpoint;
``metrics.jsonl`` holds exactly one row per logged step across restarts; SIGTERM saves a checkpoint of the
current step and returns; a non-finite loss stops the run naming the step, and the checkpoints on disk stay
those of the last good state. Only process 0 writes logs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax_textvae import builders, checkpoints, evaluate, parallel, validation
from flax_textvae import workdir as rundir
from flax_textvae.step import StepConfig, TrainState, kl_fns, make_optimizer, train_step

__all__ = ["TrainState", "train_step", "train_and_evaluate", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient becomes NaN / inf."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class _Logger:
    """metrics.jsonl + TensorBoard on process 0, and a one-line progress display."""

    def __init__(self, workdir: str, total_steps: int):
        self.main = jax.process_index() == 0
        self.total = total_steps
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.main:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional
                self.tb = None
        self.rate = None

    def _rows(self) -> list[str]:
        """The complete rows on disk, as lines (a line torn by a crash is left out)."""
        if not os.path.isfile(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    if line.endswith("\n") and isinstance(json.loads(line), dict):
                        rows.append(line)
                except ValueError:
                    pass
        return rows

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after ``step`` (a resumed run logs those steps again), atomically.

        ``step < 0`` empties the file (a first start). The file is replaced in one ``os.replace``, so a kill
        during the rewrite leaves the old rows or the new ones.
        """
        if not self.main or not os.path.isfile(self.path):
            return
        rows = [line for line in self._rows() if step >= 0 and json.loads(line).get("step", 0) <= step]
        rundir.write_atomic(self.path, "".join(rows))

    def has_row(self, step: int, split: str) -> bool:
        """Whether a row of ``split`` ('train' when a row has no split) at ``step`` is on disk."""
        for line in self._rows():
            row = json.loads(line)
            if row.get("step") == step and row.get("split", "train") == split:
                return True
        return False

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])
            self.tb.flush()

    def progress(self, step: int, row: dict) -> None:
        if not self.main:
            return
        # ETA from a moving average of recent intervals' rates (the first ones include compile time).
        rate = row.get("steps_per_s", 0.0)
        self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
        left = (self.total - step) / max(self.rate, 1e-9)
        eta = f"{int(left // 60)}m{int(left % 60):02d}s"
        kl_ctl = f"C {row['kl_target']:.2f}" if row.get("kl_target") else f"w {row.get('kl_weight', 0):.3f}"
        print(f"[phase {row['phase']}] step {step}/{self.total}  loss {row['loss']:.3f}  rec {row['rec']:.3f}  "
              f"kl {row['kl']:.3f}  {kl_ctl}  |  {row.get('steps_per_s', 0):.2f} steps/s  "
              f"{row.get('tokens_per_s', 0):.0f} tok/s  ETA {eta}", flush=True)


def _phases(config) -> list[tuple[int, int, int]]:
    """[(phase, first_step, end_step)] for the configured phases."""
    p1 = int(config.phase1.steps)
    if p1 >= config.train_steps:
        raise ValueError(f"phase1.steps={p1} must be smaller than train_steps={config.train_steps}")
    return ([(1, 0, p1)] if p1 > 0 else []) + [(2, p1, int(config.train_steps))]


class _Runner:
    """Compiled step + placement for one phase, in 'mesh' or 'pmap' mode."""

    def __init__(self, config, run, phase: int, first: int, end: int, init_params):
        self.mode = config.parallel.mode
        if self.mode not in ("mesh", "pmap"):
            raise ValueError(f"parallel.mode={self.mode!r}; choose 'mesh' or 'pmap'")
        # Phase 1 freezes the decoder side; the tensors the forward pass never reads are frozen throughout.
        frozen = (tuple(config.phase1.frozen) if phase == 1 else ()) + run.unused_param_patterns()
        self.tx, lr = make_optimizer(config.optimizer, end - first, init_params, frozen)
        wfn, tfn = kl_fns(config.loss, phase)
        cfg = StepConfig(
            kind="elbo" if phase == 1 else config.loss.kind, free_bits=config.loss.free_bits,
            free_bits_mode=config.loss.free_bits_mode, beta=config.loss.beta, phase_start=first,
            delete_rate=config.denoise.delete_rate, mask_rate=config.denoise.mask_rate,
            word_dropout=config.denoise.word_dropout, special_ids=run.special_ids, pad_id=run.pad_id,
            mask_id=run.mask_id, unk_id=run.unk_id, grad_accum_steps=config.optimizer.grad_accum_steps,
            frozen=frozen)
        global_kl = cfg.kind == "constraint" or (cfg.kind == "free_bits" and cfg.free_bits_mode == "batch")
        if global_kl and (self.mode == "pmap" or cfg.grad_accum_steps > 1):
            raise ValueError(
                f"loss.kind={cfg.kind!r} (free_bits_mode={cfg.free_bits_mode!r}) needs the KL of the whole batch, "
                "which parallel.mode='pmap' and optimizer.grad_accum_steps > 1 compute per shard; use "
                "--config.parallel.mode=mesh --config.optimizer.grad_accum_steps=1 (the mesh splits the batch "
                "over every device and still computes the global KL)")
        fn = functools.partial(train_step, model=run.model, tx=self.tx, cfg=cfg, kl_weight_fn=wfn,
                               kl_target_fn=tfn, lr_fn=lr)
        if self.mode == "pmap":
            parallel.global_batch_size_check(config.batch_size, len(parallel.local_devices(
                config.parallel.num_devices)) * jax.process_count())
            self.devices = parallel.local_devices(config.parallel.num_devices)
            # The mapped axis spans every process's devices, grouped by process (each process feeds its own
            # local ones); with only the local devices each process would train alone on its own rows.
            self.step = jax.pmap(functools.partial(fn, axis_name="batch"), axis_name="batch", donate_argnums=0,
                                 devices=parallel.global_devices(len(self.devices)))
        else:
            self.mesh = parallel.make_mesh(config.parallel.fsdp, parallel.global_devices(config.parallel.num_devices))
            parallel.global_batch_size_check(config.batch_size, self.mesh)
            self.batch_sh = parallel.batch_sharding(self.mesh)
            abstract = jax.eval_shape(lambda: self.new_state(init_params, 0, jax.random.key(0), raw=True))
            self.state_sh = parallel.state_shardings(abstract, self.mesh)
            self.step = jax.jit(fn, in_shardings=(self.state_sh, self.batch_sh),
                                out_shardings=(self.state_sh, parallel.replicated(self.mesh)), donate_argnums=0)

    def new_state(self, params, step: int, key, raw: bool = False) -> TrainState:
        state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=self.tx.init(params),
                           rng=jnp.array(jax.random.key_data(key), copy=True))
        return state if raw else self.place(state)

    def place(self, state: TrainState) -> TrainState:
        if self.mode == "pmap":
            return parallel.replicate_for_pmap(state, self.devices)
        return jax.device_put(state, self.state_sh)

    def abstract(self, state: TrainState):
        """Restore target with this runner's shardings (host-local, unreplicated for pmap)."""
        if self.mode == "pmap":
            return checkpoints.abstract_like(state)
        return checkpoints.abstract_like(state, self.state_sh)

    def host_state(self, state: TrainState) -> TrainState:
        """The state as one logical copy (for saving)."""
        return parallel.unreplicate(state) if self.mode == "pmap" else state

    def batch(self, local: dict) -> dict:
        if self.mode == "pmap":
            return parallel.to_pmap(local, len(self.devices))
        return parallel.to_global(local, self.batch_sh)

    def metrics(self, m: dict) -> dict:
        return parallel.unreplicate(m) if self.mode == "pmap" else m


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
      The final evaluation metrics on ``config.data.eval``, or ``{'preempted': True, 'step': N}`` after SIGTERM.
    """
    validation.validate(config, workdir=workdir)  # every config / data-file problem at once, before any write
    parallel.initialize_distributed(config.parallel)
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    # Process 0 holds the lock for the whole run: the other processes of a multi-host run write nothing.
    with rundir.WorkdirLock(workdir) if main else contextlib.nullcontext():
        return _train_locked(config, workdir, main)


def _train_locked(config, workdir: str, main: bool) -> dict:
    resuming = bool(rundir.checkpoint_steps(workdir))
    changes = rundir.resume_changes(config, workdir) if resuming else []  # refuses before any write
    if main and not resuming:
        rundir.discard_unfinished(workdir)
        rundir.record_start(config, workdir)
    run = builders.build_run(config, workdir)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    log = _Logger(workdir, config.train_steps)
    meta = ckpt.read_meta()
    if meta is not None:
        run.train_iter.set_state(meta["data"])
        if meta["step"] >= config.train_steps:
            print(f"{workdir} finished at step {meta['step']}: evaluating its final checkpoint", flush=True)
        else:
            print(f"Resuming from step {meta['step']} (phase {meta['phase']}) in {workdir}", flush=True)
        if main:
            if not os.path.isfile(os.path.join(workdir, rundir.CONFIG_NAME)):
                rundir.record_start(config, workdir)
            rundir.record_changes(config, workdir, meta["step"], changes)
    best_meta = ckpt.read_meta(best=True) if meta is not None else None
    best = min((meta or {}).get("best_rec", float("inf")), (best_meta or {}).get("best_rec", float("inf")))
    log.truncate_after(meta["step"] if meta is not None else -1)
    params = run.init_params(jax.random.key(config.seed))
    trained = False
    key = jax.random.key(config.seed + 1)

    with _Preemption() as preempt:
        for phase, first, end in _phases(config):
            if meta is not None and (meta["phase"] > phase or meta["step"] >= end):
                continue  # finished before the restart
            runner = _Runner(config, run, phase, first, end, params)
            state = runner.new_state(params, first, key, raw=True)
            if meta is not None and meta["phase"] == phase:
                state, _ = ckpt.restore(runner.abstract(state))
            elif phase == 2 and first > 0:
                state = runner.new_state(_best_phase1_params(ckpt, runner, state), first, key, raw=True)
            state = runner.place(state)
            meta = None
            state, best, stop = _run_phase(config, run, runner, state, phase, end, ckpt, log, best, preempt)
            params, trained = runner.host_state(state).params, True
            if stop:
                ckpt.close()
                return {"preempted": True, "step": int(runner.host_state(state).step)}
    if not trained:  # the run had already finished: evaluate its final checkpoint
        params, _ = checkpoints.load_params(workdir)
    result = evaluate.evaluate_split(run, params, run.eval_batches, iw_samples=0, seed=config.seed,
                                     with_bleu=True)
    if trained or not log.has_row(int(config.train_steps), "eval"):  # a rerun of a finished run logs it once
        log.write({"step": int(config.train_steps), "phase": 2, "split": "eval", **result})
    if main:
        _print_final(run, params, result)
    ckpt.close()
    return result


def _best_phase1_params(ckpt, runner, state):
    if ckpt.latest_step(best=True) is None:
        return state.params
    restored, meta = ckpt.restore(checkpoints.abstract_like({"params": state.params}), best=True)
    print(f"Phase 2 starts from the phase-1 checkpoint of step {meta['step']} (eval rec {meta['best_rec']:.3f})",
          flush=True)
    return restored["params"]


def _run_phase(config, run, runner, state, phase, end, ckpt, log, best, preempt):
    """Steps until ``end``; returns (state, best phase-1 rec, stopped_early)."""
    step = int(runner.host_state(state).step)
    pending, fetched, t_last = [], [], time.time()  # device metrics not yet fetched; fetched, not yet logged

    def save(step, *, best_ckpt=False, best_rec=best):
        meta = {"step": step, "phase": phase, "data": run.train_iter.get_state(), "best_rec": best_rec}
        host = runner.host_state(state)
        ckpt.save(step, {"params": host.params} if best_ckpt else host, meta, best=best_ckpt)

    def fetch():
        """This interval's device metrics, fetched; never checkpoint past a non-finite step."""
        nonlocal pending, fetched
        new = [(s, jax.device_get(runner.metrics(x))) for s, x in pending]
        pending, fetched = [], fetched + new
        bad = [s for s, r in new if r["nonfinite"]]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad[0]} (phase {phase}); the run stopped there and the "
                f"last checkpoint on disk is step {ckpt.latest_step()}. Lower optimizer.learning_rate, "
                f"enable optimizer.grad_clip or try model.dtype=float32.")

    while step < end:
        local = next(run.train_iter)
        state, m = runner.step(state, runner.batch(local))
        pending.append((step, m))
        step += 1
        last = step == end
        do_ckpt = step % config.checkpoint_every == 0 or last or preempt.requested
        if step % config.log_every == 0 or do_ckpt:
            fetch()  # the only host sync
            if step % config.log_every == 0 or last:
                rows, fetched = fetched, []
                dt = time.time() - t_last
                row = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1] if k != "nonfinite"}
                # Schedules and norms as they are at `step`; losses and rates averaged over the interval.
                row.update({k: float(rows[-1][1][k]) for k in ("kl_weight", "kl_target", "learning_rate",
                                                                "param_norm")})
                tokens = float(np.sum([r["num_tokens"] for _, r in rows]))
                row.update(step=step, phase=phase, steps_per_s=len(rows) / dt, tokens_per_s=tokens / dt,
                           examples_per_s=len(rows) * config.batch_size / dt)
                log.write(row)
                log.progress(step, row)
        # The end of phase 2 is evaluated once, fully, by train_and_evaluate.
        if ((config.eval_every and step % config.eval_every == 0) or last) and not (last and end == config.train_steps):
            ev = evaluate.evaluate_split(run, runner.host_state(state).params,
                                         run.eval_subset(config.data.eval_max_examples), iw_samples=0,
                                         seed=config.seed, mesh=getattr(runner, "mesh", None))
            log.write({"step": step, "phase": phase, "split": "eval", **ev})
            if jax.process_index() == 0:
                print(f"  eval @ {step}: rec {ev['rec']:.3f}  kl {ev['kl']:.3f}  au {ev['au']}  "
                      f"ppl_elbo {ev['ppl_elbo']:.2f}", flush=True)
            if phase == 1 and ev["rec"] < best:
                best = ev["rec"]
                save(step, best_ckpt=True, best_rec=best)
        if do_ckpt:
            save(step, best_rec=best)
        if preempt.requested:
            if not do_ckpt:  # SIGTERM came after this step's save decision (during the evaluation, say)
                fetch()
                save(step, best_rec=best)
            print(f"SIGTERM: saved the checkpoint of step {ckpt.latest_step()} in {ckpt.workdir}; exiting.",
                  flush=True)
            return state, best, True
        if not pending and not fetched:
            t_last = time.time()  # after the log row and any eval / save, so rates measure training steps only
    return state, best, False


def _print_final(run, params, result) -> None:
    print("\nFinal evaluation on", run.eval_spec)
    for k, v in result.items():
        print(f"  {k:>14s}  {v:.4f}" if isinstance(v, float) else f"  {k:>14s}  {v}")
    pairs = evaluate.reconstruct_examples(run, params, n=5)
    print("\nReconstructions (z = posterior mean, greedy):")
    for src, out in pairs:
        print(f"  in : {src}\n  out: {out}")
    sys.stdout.flush()
