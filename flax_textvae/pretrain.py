"""BART denoising pretraining of a seq2seq backbone, from scratch or from a checkpoint folder.

    python -m flax_textvae.pretrain --config=configs/pretrain_bart_small.py --workdir=DIR [--export=OUT]

The objective is BART's text infilling (``denoise.infill_example``): in every training sequence spans with
Poisson(``pretrain.poisson_lambda``) lengths are replaced by one ``<mask>`` each until
``pretrain.mask_rate`` of the tokens are masked (a length-0 span inserts a ``<mask>``); the encoder reads
the corrupted text and the decoder, through cross-attention, reconstructs the original (teacher-forced
cross-entropy). The held-out denoising loss (nats per target token, over the first
``data.eval_max_examples`` sentences of ``data.eval``, each corrupted the same way at every evaluation)
is logged to ``WORKDIR/metrics.jsonl`` at step 0, every ``eval_every`` steps and at the end.

The run uses the library's own pieces: ``builders.build_run`` (tokenizer, from-scratch model of
``model.scratch``, the training and eval iterators), the workdir lock and resume rules of
``flax_textvae.workdir``, ``checkpoints.Checkpointer`` (a rerun with the same workdir resumes from the
newest checkpoint: parameters, optimizer, step, rng and data position), ``monitor.MetricsLog`` /
``monitor.Preemption`` (SIGTERM or Ctrl-C saves the current step and exits) and ``step.make_optimizer``, placed by
``parallel.make_placement``.

At the end the model is written as a Hugging Face folder (``WORKDIR/export`` unless ``--export=DIR``):
``config.json``, ``model.safetensors``, the tokenizer files, ``pretrain.json`` (step, held-out loss,
config) and a ``README.md`` card. ``transformers.BartForConditionalGeneration.from_pretrained`` loads it,
and ``--config.model.name_or_path=DIR`` finetunes it into a VAE (e.g. with ``configs/bart_vae.py``).
Rerunning a finished run re-evaluates it and writes the export again (to a new ``--export`` if given).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from flax_textvae import (
    builders,
    checkpoints,
    cli,
    compile_cache,
    configuration,
    hardware,
    models,
    parallel,
    validation,
)
from flax_textvae import export as export_lib
from flax_textvae import workdir as rundir
from flax_textvae.monitor import MetricsLog, Preemption, Progress, note_start_step
from flax_textvae.pretrain_objective import DenoisingConfig, make_evaluator, pretrain_step
from flax_textvae.step import TrainState, make_optimizer
from flax_textvae.trainer import NonFiniteLossError, PhaseContext, TrainLoop

__all__ = [
    "pretrain_config",
    "config_problems",
    "pretrain",
    "export_pretrained",
    "main",
    "EXPORT_FOLDER",
    "INFO_NAME",
]

EXPORT_FOLDER = "export"  # WORKDIR/export: where the pretrained model goes without --export
INFO_NAME = export_lib.PRETRAIN_INFO_NAME
export_pretrained = export_lib.export_pretrained
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "pretrain_bart_small.py")


def pretrain_config() -> ml_collections.ConfigDict:
    """``configuration.base_config()`` (a from-scratch BART) plus the ``pretrain`` section.

    ``pretrain.mask_rate``: fraction of the (non-special) tokens masked per sequence, in (0, 1).
    ``pretrain.poisson_lambda``: mean of the Poisson span lengths (> 0).
    The ``vae``, ``loss``, ``phase1`` and ``denoise`` sections are not used by pretraining.
    """
    c = configuration.base_config()
    c.model.name_or_path = "scratch"
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.mask_rate = 0.3
    c.pretrain.poisson_lambda = 3.0
    return c


def config_problems(config: Any, *, check_data: bool = True, check_model_path: bool = True) -> list[str]:
    """Every problem of a pretraining config: ``validation.config_problems`` plus the pretraining fields."""
    problems = validation.config_problems(config, check_data=check_data, check_model_path=check_model_path)
    section = config.get("pretrain") if hasattr(config, "get") else None
    if section is None:
        return problems + [
            "pretrain: the config has no pretrain section (mask_rate, poisson_lambda); build it "
            "on flax_textvae.pretrain.pretrain_config(), as configs/pretrain_bart_small.py does"
        ]
    rate, lam = section.get("mask_rate"), section.get("poisson_lambda")
    if not _number(rate) or not 0.0 < rate < 1.0:
        problems.append(
            f"pretrain.mask_rate={rate!r}: must be a number in (0, 1), the fraction of tokens masked; "
            "e.g. --config.pretrain.mask_rate=0.3"
        )
    if not _number(lam) or not lam > 0.0:
        problems.append(
            f"pretrain.poisson_lambda={lam!r}: must be a number > 0, the mean masked span length; "
            "e.g. --config.pretrain.poisson_lambda=3"
        )
    if config.model.name_or_path == "scratch" and config.model.scratch.family != "bart":
        problems.append(
            f"model.scratch.family={config.model.scratch.family!r}: text infilling pretrains a BART "
            "(a <mask> token and cross-attention); use --config.model.scratch.family=bart"
        )
    if config.optimizer.grad_accum_steps != 1:
        problems.append(
            f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps!r}: pretraining steps "
            "whole batches; use --config.optimizer.grad_accum_steps=1 and set batch_size instead"
        )
    return problems


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------ the run
def pretrain(config, workdir: str, *, export_dir: str | None = None) -> dict:
    """Pretrains (or resumes) the run in ``workdir``, then exports it.

    Holds ``WORKDIR/.lock`` throughout (process 0). With a checkpoint in ``workdir`` the run resumes when
    ``config`` continues it (the ``flax_textvae.workdir`` rules: ``train_steps`` may grow, the cadences and
    ``data.eval`` may change, nothing else); without one it starts afresh.

    Args:
      config: a :func:`pretrain_config`-based ConfigDict.
      workdir: the run directory.
      export_dir: where the Hugging Face folder goes (default ``WORKDIR/export``); it must be absent, empty
        or an earlier export of a pretraining run, which is replaced.

    Returns:
      ``{'step', 'eval' (the final held-out metrics), 'export' (the folder)}``, or ``{'preempted': True,
      'step': N}`` after SIGTERM or Ctrl-C.

    Raises:
      flax_textvae.validation.ConfigError: a bad config (before anything is written), or a resume that
        would change the run.
      FileExistsError: ``export_dir`` holds something else (checked before training).
      flax_textvae.trainer.NonFiniteLossError: the loss became NaN / inf.
    """
    resuming = bool(rundir.checkpoint_steps(workdir)) if os.path.isdir(workdir) else False
    problems = config_problems(config, check_model_path=not resuming)
    if problems:
        raise validation.ConfigError(problems)
    export_dir = export_dir or os.path.join(workdir, EXPORT_FOLDER)
    _check_export_dir(export_dir, workdir)
    compile_cache.enable(config.get("compile_cache_dir", "auto"))
    parallel.initialize_distributed(config.parallel)
    validation.check_devices(config)  # starts the backend: after the distributed initialisation
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    with rundir.WorkdirLock(workdir) if main else contextlib.nullcontext():
        return _pretrain_locked(config, workdir, export_dir, main)


def _check_export_dir(export_dir: str, workdir: str) -> None:
    if os.path.realpath(export_dir) == os.path.realpath(workdir):
        raise FileExistsError(f"--export={export_dir} is the run's workdir; choose another folder")
    if os.path.exists(export_dir) and not (
        os.path.isdir(export_dir)
        and (not os.listdir(export_dir) or os.path.isfile(os.path.join(export_dir, INFO_NAME)))
    ):
        raise FileExistsError(
            f"--export={export_dir} exists and is not an earlier pretraining export; choose a new "
            "or empty folder (an earlier export there is replaced)"
        )


def _denoising_config(config, run) -> DenoisingConfig:
    hf_config = run.model.backbone.config
    problems = []
    if getattr(hf_config, "model_type", None) != "bart":
        problems.append(
            f"model.name_or_path={config.model.name_or_path!r}: a {hf_config.model_type!r} model; text "
            "infilling pretrains BART models"
        )
    mask_id = getattr(run.tokenizer, "mask_token_id", None)
    if mask_id is None:
        problems.append(
            f"model.name_or_path={config.model.name_or_path!r}: the tokenizer has no mask token, which "
            "text infilling needs"
        )
    if problems:
        raise validation.ConfigError(problems)
    return DenoisingConfig(
        rate=float(config.pretrain.mask_rate),
        poisson_lambda=float(config.pretrain.poisson_lambda),
        special_ids=tuple(run.special_ids),
        mask_id=int(mask_id),
        pad_id=int(run.pad_id),
    )


def _pretrain_locked(config, workdir: str, export_dir: str, main: bool) -> dict:
    steps = rundir.checkpoint_steps(workdir)
    note_start_step(max(steps, default=0))  # multi-host: a SIGTERM while loading then stops at a reachable step
    resuming = bool(steps)
    changes = rundir.resume_changes(config, workdir) if resuming else []  # refuses before any write
    if main and not resuming:
        rundir.discard_unfinished(workdir)
        rundir.record_start(config, workdir)
    total = int(config.train_steps)
    progress = Progress(total)
    for line in hardware.device_lines():
        progress.say(line)
    with progress.working("loading the tokenizer and the data"):
        run = builders.build_run(config, workdir)
    module = run.model.backbone
    cfg = _denoising_config(config, run)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    log = MetricsLog(workdir)
    meta = _resume_position(config, workdir, run, ckpt, log, progress, changes, main)
    placement, step_fn, state = _start_state(config, run, cfg, ckpt, meta)
    with Preemption() as preempt:
        ctx = PhaseContext(ckpt=ckpt, log=log, progress=progress, preempt=preempt)
        loop = _PretrainLoop(
            step_fn=step_fn,
            placement=placement,
            train_iter=run.train_iter,
            config=config,
            ctx=ctx,
            step=int(meta["step"]) if meta is not None else 0,
            end=total,
            evaluator=make_evaluator(module, cfg, config.seed),
            eval_batches=run.eval_subset(config.data.eval_max_examples),
        )
        if loop.step == 0 and not log.has_row(0, "eval"):
            loop.score(state)  # the untrained model: where the curve starts
        state, stopped = loop.run(state)
    if stopped:
        ckpt.close()
        return {"preempted": True, "step": loop.step}
    params = placement.host(state).params
    final = loop.final_eval
    if final is None:  # a rerun of a finished run
        final = loop.score(state, write=not log.has_row(total, "eval"))
    ckpt.close()
    if main:
        export_pretrained(workdir, export_dir, params, module.config, step=loop.step, eval_metrics=final, config=config)
    return {"step": loop.step, "eval": final, "export": export_dir}


def _resume_position(
    config,
    workdir: str,
    run: builders.Run,
    ckpt: checkpoints.Checkpointer,
    log: MetricsLog,
    progress: Progress,
    changes: list,
    main: bool,
) -> dict | None:
    """The newest checkpoint's meta (None without one); sets the data position, says so and cuts the log."""
    meta = ckpt.read_meta()
    if meta is not None:
        run.train_iter.set_state(meta["data"])
        progress.say(
            f"{workdir} finished at step {meta['step']}: evaluating its final checkpoint"
            if meta["step"] >= int(config.train_steps)
            else f"Resuming from step {meta['step']} in {workdir}"
        )
        if main:
            rundir.record_changes(config, workdir, meta["step"], changes)
    log.truncate_after(meta["step"] if meta is not None else -1)
    return meta


