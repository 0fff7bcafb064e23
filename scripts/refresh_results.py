"""Regenerates the README's demo results from the current code and stamps them with the commit and date.

    python scripts/refresh_results.py [--workdir=/tmp/refresh_demo] [--readme=README.md]

Trains the embedded default (``python run_train.py``, i.e. configs/demo.py) in a fresh workdir, runs
``run_eval.py`` (K = 500) and one interpolation, and replaces the text between the README's
``<!-- results:demo:begin -->`` and ``<!-- results:demo:end -->`` markers with what they printed and how long
each took. The block names the commit it was measured at; with uncommitted changes that is ``COMMIT+dirty``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:demo:begin -->", "<!-- results:demo:end -->"
INTERPOLATE = ("every red market near mary saw few doctors", "the old man found a small garden")


def _run(args: list[str]) -> tuple[str, float]:
    """Runs ``python ARGS`` in the repository; returns (stdout, seconds); exits on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # The figures are those of XLA's default optimisation: drop a lowered level (the test suite sets one).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
    env["XLA_FLAGS"] = " ".join(flags)
    start = time.time()
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(args)} failed with exit {p.returncode}:\n{p.stderr[-3000:]}")
    return p.stdout, time.time() - start


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _table(stdout: str) -> str:
    """The metrics table run_eval.py printed (from its header line to the last metric row)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("metric"))
    rows = [line for line in lines[start:] if line.strip()]
    return "\n".join(rows)


def block(workdir: str) -> str:
    """Trains, evaluates and interpolates the demo in ``workdir``; returns the README block (no markers)."""
    shutil.rmtree(workdir, ignore_errors=True)
    _, train_s = _run(["run_train.py", f"--workdir={workdir}", "--config.compile_cache_dir=off"])
    eval_out, eval_s = _run(["run_eval.py", f"--workdir={workdir}"])
    interp, _ = _run(
        [
            "run_eval.py",
            f"--workdir={workdir}",
            "--mode=interpolate",
            f"--text={INTERPOLATE[0]}",
            f"--text={INTERPOLATE[1]}",
        ]
    )
    load = os.getloadavg()[0]
    busy = (
        f" The machine was shared during the run (load average {load:.1f}): times are upper bounds."
        if load > 1.5 * (os.cpu_count() or 1)
        else ""
    )
    stamp = (
        f"Measured at commit `{_commit()}` on {datetime.date.today().isoformat()}, {os.cpu_count()}-core "
        f"{platform.machine()} CPU, by `python scripts/refresh_results.py`.{busy}"
    )
    lines = [
        stamp,
        "",
        f"`python run_train.py` (compile cache off): **{train_s:.0f} s** end to end. Then "
        f"`python run_eval.py --workdir=runs/demo` (K = 500, {eval_s:.0f} s) prints:",
        "",
        "```",
        _table(eval_out),
        "```",
        "",
        "(`mi` is bounded by log N for N held-out examples: log 500 = 6.2146.)",
        f'`python run_eval.py --workdir=runs/demo --mode=interpolate --text="{INTERPOLATE[0]}" '
        f'--text="{INTERPOLATE[1]}"`:',
        "",
        "```",
        "\n".join(line for line in interp.splitlines() if line[:4].replace(".", "").isdigit()),
        "```",
    ]
    return "\n".join(lines)


def replace_block(readme: str, text: str) -> str:
    """``readme`` with the text between the demo markers replaced by ``text``."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"the README has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{text}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/refresh_demo")
    parser.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    args = parser.parse_args()
    text = block(args.workdir)
    with open(args.readme) as f:
        readme = f.read()
    with open(args.readme, "w") as f:
        f.write(replace_block(readme, text))
    print(text)


if __name__ == "__main__":
    main()
