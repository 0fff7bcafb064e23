"""Every shipped config that names a pretrained model trains on checkpoints written by transformers.

For each file in ``configs/`` whose ``model.name_or_path`` is not ``'scratch'`` and each family it can load, a
tiny checkpoint folder goes through what a user runs. BART and T5 v1.0 come in the files the hub holds for
facebook/bart-base and t5-small (BART: the bare ``BartModel``'s weights and a byte-level BPE as vocab.json +
merges.txt; T5: a sentencepiece spiece.model smaller than the embedding; neither has a tokenizer_config.json);
T5 v1.1 (gated FFN, untied head) is what ``save_pretrained`` of the LM and a word tokenizer write. The run:
``train_and_evaluate`` (phase 1 -> phase 2, the config's own injection, memory style, loss, denoising and
frozen set), ``run_eval.py`` in a subprocess, ``flax_textvae.load`` -> ``reconstruct``. Only the sizes are
shrunk. A new config file is picked up without editing this test.

The default run covers every config once and every family at least once; the rest of the cross product is
marked slow (``.ci/run`` runs it).
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import flax_textvae
from flax_textvae import checkpoints, models, train
from flax_textvae.configuration import with_overrides
from flax_textvae.data import synthetic_sentences, synthetic_vocabulary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("bart", "t5", "t5_v1_1")
SMALL = {
    "data.train": "synthetic:96",
    "data.eval": "synthetic:16:1",
    "data.max_length": 24,
    "data.num_buckets": 1,  # one batch shape: half the compiles (bucketing has its own tests)
    "data.eval_max_examples": 0,
    "batch_size": 8,
    "train_steps": 6,
    "phase1.steps": 3,
    "eval_every": 3,
    "checkpoint_every": 3,
    "log_every": 3,
    "keep_checkpoints": 2,
    "optimizer.warmup_steps": 1,
}


def _load_config_module(path):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def pretrained_configs() -> list[str]:
    """Config stems in configs/ whose model is a pretrained checkpoint (not built from scratch)."""
    names = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        if _load_config_module(path).model.name_or_path != "scratch":
            names.append(os.path.splitext(os.path.basename(path))[0])
    return names


def _cases():
    cases = []
    for i, name in enumerate(pretrained_configs()):
        for j, family in enumerate(FAMILIES):
            marks = [] if (i + j) % len(FAMILIES) == 0 else [pytest.mark.slow]
            cases.append(pytest.param(name, family, marks=marks, id=f"{name}-{family}"))
    return cases


def test_the_pretrained_configs_are_discovered():
    names = pretrained_configs()
    assert {"bart_vae", "t5_vae", "kl_constraint", "park_lee_t5"} <= set(names)
    assert "tiny" not in names and "demo" not in names


@pytest.fixture(scope="module")
def checkpoints_by_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    texts = synthetic_sentences(400, seed=7)  # the tokenizers are learned from the synthetic corpus
    built = {}

    def get(family):
        if family not in built:
            folder = str(root / family)
            if family == "bart":
                helpers_hf.make_hub_bart(folder, texts)
            elif family == "t5":
                helpers_hf.make_hub_t5(folder, texts)
            else:
                helpers_hf.make_tiny_t5(folder, v1_1=True, vocab_words=synthetic_vocabulary())
            built[family] = folder
        return built[family]

    return get


@pytest.mark.parametrize("name,family", _cases())
def test_shipped_config_trains_evaluates_and_reloads(name, family, checkpoints_by_family, tmp_path):
    folder = checkpoints_by_family(family)
    config = with_overrides(
        _load_config_module(os.path.join(REPO, "configs", f"{name}.py")), **{"model.name_or_path": folder, **SMALL}
    )
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    assert result["num_examples"] == 16 and np.isfinite(result["neg_elbo"]) and result["kl"] > 0

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {r["phase"] for r in rows if r.get("split") != "eval"} == {1, 2}

    # The run holds the complete pretrained backbone; what the forward pass never reads is untouched.
    pre = models.load_pretrained(folder)
    params, _ = checkpoints.load_params(workdir)
    trained, original = flatten_dict(params["backbone"], sep="/"), flatten_dict(pre.params, sep="/")
    assert set(trained) == set(original)
    unused = [k for k in original if ("encoder_attn" in k or "EncDecAttention" in k)]
    if "cross_attention" not in config.vae.injection:
        assert unused and all(np.array_equal(trained[k], original[k]) for k in unused)
    assert any(not np.array_equal(trained[k], original[k]) for k in original)  # phase 2 trained the rest

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_eval.py"), f"--workdir={workdir}", "--iw_samples=4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "synthetic.json")) as f:
        ev = json.load(f)
    assert ev["num_examples"] == 16 and ev["iw_samples"] == 4
    assert np.isfinite(ev["nll"]) and ev["nll"] <= ev["neg_elbo"] + 1e-3

    vae = flax_textvae.load(workdir)
    texts = synthetic_sentences(2, seed=5)
    out = vae.reconstruct(texts)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    mean, logvar = vae.encode(texts)
    assert mean.shape == (2, config.vae.latent_size) and np.all(np.isfinite(logvar))
    jax.clear_caches()
