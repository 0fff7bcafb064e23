"""Export a trained run as a self-contained folder: ``python -m flax_textvae.export --workdir=RUN --output=DIR``.

The folder (layout in :mod:`flax_textvae.exported`) holds the backbone in Hugging Face PyTorch format
(``config.json``, ``model.safetensors``, the tokenizer files), so ``transformers.AutoModelForSeq2SeqLM`` and
``flax_textvae.models.load_pretrained`` read it as a plain seq2seq model; the VAE's own parameters in
``vae.safetensors``; the run's config and the exported step in ``vae_config.json``; and a ``README.md`` model
card with the run's held-out metrics, how it was trained and how to load it. ``flax_textvae.load(DIR)`` and
``run_eval.py --workdir=DIR`` take the folder in place of the workdir.

Flax -> PyTorch names come from the family's explicit table read backwards (``export_table`` in
``flax_textvae.models.families``): every tensor of the backbone is written under exactly one table name, plus
the duplicate names transformers expects for an embedding it does not tie; tied embeddings are written once,
as transformers saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file
from transformers import AutoConfig

from flax_textvae import checkpoints, cli, exported
from flax_textvae import workdir as rundir
from flax_textvae.metrics import SUMMARY_KEYS
from flax_textvae.models import families

__all__ = ["export", "export_backbone", "export_pretrained", "torch_state_dict", "eval_results", "model_card", "main"]

MODEL_FOLDER = "model"  # WORKDIR/model: the backbone's config.json and tokenizer, saved by training
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# A pretrained backbone's record: {"format", "step", "eval", "config"}; marks a folder a rerun may replace.
PRETRAIN_INFO_NAME = "pretrain.json"
PRETRAIN_FORMAT = "flax_textvae.pretrain/1"


# ------------------------------------------------------------------------------------ Flax -> PyTorch
def torch_state_dict(backbone: Any, hf_config) -> dict[str, np.ndarray]:
    """The backbone's parameters as a PyTorch state dict of the matching transformers model.

    Args:
      backbone: the HF Flax layout params tree of the complete seq2seq model (the ``backbone`` subtree of a
        run's params).
      hf_config: its transformers config (``model_type`` 'bart' or 't5').

    Returns:
      torch name -> contiguous float32 numpy array in PyTorch's shape (Flax kernels ``[in, out]`` transposed
      to Linear weights ``[out, in]``).

    Raises:
      ValueError: the tree and the table disagree: a tensor the table needs is missing, has the wrong shape,
        is named by two rows, or a tensor of the tree is named by none.
    """
    rows, aliases = families.get(getattr(hf_config, "model_type", None)).export_table(hf_config)
    flat = flatten_dict(backbone)
    out, used, problems = {}, {}, []
    for tname, fpath, transpose, shape in rows:
        if fpath in used:
            problems.append(f"{'/'.join(fpath)}: named twice ({used[fpath]}, {tname})")
            continue
        if fpath not in flat:
            problems.append(f"{'/'.join(fpath)}: missing (needed for {tname})")
            continue
        used[fpath] = tname
        arr = np.asarray(flat[fpath], np.float32)
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != tuple(shape):
            problems.append(f"{tname}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
            continue
        out[tname] = np.ascontiguousarray(arr)
    problems += [f"{'/'.join(k)}: in the tree but not in the name table" for k in sorted(set(flat) - set(used))]
    if problems:
        raise ValueError("the backbone does not match its PyTorch name table:\n  " + "\n  ".join(problems))
    for alias, source in aliases:
        out[alias] = out[source]
    return out


# ---------------------------------------------------------------------------------------- model card
def eval_results(workdir: str) -> list[dict]:
    """The run's held-out metrics for the model card.

    Args:
      workdir: the run's directory.

    Returns:
      One dict per ``WORKDIR/eval/NAME.json`` (written by ``run_eval.py``), sorted by name, each with ``name``,
      ``data`` and ``step`` (from ``NAME.meta.json`` where present) and ``metrics``; where there is none, the
      final training evaluation (the last ``split == 'eval'`` row of ``metrics.jsonl``) as one such dict with
      ``name`` 'final training eval' and the config's ``data.eval``; an empty list when neither exists.
    """
    out = []
    eval_dir = os.path.join(workdir, "eval")
    names = (
        sorted(f[:-5] for f in os.listdir(eval_dir) if f.endswith(".json") and not f.endswith(".meta.json"))
        if os.path.isdir(eval_dir)
        else []
    )
    for name in names:
        with open(os.path.join(eval_dir, f"{name}.json")) as f:
            result = json.load(f)
        meta_path = os.path.join(eval_dir, f"{name}.meta.json")
        meta = {}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        out.append({"name": name, "data": meta.get("data"), "step": meta.get("step"), "metrics": result})
    if out:
        return out
    last = None
    log = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # an empty line, or one torn by a crash
                    continue
                if isinstance(row, dict) and row.get("split") == "eval":
                    last = row
    if last is None:
        return []
    data = None
    if os.path.isfile(os.path.join(workdir, "config.json")):
        with open(os.path.join(workdir, "config.json")) as f:
            data = json.load(f).get("data", {}).get("eval")
    return [
        {
            "name": "final training eval",
            "data": data,
            "step": last.get("step"),
            "metrics": {k: v for k, v in last.items() if k not in ("step", "phase", "split")},
        }
    ]


def _fmt(value: Any) -> str:
    """A metric as the card prints it: floats with 4 decimals, ints as they are, missing values as '-'."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return str(value)


