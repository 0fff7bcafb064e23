"""T5's PyTorch -> Flax weight table: which torch tensor fills which Flax parameter, the tied aliases, the
separate v1.1 head.

  * `torch_name_table(config)`: [(torch name, flax path, transpose, torch shape)] for a T5Config (without the
    optional lm_head).
  * `params_from_torch(state_dict, config)`: a PyTorch state dict (numpy arrays) -> the Flax params of
    `t5.T5ForConditionalGeneration`, checked against that table.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flax_textvae.models.common import apply_name_table, mismatch_report
from flax_textvae.models.t5 import ffn_kind, separate_head

_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def torch_name_table(config) -> list[tuple[str, tuple[str, ...], bool, tuple[int, ...]]]:
    """Explicit PyTorch -> Flax name table for a T5Config (without the optional lm_head).

    Returns:
      [(torch name, flax path, transpose, expected torch shape)]. Linear weights [out, in] are transposed to
      Flax kernels [in, out]; embeddings and layer-norm weights are copied.
    """
    d, inner, ff, v = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
    gated, _ = ffn_kind(config)
    table = [("shared.weight", ("shared", "embedding"), False, (v, d))]
    for stack, n_layers, causal in (
        ("encoder", config.num_layers, False),
        ("decoder", config.num_decoder_layers, True),
    ):
        for i in range(n_layers):
            tl, fl = f"{stack}.block.{i}.layer", (stack, "block", str(i), "layer")
            attns = [("0", "SelfAttention")] + ([("1", "EncDecAttention")] if causal else [])
            for j, attn in attns:
                for proj in "qkv":
                    table.append((f"{tl}.{j}.{attn}.{proj}.weight", fl + (j, attn, proj, "kernel"), True, (inner, d)))
                table.append((f"{tl}.{j}.{attn}.o.weight", fl + (j, attn, "o", "kernel"), True, (d, inner)))
                table.append((f"{tl}.{j}.layer_norm.weight", fl + (j, "layer_norm", "weight"), False, (d,)))
            if i == 0:
                table.append(
                    (
                        f"{tl}.0.SelfAttention.relative_attention_bias.weight",
                        fl + ("0", "SelfAttention", "relative_attention_bias", "embedding"),
                        False,
                        (config.relative_attention_num_buckets, config.num_heads),
                    )
                )
            j = "2" if causal else "1"
            for w in ("wi_0", "wi_1") if gated else ("wi",):
                table.append(
                    (f"{tl}.{j}.DenseReluDense.{w}.weight", fl + (j, "DenseReluDense", w, "kernel"), True, (ff, d))
                )
            table.append(
                (f"{tl}.{j}.DenseReluDense.wo.weight", fl + (j, "DenseReluDense", "wo", "kernel"), True, (d, ff))
            )
            table.append((f"{tl}.{j}.layer_norm.weight", fl + (j, "layer_norm", "weight"), False, (d,)))
        table.append((f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "weight"), False, (d,)))
    return table


def params_from_torch(state_dict: Mapping[str, np.ndarray], config, *, check_only: bool = False) -> dict:
    """Maps a PyTorch T5ForConditionalGeneration state dict to Flax params (float32 jax arrays).

    The tied embedding may be stored once as shared.weight (transformers 5) or duplicated as
    encoder/decoder.embed_tokens.weight (and lm_head.weight for tied T5), any of which may stand in for a
    missing shared.weight. For a separate-head config (`separate_head`), lm_head.weight becomes 'lm_head'
    (a copy of shared.weight when the file has none). The unused decoder EncDecAttention
    relative_attention_bias is ignored, as HF does.

    Args:
      state_dict: torch name -> numpy array (any float dtype).
      config: the T5Config.
      check_only: only match names and shapes (any values with a ``shape``); returns ``{}``.

    Returns:
      Nested params dict in the HF Flax layout ({} with ``check_only``).

    Raises:
      ValueError: listing every missing, unexpected and shape-mismatched tensor.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(".version") and k not in _IGNORED}
    untied = separate_head(config)
    aliases = _EMBED_ALIASES if untied else _EMBED_ALIASES + ("lm_head.weight",)
    if "shared.weight" not in sd:
        for alias in aliases:
            if alias in sd:
                sd["shared.weight"] = sd[alias]
                break
    table = torch_name_table(config)
    if untied:
        if "lm_head.weight" not in sd and "shared.weight" in sd:
            sd["lm_head.weight"] = sd["shared.weight"]
        table.append(("lm_head.weight", ("lm_head", "kernel"), True, (config.vocab_size, config.d_model)))
    params, used, missing, mismatched = apply_name_table(sd, table, check_only=check_only)
    expected = (config.vocab_size, config.d_model)
    for alias in aliases:  # duplicated tied copies: accept when the shape fits
        if alias in sd and alias not in used:
            used.add(alias)
            if tuple(np.shape(sd[alias])) != expected:
                mismatched.append(f"{alias}: got {tuple(np.shape(sd[alias]))}, expected {expected}")
            elif alias == "lm_head.weight" and not check_only and not np.array_equal(sd[alias], sd["shared.weight"]):
                mismatched.append("lm_head.weight: differs from shared.weight, but the config ties the head")
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or mismatched:
        raise ValueError(
            mismatch_report("T5 PyTorch state dict does not match the config", missing, unexpected, mismatched)
        )
    return params
