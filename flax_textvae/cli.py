"""What run_train.py and run_eval.py share: the exit conventions, the default workdir, run_eval's modes.

``run(main)`` wraps ``absl.app.run``: ``--help`` exits 0; a user error (a bad flag or ``--config.FIELD``
override, a :class:`~flax_textvae.validation.ConfigError`, a missing or unreadable file, model folder or
hub id) prints one ``error: ...`` paragraph on stderr and exits 2, with the traceback only under
``--verbose``; Ctrl-C that reaches ``main`` (a training loop turns the first one into a save, see
``monitor.Preemption``) prints ``interrupted (Ctrl-C)`` and exits 130; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np
from absl import app
from absl import flags as absl_flags

from flax_textvae import builders, checkpoints, configuration, data, evaluate, exported, inference, plots, validation

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # what a shell reports for a process ended by Ctrl-C (128 + SIGINT)
VERBOSE_HELP = "On a user error (bad config, missing file), show the Python traceback instead of a short message."
# User errors that can surface while main runs; each carries a message written for the user.
USER_ERRORS = (validation.ConfigError, OSError, app.UsageError, data.DataSpecError)
_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def default_workdir(config_file: str | None) -> str:
    """``runs/<stem of the config file>``: ``configs/tiny.py`` -> ``runs/tiny``.

    Args:
      config_file: the ``--config`` path (``path:args`` allowed); None or '' gives ``runs/demo``.

    Returns:
      The workdir used when ``--workdir`` is not given.
    """
    path = (config_file or "demo.py").split(":")[0]
    return os.path.join("runs", os.path.splitext(os.path.basename(path))[0] or "demo")


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run(main)`` with the command-line tools' exit conventions (see the module docstring).

    The calling script defines a boolean ``--verbose`` flag (help text :data:`VERBOSE_HELP`).

    Args:
      main: the script's ``main(argv)``; its return value is the exit code.
      argv: the command line (default ``sys.argv``).
    """
    app.run(functools.partial(_guarded, main), argv=list(argv) if argv is not None else None, flags_parser=_parse_flags)


def with_config(argv: Sequence[str], default: str) -> list[str]:
    """``argv`` with ``--config=default`` inserted when it names no ``--config``.

    The scripts define their ``--config`` flag without a default: ml_collections applies the
    ``--config.FIELD`` overrides of the command line to a flag's default while the flag is being defined, at
    import time, where a mistyped field would end in a traceback instead of :func:`run`'s short error.
    """
    argv = list(argv)
    named = any(a.startswith("-") and a.lstrip("-").split("=")[0] == "config" for a in argv[1:] if a != "--")
    return argv if named else [argv[0], f"--config={default}", *argv[1:]]


def fail(message: str) -> None:
    """Prints ``error: message`` on stderr and exits with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT)


def _flag_set(argv: Sequence[str], name: str) -> bool:
    """Whether boolean flag ``name`` is on in a raw command line (the last mention wins)."""
    on = False
    for a in argv[1:]:
        if a == "--":
            break
        key, eq, value = a.lstrip("-").partition("=")
        if key == name:
            on = not eq or value.lower() in ("1", "true", "t", "yes", "y")
        elif key == f"no{name}" and not eq:
            on = False
    return on


def _asked_for_help(argv: Sequence[str]) -> bool:
    return any(a.startswith("-") and a.lstrip("-").split("=")[0] in _HELP_FLAGS for a in argv[1:] if a != "--")


def _override_message(err: BaseException, argv: Sequence[str]) -> str:
    """The message for ml_collections' error about a ``--config.FIELD`` that names no field."""
    while err.args and isinstance(err.args[0], BaseException):  # AttributeError(KeyError(text))
        err = err.args[0]
    text = str(err.args[0]) if err.args else str(err)
    bad = re.match(r"\s*'([^']+)'", text)
    key = bad.group(1) if bad else text.strip()
    guess = re.search(r'Did you mean "([^"]+)"', text)
    for a in argv[1:]:
        name = a.lstrip("-").split("=")[0]
        parts = name.split(".")
        if parts[0] == "config" and key in parts[1:]:
            fix = ""
            if guess:
                fixed = ".".join(guess.group(1) if p == key else p for p in parts)
                fix = f"did you mean --{fixed}? "
            return f"--{name}: the config has no field {key!r}; {fix}Run with --print_config to list every field."
    hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
    return f"the config has no field {key!r}{hint}; check the config file and the --config.FIELD overrides."


def _parse_flags(argv: list[str]) -> list[str]:
    """``FLAGS(argv)``: help exits 0; a bad flag, value or ``--config.FIELD`` is a user error (exit 2)."""
    verbose = _flag_set(argv, "verbose")
    argv = [argv[0]] + ["--help" if a == "-h" else a for a in argv[1:]]
    try:
        return absl_flags.FLAGS(argv)
    except SystemExit as e:
        if e.code == 1 and _asked_for_help(argv):  # absl ends --help with exit code 1
            raise SystemExit(0) from None
        raise
    except absl_flags.Error as e:  # unknown flag, bad value, missing required flag, unreadable config file
        if verbose:
            raise
        name = getattr(e, "flagname", None)
        fields = [f for f in configuration.field_comments() if name and (f == name or f.endswith(f".{name}"))]
        hint = (
            f"; config fields are set with --config.FIELD=VALUE: did you mean --config.{fields[0]}?"
            if fields and "config" in absl_flags.FLAGS
            else ""
        )
        fail(f"{e}{hint}\nRun with --helpfull to list the flags.")
    except (AttributeError, KeyError) as e:  # ml_collections: a field the locked config does not have
        if verbose:
            raise
        fail(_override_message(e, argv))


