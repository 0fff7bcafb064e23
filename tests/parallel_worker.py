"""Subprocess side of tests/test_parallel.py: trains the tiny VAE under several device layouts.

Run by the tests (never imported by pytest), because the device count must be fixed before JAX starts:

* ``single --devices 4 --out DIR``: one process with ``--devices`` fake CPU devices
  (``--xla_force_host_platform_device_count``). Builds the run once, draws ``--steps`` batches and trains the
  same initial state under each layout (1 device; mesh data=4; mesh data=2 x fsdp=2; pmap over 4). Writes
  ``DIR/single.json`` (max |param - baseline| per layout, which parameters fsdp really sharded) and
  ``DIR/baseline.npz`` (the 1-device parameters).
* ``multi --process_id i --num_processes n --port P --devices d --out DIR``: one of ``n`` local processes
  joined by ``jax.distributed`` (through ``parallel.initialize_distributed``), ``d`` CPU devices each. Every
  process feeds its own rows of each global batch; after the steps it writes ``DIR/multi_<i>.npz`` (its
  addressable copy of the replicated parameters) and prints a JSON digest line.
* ``preempt --process_id i --num_processes n --port P --out DIR --signal_at S``: the whole of
  ``train.train_and_evaluate`` in one workdir shared by the ``n`` processes (``DIR/run``, process 0 writes it);
  only process 1 sends itself SIGTERM, right after step ``S`` (``S = 0``: while the run is being built, before
  any step). Prints ``RESULT <json>`` (what the call returned).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["single", "multi", "preempt"])
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=4, help="CPU devices in this process")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mode", default="mesh", help="multi: parallel.mode")
    p.add_argument("--fsdp", type=int, default=1, help="multi: parallel.fsdp")
    p.add_argument("--signal_at", type=int, default=-1, help="preempt: process 1 gets SIGTERM after this step")
    return p.parse_args()


ARGS = _parse()
# Before JAX is imported: the fake device count, CPU only. Backend optimisation level 0 compiles about twice
# as fast (the steps are tiny); every layout is compiled with the same flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    f" --xla_force_host_platform_device_count={ARGS.devices}"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "configs")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tiny  # noqa: E402  (configs/tiny.py)
from jax.experimental import multihost_utils  # noqa: E402

from flax_textvae import builders, parallel, train  # noqa: E402
from flax_textvae.configuration import with_overrides  # noqa: E402

# The tiny model's matrices are all below parallel's 2**14-element sharding threshold; lower it so that
# fsdp=2 really splits parameters and optimizer moments (checked below through their .sharding.spec).
parallel.MIN_SHARD_SIZE = 256


def make_config(steps: int, **overrides):
    """configs/tiny.py, phase 2 only, with per-example denoising and word dropout switched on."""
    # Backbone dropout masks come from one 'dropout' key per step for the whole (per-device) batch, so under
    # pmap each device draws masks for its own slice from the same key: they legitimately differ from the
    # 1-device run. Switch it off; everything else random (denoising, word dropout, z) is keyed per example.
    base = {
        "phase1.steps": 0,
        "train_steps": steps,
        "data.num_buckets": 1,  # one static shape: each layout compiles its step once
        "denoise.delete_rate": 0.3,
        "denoise.word_dropout": 0.1,
        "model.scratch.dropout": 0.0,
    }
    return with_overrides(tiny.get_config(), **{**base, **overrides})


def train_layout(config, run, init_params, batches, *, report_sharding: bool = False):
    """Trains ``init_params`` on ``batches`` (host-local numpy rows) under ``config.parallel``; host params."""
    runner = train.Trainer(config, run, 2, 0, config.train_steps, init_params)
    state = runner.place(runner.new_state(init_params, 0, jax.random.key(config.seed + 1)))
    sharded = []
    if report_sharding and runner.mesh is not None:
        for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
            if any(axis is not None for axis in x.sharding.spec):
                sharded.append(jax.tree_util.keystr(path) + " " + str(x.sharding.spec))
    for local in batches:
        state, metrics = runner.step(state, runner.batch(local))
        # Collectives over fake devices on few cores can time out when steps pile up: one at a time.
        jax.block_until_ready((state, metrics))
    params = runner.host_state(state).params
    if runner.mesh is not None and report_sharding:  # sharded arrays must still be sharded after the steps
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            if any(axis is not None for axis in x.sharding.spec):
                sharded.append("after: " + jax.tree_util.keystr(path))
    # Replicated arrays: this process's own copy; sharded ones (fsdp) gathered from every process.
    host = jax.tree.map(
        lambda x: np.asarray(x.addressable_data(0))
        if x.is_fully_replicated
        else np.asarray(multihost_utils.process_allgather(x, tiled=True)),
        params,
    )
    return host, sharded


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_diff(a, b) -> float:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    return max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)


def digest(tree) -> list[float]:
    return [float(np.sum(x, dtype=np.float64)) for x in flat(tree).values()]


def single(args) -> None:
    config = make_config(args.steps)
    workdir = os.path.join(args.out, "workdir_single")
    os.makedirs(workdir, exist_ok=True)
    run = builders.build_run(config, workdir, with_eval=False)
    init_params = jax.device_get(run.init_params(jax.random.key(config.seed)))
    batches = [next(run.train_iter) for _ in range(args.steps)]
    layouts = {
        "one_device": {"parallel.mode": "mesh", "parallel.num_devices": 1},
        "mesh_data4": {"parallel.mode": "mesh"},
        "mesh_data2_fsdp2": {"parallel.mode": "mesh", "parallel.fsdp": 2},
        "pmap4": {"parallel.mode": "pmap"},
    }
    result, timings, base, sharded = {}, {}, None, []
    for name, over in layouts.items():
        t0 = time.time()
        params, sh = train_layout(
            make_config(args.steps, **over), run, init_params, batches, report_sharding=name == "mesh_data2_fsdp2"
        )
        timings[name] = round(time.time() - t0, 2)
        sharded += sh
        if base is None:
            base = params
            np.savez(os.path.join(args.out, "baseline.npz"), **flat(params))
        result[name] = max_diff(params, base)
    moved = max_diff(base, init_params)
    out = {
        "max_diff": result,
        "fsdp_sharded": sharded,
        "moved": moved,
        "timings_s": timings,
        "devices": jax.device_count(),
        "digest": digest(base),
    }
    with open(os.path.join(args.out, "single.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("max_diff", "moved", "timings_s")}), flush=True)


def multi(args) -> None:
    config = make_config(
        args.steps,
        **{
            "parallel.mode": args.mode,
            "parallel.fsdp": args.fsdp,
            "parallel.coordinator_address": f"127.0.0.1:{args.port}",
            "parallel.num_processes": args.num_processes,
            "parallel.process_id": args.process_id,
        },
    )
    parallel.initialize_distributed(config.parallel)
    assert jax.process_count() == args.num_processes and jax.process_index() == args.process_id
    assert jax.device_count() == args.devices * args.num_processes, jax.devices()
    workdir = os.path.join(args.out, f"workdir_multi{args.process_id}")  # one each: no shared files
    os.makedirs(workdir, exist_ok=True)
    run = builders.build_run(config, workdir, with_eval=False)
    assert run.train_iter.batcher.host_batch_size == config.batch_size // args.num_processes
    init_params = jax.device_get(run.init_params(jax.random.key(config.seed)))
    batches = [next(run.train_iter) for _ in range(args.steps)]
    params, _ = train_layout(config, run, init_params, batches)
    np.savez(os.path.join(args.out, f"multi_{args.process_id}.npz"), **flat(params))
    print("DIGEST " + json.dumps({"process": args.process_id, "digest": digest(params)}), flush=True)
    jax.distributed.shutdown()


def preempt(args) -> None:
    import signal

    from flax_textvae import trainer

    config = make_config(
        args.steps,
        **{
            "parallel.coordinator_address": f"127.0.0.1:{args.port}",
            "parallel.num_processes": args.num_processes,
            "parallel.process_id": args.process_id,
            "checkpoint_every": 1000,  # only the last step and the stop save
            "log_every": 1,
            "eval_every": 0,
        },
    )
    parallel.initialize_distributed(config.parallel)
    step, build = trainer.TrainLoop._train_step, builders.build_run

    def signal_and_wait():
        # JAX's service notices a SIGTERM within about a second: wait, so that the stop is agreed on before the
        # tiny run could reach its end (the other process waits in the next collective meanwhile).
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)

    def step_then_signal(self, state):
        state = step(self, state)
        jax.block_until_ready(state)  # one step at a time (collectives over few cores)
        if args.process_id == 1 and self.step == args.signal_at:
            signal_and_wait()
        return state

    def signal_then_build(*a, **kw):
        if args.process_id == 1 and args.signal_at == 0:
            signal_and_wait()
        return build(*a, **kw)

    trainer.TrainLoop._train_step = step_then_signal
    train.builders.build_run = signal_then_build
    result = train.train_and_evaluate(config, os.path.join(args.out, "run"))
    print("RESULT " + json.dumps({"process": args.process_id, **result}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    {"single": single, "multi": multi, "preempt": preempt}[ARGS.command](ARGS)
