"""Study grids: one base config, an ordered list of cells, each trained, evaluated on one held-out split.

  python -m flax_textvae.study --study=configs/studies/park_lee.py --workdir=runs/park_lee [--smoke] \
      [--model=NAME_OR_PATH] [--override=KEY=VALUE ...] [--cells=NAME,NAME]

A study file defines ``get_study(smoke: bool) -> Study`` (or a mapping / ``ml_collections.ConfigDict`` with
the same fields)::

    Study(
        name="park_lee",                       # title of the report
        config="/abs/or/relative/config.py",   # a configs/ file with get_config(); relative: to the cwd
        overrides={"train_steps": 800},        # dotted overrides applied to every cell
        scratch_overrides={...},               # applied only when model.name_or_path ends up 'scratch'
        eval_data="PATH/test.txt",             # the held-out split every cell is evaluated on
        eval_max_examples=500,                 # its first N examples (0: all; text files and synthetic:)
        iw_samples=20,                         # K of the importance-weighted NLL
        monitor_max_examples=500,              # cut data.eval (in-training evals) to its first N (0: as is)
        cells=[("vanilla", {"phase1.steps": 0, ...}), ...],   # ordered (name, dotted overrides)
        notes=["..."],                          # printed at the start and written into study.md
    )

The overrides of a cell config apply in this order: the config file, ``overrides``, ``scratch_overrides`` (when
the backbone is built from scratch), the command line's ``--override`` / ``--model``, then the cell's own.
Every cell config is built and validated before anything trains, so a mistyped key or a bad value in any
cell stops the study at once (exit code 2, one message listing every problem).

Layout of ``--workdir=DIR``: ``DIR/cells/NAME`` is each cell's run directory (``train_and_evaluate`` resumes
it after a kill), ``DIR/cells/NAME/eval/SPLIT.json`` its held-out metrics and
``DIR/cells/NAME/study_cell.json`` what the study recorded (``flax_textvae.study_cell``): the config, the
evaluation settings, steps and minutes. A cell whose record matches (the same config up to the loop-only
fields a resume may change, the same held-out split, ``iw_samples`` and seed) and whose eval json exists is
skipped; one trained with the same config but evaluated with other settings is only re-evaluated.
``DIR/study.md``, ``DIR/study.csv`` and the plots (``flax_textvae.study_report``) are rewritten after every
cell. ``DIR/data/`` holds the cut splits. Minutes count the wall-clock time of the process that trained (and
of the one that evaluated) the cell; a cell resumed after a kill reports the time of its last process only.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from absl import flags, logging

from flax_textvae import cli, configuration, study_report, validation
from flax_textvae import workdir as rundir
from flax_textvae.study_cell import run_cell


@dataclasses.dataclass
class Study:
    """A grid of runs sharing one base config and one held-out evaluation (fields: module docstring)."""

    config: str
    cells: Sequence[tuple[str, Mapping[str, Any]]]
    eval_data: str
    name: str = "study"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scratch_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_name: str = ""
    eval_max_examples: int = 0
    iw_samples: int = 500
    monitor_max_examples: int = 0
    notes: Sequence[str] = ()


def text_files_or_synthetic(
    train_file: str | os.PathLike, held_out_file: str | os.PathLike, fallback: tuple[str, str]
) -> tuple[str, str, list[str]]:
    """``(train_spec, held_out_spec, notes)``: the two text files when both exist, else ``fallback``.

    Args:
      train_file: the finetuning text file.
      held_out_file: the held-out text file.
      fallback: ``(train_spec, held_out_spec)`` used when either file is missing, e.g.
        ``('synthetic:20000', 'synthetic:1000:1')``.

    Returns:
      The specs (absolute paths for files) and a one-line note when the fallback was taken.
    """
    paths = [os.path.abspath(train_file), os.path.abspath(held_out_file)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not missing:
        return paths[0], paths[1], []
    return (
        fallback[0],
        fallback[1],
        [
            f"note: {', '.join(missing)} not found; using {fallback[0]} for training "
            f"and {fallback[1]} as the held-out split instead"
        ],
    )


def load_study(path: str, smoke: bool = False) -> Study:
    """Imports a study file and returns its ``get_study(smoke)`` as a :class:`Study`.

    Raises:
      FileNotFoundError: no such file.
      validation.ConfigError: the file has no ``get_study`` or returns something that is not a study.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--study={path}: no such file; pass a study file such as configs/studies/park_lee.py")
    module = _import_file(path, "flax_textvae_study_file")
    if not callable(getattr(module, "get_study", None)):
        raise validation.ConfigError([f"{path} defines no get_study(smoke) function"], subject="the study file")
    got = module.get_study(smoke)
    if isinstance(got, Study):
        return got
    if dataclasses.is_dataclass(got):  # a Study of this module imported under another name (python -m)
        fields = {f.name: getattr(got, f.name) for f in dataclasses.fields(got)}
    else:
        fields = got.to_dict() if isinstance(got, ml_collections.ConfigDict) else got
    if not isinstance(fields, Mapping):
        raise validation.ConfigError(
            [f"get_study returned {type(got).__name__}; return a Study or a mapping"], subject=path
        )
    known = {f.name for f in dataclasses.fields(Study)}
    unknown = sorted(set(fields) - known)
    missing = sorted(
        f.name
        for f in dataclasses.fields(Study)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in fields
    )
    if unknown or missing:
        raise validation.ConfigError(
            [f"unknown study field {k!r}; fields: {sorted(known)}" for k in unknown]
            + [f"missing study field {k!r}" for k in missing],
            subject=path,
        )
    return Study(**fields)


