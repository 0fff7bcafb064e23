"""Parallel training gives the same parameters on 1 device, a 4-device mesh (data, data x fsdp), pmap over 4
devices, and two processes joined by ``jax.distributed``; a SIGTERM that reaches one process of two stops both
at the same step, with its checkpoint saved.

The device count is fixed when JAX starts, so the training runs in subprocesses (tests/parallel_worker.py)
with ``--xla_force_host_platform_device_count``; this file only starts them and compares what they write.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "parallel_worker.py")
STEPS = 4
TOL = 1e-5
TIMEOUT_S = 240


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return env


def _start(out, *args, steps: int = STEPS) -> subprocess.Popen:
    cmd = [sys.executable, WORKER, *args, "--out", str(out), "--steps", str(steps)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list) -> list[str]:
    """Waits for every process (killing all of them on a timeout or a failure); returns their outputs."""
    outs = []
    try:
        for p in procs:
            out = p.communicate(timeout=TIMEOUT_S)[0]
            outs.append(out)
            assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{out[-6000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def _load(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with 4 fake devices training every layout on the same batches (see parallel_worker)."""
    out = tmp_path_factory.mktemp("single")
    _finish([_start(out, "single", "--devices", "4")])
    with open(out / "single.json") as f:
        result = json.load(f)
    return result, _load(out / "baseline.npz")


def test_one_device_mesh_fsdp_and_pmap_agree(single):
    result, _ = single
    assert result["devices"] == 4
    # Training really moved the parameters, so agreement to TOL is not trivial.
    assert result["moved"] > 100 * TOL, result
    assert set(result["max_diff"]) == {"one_device", "mesh_data4", "mesh_data2_fsdp2", "pmap4"}
    for layout, diff in result["max_diff"].items():
        assert diff < TOL, (layout, result["max_diff"])
    # fsdp=2 really split parameters (and kept them split through the steps).
    sharded = [s for s in result["fsdp_sharded"] if not s.startswith("after:")]
    assert len(sharded) >= 5 and any("'fsdp'" in s for s in sharded), result["fsdp_sharded"]
    assert any("kernel" in s for s in sharded)
    assert len([s for s in result["fsdp_sharded"] if s.startswith("after:")]) == len(sharded)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode,devices", [("mesh", 2), ("pmap", 1)])
def test_two_processes_train_together_and_match_one_process(single, tmp_path, mode, devices):
    """2 processes x ``devices`` CPU devices (jax.distributed over gloo); each feeds its own rows."""
    _, baseline = single
    port = str(_free_port())
    procs = []
    try:
        for i in range(2):
            procs.append(
                _start(
                    tmp_path,
                    "multi",
                    "--mode",
                    mode,
                    "--devices",
                    str(devices),
                    "--process_id",
                    str(i),
                    "--num_processes",
                    "2",
                    "--port",
                    port,
                )
            )
    finally:
        outs = _finish(procs)
    digests = [
        json.loads(line[len("DIGEST ") :]) for out in outs for line in out.splitlines() if line.startswith("DIGEST ")
    ]
    assert [d["process"] for d in digests] == [0, 1], outs
    np.testing.assert_allclose(digests[0]["digest"], digests[1]["digest"], rtol=0, atol=1e-4)
    params = [_load(tmp_path / f"multi_{i}.npz") for i in range(2)]
    assert _max_diff(params[0], params[1]) < TOL
    for p in params:
        assert _max_diff(p, baseline) < TOL


def _preempt_run(tmp_path, signal_at: int, steps: int) -> tuple[list[dict], list[str]]:
    """Both processes of a 2-process ``train_and_evaluate`` on tmp_path/run; process 1 gets SIGTERM."""
    port, procs = str(_free_port()), []
    try:
        for i in range(2):
            args = ("preempt", "--devices", "1", "--process_id", str(i), "--num_processes", "2", "--port", port)
            procs.append(_start(tmp_path, *args, "--signal_at", str(signal_at), steps=steps))
    finally:
        outs = _finish(procs)
    results = [
        json.loads(line[len("RESULT ") :]) for out in outs for line in out.splitlines() if line.startswith("RESULT ")
    ]
    assert [r["process"] for r in results] == [0, 1], outs
    return results, outs


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_with_its_checkpoint(tmp_path):
    """Every process must save the same step (the save is collective): the stop goes through JAX's preemption
    service, so a SIGTERM that only process 1 gets stops both at one agreed step; also when it comes while a
    resumed run is still loading (before its first step)."""
    from flax_textvae import workdir as rundir

    steps = 40
    results, outs = _preempt_run(tmp_path, 10, steps)  # after step 10
    assert all(r.get("preempted") for r in results), results
    stop = results[0]["step"]
    assert results[1]["step"] == stop and 10 <= stop < steps, results
    assert f"SIGTERM: saved the checkpoint of step {stop} in" in outs[0], outs[0][-3000:]
    assert rundir.checkpoint_steps(str(tmp_path / "run")) == [stop]  # checkpoint_every=1000: only the stop's

    results, outs = _preempt_run(tmp_path, 0, steps)  # the rerun resumes from `stop`: SIGTERM while it loads
    assert "Resuming from step" in outs[0], outs[0][-3000:]
    assert all(r.get("preempted") for r in results), results
    again = results[0]["step"]
    assert results[1]["step"] == again and stop < again < steps, results
    assert rundir.checkpoint_steps(str(tmp_path / "run")) == [stop, again]
