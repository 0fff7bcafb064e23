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
newest checkpoint: parameters, optimizer, step, rng and data position), ``MetricsLog`` / ``Preemption``
(SIGTERM saves the current step and exits) and ``step.make_optimizer``, placed by
``parallel.make_placement``.

At the end the model is written as a Hugging Face folder (``WORKDIR/export`` unless ``--export=DIR``):
``config.json``, ``model.safetensors``, the tokenizer files, ``pretrain.json`` (step, held-out loss,
config) and a ``README.md`` card. ``transformers.BartForConditionalGeneration.from_pretrained`` loads it,
and ``--config.model.name_or_path=DIR`` finetunes it into a VAE (e.g. with ``configs/bart_vae.py``).
Rerunning a finished run re-evaluates it and writes the export again (to a new ``--export`` if given).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from flax_textvae import (
    builders,
    checkpoints,
    cli,
    compile_cache,
    configuration,
    denoise,
    losses,
    models,
    parallel,
    validation,
)
from flax_textvae import export as export_lib
from flax_textvae import workdir as rundir
from flax_textvae.step import TrainState, apply_if_finite, make_optimizer, per_example_keys
from flax_textvae.trainer import MetricsLog, NonFiniteLossError, PhaseContext, Preemption, Progress, TrainLoop

