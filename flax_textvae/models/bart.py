"""BART sequence-to-sequence LM in Flax linen, numerically equal to HF `BartForConditionalGeneration`.

The parameter tree is the Hugging Face Flax layout (what transformers 4.x `FlaxBartForConditionalGeneration`
wrote to flax_model.msgpack):

    {'model': {'shared': {'embedding': [V, D]},
               'encoder': {'embed_positions': {'embedding': [P + 2, D]}, 'layernorm_embedding': {scale, bias},
                           'layers': {'0': {'self_attn': {q_proj, k_proj, v_proj, out_proj},
                                            'self_attn_layer_norm', 'fc1', 'fc2', 'final_layer_norm'}, ...}},
               'decoder': {... as encoder, layers also have 'encoder_attn', 'encoder_attn_layer_norm'}},
     'final_logits_bias': [1, V],
     'lm_head': {'kernel': [D, V]}}          # only when config.tie_word_embeddings is False

Public API:
  * `BartForConditionalGeneration(config, dtype=jnp.float32, attention=DEFAULT_ATTENTION, remat=False)` with
    methods `__call__`, `encode`, `decode`, `decode_hidden`, `lm_logits`, `lm_head_weights` and properties
    `d_model`, `num_decoder_layers`, `vocab_size`, `pad_token_id`, `eos_token_id`, `decoder_start_token_id`
    (attention.py holds the attention, masks and KV cache).
  * The PyTorch -> Flax weight table (`params_from_torch`, `torch_name_table`) is in bart_weights.py.
  * `init_cache(module, batch_size, max_length)` (re-exported from common).

Not implemented (training-time only in HF): LayerDrop (encoder_layerdrop / decoder_layerdrop).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_textvae.models.attention import (
    DEFAULT_ATTENTION,
    CrossMemory,
    LatentSlots,
    MultiHeadAttention,
    cache_position,
    check_attention,
    padding_mask,
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
Dtype = Any
POSITION_OFFSET = 2  # BART's learned positions are looked up at position + 2
LN_EPS = 1e-5

__all__ = ["BartForConditionalGeneration", "POSITION_OFFSET", "init_cache"]


def _init(config) -> Any:
    return nn.initializers.normal(config.init_std)


def _attention(config, num_heads: int, dtype: Dtype, attention: str, name: str) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads=num_heads,
        head_dim=config.d_model // num_heads,
        out_features=config.d_model,
        use_bias=True,
        scale_query=True,
        dropout_rate=config.attention_dropout,
        kernel_init=_init(config),
        dtype=dtype,
        attention=attention,
        name=name,
    )


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


def _feed_forward(config, ffn_dim: int, dtype: Dtype, x: Array, deterministic: bool) -> Array:
    """fc1 -> activation -> activation dropout -> fc2; call inside a compact method (parameters land there)."""
    h = nn.Dense(ffn_dim, dtype=dtype, kernel_init=_init(config), name="fc1")(x)
    h = get_activation(config.activation_function)(h)
    h = Dropout(config.activation_dropout)(h, deterministic=deterministic)
    return nn.Dense(config.d_model, dtype=dtype, kernel_init=_init(config), name="fc2")(h)


class BartEncoderLayer(nn.Module):
    """Post-LN encoder layer: self-attention, then feed-forward; [B, S, D] -> [B, S, D].

    Arguments are positional (``deterministic`` is argument 3) so `nn.remat` can keep it static.
    """

    config: Any
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array], deterministic: bool) -> Array:
        cfg = self.config
        drop = Dropout(cfg.dropout)
        h, _ = _attention(cfg, cfg.encoder_attention_heads, self.dtype, self.attention, "self_attn")(
            x, mask=mask, deterministic=deterministic
        )
        x = _layer_norm(self.dtype, "self_attn_layer_norm")(x + drop(h, deterministic=deterministic))
        h = _feed_forward(cfg, cfg.encoder_ffn_dim, self.dtype, x, deterministic)
        return _layer_norm(self.dtype, "final_layer_norm")(x + drop(h, deterministic=deterministic))


class BartDecoderLayer(nn.Module):
    """Post-LN decoder layer: causal self-attention (+ latent slots), cross-attention (if memory), FFN.

    Arguments are positional (``deterministic`` and ``decode`` are arguments 5 and 6) so `nn.remat` can keep
    them static.
    """

    config: Any
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(
        self,
        x: Array,
        self_mask: Optional[Array],
        memory: Optional[CrossMemory],
        slots: LatentSlots,
        deterministic: bool,
        decode: bool,
    ) -> Array:
        cfg = self.config
        drop = Dropout(cfg.dropout)
        h, _ = _attention(cfg, cfg.decoder_attention_heads, self.dtype, self.attention, "self_attn")(
            x, mask=self_mask, causal=True, slots=slots, decode=decode, deterministic=deterministic
        )
        x = _layer_norm(self.dtype, "self_attn_layer_norm")(x + drop(h, deterministic=deterministic))
        if memory is not None:
            h, _ = _attention(cfg, cfg.decoder_attention_heads, self.dtype, self.attention, "encoder_attn")(
                x, memory.states, mask=memory.key_mask, deterministic=deterministic
            )
            x = _layer_norm(self.dtype, "encoder_attn_layer_norm")(x + drop(h, deterministic=deterministic))
        h = _feed_forward(cfg, cfg.decoder_ffn_dim, self.dtype, x, deterministic)
        return _layer_norm(self.dtype, "final_layer_norm")(x + drop(h, deterministic=deterministic))


class _EncoderLayers(nn.Module):
    """The 'layers' scope holding encoder layers '0', '1', ... (HF Flax layer-collection naming).

    With ``remat`` each layer's activations are recomputed in the backward pass instead of kept.
    """

    config: Any
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, *, mask: Optional[Array], deterministic: bool) -> Array:
        layer = nn.remat(BartEncoderLayer, static_argnums=(3,)) if self.remat else BartEncoderLayer
        for i in range(self.config.encoder_layers):
            x = layer(self.config, self.dtype, self.attention, name=str(i))(x, mask, deterministic)
        return x


class _DecoderLayers(nn.Module):
    """The 'layers' scope holding decoder layers '0', '1', ...; the latent slots are split per layer.

    With ``remat`` (and not ``decode``) each layer's activations are recomputed in the backward pass.
    """

    config: Any
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        self_mask: Optional[Array],
        memory: Optional[CrossMemory],
        slots: LatentSlots,
        deterministic: bool,
        decode: bool,
    ) -> Array:
        remat = self.remat and not decode
        layer = nn.remat(BartDecoderLayer, static_argnums=(5, 6)) if remat else BartDecoderLayer
        for i in range(self.config.decoder_layers):
            x = layer(self.config, self.dtype, self.attention, name=str(i))(
                x, self_mask, memory, slots.layer(i), deterministic, decode
            )
        return x


def _embed(module: nn.Module, embed_tokens: nn.Embed, ids: Array, offset: Optional[Array]) -> Array:
    """Token embedding * embed_scale (+ offset), in the module's compute dtype."""
    cfg = module.config
    scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
    x = embed_tokens(ids).astype(module.dtype) * jnp.asarray(scale, module.dtype)
    if offset is not None:
        offset = offset.astype(module.dtype)
        x = x + (offset[:, None, :] if offset.ndim == 2 else offset)
    return x


