"""The text-level inference API: ``flax_textvae.load(path)`` -> :class:`TrainedTextVAE`, and decoding from z.

Example::

    import flax_textvae
    vae = flax_textvae.load("runs/demo")             # a workdir or an exported folder
    mean, logvar = vae.encode(["the cat sat on the mat"])
    vae.reconstruct(["the cat sat on the mat"])      # -> ['the cat sat on the mat']
    vae.sample(3, seed=0)                            # three sentences from the prior
    vae.interpolate("a dog barks", "the old man sleeps", steps=5)

All methods take and return plain Python / numpy values.

Array level, the TextVAE side of ``flax_textvae.decoding`` (which searches over any one-token logits function):

  * ``LatentDecoder(vae)`` (one per module from ``latent_decoder(vae)``): ``tokens_to_logits`` and
    ``sequence_logits`` with z as the per-row input, through
    ``vae.apply({'params': p, 'cache': c}, z, tokens, decode=True, mutable=['cache'], method=TextVAE.decode)``;
    the zero cache; the decoder positions the backbone's family allows.
  * ``init_vae_cache(vae, batch_size, max_length)`` -> the ``'cache'`` collection,
    ``{'backbone': models.init_cache(vae.backbone, B, L)}``.
  * ``decode_from_z(vae, params, z, *, prompt, eos_id, pad_id, max_length, method='greedy', ...)`` -> token ids
    ``[B, max_length]`` (greedy, sampling or beam search; see ``decoding.decode``).
  * ``sequence_log_probs(vae, params, z, tokens, *, prompt, eos_id)`` -> teacher-forced ``log p(tokens|z)``.

The cache holds ``len(prompt) - 1 + max_length`` token positions; with a head-space memory slot
(``vae.num_slot_positions``) in front of them, they must fit the family's ``Family.max_decode_positions``
(BART: ``max_position_embeddings``; T5: no limit).
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_textvae import builders, checkpoints, decoding, exported
from flax_textvae.models import families
from flax_textvae.vae import TextVAE

_MAX_DECODERS = 32
UNKNOWN_WARN_FRACTION = 0.5  # encode / reconstruct warn when more of a text's word tokens than this are <unk>
_DECODERS: "collections.OrderedDict[int, LatentDecoder]" = collections.OrderedDict()


# ------------------------------------------------------------------------------------- arrays: z -> ids
def init_vae_cache(vae: TextVAE, batch_size: int, max_length: int) -> Any:
    """Zero decoding cache of ``vae`` for ``batch_size`` rows and ``max_length`` decoder positions.

    Args:
      vae: the TextVAE module.
      batch_size: B (rows decoded together).
      max_length: number of decoder tokens the cache can hold (prompt included).

    Returns:
      The ``'cache'`` collection (zeros, every ``cache_index`` 0), ``{'backbone': {...}}``.
    """
    return latent_decoder(vae).init_cache(batch_size, max_length)


class LatentDecoder:
    """What ``decoding`` needs to decode from a TextVAE, with the latent codes z ``[R, Dz]`` as per-row input.

    Attributes:
      vae: the TextVAE module.
      max_positions: decoder positions the backbone's family allows (None: no limit).
    """

    def __init__(self, vae: TextVAE):
        self.vae = vae
        config = getattr(vae.backbone, "config", None)
        family = families.FAMILIES.get(getattr(config, "model_type", None))
        self.max_positions: Optional[int] = None if family is None else family.max_decode_positions(config)
        self._cache_shapes: dict = {}

    def tokens_to_logits(self, params: Any, cache: Any, tokens: jax.Array, z: jax.Array):
        """One cached decoder step: ``tokens [R, 1]``, ``z [R, Dz]`` -> (float32 logits ``[R, V]``, new cache)."""
        logits, mutated = self.vae.apply(
            {"params": params, "cache": cache}, z, tokens, decode=True, mutable=["cache"], method=TextVAE.decode
        )
        return logits[:, -1].astype(jnp.float32), mutated["cache"]

    def sequence_logits(self, params: Any, tokens: jax.Array, z: jax.Array) -> jax.Array:
        """Teacher-forced logits ``[R, T, V]`` of decoder inputs ``tokens [R, T]`` given ``z [R, Dz]``."""
        return self.vae.apply({"params": params}, z, tokens, method=TextVAE.decode)

    def init_cache(self, batch_size: int, max_length: int) -> Any:
        """Zero ``'cache'`` collection for ``batch_size`` rows and ``max_length`` positions (see ``init_vae_cache``)."""
        key = (int(batch_size), int(max_length))
        if key not in self._cache_shapes:
            z = jnp.zeros((key[0], self.vae.latent_size), jnp.float32)
            ids = jnp.zeros(key, jnp.int32)
            init = lambda: self.vae.init(jax.random.PRNGKey(0), z, ids, decode=True, method=TextVAE.decode)
            self._cache_shapes[key] = jax.eval_shape(init)["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._cache_shapes[key])

    def check(self, z: jax.Array, prompt: Sequence[int], max_length: int) -> None:
        """ValueError unless ``z`` is ``[B, Dz]`` and the slot, prompt and ``max_length`` fit the positions."""
        needed = self.vae.num_slot_positions + decoding.cache_length(prompt, max_length)
        if self.max_positions is not None and needed > self.max_positions:
            raise ValueError(
                f"the memory slot + len(prompt) - 1 + max_length = {needed} exceeds the backbone's "
                f"{self.max_positions} decoder positions (max_position_embeddings)"
            )
        if z.ndim != 2 or z.shape[1] != self.vae.latent_size:
            raise ValueError(f"z must be [B, {self.vae.latent_size}], got {z.shape}")


def latent_decoder(vae: TextVAE) -> LatentDecoder:
    """The ``LatentDecoder`` of ``vae``, the same object for the same module (so compiled programs are reused).

    The 32 most recently used are kept.
    """
    hit = _DECODERS.get(id(vae))
    if hit is None or hit.vae is not vae:
        hit = _DECODERS[id(vae)] = LatentDecoder(vae)
        while len(_DECODERS) > _MAX_DECODERS:
            _DECODERS.popitem(last=False)
    _DECODERS.move_to_end(id(vae))
    return hit


def _unwrap(params: Any) -> Any:
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def decode_from_z(
    vae: TextVAE,
    params: Any,
    z: Any,
    *,
    prompt: Sequence[int],
    eos_id: int,
    pad_id: int,
    max_length: int,
    **kwargs: Any,
):
    """Decodes token ids from latent codes with ``decoding.decode``.

    Args:
      vae: the TextVAE module.
      params: its parameters (``variables['params']``; a ``{'params': ...}`` dict is accepted too).
      z: ``[B, Dz]`` latent codes.
      prompt: forced decoder prefix, e.g. ``(decoder_start,)`` (T5) or ``(</s>, <s>)`` (BART); not returned.
      eos_id: end-of-sequence id (a row stops after emitting it).
      pad_id: id written after EOS.
      max_length: number of generated tokens (output width), EOS included.
      **kwargs: ``method`` ('greedy', 'sample', 'beam'), ``rng``, ``temperature``, ``top_k``, ``top_p``,
        ``beam_size``, ``length_penalty``, ``return_scores``, as for ``decoding.decode``.

    Returns:
      ``np.ndarray [B, max_length]`` int32 (continuation after the prompt, EOS included, ``pad_id`` after);
      with ``return_scores=True``, ``(tokens, scores [B])``.
    """
    dec = latent_decoder(vae)
    z = jnp.asarray(z, jnp.float32)
    dec.check(z, prompt, max_length)
    cache = dec.init_cache(z.shape[0], decoding.cache_length(prompt, max_length))
    return decoding.decode(
        dec.tokens_to_logits,
        _unwrap(params),
        cache,
        z,
        prompt=prompt,
        eos_id=eos_id,
        pad_id=pad_id,
        max_length=max_length,
        **kwargs,
    )


def sequence_log_probs(
    vae: TextVAE, params: Any, z: Any, tokens: Any, *, prompt: Sequence[int], eos_id: int
) -> np.ndarray:
    """Teacher-forced ``log p(tokens | z)`` of continuations as ``decode_from_z`` returns them (no cache).

    Args:
      vae, params: as for ``decode_from_z``.
      z: ``[B, Dz]``.
      tokens: ``[B, T]`` continuation after ``prompt``; scored up to and including the first EOS.
      prompt: the forced decoder prefix.
      eos_id: end-of-sequence id; positions after the first EOS (padding) are not scored.

    Returns:
      ``np.ndarray [B]`` float32 summed log-probabilities.
    """
    return decoding.sequence_log_probs(
        latent_decoder(vae).sequence_logits,
        _unwrap(params),
        tokens,
        jnp.asarray(z, jnp.float32),
        prompt=prompt,
        eos_id=eos_id,
    )


# --------------------------------------------------------------------------------------------- text level
def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The ConfigDict a run was trained with (``WORKDIR/config.json``, or an exported folder's)."""
    if exported.is_exported(workdir):
        return exported.load_config(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a flax_textvae run directory")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class TrainedTextVAE:
    """A trained text VAE: encode sentences to z, decode z to sentences."""

    def __init__(self, run: builders.Run, params, step: int | None = None):
        self.run = run
        self.params = params
        self.step = step
        self.latent_size = run.model.latent_size

    @classmethod
    def load(cls, path: str, *, step: int | None = None) -> "TrainedTextVAE":
        """Loads the newest (or given) checkpoint of the run in ``path`` (a workdir or an exported folder)."""
        config = load_config(path)
        run = builders.build_run(config, path, train=False, with_eval=False)
        load_params = exported.load_params if exported.is_exported(path) else checkpoints.load_params
        params, used = load_params(path, step)
        return cls(run, params, used)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior ``(mean, logvar)``, each ``[len(texts), latent_size]``.

        Warns (``UserWarning``) when more than half of a text's tokens, special tokens aside, are the
        tokenizer's unknown token: the model's vocabulary lacks those words, so the code says little about it.
        """
        return self._encode(texts, stacklevel=3)

    def _encode(self, texts, stacklevel: int):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            empty = np.zeros((0, self.latent_size), np.float32)
            return empty, empty.copy()
        self._warn_unknown(texts, stacklevel + 1)
        return self.run.encode_texts(self.params, texts)

    def unknown_fraction(self, text: str) -> tuple[float, list[str]]:
        """The fraction of ``text``'s tokens (special tokens aside) that are unknown, and the unknown words.

        Returns:
          ``(fraction, words)``: 0.0 for a text with no ordinary token or a tokenizer without an unknown
          token; ``words`` are the stretches of ``text`` that became the unknown token (empty when the
          tokenizer cannot map tokens back to characters).
        """
        tok = self.run.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if unk is None:
            return 0.0, []
        special = set(getattr(tok, "all_special_ids", ())) - {unk}
        fast = bool(getattr(tok, "is_fast", False))  # fast tokenizers map each token to its characters
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=fast)
        ids = list(enc["input_ids"])
        spans = list(enc["offset_mapping"]) if fast else [None] * len(ids)
        kept = [(i, span) for i, span in zip(ids, spans) if i not in special]
        if not kept:
            return 0.0, []
        words = [text[span[0] : span[1]] for i, span in kept if i == unk and span is not None and span[1] > span[0]]
        return sum(i == unk for i, _ in kept) / len(kept), words

    def _warn_unknown(self, texts: list[str], stacklevel: int) -> None:
        """One UserWarning naming every text whose tokens are mostly unknown; ``stacklevel`` is the caller's."""
        bad = []
        for text in texts:
            frac, words = self.unknown_fraction(text)
            if frac > UNKNOWN_WARN_FRACTION:
                which = f": {', '.join(repr(w) for w in dict.fromkeys(words))}" if words else ""
                shown = text if len(text) <= 80 else text[:77] + "..."
                bad.append(f"{shown!r} ({frac:.0%} of its tokens unknown{which})")
        if bad:
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            warnings.warn(
                f"the model's vocabulary lacks most words of {len(bad)} input text(s), which become "
                f"the unknown token {self.run.tokenizer.unk_token!r}: {shown}. Its codes and "
                "reconstructions of these texts reflect little of them.",
                UserWarning,
                stacklevel=stacklevel,
            )

    def decode(self, z, *, method: str = "greedy", max_length: int | None = None, seed: int = 0, **kwargs) -> list[str]:
        """Sentences decoded from latent codes ``z [N, latent_size]``.

        Args:
          z: latent codes.
          method: 'greedy', 'sample' (``temperature``, ``top_k``, ``top_p``) or 'beam' (``beam_size``).
          max_length: tokens to generate at most (default: the run's ``data.max_length``).
          seed: rng seed for sampling.
          **kwargs: passed to ``decoding.decode``.
        """
        z = np.atleast_2d(np.asarray(z, np.float32))
        if z.shape[-1] != self.latent_size:
            raise ValueError(f"z has {z.shape[-1]} dims; this model's latent_size is {self.latent_size}")
        if not len(z):
            return []
        ids = decode_from_z(
            self.run.model,
            self.params,
            z,
            prompt=self.run.prompt,
            eos_id=self.run.eos_id,
            pad_id=self.run.pad_id,
            max_length=self.run.max_length if max_length is None else max_length,
            method=method,
            rng=jax.random.key(seed),
            **kwargs,
        )
        return self.run.detokenize(ids)

    def reconstruct(self, texts: list[str], **kwargs) -> list[str]:
        """Decode each sentence's posterior mean (warning, as ``encode`` does, about mostly unknown texts)."""
        mean, _ = self._encode(texts, stacklevel=3)
        return self.decode(mean, **kwargs)

    def sample(self, n: int, *, seed: int = 0, **kwargs) -> list[str]:
        """``n`` sentences decoded from z ~ N(0, I).

        Args:
          n: how many (0 gives an empty list).
          seed: seeds the latent draw and the decoding.
          **kwargs: passed to ``decode`` (``method``, ``top_p``, ...).

        Returns:
          ``n`` strings.

        Raises:
          ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"sample(n={n}): n must be >= 0")
        if n == 0:
            return []
        z = np.asarray(jax.random.normal(jax.random.key(seed), (n, self.latent_size)))
        return self.decode(z, seed=seed, **kwargs)

    def interpolate(self, a: str, b: str, steps: int = 5, **kwargs) -> list[str]:
        """``steps`` sentences decoded along the straight line between the posterior means of a and b."""
        if steps < 2:
            raise ValueError(f"steps={steps}: need at least 2 (the two end points)")
        mean, _ = self._encode([a, b], stacklevel=3)
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
        return self.decode((1 - t) * mean[0] + t * mean[1], **kwargs)


def load(path: str, *, step: int | None = None) -> TrainedTextVAE:
    """Loads a trained run (its workdir, or an exported folder) for inference; see ``TrainedTextVAE``.

    Args:
      path: a run's workdir or a folder written by ``flax_textvae.export``.
      step: checkpoint step (default: the newest).

    Returns:
      The text-level object (``encode``, ``decode``, ``reconstruct``, ``sample``, ``interpolate``).
    """
    return TrainedTextVAE.load(path, step=step)
