"""The logic behind run_eval.py's modes (the script itself only parses flags)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np


def _write_lines(path: str | None, lines: list[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} lines to {path}", file=sys.stderr)


def run_eval_main(flags) -> int:
    """Dispatches ``run_eval.py --mode=...``; returns the process exit code."""
    from flax_textvae import evaluate, generate

    workdir = flags.workdir
    if flags.mode == "metrics":
        config = generate.load_config(workdir)
        result = evaluate.evaluate(config, workdir, data=flags.data, name=flags.name, iw_samples=flags.iw_samples,
                                   seed=flags.seed, batch_size=flags.batch_size, step=flags.step)
        print(evaluate.format_table(result))
        return 0
    if flags.mode == "plot":
        return _plot(workdir, flags.output, flags.step)
    vae = generate.TrainedTextVAE.load(workdir, step=flags.step)
    seed = 0 if flags.seed is None else flags.seed
    if flags.mode == "reconstruct":
        texts = list(flags.text)
        if flags.input:
            with open(flags.input, encoding="utf-8") as f:
                texts += [line.strip() for line in f if line.strip()]
        if not texts:
            print("error: reconstruct needs --input=FILE or --text=SENTENCE", file=sys.stderr)
            return 2
        outs = vae.reconstruct(texts)
        for src, out in zip(texts, outs):
            print(f"in : {src}\nout: {out}")
    elif flags.mode == "sample":
        outs = vae.sample(flags.num, seed=seed, method="sample", top_p=0.9)
        print("\n".join(outs))
    else:  # interpolate
        if len(flags.text) != 2:
            print("error: interpolate needs exactly two --text=SENTENCE flags", file=sys.stderr)
            return 2
        outs = vae.interpolate(flags.text[0], flags.text[1], steps=flags.steps)
        for i, out in enumerate(outs):
            print(f"{i / max(len(outs) - 1, 1):.2f}  {out}")
    _write_lines(flags.output, outs)
    return 0


def _plot(workdir: str, out_dir: str | None, step: int | None = None) -> int:
    from flax_textvae import generate, plots

    out_dir = out_dir or os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    curves = plots.plot_training_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(out_dir, "training.png"))
    print(f"wrote {curves}")
    config = generate.load_config(workdir)
    from flax_textvae import builders, checkpoints
    from flax_textvae.evaluate import per_dim_kl

    run = builders.build_run(config, workdir, train=False)
    params, _ = checkpoints.load_params(workdir, step)  # --step, else the newest
    kl = per_dim_kl(run, params, run.eval_batches)
    path = plots.plot_kl_per_dim(kl, os.path.join(out_dir, "kl_per_dim.png"))
    with open(os.path.join(out_dir, "kl_per_dim.json"), "w") as f:
        json.dump(np.asarray(kl).tolist(), f)
    print(f"wrote {path}")
    return 0
