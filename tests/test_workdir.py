"""The run directory: one writer, first starts start clean, refused resumes change nothing, metrics.jsonl
holds one row per logged step across kills, and SIGTERM reports the checkpoint actually on disk."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import flax_textvae
from flax_textvae import checkpoints, evaluate, inference, monitor, train
from flax_textvae import workdir as rundir
from flax_textvae.configuration import with_overrides
from flax_textvae.validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import tiny  # noqa: E402  (configs/tiny.py)

# A short single-phase run: one compiled step (one length bucket), checkpoints and log rows that do not line up.
SHORT = {
    "phase1.steps": 0,
    "train_steps": 10,
    "log_every": 5,
    "checkpoint_every": 5,
    "eval_every": 0,
    "data.num_buckets": 1,
}


def tiny_config(**overrides):
    """``configs/tiny.py`` with dotted-key overrides."""
    return with_overrides(tiny.get_config(), **overrides)


def flags(overrides: dict) -> list[str]:
    """``{'a.b': v}`` -> ``['--config.a.b=v']`` (what ``tiny_config(**overrides)`` is on the command line)."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of the training subprocesses: offline, CPU, one persistent XLA compilation cache
    (a restart then skips most of its compile time)."""
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )


@pytest.fixture(scope="module")
def cli(env):
    """Starts ``run_train.py --config=configs/tiny.py --workdir=W [flags]``; returns the Popen."""

    def start(workdir, *extra, **popen):
        cmd = [
            sys.executable,
            os.path.join(REPO, "run_train.py"),
            f"--config={REPO}/configs/tiny.py",
            f"--workdir={workdir}",
            *extra,
        ]
        popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
        return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)

    return start


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logged_steps(workdir):
    """(train-row steps, eval-row steps) of metrics.jsonl, in file order."""
    r = rows(workdir)
    return [x["step"] for x in r if x.get("split") != "eval"], [x["step"] for x in r if x.get("split") == "eval"]


def wait_for(predicate, proc=None, timeout=180, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def lock_holder(workdir):
    try:
        with open(os.path.join(workdir, rundir.LOCK_NAME)) as f:
            return json.loads(f.read() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def snapshot(workdir):
    """{relative path: (size, mtime_ns)} of every file in a workdir except the lock file."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            if name != rundir.LOCK_NAME:
                st = os.stat(path)
                out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------ 1. one writer


def test_lock_is_exclusive_stale_locks_are_reacquired_and_release_empties_it(tmp_path, capsys):
    path = tmp_path / rundir.LOCK_NAME
    path.write_text(json.dumps({"pid": 999999999, "host": "gone"}) + "\n")  # left by a killed holder
    with rundir.WorkdirLock(str(tmp_path)):
        assert "stale lock of process 999999999" in capsys.readouterr().out
        assert json.loads(path.read_text())["pid"] == os.getpid()
        # flock conflicts between open file descriptions, even in one process.
        with pytest.raises(rundir.WorkdirInUseError, match=f"in use: process {os.getpid()}") as err:
            rundir.WorkdirLock(str(tmp_path)).acquire()
        assert isinstance(err.value, OSError) and str(tmp_path) in str(err.value)
    assert path.read_text() == ""
    with rundir.WorkdirLock(str(tmp_path)):
        assert "stale" not in capsys.readouterr().out  # a cleanly released lock is not reported


def test_a_second_training_process_exits_2_and_the_first_finishes(tmp_path, cli):
    workdir = str(tmp_path / "run")
    overrides = {**SHORT, "train_steps": 40}
    first = cli(workdir, *flags(overrides))
    wait_for(lambda: lock_holder(workdir) == first.pid, first, what="the first process to take the lock")
    first.send_signal(signal.SIGSTOP)  # keeps it inside its run, holding the lock, while the second starts
    try:
        t0 = time.time()
        second = cli(workdir, *flags(overrides))
        out, err = second.communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, (out, err)
    assert f"--workdir={workdir} is in use" in err and f"process {first.pid}" in err, err
    assert "Traceback" not in err
    assert elapsed < 60, elapsed
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, (out, err)
    train_steps, eval_steps = logged_steps(workdir)
    assert train_steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert eval_steps == [40]
    assert open(os.path.join(workdir, rundir.LOCK_NAME)).read() == ""  # released


# ------------------------------------------------------------------------------------------ 2. first starts


def _corpus(path, words, n=64, seed=0):
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "\n" for _ in range(n)))
    return str(path)


