"""flax_textvae.plots: PNGs are written and optional keys may be absent; the figures mark phases where they
begin, draw eval rows as markers, keep each phase's loss apart, and count active units as the metric au does."""

import json
import math
import os
import re

import numpy as np
import pytest
from _trained_run import trained_run
from matplotlib.collections import PolyCollection

from flax_textvae import cli, metrics, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def _assert_png(path, min_bytes=5_000):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes, len(data)


def _full_rows():
    rows = []
    for step in range(0, 200, 5):
        phase = 1 if step < 80 else 2
        rows.append(
            dict(
                step=step,
                phase=phase,
                loss=50 - 0.1 * step,
                rec=48 - 0.1 * step,
                kl=0.0 if phase == 1 else 2 + 0.02 * step,
                kl_weight=0.0 if phase == 1 else min(1.0, (step - 80) / 60),
                kl_target=min(5.0, 0.05 * step),
            )
        )
        if step % 50 == 0:
            rows.append(
                dict(
                    step=step,
                    phase=phase,
                    split="eval",
                    loss=52 - 0.1 * step,
                    rec=50 - 0.1 * step,
                    kl=1.0 + 0.01 * step,
                    au=min(32, step // 10),
                )
            )
    return rows


def test_training_curves_full(tmp_path):
    src = _write_jsonl(tmp_path / "metrics.jsonl", _full_rows(), extra_lines=["", '{"step": 3, "lo'])
    out = plots.plot_training_curves(src, tmp_path / "plots" / "curves.png")
    assert out == str(tmp_path / "plots" / "curves.png")
    _assert_png(out, min_bytes=20_000)


def test_training_curves_minimal_keys(tmp_path):
    rows = [dict(step=s, phase="phase1", loss=10.0 / (s + 1), rec=9.0 / (s + 1), kl=0.1) for s in range(20)]
    rows[5]["kl"] = float("nan")  # non-finite values are dropped, not fatal
    src = _write_jsonl(tmp_path / "metrics.jsonl", rows)
    _assert_png(plots.plot_training_curves(src, tmp_path / "curves.png"))


@pytest.mark.parametrize(
    "rows",
    [
        [],  # empty file
        [dict(step=0, phase=1, loss=1.0, rec=1.0, kl=0.0)],  # single row
        [dict(step=10, split="eval", au=3), dict(step=20, split="eval", au=5)],  # eval rows only
        [dict(step=s, phase=1 + (s >= 5), loss=1.0, rec=1.0, kl=0.5, kl_target=0.1 * s) for s in range(10)],
    ],
)
def test_training_curves_optional_keys_do_not_crash(tmp_path, rows):
    src = _write_jsonl(tmp_path / "metrics.jsonl", rows)
    _assert_png(plots.plot_training_curves(src, tmp_path / "curves.png"), min_bytes=1_000)


def test_phase_boundaries():
    rows = [dict(step=s, phase=1 if s < 3 else 2) for s in (4, 0, 1, 2, 3)]
    rows.append(dict(step=2, phase=9, split="eval"))  # eval rows do not create boundaries
    assert plots.phase_boundaries(rows) == [(2.0, 2)]  # the last phase-1 row: phase 2 begins after its step


def _two_phase_rows(last_phase1=500, first_phase2=550, end=1000, every=50):
    """Rows as the loop logs them: every 50 steps, phase 2 from step 500 (its first row at 550) with a KL term."""
    rows = []
    for step in list(range(every, last_phase1 + 1, every)) + list(range(first_phase2, end + 1, every)):
        phase = 1 if step <= last_phase1 else 2
        rec = 80.0 - 0.02 * step
        kl_term = 0.0 if phase == 1 else 24.0
        rows.append(
            dict(
                step=step,
                phase=phase,
                loss=rec + kl_term,
                rec=rec,
                kl_term=kl_term,
                kl=3000.0 if phase == 1 else 16.0,
                kl_weight=0.0 if phase == 1 else 1.0,
            )
        )
    for step in (last_phase1, end):
        rows.append(dict(step=step, phase=1 if step <= last_phase1 else 2, split="eval", rec=70.0, kl=10.0, au=12))
    return rows


def _vertical_lines(ax):
    return sorted(
        {
            ln.get_xdata()[0]
            for ln in ax.get_lines()
            if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] == ln.get_xdata()[1]
        }
    )


