"""The one attention implementation of the BART and T5 backbones: masks, latent slots, KV cache, biases.

Masks are boolean (True = may attend) and become an additive bias only inside attention:
  * `padding_mask(mask)`: [B, K] {0,1} -> bool [B, 1, 1, K] (key padding).
  * `causal_mask(q_len, k_len=None, offset=0)`: -> bool [1, 1, Q, K]; key j visible to query i iff
      j <= i + offset.
  * `combine_masks(*masks)`: logical AND of broadcastable bool masks, None entries ignored (all None -> None).
  * `mask_to_bias(mask, dtype=jnp.float32)`: bool -> 0 where True, finfo(dtype).min where False (finite, so a
      fully masked row gives a uniform softmax instead of NaN; padded filler rows stay finite).

What the decoder attends to besides its own tokens:
  * `LatentSlots(states, kv, mask)`: extra self-attention key/value slots (how the VAE injects z), either in
      hidden space (`states`, projected by each layer's own key/value projections, no position) or in head
      space (`kv`, used as key and value as they are: a length-P cache prefix occupying positions 0..P-1).
  * `CrossMemory(states, mask)`: the cross-attention memory (encoder states or slots projected from z).

Incremental decoding:
  * `cache_position(module, num_new)`: reads (and, once the cache exists, advances by `num_new`) an int32
      counter `cache/cache_index` in `module`'s scope; returns the position of the first new token.
  * `MultiHeadAttention(..., decode=True)` keeps `cache/cached_key`, `cache/cached_value` [B, max_len, H, Dh]
      and `cache/cache_index`; `common.init_cache` builds the zero cache of a whole model.

Implementations (`MultiHeadAttention.attention`, one of `ATTENTION_IMPLEMENTATIONS`, default
`DEFAULT_ATTENTION`):
  * 'explicit': the scores, the additive mask / bias, the float32 softmax and the weighted sum written out
      here; the reference, and the only path that applies attention dropout.
  * 'dot_product': `jax.nn.dot_product_attention` (implementation=None: jax chooses; jax 0.10 always takes its
      XLA formulation) with the same boolean mask and float32 bias; used whenever no attention dropout is drawn
      (deterministic calls or dropout_rate 0), the explicit path otherwise. Equal to 'explicit' within float
      rounding; for a query that sees no key at all (only filler rows) both give the values' uniform average,
      but only the explicit path passes a gradient back into its masked scores.
  * 'cudnn': cuDNN flash attention on a CUDA GPU (`cudnn_attention`: `jax.nn.dot_product_attention` with
      implementation='cudnn'), in the bfloat16 / float16 compute dtype it requires; the mask and bias are
      folded into one additive bias of full [.., Q, K] shape and odd lengths padded to even ones, as the
      kernel's training path needs. Incremental decoding (a cache) and drawn attention dropout take the
      'dot_product' / explicit paths. Checked against 'explicit' by `benchmarks/attention.py` on a GPU; where
      `cudnn_available()` is False `resolve_attention` maps it to 'dot_product' for evaluation and inference.
      A query that sees no key at all (a filler row) gets a softmax-weighted average of the values rather than
      the uniform one; no loss reads such rows.

Relative positions (T5):
  * `relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)`.
  * `RelativePositionBias(num_buckets, max_distance, bidirectional, init_std)`: the option that gives a
      `MultiHeadAttention` its own bias table (`relative_attention_bias/embedding` [buckets, H]).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flax_textvae.models.common import Dropout

Array = jax.Array
Dtype = Any

__all__ = [
    "padding_mask",
    "causal_mask",
    "combine_masks",
    "mask_to_bias",
    "cache_position",
    "LatentSlots",
    "CrossMemory",
    "RelativePositionBias",
    "relative_position_bucket",
    "MultiHeadAttention",
    "ATTENTION_IMPLEMENTATIONS",
    "DEFAULT_ATTENTION",
    "check_attention",
    "resolve_attention",
    "cudnn_available",
    "cudnn_attention",
]

ATTENTION_IMPLEMENTATIONS = ("explicit", "dot_product", "cudnn")
# The fused kernel's compute dtypes.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# The additive bias of a masked score on the cuDNN path: large enough to vanish in the softmax, small enough
# that the kernel's sums stay finite in bfloat16 / float16 (the most negative finite value would not). A visible
# score with a bias below it would rank under masked ones; no bias of the library comes near it.
_CUDNN_MASKED = -(2.0**14)
# Head sizes the fused kernel takes (a multiple of 8, at most 128; 256 from Hopper on).
_CUDNN_HEAD_DIM_MULTIPLE, _CUDNN_MAX_HEAD_DIM = 8, 256
# The default: equal in value to the explicit path and as fast on XLA:CPU (benchmarks/RESULTS.md), and the
# entry point through which jax hands attention to a fused kernel on backends that have one.
DEFAULT_ATTENTION = "dot_product"


def check_attention(name: str) -> str:
    """Returns ``name`` if it is one of `ATTENTION_IMPLEMENTATIONS`; raises ValueError otherwise."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    return name


