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
a separate `lm_head` and no rescale. The module follows the flag; `t5_weights.params_from_torch` copies `shared` into
`lm_head` when a flag-False checkpoint stores no lm_head.weight (transformers 5 ties T5 heads on save).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_textvae.models.attention import (
    DEFAULT_ATTENTION,
    CrossMemory,
    LatentSlots,
    MultiHeadAttention,
    RelativePositionBias,
    check_attention,
    padding_mask,
    relative_position_bucket,
)
from flax_textvae.models.common import (
    Dropout,
    LMHead,
    LMHeadWeights,
    Seq2SeqProperties,
    get_activation,
    init_cache,
    tied_logits,
)

Array = jax.Array
_normal = jax.nn.initializers.normal

__all__ = [
    "T5ForConditionalGeneration",
    "relative_position_bucket",
    "separate_head",
    "init_cache",
]


# ----------------------------------------------------------------------------------------------- helpers
def ffn_kind(config) -> tuple[bool, str]:
    """(is_gated, activation name) from the config, as transformers derives them."""
    parts = config.feed_forward_proj.split("-")
    gated = getattr(config, "is_gated_act", parts[0] == "gated")
    act = getattr(config, "dense_act_fn", parts[-1])
    return gated, "gelu_new" if config.feed_forward_proj == "gated-gelu" else act


def separate_head(config) -> bool:
    """True for T5 v1.1-style checkpoints: own lm_head, decoder output not rescaled by d_model**-0.5."""
    return not bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))


def _attention(config, owns_bias: bool, causal: bool, dtype: Any, attention: str, name: str) -> MultiHeadAttention:
    """T5 attention: no biases, no query scaling, T5's initializers; the bias table where `owns_bias`."""
    c, f = config, config.initializer_factor
    bias = (
        RelativePositionBias(
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
            bidirectional=not causal,
            init_std=f * c.d_model**-0.5,
        )
        if owns_bias
        else None
    )
    return MultiHeadAttention(
        num_heads=c.num_heads,
        head_dim=c.d_kv,
        out_features=c.d_model,
        use_bias=False,
        scale_query=False,
        names=("q", "k", "v", "o"),
        dropout_rate=c.dropout_rate,
        kernel_init=_normal(f * c.d_model**-0.5),
        q_kernel_init=_normal(f * (c.d_model * c.d_kv) ** -0.5),
        o_kernel_init=_normal(f * (c.num_heads * c.d_kv) ** -0.5),
        relative_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        attention=attention,
        name=name,
    )


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


