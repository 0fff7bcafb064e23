"""Pretrained seq2seq backbones (BART, T5) in Flax linen with Hugging Face parameter names.

`families` is the registry of what the rest of the library knows about each family; `attention` the one
attention / KV-cache implementation both share; `bart` and `t5` the family stacks; `loading` the
checkpoint reader.
"""

from flax_textvae.models import families
from flax_textvae.models.common import init_cache
from flax_textvae.models.loading import (
    FOLDER_CONTENTS,
    CheckpointError,
    Pretrained,
    build_module,
    init_params,
    load_params,
    load_pretrained,
    param_shapes,
)

__all__ = [
    "CheckpointError",
    "Pretrained",
    "load_pretrained",
    "build_module",
    "init_params",
    "init_cache",
    "load_params",
    "param_shapes",
    "FOLDER_CONTENTS",
    "families",
]
