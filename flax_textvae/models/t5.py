"""T5 (v1.0 and v1.1) encoder-decoder in Flax linen, parameter names as Hugging Face's Flax T5.

Matches `transformers.T5ForConditionalGeneration`: pre-norm blocks with the T5 RMS layer norm (no mean,
no bias, computed in float32), unscaled dot-product attention with bucketed relative-position biases
(a table in block 0 of each stack, shared by all its layers; bidirectional in the encoder, causal in the
decoder), ReLU (v1.0) or gated-GELU (v1.1) feed-forward, and the LM head tied to `shared` (decoder output
rescaled by d_model**-0.5) or a separate `lm_head` (v1.1).

Parameter tree (what transformers 4.x `FlaxT5ForConditionalGeneration` saved):
  shared/embedding [V, D]
  encoder/block/<i>/layer/0/{SelfAttention/{q,k,v,o}/kernel, layer_norm/weight}
      (block 0 also SelfAttention/relative_attention_bias/embedding [buckets, H])
  encoder/block/<i>/layer/1/{DenseReluDense/{wi | wi_0, wi_1}/kernel, DenseReluDense/wo/kernel, layer_norm/weight}
  encoder/final_layer_norm/weight
  decoder/... the same, with layer/1 = EncDecAttention + layer_norm and layer/2 = DenseReluDense + layer_norm
  lm_head/kernel [D, V]  (only for an untied head)

Tied vs separate head. transformers 5 always reports `tie_word_embeddings=True` for T5 and keeps the
saved flag as `config.scale_decoder_outputs` (transformers 4 configs: `tie_word_embeddings`). Original T5
(flag True) rescales the decoder output and uses `shared` as the head; T5 v1.1 / Flan-T5 (flag False) have
a separate `lm_head` and no rescale. The module follows the flag; `params_from_torch` copies `shared` into
`lm_head` when a flag-False checkpoint stores no lm_head.weight (transformers 5 ties T5 heads on save).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_textvae.models.common import (Dropout, Seq2SeqProperties, apply_name_table, causal_mask, combine_masks,
                                        get_activation, init_cache, mask_to_bias, mismatch_report, padding_mask)

Array = jax.Array
_normal = jax.nn.initializers.normal

__all__ = ["T5ForConditionalGeneration", "params_from_torch", "torch_name_table", "relative_position_bucket",
           "separate_head", "init_cache"]


# ----------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every relative position in [-max_distance, max_distance] (constant beyond)."""
    rel = np.arange(-max_distance, max_distance + 1)
    out = np.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        out += (rel > 0) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = n // 2
    ratio = np.log(np.maximum(rel, 1).astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
    large = np.minimum(max_exact + (ratio * (n - max_exact)).astype(np.int64), n - 1)
    return (out + np.where(rel < max_exact, rel, large)).astype(np.int32)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucketing of relative positions (memory_position - query_position).

    Args:
      relative_position: int array of any shape.
      bidirectional: False for the decoder (positive offsets share bucket 0).
      num_buckets: `config.relative_attention_num_buckets`.
      max_distance: `config.relative_attention_max_distance`.

    Returns:
      int32 array of the same shape with values in [0, num_buckets).
    """
    table = jnp.asarray(_bucket_table(bool(bidirectional), int(num_buckets), int(max_distance)))
    return table[jnp.clip(relative_position, -max_distance, max_distance) + max_distance]


def _ffn_kind(config) -> tuple[bool, str]:
    """(is_gated, activation name) from the config, as transformers derives them."""
    parts = config.feed_forward_proj.split("-")
    gated = getattr(config, "is_gated_act", parts[0] == "gated")
    act = getattr(config, "dense_act_fn", parts[-1])
    return gated, "gelu_new" if config.feed_forward_proj == "gated-gelu" else act


def separate_head(config) -> bool:
    """True for T5 v1.1-style checkpoints: own lm_head, decoder output not rescaled by d_model**-0.5."""
    return not bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))


# ----------------------------------------------------------------------------------------------- layers
class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; always computed in float32, returned in `dtype`."""
    hidden_size: int
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (self.hidden_size,), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (weight * x32).astype(self.dtype)


class T5Attention(nn.Module):
    """Multi-head attention without query scaling; relative-position bias table if `has_relative_bias`."""
    config: Any
    has_relative_bias: bool = False
    causal: bool = False
    dtype: Any = jnp.float32

    def _split(self, x: Array) -> Array:
        return x.reshape(x.shape[:2] + (self.config.num_heads, self.config.d_kv))

    def _compute_bias(self, q_pos: Array, k_pos: Array) -> Array:
        """Relative-position bias [1, H, Q, K] float32 for query positions [Q] and key positions [K]."""
        c = self.config
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, param_dtype=jnp.float32,
                         embedding_init=_normal(c.initializer_factor * c.d_model ** -0.5),
                         name="relative_attention_bias")
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], not self.causal,
                                           c.relative_attention_num_buckets, c.relative_attention_max_distance)
        return jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)

    def _update_cache(self, k: Array, v: Array) -> tuple[Array, Array, Array]:
        """Writes k, v [B,T,H,dk] at the cache index; returns (keys, values, start position)."""
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:  # cache creation (init / init_cache): plain causal attention over the input
            return k, v, jnp.array(0, jnp.int32)
        start = ci.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, start, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, start, 0, 0))
        ci.value = start + k.shape[1]
        return ck.value, cv.value, start

    @nn.compact
    def __call__(self, x: Array, key_mask: Array | None, position_bias: Array | None, *,
                 memory: Array | None = None, prefix: Array | None = None, prefix_mask: Array | None = None,
                 prefix_kv: Array | None = None, deterministic: bool = True,
                 decode: bool = False) -> tuple[Array, Array | None]:
        """Attention of x [B,T,D] over itself (self) or over `memory` [B,M,D] (cross).

        Args:
          x: normalized hidden states [B, T, D].
          key_mask: [B, K] {0,1} padding mask of the keys (K = T, M, or the cache length), or None.
          position_bias: [1, H, T, K] shared bias from block 0, or None (computed here / zero).
          memory: cross-attention keys/values source; None for self-attention.
          prefix: [B, P, D] extra self-attention slots projected by k/v, bias 0, never causal-masked.
          prefix_mask: [B, P] {0,1} or None (all visible).
          prefix_kv: [B, P, H, dk] self-attention slots already in head space, used as key and value as they
            are, at positions 0..P-1 before the tokens (which then sit at P, P+1, ...): a length-P cache
            prefix, with the relative-position bias that implies; excludes `prefix`.
          deterministic: no dropout when True.
          decode: incremental decoding with the 'cache' collection (self-attention only).

        Returns:
          (output [B, T, D] in dtype, position bias [1, H, T, K] of the token keys, or of the P slots and
          the token keys [1, H, T, P + K] when `prefix_kv` is given; or None).
        """
        c = self.config
        inner, f = c.num_heads * c.d_kv, c.initializer_factor
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        q_proj = dense(inner, kernel_init=_normal(f * (c.d_model * c.d_kv) ** -0.5), name="q")
        k_proj = dense(inner, kernel_init=_normal(f * c.d_model ** -0.5), name="k")
        v_proj = dense(inner, kernel_init=_normal(f * c.d_model ** -0.5), name="v")
        o_proj = dense(c.d_model, kernel_init=_normal(f * inner ** -0.5), name="o")
        b, t = x.shape[:2]
        q = self._split(q_proj(x))
        src = x if memory is None else memory
        k, v = self._split(k_proj(src)), self._split(v_proj(src))
        mask = None if key_mask is None else padding_mask(key_mask)
        if memory is None:
            start = jnp.array(0, jnp.int32)
            if decode:
                k, v, start = self._update_cache(k, v)
            if self.causal:  # in decode mode this also hides the cache slots not written yet
                mask = combine_masks(mask, causal_mask(t, k.shape[1], start))
            if position_bias is None and self.has_relative_bias:
                slots = 0 if prefix_kv is None else prefix_kv.shape[1]
                position_bias = self._compute_bias(slots + start + jnp.arange(t), jnp.arange(slots + k.shape[1]))
        bias = position_bias
        if prefix is not None and prefix_kv is not None:
            raise ValueError("pass either prefix (hidden space) or prefix_kv (head space), not both")
        if prefix is not None or prefix_kv is not None:
            if prefix is not None:  # hidden-space slots: this layer's k / v, relative bias 0
                pk, pv = self._split(k_proj(prefix)), self._split(v_proj(prefix))
                if bias is not None:
                    bias = jnp.concatenate([jnp.zeros(bias.shape[:3] + (prefix.shape[1],), bias.dtype), bias],
                                           axis=-1)
            else:  # head-space slots: already in the bias computed over P + K key positions
                pk = pv = prefix_kv
            p = pk.shape[1]
            k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
            pmask = jnp.ones((b, 1, 1, p), bool) if prefix_mask is None else padding_mask(prefix_mask)
            tmask = jnp.ones((1, 1, 1, k.shape[1] - p), bool) if mask is None else mask
            mask = jnp.concatenate([jnp.broadcast_to(pmask, (b, 1, t, p)),
                                    jnp.broadcast_to(tmask, (b, 1, t, k.shape[1] - p))], axis=-1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores + mask_to_bias(mask, jnp.float32)
        weights = Dropout(c.dropout_rate)(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
        weights = weights.astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(self.dtype))
        return o_proj(out.reshape(b, t, -1)), position_bias


class T5DenseReluDense(nn.Module):
    """Feed-forward: wo(dropout(act(wi x))) or, gated (v1.1), wo(dropout(act(wi_0 x) * wi_1 x))."""
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        c = self.config
        gated, act = _ffn_kind(c)
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        wi_init = _normal(c.initializer_factor * c.d_model ** -0.5)
        if gated:
            h = get_activation(act)(dense(c.d_ff, kernel_init=wi_init, name="wi_0")(x))
            h = h * dense(c.d_ff, kernel_init=wi_init, name="wi_1")(x)
        else:
            h = get_activation(act)(dense(c.d_ff, kernel_init=wi_init, name="wi")(x))
        h = Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return dense(c.d_model, kernel_init=_normal(c.initializer_factor * c.d_ff ** -0.5), name="wo")(h)


class T5Block(nn.Module):
    """One block: self-attention, cross-attention (decoder, when memory is given), feed-forward."""
    config: Any
    has_relative_bias: bool = False
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, key_mask, position_bias, memory, memory_mask, prefix, prefix_mask,
                 deterministic: bool, decode: bool, prefix_kv=None):
        c = self.config
        drop = Dropout(c.dropout_rate)
        y, position_bias = _SubLayer(c, "SelfAttention", self.has_relative_bias, self.causal, self.dtype,
                                     name="0")(h, key_mask, position_bias, None, prefix, prefix_mask,
                                               deterministic, decode, prefix_kv)
        h = h + drop(y, deterministic=deterministic)
        if self.causal and memory is not None:
            y, _ = _SubLayer(c, "EncDecAttention", False, False, self.dtype, name="1")(
                h, memory_mask, None, memory, None, None, deterministic, False)
            h = h + drop(y, deterministic=deterministic)
        y, _ = _SubLayer(c, "DenseReluDense", False, False, self.dtype, name="2" if self.causal else "1")(
            h, None, None, None, None, None, deterministic, False)
        return h + drop(y, deterministic=deterministic), position_bias


