"""run_eval.py in a subprocess on a real (tiny) trained run: metrics, generation modes and plots.

Each subprocess pays a JAX start-up and compile (a few seconds each on 2 cores).
"""
import json
import os
import struct
import subprocess
import sys

import pytest

from _trained_run import REPO, trained_run
from flax_textvae import metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def run_eval(workdir, *flags, timeout=300):
    """Runs run_eval.py; returns (stdout, stderr); fails the test on a non-zero exit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, os.path.join(REPO, "run_eval.py"), f"--workdir={workdir}", *flags],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout, p.stderr


def test_metrics_prints_the_table_and_writes_the_json(tiny_run):
    config, workdir = tiny_run
    out, _ = run_eval(workdir, "--iw_samples=4", "--batch_size=32")
    path = os.path.join(workdir, "eval", "synthetic.json")  # default name of the default split synthetic:64:1
    with open(path) as f:
        result = json.load(f)
    assert set(result) == set(metrics.SUMMARY_KEYS)
    assert result["iw_samples"] == 4 and result["num_examples"] == 64
    for key in metrics.SUMMARY_KEYS:
        assert any(line.split()[:1] == [key] for line in out.splitlines()), (key, out)
    assert f"{result['rec']:.4f}" in out


def test_reconstruct_writes_the_output_file(tiny_run, tmp_path):
    _, workdir = tiny_run
    texts = ["the old man saw a dog", "mary laughed"]
    output = tmp_path / "rec.txt"
    out, _ = run_eval(workdir, "--mode=reconstruct", *(f"--text={t}" for t in texts), f"--output={output}")
    lines = output.read_text().splitlines()
    assert len(lines) == len(texts)
    for t in texts:
        assert f"in : {t}" in out
    assert out.count("out: ") == len(texts)


def test_sample_prints_num_sentences(tiny_run, tmp_path):
    _, workdir = tiny_run
    output = tmp_path / "samples.txt"
    out, _ = run_eval(workdir, "--mode=sample", "--num=3", "--seed=1", f"--output={output}")
    assert len(output.read_text().splitlines()) == 3
    assert len(out.splitlines()) == 3


def test_interpolate_between_two_texts(tiny_run):
    _, workdir = tiny_run
    out, _ = run_eval(workdir, "--mode=interpolate", "--text=a dog barks", "--text=the old man slept",
                      "--steps=4")
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("0.00") and lines[-1].startswith("1.00")


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_training_and_kl_pngs(tiny_run, tmp_path):
    config, workdir = tiny_run
    out_dir = tmp_path / "plots"
    run_eval(workdir, "--mode=plot", "--step=30", f"--output={out_dir}")  # an older checkpoint
    for name in ("training.png", "kl_per_dim.png"):
        width, height = _png_size(out_dir / name)
        assert width >= 200 and height >= 100, (name, width, height)
    with open(out_dir / "kl_per_dim.json") as f:
        kl = json.load(f)
    assert len(kl) == config.vae.latent_size and min(kl) >= 0.0
