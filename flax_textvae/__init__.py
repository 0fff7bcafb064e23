"""flax_textvae: text VAEs from pretrained seq2seq Transformers, in JAX/Flax.

``flax_textvae.load(path)`` (a trained run's workdir, or a folder written by ``flax_textvae.export``) returns
the text-level inference object (``encode``, ``decode``, ``reconstruct``, ``sample``, ``interpolate``);
``flax_textvae.TextVAE`` is the linen module (``TextVAE.load`` is an alias of ``load``).

The names above are imported on first use, so ``import flax_textvae.losses`` (or ``.schedules``,
``.metrics``) loads jax and that module only, not the tokenizers, data readers and checkpointing that
``load`` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["TextVAE", "TrainedTextVAE", "load", "__version__"]

_LAZY = {"TextVAE": "flax_textvae.vae", "TrainedTextVAE": "flax_textvae.inference", "load": "flax_textvae.inference"}

if TYPE_CHECKING:
    from flax_textvae.inference import TrainedTextVAE, load
    from flax_textvae.vae import TextVAE


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flax_textvae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