class T5DenseReluDense(nn.Module):
    """Feed-forward: wo(dropout(act(wi x))) or, gated (v1.1), wo(dropout(act(wi_0 x) * wi_1 x))."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        c = self.config
        gated, act = ffn_kind(c)
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        wi_init = _normal(c.initializer_factor * c.d_model**-0.5)
        if gated:
            h = get_activation(act)(dense(c.d_ff, kernel_init=wi_init, name="wi_0")(x))
            h = h * dense(c.d_ff, kernel_init=wi_init, name="wi_1")(x)
        else:
            h = get_activation(act)(dense(c.d_ff, kernel_init=wi_init, name="wi")(x))
        h = Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return dense(c.d_model, kernel_init=_normal(c.initializer_factor * c.d_ff**-0.5), name="wo")(h)


class _AttentionSubLayer(nn.Module):
    """layer/<j>: layer_norm + `kind` (SelfAttention or EncDecAttention), no residual."""

    config: Any
    kind: str
    owns_bias: bool
    causal: bool
    dtype: Any
    attention: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(
        self,
        h: Array,
        kv: Array | None = None,
        *,
        mask: Array | None,
        position_bias: Array | None = None,
        slots: LatentSlots | None = None,
        deterministic: bool,
        decode: bool = False,
    ) -> tuple[Array, Array | None]:
        c = self.config
        x = T5LayerNorm(c.d_model, c.layer_norm_epsilon, self.dtype, name="layer_norm")(h)
        attn = _attention(c, self.owns_bias, self.causal, self.dtype, self.attention, self.kind)
        return attn(
            x,
            kv,
            mask=mask,
            causal=self.causal,
            position_bias=position_bias,
            slots=slots,
            decode=decode,
            deterministic=deterministic,
        )


class _FeedForwardSubLayer(nn.Module):
    """layer/<j>: layer_norm + DenseReluDense, no residual."""

    config: Any
    dtype: Any

    @nn.compact
    def __call__(self, h: Array, deterministic: bool) -> Array:
        c = self.config
        x = T5LayerNorm(c.d_model, c.layer_norm_epsilon, self.dtype, name="layer_norm")(h)
        return T5DenseReluDense(c, self.dtype, name="DenseReluDense")(x, deterministic)


class T5Block(nn.Module):
    """One block: self-attention, cross-attention (decoder, when memory is given), feed-forward.

    Arguments are positional (``deterministic`` and ``decode`` are arguments 6 and 7) so `nn.remat` can keep
    them static.
    """

    config: Any
    owns_bias: bool = False
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(
        self,
        h: Array,
        key_mask: Array | None,
        position_bias: Array | None,
        memory: CrossMemory | None,
        slots: LatentSlots,
        deterministic: bool,
        decode: bool,
    ) -> tuple[Array, Array | None]:
        c = self.config
        drop = Dropout(c.dropout_rate)
        y, position_bias = _AttentionSubLayer(
            c, "SelfAttention", self.owns_bias, self.causal, self.dtype, self.attention, name="0"
        )(h, mask=key_mask, position_bias=position_bias, slots=slots, deterministic=deterministic, decode=decode)
        h = h + drop(y, deterministic=deterministic)
        if self.causal and memory is not None:
            y, _ = _AttentionSubLayer(c, "EncDecAttention", False, False, self.dtype, self.attention, name="1")(
                h, memory.states, mask=memory.key_mask, deterministic=deterministic
            )
            h = h + drop(y, deterministic=deterministic)
        y = _FeedForwardSubLayer(c, self.dtype, name="2" if self.causal else "1")(h, deterministic)
        return h + drop(y, deterministic=deterministic), position_bias


class _BlockSlot(nn.Module):
    """block/<i> (HF's FlaxT5LayerCollection): holds the block under the name 'layer'.

    With ``remat`` (and not ``decode``) the block's activations are recomputed in the backward pass.
    """

    config: Any
    owns_bias: bool
    causal: bool
    dtype: Any
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        h: Array,
        *,
        key_mask: Array | None,
        position_bias: Array | None,
        memory: CrossMemory | None,
        slots: LatentSlots,
        deterministic: bool,
        decode: bool,
    ) -> tuple[Array, Array | None]:
        block = nn.remat(T5Block, static_argnums=(6, 7)) if self.remat and not decode else T5Block
        return block(self.config, self.owns_bias, self.causal, self.dtype, self.attention, name="layer")(
            h, key_mask, position_bias, memory, slots, deterministic, decode
        )


class T5Stack(nn.Module):
    """Encoder (causal=False) or decoder (causal=True) stack from input embeddings to the final norm.

    Block 0 owns the relative-position bias table; the later blocks reuse the bias it computes.
    """

    config: Any
    causal: bool = False
    dtype: Any = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        embeds: Array,
        key_mask: Array | None,
        *,
        memory: CrossMemory | None = None,
        slots: LatentSlots | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Hidden states [B, T, D] (after final_layer_norm) for input embeddings [B, T, D].

        Args:
          embeds: [B, T, D] input embeddings.
          key_mask: [B, K] {0,1} self-attention key padding (K = T, or the cache length), or None.
          memory: the cross-attention memory (decoder only), or None.
          slots: the decoder's `LatentSlots` (layer axis first after the batch), or None.
          deterministic: disables dropout when True.
          decode: incremental decoding with the 'cache' collection.
        """
        c = self.config
        n = c.num_decoder_layers if self.causal else c.num_layers
        slots = LatentSlots() if slots is None else slots
        mask = None if key_mask is None else padding_mask(key_mask)
        drop = Dropout(c.dropout_rate)
        h = drop(embeds, deterministic=deterministic)
        blocks = _Blocks(c, n, self.causal, self.dtype, self.attention, self.remat, name="block")
        h = blocks(h, key_mask=mask, memory=memory, slots=slots, deterministic=deterministic, decode=decode)
        h = T5LayerNorm(c.d_model, c.layer_norm_epsilon, self.dtype, name="final_layer_norm")(h)
        return drop(h, deterministic=deterministic)


class _Blocks(nn.Module):
    """'block': the blocks '0', '1', ... of one stack; block 0 owns the relative bias, later blocks reuse it."""

    config: Any
    num_layers: int
    causal: bool
    dtype: Any
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        h: Array,
        *,
        key_mask: Array | None,
        memory: CrossMemory | None,
        slots: LatentSlots,
        deterministic: bool,
        decode: bool,
    ) -> Array:
        position_bias = None
        for i in range(self.num_layers):
            slot = _BlockSlot(self.config, i == 0, self.causal, self.dtype, self.attention, self.remat, name=str(i))
            h, position_bias = slot(
                h,
                key_mask=key_mask,
                position_bias=position_bias,
                memory=memory,
                slots=slots.layer(i),
                deterministic=deterministic,
                decode=decode,
            )
        return h


