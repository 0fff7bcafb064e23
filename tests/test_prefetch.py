"""flax_textvae.prefetch: the batches and checkpoint positions of the plain iterator, batches placed ahead."""

import time

import jax
import numpy as np
import pytest

from flax_textvae import data
from flax_textvae.prefetch import Prefetcher


class _Tokens:
    """37 random examples of lengths 2..12 as a token source (random access plus ``lengths``)."""

    def __init__(self):
        rng = np.random.default_rng(5)
        self.examples = [rng.integers(3, 50, size=int(n)).astype(np.int32) for n in rng.integers(2, 13, size=37)]
        self.lengths = np.array([len(x) for x in self.examples], np.int64)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, key):
        return self.examples[key]

    def __getitems__(self, keys):
        return [self.examples[k] for k in keys]


def _iterator(seed=0):
    """The training iterator of the library over `_Tokens`: 10 batches of 4 per epoch, 3 batch shapes."""
    return data.GrainTrainIterator(
        _Tokens(), seed=seed, batch_size=4, pad_id=0, decoder_start_id=1, max_length=16, num_buckets=3
    )


def _same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def _place(batch):
    return {k: jax.device_put(v) for k, v in batch.items()}


def _wait_until_ahead(prefetcher, plain_state, timeout=10.0):
    """Waits until the worker has drawn past the consumed position (so the positions below mean something)."""
    end = time.time() + timeout
    while prefetcher.iterator.get_state() == plain_state and time.time() < end:
        time.sleep(0.01)
    assert prefetcher.iterator.get_state() != plain_state, "the worker never drew ahead"


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_and_positions_are_those_of_the_plain_iterator(depth):
    plain, wrapped = _iterator(), Prefetcher(_iterator(), _place, depth=depth)
    assert wrapped.get_state() == plain.get_state()
    for k in range(1, 25):  # into the third epoch
        local, placed = next(wrapped)
        want = next(plain)
        _same(local, want)
        _same(placed, want)
        assert all(isinstance(v, jax.Array) for v in placed.values())
        if depth and k in (1, 9, 10, 11, 20):
            _wait_until_ahead(wrapped, plain.get_state())
        assert wrapped.get_state() == plain.get_state(), k
    wrapped.close()
    assert wrapped.iterator.get_state() == plain.get_state(), "close() rewinds to the consumed position"
    _same(next(wrapped.iterator), next(plain))


@pytest.mark.parametrize("depth", [0, 2])
def test_set_state_resumes_exactly(depth):
    plain = _iterator()
    for _ in range(11):
        next(plain)
    saved = plain.get_state()
    expected = [next(plain) for _ in range(12)]
    wrapped = Prefetcher(_iterator(), _place, depth=depth)
    for _ in range(4):  # draw ahead from another position first: set_state must drop those batches
        next(wrapped)
    wrapped.set_state(saved)
    assert wrapped.get_state() == saved
    for k, want in enumerate(expected):
        local, placed = next(wrapped)
        _same(local, want)
        _same(placed, want)
    # a checkpoint taken mid-way by the wrapper resumes the plain iterator exactly
    state = wrapped.get_state()
    fresh = _iterator()
    fresh.set_state(state)
    _same(next(fresh), next(wrapped)[0])
    wrapped.close()


class _Finite:
    """Yields 0..n-1 as {'x': [i]}; state {'i': next index}."""

    def __init__(self, n):
        self.n, self.i = n, 0

    def __next__(self):
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.array([self.i - 1])}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_end_of_a_finite_iterator_and_errors_reach_the_consumer():
    wrapped = Prefetcher(_Finite(3), lambda b: b, depth=2)
    assert [int(next(wrapped)[0]["x"][0]) for _ in range(3)] == [0, 1, 2]
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(wrapped)
    assert wrapped.get_state() == {"i": 3}

    def place(batch):
        if batch["x"][0] == 2:
            raise RuntimeError("no room on the device")
        return batch

    failing = Prefetcher(_Finite(5), place, depth=2)
    assert [int(next(failing)[1]["x"][0]) for _ in range(2)] == [0, 1]
    with pytest.raises(RuntimeError, match="no room"):
        next(failing)
    assert failing.get_state() == {"i": 2}, "the failed batch was never consumed"
    assert failing.iterator.get_state() == {"i": 2}, "the wrapped iterator is rewound to it"
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(_Finite(1), place, depth=-1)