def _start_state(
    config, run: builders.Run, cfg: DenoisingConfig, ckpt: checkpoints.Checkpointer, meta: dict | None
) -> tuple[Any, Callable, TrainState]:
    """``(placement, compiled step, placed state)``: a fresh state, or the checkpoint's when ``meta``."""
    module = run.model.backbone
    key = jax.random.key(config.seed)
    params = run.backbone_params if run.backbone_params is not None else models.init_params(module, key)
    tx, lr_fn = make_optimizer(config.optimizer, int(config.train_steps), params)
    fresh = lambda: TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jnp.array(jax.random.key_data(jax.random.fold_in(key, 1)), copy=True),
    )
    placement = parallel.make_placement(config.parallel, config.batch_size, jax.eval_shape(fresh))
    step_fn = placement.compile(functools.partial(pretrain_step, module=module, tx=tx, cfg=cfg, lr_fn=lr_fn))
    state = fresh()
    if meta is not None:
        state, _ = ckpt.restore(placement.abstract(state))
    return placement, step_fn, placement.place(state)


class _PretrainLoop(TrainLoop):
    """The shared loop with the denoising objective's evaluation and console row."""

    label = "pretraining step"

    def __init__(self, *, evaluator, eval_batches, **kwargs):
        super().__init__(**kwargs)
        self.evaluator, self.eval_batches = evaluator, eval_batches
        self.final_eval = None

    def evaluate(self, state) -> None:
        result = self.score(state)
        if self.step == self.end:
            self.final_eval = result

    def score(self, state, *, write: bool = True) -> dict:
        """The held-out denoising metrics of ``state``, logged (``write``) and printed."""
        start, progress = time.time(), self.ctx.progress
        with progress.working(f"evaluating at step {self.step}"):
            result = self.evaluator(self.placement.host(state).params, self.eval_batches)
        if write:
            self.ctx.log.write({"step": self.step, "split": "eval", **result})
        progress.say(
            f"  eval @ {self.step}: denoising loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  "
            f"acc {result['accuracy']:.3f}  ({result['num_examples']} examples, "
            f"{time.time() - start:.1f} s)"
        )
        return result

    def say_row(self, row: dict) -> None:
        self.ctx.progress.say(
            f"[pretrain] step {self.step}/{self.end}  loss {row['loss']:.3f}  acc "
            f"{row['accuracy']:.3f}  input {row['input_ratio']:.2f}  lr "
            f"{row['learning_rate']:.2e}  |  {row['steps_per_s']:.2f} steps/s  "
            f"{row['tokens_per_s']:.0f} tok/s  ETA {self.ctx.progress.eta(self.step, row)}"
        )

    def meta(self) -> dict:
        return {**super().meta(), "objective": "text_infilling"}


