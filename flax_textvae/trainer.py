"""The public training pieces: :class:`Trainer` (one phase: optimizer, compiled step, placement, the loop) and
:class:`TrainLoop` (the loop any objective's compiled step runs in: cadences, metrics fetches, rates, compile
lines, checkpoints, SIGTERM / Ctrl-C). The log, the console and the stop signal it drives are in
:mod:`flax_textvae.monitor`. ``flax_textvae.pretrain`` runs its denoising objective in a :class:`TrainLoop` of
its own.

``flax_textvae.train.train_and_evaluate`` strings phases of a :class:`Trainer` together; code that needs a
step of its own (benchmarks, tests, other objectives) builds a :class:`Trainer` directly:

    trainer = Trainer(config, run, phase=2, first=0, end=config.train_steps, init_params=params)
    state = trainer.place(trainer.new_state(params, 0, jax.random.key(1)))
    state, metrics = trainer.step(state, trainer.batch(next(run.train_iter)))

The parallel mode is a placement object from ``flax_textvae.parallel`` (mesh or pmap); nothing here branches
on it.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax_textvae import compile_cache, evaluate, parallel
from flax_textvae.monitor import MetricsLog, Preemption, Progress
from flax_textvae.prefetch import Prefetcher
from flax_textvae.step import StepConfig, TrainState, kl_fns, make_optimizer, train_step

__all__ = ["Trainer", "TrainLoop", "NonFiniteLossError", "PhaseContext"]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient becomes NaN / inf."""


@dataclasses.dataclass
class PhaseContext:
    """What the loop of one phase writes to and reads from besides the state."""

    ckpt: object  # flax_textvae.checkpoints.Checkpointer
    log: MetricsLog
    progress: Progress
    preempt: Preemption
    best: float = float("inf")  # best phase-1 validation reconstruction so far


def _step_config(config, run, phase: int, first: int, frozen: tuple) -> StepConfig:
    return StepConfig(
        kind="elbo" if phase == 1 else config.loss.kind,
        free_bits=config.loss.free_bits,
        free_bits_mode=config.loss.free_bits_mode,
        beta=config.loss.beta,
        phase_start=first,
        delete_rate=config.denoise.delete_rate,
        mask_rate=config.denoise.mask_rate,
        word_dropout=config.denoise.word_dropout,
        special_ids=run.special_ids,
        pad_id=run.pad_id,
        mask_id=run.mask_id,
        unk_id=run.unk_id,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        frozen=frozen,
        vocab_chunk_size=int(config.loss.get("vocab_chunk_size", 0)),
    )


def _check_global_kl(cfg: StepConfig, mode: str) -> None:
    global_kl = cfg.kind == "constraint" or (cfg.kind == "free_bits" and cfg.free_bits_mode == "batch")
    if global_kl and (mode == "pmap" or cfg.grad_accum_steps > 1):
        raise ValueError(
            f"loss.kind={cfg.kind!r} (free_bits_mode={cfg.free_bits_mode!r}) needs the KL of the whole batch, "
            "which parallel.mode='pmap' and optimizer.grad_accum_steps > 1 compute per shard; use "
            "--config.parallel.mode=mesh --config.optimizer.grad_accum_steps=1 (the mesh splits the batch "
            "over every device and still computes the global KL)"
        )


