"""Subprocess side of tests/test_prepared_runs.py: one of several processes evaluating a prepared split.

Run by the tests (never imported by pytest), because ``jax.distributed`` must start before any JAX work:

  ``python tests/prepared_eval_worker.py --prepared DIR --process_id i --num_processes n --port P --out OUT``

Every process joins the others through ``parallel.initialize_distributed`` (gloo collectives on CPU), builds
configs/tiny.py with ``prepared:DIR`` as its training and eval split, and reads its own rows of every global
eval batch (``GrainEvalIterator`` with shard_index = process index, shard_count = process count). It writes
``OUT/eval_<i>.json``: the ``index`` of every real row it read (example_weight 1) and ``evaluate_split``'s
metrics over those rows. Process 0 also evaluates the whole split alone (the single-process values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "configs")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tiny  # noqa: E402  (configs/tiny.py)

from flax_textvae import builders, data, evaluate, parallel  # noqa: E402
from flax_textvae.configuration import with_overrides  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    spec = f"prepared:{args.prepared}"
    config = with_overrides(
        tiny.get_config(),
        **{
            "data.train": spec,
            "data.eval": spec,
            "parallel.coordinator_address": f"127.0.0.1:{args.port}",
            "parallel.num_processes": args.num_processes,
            "parallel.process_id": args.process_id,
        },
    )
    parallel.initialize_distributed(config.parallel)
    assert jax.process_count() == args.num_processes and jax.process_index() == args.process_id
    workdir = os.path.join(args.out, f"workdir{args.process_id}")  # one each: no shared files
    run = builders.build_run(config, workdir)
    params = jax.device_get(run.init_params(jax.random.key(config.seed)))
    layout = dict(
        batch_size=config.batch_size,
        max_length=config.data.max_length,
        num_buckets=config.data.num_buckets,
        pad_id=run.pad_id,
        decoder_start_id=run.prompt[0],
        bos_id=run.prompt[1] if len(run.prompt) > 1 else None,
    )
    mine = data.GrainEvalIterator(
        data.PreparedSource(spec), shard_index=jax.process_index(), shard_count=jax.process_count(), **layout
    )
    seen = []
    for batch in mine:
        assert batch["input_ids"].shape[0] == config.batch_size // jax.process_count()
        real = batch["example_weight"] > 0
        assert np.all(batch["example_weight"][real] == 1) and np.all(batch["index"][real] >= 0)
        seen += batch["index"][real].tolist()
    out = {
        "process": args.process_id,
        "indices": seen,
        "shard": evaluate.evaluate_split(run, params, lambda: iter(mine), mi_au=False, name="shard"),
    }
    if args.process_id == 0:
        out["whole"] = evaluate.evaluate_split(run, params, run.eval_batches, mi_au=False, name="whole")
    with open(os.path.join(args.out, f"eval_{args.process_id}.json"), "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
