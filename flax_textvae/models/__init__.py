"""Pretrained seq2seq backbones (BART, T5) in Flax linen with Hugging Face parameter names.

Family modules are imported lazily (`flax_textvae.models.bart`, `flax_textvae.models.t5`).
"""
from flax_textvae.models.common import init_cache
from flax_textvae.models.loading import (FOLDER_CONTENTS, Pretrained, build_module, init_params, load_params,
                                         load_pretrained, param_shapes)

__all__ = ["Pretrained", "load_pretrained", "build_module", "init_params", "init_cache", "load_params",
           "param_shapes", "FOLDER_CONTENTS"]