class _SubLayer(nn.Module):
    """layer/<j>: layer_norm + `kind` (SelfAttention, EncDecAttention or DenseReluDense), no residual."""
    config: Any
    kind: str
    has_relative_bias: bool
    causal: bool
    dtype: Any

    @nn.compact
    def __call__(self, h, key_mask, position_bias, memory, prefix, prefix_mask, deterministic, decode,
                 prefix_kv=None):
        c = self.config
        x = T5LayerNorm(c.d_model, c.layer_norm_epsilon, self.dtype, name="layer_norm")(h)
        if self.kind == "DenseReluDense":
            return T5DenseReluDense(c, self.dtype, name=self.kind)(x, deterministic), None
        attn = T5Attention(c, self.has_relative_bias, self.causal, self.dtype, name=self.kind)
        return attn(x, key_mask, position_bias, memory=memory, prefix=prefix, prefix_mask=prefix_mask,
                    prefix_kv=prefix_kv, deterministic=deterministic, decode=decode)


class _BlockSlot(nn.Module):
    """block/<i> (HF's FlaxT5LayerCollection): holds the block under the name 'layer'."""
    config: Any
    has_relative_bias: bool
    causal: bool
    dtype: Any

    @nn.compact
    def __call__(self, *args):
        return T5Block(self.config, self.has_relative_bias, self.causal, self.dtype, name="layer")(*args)


