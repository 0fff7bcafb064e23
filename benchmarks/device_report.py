"""Markdown tables (the layout of benchmarks/RESULTS.md) from the JSON files ``device_suite.sh`` wrote.

    python benchmarks/device_report.py benchmarks/results/NVIDIA_H200

Reads every ``*.json`` in the folder: ``environment.json`` and one file per run, named by kind
(``train_*``, ``torch_*``, ``xent_*``, ``eval_*``, ``attn_*``, ``second_start*``, ``prefetch*``). A run that
failed or was skipped holds ``{"error": ...}`` or ``{"skipped": ...}`` instead of figures and is listed at the
end. Exits 1 when a run failed (skipped runs are not failures) or an attention implementation disagreed with
the explicit path beyond its tolerance.
"""

from __future__ import annotations

import glob
import json
import os
import sys

# Keys each kind of run must report; a file without them counts as failed.
REQUIRED = {
    "train_": (
        "arch",
        "dtype",
        "batch",
        "real_tokens_per_s",
        "examples_per_s",
        "padding_fraction",
        "compile_s",
        "peak_memory_mb",
    ),
    "torch_": ("arch", "batch", "real_tokens_per_s", "examples_per_s", "padding_fraction", "peak_memory_mb"),
    "xent_": ("batch", "length", "d_model", "vocab", "dtype", "paths"),
    "eval_": ("arch", "dtype", "examples", "iw_samples", "examples_per_s", "decoded_tokens_per_s", "first_pass_s"),
    "attn_": ("arch", "dtype", "batch", "length", "tolerance", "layer", "model"),
    "second_start": ("config", "steps", "starts", "speedup_first_step"),
    "prefetch": ("config", "steps", "depths"),
}


def _options(run: dict) -> str:
    """The attention implementation of a training row and the other fast paths it switched on (rows written
    before the option existed ran the explicit attention)."""
    opts = [run.get("attention", "explicit")]
    opts += ["remat"] if run.get("remat") else []
    opts += [f"vocab chunk {run['vocab_chunk_size']}"] if run.get("vocab_chunk_size") else []
    return ", ".join(opts)


def _check(name: str, run: dict) -> dict:
    """``run``, or an error record when it lacks the keys of its kind."""
    if "error" in run or "skipped" in run:
        return run
    need = next((keys for prefix, keys in REQUIRED.items() if name.startswith(prefix)), ())
    missing = [k for k in need if k not in run]
    return {"error": f"result lacks {missing}"} if missing else run


