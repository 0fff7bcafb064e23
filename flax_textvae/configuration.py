"""The config schema shared by every file in ``configs/``.

``base_config()`` returns an unlocked ``ml_collections.ConfigDict`` holding every field the library reads,
each with a comment; a file in ``configs/`` changes what it needs and returns ``config.lock()``-ed, so a
mistyped ``--config.x=y`` override is an error rather than a silently ignored key.
"""

from __future__ import annotations

import inspect
import re

import ml_collections

from flax_textvae.models import families

# Parameter-path patterns (regular expressions matched with re.search against 'a/b/c' paths) frozen in
# phase 1: the whole decoder side of every registered family (`Family.decoder_params`: decoder stack, the
# embedding it shares with the encoder, the LM head and its bias), so phase 1 changes only the encoder and
# the latent layers (posterior heads and the z -> decoder projections). The released Park & Lee code also
# keeps the z -> memory projection at its random initialisation in phase 1: FREEZE_DECODER_AND_MEMORY
# (configs/park_lee_t5.py) does that.
FREEZE_DECODER = families.frozen_decoder_patterns("backbone/")
FREEZE_DECODER_AND_MEMORY = FREEZE_DECODER + (r"^to_memory/",)


def base_config() -> ml_collections.ConfigDict:
    """Every field the library reads, with its default."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = "facebook/bart-base"  # hub id, local folder, or 'scratch' (build from model.scratch)
    c.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
    c.model.attention = "dot_product"  # jax.nn.dot_product_attention | 'explicit' | 'cudnn' (CUDA GPU, bfloat16)
    c.model.remat = False  # recompute each layer's activations in the backward pass (saves memory on GPU/TPU)
    c.model.scratch = ml_collections.ConfigDict()  # used only when name_or_path == 'scratch'
    c.model.scratch.family = "bart"  # 'bart' or 't5' architecture for the from-scratch model
    c.model.scratch.d_model = 64  # hidden size
    c.model.scratch.num_layers = 2  # encoder layers = decoder layers
    c.model.scratch.num_heads = 4  # attention heads
    c.model.scratch.ffn_dim = 128  # feed-forward inner size
    c.model.scratch.dropout = 0.1  # dropout in the from-scratch model
    c.model.scratch.vocab_size = 8000  # upper bound on the word tokenizer trained from data.train
    c.model.scratch.min_freq = 1  # words rarer than this map to <unk>

    c.vae = ml_collections.ConfigDict()
    c.vae.latent_size = 32  # size of z
    c.vae.pooling = "mean"  # 'mean' | 'max' | 'first' (masked: padding is never pooled)
    c.vae.injection = "memory"  # comma-separated subset of memory,cross_attention,embedding
    c.vae.num_memory_slots = 1  # slots projected from z for 'cross_attention'
    c.vae.memory_style = "hidden"  # 'memory' slot: 'hidden' (via each layer's W_k/W_v) | 'head_kv' (Park & Lee)
    c.vae.posterior_bias = True  # biases on the mean / logvar heads (the released recipe has none)

    c.data = ml_collections.ConfigDict()
    c.data.train = "synthetic:20000"  # text file, 'tfds:NAME[/CONFIG][:SPLIT]', or 'synthetic:N'
    c.data.eval = "synthetic:500:1"  # held-out split, same forms (synthetic:N:SEED)
    c.data.column = -1  # tab-separated column to read from text files (-1: the whole line)
    c.data.text_field = ""  # feature name for TFDS sources ("": "text", else "sentence")
    c.data.tfds_data_dir = ""  # TFDS data_dir ('' = TFDS default / $TFDS_DATA_DIR)
    c.data.max_length = 64  # tokens per example incl. specials; longer ones are truncated (counted)
    c.data.num_buckets = 8  # length buckets = compiled shapes (8 keeps PTB-like padding under 15%)
    c.data.eval_max_examples = 0  # in-training evals use the split's first N examples in file order (0: all)
    c.data.prefetch = 0  # training batches a background thread draws and places on the devices ahead (0: off)

    c.batch_size = 32  # global batch (examples), split over all devices and hosts
    c.train_steps = 2000  # total optimizer steps over both phases
    c.log_every = 50  # steps between metrics.jsonl / TensorBoard rows
    c.eval_every = 500  # steps between evaluations on data.eval (0: only at the end)
    c.checkpoint_every = 500  # steps between checkpoints
    c.keep_checkpoints = 2  # how many recent checkpoints to keep (plus the best of phase 1)
    c.seed = 0  # seeds parameters, data order and all noise
    c.compile_cache_dir = "auto"  # persistent XLA compile cache folder, 'off', or 'auto' (see compile_cache.py)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4  # peak learning rate (AdamW)
    c.optimizer.warmup_steps = 100  # linear warm-up steps at the start of each phase
    c.optimizer.decay = "linear"  # 'linear' | 'cosine' | 'constant' after warm-up, to the end of the phase
    c.optimizer.weight_decay = 0.0  # decoupled weight decay
    c.optimizer.grad_clip = 1.0  # global-norm gradient clipping (0: off)
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.999  # Adam beta2
    c.optimizer.grad_accum_steps = 1  # micro-batches accumulated per optimizer step

    c.phase1 = ml_collections.ConfigDict()
    c.phase1.steps = 0  # encoder warm-up steps (KL weight 0, frozen decoder); 0 = single phase
    c.phase1.frozen = FREEZE_DECODER  # regexes of parameter paths frozen in phase 1

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "elbo"  # 'elbo' (annealed) | 'free_bits' | 'constraint' (Prokhorov et al. 2019)
    c.loss.free_bits = 0.0  # KL threshold lambda per latent dimension (nats), kind='free_bits'
    c.loss.free_bits_mode = "per_example"  # 'per_example' (Park & Lee) | 'batch' (Kingma et al. 2016)
    c.loss.beta = 1.0  # constraint strength, kind='constraint'
    c.loss.target = 5.0  # target KL C (nats per example), kind='constraint'
    c.loss.target_ramp_steps = 0  # steps to ramp C from 0 to target (0: constant)
    c.loss.vocab_chunk_size = 0  # >0: training and eval NLL apply the LM head to this many vocab entries at once
    c.loss.kl_schedule = ml_collections.ConfigDict()  # KL weight over phase-2 steps (elbo, free_bits)
    c.loss.kl_schedule.kind = "linear"  # 'constant' | 'linear' | 'cyclical' | 'sigmoid'
    c.loss.kl_schedule.value = 1.0  # final / maximum weight
    c.loss.kl_schedule.start = 0.0  # initial weight (linear)
    c.loss.kl_schedule.steps = 1000  # ramp length (linear), period (cyclical) or midpoint (sigmoid)
    c.loss.kl_schedule.ratio_increase = 0.5  # fraction of each cycle spent increasing (cyclical)
    c.loss.kl_schedule.steepness = 0.01  # slope of the sigmoid

    c.denoise = ml_collections.ConfigDict()
    c.denoise.delete_rate = 0.0  # max per-example encoder-input deletion rate p (rate ~ U(0, p))
    c.denoise.mask_rate = 0.0  # max per-example encoder-input masking rate
    c.denoise.word_dropout = 0.0  # decoder-input word dropout rate (Bowman et al. 2016)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "mesh"  # 'mesh' (jit + NamedSharding) | 'pmap'
    c.parallel.num_devices = 0  # devices per process to use (0: all)
    c.parallel.fsdp = 1  # devices on the 'fsdp' mesh axis sharding parameters + optimizer state
    c.parallel.coordinator_address = ""  # 'host:port' for multi-host; '' = single host (or auto on TPU)
    c.parallel.num_processes = 0  # multi-host: number of processes (0: let JAX detect)
    c.parallel.process_id = -1  # multi-host: this process's id (-1: let JAX detect)
    return c


def finetune_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Shared settings of the pretrained-model configs (PTB through the TFDS builder, two phases)."""
    c = base_config()
    c.model.name_or_path = name_or_path
    c.vae.latent_size = 32
    c.vae.injection = "memory"
    c.data.train = "tfds:text_vae_corpora/ptb:train"
    c.data.eval = "tfds:text_vae_corpora/ptb:valid"
    c.data.max_length = 64
    c.data.num_buckets = 8
    c.batch_size = 64
    c.train_steps = 30000
    c.log_every = 100
    c.eval_every = 2000
    c.checkpoint_every = 2000
    c.optimizer.warmup_steps = 500
    c.phase1.steps = 5000
    return c