def _positions_and_norm(module: nn.Module, x: Array, start: Any, deterministic: bool) -> Array:
    """Adds learned positions (start + t + 2), layernorm_embedding, dropout."""
    cfg = module.config
    positions = start + jnp.arange(x.shape[1]) + POSITION_OFFSET
    pos_table = nn.Embed(
        cfg.max_position_embeddings + POSITION_OFFSET,
        cfg.d_model,
        dtype=module.dtype,
        embedding_init=_init(cfg),
        name="embed_positions",
    )
    x = x + pos_table(positions)[None].astype(module.dtype)
    x = _layer_norm(module.dtype, "layernorm_embedding")(x)
    return Dropout(cfg.dropout)(x, deterministic=deterministic)


class BartEncoder(nn.Module):
    """Embeddings + encoder layers; ids [B, S] -> hidden [B, S, D]."""

    config: Any
    embed_tokens: nn.Embed
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array], deterministic: bool = True) -> Array:
        x = _embed(self, self.embed_tokens, input_ids, None)
        x = _positions_and_norm(self, x, 0, deterministic)
        mask = None if attention_mask is None else padding_mask(attention_mask)
        layers = _EncoderLayers(self.config, self.dtype, self.attention, self.remat, name="layers")
        return layers(x, mask=mask, deterministic=deterministic)