def _hub_id(name: str) -> str | None:
    """``name`` when it reads as a hub model id ('org/name'), else None (local folders, 'scratch')."""
    if not name or name == "scratch" or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return None
    return None if os.path.isdir(name) else name


def _loss_line(c: ml_collections.ConfigDict) -> str:
    loss, sched = c.loss, c.loss.kl_schedule
    weight = f"KL weight {sched.kind} schedule (value {sched.value}, steps {sched.steps})"
    if loss.kind == "free_bits":
        return f"free bits (lambda {loss.free_bits} nats per dimension, {loss.free_bits_mode}), {weight}"
    if loss.kind == "constraint":
        return (
            f"KL constraint beta * |KL - C| (beta {loss.beta}, target C {loss.target} nats, ramp "
            f"{loss.target_ramp_steps} steps)"
        )
    return f"ELBO, {weight}"


def model_card(config: dict, step: int, hf_config, results: list[dict], *, name: str) -> str:
    """The exported folder's ``README.md``.

    Args:
      config: the run's config as a dict (``WORKDIR/config.json``).
      step: the exported checkpoint's step.
      hf_config: the backbone's transformers config.
      results: :func:`eval_results` of the run.
      name: the exported folder's name (used in the title and the loading examples).

    Returns:
      Markdown with a metadata header, the metrics table, the training recipe, the files and how to load them.
    """
    c = ml_collections.ConfigDict(config)
    family = getattr(hf_config, "model_type", "?")
    base = c.model.name_or_path
    hub = _hub_id(base)
    header = (
        [
            "---",
            "library_name: flax_textvae",
            "tags:",
            "- text-vae",
            "- variational-autoencoder",
            f"- {family}",
            "- jax",
            "- flax",
        ]
        + ([f"base_model: {hub}"] if hub else [])
        + ["---", ""]
    )
    source = (
        "a from-scratch " + family.upper() + " backbone"
        if base == "scratch"
        else f"the pretrained `{base}` ({family.upper()})"
    )
    lines = header + [
        f"# {name}",
        "",
        f"A text variational autoencoder (a sentence encoder q(z|x) and a decoder p(x|z) with a Gaussian "
        f"latent z of {c.vae.latent_size} dimensions) finetuned from {source} with flax_textvae, exported at "
        f"step {step}.",
        "",
        "## Evaluation",
        "",
    ]
    lines += _card_results(results) + _card_training(c) + _card_usage(name)
    return "\n".join(lines)


def _card_results(results: list[dict]) -> list[str]:
    if not results:
        return ["No evaluation was recorded for this run (`python run_eval.py --workdir=DIR` computes one)."]
    lines = [
        "Held-out metrics in nats (natural log): `rec` = -log p(x|z), `kl` = KL(q(z|x) || N(0, I)), "
        "`neg_elbo` = rec + kl, `nll` = importance-weighted -log p(x) with K = `iw_samples`, `ppl` / "
        "`ppl_elbo` per token of this model's tokenizer (not comparable across tokenizers), `mi` = "
        "I(x;z) over the split, `au` = active units, `bleu` = greedy reconstructions from the "
        "posterior mean.",
        "",
    ]
    keys = [k for k in SUMMARY_KEYS if any(k in r["metrics"] for r in results)]
    lines.append("| split | data | step | " + " | ".join(keys) + " |")
    lines.append("|---" * (3 + len(keys)) + "|")
    for r in results:
        cells = [r["name"], f"`{r['data']}`" if r["data"] else "-", _fmt(r["step"])]
        lines.append("| " + " | ".join(cells + [_fmt(r["metrics"].get(k)) for k in keys]) + " |")
    return lines