class _Blocks(nn.Module):
    """'block': the layers of one stack; block 0 owns the relative bias, later blocks reuse it."""
    config: Any
    num_layers: int
    causal: bool
    dtype: Any

    @nn.compact
    def __call__(self, h, key_mask, memory, memory_mask, prefix_states, prefix_mask, deterministic, decode,
                 prefix_kv=None):
        position_bias = None
        for i in range(self.num_layers):
            prefix = None if prefix_states is None else prefix_states[:, i].astype(self.dtype)
            layer_kv = None if prefix_kv is None else prefix_kv[:, i].astype(self.dtype)
            h, position_bias = _BlockSlot(self.config, i == 0, self.causal, self.dtype, name=str(i))(
                h, key_mask, position_bias, memory, memory_mask, prefix, prefix_mask, deterministic, decode,
                layer_kv)
        return h


class T5Stack(nn.Module):
    """Encoder (causal=False) or decoder (causal=True) stack from input embeddings to the final norm."""
    config: Any
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embeds: Array, key_mask: Array | None, memory: Array | None = None,
                 memory_mask: Array | None = None, prefix_states: Array | None = None,
                 prefix_mask: Array | None = None, deterministic: bool = True, decode: bool = False,
                 prefix_kv: Array | None = None) -> Array:
        c = self.config
        n = c.num_decoder_layers if self.causal else c.num_layers
        drop = Dropout(c.dropout_rate)
        h = drop(embeds, deterministic=deterministic)
        h = _Blocks(c, n, self.causal, self.dtype, name="block")(
            h, key_mask, memory, memory_mask, prefix_states, prefix_mask, deterministic, decode, prefix_kv)
        h = T5LayerNorm(c.d_model, c.layer_norm_epsilon, self.dtype, name="final_layer_norm")(h)
        return drop(h, deterministic=deterministic)


