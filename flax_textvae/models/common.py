"""Family-neutral pieces of the BART and T5 backbones other than attention (that is `attention.py`).

Activations:
  * `get_activation(name)`: Hugging Face `ACT2FN` names -> jax function ("gelu" = exact erf GELU,
      "gelu_new"/"gelu_pytorch_tanh" = tanh approximation, "relu", "silu"/"swish", "gelu_fast", "quick_gelu",
      "tanh", "sigmoid").
  * `Dropout(rate)`: inverted dropout drawing its keep mask from 16-bit random numbers.

LM head:
  * `LMHead(vocab_size, kernel_init, dtype)`: an untied head, parameter `kernel` [D, V], no bias.
  * `tied_logits(hidden, embedding, dtype)`: logits through the (shared) token embedding [V, D].
  * `LMHeadWeights(head, bias, layout, scale)`: what a family's `lm_head_weights()` returns, so a loss can
      apply the head itself (`losses.chunked_token_nll`) to the decoder's final hidden states.

Incremental decoding:
  * `init_cache(module, batch_size, max_length)`: zero 'cache' collection for `module.decode(...,
      decode=True)` (shapes from `jax.eval_shape` over `module.init`; works for any family module that follows
      the decode() contract `decode(ids, mask, memory, memory_mask, *, decode=...)`).

Checkpoint mapping:
  * `apply_name_table(state_dict, table)`: a Flax params tree from a PyTorch state dict by an explicit table.
  * `mismatch_report(title, missing, unexpected, mismatched) -> str`: the text of the ValueError raised by
      params_from_torch / the loader: how many names of each kind are bad, and the first of them.

Properties:
  * `Seq2SeqProperties`: d_model, decoder layers / heads / head size, vocabulary and special ids of a
      family module, read from its transformers config.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

__all__ = [
    "get_activation",
    "Dropout",
    "LMHead",
    "LMHeadWeights",
    "tied_logits",
    "init_cache",
    "apply_name_table",
    "mismatch_report",
    "Seq2SeqProperties",
]


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


def mismatch_report(
    title: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str], *, show: int = 12
) -> str:
    """Multi-line message: how many tensor names are missing / unexpected / of the wrong shape, and the first
    `show` of each kind (a checkpoint of another layout would otherwise list hundreds)."""
    lines = [f"{title}:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            lines.append(f"  {label} ({len(items)}):")
            lines.extend(f"    {item}" for item in items[:show])
            if len(items) > show:
                lines.append(f"    ... and {len(items) - show} more")
    return "\n".join(lines)


def apply_name_table(state_dict: Mapping[str, Any], table, *, check_only: bool = False) -> tuple[dict, set, list, list]:
    """Builds a Flax params tree from a PyTorch state dict through an explicit name table.

    Args:
      state_dict: PyTorch name -> array (anything with a ``shape`` under ``check_only``).
      table: iterable of ``(torch_name, flax_path_tuple, transpose, expected_torch_shape)``.
      check_only: only match names and shapes; the params tree stays empty.

    Returns:
      ``(params, used_names, missing, mismatched)``; float32 arrays, Linear weights transposed to kernels.
    """
    used, missing, mismatched, params = set(), [], [], {}
    for tname, fpath, transpose, shape in table:
        if tname not in state_dict:
            missing.append(tname)
            continue
        used.add(tname)
        got = tuple(np.shape(state_dict[tname]))
        if got != tuple(shape):
            mismatched.append(f"{tname}: got {got}, expected {tuple(shape)}")
            continue
        if check_only:
            continue
        arr = np.asarray(state_dict[tname]).astype(np.float32)
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


# --------------------------------------------------------------------------------------------- LM head
class LMHead(nn.Module):
    """Untied LM head: parameter ``kernel`` [D, V] (float32), no bias; float32 accumulation.

    Attributes:
      vocab_size: V.
      kernel_init: initializer of the kernel.
      dtype: compute dtype of the matmul.
    """

    vocab_size: int
    kernel_init: Callable
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        """Hidden states [B, T, D] -> float32 logits [B, T, V]."""
        kernel = self.param("kernel", self.kernel_init, (hidden.shape[-1], self.vocab_size), jnp.float32)
        return jnp.einsum("btd,dv->btv", hidden, kernel.astype(self.dtype), preferred_element_type=jnp.float32)


def tied_logits(hidden: Array, embedding: Array, dtype: Dtype) -> Array:
    """Logits through a token embedding used as the LM head.

    Args:
      hidden: [B, T, D] decoder output (already rescaled where the family does).
      embedding: [V, D] token embedding (float32 parameter).
      dtype: compute dtype of the matmul.

    Returns:
      float32 logits [B, T, V].
    """
    return jnp.einsum("btd,vd->btv", hidden, embedding.astype(dtype), preferred_element_type=jnp.float32)


@flax.struct.dataclass
class LMHeadWeights:
    """The LM head of a family module as arrays: logits = (scale * hidden) @ head (+ bias).

    Attributes:
      head: the float32 parameter, [V, D] (``layout='vd'``, a tied token embedding) or [D, V] (``'dv'``, an
        untied kernel).
      bias: float32 [V] logit bias, or None.
      layout: ``'vd'`` or ``'dv'`` (static).
      scale: multiplier of the hidden states before the head, applied in the compute dtype (static).
    """

    head: Array
    bias: Optional[Array] = None
    layout: str = flax.struct.field(pytree_node=False, default="vd")
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
