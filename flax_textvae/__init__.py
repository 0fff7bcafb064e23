"""flax_textvae: text VAEs from pretrained seq2seq Transformers, in JAX/Flax.

``flax_textvae.TextVAE`` is the linen module; ``TextVAE.load(path)`` returns the text-level inference
object (``encode``, ``decode``, ``reconstruct``, ``sample``, ``interpolate``).
"""
from flax_textvae.vae import TextVAE

__version__ = "0.1.0"
__all__ = ["TextVAE", "__version__"]
