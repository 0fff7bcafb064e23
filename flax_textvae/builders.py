"""Config -> everything a run needs: backbone, tokenizer, TextVAE, decoding helpers and its data.

``build_run(config, workdir)`` is shared by training, evaluation and the inference API, so all three see
the same tokenizer, special ids and batch layout; the batches come from ``input_pipeline.make_pipeline``
(``Run.data``). The backbone's ``config.json`` and tokenizer are copied into ``WORKDIR/model/`` on the first
run; evaluation and ``TextVAE.load`` rebuild the module from there (no hub access needed after training).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_textvae import data as data_lib
from flax_textvae import exported, input_pipeline, models
from flax_textvae.vae import DTYPES, TextVAE

ENCODE_BATCH = 64  # texts per encoder call in Run.encode_texts


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
    data: input_pipeline.Pipeline = dataclasses.field(default_factory=input_pipeline.Pipeline)
    _unused: tuple | None = dataclasses.field(default=None, repr=False)
    _init_fns: dict = dataclasses.field(default_factory=dict, repr=False)
    _encode_fn: Callable | None = dataclasses.field(default=None, repr=False)

    @property
    def train_iter(self) -> Any:
        """The training batches (``data.train_iter``; None unless built for training)."""
        return self.data.train_iter

    @property
    def eval_spec(self) -> str:
        """The eval split's spec."""
        return self.data.eval_spec

    @property
    def eval_texts(self) -> Sequence[str]:
        """The eval examples' texts, in example order."""
        return self.data.eval_texts

    @property
    def eval_stats(self) -> dict:
        """What reading the eval split counted (examples, truncated, ...)."""
        return self.data.eval_stats

    @property
    def eval_batches(self) -> Callable[[], Iterator[dict]] | None:
        """A callable returning a pass over every eval example once."""
        return self.data.eval_batches

    def eval_subset(self, n: int = 0) -> Callable[[], Iterator[dict]]:
        """Like ``eval_batches`` over the eval split's first ``n`` examples in file order (0: all)."""
        return self.data.eval_subset(n)

    def init_params(self, key: jax.Array):
        """Random VAE parameters whose backbone subtree holds the complete seq2seq model.

        The backbone always carries every tensor of the pretrained architecture, cross-attention included,
        even where the configured injection never calls it, so a trained run contains the whole backbone
        (and can be exported whole). The pretrained weights replace the random backbone when there are any
        (the random one is then never computed: the initialising program returns only the VAE's own
        tensors); from scratch, the tensors the VAE uses keep the VAE's own initialisation and the unused
        rest comes from the backbone's. ``unused_param_patterns`` lists what the forward pass never reads.
        """
        if self.backbone_params is not None:
            full = models.param_shapes(self.model.backbone)
            models.loading.verify_params(self.backbone_params, full, "pretrained backbone")
            return dict(self._init_fn(without_backbone=True)(key), backbone=self.backbone_params)
        if not self.unused_param_patterns():
            return self._init_fn()(key)
        if "complete" not in self._init_fns:
            vae_init, backbone = self._init_fn(), self.model.backbone

            def complete(k):  # one program: the VAE's tensors, the rest from a random backbone's
                params = vae_init(k)
                full = flatten_dict(models.loading.random_params(backbone, jax.random.fold_in(k, 1)), sep="/")
                full.update(flatten_dict(params["backbone"], sep="/"))
                return dict(params, backbone=unflatten_dict(full, sep="/"))

            self._init_fns["complete"] = jax.jit(complete)
        return self._init_fns["complete"](key)

    def _init_fn(self, without_backbone: bool = False) -> Callable[[jax.Array], Any]:
        """The jitted ``key -> VAE params``, or only its non-backbone subtrees (XLA then drops the random
        backbone); made once per Run, so one trace of the whole initialisation serves ``init_params`` and
        ``unused_param_patterns``."""
        if without_backbone not in self._init_fns:
            if without_backbone:
                full = self._init_fn()
                fn = jax.jit(lambda k: {n: v for n, v in full(k).items() if n != "backbone"})
            else:
                ids = jnp.ones((2, 8), jnp.int32)
                fn = jax.jit(lambda k: self.model.init({"params": k}, ids, ids, ids, sample=False)["params"])
            self._init_fns[without_backbone] = fn
        return self._init_fns[without_backbone]

    def unused_param_patterns(self) -> tuple[str, ...]:
        """Anchored regexes of the backbone tensors the VAE's forward pass never reads.

        With ``vae.injection`` without ``cross_attention`` the decoder's cross-attention sub-layers are never
        called; their weights stay in the tree, get no gradient, no optimizer update and no weight decay.
        """
        if self._unused is None:
            used = jax.eval_shape(self._init_fn(), jax.random.key(0))["backbone"]
            full = models.param_shapes(self.model.backbone)
            unused = set(flatten_dict(full, sep="/")) - set(flatten_dict(used, sep="/"))
            self._unused = tuple("^" + re.escape("backbone/" + k) + "$" for k in sorted(unused))
        return self._unused

    def encode_texts(self, params, texts: list[str], batch_size: int = ENCODE_BATCH):
        """(mean, logvar) numpy ``[N, Dz]`` for raw texts.

        The texts are encoded ``batch_size`` at a time by one jitted program per batch shape: the rows
        rounded up to a power of two (filled with copies of the first text, then dropped), the length to a
        multiple of 8 (at most ``max_length``). So any number of texts takes bounded memory, and the
        programs are few and reused (and persistently cached where the compilation cache is on).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids, _ = data_lib.encode_texts(self.tokenizer, list(texts), self.max_length)
        if self._encode_fn is None:
            model = self.model
            self._encode_fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=TextVAE.encode))
        means, logvars = [], []
        for start in range(0, len(ids), batch_size):
            chunk = list(ids[start : start + batch_size])
            rows = 1 << (len(chunk) - 1).bit_length()
            longest = max(len(x) for x in chunk)
            batch = data_lib.collate(
                chunk + chunk[:1] * (rows - len(chunk)),
                pad_id=self.pad_id,
                decoder_start_id=self.prompt[0],
                seq_len=max(longest, min(data_lib.round_up(longest, 8), self.max_length)),
            )
            mean, logvar = self._encode_fn(params, batch["input_ids"], batch["attention_mask"])
            means.append(np.asarray(mean)[: len(chunk)])
            logvars.append(np.asarray(logvar)[: len(chunk)])
        if not means:
            empty = np.zeros((0, self.model.latent_size), np.float32)
            return empty, empty.copy()
        return np.concatenate(means), np.concatenate(logvars)

    def detokenize(self, ids) -> list[str]:
        """Token ids -> text, special tokens and padding dropped."""
        return [t.strip() for t in self.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)]


def _model_folder(workdir: str) -> str:
    # An exported folder (flax_textvae.export) keeps the backbone's config.json and tokenizer at its top.
    return workdir if exported.is_exported(workdir) else os.path.join(workdir, "model")


def _load_backbone(config, workdir: str, train: bool, train_texts: Callable[[], Sequence[str]]):
    """(module, pretrained params or None, hf config, tokenizer, tokenizer name).

    ``train_texts()`` gives the training texts when a word tokenizer has to be trained on them.
    """
    dtype = DTYPES.get(config.model.dtype)
    if dtype is None:
        raise ValueError(f"model.dtype={config.model.dtype!r}; choose one of {sorted(DTYPES)}")
    # configs saved before these fields existed get the defaults; evaluation and inference of a run trained
    # with cuDNN attention run on the XLA path where cuDNN cannot (training there is refused earlier)
    attention = config.model.get("attention", models.attention.DEFAULT_ATTENTION)
    options = {
        "attention": attention if train else models.attention.resolve_attention(attention),
        "remat": bool(config.model.get("remat", False)),
    }
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
        return models.build_module(hf_config, dtype, **options), None, hf_config, tokenizer, folder
    if not train:
        raise FileNotFoundError(f"{folder} has no config.json: {workdir} is not a trained run's workdir")
    if config.model.name_or_path == "scratch":
        if data_lib.is_prepared_spec(config.data.train):  # its ids come from the tokenizer saved with it
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                data_lib.PreparedSource(config.data.train).tokenizer_folder
            )
            if main:
                tokenizer.save_pretrained(folder)
        else:
            tokenizer = data_lib.train_word_tokenizer(
                train_texts(),
                os.path.join(folder, "_tok_tmp") if not main else folder,
                family=config.model.scratch.family,
                vocab_size=config.model.scratch.vocab_size,
                min_freq=config.model.scratch.min_freq,
            )
        family = models.families.get(config.model.scratch.family)
        hf_config = family.scratch_config(config.model.scratch, tokenizer, config.data.max_length)
        if main:
            hf_config.save_pretrained(folder)
        return models.build_module(hf_config, dtype, **options), None, hf_config, tokenizer, f"word-level ({folder})"
    pre = models.load_pretrained(config.model.name_or_path, dtype=dtype, **options)
    if main:
        pre.config.save_pretrained(folder)
        pre.tokenizer.save_pretrained(folder)
    return pre.module, pre.params, pre.config, pre.tokenizer, config.model.name_or_path


def _special(tokenizer) -> dict:
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("pad", "eos", "bos", "unk", "mask")}
    if ids["pad"] is None or ids["eos"] is None:
        raise ValueError("the tokenizer needs pad and eos tokens")
    return ids


def _prompt(tokenizer, hf_config, sp: dict) -> tuple:
    """The forced decoder prefix: (decoder_start,), or (decoder_start, bos) when the tokenizer starts with BOS."""
    bos_first = sp["bos"] is not None and tokenizer("a")["input_ids"][0] == sp["bos"]
    start = getattr(hf_config, "decoder_start_token_id", None)
    start = sp["eos"] if start is None else start
    return (start, sp["bos"]) if bos_first else (start,)


def _vae(config, module) -> TextVAE:
    v = config.vae
    return TextVAE(
        backbone=module,
        latent_size=v.latent_size,
        pooling=v.pooling,
        injection=tuple(s.strip() for s in v.injection.split(",") if s.strip()),
        num_memory_slots=v.num_memory_slots,
        memory_style=v.get("memory_style", "hidden"),
        posterior_bias=v.get("posterior_bias", True),
        dtype=DTYPES[config.model.dtype],
    )


def attention_note(run: Run) -> str | None:
    """A console line when the cuDNN attention asked for cannot run in the training step, else None.

    A backbone that draws attention dropout (T5's ``dropout_rate``, BART's ``attention_dropout``) attends on
    the explicit path while training, whatever ``model.attention`` says; evaluation, the importance-weighted
    bound and decoding still use the fused kernel.
    """
    backbone = run.model.backbone
    if backbone.attention != "cudnn":
        return None
    rate = models.families.get(backbone.config.model_type).attention_dropout(backbone.config)
    if rate <= 0:
        return None
    return (
        f"note: model.attention='cudnn', but this {backbone.config.model_type} backbone draws attention dropout "
        f"({rate:g}) in training, so the training step attends on the explicit path (the fused kernel has no "
        "dropout here); evaluation and decoding use cuDNN"
    )


def build_run(
    config,
    workdir: str,
    *,
    train: bool = True,
    eval_spec: str | None = None,
    eval_batch_size: int | None = None,
    with_eval: bool = True,
) -> Run:
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
    reader = input_pipeline.TextReader(config.data)
    module, backbone_params, hf_config, tokenizer, tok_name = _load_backbone(
        config, workdir, train, lambda: reader(config.data.train)[0]
    )
    sp = _special(tokenizer)
    prompt = _prompt(tokenizer, hf_config, sp)
    # Ids that denoising and word dropout never touch: BOS / EOS / PAD / mask and the decoder prompt.
    # <unk> is an ordinary token here (about 5% of PTB), so it can be deleted, masked and dropped.
    specials = tuple(sorted({sp[k] for k in ("pad", "eos", "bos", "mask") if sp[k] is not None} | set(prompt)))
    pipeline = input_pipeline.make_pipeline(
        config,
        tokenizer,
        prompt=prompt,
        tokenizer_name=tok_name,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        train=train,
        eval_spec=eval_spec,
        eval_batch_size=eval_batch_size,
        with_eval=with_eval,
        reader=reader,
    )
    return Run(
        config=config,
        model=_vae(config, module),
        tokenizer=tokenizer,
        tokenizer_name=tok_name,
        backbone_params=backbone_params,
        pad_id=sp["pad"],
        eos_id=sp["eos"],
        mask_id=sp["mask"] if sp["mask"] is not None else sp["unk"],
        unk_id=sp["unk"] if sp["unk"] is not None else sp["pad"],
        special_ids=specials,
        prompt=prompt,
        max_length=config.data.max_length,
        vocab_size=module.vocab_size,
        data=pipeline,
    )