def cudnn_available(device: Any = None) -> bool:
    """True where ``device`` (default: jax's first) is a CUDA GPU of compute capability 8.0 or newer, the
    devices cuDNN's flash attention runs on (not a CPU, a TPU or a ROCm GPU)."""
    device = jax.devices()[0] if device is None else device
    if device.platform != "gpu" or "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return False
    try:
        return tuple(int(x) for x in str(device.compute_capability).split(".")) >= (8, 0)
    except (AttributeError, ValueError):
        return False


def resolve_attention(name: str, cudnn: bool | None = None) -> str:
    """The implementation to build: 'cudnn' becomes 'dot_product' where cuDNN attention cannot run (``cudnn``,
    default `cudnn_available()`), so a run trained with it is evaluated or loaded anywhere; the others are
    returned as they are. Raises ValueError for an unknown name."""
    check_attention(name)
    if name != "cudnn":
        return name
    return "cudnn" if (cudnn_available() if cudnn is None else cudnn) else "dot_product"


def cudnn_attention(
    query: Array, key: Array, value: Array, *, mask: Optional[Array], bias: Optional[Array], scale: float
) -> Array:
    """Attention through cuDNN's fused kernel, for shapes its training path takes.

    The kernel wants one additive bias of the scores' full length on both axes and, with a bias in training,
    even query and key lengths. So the boolean ``mask`` and the float ``bias`` become one bias in the query's
    dtype (masked scores at a large finite negative value), an odd key length gets one more key that no query
    sees, and an odd query length one more query whose output is dropped. Equal to the unpadded attention up
    to the bias's rounding to the compute dtype.

    Args:
      query: [B, Q, H, Dh] in bfloat16 or float16 (cuDNN refuses float32).
      key, value: [B, K, H, Dh].
      mask: bool, broadcastable to [B, 1, Q, K]: True where the key is visible; or None.
      bias: float, broadcastable to [B, H, Q, K]; or None.
      scale: multiplier of the scores.

    Returns:
      [B, Q, H, Dh] in the query's dtype.
    """
    q_len, k_len = query.shape[1], key.shape[1]
    add = jnp.zeros((1, 1, q_len, k_len), jnp.float32)
    if bias is not None:
        add = add + bias.astype(jnp.float32)
    if mask is not None:
        add = jnp.where(mask, add, _CUDNN_MASKED)
    pad_q, pad_k = q_len % 2, k_len % 2
    if pad_k:
        key = jnp.pad(key, ((0, 0), (0, 1), (0, 0), (0, 0)))
        value = jnp.pad(value, ((0, 0), (0, 1), (0, 0), (0, 0)))
        add = jnp.pad(add, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=_CUDNN_MASKED)
    if pad_q:
        query = jnp.pad(query, ((0, 0), (0, 1), (0, 0), (0, 0)))
        add = jnp.pad(add, ((0, 0), (0, 0), (0, 1), (0, 0)))
    add = jnp.broadcast_to(add, add.shape[:2] + (q_len + pad_q, k_len + pad_k)).astype(query.dtype)
    out = jax.nn.dot_product_attention(
        query, key.astype(query.dtype), value.astype(query.dtype), bias=add, scale=scale, implementation="cudnn"
    )
    return out[:, :q_len]


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