def test_a_first_start_that_never_checkpointed_is_replaced_not_reused(tmp_path, monkeypatch):
    old = _corpus(tmp_path / "old.txt", ["apple", "banana", "cherry", "grape", "melon"])
    new = _corpus(tmp_path / "new.txt", ["zebra", "quartz", "violin", "harbor", "lantern"])
    workdir = str(tmp_path / "run")

    def crash(*args, **kwargs):
        raise RuntimeError("crash before the first checkpoint")

    monkeypatch.setattr(checkpoints.Checkpointer, "save", crash)
    with pytest.raises(RuntimeError, match="first checkpoint"):
        train.train_and_evaluate(tiny_config(**SHORT, **{"data.train": old, "data.eval": old}), workdir)
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(workdir, "model", "config.json"))
    assert logged_steps(workdir)[0] == [5]  # the row the crashed start logged
    assert rundir.checkpoint_steps(workdir) == []

    train.train_and_evaluate(tiny_config(**SHORT, **{"data.train": new, "data.eval": new}), workdir)
    vae = flax_textvae.load(workdir)
    tok = vae.run.tokenizer
    vocab = set(tok.get_vocab())
    assert {"zebra", "quartz", "violin", "harbor", "lantern"} <= vocab
    assert not vocab & {"apple", "banana", "cherry", "grape", "melon"}
    ids = tok("zebra violin lantern")["input_ids"]
    assert tok.unk_token_id not in ids
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["train"] == new
    assert logged_steps(workdir) == ([5, 10], [10])  # no row of the crashed start
    fp = json.load(open(os.path.join(workdir, rundir.FINGERPRINT_NAME)))["data.train"]
    assert fp["path"] == os.path.abspath(new) and fp["size"] == os.path.getsize(new)


# ------------------------------------------------------------------------------------------ 3. resume identity


def test_a_refused_resume_changes_nothing_and_an_allowed_one_is_recorded(tmp_path, cli):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(**SHORT), workdir)
    config_bytes = open(os.path.join(workdir, "config.json"), "rb").read()
    before = snapshot(workdir)

    p = cli(workdir, *flags(SHORT), "--config.vae.latent_size=4", "--config.optimizer.learning_rate=0.01")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, (out, err)
    assert "Traceback" not in err
    assert "vae.latent_size: 8 in the saved run -> 4 now" in err, err
    assert "optimizer.learning_rate: 0.003 in the saved run -> 0.01 now" in err, err
    assert "new --workdir" in err and f"--workdir={workdir}" in err
    assert snapshot(workdir) == before
    assert open(os.path.join(workdir, "config.json"), "rb").read() == config_bytes

    # The run still loads and evaluates, also while a training process holds its lock.
    with rundir.WorkdirLock(workdir):
        vae = flax_textvae.load(workdir)
        mean, logvar = vae.encode(["the cat sat", "a dog ran"])
        assert mean.shape == logvar.shape == (2, 8)
        result = evaluate.evaluate(inference.load_config(workdir), workdir, iw_samples=2)
    assert np.isfinite(result["nll"]) and result["num_examples"] == 64

    result = train.train_and_evaluate(tiny_config(**{**SHORT, "train_steps": 15, "eval_every": 15}), workdir)
    assert np.isfinite(result["rec"])
    assert rundir.checkpoint_steps(workdir)[-1] == 15
    with open(os.path.join(workdir, rundir.CHANGES_NAME)) as f:
        changes = [json.loads(line) for line in f]
    assert changes == [
        {"step": 10, "field": "eval_every", "old": 0, "new": 15},
        {"step": 10, "field": "train_steps", "old": 10, "new": 15},
    ]
    saved = inference.load_config(workdir)
    assert saved.train_steps == 15 and saved.eval_every == 15 and saved.vae.latent_size == 8
    assert logged_steps(workdir) == ([5, 10, 15], [10, 15])


def test_a_changed_data_file_or_shorter_run_is_refused_before_anything_is_read(tmp_path):
    data = _corpus(tmp_path / "train.txt", ["alpha", "beta", "gamma"])
    config = tiny_config(**SHORT, **{"data.train": data})
    rundir.record_start(config, str(tmp_path))
    assert rundir.resume_changes(config, str(tmp_path)) == []
    assert rundir.resume_changes(
        tiny_config(**SHORT, **{"data.train": data, "parallel.num_devices": 1, "keep_checkpoints": 3}), str(tmp_path)
    ) == [rundir.Change("keep_checkpoints", 2, 3), rundir.Change("parallel.num_devices", 0, 1)]
    with pytest.raises(ConfigError, match=r"train_steps: 10 in the saved run -> 5 now"):
        rundir.resume_changes(tiny_config(**{**SHORT, "train_steps": 5, "data.train": data}), str(tmp_path))
    with open(data, "a") as f:
        f.write("delta delta\n")
    with pytest.raises(ConfigError, match="data.train: the file .* changed since the run started"):
        rundir.resume_changes(config, str(tmp_path))


