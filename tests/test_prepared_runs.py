"""Runs on a prepared (``prepared:DIR``) data set: exact resume after SIGKILL, and evaluation split over two
processes covering every example once."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_parallel import _finish, _free_port
from test_train import REPO, _cli, _wait_for_checkpoint

from flax_textvae import checkpoints, data

WORKER = os.path.join(REPO, "tests", "prepared_eval_worker.py")
MAX_LEN = 32  # configs/tiny.py's data.max_length


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(prepared folder, number of examples): 300 synthetic lines tokenized by a word tokenizer."""
    root = tmp_path_factory.mktemp("prepared_runs")
    lines = data.synthetic_sentences(300, 7)
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    data.train_word_tokenizer(lines, root / "tok", family="bart", vocab_size=256)
    index = data.prepare_dataset(
        str(root / "train.txt"), str(root / "tok"), MAX_LEN, str(root / "prep"), num_workers=0, lines_per_shard=100
    )
    return root / "prep", index["num_examples"]


FLAGS = (
    "--config.train_steps=120",
    "--config.phase1.steps=40",
    "--config.checkpoint_every=20",
    "--config.eval_every=0",
    "--config.log_every=20",
    "--config.denoise.delete_rate=0.3",
    "--config.model.scratch.dropout=0.1",
)


@pytest.mark.slow  # the default set kills and resumes a text-file run (test_train.py)
def test_sigkill_then_resume_on_prepared_data_matches_an_uninterrupted_run(prepared, tmp_path):
    prep, _ = prepared
    flags = (*FLAGS, f"--config.data.train=prepared:{prep}", f"--config.data.eval=prepared:{prep}")
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    p = _cli(full, *flags)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    p = _cli(cut, *flags)
    killed_after = _wait_for_checkpoint(cut, p, 60)  # in phase 2, past the phase switch
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert killed_after < 120
    p = _cli(cut, *flags)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    assert "Resuming from step" in out and f"data train: prepared:{prep}: " in out  # read through grain
    a, step_a = checkpoints.load_params(full)
    b, step_b = checkpoints.load_params(cut)
    assert step_a == step_b == 120
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical


def test_two_processes_evaluate_every_prepared_example_once(prepared, tmp_path):
    prep, n = prepared
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = []
    try:
        for i in range(2):
            cmd = [
                sys.executable,
                WORKER,
                "--prepared",
                str(prep),
                "--out",
                str(tmp_path),
                "--process_id",
                str(i),
                "--num_processes",
                "2",
                "--port",
                port,
            ]
            procs.append(
                subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
    finally:
        _finish(procs)
    res = [json.loads((tmp_path / f"eval_{i}.json").read_text()) for i in range(2)]
    seen = res[0]["indices"] + res[1]["indices"]
    assert len(seen) == len(set(seen)) == n and sorted(seen) == list(range(n))
    assert res[0]["indices"] and res[1]["indices"]  # both processes had real rows
    whole, shards = res[0]["whole"], [r["shard"] for r in res]
    assert whole["num_examples"] == n == sum(s["num_examples"] for s in shards)
    assert whole["num_tokens"] == sum(s["num_tokens"] for s in shards)
    for key in ("rec", "kl"):  # per-example means: weighted by each process's example count
        total = sum(s[key] * s["num_examples"] for s in shards)
        np.testing.assert_allclose(total, whole[key] * n, rtol=1e-5)