# ------------------------------------------------------------------------------------------ command line
def _define_flags(argv: list[str]) -> None:
    if "export" in flags.FLAGS:
        return
    # No default value (see cli.with_config): `main` puts the default file on the command line.
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Path to a pretraining config file with get_config() (default: configs/pretrain_bart_small.py).",
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs (default: runs/<config file name>).")
    flags.DEFINE_string(
        "export", None, "Folder for the pretrained model in Hugging Face format (default: WORKDIR/export)."
    )
    flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
    flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)


def _main(argv) -> int:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    config_file = config_flags.get_config_filename(FLAGS["config"])
    workdir = FLAGS.workdir or cli.default_workdir(config_file)
    if FLAGS.print_config:
        print(f"# --config={config_file}  (workdir: {workdir})\n{configuration.describe(config)}")
        problems = config_problems(config)
        if problems:
            raise validation.ConfigError(problems)
        return 0
    if not FLAGS.workdir:
        print(f"workdir: {workdir} (pass --workdir=DIR to choose another)", flush=True)
    try:
        result = pretrain(config, workdir, export_dir=FLAGS.export)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    if not result.get("preempted"):
        ev = result["eval"]
        print(
            f"\nPretrained to step {result['step']}: held-out denoising loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f}, "
            f"accuracy {ev['accuracy']:.3f}); the model is in {result['export']}",
            flush=True,
        )
    return 0


def main(argv=None) -> None:
    """``python -m flax_textvae.pretrain``: flags ``--config`` (+ ``--config.FIELD=VALUE``), ``--workdir``,
    ``--export``, ``--print_config``, ``--verbose``; user errors exit 2 with one ``error:`` paragraph."""
    argv = cli.with_config(sys.argv if argv is None else argv, DEFAULT_CONFIG)
    _define_flags(argv)
    cli.run(_main, argv)


if __name__ == "__main__":
    main()
