"""Throughput of the held-out evaluation with the importance-weighted NLL (K samples per example).

    python benchmarks/eval_throughput.py --arch=t5-small --examples=16 --iw-samples=500 \
        --lengths-from=../shared/data/ptb/test.txt [--attention=dot_product|explicit] --json

Runs ``flax_textvae.evaluate.evaluate_split`` (encoder once per example, K decoder passes in chunks with an
exact running log-sum-exp, whole-split MI and AU) over random-token sentences with the given lengths, at the
model sizes of ``train_throughput.py`` (random weights, no download). Reports examples/s and decoded
(sample x token) positions/s after a warm-up pass that compiles every shape. With ``--json`` the last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import lengths as lengths_lib  # noqa: E402
import numpy as np  # noqa: E402
from train_throughput import random_examples, random_run  # noqa: E402


def measure(args) -> dict:
    from flax_textvae import data, evaluate

    run, hf = random_run(args)
    lens = lengths_lib.load_lengths(args.lengths_from)
    flat = np.minimum(lengths_lib.batches_of_lengths(lens, args.examples, 1, seed=args.seed)[0], args.max_length)
    batcher = data.Batcher(
        random_examples(flat, hf, args),
        batch_size=args.batch,
        pad_id=hf.pad_token_id,
        decoder_start_token_id=hf.decoder_start_token_id,
        bos_id=None,
        max_length=args.max_length,
        num_buckets=args.num_buckets,
    )
    params = run.init_params(jax.random.key(0))
    kw = dict(iw_samples=args.iw_samples, seed=0, iw_chunk=args.chunk, vocab_chunk_size=args.vocab_chunk_size)
    t0 = time.perf_counter()
    evaluate.evaluate_split(run, params, batcher.eval_iterator, **kw)  # compiles every shape
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate.evaluate_split(run, params, batcher.eval_iterator, **kw)
    dt = time.perf_counter() - t0
    positions = float(sum(flat)) * args.iw_samples
    return {
        "framework": "jax",
        "arch": args.arch,
        "examples": int(result["num_examples"]),
        "iw_samples": args.iw_samples,
        "batch": args.batch,
        "dtype": args.dtype,
        "attention": args.attention,
        "vocab_chunk_size": args.vocab_chunk_size,
        "device": jax.devices()[0].device_kind,
        "first_pass_s": round(warm, 2),
        "steady_s": round(dt, 2),
        "examples_per_s": round(result["num_examples"] / dt, 4),
        "decoded_tokens_per_s": round(positions / dt, 1),
        "nll": result["nll"],
        "neg_elbo": result["neg_elbo"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="t5-small")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iw-samples", type=int, default=500)
    p.add_argument("--chunk", type=int, default=0, help="samples per decoder pass (0: automatic)")
    p.add_argument(
        "--vocab-chunk-size", type=int, default=0, help="score by vocabulary chunks of this size (0: full logits)"
    )
    p.add_argument("--lengths-from", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="dot_product", choices=["explicit", "dot_product", "cudnn"])
    p.add_argument("--num-buckets", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = measure(args)
    for k, v in r.items():
        print(f"{k:>20s}  {v}")
    if args.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
