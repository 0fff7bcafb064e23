"""What a new user sees in the first hour: `python run_train.py` never goes quiet for long, and it says what it
computes on (with the install command where a GPU / TPU sits unused).

The heartbeat (``Progress.working``) prints a "still ..." line every few seconds while a compile or an
evaluation runs. The end-to-end test makes three compiles artificially slow (a ``sitecustomize`` module on
``PYTHONPATH`` wraps JAX's compile entry point) and times every console line of a tiny training run.
"""

import ast
import os
import re
import subprocess
import sys
import threading
import time

import jax
import pytest

from flax_textvae import hardware, monitor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SILENCE_S = 10.0
SLOW_S = 12.0  # longer than MAX_SILENCE_S: only the heartbeat can keep such a compile from being silent
MARK = "[slow compile test]"

# Loaded by the training subprocess at start-up. Each XLA module whose name matches the pattern sleeps
# before its first compile (later compiles of the same name run at full speed, to keep the test short).
SITECUSTOMIZE = f'''
import os
import re
import sys
import time

import jax._src.compiler as _compiler
from jax._src.lib.mlir import ir as _ir

_PATTERN = re.compile(os.environ["SLOW_COMPILE_PATTERN"])
_SECONDS = float(os.environ["SLOW_COMPILE_S"])
_SLOWED = set()
_compile = _compiler.compile_or_get_cached


def _slow_compile(backend, computation, *args, **kwargs):
    name = _ir.StringAttr(computation.operation.attributes["sym_name"]).value
    if _PATTERN.fullmatch(name) and name not in _SLOWED:
        _SLOWED.add(name)
        print("{MARK} " + name, file=sys.stderr, flush=True)
        time.sleep(_SECONDS)
    return _compile(backend, computation, *args, **kwargs)


_compiler.compile_or_get_cached = _slow_compile
'''


