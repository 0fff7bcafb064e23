"""Performance properties: one compile per bucket shape, bf16 training, gradient accumulation, the benchmark."""

import os
import sys

import jax
import numpy as np

from flax_textvae import builders, trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import _runner, fit_fixed_batch, tiny_config  # noqa: E402


def test_step_compiles_once_per_bucket_shape_and_never_in_the_steady_loop(tmp_path, monkeypatch):
    traces = []
    real_step = trainer.train_step

    def counting_step(state, batch, **kw):
        traces.append(batch["input_ids"].shape)  # runs only while jax traces the function
        return real_step(state, batch, **kw)

    monkeypatch.setattr(trainer, "train_step", counting_step)
    config = tiny_config(**{"phase1.steps": 0, "data.num_buckets": 3})
    run = builders.build_run(config, str(tmp_path))
    steps_per_epoch = run.train_iter.steps_per_epoch
    runner, state = _runner(config, run, 2, 3 * steps_per_epoch)
    seen = set()
    for i in range(2 * steps_per_epoch):
        batch = next(run.train_iter)
        seen.add(batch["input_ids"].shape)
        state, m = runner.step(state, runner.batch(batch))
        if i == steps_per_epoch - 1:
            first_epoch = list(traces)
    jax.block_until_ready(m["loss"])
    assert 2 <= len(seen) <= 4  # bounded number of shapes
    assert sorted(traces) == sorted(seen), "exactly one trace per bucket shape"
    assert traces == first_epoch, "no tracing after every shape was seen once"


def test_bfloat16_training_reduces_the_loss(tmp_path):
    losses, state = fit_fixed_batch(tmp_path, 40, **{"model.dtype": "bfloat16"})
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    leaves = jax.tree.leaves(jax.device_get(state.params))
    assert all(x.dtype == np.float32 for x in leaves), "parameters stay float32 under bf16 compute"


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    params = {}
    for accum in (1, 4):
        config = tiny_config(
            **{
                "phase1.steps": 0,
                "optimizer.grad_accum_steps": accum,
                "denoise.delete_rate": 0.3,
                "loss.kl_schedule.kind": "constant",
            }
        )
        run = builders.build_run(config, str(tmp_path / str(accum)))
        runner, state = _runner(config, run, 2, 3)
        for _ in range(3):
            state, m = runner.step(state, runner.batch(next(run.train_iter)))
        params[accum] = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[4])):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