# ------------------------------------------------------------------------------------- slots, memory
@flax.struct.dataclass
class LatentSlots:
    """Extra decoder self-attention key/value slots, visible to every query (never causal-masked).

    For a decoder stack the arrays carry a layer axis L (one slot set per layer); `layer(i)` gives the
    slots of layer i, the form `MultiHeadAttention` takes (shapes in brackets).

    Attributes:
      states: [B, L, P, D] ([B, P, D]) hidden-space slots, projected by the layer's own key / value
        projections; they have no position (relative bias 0), the tokens keep positions 0, 1, ...; or None.
      kv: [B, L, P, H, Dh] ([B, P, H, Dh]) head-space slots used as both key and value without any
        projection: a length-P cache prefix at positions 0..P-1, the tokens at P, P+1, ...; or None.
      mask: [B, P] {0,1} visibility of the slots, or None (all visible).
    """

    states: Optional[Array] = None
    kv: Optional[Array] = None
    mask: Optional[Array] = None

    @property
    def empty(self) -> bool:
        """True when there are no slots (a `mask` alone is ignored)."""
        return self.states is None and self.kv is None

    @property
    def num_positioned(self) -> int:
        """Number of positions the head-space slots occupy before the tokens (0 without `kv`)."""
        return 0 if self.kv is None else int(self.kv.shape[-3])

    def layer(self, index: int) -> "LatentSlots":
        """The slots of decoder layer `index` (layer axis removed)."""
        return LatentSlots(
            states=None if self.states is None else self.states[:, index],
            kv=None if self.kv is None else self.kv[:, index],
            mask=self.mask,
        )

    def astype(self, dtype: Dtype) -> "LatentSlots":
        """The slots cast to the compute dtype `dtype` (the mask unchanged)."""
        return LatentSlots(
            states=None if self.states is None else self.states.astype(dtype),
            kv=None if self.kv is None else self.kv.astype(dtype),
            mask=self.mask,
        )

    def check(self, num_layers: int, d_model: int, num_heads: int, head_dim: int) -> "LatentSlots":
        """Returns self after checking the stack-level shapes; raises ValueError naming the bad argument."""
        if self.states is not None and self.kv is not None:
            raise ValueError("pass either prefix_states (hidden space) or prefix_kv (head space), not both")
        if self.states is not None and (
            self.states.ndim != 4 or self.states.shape[1] != num_layers or self.states.shape[3] != d_model
        ):
            raise ValueError(f"prefix_states must be [B, {num_layers}, P, {d_model}], got {self.states.shape}")
        if self.kv is not None and (
            self.kv.ndim != 5 or self.kv.shape[1] != num_layers or self.kv.shape[3:] != (num_heads, head_dim)
        ):
            raise ValueError(f"prefix_kv must be [B, {num_layers}, P, {num_heads}, {head_dim}], got {self.kv.shape}")
        return self


@flax.struct.dataclass
class CrossMemory:
    """What cross-attention attends to.

    Attributes:
      states: [B, M, D] memory states (in the compute dtype).
      mask: [B, M] {0,1} key padding, or None (all visible).
    """

    states: Array
    mask: Optional[Array] = None

    @property
    def key_mask(self) -> Optional[Array]:
        """Bool [B, 1, 1, M] padding mask, or None."""
        return None if self.mask is None else padding_mask(self.mask)


# ----------------------------------------------------------------------------------- relative positions
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


