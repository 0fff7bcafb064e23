"""The real-size architectures the benchmarks and ``tests/test_real_size.py`` build with random weights.

``SIZES`` holds, per public checkpoint name, its family and the fields of its public ``config.json`` that set
its shape and special ids (nothing is downloaded); ``hf_config(arch, **overrides)`` makes the transformers
config, with a script's own settings (dropout rates) as overrides; ``save_random_model(arch, folder)`` writes
such a model with random weights as a checkpoint folder.
"""

from __future__ import annotations

import transformers

_T5_IDS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=32)

SIZES = {
    "bart-base": (
        "bart",
        dict(
            vocab_size=50265,
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=12,
            decoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_ffn_dim=3072,
            max_position_embeddings=1024,
            activation_function="gelu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
            scale_embedding=False,
        ),
    ),
    "t5-small": (
        "t5",
        dict(
            vocab_size=32128,
            d_model=512,
            d_kv=64,
            d_ff=2048,
            num_layers=6,
            num_decoder_layers=6,
            num_heads=8,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            **_T5_IDS,
        ),
    ),
    "t5-v1_1-small": (
        "t5",
        dict(
            vocab_size=32128,
            d_model=512,
            d_kv=64,
            d_ff=1024,
            num_layers=8,
            num_decoder_layers=8,
            num_heads=6,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            **_T5_IDS,
        ),
    ),
}


def hf_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """The transformers config of ``arch`` (a key of ``SIZES``), with ``overrides`` on top.

    Raises:
      KeyError: for an ``arch`` that is not in ``SIZES``.
    """
    family, sizes = SIZES[arch]
    cls = transformers.BartConfig if family == "bart" else transformers.T5Config
    return cls(**{**sizes, **overrides})


def save_random_model(arch: str, folder: str):
    """Writes ``arch`` with random weights (torch seed 0) to ``folder`` with ``save_pretrained``, as the hub
    stores it: BART as the bare ``BartModel`` (the architecture facebook/bart-base's config.json names: no
    LM head, no final_logits_bias, names without ``model.``), T5 as ``T5ForConditionalGeneration``. Returns
    the PyTorch model saved. The tokenizer files are the caller's."""
    import torch  # an optional dependency: only writing checkpoints needs it

    family, _ = SIZES[arch]
    torch.manual_seed(0)
    cls = transformers.BartModel if family == "bart" else transformers.T5ForConditionalGeneration
    model = cls(hf_config(arch, **({"architectures": ["BartModel"]} if family == "bart" else {})))
    model.save_pretrained(folder)
    return model