def _setup_extras() -> tuple[dict, list]:
    """setup.py read from its source: (extras_require as {name: [requirements]}, INSTALL_REQUIRES)."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    env: dict = {}
    for node in tree.body:  # the module-level constants, evaluated in order
        if isinstance(node, ast.Assign):
            code = compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec")
            exec(code, env)
    return {"test": env["TEST_REQUIRES"], **env["ACCELERATORS"]}, env["INSTALL_REQUIRES"]


def test_the_run_names_its_devices_and_an_accelerator_jax_does_not_use(tmp_path):
    assert hardware.device_lines()[0] == f"devices: {jax.device_count()} x cpu (cpu); jax {jax.__version__}"
    extras, install = _setup_extras()
    jax_pin = next(r for r in install if r.startswith("jax=="))
    assert jax_pin == f"jax=={jax.__version__}"
    for key, (what, distributions, names) in hardware.ACCELERATORS.items():
        for name in names:  # the extras the note names pin jax's build of this very jax version
            assert extras[name] == [jax_pin.replace("jax==", f"jax[{name}]==")], (name, extras)
        note = hardware.accelerator_note("cpu", None, [key], {})
        assert note.startswith(f"note: this machine has {what}, but the installed jax has only its CPU build")
        assert f"pip install -e '.[{names[0]}]'" in note
        installed = hardware.accelerator_note("cpu", "", [key], {distributions[0]: "1.2.3"})
        assert f"({distributions[0]} 1.2.3), but it did not start" in installed
    assert "'.[cuda13]' for the other driver" in hardware.accelerator_note("cpu", None, ["nvidia"], {})
    # No note on an accelerator, when the CPU was asked for (JAX_PLATFORMS), or beside no accelerator.
    assert hardware.accelerator_note("gpu", None, ["nvidia"], {}) is None
    assert hardware.accelerator_note("cpu", "cpu", ["nvidia"], {}) is None
    assert hardware.accelerator_note("cpu", None, [], {}) is None

    # What the machine shows: NVIDIA's device nodes; a PCI function of Google's vendor id that is a TPU chip
    # (a v5e here), not Google's network card.
    assert hardware.visible_accelerators(str(tmp_path)) == []
    for name, device in (("0000:00:04.0", "0x0042"), ("0000:00:05.0", "0x0063")):
        folder = tmp_path / "sys" / "bus" / "pci" / "devices" / name
        folder.mkdir(parents=True)
        (folder / "vendor").write_text("0x1ae0\n")
        (folder / "device").write_text(f"{device}\n")
        assert hardware.visible_accelerators(str(tmp_path)) == ([] if device == "0x0042" else ["tpu"])
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").write_text("")
    assert hardware.visible_accelerators(str(tmp_path)) == ["nvidia", "tpu"]


def test_working_prints_a_line_every_interval_until_the_block_ends(capsys):
    progress = monitor.Progress(10, heartbeat_s=0.05)
    with progress.working("compiling the phase-1 step for batch shape [16, 32]"):
        time.sleep(0.4)
    lines = capsys.readouterr().out.splitlines()
    assert 3 <= len(lines) <= 9, lines
    for line in lines:
        assert re.fullmatch(r"  still compiling the phase-1 step for batch shape \[16, 32\]: \d+ s", line), line
    time.sleep(0.2)
    assert capsys.readouterr().out == ""  # the thread stopped with the block


def test_working_stops_when_the_block_raises_and_is_quiet_when_fast(capsys):
    progress = monitor.Progress(10, heartbeat_s=0.05)
    with pytest.raises(RuntimeError, match="boom"):
        with progress.working("evaluating at step 5"):
            time.sleep(0.15)
            raise RuntimeError("boom")
    assert "still evaluating at step 5" in capsys.readouterr().out
    with progress.working("a fast stage"):
        pass
    time.sleep(0.15)
    assert capsys.readouterr().out == ""
    assert monitor.Progress(10).heartbeat_s == monitor.HEARTBEAT_S == 5.0


def test_working_prints_nothing_off_process_0_or_when_disabled(capsys):
    quiet = monitor.Progress(10, heartbeat_s=0.05)
    quiet.main = False  # another host of a multi-host run
    off = monitor.Progress(10, heartbeat_s=0.0)
    for progress in (quiet, off):
        with progress.working("compiling"):
            time.sleep(0.2)
    with monitor.Progress(10, heartbeat_s=1.0).working("compiling", every=0.05):  # a per-call interval
        time.sleep(0.2)
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("  still compiling: ") for line in out)
    assert len(out) <= 5


def test_a_console_that_went_away_ends_the_printing_not_the_run(monkeypatch):
    """`run_train.py ... | tee log` and Ctrl-C: tee dies with the same signal; the run still saves and exits."""

    class ClosedPipe:
        writes = 0

        def write(self, text):
            ClosedPipe.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    progress = monitor.Progress(10)
    progress.say("SIGTERM: saved the checkpoint of step 7 in runs/x; exiting")
    progress.say("the next line")
    assert ClosedPipe.writes == 1  # tried once, then left alone


def _timed_lines(cmd, cwd, env, timeout):
    """Runs ``cmd``; returns (exit code, [(seconds since start, line)], seconds from start to exit)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    lines = []
    try:
        for line in iter(proc.stdout.readline, ""):
            lines.append((time.monotonic() - start, line.rstrip("\n")))
        code = proc.wait()
    finally:
        killer.cancel()
    return code, lines, time.monotonic() - start


@pytest.mark.slow
def test_run_train_is_never_silent_for_more_than_10_s(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # the training step, the evaluation's posterior pass and the greedy decoding for BLEU
        SLOW_COMPILE_PATTERN="jit_train_step|jit_stats|jit_run",
        SLOW_COMPILE_S=str(SLOW_S),
    )
    cmd = [
        sys.executable,
        os.path.join(REPO, "run_train.py"),
        f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
        "--config.train_steps=6",
        "--config.phase1.steps=3",
        "--config.log_every=3",
        "--config.eval_every=0",
        "--config.checkpoint_every=3",
        "--config.data.num_buckets=1",
        "--config.data.eval=synthetic:32:1",
    ]
    code, lines, total = _timed_lines(cmd, tmp_path, env, timeout=400)  # workdir: runs/tiny under tmp_path
    text = "\n".join(f"{t:6.1f}  {line}" for t, line in lines)
    assert code == 0, text
    slowed = {line.split()[-1] for _, line in lines if line.startswith(MARK)}
    assert slowed == {"jit_train_step", "jit_stats", "jit_run"}, text  # the slow compiles did happen
    own = [t for t, line in lines if not line.startswith(MARK)]  # the run's lines, not the test's markers
    stamps = [0.0] + own + [total]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[worst] <= MAX_SILENCE_S, f"{gaps[worst]:.1f} s of silence after line {worst}:\n{text}"
    said = [line for _, line in lines]
    for stage in (
        "compiling the phase-1 step for batch shape [16, 32]",
        "evaluating at step 3",
        "running the final evaluation",
    ):
        assert any(re.fullmatch(rf"  still {re.escape(stage)}: \d+ s", line) for line in said), (stage, text)
    assert any(line.strip().startswith("Reconstructions") for line in said), text