class BartDecoder(nn.Module):
    """Embeddings + decoder layers; ids [B, T] -> hidden [B, T, D] (see BartForConditionalGeneration.decode)."""

    config: Any
    embed_tokens: nn.Embed
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        ids: Array,
        mask: Optional[Array],
        *,
        memory: Optional[CrossMemory],
        slots: LatentSlots,
        embed_offset: Optional[Array],
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        x = _embed(self, self.embed_tokens, ids, embed_offset)
        start = cache_position(self, ids.shape[1]) if decode else 0
        # Head-space slots stand where a length-P cache would: the tokens take positions P, P+1, ...
        x = _positions_and_norm(self, x, start + slots.num_positioned, deterministic)
        self_mask = None if mask is None else padding_mask(mask)
        return _DecoderLayers(self.config, self.dtype, self.attention, self.remat, name="layers")(
            x, self_mask=self_mask, memory=memory, slots=slots, deterministic=deterministic, decode=decode
        )


class BartModel(nn.Module):
    """The 'model' scope: shared embedding, encoder, decoder."""

    config: Any
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    def setup(self):
        cfg = self.config
        options = dict(dtype=self.dtype, attention=self.attention, remat=self.remat)
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, embedding_init=_init(cfg))
        self.encoder = BartEncoder(cfg, embed_tokens=self.shared, **options)
        self.decoder = BartDecoder(cfg, embed_tokens=self.shared, **options)

    def __call__(self, *args, **kwargs):  # pragma: no cover - the top module calls encoder/decoder directly
        raise NotImplementedError


