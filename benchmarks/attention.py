"""The attention implementations (``model.attention``) side by side: time, XLA's cost figures, equality.

    python benchmarks/attention.py --arch=t5-small --batch=16 --length=32 --repeats=30 [--dtype=bfloat16] --json

The implementations are 'explicit' (the reference) and 'dot_product', plus 'cudnn' on a CUDA GPU in bfloat16
(``--implementations`` picks others). Two programs per implementation, jitted, interleaved call by call so
all see the same machine load:

  * ``layer``: one decoder self-attention layer of ``--arch`` (T5: relative bias and no query scaling; BART:
    scaled queries), causal plus key padding, forward and backward (gradient of the parameters and input);
  * ``model``: the whole VAE of ``--arch`` (random weights) teacher-forced in evaluation mode (what the
    importance-weighted evaluation and decoding run), forward only.

Reports per program and implementation the median wall and CPU (process) milliseconds per call, XLA's FLOP
and bytes-accessed counts, its temporary buffer size, and the largest difference of the outputs (the layer's
loss and every gradient; the model's logits) from the explicit path, also relative to the largest explicit
value (``max_rel_diff_vs_explicit``), and whether that is within the dtype's tolerance
(``agrees_with_explicit``: 5e-2 in bfloat16, 1e-4 in float32). An odd ``--length`` exercises the padding
to even lengths of the cuDNN path (the model's memory slot adds one key, so there an even length does).
With ``--json`` the last line printed is one JSON object.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

TOLERANCE = {"bfloat16": 5e-2, "float32": 1e-4}


def default_implementations(dtype: str) -> tuple[str, ...]:
    """'explicit' and 'dot_product', and 'cudnn' where it can run (a CUDA GPU) and the dtype is bfloat16."""
    from flax_textvae.models import attention as attn_lib

    cudnn = dtype == "bfloat16" and attn_lib.cudnn_available()
    return ("explicit", "dot_product") + (("cudnn",) if cudnn else ())


def _layer_programs(hf, args, dtype, implementations):
    from flax_textvae.models import attention as attn_lib

    t5 = hf.model_type == "t5"
    heads = hf.num_heads if t5 else hf.decoder_attention_heads
    head_dim = hf.d_kv if t5 else hf.d_model // heads
    bias = (
        attn_lib.RelativePositionBias(
            hf.relative_attention_num_buckets, hf.relative_attention_max_distance, bidirectional=False, init_std=1.0
        )
        if t5
        else None
    )
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(args.batch, args.length, hf.d_model), jnp.float32)
    lengths = r.randint(args.length // 4, args.length + 1, (args.batch, 1))
    mask = attn_lib.padding_mask(jnp.asarray((np.arange(args.length)[None] < lengths).astype(np.int32)))
    programs, params = {}, None
    for impl in implementations:
        m = attn_lib.MultiHeadAttention(
            num_heads=heads,
            head_dim=head_dim,
            out_features=hf.d_model,
            use_bias=not t5,
            scale_query=not t5,
            relative_bias=bias,
            dtype=dtype,
            attention=impl,
        )
        if params is None:
            params = m.init(jax.random.key(0), x, mask=mask, causal=True)["params"]

        def loss(p, x, m=m):
            return jnp.sum(m.apply({"params": p}, x, mask=mask, causal=True)[0].astype(jnp.float32) ** 2)

        programs[impl] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x))
    return programs


def _model_programs(hf, args, dtype, implementations):
    from flax_textvae import models
    from flax_textvae.vae import TextVAE

    r = np.random.RandomState(1)
    ids = jnp.asarray(r.randint(5, min(1000, hf.vocab_size), (args.batch, args.length)), jnp.int32)
    lengths = r.randint(args.length // 4, args.length + 1, (args.batch, 1))
    mask = jnp.asarray((np.arange(args.length)[None] < lengths).astype(np.int32))
    programs, params = {}, None
    for impl in implementations:
        vae = TextVAE(models.build_module(hf, dtype).clone(attention=impl), latent_size=32, dtype=dtype)
        if params is None:
            params = jax.jit(lambda k, vae=vae: vae.init({"params": k}, ids, mask, ids, sample=False)["params"])(
                jax.random.key(0)
            )
        fn = jax.jit(lambda p, vae=vae: vae.apply({"params": p}, ids, mask, ids, mask, sample=False)["logits"])
        programs[impl] = (fn, (params,))
    return programs


def _measure(programs, repeats: int, tolerance: float) -> dict:
    rows, outs = {}, {}
    for impl, (fn, inputs) in programs.items():
        compiled = fn.lower(*inputs).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        memory = compiled.memory_analysis()
        outs[impl] = jax.block_until_ready(fn(*inputs))
        rows[impl] = {
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0)),
            "temp_mb": round(memory.temp_size_in_bytes / 2**20, 2) if memory is not None else None,
            "wall": [],
            "cpu": [],
        }
    for _ in range(repeats):
        for impl, (fn, inputs) in programs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*inputs))
            rows[impl]["wall"].append(time.perf_counter() - t0)
            rows[impl]["cpu"].append(time.process_time() - c0)
    ref = jax.tree.leaves(outs["explicit"])
    for impl, row in rows.items():
        row["wall_ms"] = round(float(np.median(row.pop("wall"))) * 1e3, 2)
        row["cpu_ms"] = round(float(np.median(row.pop("cpu"))) * 1e3, 2)
        pairs = [(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in zip(jax.tree.leaves(outs[impl]), ref)]
        row["max_abs_diff_vs_explicit"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
        # each output (the loss, a gradient, the logits) against its own scale
        row["max_rel_diff_vs_explicit"] = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)) for a, b in pairs
        )
        row["agrees_with_explicit"] = bool(np.isfinite(row["max_rel_diff_vs_explicit"])) and (
            row["max_rel_diff_vs_explicit"] <= tolerance
        )
    return rows


def main(argv=None) -> dict:
    from train_throughput import arch_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="t5-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument(
        "--implementations",
        default=None,
        help="comma-separated, 'explicit' first (default: explicit,dot_product, and cudnn on a GPU in bfloat16)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    hf = arch_config(args.arch)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.implementations:
        implementations = tuple(args.implementations.split(","))
    else:
        implementations = default_implementations(args.dtype)
    if implementations[0] != "explicit":
        p.error(f"--implementations={args.implementations}: the first must be 'explicit' (the reference)")
    tol = TOLERANCE[args.dtype]
    load = os.getloadavg()[0]
    result = {
        "arch": args.arch,
        "batch": args.batch,
        "length": args.length,
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "repeats": args.repeats,
        "implementations": list(implementations),
        "tolerance": tol,
        "layer": _measure(_layer_programs(hf, args, dtype, implementations), args.repeats, tol),
        "model": _measure(_model_programs(hf, args, dtype, implementations), max(args.repeats // 3, 3), tol),
        "load_avg_1m_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    for program in ("layer", "model"):
        for impl, row in result[program].items():
            print(
                f"{program:>5s} {impl:>11s}: wall {row['wall_ms']:8.2f} ms  cpu {row['cpu_ms']:8.2f} ms  "
                f"bytes {row['bytes_accessed'] / 2**20:8.1f} MiB  temp {row['temp_mb']} MB  "
                f"max |diff| {row['max_abs_diff_vs_explicit']:.2e} (rel {row['max_rel_diff_vs_explicit']:.1e}"
                f"{'' if row['agrees_with_explicit'] else ', OVER TOLERANCE'})"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