class Trainer:
    """One training phase: optimizer, static step settings, the compiled step and its placement.

    Args:
      config: the run's ConfigDict.
      run: the ``flax_textvae.builders.Run`` (model, tokenizer ids, data).
      phase: 1 (KL weight 0, ``config.phase1.frozen`` frozen) or 2 (``config.loss``).
      first, end: the phase's first global step and the step it ends at.
      init_params: parameters with the shapes the state will hold (for the optimizer and shardings).
    """

    def __init__(self, config, run, phase: int, first: int, end: int, init_params):
        self.config, self.run, self.phase, self.first, self.end = config, run, phase, first, end
        # Phase 1 freezes the decoder side; the tensors the forward pass never reads are frozen throughout.
        frozen = (tuple(config.phase1.frozen) if phase == 1 else ()) + run.unused_param_patterns()
        self.tx, lr = make_optimizer(config.optimizer, end - first, init_params, frozen)
        self.step_config = _step_config(config, run, phase, first, frozen)
        _check_global_kl(self.step_config, config.parallel.mode)
        wfn, tfn = kl_fns(config.loss, phase)
        fn = functools.partial(
            train_step, model=run.model, tx=self.tx, cfg=self.step_config, kl_weight_fn=wfn, kl_target_fn=tfn, lr_fn=lr
        )
        # One program for the fresh optimizer state and counters (op by op, each zeros_like would be its own).
        self._fresh = jax.jit(
            lambda params, step, key: (jnp.asarray(step, jnp.int32), self.tx.init(params), jax.random.key_data(key))
        )
        abstract = jax.eval_shape(lambda: self.new_state(init_params, 0, jax.random.key(0)))
        self.placement = parallel.make_placement(config.parallel, config.batch_size, abstract)
        self.step = self.placement.compile(fn)
        self.mesh = self.placement.mesh

    def new_state(self, params, step: int, key) -> TrainState:
        """A fresh host-side state at ``step`` (fresh optimizer state); ``place`` it before stepping."""
        step, opt_state, rng = self._fresh(params, step, key)
        return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)

    def place(self, state: TrainState) -> TrainState:
        return self.placement.place(state)

    def abstract(self, state: TrainState):
        """Restore target with this phase's placement."""
        return self.placement.abstract(state)

    def host_state(self, state: TrainState) -> TrainState:
        """The state as one logical copy (for saving)."""
        return self.placement.host(state)

    def batch(self, local: dict) -> dict:
        """This host's rows of a global batch, placed for the step."""
        return self.placement.batch(local)

    def metrics(self, metrics: dict) -> dict:
        return self.placement.metrics(metrics)

    # ------------------------------------------------------------------------------------------ the loop
    def run_phase(self, state: TrainState, ctx: PhaseContext) -> tuple[TrainState, bool]:
        """Steps until ``self.end``, logging, evaluating and checkpointing on the config's cadence.

        Returns:
          ``(state, stopped)``; ``stopped`` is True when SIGTERM or Ctrl-C ended the phase early (after a save).
        """
        return _PhaseLoop(self, ctx, int(self.host_state(state).step)).run(state)


