"""The registry of model families: every fact about BART or T5 that code outside its family module needs.

One `Family` per transformers `model_type`:

  * the linen module class and the explicit PyTorch name table (`params_from_torch`, `torch_name_table`,
    `export_table` for writing a backbone back under PyTorch names),
  * `scratch_config(scratch_cfg, tokenizer, max_length)`: the transformers config of a from-scratch model,
  * `decoder_params`: where the decoder side lives in the parameter tree (what phase 1 freezes),
  * `tokenizer_layout`: the special-token layout of the word-level tokenizer trained for a from-scratch model,
  * `max_decode_positions(config)`: how many decoder positions a decoding cache may hold.

Public:
  * `FAMILIES`: read-only mapping model_type -> Family ('bart', 't5').
  * `get(model_type) -> Family` (ValueError naming the supported types for any other).
  * `frozen_decoder_patterns(prefix='backbone/')`: the union over families of the decoder-side regexes.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import types
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import transformers

from flax_textvae.models import bart, bart_weights, t5, t5_weights

__all__ = ["Family", "TokenizerLayout", "FAMILIES", "get", "frozen_decoder_patterns"]


@dataclasses.dataclass(frozen=True)
class TokenizerLayout:
    """Special tokens of a family's tokenizer, as `data.train_word_tokenizer` builds it.

    Attributes:
      specials: the special tokens in id order (ids 0, 1, ...); words follow.
      single: post-processor template of one sequence (e.g. ``'<s> $A </s>'``).
      pair: post-processor template of a pair of sequences.
      roles: ``(tokenizer keyword, token)`` pairs, e.g. ``('bos_token', '<s>')``.
    """

    specials: tuple[str, ...]
    single: str
    pair: str
    roles: tuple[tuple[str, str], ...]

    @property
    def special_tokens(self) -> dict[str, str]:
        """The roles as tokenizer keyword arguments (``bos_token=...``, ``pad_token=...``, ...)."""
        return dict(self.roles)


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything code outside the family module needs to know about one model family.

    Attributes:
      model_type: the transformers ``config.model_type``.
      module_class: the linen seq2seq LM, built as ``module_class(config, dtype=...)``.
      params_from_torch: ``(state_dict, config) -> params`` (the explicit PyTorch -> Flax table).
      params_from_flax: ``(params, config) -> params``: a flax_model.msgpack tree in the module's layout (a
        checkpoint of the bare encoder-decoder gets the LM's nesting).
      torch_name_table: ``config -> [(torch name, flax path, transpose, torch shape)]``.
      export_table: ``config -> (rows, aliases)``: the table for writing the backbone under PyTorch names
        (`torch_name_table` completed with any tensor it leaves out) and ``(extra torch name, table torch
        name)`` pairs written as copies.
      decoder_params: path prefixes (``'a/b/'`` form, or a whole leaf name) of the backbone parameters on
        the decoder side: decoder stack, the token embedding it shares, the LM head and its bias.
      tokenizer_layout: the `TokenizerLayout` of a from-scratch word tokenizer.
      max_decode_positions: ``config -> int or None``: decoder positions a cache may hold (learned absolute
        positions), None where positions are relative.
      build_scratch_config: ``(scratch_cfg, tokenizer, max_length, shared_kwargs) -> config``; use
        `scratch_config`, which checks the sizes and fills ``shared_kwargs``.
      attention_dropout: ``config -> float``: the dropout rate on the attention probabilities (drawn in
        training, where it sends attention through the explicit path).
    """

    model_type: str
    module_class: type
    params_from_torch: Callable[[Mapping[str, Any], Any], dict]
    params_from_flax: Callable[[Mapping[str, Any], Any], dict]
    torch_name_table: Callable[[Any], list]
    export_table: Callable[[Any], tuple[list, list]]
    decoder_params: tuple[str, ...]
    tokenizer_layout: TokenizerLayout
    max_decode_positions: Callable[[Any], Optional[int]]
    build_scratch_config: Callable[..., Any]
    attention_dropout: Callable[[Any], float]

    def build_module(self, config, dtype: Any = jnp.float32, **options) -> nn.Module:
        """The family module for ``config``, computing in ``dtype`` (parameters stay float32); ``options``:
        the module's ``attention`` implementation and ``remat`` switch."""
        return self.module_class(config, dtype=dtype, **options)

    def scratch_config(self, scratch_cfg, tokenizer, max_length: int):
        """A transformers config for a from-scratch backbone.

        Args:
          scratch_cfg: ``config.model.scratch`` (d_model, num_layers, num_heads, ffn_dim, dropout).
          tokenizer: the word tokenizer trained for it (sets the vocabulary and special ids).
          max_length: ``data.max_length``, the longest tokenized example.

        Returns:
          A ``transformers.BartConfig`` / ``T5Config`` (tied embeddings).

        Raises:
          ValueError: d_model is not a multiple of num_heads.
        """
        s = scratch_cfg
        if s.d_model % s.num_heads:
            raise ValueError(f"model.scratch.d_model={s.d_model} must be divisible by num_heads={s.num_heads}")
        shared = dict(
            vocab_size=len(tokenizer),
            d_model=s.d_model,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return self.build_scratch_config(s, tokenizer, max_length, shared)


# ------------------------------------------------------------------------------------------------- BART
def _bart_scratch(s, tokenizer, max_length: int, shared: dict):
    return transformers.BartConfig(
        **shared,
        encoder_layers=s.num_layers,
        decoder_layers=s.num_layers,
        encoder_attention_heads=s.num_heads,
        decoder_attention_heads=s.num_heads,
        encoder_ffn_dim=s.ffn_dim,
        decoder_ffn_dim=s.ffn_dim,
        max_position_embeddings=max_length + 8,
        dropout=s.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
        scale_embedding=False,
        tie_word_embeddings=True,
    )


def _bart_export_table(config) -> tuple[list, list]:
    """An untied BART keeps its one input embedding also under the encoder's / decoder's embed_tokens."""
    tied = bool(getattr(config, "tie_word_embeddings", True))
    aliases = (
        []
        if tied
        else [(f"model.{stack}.embed_tokens.weight", "model.shared.weight") for stack in ("encoder", "decoder")]
    )
    return bart_weights.torch_name_table(config), aliases


def _bart_positions(config) -> Optional[int]:
    return getattr(config, "max_position_embeddings", None)


BART = Family(
    model_type="bart",
    module_class=bart.BartForConditionalGeneration,
    params_from_torch=bart_weights.params_from_torch,
    params_from_flax=bart_weights.params_from_flax,
    torch_name_table=bart_weights.torch_name_table,
    export_table=_bart_export_table,
    decoder_params=("model/decoder/", "model/shared/", "final_logits_bias", "lm_head/"),
    tokenizer_layout=TokenizerLayout(
        specials=("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        roles=(
            ("bos_token", "<s>"),
            ("pad_token", "<pad>"),
            ("eos_token", "</s>"),
            ("unk_token", "<unk>"),
            ("mask_token", "<mask>"),
        ),
    ),
    max_decode_positions=_bart_positions,
    build_scratch_config=_bart_scratch,
    attention_dropout=lambda config: float(config.attention_dropout),
)


# --------------------------------------------------------------------------------------------------- T5
def _t5_scratch(s, tokenizer, max_length: int, shared: dict):
    del max_length  # relative positions: any length
    return transformers.T5Config(
        **shared,
        d_kv=s.d_model // s.num_heads,
        d_ff=s.ffn_dim,
        num_layers=s.num_layers,
        num_decoder_layers=s.num_layers,
        num_heads=s.num_heads,
        dropout_rate=s.dropout,
        feed_forward_proj="relu",
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def _t5_export_table(config) -> tuple[list, list]:
    """T5 v1.1 has its own LM head, which `torch_name_table` leaves out (transformers loads it untied)."""
    rows = t5_weights.torch_name_table(config)
    if t5.separate_head(config):
        rows.append(("lm_head.weight", ("lm_head", "kernel"), True, (config.vocab_size, config.d_model)))
    return rows, []


def _no_position_limit(config) -> Optional[int]:
    del config
    return None


T5 = Family(
    model_type="t5",
    module_class=t5.T5ForConditionalGeneration,
    params_from_torch=t5_weights.params_from_torch,
    params_from_flax=lambda params, config: dict(params),  # T5's LM and bare model share their top level
    torch_name_table=t5_weights.torch_name_table,
    export_table=_t5_export_table,
    decoder_params=("decoder/", "shared/", "lm_head/"),
    tokenizer_layout=TokenizerLayout(
        specials=("<pad>", "</s>", "<unk>"),
        single="$A </s>",
        pair="$A </s> $B </s>",
        roles=(("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>")),
    ),
    max_decode_positions=_no_position_limit,
    build_scratch_config=_t5_scratch,
    attention_dropout=lambda config: float(config.dropout_rate),  # T5 uses one rate everywhere
)


# ------------------------------------------------------------------------------------------- registry
FAMILIES: Mapping[str, Family] = types.MappingProxyType({f.model_type: f for f in (BART, T5)})


def get(model_type: Optional[str]) -> Family:
    """The registered family of ``model_type`` (a transformers ``config.model_type``).

    Raises:
      ValueError: naming the unsupported type and the supported ones.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def frozen_decoder_patterns(prefix: str = "backbone/") -> tuple[str, ...]:
    """Anchored regexes matching the decoder-side parameters of every family under ``prefix``.

    Prefixes of one family come first, in registry order, then those several families share (the LM
    head), so the tuple is stable as families are added at the end.

    Args:
      prefix: where the backbone sits in the parameter tree ('backbone/' in a TextVAE).

    Returns:
      e.g. ``('^backbone/model/decoder/', ..., '^backbone/lm_head/')``.
    """
    counts = collections.Counter(p for f in FAMILIES.values() for p in f.decoder_params)
    own = [p for f in FAMILIES.values() for p in f.decoder_params if counts[p] == 1]
    common = list(dict.fromkeys(p for f in FAMILIES.values() for p in f.decoder_params if counts[p] > 1))
    return tuple("^" + re.escape(prefix + p) for p in own + common)
