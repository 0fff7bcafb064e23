"""What a running job writes and hears besides its state: :class:`MetricsLog` (``WORKDIR/metrics.jsonl`` and
TensorBoard events), :class:`Progress` (the console lines: compiles, training rows with an ETA, heartbeats while
a long stage runs) and :class:`Preemption` (SIGTERM and Ctrl-C as a stop the loop asks for between steps,
agreed by every process of a multi-host run).

Everything here acts on process 0 only, so multi-host runs write one log and print one console.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from flax_textvae import workdir as rundir

__all__ = ["MetricsLog", "Progress", "Preemption", "note_start_step", "HEARTBEAT_S"]

HEARTBEAT_S = 5.0  # seconds between the "still ..." lines of Progress.working


def _sync_manager():
    """JAX's preemption service of this multi-process run, or None (one process, or the service off)."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # where JAX keeps it (None when jax_enable_preemption_service is off)

    return getattr(getattr(distributed, "global_state", None), "preemption_sync_manager", None)


def note_start_step(step: int) -> None:
    """Tells JAX's preemption service where this run starts (``step``: its newest checkpoint, 0 at first).

    The service agrees on a stop one step past the last step each process reported (0 until a loop reports
    one); a resumed run that got a SIGTERM while loading would otherwise be asked to stop at step 1, which it
    never reaches. Call it as soon as the start step is known; an upper bound of it is fine (the stop then comes
    a little later). Does nothing in a one-process run.
    """
    if _sync_manager() is not None:
        multihost_utils.reached_preemption_sync_point(int(step))


class Preemption:
    """SIGTERM and Ctrl-C as a stop the loop asks for between steps: :meth:`stop_at`.

    One process: SIGTERM, or a first Ctrl-C (SIGINT), sets :attr:`requested`; the loop saves the step it is on
    and exits. A second Ctrl-C raises ``KeyboardInterrupt`` (as soon as Python runs again: not inside a compile)
    and nothing more is saved.

    Several processes (``jax.distributed`` initialised): every process must save the same step, or the save's
    collectives wait for each other for ever. The stop then goes through JAX's preemption service: its handler
    of SIGTERM (installed by ``jax.distributed.initialize``; it notices a signal within about a second) tells
    every process, they agree on the step after the furthest one any has reached, and :meth:`stop_at` is True
    on all of them at that step. SIGTERM is left to that handler, which also holds it outside the loop (a
    SIGTERM during the final evaluation does not end the process); a first Ctrl-C is turned into a SIGTERM of
    this process, so it stops every process the same way. Without the service (``jax_enable_preemption_service``
    off) the flag is per process, as with one process, and a stop that reaches only some processes hangs the
    save. Checkpoints are written synchronously (``checkpoints.Checkpointer``), so orbax's own questions to the
    service name the step being saved, the one the loop has just asked about.
    """

    def __init__(self):
        self.requested = False
        self.reason = "SIGTERM"
        self._interrupts = 0
        self._old: dict = {}
        self._sync = None
        self._main = True

    def __enter__(self) -> "Preemption":
        self._sync = _sync_manager()
        self._main = jax.process_index() == 0  # asked here: the handlers call nothing in JAX
        signals = {signal.SIGINT: self._interrupt}
        if self._sync is None:
            signals[signal.SIGTERM] = self._terminate
        for signum, handler in signals.items():
            try:
                self._old[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def stop_at(self, step: int) -> bool:
        """Whether the loop, which has just finished ``step``, should save it and stop.

        Every process of a multi-process run calls this once per step with the same steps (the service
        tracks where each one is), and gets the same answer.
        """
        if self._sync is not None:
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self.requested

    def _terminate(self, signum, frame):
        self.requested = True

    def _interrupt(self, signum, frame):
        self._interrupts += 1
        if self._interrupts > 1:
            raise KeyboardInterrupt
        self.requested, self.reason = True, "Ctrl-C"
        if self._main:
            when = "at a step every process agrees on" if self._sync is not None else "after this step"
            # os.write, not print: a handler can run while the main thread is inside print.
            _write_stderr(f"\nCtrl-C: saving a checkpoint {when}, then exiting (Ctrl-C again: quit, no save)\n")
        if self._sync is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service, which stops every process

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}


