"""Diagnostic plots: training curves from ``metrics.jsonl`` and per-dimension KL bars.

Uses matplotlib's object-oriented API with the Agg canvas directly (no pyplot, no global backend
switch), so it is safe on headless machines and inside tests. Each plot has a ``*_figure`` function that
returns the matplotlib ``Figure`` (for inspection) and a ``plot_*`` function that writes it as a PNG.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: importing it costs about 0.5 s
    from matplotlib.figure import Figure

_EVAL_SPLITS = ("eval", "valid", "validation", "test")
_PHASE_TINTS = ("tab:orange", "tab:blue", "tab:green", "tab:purple")
_EVAL_STYLE = dict(linestyle="none", marker="o", markersize=4, color="tab:orange", label="eval")


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


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of rows holding a finite number under ``key``, sorted by step."""
    pts = sorted((float(r["step"]), float(r[key])) for r in rows if _number(r.get(key)))
    if not pts:
        return np.zeros((0,)), np.zeros((0,))
    arr = np.asarray(pts)
    return arr[:, 0], arr[:, 1]


def _phase_runs(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Train rows in step order, cut where ``phase`` changes (one run when rows carry no phase)."""
    runs: list[list[dict[str, Any]]] = []
    for r in sorted(rows, key=lambda r: float(r["step"])):
        if runs and runs[-1][-1].get("phase") == r.get("phase"):
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def phase_boundaries(rows: Sequence[dict[str, Any]]) -> list[tuple[float, Any]]:
    """``[(step, new phase)]``: the step at which each phase after the first begins (train rows only).

    A row's ``step`` is the number of steps done when it was logged, and the training loop always logs the
    last step of a phase, so a phase begins at the largest step among the previous phase's rows (its own
    first row comes one logging interval later).
    """
    runs = _phase_runs([r for r in rows if "phase" in r and not _is_eval(r)])
    return [(float(prev[-1]["step"]), cur[0]["phase"]) for prev, cur in zip(runs, runs[1:])]


def _phase_spans(rows: Sequence[dict[str, Any]], boundaries: Sequence[tuple[float, Any]]):
    """``[(start, end, phase)]`` covering the logged steps, cut at ``boundaries``."""
    train = [r for r in rows if not _is_eval(r)]
    phased = sorted((float(r["step"]), r["phase"]) for r in train if "phase" in r)
    if not phased or not boundaries:
        return []
    steps = [float(r["step"]) for r in rows]
    edges = [0.0 if min(steps) >= 0 else min(steps)] + [float(b) for b, _ in boundaries] + [max(steps)]
    phases = [phased[0][1]] + [p for _, p in boundaries]
    return [(a, b, p) for a, b, p in zip(edges, edges[1:], phases) if b > a]


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_two_scales(ax, lines) -> None:
    """KL weight on the left axis, KL target C (nats, a different scale) on a twin right axis."""
    (l1, s1, v1), (l2, s2, v2) = lines
    h1 = ax.plot(s1, v1, "-", color="tab:blue", label=l1, linewidth=1.2)
    ax.set_ylabel(l1, fontsize=8, color="tab:blue")
    twin = ax.twinx()
    h2 = twin.plot(s2, v2, "-", color="tab:orange", label=f"{l2} (right)", linewidth=1.2)
    twin.set_ylabel(f"{l2} (nats)", fontsize=8, color="tab:orange")
    ax.legend(h1 + h2, [h.get_label() for h in h1 + h2], fontsize=8, loc="best")


def _train_lines(ax, runs, key: str, **style) -> bool:
    """Draws ``key`` of each phase's train rows as its own line (no segment joins two phases)."""
    drawn = False
    for run in runs:
        s, v = _series(run, key)
        if len(s):
            ax.plot(s, v, **(style if not drawn else dict(style, label="_nolegend_")))
            drawn = True
    return drawn


def _loss_panel(ax, runs) -> None:
    """The objective: loss per phase, with its KL part (loss - rec = kl_term) shaded above rec."""
    shaded = False
    for run in runs:
        both = [r for r in run if _number(r.get("loss")) and _number(r.get("rec"))]
        if both:
            s = np.asarray([float(r["step"]) for r in both])
            order = np.argsort(s, kind="stable")
            rec = np.asarray([float(r["rec"]) for r in both])[order]
            loss = np.asarray([float(r["loss"]) for r in both])[order]
            ax.fill_between(
                s[order],
                rec,
                loss,
                color="tab:red",
                alpha=0.3,
                linewidth=0,
                label="_nolegend_" if shaded else "kl_term = loss - rec",
            )
            shaded = True
    _train_lines(ax, runs, "loss", color="black", linewidth=1.2, label="train loss")
    _train_lines(ax, runs, "rec", color="tab:blue", linewidth=0.8, alpha=0.8, label="train rec")


