"""Diagnostic plots: training curves from ``metrics.jsonl`` and per-dimension KL bars.

Uses matplotlib's object-oriented API with the Agg canvas directly (no pyplot, no global backend
switch), so it is safe on headless machines and inside tests.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_EVAL_SPLITS = ("eval", "valid", "validation", "test")


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSON-lines metrics file; blank and unparsable lines (e.g. a torn last line) are skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _is_eval(row: dict[str, Any]) -> bool:
    return str(row.get("split", "train")) in _EVAL_SPLITS


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of rows holding a finite number under ``key``, sorted by step."""
    pts = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            pts.append((float(r["step"]), float(v)))
    pts.sort()
    if not pts:
        return np.zeros((0,)), np.zeros((0,))
    arr = np.asarray(pts)
    return arr[:, 0], arr[:, 1]


def phase_boundaries(rows: Sequence[dict[str, Any]]) -> list[tuple[float, Any]]:
    """Steps where the ``phase`` value changes (train rows, in step order), with the new phase."""
    pts = sorted((float(r["step"]), r["phase"]) for r in rows if "phase" in r and not _is_eval(r))
    out = []
    for (_, prev), (step, cur) in zip(pts, pts[1:]):
        if cur != prev:
            out.append((step, cur))
    return out


def _plot_two_scales(ax, lines) -> None:
    """KL weight on the left axis, KL target C (nats, a different scale) on a twin right axis."""
    (l1, s1, v1, _), (l2, s2, v2, _) = lines
    h1 = ax.plot(s1, v1, "-", color="tab:blue", label=l1, linewidth=1.2)
    ax.set_ylabel(l1, fontsize=8, color="tab:blue")
    twin = ax.twinx()
    h2 = twin.plot(s2, v2, "-", color="tab:orange", label=f"{l2} (right)", linewidth=1.2)
    twin.set_ylabel(f"{l2} (nats)", fontsize=8, color="tab:orange")
    ax.legend(h1 + h2, [h.get_label() for h in h1 + h2], fontsize=8, loc="best")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_training_curves(metrics_jsonl_path: str | os.PathLike, out_png: str | os.PathLike) -> str:
    """Plots training curves from ``WORKDIR/metrics.jsonl`` into a PNG.

    Panels (each only when its keys are present): loss; reconstruction ``rec``; ``kl``; the KL weight
    and/or KL target C (``kl_weight``, ``kl_target``); active units ``au`` (eval rows). Eval rows
    (``split`` in eval/valid/validation/test) are drawn as markers on the rec/kl/loss panels. Phase
    changes are marked with dashed vertical lines on every panel.

    Args:
      metrics_jsonl_path: the JSON-lines file; rows need at least ``step``.
      out_png: output path (parent folders are created).

    Returns:
      ``str(out_png)``.
    """
    rows = read_metrics_jsonl(metrics_jsonl_path)
    train = [r for r in rows if not _is_eval(r)]
    evals = [r for r in rows if _is_eval(r)]

    panels: list[tuple[str, list[tuple[str, np.ndarray, np.ndarray, str]]]] = []
    for key, title in (("loss", "loss"), ("rec", "reconstruction (nats / example)"),
                       ("kl", "KL (nats / example)")):
        lines = []
        for label, src, style in (("train", train, "-"), ("eval", evals, "o-")):
            s, v = _series(src, key)
            if len(s):
                lines.append((label, s, v, style))
        if lines:
            panels.append((title, lines))
    sched = []
    for key in ("kl_weight", "kl_target"):
        s, v = _series(train, key)
        if len(s) and (key == "kl_weight" or np.any(np.asarray(v) != 0)):  # C is 0 unless a constraint is used
            sched.append((key, s, v, "-"))
    if sched:
        panels.append(("KL weight / target C", sched))
    s, v = _series(evals, "au")
    if not len(s):
        s, v = _series(train, "au")
    if len(s):
        panels.append(("active units (eval)", [("au", s, v, "o-")]))

    boundaries = phase_boundaries(rows)
    n = max(1, len(panels))
    fig = _new_figure(8.0, 2.2 * n + 0.6)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no plottable metrics", ha="center", va="center",
                     transform=axes[0].transAxes)
    for ax, (title, lines) in zip(axes, panels):
        if [ln[0] for ln in lines] == ["kl_weight", "kl_target"]:
            _plot_two_scales(ax, lines)
        else:
            for label, steps, vals, style in lines:
                ax.plot(steps, vals, style, label=label, markersize=3, linewidth=1.2)
            if len(lines) > 1:
                ax.legend(fontsize=8, loc="best")
        for step, phase in boundaries:
            ax.axvline(step, color="gray", linestyle="--", linewidth=1.0)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    if boundaries:
        top = axes[0]
        for step, phase in boundaries:
            top.annotate(f"phase {phase}", xy=(step, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, out_png)


def plot_kl_per_dim(kl_per_dim: np.ndarray, out_png: str | os.PathLike, *,
                    threshold: float = 0.01, title: Optional[str] = None) -> str:
    """Bar chart of the per-dimension KL, sorted descending, with the ``threshold`` line.

    Args:
      kl_per_dim: ``[D]`` mean over examples of ``KL(q(z_d|x) || p(z_d))`` (nats); also accepts
        ``[N, D]`` per-example values, which are averaged over examples first.
      out_png: output path (parent folders are created).
      threshold: dims above it are counted in the annotation (0.01, as the active-unit threshold).
      title: optional title.

    Returns:
      ``str(out_png)``.
    """
    kl = np.asarray(kl_per_dim, np.float64)
    if kl.ndim == 2:
        kl = kl.mean(axis=0)
    kl = kl.reshape(-1)
    order = np.argsort(-kl, kind="stable")
    vals = kl[order]
    d = vals.shape[0]
    above = int(np.sum(vals > threshold))

    fig = _new_figure(max(6.0, min(16.0, 0.12 * d + 3.0)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue" if v > threshold else "tab:gray" for v in vals]
    ax.bar(np.arange(d), vals, color=colors, width=0.85)
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.0,
               label=f"threshold {threshold:g}")
    ax.legend(fontsize=8, loc="center right")
    ax.text(0.98, 0.95, f"{above} / {d} dims with KL > {threshold:g} nats\ntotal KL = {kl.sum():.3g}",
            transform=ax.transAxes, ha="right", va="top", fontsize=9,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    if d <= 64:
        ax.set_xticks(np.arange(d))
        ax.set_xticklabels([str(i) for i in order], fontsize=6 if d > 32 else 8)
        ax.set_xlabel("latent dimension (sorted by KL)")
    else:
        ax.set_xlabel("rank of latent dimension (sorted by KL)")
    ax.set_ylabel("KL (nats)")
    ax.set_title(title or "KL per latent dimension", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png)


def _save(fig: Figure, out_png: str | os.PathLike) -> str:
    out = os.fspath(out_png)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(out, format="png")
    return out


__all__ = ["read_metrics_jsonl", "plot_training_curves", "plot_kl_per_dim"]