def _guarded(main: Callable[[list[str]], int | None], argv: list[str]) -> int | None:
    try:
        return main(argv)
    except USER_ERRORS as e:
        if "verbose" in absl_flags.FLAGS and absl_flags.FLAGS.verbose:
            raise
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside it
        if "verbose" in absl_flags.FLAGS and absl_flags.FLAGS.verbose:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)


def _write_lines(path: str | None, lines: list[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} lines to {path}", file=sys.stderr)


def check_trained_run(workdir: str) -> None:
    """Raises ``FileNotFoundError`` with the fix unless ``workdir`` holds config.json and a checkpoint.

    An exported folder (``python -m flax_textvae.export``) passes too: it holds its one checkpoint.
    """
    fix = "pass the --workdir of a run trained with run_train.py (it holds config.json and checkpoints/)"
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir}: no such directory; {fix}")
    if exported.is_exported(workdir):  # a folder written by `python -m flax_textvae.export`
        return
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"--workdir={workdir} is not a trained run: it has no config.json; {fix}")
    ckdir = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))):
        raise FileNotFoundError(
            f"--workdir={workdir} has no checkpoint yet; train it first (python run_train.py "
            f"--config=... --workdir={workdir}) or {fix}"
        )


def eval_flag_problems(flags) -> list[str]:
    """What is wrong with ``run_eval.py``'s flags for their ``--mode``, one ``--flag=value: ...; fix`` each."""
    problems = []
    if flags.data:
        problems += validation.check_data_spec(flags.data, "--data")
    name = flags.name
    if name is not None and (not name.strip() or name in (".", "..") or any(c in name for c in "/\\")):
        problems.append(
            f"--name={name!r}: is the name of the results file, not a path; e.g. --name=test, and "
            "--output_dir=DIR for another folder"
        )
    batch_size = getattr(flags, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        problems.append(
            f"--batch_size={batch_size}: must be >= 1; e.g. --batch_size=64, or leave it out for the config's"
        )
    if flags.mode == "sample" and flags.num < 1:
        problems.append(f"--num={flags.num}: sample needs at least one sentence; e.g. --num=10")
    if flags.mode == "interpolate" and flags.steps < 2:
        problems.append(f"--steps={flags.steps}: interpolate needs at least the two end points; e.g. --steps=5")
    if flags.mode in ("reconstruct", "interpolate"):
        problems += [f"--text={t!r}: is empty; give a sentence" for t in flags.text if not t.strip()]
    return problems


def run_eval_main(flags) -> int:
    """Dispatches ``run_eval.py --mode=...``; returns the process exit code."""
    workdir = flags.workdir
    check_trained_run(workdir)
    problems = eval_flag_problems(flags)
    if problems:
        raise validation.ConfigError(problems, subject="the command line")
    if flags.mode == "metrics":
        config = inference.load_config(workdir)
        try:
            evaluate.evaluate(
                config,
                workdir,
                data=flags.data,
                name=flags.name,
                iw_samples=flags.iw_samples,
                seed=flags.seed,
                batch_size=flags.batch_size,
                step=flags.step,
                output_dir=flags.output_dir,
                report=lambda result: print(evaluate.format_table(result), flush=True),
            )
        except evaluate.ResultsNotWritten as e:
            if flags.output_dir:
                raise
            raise evaluate.ResultsNotWritten(
                f"{e}; the metrics are printed above: pass --output_dir=DIR to write them to a writable folder"
            ) from e
        return 0
    if flags.mode == "plot":
        return _plot(workdir, flags.output, flags.step)
    vae = inference.load(workdir, step=flags.step)
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
    out_dir = out_dir or os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    config = inference.load_config(workdir)
    p1 = int(config.phase1.steps) if "phase1" in config else 0
    boundaries = [(float(p1), 2)] if 0 < p1 < int(config.train_steps) else None
    curves = plots.plot_training_curves(
        os.path.join(workdir, "metrics.jsonl"), os.path.join(out_dir, "training.png"), boundaries=boundaries
    )
    print(f"wrote {curves}")
    run = builders.build_run(config, workdir, train=False)
    params, _ = checkpoints.load_params(workdir, step)  # --step, else the newest
    # The variance of the posterior mean is what au thresholds: the plot counts active units as evaluation does.
    kl, variance = evaluate.per_dim_stats(run, params, run.eval_batches)
    path = plots.plot_kl_per_dim(kl, os.path.join(out_dir, "kl_per_dim.png"), mean_variance=variance)
    with open(os.path.join(out_dir, "kl_per_dim.json"), "w") as f:
        json.dump(np.asarray(kl).tolist(), f)
    print(f"wrote {path}")
    return 0
