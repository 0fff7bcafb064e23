"""Host-to-device prefetching of training batches that keeps checkpoint positions exact.

``Prefetcher(iterator, place, depth=2)`` wraps a resumable training iterator (``__next__``, ``get_state()``,
``set_state()``: ``data.TrainIterator``, ``data.GrainTrainIterator``) and a ``place`` function (host batch ->
the arrays the step takes, e.g. ``Trainer.batch``). A background thread draws and places batches ahead (up
to ``depth`` waiting in its queue, plus the one it is placing); ``next(prefetcher)`` returns ``(local,
placed)``, the host batch and its placed copy, in exactly the order of the plain iterator.

What overlaps. JAX dispatches a jitted step asynchronously, so while the device runs step N the loop's
thread is already free to draw batch N+1 and issue its (also asynchronous) host-to-device copy; in steady
state that hides the input work without any help. It stops hiding it whenever the loop's thread waits for
the device (fetching metrics, evaluating, checkpointing): the device then finishes its queue and idles
while the thread draws, collates and copies the next batch. The background thread keeps doing that work
during those waits (blocking device calls release the GIL), so after a sync the next ``depth`` batches are
already on the device.

Positions. ``get_state()`` is the iterator state after the batches *consumed* through ``next``, not after
those drawn ahead, so a checkpoint written with it resumes at the first batch the step has not seen.
``set_state(s)`` drops the batches drawn ahead and restarts from ``s``; ``close()`` stops the thread and
rewinds the wrapped iterator to the consumed position, so code that uses the iterator afterwards (the next
training phase) sees the same batches as without prefetching.

``depth=0`` draws and places each batch on demand in the caller's thread (no thread at all).
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable

__all__ = ["Prefetcher"]

_END = object()  # put by the worker after the wrapped iterator raised StopIteration


class Prefetcher:
    """``depth`` placed batches ahead of the consumer, with exact ``get_state`` / ``set_state``.

    Args:
      iterator: an infinite or finite iterator with ``get_state()`` and ``set_state(state)``.
      place: host batch -> placed batch (called in the background thread when ``depth > 0``).
      depth: how many batches to draw and place ahead (0: none, everything on demand).

    Raises:
      ValueError: a negative ``depth``.
    """

    def __init__(self, iterator: Any, place: Callable[[Any], Any], depth: int = 2):
        if int(depth) < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.iterator, self.place, self.depth = iterator, place, int(depth)
        self._consumed = copy.deepcopy(iterator.get_state())
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Batches the worker drew and the consumer took since the last (re)start; the worker writes only
        # `_drawn`, the consumer only `_taken`, so no lock is needed.
        self._drawn = self._taken = 0

    # ----------------------------------------------------------------------------------- iteration
    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[Any, Any]:
        """``(local, placed)``: the next host batch and ``place(local)``."""
        if self.depth == 0:  # the wrapped iterator itself is at the consumed position: nothing to record
            local = next(self.iterator)
            return local, self.place(local)
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            if self._join():  # rewind past what the worker drew, so a retry starts at the failed batch
                self.iterator.set_state(self._consumed)
            raise item
        local, placed, state = item
        self._consumed, self._taken = state, self._taken + 1
        return local, placed

    @property
    def num_shapes(self) -> Any:
        """The wrapped iterator's ``num_shapes`` (None when it has none)."""
        return getattr(self.iterator, "num_shapes", None)

    # ----------------------------------------------------------------------------------- positions
    def get_state(self) -> Any:
        """The wrapped iterator's state after the batches returned by ``next`` so far."""
        if self.depth == 0:
            return self.iterator.get_state()
        return copy.deepcopy(self._consumed)

    def set_state(self, state: Any) -> None:
        """Drops the batches drawn ahead; the next batch is the one that followed ``state``."""
        self._join()
        self.iterator.set_state(state)
        self._consumed = copy.deepcopy(state)

    def close(self) -> None:
        """Stops the background thread and rewinds the wrapped iterator to the consumed position."""
        if self._join():
            self.iterator.set_state(self._consumed)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- the worker
    def _start(self) -> None:
        self._stop.clear()
        self._drawn = self._taken = 0
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._work, args=(self._queue, self._stop), name="flax_textvae-prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, out: queue.Queue, stop: threading.Event) -> None:
        """Draws, places and queues batches until ``stop`` is set (or the iterator ends / fails)."""
        while not stop.is_set():
            try:
                local = next(self.iterator)
            except StopIteration:
                self._put(out, stop, _END)
                return
            except BaseException as exc:  # handed to the consumer, raised by its next call
                self._put(out, stop, exc)
                return
            self._drawn += 1
            state = copy.deepcopy(self.iterator.get_state())
            try:
                item = (local, self.place(local), state)
            except BaseException as exc:
                self._put(out, stop, exc)
                return
            if not self._put(out, stop, item):
                return

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
        """Queues ``item``, waiting for room; False when ``stop`` was set meanwhile (item dropped)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _join(self) -> int:
        """Stops and joins the worker, dropping what it had queued; returns how many batches it had drawn
        beyond the consumed position."""
        if self._thread is None:
            return 0
        self._stop.set()
        self._thread.join()
        ahead = self._drawn - self._taken
        self._thread, self._queue = None, None
        self._drawn = self._taken = 0
        return ahead