def test_the_phase_marker_sits_where_phase_2_begins_not_at_its_first_row():
    rows = _two_phase_rows()
    assert plots.phase_boundaries(rows) == [(500.0, 2)]
    fig = plots.training_figure(rows)
    for ax in fig.axes:
        if ax.get_title():  # the twin axis of the schedule panel carries no marker of its own
            assert _vertical_lines(ax) == [500.0], ax.get_title()
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["phase 1", "phase 2"]


def test_a_boundary_the_caller_knows_wins_over_the_rows():
    rows = _two_phase_rows(last_phase1=450)  # the end of phase 1 was not logged
    assert plots.phase_boundaries(rows) == [(450.0, 2)]
    fig = plots.training_figure(rows, boundaries=[(500.0, 2)])
    assert _vertical_lines(fig.axes[0]) == [500.0]


def test_each_phase_has_its_own_loss_line_and_the_kl_term_is_shaded():
    fig = plots.training_figure(_two_phase_rows())
    ax = fig.axes[0]
    assert ax.get_title().startswith("training loss = rec + kl_term")
    losses = [ln for ln in ax.get_lines() if ln.get_color() == "black"]
    assert len(losses) == 2  # one line per phase: nothing joins step 500 to step 550
    for ln in losses:
        x = np.asarray(ln.get_xdata())
        assert np.all(x <= 500) or np.all(x > 500), x
    fills = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert fills
    _, labels = ax.get_legend_handles_labels()
    assert "kl_term = loss - rec" in labels
    # the shaded band spans rec .. loss at every logged step: 24 nats high in phase 2, nothing in phase 1
    heights = {}
    for c in fills:
        for path in c.get_paths():
            for x, y in path.vertices:
                lo, hi = heights.get(x, (y, y))
                heights[x] = (min(lo, y), max(hi, y))
    assert sorted(heights) == [float(r["step"]) for r in _two_phase_rows() if "split" not in r]
    for x, (lo, hi) in heights.items():
        assert hi - lo == pytest.approx(0.0 if x <= 500 else 24.0, abs=1e-9), x


def test_eval_rows_are_markers_without_a_line():
    fig = plots.training_figure(_two_phase_rows())
    evals = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "eval"]
    assert len(evals) == 2  # rec and KL panels
    for ln in evals:
        assert ln.get_linestyle() == "None" and ln.get_marker() == "o"
        assert list(ln.get_xdata()) == [500.0, 1000.0]
    au = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "au"]
    assert len(au) == 1 and au[0].get_linestyle() == "None"


def test_an_unpenalised_phase_1_kl_gets_a_log_axis():
    fig = plots.training_figure(_two_phase_rows())
    kl_ax = next(ax for ax in fig.axes if ax.get_title().startswith("KL"))
    assert kl_ax.get_yscale() == "symlog"
    flat = [dict(r, kl=2.0) for r in _two_phase_rows()]
    kl_ax = next(ax for ax in plots.training_figure(flat).axes if ax.get_title().startswith("KL"))
    assert kl_ax.get_yscale() == "linear"


@pytest.mark.parametrize(
    "kl",
    [
        np.concatenate([np.linspace(2.0, 0.05, 12), np.full(20, 1e-4)]),
        np.random.default_rng(0).exponential(0.5, size=(16, 128)),  # [N, D] is averaged first
        np.zeros(1),
    ],
)
def test_kl_per_dim(tmp_path, kl):
    _assert_png(plots.plot_kl_per_dim(kl, tmp_path / "kl.png"))


def _posteriors(n=400, seed=0):
    """Means and log-variances where 10 dims vary across examples and 10 more carry KL without varying."""
    rng = np.random.default_rng(seed)
    d = np.arange(32)
    means = rng.normal(size=(n, 32)) * np.where(d < 10, 1.0, np.where(d < 20, 0.05, 0.001))
    logvar = np.broadcast_to(np.where(d < 20, -1.0, -0.2), (n, 32))
    return means, logvar


