"""Checkpoint checksums, falling back past broken steps, and run_eval.py's refusals and --output_dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from _trained_run import REPO, tiny_config

from flax_textvae import checkpoints, inference, train

OVERRIDES = {"train_steps": 20, "checkpoint_every": 10, "eval_every": 0, "keep_checkpoints": 2}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``(config, workdir)`` of a tiny run with checkpoints at steps 10 and 20."""
    config = tiny_config(**OVERRIDES)
    workdir = str(tmp_path_factory.mktemp("integrity_run"))
    train.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    """A fresh copy of the tiny run's workdir, safe to damage."""
    dst = str(tmp_path / "run")
    shutil.copytree(tiny_run[1], dst)
    return dst


def _step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "checkpoints", str(step))


def _largest_file(step_dir: str) -> str:
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns if n != checkpoints.CHECKSUMS_NAME]
    return max(files, key=os.path.getsize)


def _flip_bytes(workdir: str, step: int) -> None:
    path = _largest_file(_step_dir(workdir, step))
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
        f.seek(0)
        f.write(data)


def _run_eval(workdir: str, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "run_eval.py"), f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_each_step_has_checksums_of_its_files(tiny_run):
    _, workdir = tiny_run
    for step in (10, 20):
        folder = _step_dir(workdir, step)
        with open(os.path.join(folder, checkpoints.CHECKSUMS_NAME)) as f:
            listed = json.load(f)["files"]
        on_disk = {os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns}
        assert set(listed) == on_disk - {checkpoints.CHECKSUMS_NAME}
        assert any(p.startswith("state" + os.sep) for p in listed)
        assert checkpoints.verify_step(folder) is None


def test_flipped_bytes_fall_back_to_the_older_step(copy_run, capfd):
    _flip_bytes(copy_run, 20)
    params, step = checkpoints.load_params(copy_run)
    err = capfd.readouterr().err
    assert step == 10
    assert "step 20" in err and "corrupt" in err and "sha256" in err
    ref, _ = checkpoints.load_params(copy_run, 10)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(params), _leaves(ref)))


def _leaves(tree):
    return jax.tree.leaves(tree)


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_incomplete_newest_step_falls_back(copy_run, capfd, damage):
    folder = _step_dir(copy_run, 20)
    if damage == "truncate":
        path = _largest_file(folder)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        shutil.rmtree(folder)
        os.mkdir(folder)
    _, step = checkpoints.load_params(copy_run)
    err = capfd.readouterr().err
    assert step == 10
    assert "step 20" in err and "incomplete" in err
    meta = checkpoints.Checkpointer(copy_run).read_meta()
    assert meta["step"] == 10


def test_legacy_step_without_checksums_is_accepted(copy_run, capfd):
    os.remove(os.path.join(_step_dir(copy_run, 20), checkpoints.CHECKSUMS_NAME))
    _, step = checkpoints.load_params(copy_run)
    assert step == 20 and "warning" not in capfd.readouterr().err


def test_asked_for_step_that_is_broken_is_an_error(copy_run):
    _flip_bytes(copy_run, 20)
    with pytest.raises(checkpoints.CheckpointError, match="step 20"):
        checkpoints.load_params(copy_run, 20)


def test_non_finite_params_are_refused():
    with pytest.raises(checkpoints.CheckpointError, match="step 7.*non-finite"):
        checkpoints.check_finite({"w": np.array([1.0, np.nan]), "i": np.array([1, 2])}, 7)
    checkpoints.check_finite({"w": np.ones(3, np.float32)}, 7)


def test_run_eval_refuses_when_every_step_is_broken(copy_run):
    _flip_bytes(copy_run, 20)
    _flip_bytes(copy_run, 10)
    p = _run_eval(copy_run, "--iw_samples=0")
    assert p.returncode == 2, p.stderr
    assert "step 20" in p.stderr and "step 10" in p.stderr and "no intact checkpoint" in p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(os.path.join(copy_run, "eval"))


def test_resume_after_corruption_restarts_from_the_intact_step(tiny_run, copy_run, capfd):
    config, _ = tiny_run
    _flip_bytes(copy_run, 20)
    train.train_and_evaluate(config, copy_run)
    captured = capfd.readouterr()
    assert "step 20" in captured.err and "corrupt" in captured.err
    assert "Resuming from step 10" in captured.out + captured.err
    assert checkpoints.verify_step(_step_dir(copy_run, 20)) is None  # rewritten by the resumed run
    _, step = checkpoints.load_params(copy_run)
    assert step == 20


def test_unwritable_eval_folder_prints_the_table_then_asks_for_output_dir(copy_run, tmp_path):
    eval_dir = os.path.join(copy_run, "eval")
    if os.geteuid() == 0:  # root ignores permissions: block the folder with a file instead
        with open(eval_dir, "w") as f:
            f.write("not a folder")
    else:
        os.chmod(copy_run, 0o555)
    try:
        p = _run_eval(copy_run, "--iw_samples=0")
    finally:
        os.chmod(copy_run, 0o755)
    assert p.returncode == 2, p.stderr
    assert "metric" in p.stdout and "neg_elbo" in p.stdout
    assert "--output_dir" in p.stderr and "Traceback" not in p.stderr
    out = str(tmp_path / "elsewhere")
    p = _run_eval(copy_run, "--iw_samples=0", f"--output_dir={out}")
    assert p.returncode == 0, p.stderr
    with open(os.path.join(out, "synthetic.json")) as f:
        assert "neg_elbo" in json.load(f)
    with open(os.path.join(out, "synthetic.meta.json")) as f:
        assert json.load(f)["step"] == 20


def test_negative_iw_samples_is_refused(tiny_run):
    p = _run_eval(tiny_run[1], "--iw_samples=-5")
    assert p.returncode == 2
    assert "iw_samples" in p.stderr and "Traceback" not in p.stderr


def test_sample_zero_and_negative(tiny_run):
    vae = inference.load(tiny_run[1])
    assert vae.sample(0) == []
    with pytest.raises(ValueError, match="n=-1"):
        vae.sample(-1)
