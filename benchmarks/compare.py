"""flax_textvae vs the same VAE in PyTorch + transformers, measured back to back on this machine.

    python benchmarks/compare.py --arch=t5-small --batch=16 --steps=50 --steps-256=10 \
        --lengths-from=../shared/data/ptb/test.txt [--out=benchmarks/results/compare.json]

Runs, one after the other in fresh processes (so they never share the cores):
  1. ``train_throughput.py``: the library's jitted step over length-bucketed static shapes;
  2. ``torch_baseline.py --pad=longest``: each batch padded to its longest sentence;
  3. ``torch_baseline.py --pad=256``: every sentence padded to 256 tokens (the released Park & Lee recipe),
     on the first ``--steps-256`` of the same batches (it is slow).
All three see sentences with the lengths of ``lengths.batches_of_lengths(..., seed)``. Prints a markdown
table with real (non-padding) tokens/s and the ratios, and writes all raw JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script: str, args: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--json"]
    print("$", " ".join(cmd[1:]), flush=True)
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    if out.returncode != 0:
        raise SystemExit(f"{script} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Other work on the machine slows a run down: the 1-minute load average before and after it says how much.
    result["load_avg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="t5-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--steps-256", type=int, default=10)
    p.add_argument("--lengths-from", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    common = [f"--arch={a.arch}", f"--batch={a.batch}"] + (
        [f"--lengths-from={a.lengths_from}"] if a.lengths_from else []
    )
    torch_arch = a.arch
    res = {
        "jax_bucketed": _run("train_throughput.py", common + [f"--steps={a.steps}"]),
        "torch_longest": _run(
            "torch_baseline.py",
            [f"--arch={torch_arch}", f"--batch={a.batch}", f"--steps={a.steps}", "--warmup=2", "--pad=longest"]
            + common[2:],
        ),
        "torch_256": _run(
            "torch_baseline.py",
            [f"--arch={torch_arch}", f"--batch={a.batch}", f"--steps={a.steps_256}", "--warmup=1", "--pad=256"]
            + common[2:],
        ),
    }
    jax_tps = res["jax_bucketed"]["real_tokens_per_s"]
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "arch": a.arch,
        "batch": a.batch,
        "lengths_from": a.lengths_from or "synthetic",
        "speedup_vs_torch_longest": round(jax_tps / res["torch_longest"]["real_tokens_per_s"], 2),
        "speedup_vs_torch_256": round(jax_tps / res["torch_256"]["real_tokens_per_s"], 2),
        # The same ratio from CPU time per real token (both processes use every core; less sensitive to load).
        "cpu_speedup_vs_torch_longest": round(
            res["jax_bucketed"]["real_tokens_per_cpu_s"] / res["torch_longest"]["real_tokens_per_cpu_s"], 2
        ),
    }
    res["summary"] = summary
    print("\n| run | steps | real tokens/s | examples/s | padding | peak MB |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        if name != "summary":
            print(
                f"| {name} | {r['steps']} | {r['real_tokens_per_s']:.1f} | {r['examples_per_s']:.2f} | "
                f"{r['padding_fraction']:.3f} | {r['peak_memory_mb']:.0f} |"
            )
    print(
        f"\nspeed-up (real tokens/s): {summary['speedup_vs_torch_longest']}x vs torch padded to longest, "
        f"{summary['speedup_vs_torch_256']}x vs torch padded to 256"
    )
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(summary))
    return res


if __name__ == "__main__":
    main()
