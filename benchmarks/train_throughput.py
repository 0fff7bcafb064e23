"""Training-step throughput of a flax_textvae VAE at real model sizes (random weights, no download).

    python benchmarks/train_throughput.py --arch=t5-small --batch=16 --steps=20 \
        --lengths-from=../shared/data/ptb/test.txt [--dtype=bfloat16] [--pad=bucket|256] \
        [--attention=dot_product|explicit|cudnn] [--remat] [--vocab-chunk=N] --json

The sentences are those the PyTorch baseline (``torch_baseline.py``) sees for the same ``--seed``: the
multiset of lengths from ``lengths.batches_of_lengths``, with random token ids. ``--pad=bucket`` (default)
feeds them through the library's own length-bucketed batcher (static shapes, one compile per bucket);
``--pad=256`` pads every sentence to 256 tokens like the released Park & Lee recipe.

``--attention``, ``--remat`` and ``--vocab-chunk`` switch the step's fast paths (``model.attention``,
``model.remat``, ``loss.vocab_chunk_size``; the last needs the training loop to pass
``loss.vocab_chunk_size`` into its ``StepConfig``).

Reports compile time (first call of every bucket shape), steady-state examples/s and real (non-padding)
tokens/s over the timed steps, the padding fraction of the computed positions, peak memory, XLA's temporary
buffer size of the compiled step for the longest bucket, and — from XLA's FLOP count of the compiled step —
achieved FLOP/s and model FLOPs utilisation on GPUs/TPUs whose peak is known. With ``--json`` the last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import archs  # noqa: E402
import jax  # noqa: E402
import lengths as lengths_lib  # noqa: E402
import numpy as np  # noqa: E402

# Dense peak FLOP/s per device by compute dtype and device_kind substring: vendor datasheet figures (H100 /
# H200 SXM), not measurements. float32 is the non-tensor-core FP32 rate; XLA's default matmul precision may
# run float32 matmuls as TF32 on these GPUs, which can lift a float32 MFU above what FP32 units allow.
PEAK_FLOPS = {
    "bfloat16": {
        "H100": 989e12,
        "H200": 989e12,
        "A100": 312e12,
        "TPU v4": 275e12,
        "TPU v5e": 197e12,
        "TPU v5p": 459e12,
        "TPU v6": 918e12,
    },
    "float32": {"H100": 67e12, "H200": 67e12, "A100": 19.5e12},
}


def arch_config(arch: str):
    """A transformers config of the given size (random weights; nothing is downloaded)."""
    import transformers

    if arch == "t5-small":
        return archs.hf_config(arch, dropout_rate=0.1)
    if arch == "bart-base":
        return archs.hf_config(arch, dropout=0.1)
    if arch == "tiny":
        return transformers.T5Config(
            vocab_size=128,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="relu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            dropout_rate=0.0,
        )
    raise SystemExit(f"unknown --arch={arch}; choose t5-small, bart-base or tiny")


def random_run(args, remat: bool = False):
    """(run, hf_config): a TextVAE of ``args.arch`` (``args.attention``) with random weights, as a ``builders.Run``."""
    from flax_textvae import builders, models
    from flax_textvae.vae import TextVAE

    hf = arch_config(args.arch)
    dtype = builders.DTYPES[args.dtype]
    backbone = models.build_module(hf, dtype).clone(attention=args.attention, remat=remat)
    model = TextVAE(backbone=backbone, latent_size=32, pooling="mean", injection=("memory",), dtype=dtype)
    pad, eos, start = hf.pad_token_id, hf.eos_token_id, hf.decoder_start_token_id
    run = builders.Run(
        config=None,
        model=model,
        tokenizer=None,
        tokenizer_name="random ids",
        backbone_params=None,
        pad_id=pad,
        eos_id=eos,
        mask_id=pad,
        unk_id=pad,
        special_ids=(pad, eos),
        prompt=(start,),
        max_length=args.max_length,
        vocab_size=hf.vocab_size,
    )
    return run, hf


def random_examples(lens, hf, args) -> list:
    """Random-id sentences (ending in EOS) with the given lengths, truncated to ``args.max_length``."""
    rng = np.random.default_rng(args.seed)
    low = max(hf.pad_token_id, hf.eos_token_id) + 1
    return [
        np.append(rng.integers(low, hf.vocab_size, size=n - 1), hf.eos_token_id).astype(np.int32)
        for n in np.minimum(lens, args.max_length)
    ]


def build(args):
    """(runner, state, batches): the library's own training step over bucketed random-token batches."""
    from flax_textvae import data, train
    from flax_textvae.configuration import base_config

    run, hf = random_run(args, remat=args.remat)
    c = base_config()
    c.batch_size = args.batch
    c.model.dtype = args.dtype
    c.phase1.steps = 0
    c.train_steps = args.steps
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_accum_steps = args.grad_accum
    c.loss.kind = "elbo"
    c.loss.kl_schedule.kind = "constant"
    c.loss.vocab_chunk_size = args.vocab_chunk
    c.model.attention, c.model.remat = args.attention, args.remat
    # Sentences: the lengths of the baseline's batches.
    lens = lengths_lib.load_lengths(args.lengths_from)
    plan = lengths_lib.batches_of_lengths(lens, args.batch, args.steps, seed=args.seed)
    examples = random_examples(np.concatenate(plan), hf, args)
    kw = dict(
        batch_size=args.batch,
        pad_id=hf.pad_token_id,
        decoder_start_token_id=hf.decoder_start_token_id,
        bos_id=None,
        max_length=max(args.max_length, 256) if args.pad == "256" else args.max_length,
    )
    if args.pad == "256":
        kw["boundaries"] = [256]
    else:
        kw["num_buckets"] = args.num_buckets
    it = data.Batcher(examples, **kw).train_iterator(seed=args.seed)
    batches = [next(it) for _ in range(args.steps)]
    params = run.init_params(jax.random.key(0))
    runner = train.Trainer(c, run, 2, 0, args.steps, params)
    if runner.step_config.vocab_chunk_size != args.vocab_chunk:
        raise SystemExit(
            "--vocab-chunk: the training loop does not pass config.loss.vocab_chunk_size into its "
            "StepConfig (flax_textvae/trainer.py, _step_config)"
        )
    state = runner.place(runner.new_state(params, 0, jax.random.key(1)))
    return runner, state, batches


