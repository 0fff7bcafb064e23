"""Training: the loss goes down, phase 1 freezes the decoder, NaN stops the run, resume is exact, a stop saves."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import builders, checkpoints, train
from flax_textvae import workdir as rundir
from flax_textvae.configuration import with_overrides
from flax_textvae.step import param_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import tiny  # noqa: E402  (configs/tiny.py)


def tiny_config(**overrides):
    """``configs/tiny.py`` with dotted-key overrides (``{'phase1.steps': 20}``)."""
    return with_overrides(tiny.get_config(), **overrides)


def _runner(config, run, phase, end):
    params = run.init_params(jax.random.key(config.seed))
    first = config.phase1.steps if phase == 2 else 0
    runner = train.Trainer(config, run, phase, first, end, params)
    return runner, runner.place(runner.new_state(params, first, jax.random.key(1)))


def fit_fixed_batch(tmp_path, steps, **overrides):
    """(losses, final state) of ``steps`` phase-2 steps on one batch, constant learning rate."""
    config = tiny_config(**{"phase1.steps": 0, "optimizer.warmup_steps": 0, "optimizer.decay": "constant", **overrides})
    run = builders.build_run(config, str(tmp_path))
    runner, state = _runner(config, run, 2, steps)
    batch = runner.batch(next(run.train_iter))
    losses = []
    for _ in range(steps):
        state, m = runner.step(state, batch)
        losses.append(float(m["loss"]))
    return losses, state


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    losses, _ = fit_fixed_batch(tmp_path, 60)
    assert losses[-1] < 0.75 * losses[0], losses
    assert np.all(np.isfinite(losses))


def test_phase1_leaves_the_decoder_bit_identical(tmp_path):
    config = tiny_config(**{"optimizer.weight_decay": 0.01})
    run = builders.build_run(config, str(tmp_path))
    runner, state = _runner(config, run, 1, 10)
    before = jax.device_get(state.params)
    for _ in range(5):
        state, m = runner.step(state, runner.batch(next(run.train_iter)))
        assert float(m["kl_weight"]) == 0.0
    after = jax.device_get(state.params)
    labels = param_labels(before, config.phase1.frozen)
    flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
    frozen = changed = 0
    for (path, b), (_, a), (_, lab) in zip(flat(before), flat(after), flat(labels)):
        name = jax.tree_util.keystr(path)
        if lab == "frozen":
            frozen += 1
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            changed += int(not np.array_equal(a, b))
    assert frozen >= 10, "the decoder, shared embedding and final_logits_bias must be frozen"
    assert changed >= 5, "encoder and latent layers must train in phase 1"
    assert any("decoder" in jax.tree_util.keystr(p) and lab == "frozen" for p, lab in flat(labels))
    # The encoder stack trains (the decoder's cross-attention, 'encoder_attn', is part of the decoder).
    assert not any("['encoder']" in jax.tree_util.keystr(p) and lab == "frozen" for p, lab in flat(labels))


_BACKEND_COMPILES = []


def _count_compile(name: str, secs: float, **kwargs) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES.append(secs)


jax.monitoring.register_event_duration_secs_listener(_count_compile)


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_the_step_compiles_once_per_shape_from_the_placed_state(tmp_path, mode):
    config = tiny_config(**{"parallel.mode": mode, "data.num_buckets": 1})
    run = builders.build_run(config, str(tmp_path))
    runner, state = _runner(config, run, 1, config.phase1.steps)
    batch = runner.batch(next(run.train_iter))
    placed = [x.sharding for x in jax.tree.leaves(state)]
    state, _ = runner.step(state, batch)
    jax.block_until_ready(state)
    assert [x.sharding for x in jax.tree.leaves(state)] == placed, "the step's output is placed like its input"
    before = len(_BACKEND_COMPILES)
    for _ in range(2):
        state, _ = runner.step(state, runner.batch(next(run.train_iter)))
    jax.block_until_ready(state)
    assert len(_BACKEND_COMPILES) == before, "later steps reuse the first step's program"


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from flax_textvae import step as step_lib

    bad_from = 7
    monkeypatch.setattr(step_lib, "kl_weight_schedule", lambda cfg: (lambda s: jnp.where(s >= bad_from, jnp.nan, 1.0)))
    config = tiny_config(**{"phase1.steps": 0, "checkpoint_every": 3, "log_every": 5, "train_steps": 12})
    with pytest.raises(train.NonFiniteLossError, match=f"step {bad_from}") as err:
        train.train_and_evaluate(config, str(tmp_path))
    assert "last checkpoint on disk is step 6" in str(err.value)
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 6
    params, _ = checkpoints.load_params(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))
    ckpt.close()


def _cli(workdir, *overrides, **popen):
    cmd = [
        sys.executable,
        os.path.join(REPO, "run_train.py"),
        f"--config={REPO}/configs/tiny.py",
        f"--workdir={workdir}",
        *overrides,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


RESUME_FLAGS = (
    "--config.train_steps=300",
    "--config.phase1.steps=100",
    "--config.checkpoint_every=20",
    "--config.eval_every=0",
    "--config.log_every=20",
    "--config.denoise.delete_rate=0.3",
    "--config.model.scratch.dropout=0.1",
    "--config.data.num_buckets=1",  # one compiled shape per phase (bucketing has tests of its own)
)


def _wait_for_checkpoint(workdir, proc, min_step, timeout=240):
    ckdir = os.path.join(workdir, "checkpoints")
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
        if steps and max(steps) >= min_step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError("training ended before it could be interrupted:\n" + proc.stdout.read())
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _wait_for_logged_step(workdir, proc, min_step, timeout=240):
    """Block until ``metrics.jsonl`` holds a training row at ``min_step`` or later (the loop is past it)."""
    log = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(log):
            rows = [json.loads(line) for line in open(log) if line.endswith("\n")]
            done = [r["step"] for r in rows if r.get("split") != "eval"]
            if done and max(done) >= min_step:
                return max(done)
        if proc.poll() is not None:
            raise AssertionError("training ended before it could be interrupted:\n" + proc.stdout.read())
        time.sleep(0.02)
    raise AssertionError(f"no training row at step >= {min_step} appeared")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    p = _cli(full, *RESUME_FLAGS)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    p = _cli(cut, *RESUME_FLAGS)
    killed_after = _wait_for_checkpoint(cut, p, 140)  # in phase 2, past the phase switch
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert killed_after < 300
    p = _cli(cut, *RESUME_FLAGS)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    assert "Resuming from step" in out
    a, step_a = checkpoints.load_params(full)
    b, step_b = checkpoints.load_params(cut)
    assert step_a == step_b == 300
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in open(os.path.join(cut, "metrics.jsonl"))]
    assert {"step", "phase", "loss", "rec", "kl"} <= set(rows[0])
    steps = [r["step"] for r in rows if r.get("split") != "eval"]
    assert steps == sorted(set(steps)), "rows logged after the last checkpoint are dropped on resume"


@pytest.mark.parametrize(
    "signum,name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")], ids=["sigterm", "ctrl-c"]
)
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum, name):
    workdir = str(tmp_path / "run")
    p = _cli(workdir, *RESUME_FLAGS, "--config.checkpoint_every=100000")
    # checkpoint_every is huge: the only checkpoints are the phase-1 end and the one the signal makes.
    first = _wait_for_checkpoint(workdir, p, 100)
    # Wait until phase 2 has logged a step past that checkpoint, so the signal's save must be a later step.
    logged = _wait_for_logged_step(workdir, p, first + 1)
    p.send_signal(signum)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    saved = re.search(rf"{name}: saved the checkpoint of step (\d+) in", out)
    assert saved, out
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == int(saved.group(1)) >= logged > first, (steps, logged, out)
    assert "Traceback" not in out, out


def test_a_second_ctrl_c_quits_without_saving_and_the_cli_exits_130(tmp_path, monkeypatch, capfd):
    """The first Ctrl-C asks for a save after the step; a second one, before that save, quits at once."""
    from flax_textvae import cli, trainer

    workdir = str(tmp_path / "run")
    overrides = {"phase1.steps": 0, "train_steps": 40, "checkpoint_every": 20, "log_every": 5, "eval_every": 0}
    config = tiny_config(**overrides, **{"data.num_buckets": 1})
    step = trainer.TrainLoop._train_step

    def step_then_two_interrupts(self, state):
        state = step(self, state)
        if self.step == 25:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return state

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(trainer.TrainLoop, "_train_step", step_then_two_interrupts)
    with pytest.raises(SystemExit) as exit_:
        cli._guarded(lambda argv: train.train_and_evaluate(config, workdir), [])
    assert exit_.value.code == cli.INTERRUPTED_EXIT == 130
    err = capfd.readouterr().err
    assert "Ctrl-C: saving a checkpoint after this step" in err, err  # the first one was the run's
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err, err
    assert rundir.checkpoint_steps(workdir) == [20]  # no save after the interrupts
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone
    assert not open(os.path.join(workdir, ".lock")).read()  # the lock was let go (its holder record emptied)


@pytest.mark.parametrize(
    "overrides",
    [
        {"parallel.mode": "pmap"},
        {"optimizer.grad_accum_steps": 2},
        {"parallel.mode": "pmap", "loss.kind": "free_bits", "loss.free_bits_mode": "batch"},
    ],
)
def test_objectives_of_the_whole_batch_refuse_per_shard_modes(tmp_path, overrides):
    """beta * |KL - C| and batch free bits need the global batch mean: pmap / accumulation would be wrong."""
    config = tiny_config(**{"phase1.steps": 0, "loss.kind": "constraint", **overrides})
    run = builders.build_run(config, str(tmp_path))
    with pytest.raises(ValueError, match="whole batch"):
        _runner(config, run, 2, 10)


def test_prefetching_trains_to_the_same_parameters_and_checkpoints_the_same_positions(tmp_path):
    # Both phases (the iterator is handed from phase 1 to phase 2), checkpoints mid-phase.
    base = {
        "train_steps": 24,
        "phase1.steps": 10,
        "checkpoint_every": 6,
        "log_every": 6,
        "eval_every": 0,
        "keep_checkpoints": 10,
    }
    plain, ahead = str(tmp_path / "plain"), str(tmp_path / "ahead")
    train.train_and_evaluate(tiny_config(**base, **{"data.prefetch": 0}), plain)
    train.train_and_evaluate(tiny_config(**base, **{"data.prefetch": 3}), ahead)
    a, step_a = checkpoints.load_params(plain)
    b, step_b = checkpoints.load_params(ahead)
    assert step_a == step_b == 24
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    want, got = checkpoints.Checkpointer(plain), checkpoints.Checkpointer(ahead)
    for step in (6, 12, 18, 24):  # the position of the batches stepped on, not of those drawn ahead
        assert got.read_meta(step)["data"] == want.read_meta(step)["data"], step
    want.close()
    got.close()
