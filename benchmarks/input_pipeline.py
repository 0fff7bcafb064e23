"""Input pipeline alone: prepare a large synthetic corpus once, then time the grain training batches.

    python benchmarks/input_pipeline.py [--sentences=10000000] [--batches=3000] [--batch=64] \\
        [--cache=/tmp/flax_textvae_bench] [--num_workers=2] [--json=benchmarks/results/input_pipeline_cpu.json]

1. Writes ``--sentences`` lines to ``CACHE/corpus_N.txt`` (kept for later runs): words of the built-in
   grammar's vocabulary drawn from a Zipf-like unigram distribution, sentence lengths drawn from the
   grammar's own length distribution (``synthetic_sentences``; its per-sentence Python generator is too
   slow for 10M lines).
2. Trains a word tokenizer on the first 200,000 lines (``train_word_tokenizer``, BART layout).
3. ``prepare_dataset`` to ``CACHE/prepared_N`` (a no-op when the cache is up to date; its time is reported).
4. In a fresh process (so the figures are the pipeline's alone): time from the start of building the
   ``PreparedSource`` + ``GrainTrainIterator`` to the first batch, examples/s over ``--batches`` further
   batches, and the resident memory (``VmRSS`` now, ``VmHWM`` peak, and after imports) from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

_CHUNK = 200_000


def _rss_mb() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    return out


def _children_rss_mb() -> float:
    """Summed VmRSS (MiB) of this process's child processes (grain's workers), 0 without any."""
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(f.read().split())
        except OSError:
            continue
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0) / 1024
        except OSError:
            continue
    return total


def write_corpus(path: str, n: int, seed: int = 0) -> float:
    """Writes ``n`` synthetic lines to ``path`` (through a temporary file); returns the seconds taken."""
    from flax_textvae.data import synthetic_sentences, synthetic_vocabulary

    t0 = time.time()
    vocab = np.array(synthetic_vocabulary(), dtype=object)
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** 0.8
    probs /= probs.sum()
    sample = np.array([len(s.split()) for s in synthetic_sentences(20_000, seed)])
    rng = np.random.default_rng(seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for start in range(0, n, _CHUNK):
            lens = rng.choice(sample, size=min(_CHUNK, n - start))
            words = vocab[rng.choice(len(vocab), size=int(lens.sum()), p=probs)]
            seps = np.full(len(words), " ", dtype=object)
            seps[np.cumsum(lens) - 1] = "\n"
            both = np.empty(2 * len(words), dtype=object)
            both[0::2], both[1::2] = words, seps
            f.write("".join(both.tolist()))
    os.replace(tmp, path)
    return time.time() - t0


def measure(folder: str, batches: int, batch: int, num_workers: int, num_threads: int) -> dict:
    """Builds the training iterator over a prepared folder and times it (run in a fresh process)."""
    t_import = time.time()
    from flax_textvae import data

    import_s = time.time() - t_import
    rss_imports = _rss_mb()["VmRSS"]
    t0 = time.time()
    source = data.PreparedSource(folder)
    tok = source.index["tokenizer"]
    it = data.GrainTrainIterator(
        source,
        batch_size=batch,
        pad_id=1,
        decoder_start_token_id=2,
        bos_id=0,
        max_length=source.index["max_length"],
        num_buckets=8,
        seed=0,
        num_workers=num_workers,
        num_threads=num_threads,
    )
    first = next(it)
    first_s = time.time() - t0
    t1 = time.time()
    rows = tokens = 0
    for _ in range(batches):
        b = next(it)
        rows += b["input_ids"].shape[0]
        tokens += int(b["attention_mask"].sum())
    dt = time.time() - t1
    rss, children = _rss_mb(), _children_rss_mb()
    it.close()
    return {
        "num_examples": len(source),
        "tokenizer": tok["name"],
        "batch": batch,
        "batches": batches,
        "num_workers": num_workers,
        "num_threads": num_threads,
        "boundaries": it.boundaries,
        "steps_per_epoch": it.steps_per_epoch,
        "import_s": round(import_s, 2),
        "first_batch_s": round(first_s, 2),
        "first_batch_shape": list(first["input_ids"].shape),
        "examples_per_s": round(rows / dt, 1),
        "real_tokens_per_s": round(tokens / dt, 1),
        "rss_after_imports_mb": round(rss_imports, 1),
        "rss_mb": round(rss["VmRSS"], 1),
        "peak_rss_mb": round(rss["VmHWM"], 1),
        "workers_rss_mb": round(children, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=10_000_000)
    p.add_argument("--batches", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--cache", default="/tmp/flax_textvae_bench")
    p.add_argument("--num_workers", type=int, default=None, help="prepare's worker processes (default: CPUs)")
    p.add_argument(
        "--pipeline_workers",
        type=int,
        action="append",
        default=None,
        help="grain worker processes for the measured iterator (repeat for several runs; default 0)",
    )
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:  # the fresh measuring process
        workers = (args.pipeline_workers or [0])[0]
        print(json.dumps(measure(args.measure, args.batches, args.batch, workers, args.num_threads)))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flax_textvae import data

    os.makedirs(args.cache, exist_ok=True)
    n = args.sentences
    corpus = os.path.join(args.cache, f"corpus_{n}.txt")
    result: dict = {"sentences": n, "cpus": os.cpu_count()}
    if not os.path.isfile(corpus):
        result["corpus_s"] = round(write_corpus(corpus, n), 1)
        print(f"corpus: {n:,} lines in {result['corpus_s']:.0f}s -> {corpus}", file=sys.stderr)
    tok_dir = os.path.join(args.cache, f"tokenizer_{n}")
    if not os.path.isdir(tok_dir):
        with open(corpus) as f:
            head = [line for _, line in zip(range(200_000), f)]
        data.train_word_tokenizer(head, tok_dir, family="bart", vocab_size=256)
    out = os.path.join(args.cache, f"prepared_{n}")
    t0 = time.time()
    index = data.prepare_dataset(corpus, tok_dir, args.max_length, out, num_workers=args.num_workers)
    result.update(
        prepare_s=round(time.time() - t0, 1),
        prepare_was_cached=bool(index.get("up_to_date")),
        prepare_recorded_s=index.get("seconds"),
        corpus_mb=round(os.path.getsize(corpus) / 2**20, 1),
        prepared_mb=round(
            sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)))
            / 2**20,
            1,
        ),
        mean_length=round(index["stats"]["mean_length"], 2),
    )
    result["runs"] = []
    for workers in args.pipeline_workers or [0]:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            f"--measure={out}",
            f"--batches={args.batches}",
            f"--batch={args.batch}",
            f"--pipeline_workers={workers}",
            f"--num_threads={args.num_threads}",
        ]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        result["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
