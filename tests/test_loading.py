"""Checkpoint loading: HF Flax msgpack fixture, sharded safetensors, errors, offline hub ids."""

import json
import os
import pathlib
import shutil
import time

import helpers_hf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import serialization
from flax.traverse_util import flatten_dict

from flax_textvae.models import FOLDER_CONTENTS, bart, build_module, load_pretrained, param_shapes

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_bart_flax"
ARRAYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


def _logits(pre, ids, mask, dec, dmask):
    return np.asarray(jax.jit(lambda p: pre.module.apply({"params": p}, ids, mask, dec, dmask))(pre.params))


def test_msgpack_fixture_written_by_transformers4_matches_torch():
    produced = json.loads((FIXTURE / "PRODUCED_BY.json").read_text())
    assert produced["transformers"].startswith("4.")
    pre = load_pretrained(str(FIXTURE))
    assert isinstance(pre.module, bart.BartForConditionalGeneration)
    arrays = [np.load(FIXTURE / f"{name}.npy") for name in ARRAYS]
    np.testing.assert_allclose(_logits(pre, *arrays), np.load(FIXTURE / "torch_logits.npy"), atol=1e-4, rtol=0)
    assert pre.tokenizer("w0 w1")["input_ids"] == [0, 4, 5, 2]
    assert pre.path == str(FIXTURE)


def test_msgpack_shape_mismatch_lists_paths(tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(FIXTURE, folder)
    params = serialization.msgpack_restore((FIXTURE / "flax_model.msgpack").read_bytes())
    params["model"]["decoder"]["layers"]["1"]["fc1"]["kernel"] = np.zeros((3, 3), np.float32)
    del params["model"]["encoder"]["layers"]["0"]["fc2"]["bias"]
    params["extra"] = {"kernel": np.zeros(2, np.float32)}
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    with pytest.raises(ValueError) as err:
        load_pretrained(str(folder))
    msg = str(err.value)
    for part in ("model/decoder/layers/1/fc1/kernel", "model/encoder/layers/0/fc2/bias", "extra/kernel"):
        assert part in msg, msg


def test_sharded_safetensors_and_bf16_weights(tmp_path):
    import torch

    folder = tmp_path / "sharded"
    model = helpers_hf.make_tiny_bart(folder, seed=5)
    os.remove(folder / "model.safetensors")
    model.save_pretrained(str(folder), max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    pre = load_pretrained(str(folder))
    rng = np.random.default_rng(0)
    ids, mask = helpers_hf.padded_batch(rng, [5, 2], 64, 1)
    dec, dmask = helpers_hf.padded_batch(rng, [3, 4], 64, 1)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
            decoder_attention_mask=torch.from_numpy(dmask).long(),
        ).logits.numpy()
    np.testing.assert_allclose(_logits(pre, ids, mask, dec, dmask), ref, atol=1e-4, rtol=0)
    # a bfloat16 checkpoint loads as float32 params
    half = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(str(half))
    shutil.copy(folder / "tokenizer.json", half)
    shutil.copy(folder / "tokenizer_config.json", half)
    pre16 = load_pretrained(str(half))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pre16.params))
    emb = np.asarray(pre16.params["model"]["shared"]["embedding"])
    np.testing.assert_allclose(emb, np.asarray(pre.params["model"]["shared"]["embedding"]), atol=1e-2)


def test_offline_hub_id_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(OSError) as err:
        load_pretrained("no-such-org-xyz/tiny-bart-never-published")
    assert time.time() - start < 10
    msg = str(err.value)
    assert "local folder" in msg and "config.json" in msg and "flax_model.msgpack" in msg, msg


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(str(tmp_path / "does" / "not" / "exist"))
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(FIXTURE / "config.json", folder)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(str(folder))
    assert "tokenizer" in FOLDER_CONTENTS


def test_unsupported_model_type():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        build_module(GPT2Config(n_layer=1, n_embd=8, n_head=2))


def test_param_shapes_follow_the_config_not_a_cached_earlier_module():
    def module(**sizes):
        fields = dict(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, max_position_embeddings=32)
        fields.update(encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
        return build_module(transformers.BartConfig(**{**fields, **sizes}))

    def sizes(tree):
        return {k: v.shape for k, v in flatten_dict(tree, sep="/").items()}

    small = sizes(param_shapes(module()))
    assert small == sizes(param_shapes(module())), "an equal config gives the same shapes"
    wider = sizes(param_shapes(module(d_model=24)))
    assert wider["model/shared/embedding"] == (40, 24) and small["model/shared/embedding"] == (40, 16)
    deeper = sizes(param_shapes(module(encoder_layers=2)))
    assert len(deeper) > len(small)
    tree = param_shapes(module())
    tree.clear()  # each call hands out its own tree
    assert sizes(param_shapes(module())) == small
