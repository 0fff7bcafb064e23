"""One tiny training run shared by test_evaluate.py, test_inference.py and test_cli.py.

Each of those files defines a session-scoped fixture that calls :func:`trained_run`; the run itself is cached
here at module level, so a pytest session that collects all three files trains ``configs/tiny.py`` once.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(REPO, "configs") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "configs"))
import tiny  # noqa: E402  (configs/tiny.py)

from flax_textvae.configuration import with_overrides  # noqa: E402

# 60 steps (20 of phase 1): enough for a non-trivial posterior, a few seconds on CPU. One length bucket: every
# program (each phase's step, the evaluations of run_eval.py's subprocesses) is compiled for one shape, not two;
# bucketing has tests of its own.
TRAIN_OVERRIDES = {
    "train_steps": 60,
    "phase1.steps": 20,
    "eval_every": 0,
    "checkpoint_every": 30,
    "log_every": 10,
    "data.num_buckets": 1,
}

_CACHE: dict = {}


def tiny_config(**overrides):
    """``configs/tiny.py`` with dotted-key overrides (``{'phase1.steps': 20}``), locked again."""
    return with_overrides(tiny.get_config(), **overrides)


def trained_run(tmp_path_factory):
    """``(config, workdir)`` of the shared tiny run, trained on first use.

    Args:
      tmp_path_factory: pytest's session-scoped factory (the workdir lives under its base temp).
    """
    if "run" not in _CACHE:
        from flax_textvae import train

        config = tiny_config(**TRAIN_OVERRIDES)
        workdir = str(tmp_path_factory.mktemp("tiny_run"))
        train.train_and_evaluate(config, workdir)
        _CACHE["run"] = (config, workdir)
    return _CACHE["run"]
