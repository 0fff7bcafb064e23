"""What a running job writes and hears besides its state: :class:`MetricsLog` (``WORKDIR/metrics.jsonl`` and
TensorBoard events), :class:`Progress` (the console lines: compiles, training rows with an ETA, heartbeats while
a long stage runs) and :class:`Preemption` (SIGTERM as a flag the loop checks between steps).

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
from tensorboardX import SummaryWriter

from flax_textvae import workdir as rundir

__all__ = ["MetricsLog", "Progress", "Preemption", "HEARTBEAT_S"]

HEARTBEAT_S = 5.0  # seconds between the "still ..." lines of Progress.working


class Preemption:
    """Turns SIGTERM into a flag (``requested``) the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self) -> "Preemption":
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


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

    def say(self, text: str) -> None:
        if self.main:
            with self._print_lock:
                print(text, flush=True)

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
