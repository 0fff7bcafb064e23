"""Held-out metrics over a whole split (docs/metrics.md) and ``evaluate(config, workdir, ...)`` for run_eval.py.

Per example x (``T(x)`` = real target tokens, EOS counted, padding and BOS not):

* ``rec``: -log p(x|z), one z ~ q(z|x); ``kl``: closed-form KL(q(z|x) || N(0, I)).
* ``nll``: importance-weighted -log p(x) with K samples from q, drawn ``chunk`` at a time and combined with
  an exact running log-sum-exp (the encoder runs once per example).
* ``mi`` and ``au`` over the whole split, from every example's posterior (not per batch).
* ``bleu``: corpus BLEU of greedy reconstructions from z = mean.

Every random draw is keyed by the example's index in the split, so results do not depend on the batch size,
on the bucket an example lands in, or on the number of devices; the same seed gives the same numbers.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from flax_textvae import builders, checkpoints, compile_cache, exported, inference, losses, metrics, parallel, step
from flax_textvae.vae import TextVAE

_LOGITS_BUDGET = 2**28  # floats of logits one IW chunk may hold (1 GiB in float32)

# What ``evaluate`` returns and writes to WORKDIR/eval/NAME.json: the metrics, then how the split was cut
# (``max_length``: data.max_length in tokens, special tokens included; ``num_truncated``: examples longer
# than that, cut to it before scoring).
DATA_KEYS = ("max_length", "num_truncated")
RESULT_KEYS = metrics.SUMMARY_KEYS + DATA_KEYS


_COMPILED: dict = {}


class ResultsNotWritten(OSError):
    """``evaluate`` computed the metrics but could not write them to its output folder."""


def _compiled(model: TextVAE, vocab_chunk_size: int = 0):
    """Jitted per-batch functions for ``model`` (built once per model and chunk size; compiled once per bucket
    shape)."""
    hit = _COMPILED.get((id(model), vocab_chunk_size))
    if hit is not None and hit[0] is model:
        return hit[1]
    fns = _build(model, vocab_chunk_size)
    _COMPILED[(id(model), vocab_chunk_size)] = (model, fns)
    return fns


def _build(model: TextVAE, vocab_chunk_size: int):
    def posterior(params, batch):
        return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], method=TextVAE.encode)

    def log_px(params, z, batch, reps):
        rep = lambda x: jnp.repeat(x, reps, axis=0)
        ids, labels, weights = rep(batch["decoder_input_ids"]), rep(batch["labels"]), rep(batch["label_weights"])
        if vocab_chunk_size:  # the LM head by vocabulary chunks: never the [B * reps, T, V] logits
            hidden = model.apply({"params": params}, z, ids, method=TextVAE.decode, hidden=True)
            return -step.chunked_nll_fn(params, hidden, labels, model, vocab_chunk_size)(weights)
        logits = model.apply({"params": params}, z, ids, method=TextVAE.decode)
        return -losses.token_nll(logits, labels, weights)

    @jax.jit
    def stats(params, batch, key):
        mean, logvar = posterior(params, batch)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
        eps = jax.vmap(lambda k: jax.random.normal(k, (mean.shape[-1],)))(keys)
        z = mean + jnp.exp(0.5 * logvar) * eps
        rec = -log_px(params, z, batch, 1)
        kl = losses.gaussian_kl(mean, logvar).sum(-1)
        return {"rec": rec, "kl": kl, "mean": mean, "logvar": logvar, "z": z, "tokens": batch["label_weights"].sum(-1)}

    @functools.partial(jax.jit, static_argnums=(6,))
    def iw_chunk(params, batch, mean, logvar, key, start, k):
        b, d = mean.shape

        def draws(i):  # samples start .. start + k - 1 of example i: keyed by (example, sample) index only
            ki = jax.random.fold_in(key, i)
            return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(ki, j), (d,)))(start + jnp.arange(k))

        eps = jax.vmap(draws)(batch["index"])  # [B, k, D], the same whatever the chunk size
        z = mean[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps  # [B, k, D]
        lp = log_px(params, z.reshape(b * k, d), batch, k).reshape(b, k)
        return lp, z

    return stats, iw_chunk


class _Progress:
    """Examples done and rate: a self-updating line on a terminal, else a line every 30 s (process 0)."""

    def __init__(self, name: str):
        self.name, self.t0, self.last = name, time.time(), time.time()
        self.on = jax.process_index() == 0
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.time()
        if not self.on or (not self.tty and now - self.last < 30):
            return
        self.last = now
        msg = f"  eval {self.name}: {done} examples  ({done / max(now - self.t0, 1e-9):.1f} ex/s)"
        print("\r" + msg if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self, done: int) -> None:
        if self.on and (self.tty or time.time() - self.t0 >= 30):
            print(
                ("\r" if self.tty else "") + f"  eval {self.name}: {done} examples in {time.time() - self.t0:.1f} s",
                file=sys.stderr,
                flush=True,
            )


def evaluate_split(
    run,
    params,
    batches_fn,
    *,
    iw_samples: int = 0,
    seed: int = 0,
    with_bleu: bool = False,
    iw_chunk: int = 0,
    name: str = "eval",
    mi_au: bool = True,
    mesh=None,
    vocab_chunk_size: int | None = None,
) -> dict:
    """The docs/metrics.md metrics of ``params`` over every example ``batches_fn()`` yields.

    Args:
      run: a ``builders.Run`` (model, tokenizer, decoding ids).
      params: VAE parameters.
      batches_fn: callable returning an iterator of eval batches (dicts of numpy arrays with ``index`` and
        ``example_weight``; filler rows have weight 0 and are ignored).
      iw_samples: K for the importance-weighted ``nll`` (0 skips it: ``nll``/``ppl`` are None).
      seed: seeds every draw (per example, by index).
      with_bleu: also decode greedy reconstructions from z = mean and score corpus BLEU.
      iw_chunk: samples per decoder pass (0: as many as fit a 1 GiB logits budget, at most 100).
      name: label for the progress line.
      mi_au: compute ``mi`` and ``au`` (needs every posterior; cheap).
      mesh: a ``parallel.make_mesh`` mesh: batches split over its devices (batch size divisible by its size),
        parameters replicated. None: the default device.
      vocab_chunk_size: > 0: -log p(x|z) through the LM head by this many vocabulary entries at a time (equal
        to full logits within float tolerance); None: the run's ``loss.vocab_chunk_size``.

    Returns:
      dict with exactly the keys of ``metrics.SUMMARY_KEYS``.
    """
    stats_fn, iw_fn, width = _eval_fns(run, vocab_chunk_size)
    params, place = _placement(params, mesh)
    k_rec, k_iw = jax.random.split(jax.random.key(seed))
    cols = {k: [] for k in ("index", "rec", "kl", "mean", "logvar", "z", "tokens", "nll")}
    hyps, refs = [], []
    progress, done = _Progress(name), 0
    for batch in batches_fn():
        keep = np.asarray(batch["example_weight"]) > 0
        dev = place(batch)
        out = jax.device_get(stats_fn(params, dev, k_rec))
        if iw_samples > 0:
            nll = _iw_nll(iw_fn, params, dev, out, k_iw, iw_samples, iw_chunk, width)
            cols["nll"].append(nll[keep])
        for k_ in ("rec", "kl", "mean", "logvar", "z", "tokens"):
            cols[k_].append(np.asarray(out[k_])[keep])
        cols["index"].append(np.asarray(batch["index"])[keep])
        if with_bleu:
            # all B rows (one compile) up to max_length, not the bucket length, which depends on the batch size
            hyps += run.detokenize(_greedy(run, params, out["mean"])[keep])
            refs += run.detokenize(np.asarray(batch["labels"])[keep])
        done += int(keep.sum())
        progress.update(done)
    progress.close(done)
    if done == 0:
        raise ValueError(f"evaluation split {name!r} produced no examples")
    return _summarize(cols, mi_au, sacrebleu.corpus_bleu(hyps, [refs]).score if with_bleu else None, iw_samples)


def _placement(params, mesh):
    """``(params, place)``: parameters replicated over ``mesh`` and a function placing a host batch on it
    (split over its devices); without a mesh, or on several processes (each evaluates the whole split on
    its own default device), the default device."""
    if mesh is None or jax.process_count() > 1:
        return params, lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    return (
        jax.device_put(params, parallel.replicated(mesh)),
        lambda b: jax.device_put(dict(b), parallel.batch_sharding(mesh)),
    )


def _eval_fns(run, vocab_chunk_size: int | None) -> tuple[Callable, Callable, int]:
    """The compiled per-batch functions for ``run`` and the logits per token one IW decoder pass holds."""
    if vocab_chunk_size is None:  # the run's setting; a Run built without a config scores full logits
        vocab_chunk_size = run.config.loss.get("vocab_chunk_size", 0) if run.config is not None else 0
    chunk = int(vocab_chunk_size)
    width = min(chunk, run.vocab_size) if chunk else run.vocab_size
    return (*_compiled(run.model, chunk), width)


def _iw_nll(iw_fn, params, dev: dict, out: dict, key, iw_samples: int, iw_chunk: int, width: int):
    """``[B]`` importance-weighted -log p(x) of one batch from ``iw_samples`` posterior draws, ``iw_chunk``
    per decoder pass (0: as many as fit the logits budget, at most 100, for ``width`` logits per token: the
    vocabulary, or the vocabulary chunk), combined by a running log-sum-exp."""
    b, t = dev["labels"].shape
    k = iw_chunk or int(max(1, min(100, _LOGITS_BUDGET // (b * t * width))))
    state = metrics.iw_init(b)
    mean, logvar = jnp.asarray(out["mean"]), jnp.asarray(out["logvar"])
    for start in range(0, iw_samples, k):
        lp, z = iw_fn(params, dev, mean, logvar, key, start, min(k, iw_samples - start))
        state = metrics.iw_update(state, lp, z, mean, logvar)
    return -np.asarray(metrics.iw_result(state))


def _summarize(cols: dict, mi_au: bool, bleu, iw_samples: int) -> dict:
    """The summary metrics of the per-example columns, in split order (by example index)."""
    cat = {k: np.concatenate(v) for k, v in cols.items() if v}
    order = np.argsort(cat["index"], kind="stable")
    cat = {k: v[order] for k, v in cat.items()}
    mi = metrics.mutual_information(cat["mean"], cat["logvar"], cat["z"]) if mi_au else None
    au = metrics.active_units(cat["mean"]) if mi_au else None
    return metrics.summarize(
        cat["rec"],
        cat["kl"],
        cat.get("nll"),
        cat["tokens"],
        mi=mi,
        au=au,
        bleu=None if bleu is None else float(bleu),
        iw_samples=iw_samples,
    )


def _greedy(run, params, z) -> np.ndarray:
    """Greedy token ids ``[N, run.max_length]`` decoded from latent codes ``z [N, Dz]``."""
    return inference.decode_from_z(
        run.model,
        params,
        z,
        prompt=run.prompt,
        eos_id=run.eos_id,
        pad_id=run.pad_id,
        max_length=run.max_length,
        method="greedy",
    )


def reconstruct_examples(run, params, n: int = 5) -> list[tuple[str, str]]:
    """(input text, greedy reconstruction from z = mean) for the first ``n`` eval examples."""
    texts = list(run.eval_texts[:n])
    mean, _ = run.encode_texts(params, texts)
    outs = run.detokenize(_greedy(run, params, mean))
    return list(zip(texts, outs))


def evaluate(
    config,
    workdir: str,
    *,
    data: str | None = None,
    name: str | None = None,
    iw_samples: int = 500,
    seed: int | None = None,
    batch_size: int | None = None,
    step: int | None = None,
    output_dir: str | None = None,
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Evaluates a run's checkpoint on a split and writes ``OUTPUT_DIR/NAME.json`` and ``NAME.meta.json``.

    Args:
      config: the run's config (``WORKDIR/config.json`` as a ConfigDict).
      workdir: the run's directory, or an exported folder (``flax_textvae.export``).
      data: split spec (default ``config.data.eval``): a text file, ``tfds:NAME[/CONFIG][:SPLIT]``, or
        ``synthetic:N[:SEED]``.
      name: output name (default: the file's stem, or the TFDS split).
      iw_samples: K for the importance-weighted NLL (default 500).
      seed: default ``config.seed``.
      batch_size: eval batch size (default ``config.batch_size``); results do not depend on it.
      step: checkpoint step (default: the newest intact one).
      output_dir: where the JSON files go (default ``WORKDIR/eval``).
      report: called with the result before anything is written (run_eval.py prints its table).

    Returns:
      The metrics (``metrics.SUMMARY_KEYS``) plus ``max_length`` and ``num_truncated``: the keys
      ``RESULT_KEYS``, also written as JSON.

    Raises:
      ResultsNotWritten: the output folder cannot be created or written (after ``report`` has run).
    """
    compile_cache.enable(config.get("compile_cache_dir", "auto"))  # configs saved before the field existed
    spec = data or config.data.eval
    name = name or builders.split_name(spec)
    run = builders.build_run(config, workdir, train=False, eval_spec=spec, eval_batch_size=batch_size)
    load_params = exported.load_params if exported.is_exported(workdir) else checkpoints.load_params
    params, used_step = load_params(workdir, step)
    mesh = _eval_mesh(batch_size or config.batch_size)
    seed = config.seed if seed is None else seed
    result = evaluate_split(
        run, params, run.eval_batches, iw_samples=iw_samples, seed=seed, with_bleu=True, name=name, mesh=mesh
    )
    result = dict(result, max_length=int(run.max_length), num_truncated=int(run.eval_stats.get("truncated", 0)))
    if report is not None:
        report(result)
    if jax.process_index() == 0:
        meta = {"step": used_step, "data": spec, "tokenizer": run.tokenizer_name}
        _write_results(output_dir or os.path.join(workdir, "eval"), name, result, meta)
    return result