class TrainLoop:
    """Steps a compiled step function from ``step`` to ``end``: the bookkeeping every objective shares.

    Metrics stay on the device until a log or checkpoint step fetches them (the only host sync); a row's
    losses are averaged over its interval and its rates leave compile time out; a checkpoint is never written
    past a non-finite step; SIGTERM or Ctrl-C saves the current step and ends the loop. A new batch shape's
    compile is announced and timed, with :meth:`Progress.working` lines while it lasts. Subclasses say what an
    evaluation does (:meth:`evaluate`), when it runs (:meth:`evaluates`), what a row adds (:meth:`row_fields`,
    :meth:`say_row`) and what a checkpoint records beside the state (:meth:`meta`).

    Args:
      step_fn: ``(state, placed batch) -> (state, device metrics)``, compiled by ``placement``; the metrics
        hold ``num_tokens``, ``nonfinite`` and the :attr:`at_step_keys`.
      placement: a ``flax_textvae.parallel`` placement (``batch``, ``metrics``, ``host``).
      train_iter: the training iterator (``next``, ``get_state``, ``num_shapes``).
      config: the run's config (``log_every``, ``eval_every``, ``checkpoint_every``, ``batch_size``).
      ctx: checkpointer, log, progress display and stop signal.
      step, end: the global step the loop starts at and the one it stops at.
    """

    label = "step"  # what compiles: "compiling the LABEL for batch shape [B, T]"
    at_step_keys = ("learning_rate", "param_norm")  # logged as they are at the row's step, not averaged

    def __init__(self, *, step_fn, placement, train_iter, config, ctx: PhaseContext, step: int, end: int):
        self.step_fn, self.placement, self.train_iter = step_fn, placement, train_iter
        self.config, self.ctx, self.step, self.end = config, ctx, step, end
        self.pending, self.fetched = [], []  # device metrics not yet fetched; fetched, not yet logged
        self.t_last, self.compile_s = time.time(), 0.0
        self.shapes: set = set()
        self.batches = None  # the Prefetcher over train_iter while run() runs

    # ------------------------------------------------------------------------------- what subclasses say
    def evaluates(self, last: bool) -> bool:
        """Whether the step just taken is evaluated (every ``eval_every`` steps and the last one)."""
        every = self.config.eval_every
        return bool(every and self.step % every == 0) or last

    def evaluate(self, state) -> None:
        """Evaluates ``state`` at :attr:`step` (logging and printing the result)."""

    def row_fields(self) -> dict:
        """Fields every training row carries besides the metrics, the step and the rates."""
        return {}

    def say_row(self, row: dict) -> None:
        self.ctx.progress.say(
            f"step {self.step}/{self.end}  loss {row['loss']:.3f}  |  "
            f"{row['steps_per_s']:.2f} steps/s  ETA {self.ctx.progress.eta(self.step, row)}"
        )

    def meta(self) -> dict:
        """What a checkpoint records beside the state: the step and the data position."""
        return {"step": self.step, "data": (self.batches or self.train_iter).get_state()}

    def save(self, state) -> None:
        with self.ctx.progress.working(f"saving the checkpoint of step {self.step}"):
            self.ctx.ckpt.save(self.step, self.placement.host(state), self.meta())

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, state) -> tuple[object, bool]:
        """Steps until :attr:`end`; returns ``(state, stopped)``, ``stopped`` after SIGTERM or Ctrl-C (saved).

        With ``data.prefetch = N > 0`` a background thread draws and places the next N batches while the loop
        waits for the device; checkpoints record the position of the batches stepped on, and at the end the
        iterator is rewound to it (the next phase sees the same batches either way).
        """
        with Prefetcher(self.train_iter, self.placement.batch, int(self.config.data.get("prefetch", 0))) as batches:
            self.batches = batches
            try:
                return self._run(state)
            finally:
                self.batches = None

    def _run(self, state) -> tuple[object, bool]:
        c, ctx = self.config, self.ctx
        while self.step < self.end:
            state = self._train_step(state)
            last = self.step == self.end
            stop = ctx.preempt.stop_at(self.step)
            do_ckpt = self.step % c.checkpoint_every == 0 or last or stop
            if self.step % c.log_every == 0 or do_ckpt:
                self._fetch()  # the only host sync
                if self.step % c.log_every == 0 or last:
                    self._log_row()
            if self.evaluates(last):
                self.evaluate(state)
            if do_ckpt:
                self.save(state)
            if stop or ctx.preempt.stop_at(self.step):
                if not do_ckpt:  # the stop came after this step's save decision (during the evaluation, say)
                    self._fetch()
                    self.save(state)
                ctx.progress.say(
                    f"{ctx.preempt.reason}: saved the checkpoint of step {ctx.ckpt.latest_step()} in "
                    f"{ctx.ckpt.workdir}; exiting (rerun the same command to resume)."
                )
                return state, True
            if not self.pending and not self.fetched:
                self.t_last, self.compile_s = time.time(), 0.0  # rates measure training steps only
        return state, False

    def _train_step(self, state):
        local, placed = next(self.batches)
        shape = tuple(local["input_ids"].shape)
        if shape in self.shapes:
            state, m = self.step_fn(state, placed)
        else:
            state, m = self._first_call(state, placed, shape)
        self.pending.append((self.step, m))
        self.step += 1
        return state

    def _first_call(self, state, placed, shape: tuple):
        """The step on a batch shape not seen before, saying what its compile took and whether the program
        came from the persistent compilation cache."""
        self.shapes.add(shape)
        known = getattr(self.train_iter, "num_shapes", None)
        of = f" ({len(self.shapes)} of at most {known})" if known else f" ({len(self.shapes)} so far)"
        what = f"compiling the {self.label} for batch shape {list(shape)}"
        self.ctx.progress.say(f"{what}{of} ...")
        start, hits = time.time(), compile_cache.hits()
        ahead = self.placement.mesh is not None  # a jit; a pmapped function would compile again on its call
        with self.ctx.progress.working(what):
            if ahead:  # compiled before the call, so the time is the compile's alone; the call reuses it
                self.step_fn.lower(state, placed).compile()
            else:  # timed with its first call
                state, m = self.step_fn(state, placed)
                jax.block_until_ready(m)
        took = time.time() - start
        self.compile_s += took
        how = "loaded from the compilation cache" if compile_cache.hits() > hits else "compiled"
        self.ctx.progress.say(f"  {how} in {took:.1f} s")
        return self.step_fn(state, placed) if ahead else (state, m)

    def _fetch(self) -> None:
        """This interval's device metrics, fetched; never checkpoint past a non-finite step."""
        new = [(s, jax.device_get(self.placement.metrics(x))) for s, x in self.pending]
        self.pending, self.fetched = [], self.fetched + new
        bad = [s for s, r in new if r["nonfinite"]]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad[0]} ({self.label}); the run stopped there and "
                f"the last checkpoint on disk is step {self.ctx.ckpt.latest_step()}. Lower "
                f"optimizer.learning_rate, enable optimizer.grad_clip or try model.dtype=float32."
            )

    def _log_row(self) -> None:
        rows, self.fetched = self.fetched, []
        dt = max(time.time() - self.t_last - self.compile_s, 1e-9)
        row = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1] if k != "nonfinite"}
        row.update({k: float(rows[-1][1][k]) for k in self.at_step_keys})
        tokens = float(np.sum([r["num_tokens"] for _, r in rows]))
        row.update(
            step=self.step,
            **self.row_fields(),
            steps_per_s=len(rows) / dt,
            tokens_per_s=tokens / dt,
            examples_per_s=len(rows) * self.config.batch_size / dt,
        )
        self.ctx.log.write(row)
        self.say_row(row)