def with_overrides(config: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
    """A locked copy of ``config`` with ``{'a.b.c': value}`` overrides (what ``--config.a.b.c=`` does)."""
    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in dotted.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        if last not in node:
            raise KeyError(f"config has no field {key!r}")
        node[last] = value
    return c.lock()


# One field assignment in base_config()'s source: `c.a.b = value  # comment`.
_FIELD_LINE = re.compile(r"^\s*c\.(?P<field>[\w.]+)\s*=\s*.*?\s#\s?(?P<comment>.*)$")


def field_comments() -> dict[str, str]:
    """``{'a.b': comment}`` for every field (and section) of ``base_config()``, in the order it sets them.

    The comments are read from the source of ``base_config()``, so the comment next to each field is the
    one place that documents it.
    """
    comments: dict[str, str] = {}
    for line in inspect.getsource(base_config).splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            comments[m["field"]] = m["comment"].strip()
    return comments


def _leaves(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe(config: ml_collections.ConfigDict, width: int = 44) -> str:
    """``config`` as one ``field = value  # comment`` line per field, in ``base_config()``'s order.

    Fields the schema does not know come last in their section, without a comment; a section's own
    comment (``model.scratch``) is printed as a ``# section: comment`` line before its first field.

    Args:
      config: any ConfigDict (or nested dict) built on ``base_config()``.
      width: the column the comments are aligned to (longer lines push their comment right).

    Returns:
      The text, one line per field.
    """
    comments = field_comments()
    rank = {f: i for i, f in enumerate(comments)}
    top = {}
    for f, i in rank.items():
        top.setdefault(f.split(".")[0], i)
    leaves = _leaves(config)
    order = sorted(leaves, key=lambda f: (top.get(f.split(".")[0], len(rank)), rank.get(f, len(rank)), f))
    lines, shown = [], set()
    for f in order:
        parts = f.split(".")
        for n in range(1, len(parts)):
            section = ".".join(parts[:n])
            if section in comments and section not in shown:
                shown.add(section)
                lines.append(f"# {section}: {comments[section]}")
        text = f"{f} = {leaves[f]!r}"
        lines.append(f"{text:<{width}}  # {comments[f]}" if f in comments else text)
    return "\n".join(lines)