def _has(key: str, rows: Sequence[dict[str, Any]]) -> bool:
    """Whether any row holds a finite number under ``key``."""
    return bool(len(_series(rows, key)[0]))


def _panels(train_runs, train, evals) -> list:
    """``[(title, draw(ax))]`` of the panels whose keys the rows hold."""
    panels = _loss_panels(train_runs, train, evals)
    for key, title in (("rec", "reconstruction rec (nats / example)"), ("kl", "KL (nats / example)")):
        if _has(key, train) or _has(key, evals):
            panels.append((title, _curve_drawer(key, train_runs, train, evals)))
    return panels + _schedule_panels(train) + _au_panels(train, evals)


def _loss_panels(train_runs, train, evals) -> list:
    """The loss panel: train loss with its KL part, else the eval loss as markers, else none."""
    if _has("loss", train):
        return [
            (
                "training loss = rec + kl_term (kl_term is the KL part of the objective)",
                lambda ax: _loss_panel(ax, train_runs),
            )
        ]
    if _has("loss", evals):
        return [("loss", lambda ax: ax.plot(*_series(evals, "loss"), **_EVAL_STYLE))]
    return []


def _curve_drawer(key: str, train_runs, train, evals):
    """``draw(ax)`` of the ``rec`` or ``kl`` panel: train lines per phase, eval markers (``kl``: with ``kl_term``)."""

    def draw(ax):
        _train_lines(ax, train_runs, key, color="tab:blue", linewidth=1.2, label="train")
        if key == "kl":
            _train_lines(
                ax,
                train_runs,
                "kl_term",
                color="tab:red",
                linewidth=1.0,
                linestyle="--",
                label="train kl_term (in the loss)",
            )
        s, v = _series(evals, key)
        if len(s):
            ax.plot(s, v, **_EVAL_STYLE)
        if key == "kl" and _wide_range(np.concatenate([_series(train, "kl")[1], v])):
            # phase 1 has no KL penalty, and its KL can be orders of magnitude above phase 2's
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_title("KL (nats / example, symmetric log axis)", fontsize=10)

    return draw


def _schedule_panels(train) -> list:
    """The KL weight / target C panel (one axis each when both are logged), or none."""
    sched = [(key, *_series(train, key)) for key in ("kl_weight", "kl_target")]
    sched = [(k, s, v) for k, s, v in sched if len(s) and (k == "kl_weight" or np.any(v != 0))]  # C: constraint only
    if len(sched) == 2:
        return [("KL weight / target C", lambda ax: _plot_two_scales(ax, sched))]
    if sched:
        return [
            (
                sched[0][0],
                lambda ax: ax.plot(sched[0][1], sched[0][2], "-", color="tab:blue", linewidth=1.2, label=sched[0][0]),
            )
        ]
    return []


def _au_panels(train, evals) -> list:
    """The active-units panel (eval rows when they hold ``au``, else train rows), or none."""
    au_src = evals if _has("au", evals) else train
    if not _has("au", au_src):
        return []

    def draw_au(ax):
        s, v = _series(au_src, "au")
        ax.plot(s, v, **dict(_EVAL_STYLE, label="au"))
        pad = max(1.0, 0.1 * float(v.max() - v.min()))  # room for integer ticks around a flat count
        ax.set_ylim(max(float(v.min()) - pad, -0.5), float(v.max()) + pad)
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    return [("active units au (eval)", draw_au)]


def _wide_range(values: np.ndarray) -> bool:
    """Whether positive values span more than two decades (a linear axis would flatten the small ones)."""
    v = np.abs(np.asarray(values, np.float64))
    return bool(v.size) and float(v.max()) > 100.0 * max(float(np.percentile(v, 25)), 1.0)