def measure(args) -> dict:
    runner, state, batches = build(args)
    shapes = {}
    for b in batches:
        shapes.setdefault(b["input_ids"].shape, b)
    # Compile every bucket shape once (timed: trace + lower + XLA compile) and count its FLOPs; then one
    # untimed warm-up call per shape so the steady loop below never compiles.
    compile_s, flops, temp_mb = 0.0, {}, None
    for shape, b in sorted(shapes.items()):
        gb = runner.batch(b)
        t0 = time.perf_counter()
        compiled = runner.step.lower(state, gb).compile()
        compile_s += time.perf_counter() - t0
        memory = compiled.memory_analysis()
        if memory is not None:  # the longest bucket comes last
            temp_mb = memory.temp_size_in_bytes / 2**20
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[shape] = float(cost.get("flops", 0.0)) if cost else 0.0
        state, m = runner.step(state, gb)
        jax.block_until_ready(m["loss"])
    # Steady state: every batch once, dispatched asynchronously, one sync at the end.
    placed = [runner.batch(b) for b in batches]
    t0, c0 = time.perf_counter(), time.process_time()
    for gb in placed:
        state, m = runner.step(state, gb)
    jax.block_until_ready((state, m))
    dt, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    real = float(sum(b["attention_mask"].sum() for b in batches))
    computed = float(sum(b["attention_mask"].size for b in batches))
    total_flops = sum(flops[b["input_ids"].shape] for b in batches)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak_mb = (
        stats["peak_bytes_in_use"] / 2**20
        if stats and "peak_bytes_in_use" in stats
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    peak = next((v for k, v in PEAK_FLOPS[args.dtype].items() if k in dev.device_kind), None)
    achieved = total_flops / dt if total_flops else None
    return {
        "framework": "jax",
        "arch": args.arch,
        "batch": args.batch,
        "steps": args.steps,
        "pad": args.pad,
        "dtype": args.dtype,
        "attention": args.attention,
        "remat": args.remat,
        "vocab_chunk_size": args.vocab_chunk,
        "device": dev.device_kind,
        "num_devices": jax.device_count(),
        "num_shapes": len(shapes),
        "shapes": sorted(s[1] for s in shapes),
        "compile_s": round(compile_s, 2),
        "steady_s": round(dt, 3),
        "examples_per_s": round(len(batches) * args.batch / dt, 2),
        "real_tokens_per_s": round(real / dt, 1),
        # CPU time of the whole process (all XLA threads): steadier than wall time on a shared machine.
        "real_tokens_per_cpu_s": round(real / cpu_s, 1) if cpu_s > 0 else None,
        "padding_fraction": round(1 - real / computed, 4),
        "peak_memory_mb": round(peak_mb, 1),
        "xla_temp_mb_longest": round(temp_mb, 1) if temp_mb is not None else None,
        "steps_per_s": round(len(batches) / dt, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "flops_per_step": round(total_flops / len(batches)) if total_flops else None,
        "achieved_tflops": round(achieved / 1e12, 3) if achieved else None,
        "peak_flops_per_device": peak,
        "mfu": round(achieved / (peak * jax.device_count()), 4) if achieved and peak else None,
    }


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="t5-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lengths-from", default=None, help="text file whose sentence lengths to use")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--pad", default="bucket", choices=["bucket", "256"])
    p.add_argument("--num-buckets", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--attention", default="dot_product", choices=["explicit", "dot_product", "cudnn"])
    p.add_argument("--remat", action="store_true", help="recompute each layer's activations in the backward pass")
    p.add_argument("--vocab-chunk", type=int, default=0, help="chunked cross-entropy over N vocabulary entries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    r = measure(args)
    width = max(len(k) for k in r)
    for k, v in r.items():
        print(f"{k:>{width}s}  {v}")
    if args.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
