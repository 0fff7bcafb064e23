"""The text-level inference API: ``flax_textvae.TextVAE.load(path)`` -> :class:`TrainedTextVAE`.

Example::

    from flax_textvae import TextVAE
    vae = TextVAE.load("runs/demo")
    mean, logvar = vae.encode(["the cat sat on the mat"])
    vae.reconstruct(["the cat sat on the mat"])      # -> ['the cat sat on the mat']
    vae.sample(3, seed=0)                            # three sentences from the prior
    vae.interpolate("a dog barks", "the old man sleeps", steps=5)

All methods take and return plain Python / numpy values. Decoding uses ``flax_textvae.decoding`` (greedy,
top-k / nucleus sampling or beam search, jitted, with the key/value cache).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_textvae import builders, checkpoints, decoding, exported


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
        """Posterior ``(mean, logvar)``, each ``[len(texts), latent_size]``."""
        if isinstance(texts, str):
            texts = [texts]
        return self.run.encode_texts(self.params, texts)

    def decode(self, z, *, method: str = "greedy", max_length: int | None = None, seed: int = 0,
               **kwargs) -> list[str]:
        """Sentences decoded from latent codes ``z [N, latent_size]``.

        Args:
          z: latent codes.
          method: 'greedy', 'sample' (``temperature``, ``top_k``, ``top_p``) or 'beam' (``beam_size``).
          max_length: tokens to generate at most (default: the run's ``data.max_length``).
          seed: rng seed for sampling.
          **kwargs: passed to ``decoding.decode_from_z``.
        """
        z = np.atleast_2d(np.asarray(z, np.float32))
        if z.shape[-1] != self.latent_size:
            raise ValueError(f"z has {z.shape[-1]} dims; this model's latent_size is {self.latent_size}")
        ids = decoding.decode_from_z(self.run.model, self.params, jnp.asarray(z), prompt=self.run.prompt,
                                     eos_id=self.run.eos_id, pad_id=self.run.pad_id,
                                     max_length=max_length or self.run.max_length, method=method,
                                     rng=jax.random.key(seed), **kwargs)
        return self.run.detokenize(ids)

    def reconstruct(self, texts: list[str], **kwargs) -> list[str]:
        """Decode each sentence's posterior mean."""
        mean, _ = self.encode(texts)
        return self.decode(mean, **kwargs)

    def sample(self, n: int, *, seed: int = 0, **kwargs) -> list[str]:
        """``n`` sentences decoded from z ~ N(0, I)."""
        z = np.asarray(jax.random.normal(jax.random.key(seed), (n, self.latent_size)))
        return self.decode(z, seed=seed, **kwargs)

    def interpolate(self, a: str, b: str, steps: int = 5, **kwargs) -> list[str]:
        """``steps`` sentences decoded along the straight line between the posterior means of a and b."""
        if steps < 2:
            raise ValueError(f"steps={steps}: need at least 2 (the two end points)")
        mean, _ = self.encode([a, b])
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
        return self.decode((1 - t) * mean[0] + t * mean[1], **kwargs)
