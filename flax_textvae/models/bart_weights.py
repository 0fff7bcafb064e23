"""BART's PyTorch -> Flax weight table: which torch tensor fills which Flax parameter, and the tied aliases.

* `torch_name_table(config)`: [(torch name, flax path, transpose, torch shape)] for a BartConfig.
* `params_from_torch(state_dict, config)`: a PyTorch state dict (numpy arrays) -> the Flax params of
  `bart.BartForConditionalGeneration`, checked against that table.
* `params_from_flax(params, config)`: a Flax params tree of the LM or of the bare encoder-decoder -> the LM's.

Both accept the weights of the bare encoder-decoder (`BartModel`) as well as those of the LM: that is how the
hub stores `facebook/bart-base` and `facebook/bart-large` (config.json `"architectures": ["BartModel"]`, names
without the `model.` prefix, no `final_logits_bias`). The LM's head is the tied input embedding and its bias
starts at zeros, as transformers does when it loads such a checkpoint into `BartForConditionalGeneration`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from flax_textvae.models.bart import POSITION_OFFSET
from flax_textvae.models.common import apply_name_table, mismatch_report

_TIED_ALIASES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
_BARE_MODEL_ROOTS = ("shared", "encoder", "decoder")  # the top-level modules of `BartModel`


def _lm_names(state_dict: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """`state_dict` under the LM's names. A bare encoder-decoder's state dict (no name starts with `model.`,
    and there is no `lm_head.weight`) gets the `model.` prefix and the LM's starting `final_logits_bias`,
    zeros [1, V]; any other state dict is returned as it is, so a name missing there is reported."""
    if any(k.startswith("model.") for k in state_dict) or "lm_head.weight" in state_dict:
        return dict(state_dict)
    roots = tuple(f"{r}." for r in _BARE_MODEL_ROOTS)
    sd = {(f"model.{k}" if k.startswith(roots) else k): v for k, v in state_dict.items()}
    sd.setdefault("final_logits_bias", np.zeros((1, config.vocab_size), np.float32))
    return sd


def torch_name_table(config) -> list[tuple[str, tuple[str, ...], bool, tuple[int, ...]]]:
    """Explicit PyTorch -> Flax name table for a BartConfig.

    Returns:
      [(torch name, flax path, transpose, expected torch shape)]. Linear weights [out, in] are transposed
      to Flax kernels [in, out]; LayerNorm weight -> scale. Tied-embedding aliases are not listed (see
      params_from_torch).
    """
    d, v = config.d_model, config.vocab_size
    table = [
        ("model.shared.weight", ("model", "shared", "embedding"), False, (v, d)),
        ("final_logits_bias", ("final_logits_bias",), False, (1, v)),
    ]
    if not getattr(config, "tie_word_embeddings", True):
        table.append(("lm_head.weight", ("lm_head", "kernel"), True, (v, d)))

    def linear(tname, fpath, n_out, n_in):
        table.append((f"{tname}.weight", fpath + ("kernel",), True, (n_out, n_in)))
        table.append((f"{tname}.bias", fpath + ("bias",), False, (n_out,)))

    def norm(tname, fpath):
        table.append((f"{tname}.weight", fpath + ("scale",), False, (d,)))
        table.append((f"{tname}.bias", fpath + ("bias",), False, (d,)))

    stacks = (
        ("encoder", config.encoder_layers, config.encoder_ffn_dim, ("self_attn",)),
        ("decoder", config.decoder_layers, config.decoder_ffn_dim, ("self_attn", "encoder_attn")),
    )
    for stack, n_layers, ffn, attns in stacks:
        t0, f0 = f"model.{stack}", ("model", stack)
        table.append(
            (
                f"{t0}.embed_positions.weight",
                f0 + ("embed_positions", "embedding"),
                False,
                (config.max_position_embeddings + POSITION_OFFSET, d),
            )
        )
        norm(f"{t0}.layernorm_embedding", f0 + ("layernorm_embedding",))
        for i in range(n_layers):
            tl, fl = f"{t0}.layers.{i}", f0 + ("layers", str(i))
            for attn in attns:
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    linear(f"{tl}.{attn}.{proj}", fl + (attn, proj), d, d)
                norm(f"{tl}.{attn}_layer_norm", fl + (f"{attn}_layer_norm",))
            linear(f"{tl}.fc1", fl + ("fc1",), ffn, d)
            linear(f"{tl}.fc2", fl + ("fc2",), d, ffn)
            norm(f"{tl}.final_layer_norm", fl + ("final_layer_norm",))
    return table


def params_from_torch(state_dict: Mapping[str, np.ndarray], config, *, check_only: bool = False) -> dict:
    """Maps a PyTorch BartForConditionalGeneration (or bare BartModel) state dict to Flax params (float32).

    A bare encoder-decoder's names (no `model.` prefix, no `final_logits_bias`) are read as the LM's (see
    the module docstring). Handles both layouts of the tied embedding: stored once as model.shared.weight
    (transformers 5) and the older duplicated keys (model.encoder/decoder.embed_tokens.weight,
    lm_head.weight), which may also stand in for a missing model.shared.weight. With
    tie_word_embeddings=False, lm_head.weight is the separate head and the encoder/decoder embed_tokens copies
    must equal model.shared.weight. Keys with a '.version' suffix are ignored.

    Args:
      state_dict: torch name -> numpy array (any float dtype).
      config: the BartConfig.
      check_only: only match names and shapes (any values with a ``shape``); returns ``{}``.

    Returns:
      Nested params dict in the HF Flax layout ({} with ``check_only``).

    Raises:
      ValueError: listing every missing, unexpected and shape-mismatched tensor.
    """
    sd = _lm_names({k: v for k, v in state_dict.items() if not k.endswith(".version")}, config)
    tied = getattr(config, "tie_word_embeddings", True)
    aliases = _TIED_ALIASES if tied else _TIED_ALIASES[:2]
    if "model.shared.weight" not in sd:
        for alias in aliases:
            if alias in sd:
                sd["model.shared.weight"] = sd[alias]
                break
    params, used, missing, mismatched = apply_name_table(sd, torch_name_table(config), check_only=check_only)
    d, v = config.d_model, config.vocab_size
    for alias in aliases:  # duplicated copies of the input embedding: accept when the shape fits
        if alias in sd and alias not in used:
            used.add(alias)
            if tuple(np.shape(sd[alias])) != (v, d):
                mismatched.append(f"{alias}: got {tuple(np.shape(sd[alias]))}, expected {(v, d)}")
            elif (
                not tied
                and "model.shared.weight" in sd
                and not check_only
                and not np.array_equal(np.asarray(sd[alias]), np.asarray(sd["model.shared.weight"]))
            ):
                # transformers 5 unties encoder/decoder input embeddings too when tie_word_embeddings=False;
                # this model (like the HF Flax layout) has one input embedding, so they must agree.
                mismatched.append(
                    f"{alias}: differs from model.shared.weight (separate encoder/decoder "
                    "input embeddings are not supported)"
                )
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or mismatched:
        raise ValueError(
            mismatch_report("BART PyTorch state dict does not match the config", missing, unexpected, mismatched)
        )
    return params


def params_from_flax(params: Mapping, config) -> dict:
    """A Flax params tree (HF Flax layout) of `FlaxBartForConditionalGeneration` as it is, or of the bare
    `FlaxBartModel` (shared / encoder / decoder at the top, no `model`) nested as the LM's, with the LM's
    starting `final_logits_bias`, zeros [1, V]. Shapes are checked by the caller against the module's."""
    tree = dict(params)
    if "model" in tree or not set(_BARE_MODEL_ROOTS) & set(tree):
        return tree
    tree["model"] = {k: tree.pop(k) for k in _BARE_MODEL_ROOTS if k in tree}
    tree.setdefault("final_logits_bias", np.zeros((1, config.vocab_size), np.float32))
    return tree