def _counted(fig, what):
    m = re.search(rf"(\d+) / (\d+) {what}", fig.get_suptitle())
    assert m, fig.get_suptitle()
    return int(m.group(1)), int(m.group(2))


def test_kl_figure_counts_active_units_by_the_rule_of_the_metric_au():
    means, logvar = _posteriors()
    kl = 0.5 * (np.exp(logvar) + means**2 - 1 - logvar)
    au = metrics.active_units(means)
    assert au == 10 and int(np.sum(kl.mean(0) > 0.01)) == 20  # the two rules disagree on this data
    fig = plots.kl_per_dim_figure(kl, mean_variance=metrics.posterior_mean_variance(means))
    assert _counted(fig, "active units") == (au, 32)
    kl_ax, var_ax = fig.axes
    # active bars are the blue ones, in both panels
    for ax in (kl_ax, var_ax):
        blue = [p for p in ax.patches if p.get_facecolor()[:3] == pytest.approx((0.12156, 0.46667, 0.70588), abs=1e-3)]
        assert len(blue) == au
    line = next(ln for ln in var_ax.get_lines() if ln.get_label().startswith("active-unit threshold"))
    assert list(line.get_ydata()) == [0.01, 0.01] and line.get_color() == "tab:red"
    assert line.get_zorder() > max(p.get_zorder() for p in var_ax.patches)  # drawn over the bars
    assert var_ax.get_yscale() == "log"


def test_kl_figure_legend_is_outside_the_bars():
    means, logvar = _posteriors()
    kl = 0.5 * (np.exp(logvar) + means**2 - 1 - logvar)
    for var in (metrics.posterior_mean_variance(means), None):
        fig = plots.kl_per_dim_figure(kl, mean_variance=var)
        fig.canvas.draw()
        legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert box.x0 >= ax.get_window_extent().x1, "the legend overlaps a panel"
        assert len(legend.get_texts()) == 3  # active, inactive, the threshold line


def test_kl_figure_without_variances_says_what_it_counts():
    means, logvar = _posteriors()
    kl = 0.5 * (np.exp(logvar) + means**2 - 1 - logvar)
    fig = plots.kl_per_dim_figure(kl)
    assert _counted(fig, "dims with mean KL > 0.01 nats") == (20, 32)
    assert "active" not in fig.get_suptitle()
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "KL = 0.01 nats")
    assert line.get_zorder() > max(p.get_zorder() for p in fig.axes[0].patches)
    with pytest.raises(ValueError, match="mean_variance has 3 dims"):
        plots.kl_per_dim_figure(kl, mean_variance=np.ones(3))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_run_eval_plot_counts_the_active_units_of_the_final_evaluation(tiny_run, tmp_path, monkeypatch):
    config, workdir = tiny_run
    seen = {}
    real_kl, real_curves = plots.plot_kl_per_dim, plots.plot_training_curves

    def kl_spy(kl, out, **kw):
        seen["kl"] = kw
        return real_kl(kl, out, **kw)

    def curves_spy(src, out, **kw):
        seen["curves"] = kw
        return real_curves(src, out, **kw)

    monkeypatch.setattr(plots, "plot_kl_per_dim", kl_spy)
    monkeypatch.setattr(plots, "plot_training_curves", curves_spy)
    assert cli._plot(workdir, str(tmp_path)) == 0
    final = [
        r
        for r in plots.read_metrics_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if r.get("split") == "eval" and r["step"] == config.train_steps
    ]
    assert len(final) == 1
    # the newest checkpoint on the eval split, as the final evaluation scored it
    assert plots.active_count(seen["kl"]["mean_variance"]) == final[0]["au"]
    assert seen["curves"]["boundaries"] == [(float(config.phase1.steps), 2)]
    assert os.path.getsize(tmp_path / "kl_per_dim.png") > 5_000


def test_read_metrics_jsonl_skips_bad_lines(tmp_path):
    src = _write_jsonl(
        tmp_path / "m.jsonl", [dict(step=1, loss=2.0)], extra_lines=["", "not json", "[1, 2]", '{"no_step": 1}']
    )
    rows = plots.read_metrics_jsonl(src)
    assert rows == [dict(step=1, loss=2.0)]
    assert math.isfinite(rows[0]["loss"])