def _import_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_override(text: str, config: ml_collections.ConfigDict | None = None) -> tuple[str, Any]:
    """``'a.b=VALUE'`` -> ``('a.b', value)``, the value parsed to the type of the field in ``config``.

    Raises:
      validation.ConfigError: no ``=``, or a value that does not parse as the field's type.
    """
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise validation.ConfigError(
            [f"--override={text!r}: write KEY=VALUE, e.g. --override=train_steps=500"], subject="the command line"
        )
    current = _get(config, key) if config is not None else None
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return key, raw.lower() in ("true", "1")
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            return key, type(current)(float(raw) if isinstance(current, float) else int(raw))
    except ValueError:
        raise validation.ConfigError(
            [f"--override={text!r}: {key} holds {_article(type(current).__name__)}, and {raw!r} is not one"],
            subject="the command line",
        ) from None
    return key, raw


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _get(config, key: str, default: Any = None) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return default
        node = node[part]
    return node


def _apply(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """Sets dotted ``overrides`` on the unlocked ``config``; each unknown key or bad type adds a problem."""
    leaves = list(configuration.field_comments())
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = _get(config, ".".join(path)) if path else config
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            guess = difflib.get_close_matches(key, leaves, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            problems.append(f"{where}: override {key!r}: the config has no such field{hint}")
            continue
        try:
            node[last] = value
        except (TypeError, ValueError) as err:
            problems.append(f"{where}: override {key}={value!r}: {err}")


def base_config(study: Study) -> ml_collections.ConfigDict:
    """The study's config file's ``get_config()``, before any override.

    Raises:
      FileNotFoundError: the file does not exist.
    """
    if not os.path.isfile(study.config):
        raise FileNotFoundError(f"the study's base config {study.config} does not exist")
    return _import_file(study.config, "flax_textvae_study_base_config").get_config()


def cell_configs(
    study: Study, overrides: Mapping[str, Any] | None = None, workdir: str | None = None
) -> list[tuple[str, ml_collections.ConfigDict]]:
    """Every cell's locked config, in order, after checking all of them.

    Args:
      study: the study.
      overrides: dotted overrides for every cell, applied after the study's and before the cell's own.
      workdir: the study folder; with ``monitor_max_examples`` a text-file ``data.eval`` is cut into
        ``WORKDIR/data/`` (the cut files are written here). None leaves ``data.eval`` as configured.

    Returns:
      ``[(cell name, config)]``.

    Raises:
      validation.ConfigError: every problem of every cell (unknown keys, bad values, duplicate names,
        missing data files), in one error.
    """
    base = base_config(study)
    problems: list[str] = []
    names = [name for name, _ in study.cells]
    problems += [f"cell name {n!r} appears {names.count(n)} times" for n in sorted(set(names)) if names.count(n) > 1]
    problems += [
        f"cell name {n!r}: use letters, digits, '-', '_' and '.' only"
        for n in names
        if not n or not all(ch.isalnum() or ch in "-_." for ch in n)
    ]
    if not study.cells:
        problems.append("the study has no cells")
    if not isinstance(study.iw_samples, int) or study.iw_samples < 0:
        problems.append(f"iw_samples={study.iw_samples!r}: must be an integer >= 0")
    problems += [f"study {p}" for p in validation.check_data_spec(study.eval_data, "eval_data")]
    out = []
    for name, cell in study.cells:
        c = ml_collections.ConfigDict(base.to_dict())
        _apply(c, study.overrides, "study overrides", problems)
        merged = {**study.overrides, **(overrides or {}), **cell}
        if merged.get("model.name_or_path", c.model.name_or_path) == "scratch":
            _apply(c, study.scratch_overrides, "study scratch_overrides", problems)
        _apply(c, overrides or {}, "--override", problems)
        _apply(c, cell, f"cell {name!r}", problems)
        if workdir is not None and study.monitor_max_examples > 0:
            c.data.eval = cut_split(c.data.eval, study.monitor_max_examples, os.path.join(workdir, "data"))
        problems += [f"cell {name!r}: {p}" for p in validation.config_problems(c)]
        out.append((name, c.lock()))
    if workdir is None or problems:
        _raise(problems)
    return out


def _raise(problems: list[str]) -> None:
    if problems:
        raise validation.ConfigError(list(dict.fromkeys(problems)), subject="the study")


def cut_split(spec: str, n: int, folder: str) -> str:
    """A spec for the first ``n`` examples of ``spec`` (``n <= 0``: ``spec`` itself).

    A text file's first ``n`` non-blank lines are written to ``FOLDER/<stem>.first<n>.txt``;
    ``synthetic:N[:SEED]`` becomes ``synthetic:min(N, n)[:SEED]``. Other specs cannot be cut.
    """
    if n <= 0:
        return spec
    if spec.startswith("synthetic:"):
        count, *rest = spec[len("synthetic:") :].split(":")
        return ":".join([f"synthetic:{min(int(count), n)}"] + rest)
    if spec.startswith(validation.READER_PREFIXES):
        raise validation.ConfigError(
            [
                f"{spec!r} cannot be cut to {n} examples; use a text file or a "
                "synthetic: spec, or set the study's max_examples to 0"
            ],
            subject="the study",
        )
    lines = []
    with open(spec, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line if line.endswith("\n") else line + "\n")
                if len(lines) == n:
                    break
    os.makedirs(folder, exist_ok=True)
    out = os.path.abspath(os.path.join(folder, f"{os.path.splitext(os.path.basename(spec))[0]}.first{n}.txt"))
    text = "".join(lines)
    if os.path.isfile(out):
        with open(out, encoding="utf-8") as f:
            if f.read() == text:
                return out  # unchanged: keep the file (and its mtime) as it is
    rundir.write_atomic(out, text)
    return out


def _check_resumable(cells, workdir: str) -> None:
    """Refuses, before anything trains, a cell folder holding a run of another config."""
    problems = []
    for name, config in cells:
        cell_dir = os.path.join(workdir, "cells", name)
        if rundir.checkpoint_steps(cell_dir):
            try:
                rundir.resume_changes(config, cell_dir)
            except rundir.ResumeConfigError as err:
                problems += [
                    f"cell {name!r} ({cell_dir}) was trained with another config: {p}; delete that folder "
                    "to retrain the cell"
                    for p in err.problems
                ]
    _raise(problems)


def select_cells(study: Study, names: Sequence[str] | None) -> Study:
    """The study restricted to the cells ``names`` (in the study's order); None or empty: all of them.

    Raises:
      validation.ConfigError: a name that is not one of the study's cells.
    """
    if not names:
        return study
    known = [n for n, _ in study.cells]
    _raise([f"--cells: no cell {n!r}; the study's cells: {', '.join(known)}" for n in names if n not in known])
    return dataclasses.replace(study, cells=[(n, c) for n, c in study.cells if n in set(names)])


def run_study(
    study: Study,
    workdir: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    cells: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Trains and evaluates every cell in order (skipping finished ones), writing the report after each.

    Args:
      study: the study (:func:`load_study`).
      workdir: the study folder (created).
      overrides: dotted overrides for every cell (the command line's ``--override``).
      cells: run only these cells (:func:`select_cells`); the report then lists only them.
      log: where progress lines go.

    Returns:
      One row per cell: ``{'cell', 'steps', 'minutes', 'skipped', **metrics}`` with the held-out metrics of
      ``flax_textvae.evaluate.RESULT_KEYS``; fewer rows when SIGTERM or Ctrl-C stopped a cell's training (its
      checkpoint is saved and a rerun resumes it).

    Raises:
      validation.ConfigError: a problem in any cell's config, before anything is written.
    """
    study = select_cells(study, cells)
    cell_configs(study, overrides)  # every problem before any write (no cut files yet)
    os.makedirs(workdir, exist_ok=True)
    with rundir.WorkdirLock(workdir):
        cells = cell_configs(study, overrides, workdir)
        _check_resumable(cells, workdir)
        held_out = cut_split(study.eval_data, study.eval_max_examples, os.path.join(workdir, "data"))
        for note in study.notes:
            log(note)
        rows, t_study = [], time.time()
        for i, (name, config) in enumerate(cells, 1):
            row = run_cell(
                study,
                config,
                name,
                os.path.join(workdir, "cells", name),
                held_out,
                f"[{study.name} {i}/{len(cells)}] {name}",
                log,
            )
            if row is None:
                return rows
            rows.append(row)
            study_report.write_report(study, workdir, rows, dict(cells))
        log(
            f"[{study.name}] {len(cells)} cells in {(time.time() - t_study) / 60:.1f} min; "
            f"wrote {os.path.join(workdir, 'study.md')}"
        )
    return rows


def _define_flags() -> None:
    flags.DEFINE_string("study", None, "Study file with get_study(smoke), e.g. configs/studies/park_lee.py.")
    flags.DEFINE_string("workdir", None, "Study folder: cells/NAME run folders, study.md, study.csv, plots.")
    flags.DEFINE_bool("smoke", False, "The study's smoke size: tiny model, few steps, small evaluation.")
    flags.DEFINE_string(
        "model",
        None,
        "Backbone for every cell (model.name_or_path): a local folder, hub id or 'scratch'; default: the study's.",
    )
    flags.DEFINE_multi_string("override", [], "KEY=VALUE dotted config override for every cell (repeatable).")
    flags.DEFINE_list("cells", [], "Run only these cells (comma-separated names); default: all.")
    flags.DEFINE_bool("verbose", False, "On a user error, show the Python traceback instead of a short message.")
    flags.mark_flags_as_required(["study", "workdir"])


def main(argv: Sequence[str]) -> int:
    """Entry point of ``python -m flax_textvae.study``; returns the exit code."""
    if len(argv) > 1:
        raise validation.ConfigError([f"unexpected arguments {list(argv[1:])}"], subject="the command line")
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax / absl INFO chatter off the progress lines
    study = load_study(f.study, smoke=f.smoke)
    base = base_config(study)
    overrides, problems = {}, []
    for text in f.override:
        try:
            key, value = parse_override(text, base)
            overrides[key] = value
        except validation.ConfigError as err:
            problems += err.problems
    if problems:
        raise validation.ConfigError(problems, subject="the command line")
    if f.model:
        overrides["model.name_or_path"] = f.model
    rows = run_study(study, f.workdir, overrides=overrides, cells=f.cells)
    return 0 if len(rows) == len(select_cells(study, f.cells).cells) else 1


if __name__ == "__main__":
    _define_flags()
    cli.run(main, sys.argv)