def _load(folder: str) -> dict[str, dict]:
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            try:
                runs[os.path.basename(path)[:-5]] = json.load(f)
            except ValueError as e:
                runs[os.path.basename(path)[:-5]] = {"error": f"unreadable JSON: {e}"}
    return runs


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(folder: str) -> tuple[str, int]:
    """(markdown text, number of failed runs) for the suite's output ``folder``."""
    runs = _load(folder)
    env = runs.pop("environment", {})
    runs = {k: _check(k, v) for k, v in runs.items()}
    ok = {k: v for k, v in runs.items() if "error" not in v and "skipped" not in v}
    out = [
        f"Device: {env.get('device_kind', '?')} x{env.get('device_count', '?')} ({env.get('backend', '?')}), "
        f"jax {env.get('jax', '?')}, {env.get('date', '?')}, host {env.get('host', '?')}"
        + (" -- SMOKE RUN (tiny sizes, not figures)" if env.get("smoke") else "")
    ]

    train = sorted(
        (v for k, v in ok.items() if k.startswith("train_")),
        key=lambda r: (r["arch"], r["dtype"], r["batch"], _options(r)),
    )
    if train:
        out += [
            "",
            "Training step (random weights, length buckets):",
            _table(
                [
                    "arch",
                    "dtype",
                    "global batch",
                    "real tokens/s",
                    "examples/s",
                    "padding",
                    "compile s",
                    "peak device MB",
                    "TFLOP/s",
                    "MFU",
                    "XLA temp MB",
                    "attention, fast paths",
                ],
                [
                    [
                        r["arch"],
                        r["dtype"],
                        str(r["batch"]),
                        _fmt(r["real_tokens_per_s"]),
                        _fmt(r["examples_per_s"]),
                        _fmt(r["padding_fraction"], 3),
                        _fmt(r["compile_s"]),
                        _fmt(r["peak_memory_mb"], 0),
                        _fmt(r.get("achieved_tflops"), 2),
                        _fmt(r.get("mfu"), 3),
                        _fmt(r.get("xla_temp_mb_longest"), 0),
                        _options(r),
                    ]
                    for r in train
                ],
            ),
        ]
        out.append(
            "MFU = XLA's FLOP count of the compiled step x steps / time / datasheet peak of the dtype "
            "(peak_flops_per_device in the JSON)."
        )

    torch_rows = sorted((v for k, v in ok.items() if k.startswith("torch_")), key=lambda r: (r["arch"], r["batch"]))
    if torch_rows:
        jax_bf16 = {(r["arch"], r["batch"]): r for r in train if r["dtype"] == "bfloat16"}
        rows = []
        for r in torch_rows:
            arch = {"tiny-t5": "tiny"}.get(r["arch"], r["arch"])
            j = jax_bf16.get((arch, r["batch"]))
            ratio = j["real_tokens_per_s"] / r["real_tokens_per_s"] if j and r["real_tokens_per_s"] else None
            rows.append(
                [
                    r["arch"],
                    r.get("amp", "none"),
                    str(r["batch"]),
                    _fmt(r["real_tokens_per_s"]),
                    _fmt(r["examples_per_s"]),
                    _fmt(r["padding_fraction"], 3),
                    _fmt(r["peak_memory_mb"], 0),
                    str(r.get("attn_implementation")),
                    _fmt(ratio, 2),
                ]
            )
        out += [
            "",
            "PyTorch + transformers, same VAE (each batch padded to its longest):",
            _table(
                [
                    "arch",
                    "autocast",
                    "batch",
                    "real tokens/s",
                    "examples/s",
                    "padding",
                    "peak MB",
                    "attention",
                    "flax_textvae bf16 / torch",
                ],
                rows,
            ),
        ]

    for name, r in sorted(ok.items()):
        if name.startswith("xent_"):
            out += [
                "",
                f"Cross-entropy with the LM head, fwd+bwd (B={r['batch']}, T={r['length']}, "
                f"D={r['d_model']}, V={r['vocab']}, {r['dtype']}):",
                _table(
                    ["path", "step ms", "compile s", "XLA temp MB", "peak device MB"],
                    [
                        [
                            p,
                            _fmt(v["step_ms"], 2),
                            _fmt(v["compile_s"], 2),
                            _fmt(v["temp_mb"]),
                            _fmt(v.get("peak_device_mb"), 0),
                        ]
                        for p, v in r["paths"].items()
                    ],
                ),
            ]

    evals = [v for k, v in sorted(ok.items()) if k.startswith("eval_")]
    if evals:
        out += [
            "",
            "Importance-weighted evaluation (PTB-length random sentences):",
            _table(
                [
                    "arch",
                    "dtype",
                    "examples",
                    "K",
                    "examples/s",
                    "decoded sample-tokens/s",
                    "first pass s",
                    "projected s for 3,761 examples",
                    "attention",
                ],
                [
                    [
                        r["arch"],
                        r["dtype"],
                        str(r["examples"]),
                        str(r["iw_samples"]),
                        _fmt(r["examples_per_s"], 2),
                        _fmt(r["decoded_tokens_per_s"], 0),
                        _fmt(r["first_pass_s"]),
                        _fmt(3761 / r["examples_per_s"] if r["examples_per_s"] else None),
                        r.get("attention", "explicit"),
                    ]
                    for r in evals
                ],
            ),
        ]

    disagree = 0
    for name, r in sorted(ok.items()):
        if not name.startswith("attn_"):
            continue
        rows = []
        for program in ("layer", "model"):
            for impl, v in r[program].items():
                disagree += not v["agrees_with_explicit"]
                rows.append(
                    [
                        program,
                        impl,
                        _fmt(v["wall_ms"], 2),
                        f"{v['max_rel_diff_vs_explicit']:.1e}",
                        "yes" if v["agrees_with_explicit"] else "**NO**",
                    ]
                )
        out += [
            "",
            f"Attention implementations ({r['arch']}, {r['dtype']}, B={r['batch']}, T={r['length']}; layer: one "
            "decoder self-attention fwd+bwd, model: the VAE's forward):",
            _table(["program", "attention", "ms", "max rel. diff vs explicit", f"within {r['tolerance']}"], rows),
        ]

    for name, r in sorted(ok.items()):
        if name.startswith("second_start"):
            s = r["starts"]
            out += [
                "",
                f"Second start ({r['config']}, {r['steps']} steps): time to first step "
                f"{s['first']['time_to_first_step_s']} s with an empty cache, "
                f"{s['second']['time_to_first_step_s']} s from the cache ({r['speedup_first_step']}x).",
            ]
        if name.startswith("prefetch"):
            rates = ", ".join(f"data.prefetch={d}: {v['median_steps_per_s']} steps/s" for d, v in r["depths"].items())
            out += ["", f"Training loop ({r['config']}, {r['steps']} steps, median of the logged rates): {rates}."]

    bad = {k: v for k, v in runs.items() if k not in ok}
    failed = sum("error" in v for v in bad.values()) + disagree
    if bad:
        out += ["", "Not measured:"] + [
            f"  {k}: {v.get('error') or 'skipped: ' + str(v.get('skipped'))}" for k, v in sorted(bad.items())
        ]
    return "\n".join(out), failed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print(__doc__.strip().split("\n")[2].strip(), file=sys.stderr)
        return 2
    text, failed = report(argv[0])
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
