"""A study's report: ``study.md`` (a markdown table), ``study.csv`` and three PNG plots.

Written into the study folder by ``flax_textvae.study.run_study`` after every cell:

* ``study.md``: one row per cell with the held-out ``rec kl neg_elbo nll ppl mi au bleu`` (nats per
  example; ``ppl`` per token of the run's tokenizer), training ``steps`` and wall-clock ``minutes``, then each
  cell's overrides and the plots.
* ``study.csv``: the same cells with every metric of the eval json at full precision.
* ``rec_vs_kl.png`` (held-out reconstruction against KL, one labelled point per cell),
  ``active_units.png`` (active units per cell, the latent size marked) and ``kl_curves.png`` (the training
  KL of every cell, from its ``metrics.jsonl`` train rows, overlaid).

Matplotlib's object-oriented API with the Agg canvas (no pyplot, no global backend), safe on headless
machines.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flax_textvae import plots
from flax_textvae import workdir as rundir
from flax_textvae.evaluate import RESULT_KEYS

TABLE_METRICS = ("rec", "kl", "neg_elbo", "nll", "ppl", "mi", "au", "bleu")
TABLE_COLUMNS = ("cell",) + TABLE_METRICS + ("steps", "minutes")
CSV_COLUMNS = ("cell",) + tuple(RESULT_KEYS) + ("steps", "minutes")
PLOTS = ("rec_vs_kl.png", "active_units.png", "kl_curves.png")


def format_metric(value: Any) -> str:
    """How ``study.md`` shows a value: floats with 3 decimals, integers as they are, missing as ``-``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.3f}"


