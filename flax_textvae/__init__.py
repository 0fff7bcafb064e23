"""flax_textvae: text VAEs from pretrained seq2seq Transformers, in JAX/Flax.

``flax_textvae.load(path)`` (a trained run's workdir, or a folder written by ``flax_textvae.export``) returns
the text-level inference object (``encode``, ``decode``, ``reconstruct``, ``sample``, ``interpolate``);
``flax_textvae.TextVAE`` is the linen module (``TextVAE.load`` is an alias of ``load``).
"""

from flax_textvae.inference import TrainedTextVAE, load
from flax_textvae.vae import TextVAE

TextVAE.load = staticmethod(load)  # alias of flax_textvae.load

__version__ = "0.1.0"
__all__ = ["TextVAE", "TrainedTextVAE", "load", "__version__"]