def _eval_mesh(batch_size: int) -> jax.sharding.Mesh | None:
    """A data-parallel mesh over every device when there are several and they divide ``batch_size``, else None."""
    if jax.device_count() > 1 and batch_size % jax.device_count() == 0:
        return parallel.make_mesh(1)
    return None


def _write_results(out_dir: str, name: str, result: dict, meta: dict) -> None:
    """Writes ``result`` to ``OUT_DIR/NAME.json`` and ``meta`` to ``OUT_DIR/NAME.meta.json``, creating ``out_dir``.

    Raises:
      ResultsNotWritten: the folder cannot be created or a file cannot be written.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
        checkpoints.save_json(os.path.join(out_dir, f"{name}.json"), result)
        checkpoints.save_json(os.path.join(out_dir, f"{name}.meta.json"), meta)
    except OSError as e:
        raise ResultsNotWritten(
            f"cannot write the evaluation results to {out_dir}: {e.strerror or e} ({e.filename or out_dir})"
        ) from e


def format_table(result: dict) -> str:
    """A fixed-width two-column table of a metrics dict."""
    lines = [f"{'metric':>14s}  value", f"{'-' * 14}  {'-' * 12}"]
    for k in metrics.SUMMARY_KEYS + tuple(k for k in DATA_KEYS if k in result):
        v = result.get(k)
        lines.append(f"{k:>14s}  {v:.4f}" if isinstance(v, float) else f"{k:>14s}  {v}")
    return "\n".join(lines)


def per_dim_stats(run, params, batches_fn) -> tuple[np.ndarray, np.ndarray]:
    """``(kl, mean_variance)``, each ``[Dz]``, over the split: the mean KL(q(z_d|x) || N(0, 1)) per latent
    dimension, and the variance across examples of the posterior mean that ``au`` thresholds
    (``metrics.posterior_mean_variance``), in one pass."""
    stats_fn, _ = _compiled(run.model)
    total, count, means = None, 0, []
    for batch in batches_fn():
        keep = np.asarray(batch["example_weight"]) > 0
        out = jax.device_get(stats_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0)))
        kl = np.asarray(losses.gaussian_kl(out["mean"], out["logvar"]), np.float64)[keep]
        total = kl.sum(0) if total is None else total + kl.sum(0)
        count += int(keep.sum())
        means.append(np.asarray(out["mean"])[keep])
    return total / max(count, 1), metrics.posterior_mean_variance(np.concatenate(means))