def _write_stderr(text: str) -> None:
    """Writes to stderr's file descriptor; a closed console (``| tee`` ended by the same Ctrl-C) is ignored."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class MetricsLog:
    """``WORKDIR/metrics.jsonl`` (one JSON row per logged step) and TensorBoard events, on process 0."""

    def __init__(self, workdir: str):
        self.main = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if self.main else None

    def _rows(self) -> list[str]:
        """The complete rows on disk, as lines (a line torn by a crash is left out)."""
        if not os.path.isfile(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    if line.endswith("\n") and isinstance(json.loads(line), dict):
                        rows.append(line)
                except ValueError:
                    pass
        return rows

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after ``step`` (a resumed run logs those steps again), atomically.

        ``step < 0`` empties the file (a first start). The file is replaced in one ``os.replace``, so a kill
        during the rewrite leaves the old rows or the new ones.
        """
        if not self.main or not os.path.isfile(self.path):
            return
        rows = [line for line in self._rows() if step >= 0 and json.loads(line).get("step", 0) <= step]
        rundir.write_atomic(self.path, "".join(rows))

    def has_row(self, step: int, split: str) -> bool:
        """Whether a row of ``split`` ('train' when a row has no split) at ``step`` is on disk."""
        for line in self._rows():
            row = json.loads(line)
            if row.get("step") == step and row.get("split", "train") == split:
                return True
        return False

    def write(self, row: dict) -> None:
        """Appends one row (and its numbers to TensorBoard under ``SPLIT/KEY``)."""
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])
            self.tb.flush()


class Progress:
    """The console lines of a run on process 0: compiles, training rows with an ETA, evaluations.

    The ETA comes from a moving average of the training rate of recent logging intervals, with compile time
    taken out of each interval, so the first rows do not promise hours. A long stage (a compile, an
    evaluation) runs inside :meth:`working`, which keeps the console from going quiet while it lasts.

    Args:
      total_steps: the run's ``train_steps`` (for the ETA).
      heartbeat_s: seconds between the lines :meth:`working` prints while its block runs (<= 0: none).
    """

    def __init__(self, total_steps: int, heartbeat_s: float = HEARTBEAT_S):
        self.main = jax.process_index() == 0
        self.total = total_steps
        self.rate = None
        self.heartbeat_s = heartbeat_s
        self._print_lock = threading.Lock()  # the heartbeat thread and the loop print whole lines
        self._console_gone = False

    def say(self, text: str) -> None:
        """Prints ``text`` as one line (process 0). A console that went away (the reader of a ``| tee`` pipe
        ended by the Ctrl-C that also reached this process) ends the printing, not the run: the save the stop
        asked for still happens."""
        if self.main and not self._console_gone:
            with self._print_lock:
                try:
                    print(text, flush=True)
                except BrokenPipeError:
                    self._console_gone = True

    @contextlib.contextmanager
    def working(self, what: str, every: float | None = None):
        """While the block runs, prints ``  still WHAT: N s`` every ``every`` seconds (process 0).

        The lines come from a daemon thread, so they appear while the main thread waits in a compile or an
        evaluation; the thread stops when the block ends, whether it returns or raises.

        Args:
          what: the stage, as a phrase: ``"compiling the phase-1 step for batch shape [32, 48]"``.
          every: seconds between lines (default ``heartbeat_s``; <= 0: none).
        """
        every = self.heartbeat_s if every is None else every
        if not self.main or every <= 0:
            yield
            return
        start, done = time.monotonic(), threading.Event()

        def beat():
            while not done.wait(every):
                self.say(f"  still {what}: {time.monotonic() - start:.0f} s")

        thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def eta(self, step: int, row: dict) -> str:
        """The time left after ``step`` at the moving-average rate, folding in ``row['steps_per_s']``."""
        rate = row.get("steps_per_s", 0.0)
        self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
        left = (self.total - step) / max(self.rate, 1e-9)
        return (
            f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m"
            if left >= 3600
            else f"{int(left // 60)}m{int(left % 60):02d}s"
        )

    def train_row(self, step: int, row: dict) -> None:
        eta = self.eta(step, row)
        kl_ctl = f"C {row['kl_target']:.2f}" if row.get("kl_target") else f"w {row.get('kl_weight', 0):.3f}"
        self.say(
            f"[phase {row['phase']}] step {step}/{self.total}  loss {row['loss']:.3f}  rec {row['rec']:.3f}  "
            f"kl {row['kl']:.3f}  kl_term {row.get('kl_term', 0.0):.3f}  {kl_ctl}  |  "
            f"{row.get('steps_per_s', 0):.2f} steps/s  {row.get('tokens_per_s', 0):.0f} tok/s  ETA {eta}"
        )