def markdown(study: Any, rows: Sequence[Mapping[str, Any]], configs: Mapping[str, Any]) -> str:
    """The text of ``study.md``.

    Args:
      study: a ``flax_textvae.study.Study``.
      rows: one dict per finished cell (``cell``, the metrics, ``steps``, ``minutes``).
      configs: cell name -> its config (for the backbone and latent size lines).

    Returns:
      Markdown: a header, the table, the cells' overrides, notes and the plots.
    """
    first = next(iter(configs.values()), None)
    n = rows[0].get("num_examples") if rows else None
    held_out = study.eval_data + (f" (first {study.eval_max_examples} examples)" if study.eval_max_examples else "")
    lines = [
        f"# Study: {study.name}",
        "",
        f"* base config: `{os.path.relpath(study.config) if os.path.isabs(study.config) else study.config}`",
        f"* held-out split: `{held_out}`, {n if n is not None else '?'} examples, iw_samples = {study.iw_samples}",
        f"* cells finished: {len(rows)} / {len(study.cells)}",
    ]
    if first is not None:
        lines.append(
            f"* backbone: `{first.model.name_or_path}`, latent size {first.vae.latent_size}, "
            f"train: `{first.data.train}`"
        )
    lines += [
        "",
        "Held-out metrics in nats per example (`ppl`: per token of the run's own tokenizer); `steps` "
        "trained, `minutes` of wall-clock time (training + held-out evaluation).",
        "",
    ]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|")
    for r in rows:
        lines.append(
            "| " + " | ".join(format_metric(r.get(k)) if k != "cell" else str(r["cell"]) for k in TABLE_COLUMNS) + " |"
        )
    lines += ["", "## Cells", ""]
    for name, over in study.cells:
        shown = ", ".join(f"`{k}={v!r}`" for k, v in over.items()) or "(the base config)"
        lines.append(f"* **{name}**: {shown}")
    shared = ", ".join(f"`{k}={v!r}`" for k, v in study.overrides.items())
    if shared:
        lines += ["", f"Every cell: {shared}."]
    if study.notes:
        lines += [""] + [f"> {note}" for note in study.notes]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The text of ``study.csv``: :data:`CSV_COLUMNS`, floats at full precision, missing values empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(
            ["" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS]
        )
    return buf.getvalue()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_rec_vs_kl(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """Scatter of held-out ``rec`` against ``kl``, one labelled point per cell; returns ``path``."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    seen: dict = {}
    for i, r in enumerate(rows):
        ax.scatter([r["kl"]], [r["rec"]], color=f"C{i % 10}", s=36, zorder=3)
        point = (round(r["kl"], 2), round(r["rec"], 2))
        k = seen[point] = seen.get(point, -1) + 1  # cells at the same point get their labels stacked
        ax.annotate(str(r["cell"]), (r["kl"], r["rec"]), xytext=(4, 4 + 10 * k), textcoords="offset points", fontsize=8)
    ax.set_xlabel("KL(q(z|x) || p(z))  (nats / example)")
    ax.set_ylabel("reconstruction -log p(x|z)  (nats / example)")
    ax.set_title("held-out rate and distortion per cell", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_active_units(rows: Sequence[Mapping[str, Any]], path: str, latent_size: int | None = None) -> str:
    """Bar chart of held-out active units per cell (with the latent size as a dashed line); returns ``path``."""
    fig = _figure(max(5.0, 0.8 * len(rows) + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(rows)))
    values = [r.get("au") or 0 for r in rows]
    ax.bar(xs, values, color=[f"C{i % 10}" for i in xs], width=0.7)
    for x, v in zip(xs, values):
        ax.text(x, v, str(v), ha="center", va="bottom", fontsize=8)
    if latent_size:
        ax.axhline(latent_size, color="gray", linestyle="--", linewidth=1.0)
        ax.text(-0.4, latent_size, f"latent size {latent_size}", va="bottom", ha="left", fontsize=8, color="gray")
        ax.set_ylim(0, latent_size * 1.12)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(r["cell"]) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("active units (Var_x E_q[z_d] > 0.01)")
    ax.set_title("active units per cell (held-out)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_kl_curves(cell_dirs: Mapping[str, str], path: str) -> str:
    """Training KL (nats / example) against step for every cell's ``metrics.jsonl``, overlaid.

    The KL axis turns symmetric-logarithmic (linear below 1 nat) when the curves span more than 100 nats,
    as they do when a phase 1 without KL term lets the rate grow by orders of magnitude.
    """
    fig = _figure(7.2, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    top = 0.0
    for i, (name, folder) in enumerate(cell_dirs.items()):
        metrics = os.path.join(folder, "metrics.jsonl")
        if not os.path.isfile(metrics):
            continue
        pts = sorted(
            (r["step"], r["kl"])
            for r in plots.read_metrics_jsonl(metrics)
            if r.get("split", "train") == "train" and isinstance(r.get("kl"), (int, float))
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=f"C{i % 10}", linewidth=1.2, label=name)
            top = max(top, max(p[1] for p in pts))
    if top > 100:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("training KL (nats / example)")
    ax.set_title("KL over training", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def write_report(study: Any, workdir: str, rows: Sequence[Mapping[str, Any]], configs: Mapping[str, Any]) -> list[str]:
    """Writes ``study.md``, ``study.csv`` and the three plots into ``workdir``; returns their paths.

    Args:
      study: a ``flax_textvae.study.Study``.
      workdir: the study folder (its ``cells/NAME`` folders hold the metrics).
      rows: one dict per finished cell, in order.
      configs: cell name -> config.
    """
    md, table = os.path.join(workdir, "study.md"), os.path.join(workdir, "study.csv")
    rundir.write_atomic(md, markdown(study, rows, configs))
    rundir.write_atomic(table, csv_text(rows))
    latent = next(iter(configs.values())).vae.latent_size if configs else None
    done = [r["cell"] for r in rows]
    return [
        md,
        table,
        plot_rec_vs_kl(rows, os.path.join(workdir, PLOTS[0])),
        plot_active_units(rows, os.path.join(workdir, PLOTS[1]), latent),
        plot_kl_curves({n: os.path.join(workdir, "cells", n) for n in done}, os.path.join(workdir, PLOTS[2])),
    ]
