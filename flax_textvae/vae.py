"""The TextVAE module: a Gaussian bottleneck between a pretrained encoder and decoder.

Data flow (Park & Lee 2021; docs/method.md)::

    encoder states [B,S,D] --masked pooling--> [B,D] --linear--> mean, logvar [B,Dz]
    z = mean + exp(logvar / 2) * eps                     (z = mean when deterministic)
    z --> injection into the decoder, any combination of
          'memory'           one extra key/value slot per decoder self-attention layer, in one of two styles:
                             'head_kv' (Park & Lee) z -> one bias-free vector per layer in head space
                             [heads, d_kv], used as both key and value with no W_k / W_v: a length-1
                             cache prefix, so the tokens sit at decoder positions 1..T;
                             'hidden' (Optimus) z -> one hidden-state vector per layer that goes through
                             that layer's own W_k / W_v, tokens at positions 0..T-1,
          'cross_attention'  `num_memory_slots` slots the decoder cross-attends to (pretrained cross-attention),
          'embedding'        a vector added to every decoder input embedding.

The decoder never sees the encoder states directly: everything it learns about x passes through z.

Every projection from z keeps the batch axis first and reshapes only trailing axes, so example b's latent
can only reach example b's decoder (the released Park & Lee code reshaped ``[B, L*D]`` into ``[L, B, D]``
and mixed latents across the batch; docs/method.md, defect 2). ``tests/test_vae.py`` checks permutation equivariance for
every injection mode.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("mean", "max", "first")
INJECTIONS = ("memory", "cross_attention", "embedding")
MEMORY_STYLES = ("head_kv", "hidden")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype: the compute dtype


def masked_pool(hidden: jax.Array, mask: jax.Array, kind: str) -> jax.Array:
    """Pools encoder states over the real (unpadded) positions.

    Args:
      hidden: ``[B, S, D]`` encoder states.
      mask: ``[B, S]`` 1 on real tokens, 0 on padding (right padding assumed for ``'first'``).
      kind: ``'mean'``, ``'max'`` or ``'first'``.

    Returns:
      ``[B, D]`` float32 pooled states. Padding positions never contribute.
    """
    hidden = hidden.astype(jnp.float32)
    m = mask.astype(bool)[..., None]
    if kind == "mean":
        count = jnp.maximum(m.sum(axis=1), 1)
        return jnp.where(m, hidden, 0.0).sum(axis=1) / count
    if kind == "max":
        return jnp.where(m, hidden, -jnp.inf).max(axis=1)
    if kind == "first":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {kind!r}; choose one of {POOLINGS}")


def reparameterize(mean: jax.Array, logvar: jax.Array, eps: jax.Array) -> jax.Array:
    """z = mean + sigma * eps, all ``[B, Dz]``."""
    return mean + jnp.exp(0.5 * logvar) * eps


class TextVAE(nn.Module):
    """A seq2seq LM turned into a VAE.

    Attributes:
      backbone: a module from ``flax_textvae.models`` (BART / T5 LM); its parameters live under
        ``params['backbone']`` in exactly the Hugging Face Flax layout, so pretrained weights drop in.
      latent_size: Dz, the size of z.
      pooling: ``'mean'``, ``'max'`` or ``'first'`` (masked; padding never pooled).
      injection: which of ``'memory'``, ``'cross_attention'``, ``'embedding'`` feed z to the decoder.
      num_memory_slots: number of cross-attention slots projected from z (``'cross_attention'`` only).
      memory_style: ``'head_kv'`` or ``'hidden'``, how ``'memory'`` builds its slot (see the module docstring).
      posterior_bias: biases on the posterior heads (mean, logvar); False as in the released recipe.
      dtype: compute dtype of the latent projections fed to the backbone.

    ``TextVAE.load(path)`` is an alias of ``flax_textvae.load`` (the text-level inference object of
    ``flax_textvae.inference``); the linen methods below work on arrays.
    """

    backbone: nn.Module
    latent_size: int = 32
    pooling: str = "mean"
    injection: Sequence[str] = ("memory",)
    num_memory_slots: int = 1
    memory_style: str = "hidden"
    posterior_bias: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")
        bad = [i for i in self.injection if i not in INJECTIONS]
        if bad or not self.injection:
            raise ValueError(f"injection must be a non-empty subset of {INJECTIONS}, got {tuple(self.injection)}")
        if self.memory_style not in MEMORY_STYLES:
            raise ValueError(f"unknown memory_style {self.memory_style!r}; choose one of {MEMORY_STYLES}")
        d = self.backbone.d_model
        self.to_moments = nn.Dense(2 * self.latent_size, use_bias=self.posterior_bias, name="to_moments")
        if "memory" in self.injection and self.memory_style == "head_kv":
            size = self.backbone.num_decoder_layers * self.backbone.num_decoder_heads * self.backbone.decoder_head_dim
            self.to_memory = nn.Dense(size, use_bias=False, dtype=self.dtype, name="to_memory")
        elif "memory" in self.injection:
            self.to_memory = nn.Dense(self.backbone.num_decoder_layers * d, dtype=self.dtype, name="to_memory")
        if "cross_attention" in self.injection:
            self.to_cross = nn.Dense(self.num_memory_slots * d, dtype=self.dtype, name="to_cross")
        if "embedding" in self.injection:
            self.to_embedding = nn.Dense(d, dtype=self.dtype, name="to_embedding")

    @property
    def num_slot_positions(self) -> int:
        """Decoder positions the head-space memory slot occupies before the tokens (1 for 'head_kv', else 0)."""
        return 1 if "memory" in self.injection and self.memory_style == "head_kv" else 0

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True):
        """Posterior parameters q(z|x).

        Args:
          input_ids: ``[B, S]`` encoder token ids.
          attention_mask: ``[B, S]`` 1 on real tokens.
          deterministic: disables dropout in the encoder.

        Returns:
          ``(mean, logvar)``, each ``[B, Dz]`` float32.
        """
        hidden = self.backbone.encode(input_ids, attention_mask, deterministic=deterministic)
        pooled = masked_pool(hidden, attention_mask, self.pooling)
        moments = self.to_moments(pooled).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, logvar

    def latent_inputs(self, z: jax.Array) -> dict:
        """Projects z ``[B, Dz]`` into the decoder's keyword arguments (batch axis always first)."""
        b = z.shape[0]
        d = self.backbone.d_model
        out: dict = {}
        if "memory" in self.injection and self.memory_style == "head_kv":
            # [B, L*H*Dh] -> [B, L, 1, H, Dh]: only trailing axes are split, so rows never mix.
            bb = self.backbone
            out["prefix_kv"] = self.to_memory(z).reshape(
                b, bb.num_decoder_layers, 1, bb.num_decoder_heads, bb.decoder_head_dim
            )
        elif "memory" in self.injection:
            # [B, L*D] -> [B, L, 1, D]: only trailing axes are split, so rows never mix.
            out["prefix_states"] = self.to_memory(z).reshape(b, self.backbone.num_decoder_layers, 1, d)
        if "cross_attention" in self.injection:
            out["memory"] = self.to_cross(z).reshape(b, self.num_memory_slots, d)
            out["memory_mask"] = jnp.ones((b, self.num_memory_slots), jnp.int32)
        if "embedding" in self.injection:
            out["embed_offset"] = self.to_embedding(z)
        return out

    def decode(
        self,
        z: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        hidden: bool = False,
    ) -> jax.Array:
        """Logits of p(x|z), teacher-forced (or one incremental step with ``decode=True``).

        Args:
          z: ``[B, Dz]`` latent codes.
          decoder_input_ids: ``[B, T]`` (``[B, 1]`` with ``decode=True``).
          decoder_attention_mask: ``[B, T]`` or None.
          deterministic: disables dropout.
          decode: incremental decoding with the backbone's ``'cache'`` collection.
          hidden: return the decoder's final hidden states ``[B, T, D]`` (compute dtype) instead of the logits
            (the backbone's ``lm_head_weights()`` is the head that makes them logits).

        Returns:
          ``[B, T, V]`` float32 logits (``[B, T, D]`` hidden states with ``hidden=True``).
        """
        kwargs = self.latent_inputs(z)
        return (self.backbone.decode_hidden if hidden else self.backbone.decode)(
            decoder_input_ids,
            decoder_attention_mask,
            kwargs.pop("memory", None),
            kwargs.pop("memory_mask", None),
            deterministic=deterministic,
            decode=decode,
            **kwargs,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        *,
        eps: jax.Array | None = None,
        deterministic: bool = True,
        sample: bool = True,
        hidden: bool = False,
    ) -> dict:
        """Full pass: encode, sample z, decode.

        Args:
          input_ids, attention_mask: ``[B, S]`` encoder input (possibly denoised).
          decoder_input_ids, decoder_attention_mask: ``[B, T]`` teacher-forced decoder input.
          eps: ``[B, Dz]`` standard-normal noise for the reparameterisation; drawn from the ``'latent'``
            rng stream when None and ``sample`` is True.
          deterministic: disables dropout.
          sample: if False, z = mean.
          hidden: give the decoder's final hidden states ``hidden [B,T,D]`` instead of ``logits``.

        Returns:
          dict with ``logits [B,T,V]`` (float32), ``mean``, ``logvar``, ``z`` (``[B,Dz]``).
        """
        mean, logvar = self.encode(input_ids, attention_mask, deterministic=deterministic)
        if not sample:
            z = mean
        else:
            if eps is None:
                eps = jax.random.normal(self.make_rng("latent"), mean.shape, jnp.float32)
            z = reparameterize(mean, logvar, eps)
        out = self.decode(z, decoder_input_ids, decoder_attention_mask, deterministic=deterministic, hidden=hidden)
        return {"hidden" if hidden else "logits": out, "mean": mean, "logvar": logvar, "z": z}


def _load_trained(path: str, *, step: int | None = None):
    """``TextVAE.load``: an alias of ``flax_textvae.load`` (a trained run's workdir or an exported folder)."""
    from flax_textvae.inference import load  # on use: inference imports the tokenizers and checkpointing

    return load(path, step=step)


TextVAE.load = staticmethod(_load_trained)
