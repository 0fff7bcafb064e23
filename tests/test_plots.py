"""Smoke tests for flax_textvae.plots: PNGs are written, non-trivial, and optional keys may be absent."""
import json
import math

import numpy as np
import pytest

from flax_textvae import plots

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
        rows.append(dict(step=step, phase=phase, loss=50 - 0.1 * step, rec=48 - 0.1 * step,
                         kl=0.0 if phase == 1 else 2 + 0.02 * step,
                         kl_weight=0.0 if phase == 1 else min(1.0, (step - 80) / 60),
                         kl_target=min(5.0, 0.05 * step)))
        if step % 50 == 0:
            rows.append(dict(step=step, phase=phase, split="eval", loss=52 - 0.1 * step,
                             rec=50 - 0.1 * step, kl=1.0 + 0.01 * step, au=min(32, step // 10)))
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


@pytest.mark.parametrize("rows", [
    [],                                                                   # empty file
    [dict(step=0, phase=1, loss=1.0, rec=1.0, kl=0.0)],                   # single row
    [dict(step=10, split="eval", au=3), dict(step=20, split="eval", au=5)],  # eval rows only
    [dict(step=s, phase=1 + (s >= 5), loss=1.0, rec=1.0, kl=0.5, kl_target=0.1 * s) for s in range(10)],
])
def test_training_curves_optional_keys_do_not_crash(tmp_path, rows):
    src = _write_jsonl(tmp_path / "metrics.jsonl", rows)
    _assert_png(plots.plot_training_curves(src, tmp_path / "curves.png"), min_bytes=1_000)


def test_phase_boundaries():
    rows = [dict(step=s, phase=1 if s < 3 else 2) for s in (4, 0, 1, 2, 3)]
    rows.append(dict(step=2, phase=9, split="eval"))  # eval rows do not create boundaries
    assert plots.phase_boundaries(rows) == [(3.0, 2)]


@pytest.mark.parametrize("kl", [
    np.concatenate([np.linspace(2.0, 0.05, 12), np.full(20, 1e-4)]),
    np.random.default_rng(0).exponential(0.5, size=(16, 128)),  # [N, D] is averaged first
    np.zeros(1),
])
def test_kl_per_dim(tmp_path, kl):
    _assert_png(plots.plot_kl_per_dim(kl, tmp_path / "kl.png"))


def test_read_metrics_jsonl_skips_bad_lines(tmp_path):
    src = _write_jsonl(tmp_path / "m.jsonl", [dict(step=1, loss=2.0)],
                       extra_lines=["", "not json", "[1, 2]", '{"no_step": 1}'])
    rows = plots.read_metrics_jsonl(src)
    assert rows == [dict(step=1, loss=2.0)]
    assert math.isfinite(rows[0]["loss"])
