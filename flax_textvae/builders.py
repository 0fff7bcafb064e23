"""Config -> everything a run needs: backbone, tokenizer, TextVAE, data iterators, decoding helpers.

``build_run(config, workdir)`` is shared by training, evaluation and the inference API, so all three see
the same tokenizer, special ids and batch layout. The backbone's ``config.json`` and tokenizer are copied
into ``WORKDIR/model/`` on the first run; evaluation and ``TextVAE.load`` rebuild the module from there
(no hub access needed after training).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_textvae import data as data_lib
from flax_textvae import exported, models
from flax_textvae.vae import TextVAE

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def split_name(spec: str) -> str:
    """Default eval name of a split spec: 'a/test.txt' -> 'test', 'tfds:x/y:validation' -> 'validation'."""
    if spec.startswith("tfds:"):
        return data_lib.parse_tfds_spec(spec)[1]
    if spec.startswith("synthetic:"):
        return "synthetic"
    return os.path.splitext(os.path.basename(spec))[0]


@dataclasses.dataclass
class Run:
    """What training, evaluation and inference share."""

    config: Any
    model: TextVAE
    tokenizer: Any
    tokenizer_name: str
    backbone_params: Any  # pretrained backbone parameters (None for from-scratch or eval-only)
    pad_id: int
    eos_id: int
    mask_id: int
    unk_id: int
    special_ids: tuple  # protected from denoising / word dropout: BOS, EOS, PAD, mask, prompt (not <unk>)
    prompt: tuple  # forced decoder prefix: (decoder_start,) or (decoder_start, bos)
    max_length: int
    vocab_size: int
    train_iter: Any = None
    eval_batches: Callable[[], Iterator[dict]] | None = None
    eval_spec: str = ""
    eval_texts: list = dataclasses.field(default_factory=list)
    eval_subset: Callable[[int], Callable[[], Iterator[dict]]] | None = None  # first n examples in file order
    eval_stats: dict = dataclasses.field(default_factory=dict)  # encode_texts stats of the eval split
    _unused: tuple | None = dataclasses.field(default=None, repr=False)

    def init_params(self, key: jax.Array):
        """Random VAE parameters whose backbone subtree holds the complete seq2seq model.

        The backbone always carries every tensor of the pretrained architecture, cross-attention included,
        even where the configured injection never calls it, so a trained run contains the whole backbone
        (and can be exported whole). The pretrained weights replace the random backbone when there are any;
        from scratch, the tensors the VAE uses keep the VAE's own initialisation and the unused rest comes
        from the backbone's. ``unused_param_patterns`` lists what the forward pass never reads.
        """
        b, s = 2, 8
        ids = jnp.ones((b, s), jnp.int32)
        params = jax.jit(lambda k: self.model.init({"params": k}, ids, ids, ids, sample=False)["params"])(key)
        if self.backbone_params is not None:
            full = models.param_shapes(self.model.backbone)
            models.loading.check_params(self.backbone_params, full, "pretrained backbone")
            return dict(params, backbone=self.backbone_params)
        if not self.unused_param_patterns():
            return params
        full = flatten_dict(models.init_params(self.model.backbone, jax.random.fold_in(key, 1)), sep="/")
        full.update(flatten_dict(params["backbone"], sep="/"))
        return dict(params, backbone=unflatten_dict(full, sep="/"))

    def unused_param_patterns(self) -> tuple[str, ...]:
        """Anchored regexes of the backbone tensors the VAE's forward pass never reads.

        With ``vae.injection`` without ``cross_attention`` the decoder's cross-attention sub-layers are never
        called; their weights stay in the tree, get no gradient, no optimizer update and no weight decay.
        """
        if self._unused is None:
            b, s = 2, 8
            ids = jnp.ones((b, s), jnp.int32)
            used = jax.eval_shape(lambda: self.model.init({"params": jax.random.key(0)}, ids, ids, ids,
                                                          sample=False)["params"]["backbone"])
            full = models.param_shapes(self.model.backbone)
            unused = set(flatten_dict(full, sep="/")) - set(flatten_dict(used, sep="/"))
            self._unused = tuple("^" + re.escape("backbone/" + k) + "$" for k in sorted(unused))
        return self._unused

    def encode_texts(self, params, texts: list[str]):
        """(mean, logvar) numpy ``[N, Dz]`` for raw texts."""
        ids, _ = data_lib.encode_texts(self.tokenizer, list(texts), self.max_length)
        batch = data_lib.collate(ids, pad_id=self.pad_id, decoder_start_id=self.prompt[0],
                                 bos_id=self.prompt[1] if len(self.prompt) > 1 else None)
        mean, logvar = self.model.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                                        jnp.asarray(batch["attention_mask"]), method=TextVAE.encode)
        return np.asarray(mean), np.asarray(logvar)

    def detokenize(self, ids) -> list[str]:
        """Token ids -> text, special tokens and padding dropped."""
        return [t.strip() for t in self.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)]


def _model_folder(workdir: str) -> str:
    # An exported folder (flax_textvae.export) keeps the backbone's config.json and tokenizer at its top.
    return workdir if exported.is_exported(workdir) else os.path.join(workdir, "model")


def _load_backbone(config, workdir: str, train: bool, train_texts: list[str] | None):
    """(module, pretrained params or None, hf config, tokenizer, tokenizer name)."""
    import transformers

    dtype = DTYPES.get(config.model.dtype)
    if dtype is None:
        raise ValueError(f"model.dtype={config.model.dtype!r}; choose one of {sorted(DTYPES)}")
    folder = _model_folder(workdir)
    saved = os.path.isfile(os.path.join(folder, "config.json"))
    main = jax.process_index() == 0
    ckdir = os.path.join(workdir, "checkpoints")
    resuming = os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))
    # Rebuild from WORKDIR/model for eval / inference and when resuming (the checkpoint holds the weights, so a
    # preempted run restarts without the hub). Training without a checkpoint builds it anew: a folder left by a
    # start that never saved one may come from other data or another model.
    if saved and (not train or resuming):
        hf_config = transformers.AutoConfig.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        return models.build_module(hf_config, dtype), None, hf_config, tokenizer, folder
    if not train:
        raise FileNotFoundError(f"{folder} has no config.json: {workdir} is not a trained run's workdir")
    if config.model.name_or_path == "scratch":
        if train_texts is None:  # a prepared training set: its ids come from the tokenizer saved with it
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                data_lib.PreparedSource(config.data.train).tokenizer_folder)
            if main:
                tokenizer.save_pretrained(folder)
        else:
            tokenizer = data_lib.train_word_tokenizer(
                train_texts, os.path.join(folder, "_tok_tmp") if not main else folder,
                family=config.model.scratch.family, vocab_size=config.model.scratch.vocab_size,
                min_freq=config.model.scratch.min_freq)
        family = models.families.get(config.model.scratch.family)
        hf_config = family.scratch_config(config.model.scratch, tokenizer, config.data.max_length)
        if main:
            hf_config.save_pretrained(folder)
        return models.build_module(hf_config, dtype), None, hf_config, tokenizer, f"word-level ({folder})"
    pre = models.load_pretrained(config.model.name_or_path, dtype=dtype)
    if main:
        pre.config.save_pretrained(folder)
        pre.tokenizer.save_pretrained(folder)
    return pre.module, pre.params, pre.config, pre.tokenizer, config.model.name_or_path


def _special(tokenizer) -> dict:
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("pad", "eos", "bos", "unk", "mask")}
    if ids["pad"] is None or ids["eos"] is None:
        raise ValueError("the tokenizer needs pad and eos tokens")
    return ids


def _report(split: str, spec: str, read_stats: dict, tok_stats: dict, max_length: int) -> None:
    """One line per split on process 0: what was read, skipped and truncated."""
    if jax.process_index() != 0:
        return
    skipped = [f"{read_stats.get(k, 0)} {what}" for k, what in
               (("empty_skipped", "empty lines skipped"), ("undecodable_skipped", "undecodable lines skipped"))
               if read_stats.get(k, 0)]
    if tok_stats.get("truncated", 0):
        skipped.append(f"{tok_stats['truncated']} truncated to data.max_length={max_length}")
    print(f"data {split}: {spec}: {tok_stats.get('examples', 0)} examples, "
          f"mean {tok_stats.get('mean_length', 0):.1f} tokens" + (f" ({', '.join(skipped)})" if skipped else ""),
          flush=True)


def _prepared_source(split: str, spec: str, tokenizer, tokenizer_name: str, max_length: int):
    """The ``PreparedSource`` of a ``prepared:DIR`` spec, refused unless made with this tokenizer / max_length."""
    source = data_lib.PreparedSource(spec)
    problems = data_lib.prepared.compatibility_problems(source.index, tokenizer, max_length, spec=spec,
                                                        tokenizer_name=tokenizer_name)
    if problems:
        from flax_textvae.validation import ConfigError  # validation imports this module

        raise ConfigError(problems, subject=f"data.{split}")
    stats = source.index["stats"]
    _report(split, spec, stats, dict(stats, examples=len(source)), max_length)
    return source


def build_run(config, workdir: str, *, train: bool = True, eval_spec: str | None = None,
              eval_batch_size: int | None = None, with_eval: bool = True) -> Run:
    """Builds the model, tokenizer and data for ``config``.

    Args:
      config: the run's ConfigDict.
      workdir: the run's directory (``WORKDIR/model`` is written on the first training run).
      train: also build the training iterator (and the backbone from ``model.name_or_path``); False for
        evaluation / inference, which rebuild the backbone from ``WORKDIR/model``.
      eval_spec: the split for ``eval_batches`` (default ``config.data.eval``).
      eval_batch_size: default ``config.batch_size``.
      with_eval: read and tokenize the eval split (False for the inference API).
    """
    data_cfg = config.data
    column = None if data_cfg.column < 0 else data_cfg.column
    read = lambda spec: data_lib.read_examples(spec, column=column, text_field=data_cfg.text_field or None,
                                               data_dir=data_cfg.tfds_data_dir or None)
    read_stats = {}
    if train and not data_lib.is_prepared_spec(data_cfg.train):
        train_texts, read_stats["train"] = read(data_cfg.train)
    else:
        train_texts = None
    module, backbone_params, hf_config, tokenizer, tok_name = _load_backbone(config, workdir, train, train_texts)
    sp = _special(tokenizer)
    bos_first = sp["bos"] is not None and tokenizer("a")["input_ids"][0] == sp["bos"]
    start = getattr(hf_config, "decoder_start_token_id", None)
    start = sp["eos"] if start is None else start
    prompt = (start, sp["bos"]) if bos_first else (start,)
    # Ids that denoising and word dropout never touch: BOS / EOS / PAD / mask and the decoder prompt.
    # <unk> is an ordinary token here (about 5% of PTB), so it can be deleted, masked and dropped.
    specials = tuple(sorted({sp[k] for k in ("pad", "eos", "bos", "mask") if sp[k] is not None} | set(prompt)))
    model = TextVAE(backbone=module, latent_size=config.vae.latent_size, pooling=config.vae.pooling,
                    injection=tuple(s.strip() for s in config.vae.injection.split(",") if s.strip()),
                    num_memory_slots=config.vae.num_memory_slots, memory_style=config.vae.get("memory_style", "hidden"),
                    posterior_bias=config.vae.get("posterior_bias", True), dtype=DTYPES[config.model.dtype])
    run = Run(config=config, model=model, tokenizer=tokenizer, tokenizer_name=tok_name,
              backbone_params=backbone_params, pad_id=sp["pad"], eos_id=sp["eos"],
              mask_id=sp["mask"] if sp["mask"] is not None else sp["unk"], unk_id=sp["unk"] if sp["unk"] is not None
              else sp["pad"], special_ids=specials, prompt=prompt, max_length=data_cfg.max_length,
              vocab_size=module.vocab_size)
    batch_kw = dict(pad_id=run.pad_id, decoder_start_id=prompt[0], bos_id=prompt[1] if bos_first else None)
    if train and data_lib.is_prepared_spec(data_cfg.train):  # read through grain, never held in memory
        source = _prepared_source("train", data_cfg.train, tokenizer, tok_name, data_cfg.max_length)
        run.train_iter = data_lib.GrainTrainIterator(
            source, batch_size=config.batch_size, max_length=data_cfg.max_length, num_buckets=data_cfg.num_buckets,
            seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(), **batch_kw)
    elif train:
        ids, tok_stats = data_lib.encode_texts(tokenizer, train_texts, data_cfg.max_length)
        _report("train", data_cfg.train, read_stats["train"], tok_stats, data_cfg.max_length)
        run.train_iter = data_lib.TrainIterator(
            ids, batch_size=config.batch_size, max_length=data_cfg.max_length, num_buckets=data_cfg.num_buckets,
            seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(), **batch_kw)
    if not with_eval:
        return run
    run.eval_spec = eval_spec or data_cfg.eval
    bs = eval_batch_size or config.batch_size
    if data_lib.is_prepared_spec(run.eval_spec):
        source = _prepared_source("eval", run.eval_spec, tokenizer, tok_name, data_cfg.max_length)
        run.eval_texts, run.eval_stats = data_lib.DecodedTexts(source, tokenizer), dict(source.index["stats"])

        def prepared_subset(n: int = 0) -> Callable[[], Iterator[dict]]:
            batches = data_lib.GrainEvalIterator(source, num_examples=n or None, batch_size=bs,
                                                 max_length=data_cfg.max_length, num_buckets=data_cfg.num_buckets,
                                                 **batch_kw)
            return lambda: iter(batches)

        run.eval_subset, run.eval_batches = prepared_subset, prepared_subset(0)
        return run
    run.eval_texts, eval_read = read(run.eval_spec)
    eval_ids, eval_tok = data_lib.encode_texts(tokenizer, run.eval_texts, data_cfg.max_length)
    _report("eval", run.eval_spec, eval_read, eval_tok, data_cfg.max_length)
    run.eval_stats = eval_tok

    def subset(n: int = 0) -> Callable[[], Iterator[dict]]:
        ids = eval_ids[:n] if n else eval_ids  # batches are length-sorted: cut before batching, not after
        return lambda: iter(data_lib.EvalIterator(ids, batch_size=bs, max_length=data_cfg.max_length,
                                                  num_buckets=data_cfg.num_buckets, **batch_kw))

    run.eval_subset = subset
    run.eval_batches = subset(0)
    return run
