"""Model cards: the ``README.md`` an export writes, for a trained VAE and for a pretrained backbone.

* `eval_results(workdir)`: a run's held-out metrics (``WORKDIR/eval/*.json``, else its final training
  evaluation), as the VAE card's table reads them.
* `model_card(config, step, hf_config, results, name=...)`: the VAE export's card (metrics, training recipe,
  files, how to load).
* `pretrained_card(config, hf_config, step, eval_metrics, name)`: the pretrained backbone's card.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from flax_textvae.metrics import SUMMARY_KEYS

__all__ = ["eval_results", "model_card", "pretrained_card", "PRETRAIN_INFO_NAME"]

# A pretrained backbone's record in its export: {"format", "step", "eval", "config"}.
PRETRAIN_INFO_NAME = "pretrain.json"


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


def pretrained_card(config, hf_config, step: int, eval_metrics: dict | None, name: str) -> str:
    """The ``README.md`` of a pretrained backbone's export (``python -m flax_textvae.pretrain``).

    Args:
      config: the pretraining run's config.
      hf_config: the backbone's transformers config.
      step: the exported step.
      eval_metrics: the held-out denoising metrics at that step (``loss``, ``ppl``, ``accuracy``,
        ``num_examples``), or None.
      name: the exported folder's name.
    """
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
    ]
    return "\n".join(lines + _pretrained_usage(name))


def _pretrained_usage(name: str) -> list[str]:
    return [
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