__all__ = [
    "pretrain_config",
    "config_problems",
    "DenoisingConfig",
    "pretrain_step",
    "make_evaluator",
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
_EVAL_STREAM = 7  # folded into the seed for the eval corruption, apart from the training streams


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


# ------------------------------------------------------------------------------------------ the step
@dataclasses.dataclass(frozen=True)
class DenoisingConfig:
    """Static (hashable) settings of the corruption.

    Attributes:
      rate: fraction of maskable tokens masked.
      poisson_lambda: mean span length.
      special_ids: ids never masked (BOS, EOS, PAD, mask, decoder start).
      mask_id: the ``<mask>`` id.
      pad_id: the padding id.
    """

    rate: float
    poisson_lambda: float
    special_ids: tuple
    mask_id: int
    pad_id: int

    def corrupt(self, keys: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Text infilling of each row ``b`` of ``ids`` / ``mask`` [B, S] with its own key ``keys[b]``."""
        return jax.vmap(
            lambda k, i, m: denoise.infill_example(
                k, i, m, self.rate, self.poisson_lambda, self.special_ids, self.mask_id, self.pad_id
            )
        )(keys, ids, mask)


def _denoising_sums(params, batch: dict, enc_ids, enc_mask, *, module, deterministic: bool, dropout_rng=None):
    """(summed target NLL, target tokens, correctly predicted target tokens) of one batch."""
    rngs = None if deterministic else {"dropout": dropout_rng}
    logits = module.apply(
        {"params": params}, enc_ids, enc_mask, batch["decoder_input_ids"], deterministic=deterministic, rngs=rngs
    )
    weights = batch["label_weights"]
    nll = jnp.sum(losses.token_nll(logits, batch["labels"], weights))
    correct = jnp.sum(jnp.where(jnp.argmax(logits, axis=-1) == batch["labels"], weights, 0.0))
    return nll, jnp.sum(weights), correct


def pretrain_step(
    state: TrainState,
    batch: dict,
    *,
    module,
    tx: optax.GradientTransformation,
    cfg: DenoisingConfig,
    lr_fn: Callable,
    axis_name: str | None = None,
):
    """One optimizer step of the denoising objective (pure; jit over a mesh, or pmap with ``axis_name``).

    Each example is corrupted with a key folded from the step's key and its global row, so the corruption
    does not depend on the device count. The loss is the mean cross-entropy per target token of the batch
    (under pmap: the mean of the per-device means). A non-finite loss or gradient leaves the state unchanged
    and sets ``metrics['nonfinite']``.

    Args:
      state: the current ``step.TrainState`` (its ``params`` are the backbone's).
      batch: a training batch of ``flax_textvae.data`` (``input_ids``, ``attention_mask``, ``labels``,
        ``label_weights``, ``decoder_input_ids``).
      module, tx, cfg, lr_fn: static: the seq2seq module, the optimizer, the corruption and the schedule.
      axis_name: the pmap axis (None under jit).

    Returns:
      ``(new_state, metrics)`` with scalar ``loss``, ``accuracy``, ``num_tokens``, ``input_ratio`` (corrupted
      over original encoder length), ``grad_norm``, ``param_norm``, ``learning_rate`` and ``nonfinite``.
    """
    b = batch["labels"].shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    rows = offset + jnp.arange(b)
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    noise_rng, dropout_rng = jax.random.split(step_rng)
    if axis_name is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    enc_ids, enc_mask = cfg.corrupt(per_example_keys(noise_rng, rows), batch["input_ids"], batch["attention_mask"])

    def loss_fn(params):
        nll, tokens, correct = _denoising_sums(
            params, batch, enc_ids, enc_mask, module=module, deterministic=False, dropout_rng=dropout_rng
        )
        return nll / jnp.maximum(tokens, 1.0), (tokens, correct)

    (loss, (tokens, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ratio = jnp.sum(enc_mask) / jnp.maximum(jnp.sum(batch["attention_mask"]), 1)
    if axis_name is not None:
        grads, loss, ratio = jax.lax.pmean((grads, loss, ratio), axis_name)
        tokens, correct = jax.lax.psum((tokens, correct), axis_name)
    new_state, grad_norm, ok = apply_if_finite(state, grads, loss, tx)
    metrics = {
        "loss": loss,
        "accuracy": correct / jnp.maximum(tokens, 1.0),
        "num_tokens": tokens,
        "input_ratio": ratio.astype(jnp.float32),
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(state.params),
        "learning_rate": jnp.asarray(lr_fn(state.step), jnp.float32),
        "nonfinite": (~ok).astype(jnp.int32),
    }
    return new_state, metrics


def make_evaluator(module, cfg: DenoisingConfig, seed: int) -> Callable[[Any, Callable[[], Iterator[dict]]], dict]:
    """``evaluate(params, batches_fn) -> metrics``: the held-out denoising loss over a split.

    Example ``i`` of the split (its ``index`` in the eval batches) is corrupted with a key from ``seed`` and
    ``i`` only, so every evaluation of a run scores the same corrupted inputs, whatever the batch layout.

    Returns:
      A function giving ``{'loss': nats per target token, 'ppl': exp(loss), 'accuracy': teacher-forced
      next-token accuracy, 'num_examples', 'num_tokens'}``.
    """
    base = jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM)

    @jax.jit
    def sums(params, batch):
        keys = per_example_keys(base, jnp.maximum(batch["index"], 0))
        enc_ids, enc_mask = cfg.corrupt(keys, batch["input_ids"], batch["attention_mask"])
        nll, tokens, correct = _denoising_sums(params, batch, enc_ids, enc_mask, module=module, deterministic=True)
        return jnp.stack([nll, tokens, correct, jnp.sum(batch["example_weight"])])

    def evaluate(params, batches_fn) -> dict:
        total = np.zeros(4, np.float64)
        for batch in batches_fn():
            batch = {
                k: v
                for k, v in batch.items()
                if k
                in (
                    "input_ids",
                    "attention_mask",
                    "labels",
                    "label_weights",
                    "decoder_input_ids",
                    "example_weight",
                    "index",
                )
            }
            total += np.asarray(jax.device_get(sums(params, batch)), np.float64)
        nll, tokens, correct, examples = total
        loss = float(nll / max(tokens, 1.0))
        return {
            "loss": loss,
            "ppl": float(math.exp(min(loss, 700.0))),
            "accuracy": float(correct / max(tokens, 1.0)),
            "num_examples": int(round(examples)),
            "num_tokens": int(round(tokens)),
        }

    return evaluate


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
      'step': N}`` after SIGTERM.

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
    resuming = bool(rundir.checkpoint_steps(workdir))
    changes = rundir.resume_changes(config, workdir) if resuming else []  # refuses before any write
    if main and not resuming:
        rundir.discard_unfinished(workdir)
        rundir.record_start(config, workdir)
    total = int(config.train_steps)
    progress = Progress(total)
    with progress.working("loading the tokenizer and the data"):
        run = builders.build_run(config, workdir)
    module = run.model.backbone
    cfg = _denoising_config(config, run)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    log = MetricsLog(workdir)
    meta = ckpt.read_meta()
    if meta is not None:
        run.train_iter.set_state(meta["data"])
        progress.say(
            f"{workdir} finished at step {meta['step']}: evaluating its final checkpoint"
            if meta["step"] >= total
            else f"Resuming from step {meta['step']} in {workdir}"
        )
        if main:
            rundir.record_changes(config, workdir, meta["step"], changes)
    log.truncate_after(meta["step"] if meta is not None else -1)

    key = jax.random.key(config.seed)
    params = run.backbone_params if run.backbone_params is not None else models.init_params(module, key)
    tx, lr_fn = make_optimizer(config.optimizer, total, params)
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
    state = placement.place(state)
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
