"""Steps/s of the real training loop with and without host-to-device prefetching (``data.prefetch``).

    python benchmarks/prefetch_loop.py --config=configs/tiny.py --steps=400 --depths=0,2 --repeats=2 \
        [--override=--config.model.scratch.d_model=256 ...] [--out=FILE] [--json]

Runs ``run_train.py`` in fresh processes (one at a time, depths interleaved per repeat), each in a new
workdir with ``--config.data.prefetch=D``, a single phase, no in-training evaluation and no checkpoint before
the end, and reads the ``steps_per_s`` the loop logged every ``--log-every`` steps (metrics.jsonl; the loop
excludes compile time from it). Reports, per depth, the median over every logged row of every repeat but
each run's first row (it holds the first compiles), and the 1-minute load average of the machine around each
run. Needs the training loop to read ``data.prefetch`` (flax_textvae/trainer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def one_run(args, depth: int) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"prefetch_{depth}_")
    cmd = [
        sys.executable,
        os.path.join(REPO, "run_train.py"),
        f"--config={args.config}",
        f"--workdir={workdir}",
        f"--config.train_steps={args.steps}",
        "--config.phase1.steps=0",
        "--config.eval_every=0",
        f"--config.log_every={args.log_every}",
        f"--config.checkpoint_every={args.steps}",
        f"--config.data.prefetch={depth}",
        "--config.compile_cache_dir=off",
        *args.override,
    ]
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if out.returncode != 0:
        raise SystemExit(f"prefetch={depth} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    shutil.rmtree(workdir, ignore_errors=True)
    rates = [r["steps_per_s"] for r in rows if r.get("split") != "eval" and "steps_per_s" in r]
    return {
        "steps_per_s_rows": rates[1:],
        "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.py"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--depths", default="0,2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--override", action="append", default=[], help="extra --config.FIELD=VALUE for every run")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    runs = {d: [] for d in depths}
    for _ in range(args.repeats):
        for d in depths:
            runs[d].append(one_run(args, d))
            rates = runs[d][-1]["steps_per_s_rows"]
            print(
                f"prefetch={d}: median {statistics.median(rates):.1f} steps/s over {len(rates)} rows "
                f"(load {runs[d][-1]['load_avg_1m_before_after']})",
                flush=True,
            )
    result = {
        "config": os.path.relpath(args.config, REPO),
        "overrides": args.override,
        "steps": args.steps,
        "log_every": args.log_every,
        "depths": {
            str(d): {
                "median_steps_per_s": round(statistics.median([x for r in rs for x in r["steps_per_s_rows"]]), 2),
                "runs": rs,
            }
            for d, rs in runs.items()
        },
    }
    for d in depths:
        print(f"prefetch={d}: {result['depths'][str(d)]['median_steps_per_s']} steps/s (median)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