def _card_training(c) -> list[str]:
    phase1 = int(c.phase1.steps)
    return [
        "",
        "## Training",
        "",
        f"* Steps: {c.train_steps} in all; "
        + (
            f"phase 1 (steps 1-{phase1}): KL weight 0, decoder frozen, the encoder and posterior heads learn; "
            f"phase 2 (steps {phase1 + 1}-{c.train_steps}): everything trains."
            if phase1
            else "one phase."
        ),
        f"* Loss: {_loss_line(c)}.",
        f"* VAE: latent size {c.vae.latent_size}, {c.vae.pooling} pooling, z injected as `{c.vae.injection}`"
        + (f" (memory style `{c.vae.memory_style}`)" if "memory_style" in c.vae else "")
        + ".",
        f"* Denoising: deletion up to {c.denoise.delete_rate}, masking up to {c.denoise.mask_rate}, decoder word "
        f"dropout {c.denoise.word_dropout}.",
        f"* Optimizer: AdamW, learning rate {c.optimizer.learning_rate} ({c.optimizer.warmup_steps} warm-up "
        f"steps, {c.optimizer.decay} decay), weight decay {c.optimizer.weight_decay}, batch size {c.batch_size}.",
        f"* Data: train `{c.data.train}`, eval `{c.data.eval}`, at most {c.data.max_length} tokens per sentence.",
        f"* Seed {c.seed}; compute dtype {c.model.dtype}. The full config is `config` in `vae_config.json`.",
    ]


def _card_usage(name: str) -> list[str]:
    return [
        "",
        "## Files",
        "",
        "* `config.json`, `model.safetensors`, tokenizer files: the backbone in Hugging Face PyTorch format (the "
        "whole seq2seq model; its decoder was trained to read z, which plain transformers does not feed it).",
        "* `vae.safetensors`: the VAE's own parameters (posterior heads, z -> decoder projections).",
        "* `vae_config.json`: the run's config and the exported step.",
        "",
        "## How to load",
        "",
        "```python",
        "import flax_textvae",
        "",
        f'vae = flax_textvae.load("{name}")',
        'mean, logvar = vae.encode(["the cat sat on the mat"])   # [1, latent_size] each',
        'vae.reconstruct(["the cat sat on the mat"])',
        "vae.sample(3, seed=0)",
        'vae.interpolate("a dog barks", "the old man sleeps", steps=5)',
        "```",
        "",
        "The backbone alone:",
        "",
        "```python",
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        "",
        f'model = AutoModelForSeq2SeqLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        f"Held-out metrics: `python run_eval.py --workdir={name} --data=SPEC` (writes `{name}/eval/NAME.json`).",
        "",
    ]


# -------------------------------------------------------------------------------------------- export
def _check_output(output: str, workdir: str) -> None:
    """Raises ``FileExistsError`` unless ``output`` is absent, empty, or an earlier export (then replaced)."""
    if os.path.realpath(output) == os.path.realpath(workdir):
        raise FileExistsError(f"--output={output} is the run's workdir; choose another folder")
    if os.path.exists(output) and not (
        os.path.isdir(output) and (not os.listdir(output) or exported.is_exported(output))
    ):
        raise FileExistsError(
            f"--output={output} exists and is not an earlier export; choose a new or empty "
            "folder (an earlier export there is replaced)"
        )


