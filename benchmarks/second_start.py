"""Time to the first training step of a fresh process, without and with the persistent compilation cache.

    python benchmarks/second_start.py --config=configs/tiny.py --steps=10 [--with-off] [--json]

Starts the same training run in fresh subprocesses, each with a new workdir, all sharing one compilation
cache folder (a new empty one unless ``--cache-dir`` is given) through ``FLAX_TEXTVAE_COMPILE_CACHE``:

  * ``off`` (with ``--with-off``): the cache switched off, for reference;
  * ``first``: the cache folder is empty, so every program is compiled and written;
  * ``second``: the same run again; its programs are read from the folder instead of compiled.

``time_to_first_step_s`` is the wall time from starting the process to the first progress row of step 1
(the config's ``log_every`` is set to 1), so it covers imports, model and data setup, the first compile and
the first step. ``time_to_ready_s`` stops earlier, when the first step's program is ready (the line that
says it was compiled or loaded from the cache): everything but the first step's own execution, which on a
CPU can take longer than a compile for a real-size model. ``total_s`` is the time until the process exits
(all steps, the final evaluation).

``--set KEY=VALUE`` (repeatable) overrides a config field, as ``--config.KEY=VALUE`` does for
``run_train.py``. ``--arch=NAME`` (a name of ``benchmarks/archs.py``: bart-base, t5-small, ...) first writes a
checkpoint folder of that architecture with random weights (transformers + torch ``save_pretrained``) and a
word tokenizer trained on the config's training texts, and sets ``model.name_or_path`` to it, so a shipped
config runs on a real-layout checkpoint without the hub, e.g.::

    python benchmarks/second_start.py --config=configs/bart_vae.py --arch=bart-base --steps=4 \
        --set data.train=../shared/data/ptb/valid.txt --set data.eval=../shared/data/ptb/test.txt \
        --set batch_size=8

With ``--repeats=N`` the sequence runs N times, each with a new empty cache folder (unless ``--cache-dir``
is given), and the medians are reported.

``--entry=wrapper`` (default) runs this file's child mode, which calls ``compile_cache.enable()`` and then
``flax_textvae.train.train_and_evaluate``; ``--entry=run_train`` runs ``run_train.py`` itself, which uses the
cache only where the training entry point enables it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import archs  # noqa: E402
import jax  # noqa: E402

from flax_textvae import compile_cache  # noqa: E402
from flax_textvae.configuration import with_overrides  # noqa: E402
from flax_textvae.data import train_word_tokenizer  # noqa: E402
from flax_textvae.input_pipeline import TextReader  # noqa: E402
from flax_textvae.train import train_and_evaluate  # noqa: E402

FIRST_STEP = re.compile(r"^\[phase \d+\] step 1/\d+")
READY = re.compile(r"^  (compiled|loaded from the compilation cache) in [\d.]+ s")
CHILD_TAG = "second_start_child "


def _value(text: str):
    """A ``--set`` value: a JSON / Python literal where it parses as one, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def overrides(pairs: list[str]) -> dict:
    """``['a.b=1', 'c=x']`` -> ``{'a.b': 1, 'c': 'x'}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = _value(value)
    return out


def make_checkpoint(arch: str, folder: str, texts: list[str]) -> str:
    """Writes ``arch`` with random weights and a word tokenizer of ``texts`` to ``folder``; returns it."""
    family, sizes = archs.SIZES[arch]
    train_word_tokenizer(texts, folder, family=family, vocab_size=min(sizes["vocab_size"], 30000))
    archs.save_random_model(arch, folder)
    return folder


def child(config_file: str, workdir: str, steps: int, sets: dict) -> None:
    """Trains ``config_file`` for ``steps`` steps in ``workdir`` with the cache of the environment."""
    events: dict[str, int] = {}

    def count(name: str, **kwargs) -> None:
        if name.startswith("/jax/compilation_cache/"):
            events[name.rsplit("/", 1)[1]] = events.get(name.rsplit("/", 1)[1], 0) + 1

    jax.monitoring.register_event_listener(count)
    folder = compile_cache.enable(None)
    spec = importlib.util.spec_from_file_location("config_module", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    changes = {"train_steps": steps, "log_every": 1, **sets}
    if config.phase1.steps >= steps and "phase1.steps" not in sets:
        changes["phase1.steps"] = steps // 2
    train_and_evaluate(with_overrides(config, **changes), workdir)
    print(CHILD_TAG + json.dumps({"cache_dir": folder, "events": events}), flush=True)


def _entries(folder: str) -> int:
    """Number of cache entries (files ending in -cache) in ``folder``."""
    return sum(name.endswith("-cache") for name in os.listdir(folder)) if os.path.isdir(folder) else 0


def start(args, cache: str, name: str) -> dict:
    """Runs one fresh training process; returns its timings and cache figures."""
    workdir = tempfile.mkdtemp(prefix=f"second_start_{name}_")
    if args.entry == "wrapper":
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            f"--config={args.config}",
            f"--workdir={workdir}",
            f"--steps={args.steps}",
            *(f"--set={pair}" for pair in args.set),
        ]
    else:
        cmd = [
            sys.executable,
            os.path.join(REPO, "run_train.py"),
            f"--config={args.config}",
            f"--workdir={workdir}",
            f"--config.train_steps={args.steps}",
            "--config.log_every=1",
            *(f"--config.{pair}" for pair in args.set),
        ]
    env = dict(os.environ, FLAX_TEXTVAE_COMPILE_CACHE=cache if name != "off" else "off", PYTHONUNBUFFERED="1")
    before = _entries(cache)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, ready, tail, info = None, None, [], {}
    for line in proc.stdout:
        if ready is None and READY.match(line):
            ready = time.perf_counter() - t0
        if first is None and FIRST_STEP.match(line):
            first = time.perf_counter() - t0
        if line.startswith(CHILD_TAG):
            info = json.loads(line[len(CHILD_TAG) :])
        tail = (tail + [line])[-40:]
    rc = proc.wait()
    total = time.perf_counter() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    if rc != 0 or first is None:
        raise SystemExit(f"{name} start failed (exit code {rc}):\n{''.join(tail)}")
    row = {
        "time_to_ready_s": round(ready, 2) if ready is not None else None,
        "time_to_first_step_s": round(first, 2),
        "total_s": round(total, 2),
        "cache_entries_written": _entries(cache) - before if name != "off" else 0,
    }
    row.update({k: v for k, v in info.get("events", {}).items() if k in ("cache_hits", "cache_misses")})
    print(
        f"{name:>6s}: step ready after {row['time_to_ready_s']} s, "
        f"first step after {row['time_to_first_step_s']:.2f} s, exit after {row['total_s']:.2f} s, "
        f"{row['cache_entries_written']} entries written, hits {row.get('cache_hits', '-')}",
        flush=True,
    )
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.py"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cache-dir", default=None, help="cache folder (default: a new empty temporary one)")
    p.add_argument("--entry", default="wrapper", choices=["wrapper", "run_train"])
    p.add_argument("--with-off", action="store_true", help="also time a start with the cache off")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--arch", default=None, help="write a random-weight checkpoint of this architecture and use it")
    p.add_argument("--repeats", type=int, default=1, help="repeat the sequence with a new cache; report medians")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.config, args.workdir, args.steps, overrides(args.set))
        return {}
    overrides(args.set)  # a malformed pair fails here, before any start
    folder = None
    if args.arch:
        folder = tempfile.mkdtemp(prefix=f"second_start_{args.arch}_")
        spec = importlib.util.spec_from_file_location("config_module", args.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = with_overrides(module.get_config(), **overrides(args.set))
        make_checkpoint(args.arch, folder, TextReader(config.data)(config.data.train)[0])
        args.set = args.set + [f"model.name_or_path={folder}"]
    runs = []
    try:
        for _ in range(args.repeats):
            cache = args.cache_dir or tempfile.mkdtemp(prefix="second_start_cache_")
            os.makedirs(cache, exist_ok=True)
            try:
                names = (["off"] if args.with_off else []) + ["first", "second"]
                runs.append({name: start(args, cache, name) for name in names})
            finally:
                if not args.cache_dir:
                    shutil.rmtree(cache, ignore_errors=True)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    # Per start, the median over the repeats of every figure.
    rows = {name: {k: statistics.median(r[name].get(k) or 0 for r in runs) for k in runs[0][name]} for name in runs[0]}

    def ratio(key):
        return round(rows["first"][key] / rows["second"][key], 2) if rows["second"][key] else None

    result = {
        "benchmark": "second_start",
        "config": os.path.relpath(args.config, REPO),
        "steps": args.steps,
        "entry": args.entry,
        "arch": args.arch,
        "set": [pair for pair in args.set if not (args.arch and pair.startswith("model.name_or_path="))],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "repeats": args.repeats,
        "starts": rows,
        "all_starts": runs,
        "speedup_first_step": ratio("time_to_first_step_s"),
        "speedup_ready": ratio("time_to_ready_s"),
    }
    print(
        f"time to first step: {rows['first']['time_to_first_step_s']} s (empty cache) -> "
        f"{rows['second']['time_to_first_step_s']} s (second start), {result['speedup_first_step']}x; "
        f"step ready: {rows['first']['time_to_ready_s']} s -> {rows['second']['time_to_ready_s']} s, "
        f"{result['speedup_ready']}x"
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