class _PhaseLoop(TrainLoop):
    """A VAE training phase: phase-1 evaluations keep the best checkpoint; the end of phase 2 is evaluated
    once, fully, by ``train_and_evaluate``."""

    at_step_keys = TrainLoop.at_step_keys + ("kl_weight", "kl_target")

    def __init__(self, trainer: Trainer, ctx: PhaseContext, step: int):
        super().__init__(
            step_fn=trainer.step,
            placement=trainer.placement,
            train_iter=trainer.run.train_iter,
            config=trainer.config,
            ctx=ctx,
            step=step,
            end=trainer.end,
        )
        self.t = trainer
        self.label = f"phase-{trainer.phase} step"

    def evaluates(self, last: bool) -> bool:
        return super().evaluates(last) and not (last and self.end == self.config.train_steps)

    def row_fields(self) -> dict:
        return {"phase": self.t.phase}

    def say_row(self, row: dict) -> None:
        self.ctx.progress.train_row(self.step, row)

    def evaluate(self, state: TrainState) -> None:
        c, ctx, run = self.config, self.ctx, self.t.run
        start = time.time()
        ctx.progress.say(f"  evaluating at step {self.step} ...")
        with ctx.progress.working(f"evaluating at step {self.step}"):
            ev = evaluate.evaluate_split(
                run,
                self.t.host_state(state).params,
                run.eval_subset(c.data.eval_max_examples),
                iw_samples=0,
                seed=c.seed,
                mesh=self.t.mesh,
            )
        ctx.log.write({"step": self.step, "phase": self.t.phase, "split": "eval", **ev})
        ctx.progress.say(
            f"  eval @ {self.step}: rec {ev['rec']:.3f}  kl {ev['kl']:.3f}  au {ev['au']}  "
            f"ppl_elbo {ev['ppl_elbo']:.2f}  ({time.time() - start:.1f} s)"
        )
        if self.t.phase == 1 and ev["rec"] < ctx.best:
            ctx.best = ev["rec"]
            self.save(state, best_ckpt=True)

    def meta(self) -> dict:
        return {**super().meta(), "phase": self.t.phase, "best_rec": self.ctx.best}

    def save(self, state: TrainState, *, best_ckpt: bool = False) -> None:
        host = self.t.host_state(state)
        with self.ctx.progress.working(f"saving the checkpoint of step {self.step}"):
            self.ctx.ckpt.save(self.step, {"params": host.params} if best_ckpt else host, self.meta(), best=best_ckpt)