def training_figure(
    rows: Sequence[dict[str, Any]], *, boundaries: Optional[Sequence[tuple[float, Any]]] = None
) -> Figure:
    """The training-curves figure of ``metrics.jsonl`` rows (see :func:`plot_training_curves`)."""
    train = [r for r in rows if not _is_eval(r)]
    evals = [r for r in rows if _is_eval(r)]
    train_runs = _phase_runs(train)
    panels = _panels(train_runs, train, evals)
    boundaries = list(phase_boundaries(rows) if boundaries is None else boundaries)
    spans = _phase_spans(rows, boundaries)

    n = max(1, len(panels))
    fig = _new_figure(9.0, 2.2 * n + 0.6)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no plottable metrics", ha="center", va="center", transform=axes[0].transAxes)
    for ax, (title, draw) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        draw(ax)
        for i, (a, b, _) in enumerate(spans):
            ax.axvspan(a, b, color=_PHASE_TINTS[i % len(_PHASE_TINTS)], alpha=0.07, linewidth=0, zorder=0)
        for step, _ in boundaries:
            ax.axvline(step, color="dimgray", linestyle="--", linewidth=1.0, zorder=1)
        handles, labels = ax.get_legend_handles_labels()
        if len(handles) > 1 and ax.get_legend() is None:
            ax.legend(fontsize=8, loc="best")
        ax.grid(True, alpha=0.3)
    top = axes[0]
    for a, b, phase in spans:
        top.annotate(
            f"phase {phase}",
            xy=((a + b) / 2, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, -3),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=8,
            color="dimgray",
        )
    axes[-1].set_xlabel("step" + (" (dashed line: a new phase begins)" if boundaries else ""))
    return fig


def plot_training_curves(
    metrics_jsonl_path: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    boundaries: Optional[Sequence[tuple[float, Any]]] = None,
) -> str:
    """Plots training curves from ``WORKDIR/metrics.jsonl`` into a PNG.

    Panels (each only when its keys are present): the training loss, drawn per phase, with its KL part
    (``loss - rec``, the ``kl_term``) shaded above ``rec`` so that the step up where phase 2 adds the KL term
    reads as a change of objective; reconstruction ``rec``; ``kl`` with the ``kl_term``; the KL weight and/or
    KL target C (``kl_weight``, ``kl_target``); active units ``au``. Train rows are lines, one per phase;
    eval rows (``split`` in eval/valid/validation/test) are markers only, as they are sparse. Each phase
    has its own background tint, and a dashed line marks the step where a new phase begins.

    Args:
      metrics_jsonl_path: the JSON-lines file; rows need at least ``step``.
      out_png: output path (parent folders are created).
      boundaries: ``[(step, phase)]`` where each later phase begins, when the caller knows them (the run's
        ``phase1.steps``); default: :func:`phase_boundaries` of the rows.

    Returns:
      ``str(out_png)``.
    """
    fig = training_figure(read_metrics_jsonl(metrics_jsonl_path), boundaries=boundaries)
    return _save(fig, out_png)


def active_count(mean_variance: np.ndarray, threshold: float = 0.01) -> int:
    """Active units from per-dimension ``Var_x(E_q[z_d|x])``: the rule of ``metrics.active_units``."""
    return int(np.sum(np.asarray(mean_variance, np.float64).reshape(-1) > threshold))


