"""flax_textvae: text VAEs from pretrained seq2seq Transformers, in JAX/Flax.

``flax_textvae.load(path)`` (a trained run's workdir, or a folder written by ``flax_textvae.export``) returns
the text-level inference object (``encode``, ``decode``, ``reconstruct``, ``sample``, ``interpolate``);
``flax_textvae.TextVAE`` is the linen module (``TextVAE.load`` is an alias of ``load``).
"""
from flax_textvae.generate import TrainedTextVAE
from flax_textvae.vae import TextVAE

__version__ = "0.1.0"
__all__ = ["TextVAE", "TrainedTextVAE", "load", "__version__"]


def load(path: str, **kwargs) -> TrainedTextVAE:
    """Loads a trained run (its workdir, or an exported folder) for inference; see ``TrainedTextVAE``."""
    return TrainedTextVAE.load(path, **kwargs)