def export(workdir: str, output: str, *, step: int | None = None) -> str:
    """Writes the run in ``workdir`` as a self-contained folder ``output``.

    Nothing is written before the run, its checkpoint and the output folder are found usable; the folder is
    assembled next to ``output`` and moved into place at the end, replacing an earlier export there.

    Args:
      workdir: a trained run's directory (``config.json``, ``model/``, ``checkpoints/STEP/``).
      output: the folder to write (absent, empty, or an earlier export).
      step: the checkpoint to export (default: the newest).

    Returns:
      ``output``.

    Raises:
      FileNotFoundError: ``workdir`` is not a trained run, or has no checkpoint ``step``.
      FileExistsError: ``output`` holds something other than an earlier export.
    """
    cli.check_trained_run(workdir)
    if exported.is_exported(workdir):
        raise FileNotFoundError(f"--workdir={workdir} is already an exported folder; copy it instead")
    model_dir = os.path.join(workdir, MODEL_FOLDER)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json: {workdir} is not a complete trained run")
    _check_output(output, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    hf_config = AutoConfig.from_pretrained(model_dir)
    print(f"export: reading the checkpoint of {workdir}", flush=True)
    params, used_step = checkpoints.load_params(workdir, step)
    params = dict(params)
    state = torch_state_dict(params.pop("backbone"), hf_config)
    vae = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten_dict(params, sep="/").items()}

    vae_config = {"format": exported.FORMAT, "step": int(used_step), "config": config}
    card = model_card(
        config, int(used_step), hf_config, eval_results(workdir), name=os.path.basename(os.path.abspath(output))
    )
    _assemble(
        output,
        model_dir,
        {WEIGHTS_NAME: (state, "pt"), exported.VAE_WEIGHTS_NAME: (vae, "np")},
        {exported.VAE_CONFIG_NAME: _json_text(vae_config), CARD_NAME: card},
    )
    size = sum(a.nbytes for a in state.values()) / 2**20
    print(
        f"export: wrote {output} (step {used_step}; backbone {len(state)} tensors, {size:.1f} MiB; "
        f"VAE {len(vae)} tensors)",
        flush=True,
    )
    return output


def export_backbone(
    backbone: Any, hf_config, model_dir: str, output: str, *, extra_files: dict | None = None, marker: str | None = None
) -> str:
    """Writes a bare seq2seq backbone as a Hugging Face folder (no VAE parts), replacing ``output`` atomically.

    The folder holds ``model.safetensors`` (:func:`torch_state_dict` of ``backbone``), every file of
    ``model_dir`` (the backbone's ``config.json`` and tokenizer files, as training saved them) and
    ``extra_files``; ``transformers.AutoModelForSeq2SeqLM.from_pretrained(output)`` and
    ``flax_textvae.models.load_pretrained(output)`` read it, and it serves as ``model.name_or_path``.
    It is assembled next to ``output`` and moved into place at the end.

    Args:
      backbone: the HF Flax layout params tree of the complete seq2seq model.
      hf_config: its transformers config.
      model_dir: the folder holding ``config.json`` and the tokenizer files.
      output: the folder to write: absent, empty, or (when ``marker`` is given) an earlier folder holding a
        file named ``marker``, which is replaced.
      extra_files: ``{file name: text}`` written next to the weights (a model card, a JSON record).
      marker: the name of a file that marks a folder this kind of export may replace.

    Returns:
      ``output``.

    Raises:
      FileNotFoundError: ``model_dir`` has no ``config.json``.
      FileExistsError: ``output`` holds something else.
      ValueError: ``backbone`` does not match the family's name table.
    """
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json: nothing describes the backbone to export")
    if os.path.exists(output) and not (
        os.path.isdir(output) and (not os.listdir(output) or (marker and os.path.isfile(os.path.join(output, marker))))
    ):
        raise FileExistsError(
            f"{output} exists and is not an earlier export of this kind; choose a new or empty folder"
        )
    return _assemble(
        output, model_dir, {WEIGHTS_NAME: (torch_state_dict(backbone, hf_config), "pt")}, extra_files or {}
    )


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


def _assemble(output: str, model_dir: str, tensors: dict, texts: dict) -> str:
    """Writes the folder ``output``: every file of ``model_dir`` (the backbone's ``config.json`` and tokenizer
    files), ``tensors`` (``{file name: (arrays, safetensors format tag)}``) and ``texts`` (``{file name: text}``).

    The folder is assembled next to ``output`` and moved into place at the end, replacing what was there; an
    error on the way leaves ``output`` as it was. Returns ``output``.
    """
    output = output.rstrip(os.sep) or output
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for fname in sorted(os.listdir(model_dir)):
            if os.path.isfile(os.path.join(model_dir, fname)):
                shutil.copy2(os.path.join(model_dir, fname), os.path.join(tmp, fname))
        for fname, (arrays, tag) in tensors.items():
            save_file(arrays, os.path.join(tmp, fname), metadata={"format": tag})
        for fname, text in texts.items():
            with open(os.path.join(tmp, fname), "w") as f:
                f.write(text)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


