"""Family-neutral building blocks shared by the BART and T5 backbones.

Stable API (used by bart.py and t5.py):

Masks (boolean, True = may attend; converted to an additive bias only inside attention):
  * `padding_mask(mask)`: [B, K] {0,1} -> bool [B, 1, 1, K] (key padding).
  * `causal_mask(q_len, k_len=None, offset=0)`: -> bool [1, 1, Q, K]; key j visible to query i iff
      j <= i + offset.
  * `combine_masks(*masks)`: logical AND of broadcastable bool masks, None entries ignored (all None -> None).
  * `mask_to_bias(mask, dtype=jnp.float32)`: bool -> 0 where True, finfo(dtype).min where False (finite, so a
      fully masked row gives a uniform softmax instead of NaN; padded filler rows stay finite).

Activations:
  * `get_activation(name)`: Hugging Face `ACT2FN` names -> jax function ("gelu" = exact erf GELU,
      "gelu_new"/"gelu_pytorch_tanh" = tanh approximation, "relu", "silu"/"swish", "gelu_fast", "quick_gelu",
      "tanh", "sigmoid").

Incremental decoding:
  * `cache_position(module, num_new)`: inside a compact method, reads (and, once the cache exists, advances by
      `num_new`) an int32 counter `cache/cache_index` in `module`'s scope; returns the position of the first
      new token. Family stacks use it for position embeddings / relative-position bias in decode mode.
  * `init_cache(module, batch_size, max_length)`: zero 'cache' collection for `module.decode(...,
      decode=True)` (shapes from `jax.eval_shape` over `module.init`; works for any family module that follows
      the decode() contract `decode(ids, mask, memory, memory_mask, *, decode=...)`).

Checkpoint mapping:
  * `mismatch_report(title, missing, unexpected, mismatched) -> str`: the text of the ValueError raised by
      params_from_torch / the loader, listing every bad name.

Attention:
  * `MultiHeadAttention(num_heads, head_dim, out_features, use_bias=True, scale_query=True,
      names=("q_proj", "k_proj", "v_proj", "out_proj"), dropout_rate=0.0, kernel_init=..., q_kernel_init=None,
      o_kernel_init=None, dtype=jnp.float32, param_dtype=jnp.float32)`, called as
      `attn(x [B,Q,D], kv [B,K,D] or None, *, mask=None, causal=False, position_bias=None, prefix=None,
      prefix_mask=None, prefix_kv=None, decode=False, deterministic=True) -> [B, Q, out_features]` in `dtype`.
      - kv None -> self-attention on x; `causal=True` adds the causal mask (and, with decode=True, the
        cached-key mask), so callers only pass padding masks in `mask` (bool, broadcastable to [B,1,Q,K]).
      - scale_query: divide scores by sqrt(head_dim) (BART); False for T5.
      - position_bias: additive [B or 1, H, Q, K] (T5 relative bias); prefix slots get bias 0.
      - prefix [B, P, D]: hidden-space states projected by this layer's own k/v projections and prepended
        to the keys/values; every query sees them (no causal mask), except where prefix_mask [B, P] is 0.
      - prefix_kv [B, P, H, Dh]: slots already in head space, used as key and value as they are (what a
        length-P `past_key_values` cache holds); same visibility as `prefix`.
      - decode=True (self-attention only): keys/values of the new tokens are written into
        cache/cached_key, cache/cached_value [B, max_len, H, Dh] at cache/cache_index (then advanced); `mask`
        then refers to the max_len cache positions (e.g. [B,1,1,max_len]) or is None. During `init` (no cache
        yet) the call runs as ordinary full attention and creates the cache variables with the input's length.
      - softmax is always computed in float32; attention dropout uses the 'dropout' rng.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

__all__ = [
    "padding_mask", "causal_mask", "combine_masks", "mask_to_bias", "get_activation", "cache_position",
    "init_cache", "mismatch_report", "MultiHeadAttention",
]


# ----------------------------------------------------------------------------------------------- masks
def padding_mask(mask: Array) -> Array:
    """[B, K] {0,1} key mask -> bool [B, 1, 1, K]."""
    return (jnp.asarray(mask) > 0)[:, None, None, :]


def causal_mask(q_len: int, k_len: Optional[int] = None, offset: Any = 0) -> Array:
    """Bool [1, 1, Q, K]: key j visible to query i iff j <= i + offset (offset may be a traced scalar)."""
    k_len = q_len if k_len is None else k_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    k_pos = jnp.arange(k_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
    """Logical AND of broadcastable boolean masks; None entries are skipped (all None -> None)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = jnp.logical_and(out, m.astype(bool))
    return out