# ------------------------------------------------------------------------------------------ the model
class T5ForConditionalGeneration(Seq2SeqProperties, nn.Module):
    """T5 LM (HF `T5ForConditionalGeneration`), HF Flax parameter names.

    Attributes:
      config: a transformers T5Config.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, layer norms and softmax run in
        float32, logits are float32.
      attention: the attention implementation, 'explicit' or 'dot_product' (see `attention.py`).
      remat: recompute each block's activations in the backward pass (less memory, more compute); no effect
        on values or gradients.
    """

    config: Any
    dtype: Any = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    def setup(self):
        c = self.config
        options = dict(dtype=self.dtype, attention=check_attention(self.attention), remat=self.remat)
        self.shared = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=_normal(c.initializer_factor),
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        self.encoder = T5Stack(c, causal=False, **options)
        self.decoder = T5Stack(c, causal=True, **options)
        if separate_head(c):
            self.lm_head = LMHead(c.vocab_size, _normal(c.initializer_factor), dtype=self.dtype)

    # ------------------------------------------------------------------ properties
    _DECODER_LAYERS = "num_decoder_layers"
    _DECODER_HEADS = "num_heads"
    _DEFAULT_START = "pad_token_id"

    @property
    def decoder_head_dim(self) -> int:
        return int(self.config.d_kv)

    # ------------------------------------------------------------------ methods
    def encode(self, input_ids: Array, attention_mask: Array | None = None, *, deterministic: bool = True) -> Array:
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
        hidden = hidden * jnp.asarray(self.config.d_model**-0.5, self.dtype)
        return tied_logits(hidden, self.shared.embedding, self.dtype)

    def decode(
        self,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
        memory: Array | None = None,
        memory_mask: Array | None = None,
        *,
        prefix_states: Array | None = None,
        prefix_mask: Array | None = None,
        prefix_kv: Array | None = None,
        embed_offset: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
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
        return self.lm_logits(
            self.decode_hidden(
                decoder_input_ids,
                decoder_attention_mask,
                memory,
                memory_mask,
                prefix_states=prefix_states,
                prefix_mask=prefix_mask,
                prefix_kv=prefix_kv,
                embed_offset=embed_offset,
                deterministic=deterministic,
                decode=decode,
            )
        )

    def decode_hidden(
        self,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
        memory: Array | None = None,
        memory_mask: Array | None = None,
        *,
        prefix_states: Array | None = None,
        prefix_mask: Array | None = None,
        prefix_kv: Array | None = None,
        embed_offset: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """The decoder's final hidden states [B, T, D] (compute dtype), what `decode` feeds to `lm_logits`.

        Arguments as `decode`.
        """
        embeds = self.shared(decoder_input_ids)
        if embed_offset is not None:
            offset = embed_offset if embed_offset.ndim == 3 else embed_offset[:, None, :]
            embeds = embeds + offset.astype(embeds.dtype)
        slots = LatentSlots(states=prefix_states, kv=prefix_kv, mask=prefix_mask).check(
            self.num_decoder_layers, self.d_model, self.num_decoder_heads, self.decoder_head_dim
        )
        cross = None if memory is None else CrossMemory(memory.astype(self.dtype), memory_mask)
        return self.decoder(
            embeds,
            decoder_attention_mask,
            memory=cross,
            slots=slots.astype(self.dtype),
            deterministic=deterministic,
            decode=decode,
        )

    def lm_head_weights(self) -> LMHeadWeights:
        """The head `lm_logits` applies: lm_head kernel [D, V], or the shared embedding [V, D] after d_model**-0.5."""
        if separate_head(self.config):
            return LMHeadWeights(head=self.lm_head.variables["params"]["kernel"], layout="dv")
        return LMHeadWeights(head=self.shared.embedding, layout="vd", scale=float(self.config.d_model) ** -0.5)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Full seq2seq forward: float32 logits [B, T, V] (== HF T5ForConditionalGeneration logits)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        memory = self.encode(input_ids, attention_mask, deterministic=deterministic)
        return self.decode(
            decoder_input_ids, decoder_attention_mask, memory, attention_mask, deterministic=deterministic
        )
