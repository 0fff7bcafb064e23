"""The pretrained path end to end: a local Hugging Face checkpoint folder -> two-phase training -> evaluation
and TextVAE.load, for a tiny BART and a tiny T5 v1.1 saved by transformers + torch."""

import os
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flax_textvae import TextVAE, builders, evaluate, models, train
from flax_textvae.data import synthetic_vocabulary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_hf  # noqa: E402
from test_train import tiny_config  # noqa: E402


# T5 checkpoints go through the shipped-config runs of the default set too (test_shipped_configs.py)
@pytest.mark.parametrize("family", ["bart", pytest.param("t5", marks=pytest.mark.slow)])
def test_train_from_a_local_checkpoint_then_evaluate_and_load(tmp_path, family):
    folder = str(tmp_path / f"tiny_{family}")
    words = synthetic_vocabulary()  # the tokenizer covers the synthetic corpus: no <unk> in the data
    if family == "bart":
        helpers_hf.make_tiny_bart(folder, vocab_words=words)
    else:
        helpers_hf.make_tiny_t5(folder, v1_1=True, vocab_words=words)
    pre = models.load_pretrained(folder)
    workdir = str(tmp_path / "run")
    config = tiny_config(
        **{
            "model.name_or_path": folder,
            "train_steps": 8,
            "phase1.steps": 4,
            "eval_every": 4,
            "checkpoint_every": 4,
            "log_every": 4,
            "vae.injection": "memory,cross_attention",
            "data.num_buckets": 1,  # one compiled shape per program (bucketing has tests of its own)
        }
    )

    run = builders.build_run(config, workdir)
    params = run.init_params(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(pre.params)):
        np.testing.assert_array_equal(a, b)  # the pretrained weights, not a random init, start the run
    assert os.path.isfile(os.path.join(workdir, "model", "config.json"))

    result = train.train_and_evaluate(config, workdir)
    assert result["num_examples"] == 64 and np.isfinite(result["neg_elbo"])
    ev = evaluate.evaluate(config, workdir, iw_samples=4)
    assert ev["nll"] <= ev["neg_elbo"] + 1e-3
    # Resuming needs no access to the original checkpoint folder: the backbone is rebuilt from WORKDIR/model.
    os.rename(folder, folder + "_gone")
    again = train.train_and_evaluate(config, workdir)  # finished: re-evaluates the final checkpoint
    assert again == result
    vae = TextVAE.load(workdir)
    out = vae.reconstruct(["the old man sees a small dog"])
    assert len(out) == 1 and isinstance(out[0], str)


def _vae_init(run, key):
    """The VAE's own initialisation of every tensor it reads (backbone included), as one jitted program."""
    ids = jax.numpy.ones((2, 8), jax.numpy.int32)
    return jax.jit(lambda k: run.model.init({"params": k}, ids, ids, ids, sample=False)["params"])(key)


@pytest.mark.parametrize("injection", ["memory", "memory,cross_attention"])
def test_init_params_with_a_pretrained_backbone_keeps_the_heads_of_the_full_initialisation(tmp_path, injection):
    folder = str(tmp_path / "tiny_bart")
    helpers_hf.make_tiny_bart(folder, vocab_words=synthetic_vocabulary())
    run = builders.build_run(tiny_config(**{"model.name_or_path": folder, "vae.injection": injection}), str(tmp_path))
    key = jax.random.key(5)
    params = run.init_params(key)  # the random backbone is never computed
    reference = _vae_init(run, key)
    assert set(params) == set(reference)
    for name in set(params) - {"backbone"}:  # posterior heads, latent projections: the same draws
        for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(reference[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert params["backbone"] is run.backbone_params


def test_init_params_from_scratch_fills_the_unused_tensors_from_the_backbone_initialisation(tmp_path):
    run = builders.build_run(tiny_config(), str(tmp_path))  # memory injection: cross-attention is never read
    assert run.unused_param_patterns(), "the tiny config leaves the cross-attention unused"
    key = jax.random.key(5)
    params = flatten_dict(run.init_params(key), sep="/")
    own = flatten_dict(_vae_init(run, key), sep="/")
    rest = flatten_dict(models.init_params(run.model.backbone, jax.random.fold_in(key, 1)), sep="/")
    expected = {**{"backbone/" + k: v for k, v in rest.items()}, **own}
    assert set(params) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
