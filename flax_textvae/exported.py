"""Reading an exported folder (written by ``python -m flax_textvae.export``) in place of a run's workdir.

An exported folder holds one trained text VAE and nothing of its workdir::

    DIR/config.json            the backbone's transformers config
    DIR/model.safetensors      the backbone's weights with PyTorch names (the whole seq2seq model)
    DIR/tokenizer*.json ...    the backbone's tokenizer files
    DIR/vae.safetensors        the VAE's own parameters (every subtree outside ``backbone``), '/'-joined names
    DIR/vae_config.json        {"format": ..., "step": STEP, "config": the run's ml_collections config}
    DIR/README.md              the model card

``flax_textvae.load(DIR)``, ``run_eval.py --workdir=DIR`` and ``builders.build_run(config, DIR, train=False)``
recognise such a folder with :func:`is_exported` and read it with :func:`load_config` / :func:`load_params`,
which mirror ``inference.load_config`` / ``checkpoints.load_params`` for a workdir.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
from flax.traverse_util import unflatten_dict
from safetensors.numpy import load_file

from flax_textvae import models

VAE_CONFIG_NAME = "vae_config.json"
VAE_WEIGHTS_NAME = "vae.safetensors"
FORMAT = "flax_textvae.export/1"  # the layout above; a reader refuses other values

__all__ = [
    "VAE_CONFIG_NAME",
    "VAE_WEIGHTS_NAME",
    "FORMAT",
    "is_exported",
    "read_vae_config",
    "load_config",
    "load_params",
]


def is_exported(path: str) -> bool:
    """Whether ``path`` is an exported folder (it holds ``vae_config.json``) rather than a run's workdir."""
    return os.path.isfile(os.path.join(path, VAE_CONFIG_NAME))


def read_vae_config(folder: str) -> dict:
    """The parsed ``vae_config.json`` of an exported folder: ``format``, ``step`` and ``config`` (a dict).

    Raises:
      FileNotFoundError: ``folder`` has no ``vae_config.json``.
      ValueError: the file is not in the layout this version writes.
    """
    path = os.path.join(folder, VAE_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {folder!r} is not an exported flax_textvae folder")
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or record.get("format") != FORMAT or "config" not in record:
        raise ValueError(
            f"{path}: not a flax_textvae export of format {FORMAT!r} "
            f"(format {record.get('format') if isinstance(record, dict) else None!r})"
        )
    return record


def load_config(folder: str) -> ml_collections.ConfigDict:
    """The ConfigDict the exported run was trained with (from ``vae_config.json``)."""
    return ml_collections.ConfigDict(read_vae_config(folder)["config"])


def load_params(folder: str, step: int | None = None) -> tuple[Any, int]:
    """``(params, step)`` of an exported folder, the same tree ``checkpoints.load_params`` gives for its run.

    The backbone is read from ``model.safetensors`` through the family's PyTorch name table (every tensor
    checked against the module's shapes); the rest from ``vae.safetensors``.

    Args:
      folder: the exported folder.
      step: None, or the step the folder was exported at (it holds that one step only).

    Returns:
      ``({'backbone': <HF Flax layout>, 'to_moments': ..., ...}, step)``; float32 arrays.

    Raises:
      FileNotFoundError: ``step`` is not the exported step, or a weights file is missing.
    """
    saved = int(read_vae_config(folder)["step"])
    if step is not None and int(step) != saved:
        raise FileNotFoundError(f"{folder} is an export of step {saved} only; no checkpoint of step {step}")
    weights = os.path.join(folder, VAE_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found: the exported folder {folder} is incomplete")
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    backbone = models.load_params(folder, hf_config, models.build_module(hf_config))
    vae = unflatten_dict({k: jnp.asarray(np.asarray(v, np.float32)) for k, v in load_file(weights).items()}, sep="/")
    if "backbone" in vae:
        raise ValueError(f"{weights} holds backbone tensors; the backbone belongs in model.safetensors")
    return dict(vae, backbone=backbone), saved