class BartForConditionalGeneration(Seq2SeqProperties, nn.Module):
    """BART LM (HF `BartForConditionalGeneration`), HF Flax parameter names.

    Attributes:
      config: a transformers BartConfig.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, logits are float32.
      attention: the attention implementation, 'explicit' or 'dot_product' (see `attention.py`).
      remat: recompute each encoder / decoder layer's activations in the backward pass (less memory, more
        compute); no effect on values or gradients.
    """

    config: Any
    dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.model = BartModel(cfg, dtype=self.dtype, attention=check_attention(self.attention), remat=self.remat)
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (1, cfg.vocab_size))
        if not self.tied:
            self.lm_head = LMHead(cfg.vocab_size, _init(cfg), dtype=self.dtype)

    # ------------------------------------------------------------------ properties
    _DECODER_LAYERS = "decoder_layers"
    _DEFAULT_START = "eos_token_id"

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", True))

    # ------------------------------------------------------------------ methods
    def encode(self, input_ids: Array, attention_mask: Optional[Array] = None, *, deterministic: bool = True) -> Array:
        """Encoder hidden states [B, S, D] (compute dtype) for ids [B, S] and mask [B, S] {0,1}."""
        return self.model.encoder(input_ids, attention_mask, deterministic=deterministic)

    def lm_logits(self, hidden: Array) -> Array:
        """Decoder hidden [B, T, D] -> float32 logits [B, T, V] (tied or untied head + final_logits_bias)."""
        hidden = hidden.astype(self.dtype)
        if self.tied:
            logits = tied_logits(hidden, self.model.shared.embedding, self.dtype)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32) + self.final_logits_bias.astype(jnp.float32)

    def decode(
        self,
        decoder_input_ids: Array,
        decoder_attention_mask: Optional[Array] = None,
        memory: Optional[Array] = None,
        memory_mask: Optional[Array] = None,
        *,
        prefix_states: Optional[Array] = None,
        prefix_mask: Optional[Array] = None,
        prefix_kv: Optional[Array] = None,
        embed_offset: Optional[Array] = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """Decoder logits.

        Args:
          decoder_input_ids: [B, T] int32 ([B, 1] per step when decode=True).
          decoder_attention_mask: [B, T] {0,1} masking padded keys, or None; with decode=True, None or
            [B, max_length] over the cache slots.
          memory: cross-attention memory [B, M, D], or None to skip the cross-attention sub-layers.
          memory_mask: [B, M] {0,1}, or None (all visible).
          prefix_states: [B, L, P, D] extra self-attention key/value slots per decoder layer (hidden space,
            projected by that layer's k_proj / v_proj), visible to every query; or None.
          prefix_mask: [B, P] {0,1} for the prefix slots, or None.
          prefix_kv: [B, L, P, H, Dh] per-layer self-attention slots already in head space, used as both key
            and value without the layer's projections: what Hugging Face's decoder receives as a length-P
            `past_key_values`. The slots take decoder positions 0..P-1 and the tokens P, P+1, ...; or None.
          embed_offset: [B, D] or [B, T, D] added to the scaled token embeddings (before positions), or None.
          deterministic: disables dropout when True (else needs the 'dropout' rng).
          decode: incremental decoding with the 'cache' collection (mutable=['cache']); positions continue
            from the cache index.

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
        decoder_attention_mask: Optional[Array] = None,
        memory: Optional[Array] = None,
        memory_mask: Optional[Array] = None,
        *,
        prefix_states: Optional[Array] = None,
        prefix_mask: Optional[Array] = None,
        prefix_kv: Optional[Array] = None,
        embed_offset: Optional[Array] = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        """The decoder's final hidden states [B, T, D] (compute dtype), what `decode` feeds to `lm_logits`.

        Arguments as `decode`.
        """
        slots = LatentSlots(states=prefix_states, kv=prefix_kv, mask=prefix_mask).check(
            self.num_decoder_layers, self.d_model, self.num_decoder_heads, self.decoder_head_dim
        )
        cross = None if memory is None else CrossMemory(memory.astype(self.dtype), memory_mask)
        return self.model.decoder(
            decoder_input_ids,
            decoder_attention_mask,
            memory=cross,
            slots=slots.astype(self.dtype),
            embed_offset=embed_offset,
            deterministic=deterministic,
            decode=decode,
        )

    def lm_head_weights(self) -> LMHeadWeights:
        """The head `lm_logits` applies: the shared embedding [V, D] or lm_head kernel [D, V], final_logits_bias."""
        bias = self.final_logits_bias.reshape(-1)
        if self.tied:
            return LMHeadWeights(head=self.model.shared.embedding, bias=bias, layout="vd")
        return LMHeadWeights(head=self.lm_head.variables["params"]["kernel"], bias=bias, layout="dv")

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array],
        decoder_input_ids: Array,
        decoder_attention_mask: Optional[Array] = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Full seq2seq forward: float32 logits [B, T, V] (== HF BartForConditionalGeneration logits)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        memory = self.encode(input_ids, attention_mask, deterministic=deterministic)
        return self.decode(
            decoder_input_ids, decoder_attention_mask, memory, attention_mask, deterministic=deterministic
        )
