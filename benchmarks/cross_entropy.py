"""Token cross-entropy with the LM head: full float32 logits vs ``losses.chunked_token_nll``.

    python benchmarks/cross_entropy.py --batch=16 --length=32 --d-model=512 --vocab=32128 \
        --chunks=2048,4096,8192 --repeats=10 --out=benchmarks/results/cross_entropy_cpu.json

For each path, jits the gradient of ``sum_b nll[b]`` with respect to the decoder hidden states [B, T, D] and
the head [V, D] (forward + backward, the work of a training step's loss), then reports

  * ``compile_s``: lower + XLA compile;
  * ``step_ms``: median wall time of one call over ``--repeats`` calls (after one warm-up call);
    ``step_cpu_ms`` the median CPU time of the process (all threads) per call, which other processes
    sharing the cores disturb less on a CPU backend;
  * ``temp_mb``: XLA's temporary buffer size of the compiled program (``memory_analysis()``), i.e. the
    working memory beyond the arguments and outputs; ``arg_mb`` / ``out_mb`` are those of the arguments and
    outputs (the head and its gradient dominate them and are equal for both paths);
  * ``peak_device_mb``: peak bytes in use on the device where the backend reports it (GPU/TPU), else null;
    it is the running peak of the process, so pass one path with ``--paths`` (or ``--isolate``) for a
    per-path figure; ``peak_rss_mb`` likewise for the process's resident memory (the CPU backend's figure);
  * ``max_abs_diff``: largest difference of the per-example NLL from the full-logits path.

``full`` forms the [B, T, V] float32 logits and calls ``losses.token_nll``; ``chunked_C`` calls
``losses.chunked_token_nll(..., chunk_size=C)``. Hidden states, head and targets are random; 10% of the
positions are padding. ``--isolate`` measures every path in a fresh subprocess (so the peaks are
per path) and merges the results. With ``--json`` the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flax_textvae import losses  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def loss_fns(chunks: list[int]) -> dict:
    """name -> loss(hidden [B,T,D], head [V,D], targets [B,T], weights [B,T]) -> float32 scalar."""

    def full(hidden, head, targets, weights):
        logits = jnp.einsum("btd,vd->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
        return jnp.sum(losses.token_nll(logits, targets, weights))

    fns = {"full": full}
    for c in chunks:
        fns[f"chunked_{c}"] = (
            lambda size: lambda hidden, head, targets, weights: jnp.sum(
                losses.chunked_token_nll(hidden, head, targets, weights, chunk_size=size)
            )
        )(c)
    return fns


def random_inputs(args):
    """(hidden, head, targets, weights) on the default device."""
    rng = np.random.default_rng(args.seed)
    dtype = DTYPES[args.dtype]
    hidden = jnp.asarray(rng.standard_normal((args.batch, args.length, args.d_model)), dtype)
    head = jnp.asarray(rng.standard_normal((args.vocab, args.d_model)) * args.d_model**-0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.length)), jnp.int32)
    weights = jnp.asarray(rng.random((args.batch, args.length)) > 0.1, jnp.float32)
    return hidden, head, targets, weights


def measure_one(fn, inputs, repeats: int) -> dict:
    """Compile time, median call time and XLA memory figures of ``jit(value_and_grad(fn))``."""
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*inputs))
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    mb = lambda name: round(getattr(mem, name) / 2**20, 2) if mem is not None else None  # noqa: E731
    return {
        "compile_s": round(compile_s, 2),
        "step_ms": round(1e3 * statistics.median(times), 2),
        "step_cpu_ms": round(1e3 * statistics.median(cpu_times), 2),
        "temp_mb": mb("temp_size_in_bytes"),
        "arg_mb": mb("argument_size_in_bytes"),
        "out_mb": mb("output_size_in_bytes"),
    }


def peak_device_mb():
    """Peak bytes in use on device 0 in MiB, where the backend reports it (GPU/TPU), else None."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None


def max_abs_diff(chunk: int, inputs) -> float:
    """Largest |chunked - full| of the per-example NLL [B]."""
    hidden, head, targets, weights = inputs
    logits = jnp.einsum("btd,vd->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    ref = losses.token_nll(logits, targets, weights)
    got = jax.jit(lambda *a: losses.chunked_token_nll(*a, chunk_size=chunk))(*inputs)
    return float(np.max(np.abs(np.asarray(got) - np.asarray(ref))))


def isolated(argv: list[str], name: str) -> dict:
    """The result of a fresh subprocess of this script, with the same flags, that measures path ``name``."""
    keep = [a for a in argv if not a.startswith(("--isolate", "--out", "--json", "--paths"))]
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *keep, f"--paths={name}", "--json"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"path {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--chunks", default="2048,4096,8192", help="comma-separated chunk sizes")
    p.add_argument("--paths", default="", help="comma-separated subset of full,chunked_C to run (default: all)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", action="store_true", help="one fresh subprocess per path")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    fns = loss_fns(chunks)
    if args.paths:
        fns = {k: v for k, v in fns.items() if k in args.paths.split(",")}
    # With --isolate this process never touches a device (a GPU client would reserve memory the children need).
    inputs = None if args.isolate else random_inputs(args)
    rows, child = {}, {}
    for name, fn in fns.items():
        if args.isolate:
            child = isolated(argv if argv is not None else sys.argv[1:], name)
            rows[name] = child["paths"][name]
            print(f"{name:>14s}  " + "  ".join(f"{k} {v}" for k, v in rows[name].items()), flush=True)
            continue
        rows[name] = measure_one(fn, inputs, args.repeats)
        rows[name]["peak_device_mb"] = peak_device_mb()
        rows[name]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if name != "full":  # after the peaks were read: the reference forms the full logits
            rows[name]["max_abs_diff"] = max_abs_diff(int(name.split("_")[1]), inputs)
        print(f"{name:>14s}  " + "  ".join(f"{k} {v}" for k, v in rows[name].items()), flush=True)
    device = child["device"] if args.isolate else jax.devices()[0].device_kind
    result = {
        "benchmark": "cross_entropy",
        "device": device,
        "backend": child["backend"] if args.isolate else jax.default_backend(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "batch": args.batch,
        "length": args.length,
        "d_model": args.d_model,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "jax": jax.__version__,
        "paths": rows,
    }
    print(
        "\n| path | step ms (fwd+bwd) | CPU ms per step | compile s | XLA temp MB | args MB | outputs MB "
        "| peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['step_ms']} | {r['step_cpu_ms']} | {r['compile_s']} | {r['temp_mb']} | {r['arg_mb']} "
            f"| {r['out_mb']} | {r['peak_rss_mb']} |"
        )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
