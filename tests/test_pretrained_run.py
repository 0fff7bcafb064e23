"""The pretrained path end to end: a local Hugging Face checkpoint folder -> two-phase training -> evaluation
and TextVAE.load, for a tiny BART and a tiny T5 v1.1 saved by transformers + torch."""

import os
import sys

import jax
import numpy as np
import pytest

from flax_textvae import TextVAE, builders, evaluate, models, train
from flax_textvae.data import synthetic_vocabulary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_hf  # noqa: E402
from test_train import tiny_config  # noqa: E402


@pytest.mark.parametrize("family", ["bart", "t5"])
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