# ------------------------------------------------------------------------------- pretrained backbones
def export_pretrained(
    workdir: str, output: str, params, hf_config, *, step: int, eval_metrics: dict | None, config
) -> str:
    """Writes the pretrained backbone as a Hugging Face folder (``export.export_backbone``) with a card.

    Args:
      workdir: the run directory (its ``model/`` holds ``config.json`` and the tokenizer).
      output: the folder to write (absent, empty, or an earlier pretraining export).
      params: the backbone parameters (HF Flax layout).
      hf_config: the backbone's transformers config.
      step: the step the parameters are from.
      eval_metrics: the held-out metrics of ``flax_textvae.pretrain.make_evaluator`` at that step (or None).
      config: the run's config.

    Returns:
      ``output``.
    """
    record = {"format": PRETRAIN_FORMAT, "step": int(step), "eval": eval_metrics, "config": rundir.config_dict(config)}
    name = os.path.basename(os.path.abspath(output))
    files = {
        PRETRAIN_INFO_NAME: _json_text(record) + "\n",
        CARD_NAME: _pretrained_card(config, hf_config, step, eval_metrics, name),
    }
    export_backbone(
        params, hf_config, os.path.join(workdir, MODEL_FOLDER), output, extra_files=files, marker=PRETRAIN_INFO_NAME
    )
    print(
        f"export: wrote {output} (step {step}; transformers' BartForConditionalGeneration.from_pretrained reads it)",
        flush=True,
    )
    return output


def _pretrained_card(config, hf_config, step: int, eval_metrics: dict | None, name: str) -> str:
    c = config
    size = (
        f"d_model {hf_config.d_model}, {hf_config.encoder_layers} + {hf_config.decoder_layers} layers, "
        f"{hf_config.encoder_attention_heads} heads, feed-forward {hf_config.encoder_ffn_dim}, vocabulary "
        f"{hf_config.vocab_size}"
    )
    scratch = c.model.name_or_path == "scratch"
    start = "from scratch" if scratch else f"from `{c.model.name_or_path}`"
    tokenizer = "word level, trained on the training data" if scratch else "that of the starting checkpoint"
    held_out = (
        "No held-out evaluation was recorded."
        if not eval_metrics
        else f"Held-out denoising loss on the first {eval_metrics['num_examples']} sentences of `{c.data.eval}`: "
        f"{eval_metrics['loss']:.4f} nats per target token (perplexity {eval_metrics['ppl']:.2f}, "
        f"teacher-forced accuracy {eval_metrics['accuracy']:.3f})."
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- bart",
        "- text-infilling",
        "- flax_textvae",
        "---",
        "",
        f"# {name}",
        "",
        f"A BART-architecture sequence-to-sequence model ({size}) pretrained {start} with flax_textvae's text "
        f"infilling: in each sentence, spans with Poisson(lambda = {c.pretrain.poisson_lambda}) lengths are "
        f"replaced by one `<mask>` each until {c.pretrain.mask_rate:.0%} of the tokens are masked (a length-0 span "
        "inserts a `<mask>`), and the decoder reconstructs the original sentence.",
        "",
        "## Training",
        "",
        f"* Steps: {step} of batch {c.batch_size}; AdamW, peak learning rate {c.optimizer.learning_rate} "
        f"({c.optimizer.warmup_steps} warm-up steps, {c.optimizer.decay} decay), weight decay "
        f"{c.optimizer.weight_decay}, dropout {getattr(hf_config, 'dropout', '-')}.",
        f"* Data: `{c.data.train}`, at most {c.data.max_length} tokens per sentence; seed {c.seed}.",
        f"* Tokenizer: {tokenizer}; words it does not know become `<unk>`.",
        f"* {held_out}",
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import AutoTokenizer, BartForConditionalGeneration",
        "",
        f'model = BartForConditionalGeneration.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "As the backbone of a text VAE:",
        "",
        "```bash",
        f"python run_train.py --config=configs/bart_vae.py --config.model.name_or_path={name} \\",
        "    --config.data.train=TRAIN.txt --config.data.eval=VALID.txt",
        "```",
        "",
        f"`{PRETRAIN_INFO_NAME}` holds the step, the held-out metrics and the full pretraining config.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flax_textvae.export --workdir=RUN --output=DIR [--step=N] [--verbose]``; returns the exit code.

    A user error (no such run, no checkpoint, an output folder in the way) prints one ``error: ...`` line on
    stderr and exits 2 (the traceback only with ``--verbose``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m flax_textvae.export",
        description="Export a trained flax_textvae run as a self-contained folder: the backbone in Hugging Face "
        "PyTorch format, the VAE weights and config, and a model card.",
    )
    parser.add_argument("--workdir", required=True, help="the trained run's directory")
    parser.add_argument("--output", required=True, help="the folder to write (new, empty, or an earlier export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    args = parser.parse_args(argv)
    try:
        export(args.workdir, args.output, step=args.step)
    except cli.USER_ERRORS as e:
        if args.verbose:
            raise
        cli.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
