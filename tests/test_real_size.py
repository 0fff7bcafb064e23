"""Real-size architectures: bart-base, t5-small and t5-v1_1-small (random weights, the sizes of their public
config.json) saved by transformers, loaded by ``load_pretrained``, one training step of the shipped config,
and a checkpoint round trip.

Slow (about a minute per architecture on 2 CPU cores): ``pytest -m slow tests/test_real_size.py``; ``.ci/run``
runs it.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flax_textvae import builders, checkpoints, models
from flax_textvae.configuration import with_overrides
from flax_textvae.data import synthetic_vocabulary
from flax_textvae.step import StepConfig, TrainState, kl_fns, make_optimizer, train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import archs  # noqa: E402
import bart_vae  # noqa: E402
import park_lee_t5  # noqa: E402
import t5_vae  # noqa: E402

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

# The sizes of each checkpoint's public config.json (weights are random: no hub here), and its shipped config.
ARCHS = {
    name: (archs.SIZES[name][0], config_module, archs.SIZES[name][1])
    for name, config_module in (("bart-base", bart_vae), ("t5-small", t5_vae), ("t5-v1_1-small", park_lee_t5))
}


def _save_checkpoint(folder: str, arch: str, family: str, sizes: dict) -> int:
    """Writes a random model of ``arch`` + a word tokenizer with ``save_pretrained``; returns #parameters."""
    helpers_hf.make_word_tokenizer(folder, synthetic_vocabulary(), family)
    model = archs.save_random_model(arch, folder)
    # BART is saved as the bare BartModel (as the hub has bart-base), whose LM here adds final_logits_bias;
    # transformers 5 ties a T5 v1.1 head to the input embedding, which the separate-head module here holds as
    # its own lm_head.
    extra = model.config.vocab_size if family == "bart" else 0
    if family == "t5" and not sizes.get("tie_word_embeddings", True):
        if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
            extra += model.lm_head.weight.numel()
    return sum(p.numel() for p in model.parameters()) + extra


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_real_size_architecture_loads_steps_and_round_trips(arch, tmp_path):
    family, config_module, sizes = ARCHS[arch]
    folder = str(tmp_path / arch)
    n_torch = _save_checkpoint(folder, arch, family, sizes)

    pre = models.load_pretrained(folder)
    leaves = jax.tree.leaves(pre.params)
    # Every PyTorch parameter is here once (a T5 without the v1.0 tie has its own lm_head, also in torch).
    assert sum(x.size for x in leaves) == n_torch
    assert pre.module.d_model == sizes["d_model"] and pre.module.vocab_size == sizes["vocab_size"]

    config = with_overrides(
        config_module.get_config(),
        **{
            "model.name_or_path": folder,
            "data.train": "synthetic:32",
            "data.eval": "synthetic:8:1",
            "data.max_length": 16,
            "data.num_buckets": 1,
            "batch_size": 4,
            "train_steps": 2,
            "phase1.steps": 0,
            "optimizer.warmup_steps": 0,
        },
    )
    workdir = str(tmp_path / "run")
    run = builders.build_run(config, workdir, with_eval=False)
    params = run.init_params(jax.random.key(0))
    full = flatten_dict(params["backbone"], sep="/")
    assert set(full) == set(flatten_dict(pre.params, sep="/"))  # the whole backbone, cross-attention included

    frozen = run.unused_param_patterns()
    tx, lr = make_optimizer(config.optimizer, config.train_steps, params, frozen)
    cfg = StepConfig(
        kind=config.loss.kind,
        free_bits=config.loss.free_bits,
        free_bits_mode=config.loss.free_bits_mode,
        beta=config.loss.beta,
        delete_rate=config.denoise.delete_rate,
        special_ids=run.special_ids,
        pad_id=run.pad_id,
        mask_id=run.mask_id,
        unk_id=run.unk_id,
        frozen=frozen,
    )
    wfn, tfn = kl_fns(config.loss, 2)
    step = jax.jit(
        functools.partial(train_step, model=run.model, tx=tx, cfg=cfg, kl_weight_fn=wfn, kl_target_fn=tfn, lr_fn=lr)
    )
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jnp.array(jax.random.key_data(jax.random.key(1))),
    )
    batch = {k: jnp.asarray(v) for k, v in next(run.train_iter).items()}
    new, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    assert metrics["nonfinite"] == 0 and np.isfinite(metrics["loss"]) and metrics["rec"] > 0
    before, after = flatten_dict(params, sep="/"), flatten_dict(jax.device_get(new.params), sep="/")
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert "to_moments/kernel" in changed and any(k.startswith("backbone/") for k in changed)
    unused = {k for k in before if "encoder_attn" in k or "EncDecAttention" in k}
    assert unused and not (unused & changed)  # cross-attention is unused by 'memory': no update, no decay

    ckpt = checkpoints.Checkpointer(workdir, keep=1)
    ckpt.save(1, new, {"step": 1, "phase": 2})
    restored, meta = ckpt.restore(checkpoints.abstract_like(jax.device_get(new)))
    ckpt.close()
    assert meta["step"] == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(new))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params_only, step_on_disk = checkpoints.load_params(workdir)
    assert step_on_disk == 1
    np.testing.assert_array_equal(params_only["to_moments"]["kernel"], after["to_moments/kernel"])
