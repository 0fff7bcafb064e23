"""Checkpoint loading: HF Flax msgpack fixture, sharded safetensors, errors, offline hub ids."""

import json
import os
import pathlib
import re
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

from flax_textvae.data import synthetic_sentences
from flax_textvae.models import FOLDER_CONTENTS, CheckpointError, bart, build_module, load_pretrained, param_shapes
from flax_textvae.models.loading import folder_problems

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


def _torch_logits(model, ids, mask, dec, dmask):
    import torch

    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
            decoder_attention_mask=torch.from_numpy(dmask).long(),
        ).logits.numpy()


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_the_hubs_files_load_as_transformers_reads_them(family, tmp_path):
    """facebook/bart-base keeps the bare BartModel's weights (no `model.` prefix, no final_logits_bias) beside
    vocab.json + merges.txt; t5-small a tied T5 with spiece.model. Both give the logits transformers gives."""
    folder = tmp_path / family
    make = helpers_hf.make_hub_bart if family == "bart" else helpers_hf.make_hub_t5
    model = make(folder, synthetic_sentences(200))
    if family == "bart":
        from safetensors.numpy import load_file

        names = set(load_file(str(folder / "model.safetensors")))
        assert "shared.weight" in names and "final_logits_bias" not in names
        assert not any(n.startswith("model.") for n in names)
    assert not (folder / "tokenizer_config.json").exists()
    pre = load_pretrained(str(folder))
    pad = pre.tokenizer.pad_token_id
    texts = synthetic_sentences(2, seed=3)
    enc = pre.tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    dec, dmask = helpers_hf.padded_batch(np.random.default_rng(0), [6, 3], len(pre.tokenizer), pad, low=3)
    np.testing.assert_allclose(
        _logits(pre, ids, mask, dec, dmask), _torch_logits(model, ids, mask, dec, dmask), atol=1e-4
    )
    assert pre.tokenizer.decode(ids[0], skip_special_tokens=True).strip() == texts[0]
    if family == "bart":
        assert not np.any(np.asarray(pre.params["final_logits_bias"]))

        # The HF Flax file of a bare FlaxBartModel (shared / encoder / decoder at the top) loads the same.
        flax_folder = tmp_path / "flax"
        shutil.copytree(folder, flax_folder)
        (flax_folder / "model.safetensors").unlink()
        bare = jax.tree.map(np.asarray, pre.params["model"])
        (flax_folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(bare))
        again = load_pretrained(str(flax_folder))
        got, want = flatten_dict(again.params, sep="/"), flatten_dict(pre.params, sep="/")
        assert set(got) == set(want)
        for path, a in want.items():
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(a), err_msg=path)


def test_weights_of_another_config_are_a_checkpoint_error_naming_the_fix(tmp_path):
    folder = tmp_path / "wide"
    helpers_hf.make_tiny_bart(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(d_model=24, encoder_layers=3)  # the weights are d_model 16, 2 layers
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(str(folder))
    assert isinstance(err.value, OSError) and isinstance(err.value, ValueError)  # a user error; a mismatch
    msg = str(err.value)
    assert f"the weights in {folder} do not fit its config.json" in msg and "save_pretrained" in msg
    assert "missing (16):" in msg and "model.encoder.layers.2.fc1.weight" in msg
    assert re.search(r"shape mismatch \((\d+)\):", msg) and "... and " in msg  # every tensor, 12 shown
    assert len(msg.splitlines()) < 50


def test_folder_problems_are_found_without_reading_weights(tmp_path):
    helpers_hf.make_tiny_bart(tmp_path / "good")
    assert folder_problems(str(tmp_path / "good")) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert folder_problems(str(empty)) == ["has no config.json"]
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    problems = folder_problems(str(other))
    assert len(problems) == 3 and "model_type 'gpt2'" in problems[0]
    assert "has no weights" in problems[1] and "has no tokenizer files" in problems[2]
    (other / "config.json").write_text("[1, 2]")
    assert "not a JSON object" in folder_problems(str(other))[0]
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        (other / "config.json").write_text('{"model_type": "gpt2"}')
        load_pretrained(str(other))
    (other / "config.json").write_text('{"model_type": "no-such-model"}')  # unknown to transformers too
    with pytest.raises(CheckpointError, match="no-such-model"):
        load_pretrained(str(other))

    # Weights of another config, found from the safetensors header (no tensor read), then at load time.
    wide = tmp_path / "wide"
    shutil.copytree(tmp_path / "good", wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(config, decoder_layers=3)))
    (problem,) = folder_problems(str(wide))
    assert problem.startswith("its weights do not fit its config.json (bart):\n      missing (26):")
    with pytest.raises(CheckpointError, match="missing \\(26\\)"):
        load_pretrained(str(wide))

    # A sharded checkpoint whose index names a shard that is not there; a damaged weights file.
    sharded = tmp_path / "sharded"
    helpers_hf.make_tiny_bart(sharded).save_pretrained(str(sharded), max_shard_size="40KB")
    (sharded / "model.safetensors").unlink(missing_ok=True)
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    (problem,) = folder_problems(str(sharded))
    assert "cannot be read (FileNotFoundError" in problem and shard.name in problem
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "good", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    assert "its weights cannot be read" in folder_problems(str(broken))[0]
    with pytest.raises(CheckpointError, match="cannot read the weights file .*model.safetensors"):
        load_pretrained(str(broken))


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
