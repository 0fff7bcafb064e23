"""Study grids: both shipped smoke studies run end to end, the report equals each cell's eval json, a rerun
trains nothing, a changed evaluation only re-evaluates, and user errors exit 2 with one message.

The default run trains a subset of each smoke study's cells (one single-phase and one two-phase cell for
Park & Lee, two targets for Prokhorov) to stay near two minutes on 2 CPU cores; the slow test runs every
cell of both smoke studies through the command line.
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from flax_textvae import study, study_cell, study_report, validation
from flax_textvae.evaluate import RESULT_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = {"park_lee": ["vanilla", "thresh_3_del_0.15"], "prokhorov": ["C_3", "C_15"]}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def study_file(name):
    return os.path.join(REPO, "configs", "studies", f"{name}.py")


# The first study in the default set, the others with the slow ones (each trains its own smoke cells).
@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=[pytest.mark.slow] if i else []) for i, n in enumerate(sorted(STUDIES))],
)
def finished(request, tmp_path_factory):
    """(study, workdir, rows) of a smoke study after training the test's subset of its cells."""
    name = request.param
    spec = study.load_study(study_file(name), smoke=True)
    workdir = str(tmp_path_factory.mktemp(name))
    rows = study.run_study(spec, workdir, cells=STUDIES[name])
    return spec, workdir, rows


def _eval_json(workdir, spec, cell):
    with open(os.path.join(workdir, "cells", cell, "eval", f"{study_cell.eval_name(spec)}.json")) as f:
        return json.load(f)


def _markdown_rows(path):
    rows = []
    for line in open(path).read().splitlines():
        if line.startswith("| ") and not line.startswith("| cell "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_has_one_row_per_cell_equal_to_the_eval_json(finished):
    spec, workdir, rows = finished
    cells = STUDIES[spec.name.replace("_smoke", "")]
    assert [r["cell"] for r in rows] == cells
    md = _markdown_rows(os.path.join(workdir, "study.md"))
    with open(os.path.join(workdir, "study.csv")) as f:
        table = list(csv.DictReader(f))
    assert [r[0] for r in md] == cells and [r["cell"] for r in table] == cells
    for md_row, csv_row, cell in zip(md, table, cells):
        result = _eval_json(workdir, spec, cell)
        assert result["iw_samples"] == spec.iw_samples and result["num_examples"] == spec.eval_max_examples
        shown = dict(zip(study_report.TABLE_COLUMNS, md_row))
        for key in study_report.TABLE_METRICS:
            assert shown[key] == study_report.format_metric(result[key]), (cell, key)
        for key in RESULT_KEYS:
            assert (csv_row[key] == "") if result[key] is None else float(csv_row[key]) == result[key], (cell, key)
        assert int(csv_row["steps"]) == int(shown["steps"]) == spec.overrides["train_steps"]
        assert float(csv_row["minutes"]) > 0


def test_writes_the_three_plots(finished):
    _, workdir, _ = finished
    for name in study_report.PLOTS:
        with open(os.path.join(workdir, name), "rb") as f:
            data = f.read()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 10_000, (name, len(data))


def _snapshot(workdir):
    """Bytes of every cell's metrics.jsonl and the names of its checkpoint steps."""
    out = {}
    for cell in os.listdir(os.path.join(workdir, "cells")):
        folder = os.path.join(workdir, "cells", cell)
        with open(os.path.join(folder, "metrics.jsonl"), "rb") as f:
            out[cell] = (f.read(), sorted(os.listdir(os.path.join(folder, "checkpoints"))))
    return out


def test_rerun_skips_every_finished_cell(finished):
    spec, workdir, rows = finished
    before, lines = _snapshot(workdir), []
    t0 = time.time()
    again = study.run_study(spec, workdir, cells=STUDIES[spec.name.replace("_smoke", "")], log=lines.append)
    assert time.time() - t0 < 30
    assert all(r["skipped"] for r in again)
    assert [{k: v for k, v in r.items() if k != "skipped"} for r in again] == [
        {k: v for k, v in r.items() if k != "skipped"} for r in rows
    ]
    assert sum("skipped" in line for line in lines) == len(rows)
    assert _snapshot(workdir) == before


def test_changed_evaluation_re_evaluates_without_training(finished):
    spec, workdir, _ = finished
    first = STUDIES[spec.name.replace("_smoke", "")][0]
    before = _snapshot(workdir)
    changed = dataclasses.replace(spec, iw_samples=spec.iw_samples + 1)
    rows = study.run_study(changed, workdir, cells=[first], log=lambda line: None)
    assert _snapshot(workdir) == before
    assert rows[0]["iw_samples"] == spec.iw_samples + 1 and not rows[0]["skipped"]
    assert _eval_json(workdir, spec, first)["iw_samples"] == spec.iw_samples + 1


def _cli(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "flax_textvae.study", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bad_override_key_exits_2_with_one_message(tmp_path):
    workdir = tmp_path / "w"
    out = _cli(f"--study={study_file('prokhorov')}", f"--workdir={workdir}", "--smoke", "--override=loss.kindd=elbo")
    assert out.returncode == 2, out.stderr
    assert "loss.kindd" in out.stderr and "did you mean 'loss.kind'?" in out.stderr
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


def test_bad_cell_key_and_missing_file_are_user_errors(tmp_path):
    path = tmp_path / "bad_study.py"
    path.write_text(
        "from flax_textvae.study import Study\n"
        "def get_study(smoke):\n"
        f"    return Study(config={os.path.join(REPO, 'configs', 'tiny.py')!r}, eval_data='synthetic:16:1',\n"
        "                 iw_samples=2, cells=[('a', {'vae.latent_sise': 4}), ('b', {'loss.kind': 'free_bits'})])\n"
    )
    with pytest.raises(validation.ConfigError) as err:
        study.cell_configs(study.load_study(str(path)))
    assert len(err.value.problems) == 1 and "cell 'a'" in err.value.problems[0]
    assert "did you mean 'vae.latent_size'?" in err.value.problems[0]
    out = _cli(f"--study={path}", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2 and "vae.latent_sise" in out.stderr and "Traceback" not in out.stderr
    out = _cli(f"--study={tmp_path / 'missing.py'}", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


def test_cut_split_and_cell_selection(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a b\n\nc d\ne f\n")
    cut = study.cut_split(str(text), 2, str(tmp_path / "data"))
    assert open(cut).read() == "a b\nc d\n" and study.cut_split(str(text), 0, "unused") == str(text)
    assert study.cut_split("synthetic:500:1", 48, "unused") == "synthetic:48:1"
    spec = study.load_study(study_file("park_lee"), smoke=True)
    assert [n for n, _ in study.select_cells(spec, ["thresh_3", "vanilla"]).cells] == ["vanilla", "thresh_3"]
    with pytest.raises(validation.ConfigError, match="no cell 'nope'"):
        study.select_cells(spec, ["nope"])
    assert study.parse_override("loss.beta=2", study.base_config(spec)) == ("loss.beta", 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_smoke_cell_through_the_command_line(tmp_path, name):
    out = _cli(f"--study={study_file(name)}", f"--workdir={tmp_path}", "--smoke", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = [n for n, _ in study.load_study(study_file(name), smoke=True).cells]
    assert [r[0] for r in _markdown_rows(tmp_path / "study.md")] == cells