def relative_position_bucket(
    relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's bucketing of relative positions (memory_position - query_position).

    Args:
      relative_position: int array of any shape.
      bidirectional: False for a causal decoder (positive offsets share bucket 0).
      num_buckets: number of buckets (`relative_attention_num_buckets`).
      max_distance: distance from which on all positions share the last bucket.

    Returns:
      int32 array of the same shape with values in [0, num_buckets).
    """
    table = jnp.asarray(_bucket_table(bool(bidirectional), int(num_buckets), int(max_distance)))
    return table[jnp.clip(relative_position, -max_distance, max_distance) + max_distance]


@dataclasses.dataclass(frozen=True)
class RelativePositionBias:
    """A learned bucketed relative-position bias, owned by the attention layer that computes it.

    Attributes:
      num_buckets: rows of the table `relative_attention_bias/embedding` [num_buckets, H].
      max_distance: see `relative_position_bucket`.
      bidirectional: True in an encoder, False in a causal decoder.
      init_std: standard deviation of the table's normal initialisation.
    """

    num_buckets: int
    max_distance: int
    bidirectional: bool
    init_std: float


def _prepend_slots(
    key: Array,
    value: Array,
    mask: Optional[Array],
    bias: Optional[Array],
    slot_key: Array,
    slot_value: Array,
    slot_mask: Optional[Array],
    q_len: int,
    bias_has_slots: bool,
) -> tuple[Array, Array, Optional[Array], Optional[Array]]:
    """Puts P slots before the K keys / values [B, K, H, Dh]; extends the mask and the bias to P + K keys.

    The slots are visible to every query except where `slot_mask` [B, P] is 0. A bias [.., Q, K] gets bias 0
    on the slots, unless `bias_has_slots` (it already spans the P + K positions).
    """
    batch, num_slots = slot_key.shape[0], slot_key.shape[1]
    key = jnp.concatenate([slot_key.astype(key.dtype), key], axis=1)
    value = jnp.concatenate([slot_value.astype(value.dtype), value], axis=1)
    num_keys = key.shape[1] - num_slots
    p_mask = (
        jnp.ones((batch, 1, q_len, num_slots), bool)
        if slot_mask is None
        else jnp.broadcast_to(padding_mask(slot_mask), (batch, 1, q_len, num_slots))
    )
    if mask is not None:
        mask = jnp.concatenate([p_mask, jnp.broadcast_to(mask, (batch, 1, q_len, num_keys))], axis=-1)
    elif slot_mask is not None:
        mask = jnp.concatenate([p_mask, jnp.ones((batch, 1, q_len, num_keys), bool)], axis=-1)
    if bias is not None and not bias_has_slots:
        bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(num_slots, 0)])
    return key, value, mask, bias


# ----------------------------------------------------------------------------------------------- cache
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


# -------------------------------------------------------------------------------------------- attention
class MultiHeadAttention(nn.Module):
    """Multi-head attention with configurable projections, latent slots, position bias and a decode cache.

    Called as `attn(x [B,Q,D], kv [B,K,D] or None, *, mask=None, causal=False, position_bias=None,
    slots=None, decode=False, deterministic=True) -> (out [B, Q, out_features], position_bias)`:
      * kv None -> self-attention on x; `causal=True` adds the causal mask (and, with decode=True, the
        cached-key mask), so callers pass only padding masks in `mask` (bool, broadcastable to [B,1,Q,K]).
      * position_bias: additive [B or 1, H, Q, K'] over the key positions (K' = P + K with head-space slots,
        which take positions 0..P-1; K otherwise, hidden-space slots getting bias 0). None and
        `relative_bias` set: this layer computes it from its own table. The bias used is returned (without
        the zeros of hidden-space slots) so later layers can share it; None without one.
      * slots: `LatentSlots` of this layer (no layer axis), prepended to the keys / values.
      * decode=True (self-attention only): keys/values of the new tokens are written into
        cache/cached_key, cache/cached_value [B, max_len, H, Dh] at cache/cache_index (then advanced); `mask`
        then refers to the max_len cache positions (e.g. [B,1,1,max_len]) or is None. During `init` (no cache
        yet) the call runs as ordinary full attention and creates the cache variables with the input's length.
      * softmax is always computed in float32; attention dropout uses the 'dropout' rng.
      * `attention` picks the implementation (see the module docstring); 'dot_product' falls back to the
        explicit path when attention dropout is drawn.

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
      relative_bias: a `RelativePositionBias` for a layer that owns the bias table, or None.
      dtype: compute dtype; param_dtype: parameter dtype.
      attention: 'explicit', 'dot_product' or 'cudnn' (`ATTENTION_IMPLEMENTATIONS`).
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
    relative_bias: Optional[RelativePositionBias] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = DEFAULT_ATTENTION

    def _dense(self, features: int, name: str, init: Optional[Callable]) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=init or self.kernel_init,
            name=name,
        )

    def _split(self, x: Array) -> Array:
        return x.reshape(x.shape[:2] + (self.num_heads, self.head_dim))

    def _cached(self, key: Array, value: Array) -> tuple[Array, Array, Any, bool]:
        """Writes the new keys / values [B, Q, H, Dh] into the cache.

        Returns (keys, values, start, cached): the whole cache [B, max_len, H, Dh] and the position of the
        first new token; while the cache is being created (no cache yet), the inputs, 0 and False.
        """
        cached = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        start = cache_position(self, key.shape[1])
        if not cached:
            return key, value, start, False
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key.astype(cached_key.value.dtype), (0, start, 0, 0)
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), (0, start, 0, 0)
        )
        return cached_key.value, cached_value.value, start, True

    def _relative_position_bias(self, q_pos: Array, k_pos: Array) -> Array:
        """Bias [1, H, Q, K] float32 for query positions [Q] and key positions [K] from this layer's table."""
        rb = self.relative_bias
        table = nn.Embed(
            rb.num_buckets,
            self.num_heads,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(rb.init_std),
            name="relative_attention_bias",
        )
        buckets = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None], rb.bidirectional, rb.num_buckets, rb.max_distance
        )
        return jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)

    def _attend(
        self,
        query: Array,
        key: Array,
        value: Array,
        mask: Optional[Array],
        bias: Optional[Array],
        deterministic: bool,
        decode: bool = False,
    ) -> Array:
        """softmax(q k^T [/ sqrt(Dh)] + bias + mask) v in float32 scores; [B, Q, H * Dh] in `dtype`."""
        implementation = check_attention(self.attention)
        fused = implementation != "explicit" and (deterministic or self.dropout_rate == 0.0)
        if fused and implementation == "cudnn" and not decode:
            if self.dtype not in CUDNN_DTYPES:
                raise ValueError(
                    f"attention='cudnn' runs in bfloat16 or float16, not {jnp.dtype(self.dtype).name}; set "
                    "--config.model.dtype=bfloat16, or use --config.model.attention=dot_product"
                )
            if self.head_dim % _CUDNN_HEAD_DIM_MULTIPLE or self.head_dim > _CUDNN_MAX_HEAD_DIM:
                raise ValueError(
                    f"attention='cudnn' needs a head size that is a multiple of {_CUDNN_HEAD_DIM_MULTIPLE} (at most "
                    f"128 before Hopper GPUs, {_CUDNN_MAX_HEAD_DIM} from them), and this model's is {self.head_dim}; "
                    "use --config.model.attention=dot_product"
                )
            out = cudnn_attention(query.astype(self.dtype), key, value, mask=mask, bias=bias, scale=self._scale)
            return out.reshape(out.shape[:2] + (self.num_heads * self.head_dim,))
        if fused:
            out = jax.nn.dot_product_attention(
                query, key.astype(query.dtype), value.astype(query.dtype), bias=bias, mask=mask, scale=self._scale
            )
            return out.astype(self.dtype).reshape(out.shape[:2] + (self.num_heads * self.head_dim,))
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key.astype(query.dtype), preferred_element_type=jnp.float32)
        if self.scale_query:
            scores = scores / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores + mask_to_bias(mask, jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = Dropout(self.dropout_rate)(weights, deterministic=deterministic).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(self.dtype))
        return out.reshape(out.shape[:2] + (self.num_heads * self.head_dim,))

    @property
    def _scale(self) -> float:
        """Multiplier of the scores: 1 / sqrt(Dh) with `scale_query`, else 1 (T5)."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale_query else 1.0

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv: Optional[Array] = None,
        *,
        mask: Optional[Array] = None,
        causal: bool = False,
        position_bias: Optional[Array] = None,
        slots: Optional[LatentSlots] = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> tuple[Array, Optional[Array]]:
        """Attends from x to kv (or to x itself), see the class docstring.

        Args:
          x: queries' hidden states [B, Q, D].
          kv: memory [B, K, D] for cross-attention, or None for self-attention.
          mask: bool mask broadcastable to [B, 1, Q, K] (key padding), or None.
          causal: apply the causal mask (self-attention of a decoder).
          position_bias: additive bias [B or 1, H, Q, K'], or None.
          slots: this layer's `LatentSlots` (states [B, P, D] or kv [B, P, H, Dh], mask [B, P]), or None.
          decode: incremental decoding with the 'cache' collection (self-attention only).
          deterministic: disables dropout when True.

        Returns:
          (output [B, Q, out_features] in `dtype`, the position bias used or None).
        """
        q_name, k_name, v_name, o_name = self.names
        inner = self.num_heads * self.head_dim
        k_proj = self._dense(inner, k_name, None)
        v_proj = self._dense(inner, v_name, None)
        source = x if kv is None else kv
        query = self._split(self._dense(inner, q_name, self.q_kernel_init)(x))
        key, value = self._split(k_proj(source)), self._split(v_proj(source))
        q_len = query.shape[1]
        start, cached = 0, False
        if decode:
            if kv is not None:
                raise ValueError("decode=True is only supported for self-attention")
            key, value, start, cached = self._cached(key, value)
        if causal or cached:  # with a cache, key j (a slot) is visible to new query i iff j <= start + i
            mask = combine_masks(mask, causal_mask(q_len, key.shape[1], start))
        slots = LatentSlots() if slots is None else slots
        if position_bias is None and self.relative_bias is not None:
            p = slots.num_positioned
            position_bias = self._relative_position_bias(p + start + jnp.arange(q_len), jnp.arange(p + key.shape[1]))
        bias = None if position_bias is None else position_bias.astype(jnp.float32)
        if slots.states is not None:
            slot_key, slot_value = self._split(k_proj(slots.states)), self._split(v_proj(slots.states))
            key, value, mask, bias = _prepend_slots(
                key, value, mask, bias, slot_key, slot_value, slots.mask, q_len, bias_has_slots=False
            )
        elif slots.kv is not None:
            key, value, mask, bias = _prepend_slots(
                key, value, mask, bias, slots.kv, slots.kv, slots.mask, q_len, bias_has_slots=True
            )
        out = self._attend(query, key, value, mask, bias, deterministic, decode)
        return self._dense(self.out_features, o_name, self.o_kernel_init)(out), position_bias