class _LMHead(nn.Module):
    """Separate (untied) LM head: 'kernel' [D, V], no bias; float32 accumulation."""
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array) -> Array:
        c = self.config
        kernel = self.param("kernel", _normal(c.initializer_factor), (c.d_model, c.vocab_size), jnp.float32)
        return jnp.einsum("btd,dv->btv", h, kernel.astype(self.dtype), preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------ the model
class T5ForConditionalGeneration(Seq2SeqProperties, nn.Module):
    """T5 LM (HF `T5ForConditionalGeneration`), HF Flax parameter names.

    Attributes:
      config: a transformers T5Config.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, layer norms and softmax run in
        float32, logits are float32.
    """
    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.shared = nn.Embed(c.vocab_size, c.d_model, embedding_init=_normal(c.initializer_factor),
                               dtype=self.dtype, param_dtype=jnp.float32)
        self.encoder = T5Stack(c, causal=False, dtype=self.dtype)
        self.decoder = T5Stack(c, causal=True, dtype=self.dtype)
        if separate_head(c):
            self.lm_head = _LMHead(c, dtype=self.dtype)

    # ------------------------------------------------------------------ properties
    _DECODER_LAYERS = "num_decoder_layers"
    _DECODER_HEADS = "num_heads"
    _DEFAULT_START = "pad_token_id"

    @property
    def decoder_head_dim(self) -> int:
        return int(self.config.d_kv)

    # ------------------------------------------------------------------ methods
    def encode(self, input_ids: Array, attention_mask: Array | None = None, *,
               deterministic: bool = True) -> Array:
        """Encoder hidden states [B, S, D] (after final_layer_norm, compute dtype).

        Args:
          input_ids: [B, S] int32.
          attention_mask: [B, S] {0,1}, or None (all tokens real).
          deterministic: disables dropout when True (else needs the 'dropout' rng).
        """
        return self.encoder(self.shared(input_ids), attention_mask, deterministic=deterministic)

    def lm_logits(self, hidden: Array) -> Array:
        """Decoder hidden [B, T, D] -> float32 logits [B, T, V] (rescale + tied embedding, or lm_head)."""
        hidden = hidden.astype(self.dtype)
        if separate_head(self.config):
            return self.lm_head(hidden)
        hidden = hidden * jnp.asarray(self.config.d_model ** -0.5, self.dtype)
        embedding = self.shared.embedding.astype(self.dtype)
        return jnp.einsum("btd,vd->btv", hidden, embedding, preferred_element_type=jnp.float32)

    def decode(self, decoder_input_ids: Array, decoder_attention_mask: Array | None = None,
               memory: Array | None = None, memory_mask: Array | None = None, *,
               prefix_states: Array | None = None, prefix_mask: Array | None = None,
               prefix_kv: Array | None = None, embed_offset: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
        """Decoder logits.

        Args:
          decoder_input_ids: [B, T] int32 ([B, 1] per step when decode=True).
          decoder_attention_mask: [B, T] {0,1} masking padded keys, or None; with decode=True, None or
            [B, max_length] over the cache slots.
          memory: cross-attention memory [B, M, D], or None to skip the EncDecAttention sub-layers.
          memory_mask: [B, M] {0,1}, or None (all visible).
          prefix_states: [B, L, P, D] extra self-attention key/value slots per decoder layer (hidden space,
            projected as they are by that layer's SelfAttention k / v, no layer norm), visible to every
            query, relative-position bias 0; or None.
          prefix_mask: [B, P] {0,1} for the prefix slots, or None.
          prefix_kv: [B, L, P, H, d_kv] per-layer self-attention slots already in head space, used as both
            key and value without the layer's projections: what Hugging Face's decoder receives as a length-P
            `past_key_values`. The slots are relative positions 0..P-1 and the tokens P, P+1, ... (with the
            learned relative bias between them); or None.
          embed_offset: [B, D] or [B, T, D] added to the token embeddings (before dropout), or None.
          deterministic: disables dropout when True (else needs the 'dropout' rng).
          decode: incremental decoding with the 'cache' collection (mutable=['cache']); the query position
            of the relative bias is the cache index.

        Returns:
          float32 logits [B, T, V].
        """
        embeds = self.shared(decoder_input_ids)
        if embed_offset is not None:
            offset = embed_offset if embed_offset.ndim == 3 else embed_offset[:, None, :]
            embeds = embeds + offset.astype(embeds.dtype)
        if memory is not None:
            memory = memory.astype(self.dtype)
        if prefix_kv is not None:
            c = self.config
            want = (c.num_decoder_layers, None, c.num_heads, c.d_kv)
            if prefix_kv.ndim != 5 or any(w is not None and w != g for w, g in zip(want, prefix_kv.shape[1:])):
                raise ValueError(f"prefix_kv must be [B, {c.num_decoder_layers}, P, {c.num_heads}, {c.d_kv}], "
                                 f"got {prefix_kv.shape}")
        hidden = self.decoder(embeds, decoder_attention_mask, memory, memory_mask, prefix_states, prefix_mask,
                              deterministic=deterministic, decode=decode, prefix_kv=prefix_kv)
        return self.lm_logits(hidden)

    def __call__(self, input_ids: Array, attention_mask: Array | None, decoder_input_ids: Array,
                 decoder_attention_mask: Array | None = None, *, deterministic: bool = True) -> Array:
        """Full seq2seq forward: float32 logits [B, T, V] (== HF T5ForConditionalGeneration logits)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        memory = self.encode(input_ids, attention_mask, deterministic=deterministic)
        return self.decode(decoder_input_ids, decoder_attention_mask, memory, attention_mask,
                           deterministic=deterministic)


# ---------------------------------------------------------------------------------- PyTorch -> Flax
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def torch_name_table(config) -> list[tuple[str, tuple[str, ...], bool, tuple[int, ...]]]:
    """Explicit PyTorch -> Flax name table for a T5Config (without the optional lm_head).

    Returns:
      [(torch name, flax path, transpose, expected torch shape)]. Linear weights [out, in] are transposed to
      Flax kernels [in, out]; embeddings and layer-norm weights are copied.
    """
    d, inner, ff, v = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
    gated, _ = _ffn_kind(config)
    table = [("shared.weight", ("shared", "embedding"), False, (v, d))]
    for stack, n_layers, causal in (("encoder", config.num_layers, False),
                                    ("decoder", config.num_decoder_layers, True)):
        for i in range(n_layers):
            tl, fl = f"{stack}.block.{i}.layer", (stack, "block", str(i), "layer")
            attns = [("0", "SelfAttention")] + ([("1", "EncDecAttention")] if causal else [])
            for j, attn in attns:
                for proj in "qkv":
                    table.append((f"{tl}.{j}.{attn}.{proj}.weight", fl + (j, attn, proj, "kernel"), True,
                                  (inner, d)))
                table.append((f"{tl}.{j}.{attn}.o.weight", fl + (j, attn, "o", "kernel"), True, (d, inner)))
                table.append((f"{tl}.{j}.layer_norm.weight", fl + (j, "layer_norm", "weight"), False, (d,)))
            if i == 0:
                table.append((f"{tl}.0.SelfAttention.relative_attention_bias.weight",
                              fl + ("0", "SelfAttention", "relative_attention_bias", "embedding"), False,
                              (config.relative_attention_num_buckets, config.num_heads)))
            j = "2" if causal else "1"
            for w in ("wi_0", "wi_1") if gated else ("wi",):
                table.append((f"{tl}.{j}.DenseReluDense.{w}.weight", fl + (j, "DenseReluDense", w, "kernel"),
                              True, (ff, d)))
            table.append((f"{tl}.{j}.DenseReluDense.wo.weight", fl + (j, "DenseReluDense", "wo", "kernel"),
                          True, (d, ff)))
            table.append((f"{tl}.{j}.layer_norm.weight", fl + (j, "layer_norm", "weight"), False, (d,)))
        table.append((f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "weight"), False, (d,)))
    return table


def params_from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict:
    """Maps a PyTorch T5ForConditionalGeneration state dict to Flax params (float32 jax arrays).

    The tied embedding may be stored once as shared.weight (transformers 5) or duplicated as
    encoder/decoder.embed_tokens.weight (and lm_head.weight for tied T5), any of which may stand in for a
    missing shared.weight. For a separate-head config (`separate_head`), lm_head.weight becomes 'lm_head'
    (a copy of shared.weight when the file has none). The unused decoder EncDecAttention
    relative_attention_bias is ignored, as HF does.

    Args:
      state_dict: torch name -> numpy array (any float dtype).
      config: the T5Config.

    Returns:
      Nested params dict in the HF Flax layout.

    Raises:
      ValueError: listing every missing, unexpected and shape-mismatched tensor.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(".version") and k not in _IGNORED}
    untied = separate_head(config)
    aliases = _EMBED_ALIASES if untied else _EMBED_ALIASES + ("lm_head.weight",)
    if "shared.weight" not in sd:
        for alias in aliases:
            if alias in sd:
                sd["shared.weight"] = sd[alias]
                break
    table = torch_name_table(config)
    if untied:
        if "lm_head.weight" not in sd and "shared.weight" in sd:
            sd["lm_head.weight"] = sd["shared.weight"]
        table.append(("lm_head.weight", ("lm_head", "kernel"), True, (config.vocab_size, config.d_model)))
    params, used, missing, mismatched = apply_name_table(sd, table)
    expected = (config.vocab_size, config.d_model)
    for alias in aliases:  # duplicated tied copies: accept when the shape fits
        if alias in sd and alias not in used:
            used.add(alias)
            if tuple(np.shape(sd[alias])) != expected:
                mismatched.append(f"{alias}: got {tuple(np.shape(sd[alias]))}, expected {expected}")
            elif alias == "lm_head.weight" and not np.array_equal(sd[alias], sd["shared.weight"]):
                mismatched.append("lm_head.weight: differs from shared.weight, but the config ties the head")
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or mismatched:
        raise ValueError(mismatch_report("T5 PyTorch state dict does not match the config", missing,
                                         unexpected, mismatched))
    return params