def kl_per_dim_figure(
    kl_per_dim: np.ndarray,
    *,
    mean_variance: Optional[np.ndarray] = None,
    threshold: float = 0.01,
    title: Optional[str] = None,
) -> Figure:
    """The per-dimension KL figure (see :func:`plot_kl_per_dim`)."""
    kl = np.asarray(kl_per_dim, np.float64)
    if kl.ndim == 2:
        kl = kl.mean(axis=0)
    kl = kl.reshape(-1)
    d = kl.shape[0]
    order = np.argsort(-kl, kind="stable")
    var = None
    if mean_variance is not None:
        var = np.asarray(mean_variance, np.float64).reshape(-1)
        if var.shape != kl.shape:
            raise ValueError(f"mean_variance has {var.shape[0]} dims, kl_per_dim {d}")
    on, headline = _activity(kl, order, var, threshold)
    colors = np.where(on, "tab:blue", "tab:gray")
    width = max(6.0, min(16.0, 0.12 * d + 4.5))
    fig = _new_figure(width, 3.8 if var is None else 6.0)
    axes = fig.subplots(1 if var is None else 2, 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(f"{title or 'KL per latent dimension'}\n{headline}", fontsize=10)
    line_ax = _draw_bars(axes, kl[order], None if var is None else var[order], colors, threshold)
    _threshold_legend(axes[0], line_ax, threshold, by_variance=var is not None)
    _label_dimensions(axes[-1], order)
    return fig


def _activity(kl: np.ndarray, order: np.ndarray, var: Optional[np.ndarray], threshold: float) -> tuple[np.ndarray, str]:
    """(whether each dimension, in ``order``, is active; the headline counting them)."""
    if var is not None:
        headline = (
            f"{active_count(var, threshold)} / {kl.shape[0]} active units (Var_x E[z_d|x] > {threshold:g}, "
            f"as the metric au)  |  total KL {kl.sum():.3g} nats"
        )
        return var[order] > threshold, headline
    on = kl[order] > threshold
    headline = (
        f"{int(on.sum())} / {kl.shape[0]} dims with mean KL > {threshold:g} nats  |  total KL {kl.sum():.3g} nats"
    )
    return on, headline


def _log_bars(ax, values: np.ndarray, colors: np.ndarray, threshold: float) -> None:
    """Bars on a log axis whose range keeps ``threshold`` and every bar in view (0 is drawn as 1e-12)."""
    shown = np.maximum(values, 1e-12)  # a log axis cannot show 0
    ax.bar(np.arange(len(shown)), shown, color=colors, width=0.85, zorder=2)
    ax.set_yscale("log")
    ax.set_ylim(min(threshold / 10, shown.min() / 2), max(threshold * 10, shown.max() * 2))


def _draw_bars(axes, vals: np.ndarray, var: Optional[np.ndarray], colors: np.ndarray, threshold: float):
    """The KL bars on ``axes[0]`` and, with ``var`` (sorted as ``vals``), its bars on ``axes[1]``.

    Returns the axis that holds the threshold line: the variance axis when there is one.
    """
    ax = axes[0]
    if var is None:  # the threshold line sits near 0: a log axis keeps it, and the bars near it, visible
        _log_bars(ax, vals, colors, threshold)
    else:
        ax.bar(np.arange(len(vals)), vals, color=colors, width=0.85, zorder=2)
    ax.set_ylabel("KL (nats)")
    ax.grid(True, axis="y", alpha=0.3, zorder=0)
    if var is None:
        return ax
    _log_bars(axes[1], var, colors, threshold)
    axes[1].set_ylabel("Var_x E[z_d|x]")
    axes[1].grid(True, axis="y", alpha=0.3, zorder=0)
    return axes[1]


def _threshold_legend(ax, line_ax, threshold: float, *, by_variance: bool) -> None:
    """The dashed threshold line on ``line_ax`` and the legend (active / inactive / threshold) beside ``ax``."""
    line_label = f"active-unit threshold {threshold:g}" if by_variance else f"KL = {threshold:g} nats"
    line_ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.6, zorder=3, label=line_label)
    from matplotlib.patches import Patch

    handles = [
        Patch(color="tab:blue", label="active" if by_variance else f"KL > {threshold:g}"),
        Patch(color="tab:gray", label="inactive" if by_variance else f"KL <= {threshold:g}"),
        line_ax.get_legend_handles_labels()[0][0],
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _label_dimensions(last, order: np.ndarray) -> None:
    """X axis of the bottom panel: the dimension numbers under the bars (up to 64 dims), else the rank."""
    d = len(order)
    if d <= 64:
        last.set_xticks(np.arange(d))
        last.set_xticklabels([str(i) for i in order], fontsize=6 if d > 32 else 8)
        last.set_xlabel("latent dimension (sorted by KL)")
    else:
        last.set_xlabel("rank of latent dimension (sorted by KL)")


def plot_kl_per_dim(
    kl_per_dim: np.ndarray,
    out_png: str | os.PathLike,
    *,
    mean_variance: Optional[np.ndarray] = None,
    threshold: float = 0.01,
    title: Optional[str] = None,
) -> str:
    """Bar chart of the per-dimension KL, sorted descending, with the active units marked.

    With ``mean_variance`` (the per-dimension variance across the split of the posterior mean, as
    ``metrics.posterior_mean_variance`` gives it) a second panel shows it on a log axis with the
    ``threshold`` line, a dimension is active when its variance exceeds the threshold, and the headline
    count is the metric ``au`` of the same data. Without it the count is of dimensions whose mean KL
    exceeds ``threshold`` nats, and says so.

    Args:
      kl_per_dim: ``[D]`` mean over examples of ``KL(q(z_d|x) || p(z_d))`` (nats); also accepts
        ``[N, D]`` per-example values, which are averaged over examples first.
      out_png: output path (parent folders are created).
      mean_variance: ``[D]`` ``Var_x(E_q[z_d|x])`` over the same examples, or None.
      threshold: 0.01, the active-unit threshold of docs/metrics.md.
      title: optional title.

    Returns:
      ``str(out_png)``.
    """
    return _save(kl_per_dim_figure(kl_per_dim, mean_variance=mean_variance, threshold=threshold, title=title), out_png)


def _save(fig: Figure, out_png: str | os.PathLike) -> str:
    out = os.fspath(out_png)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(out, format="png")
    return out


__all__ = [
    "read_metrics_jsonl",
    "phase_boundaries",
    "training_figure",
    "plot_training_curves",
    "active_count",
    "kl_per_dim_figure",
    "plot_kl_per_dim",
]