def mask_to_bias(mask: Array, dtype: Dtype = jnp.float32) -> Array:
    """Bool mask -> additive bias: 0 where True, the most negative finite `dtype` value where False."""
    return jnp.where(mask, jnp.array(0.0, dtype), jnp.array(jnp.finfo(dtype).min, dtype))


# ----------------------------------------------------------------------------------------- activations
def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Activation function for a Hugging Face `activation_function` / `dense_act_fn` name."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


# ------------------------------------------------------------------------------------------------ cache
def cache_position(module: nn.Module, num_new: int, name: str = "cache_index") -> Array:
    """Position of the first of `num_new` new tokens in incremental decoding (int32 scalar).

    Must be called from a compact method (or setup) of `module`. Creates `cache/<name>` (0) on first use
    (during `init`) and, when the cache already exists, advances it by `num_new`.
    """
    initialized = module.has_variable("cache", name)
    index = module.variable("cache", name, lambda: jnp.zeros((), jnp.int32))
    current = index.value
    if initialized:
        index.value = current + num_new
    return current


def init_cache(module: nn.Module, batch_size: int, max_length: int) -> Any:
    """Zero decoding cache for `module.decode(..., decode=True)` with room for `max_length` tokens.

    Args:
      module: a family seq2seq module (BartForConditionalGeneration / T5ForConditionalGeneration).
      batch_size: B.
      max_length: number of decoder positions the cache can hold.

    Returns:
      The 'cache' collection (pytree of zeros; every cache_index is 0).
    """
    ids = jnp.zeros((batch_size, max_length), jnp.int32)

    def _init():
        return module.init(jax.random.PRNGKey(0), ids, None, None, None, decode=True, method=module.decode)

    shapes = jax.eval_shape(_init)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def mismatch_report(title: str, missing: Sequence[str], unexpected: Sequence[str],
                    mismatched: Sequence[str]) -> str:
    """Multi-line message listing every missing / unexpected / shape-mismatched tensor name."""
    lines = [f"{title}:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            lines.append(f"  {label} ({len(items)}):")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def apply_name_table(state_dict: Mapping[str, Any], table) -> tuple[dict, set, list, list]:
    """Builds a Flax params tree from a PyTorch state dict through an explicit name table.

    Args:
      state_dict: PyTorch name -> array.
      table: iterable of ``(torch_name, flax_path_tuple, transpose, expected_torch_shape)``.

    Returns:
      ``(params, used_names, missing, mismatched)``; float32 arrays, Linear weights transposed to kernels.
    """
    used, missing, mismatched, params = set(), [], [], {}
    for tname, fpath, transpose, shape in table:
        if tname not in state_dict:
            missing.append(tname)
            continue
        used.add(tname)
        arr = np.asarray(state_dict[tname])
        if tuple(arr.shape) != tuple(shape):
            mismatched.append(f"{tname}: got {tuple(arr.shape)}, expected {tuple(shape)}")
            continue
        arr = arr.astype(np.float32)
        node = params
        for part in fpath[:-1]:
            node = node.setdefault(part, {})
        node[fpath[-1]] = jnp.asarray(arr.T if transpose else arr)
    return params, used, missing, mismatched


class Seq2SeqProperties:
    """The family-neutral properties every backbone exposes, read from its transformers ``config``.

    A family sets ``_DECODER_LAYERS`` / ``_DECODER_HEADS`` (the config fields counting decoder layers and
    heads) and ``_DEFAULT_START`` (the field used when ``decoder_start_token_id`` is unset).
    """

    _DECODER_LAYERS = "decoder_layers"
    _DECODER_HEADS = "decoder_attention_heads"
    _DEFAULT_START = "eos_token_id"

    @staticmethod
    def _int(value) -> int:
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    @property
    def d_model(self) -> int:
        return int(self.config.d_model)

    @property
    def num_decoder_layers(self) -> int:
        return int(getattr(self.config, self._DECODER_LAYERS))

    @property
    def num_decoder_heads(self) -> int:
        return int(getattr(self.config, self._DECODER_HEADS))

    @property
    def decoder_head_dim(self) -> int:
        """Per-head key / value size of decoder self-attention (the size of a ``prefix_kv`` slot)."""
        return self.d_model // self.num_decoder_heads

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def pad_token_id(self) -> int:
        return int(self.config.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return self._int(self.config.eos_token_id)

    @property
    def decoder_start_token_id(self) -> int:
        start = getattr(self.config, "decoder_start_token_id", None)
        return self._int(getattr(self.config, self._DEFAULT_START) if start is None else start)


class Dropout(nn.Module):
    """Inverted dropout drawing its keep mask from 16-bit random numbers (two per 32-bit draw).

    Same interface as ``nn.Dropout`` (``'dropout'`` rng stream). Halving the random bits matters on CPU, where
    generating one 32-bit number per activation is a large share of a training step. The keep probability is
    ``round((1 - rate) * 65536) / 65536`` (within 1e-5 of ``1 - rate``) and survivors are scaled by its
    inverse, so the expectation is exact.
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        threshold = int(round((1.0 - self.rate) * 65536))
        n = x.size
        words = jax.random.bits(self.make_rng("dropout"), ((n + 1) // 2,), jnp.uint32)
        halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(x.shape)
        keep = halves.astype(jnp.int32) < threshold
        return jnp.where(keep, x * (65536.0 / threshold), 0).astype(x.dtype)


# -------------------------------------------------------------------------------------------- attention
class MultiHeadAttention(nn.Module):
    """Multi-head attention with HF-style projection names, prefix slots, position bias and a decode cache.

    Attributes:
      num_heads: H.
      head_dim: per-head size Dh (inner size H * Dh may differ from the model size, as in T5).
      out_features: output size (d_model).
      use_bias: biases on the four projections (BART True, T5 False).
      scale_query: divide scores by sqrt(Dh) (BART True, T5 False).
      names: parameter names of the (query, key, value, output) projections.
      dropout_rate: dropout on the attention probabilities.
      kernel_init: initializer for the projections (q/o may be overridden).
      q_kernel_init / o_kernel_init: optional initializers for the query / output projections.
      dtype: compute dtype; param_dtype: parameter dtype.
    """
    num_heads: int
    head_dim: int
    out_features: int
    use_bias: bool = True
    scale_query: bool = True
    names: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj")
    dropout_rate: float = 0.0
    kernel_init: Callable = nn.initializers.normal(0.02)
    q_kernel_init: Optional[Callable] = None
    o_kernel_init: Optional[Callable] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _dense(self, features: int, name: str, init: Optional[Callable]) -> nn.Dense:
        return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=init or self.kernel_init, name=name)

    def _split(self, x: Array) -> Array:
        return x.reshape(x.shape[:2] + (self.num_heads, self.head_dim))

    @nn.compact
    def __call__(self, x: Array, kv: Optional[Array] = None, *, mask: Optional[Array] = None,
                 causal: bool = False, position_bias: Optional[Array] = None, prefix: Optional[Array] = None,
                 prefix_mask: Optional[Array] = None, prefix_kv: Optional[Array] = None, decode: bool = False,
                 deterministic: bool = True) -> Array:
        """Attends from x to kv (or to x itself), see the module docstring.

        Args:
          x: queries' hidden states [B, Q, D].
          kv: memory [B, K, D] for cross-attention, or None for self-attention.
          mask: bool mask broadcastable to [B, 1, Q, K] (key padding), or None.
          causal: apply the causal mask (self-attention of a decoder).
          position_bias: additive bias [B or 1, H, Q, K], or None.
          prefix: extra key/value slots in hidden space [B, P, D], or None.
          prefix_mask: [B, P] {0,1} for the prefix slots, or None (all visible).
          prefix_kv: extra slots already in head space [B, P, H, Dh], used as both key and value without
            this layer's projections (a length-P cache prefix); excludes `prefix`.
          decode: incremental decoding with the 'cache' collection (self-attention only).
          deterministic: disables dropout when True.

        Returns:
          [B, Q, out_features] in `dtype`.
        """
        q_name, k_name, v_name, o_name = self.names
        inner = self.num_heads * self.head_dim
        q_proj = self._dense(inner, q_name, self.q_kernel_init)
        k_proj = self._dense(inner, k_name, None)
        v_proj = self._dense(inner, v_name, None)
        o_proj = self._dense(self.out_features, o_name, self.o_kernel_init)

        source = x if kv is None else kv
        query = self._split(q_proj(x))
        key = self._split(k_proj(source))
        value = self._split(v_proj(source))
        q_len = query.shape[1]

        cached = False
        if decode:
            if kv is not None:
                raise ValueError("decode=True is only supported for self-attention")
            cached = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if cached:
                index = cache_index.value
                max_len = cached_key.value.shape[1]
                key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                                   (0, index, 0, 0))
                value = jax.lax.dynamic_update_slice(cached_value.value,
                                                     value.astype(cached_value.value.dtype), (0, index, 0, 0))
                cached_key.value, cached_value.value = key, value
                cache_index.value = index + q_len
                # key j (a cache slot) is visible to new query i iff j <= index + i: hides unfilled slots
                mask = combine_masks(mask, causal_mask(q_len, max_len, index))
        if causal and not cached:
            mask = combine_masks(mask, causal_mask(q_len, key.shape[1]))
        bias = None
        if position_bias is not None:
            bias = position_bias.astype(jnp.float32)

        if prefix is not None and prefix_kv is not None:
            raise ValueError("pass either prefix (hidden space) or prefix_kv (head space), not both")
        if prefix is not None or prefix_kv is not None:
            if prefix is not None:
                p_key = self._split(k_proj(prefix)).astype(key.dtype)
                p_value = self._split(v_proj(prefix)).astype(value.dtype)
            else:
                p_key, p_value = prefix_kv.astype(key.dtype), prefix_kv.astype(value.dtype)
            batch, num_slots = p_key.shape[0], p_key.shape[1]
            key = jnp.concatenate([p_key, key], axis=1)
            value = jnp.concatenate([p_value, value], axis=1)
            p_mask = (jnp.ones((batch, 1, q_len, num_slots), bool) if prefix_mask is None else
                      jnp.broadcast_to(padding_mask(prefix_mask), (batch, 1, q_len, num_slots)))
            if mask is not None:
                full = jnp.broadcast_to(mask, (batch, 1, q_len, key.shape[1] - num_slots))
                mask = jnp.concatenate([p_mask, full], axis=-1)
            elif prefix_mask is not None:
                mask = jnp.concatenate(
                    [p_mask, jnp.ones((batch, 1, q_len, key.shape[1] - num_slots), bool)], axis=-1)
            if bias is not None:
                pad = [(0, 0)] * (bias.ndim - 1) + [(num_slots, 0)]
                bias = jnp.pad(bias, pad)

        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key.astype(query.dtype),
                            preferred_element_type=jnp.float32)
        if self.scale_query:
            scores = scores / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores + mask_to_bias(mask, jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = Dropout(self.dropout_rate)(weights, deterministic=deterministic).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(self.dtype))
        out = out.reshape(out.shape[:2] + (inner,))
        return o_proj(out)