# ------------------------------------------------------------------------------------------ 4. metrics.jsonl


def _newest_row_step(workdir):
    """The largest step in metrics.jsonl (0 when there is none; a torn last line is skipped)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.readlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps)


@pytest.mark.slow  # ten kills and restarts, about two minutes; the default set keeps test_train's kill + resume
def test_metrics_hold_one_row_per_logged_step_across_random_kills(tmp_path, cli):
    """SIGKILL at random moments, restart, repeat; then finish the run and rerun the finished run.

    Every other start is killed at a random time after its launch (imports, the lock, truncation, compile,
    early steps); the others once they have logged past the previous frontier, plus a random delay (steps,
    saves, evaluations, the phase switch), so the run advances from kill to kill.
    """
    workdir = str(tmp_path / "run")
    total, log_every, eval_every, phase1 = 150, 5, 20, 30
    cfg = {
        "phase1.steps": phase1,
        "train_steps": total,
        "log_every": log_every,
        "checkpoint_every": 7,
        "eval_every": eval_every,
        "keep_checkpoints": 2,
    }
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills, t0, progress = 0, time.time(), []
    while kills < 10:
        frontier = _newest_row_step(workdir)
        p = cli(workdir, *flags(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills % 2 == 0:
            deadline = time.time() + rng.uniform(0.5, 6.0)
            while time.time() < deadline and p.poll() is None:
                time.sleep(0.01)
        else:
            while _newest_row_step(workdir) <= frontier and p.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        if p.poll() is not None:
            assert p.returncode == 0, (p.returncode, seed)
            break  # finished before the kill
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        progress.append((rundir.checkpoint_steps(workdir)[-1:] or [0])[0])
    for _ in range(2):  # finish it, then rerun the finished run
        p = cli(workdir, *flags(cfg))
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (out, err, seed)
    msg = f"seed {seed}, {kills} kills in {time.time() - t0:.0f}s, newest checkpoint after each: {progress}"
    assert kills >= 10 and 0 < max(progress) < total, msg
    train_steps, eval_steps = logged_steps(workdir)
    assert train_steps == list(range(log_every, total + 1, log_every)), msg
    assert eval_steps == sorted({s for s in range(eval_every, total, eval_every)} | {phase1, total}), msg
    phases = [r["phase"] for r in rows(workdir) if r.get("split") != "eval"]
    assert phases == [1 if s <= phase1 else 2 for s in train_steps], msg


def test_truncation_is_atomic_and_drops_torn_lines(tmp_path, monkeypatch):
    log = monitor.MetricsLog(str(tmp_path))
    for s in (5, 10, 15):
        log.write({"step": s, "loss": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 20, "lo')  # a row torn by a kill
    text = open(log.path).read()

    def killed(*args):
        raise KeyboardInterrupt("killed before the new file replaced the old one")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        log.truncate_after(10)
    assert open(log.path).read() == text  # a kill during the rewrite loses no row
    monkeypatch.undo()
    inode = os.stat(log.path).st_ino
    log.truncate_after(10)
    assert logged_steps(str(tmp_path))[0] == [5, 10]
    assert os.stat(log.path).st_ino != inode  # replaced whole, never rewritten in place
    log.truncate_after(-1)
    assert open(log.path).read() == ""


# ------------------------------------------------------------------------------------------ 5. SIGTERM


SIGTERM_DURING_EVAL = """
import os, signal, sys
sys.path.insert(0, os.path.join(sys.argv[2], "configs"))
import tiny
from flax_textvae import evaluate, train
from flax_textvae.configuration import with_overrides

evaluate_split = evaluate.evaluate_split

def sigterm_then_evaluate(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the loop is evaluating
    return evaluate_split(*args, **kwargs)

evaluate.evaluate_split = sigterm_then_evaluate
config = with_overrides(tiny.get_config(), **{"phase1.steps": 0, "train_steps": 40, "log_every": 5,
                                             "checkpoint_every": 5, "eval_every": 7})
print("RESULT", train.train_and_evaluate(config, sys.argv[1]))
"""


def test_sigterm_during_an_evaluation_saves_that_step_and_names_it(tmp_path, env):
    workdir = str(tmp_path / "run")
    p = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_EVAL, workdir, REPO],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout, p.stderr)
    # The evaluation at step 7 is off the checkpoint cadence (5, 10, ...): SIGTERM saves step 7 itself.
    assert rundir.checkpoint_steps(workdir) == [5, 7]
    assert "SIGTERM: saved the checkpoint of step 7 in" in p.stdout, p.stdout
    assert "RESULT {'preempted': True, 'step': 7}" in p.stdout
    assert checkpoints.Checkpointer(workdir).read_meta()["step"] == 7
