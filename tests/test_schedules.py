"""Tests for flax_textvae.schedules: values at key steps, jit, vmap-style array steps, optax composition."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flax_textvae import schedules


def _values(schedule, steps):
    """Evaluates ``schedule`` eagerly, under jit with traced int steps, and on an array of steps."""
    eager = np.array([float(schedule(s)) for s in steps])
    jitted = jax.jit(schedule)
    traced = np.array([float(jitted(jnp.int32(s))) for s in steps])
    batched = np.asarray(jitted(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(batched, eager, rtol=1e-6, atol=1e-7)
    return eager


def test_constant():
    np.testing.assert_allclose(_values(schedules.constant(0.3), [0, 5, 10_000]), 0.3, rtol=1e-6)
    assert schedules.constant(1.0)(jnp.int32(3)).dtype == jnp.float32


def test_linear_warmup_then_hold():
    s = schedules.linear(0.0, 1.0, steps=100, begin=20)
    np.testing.assert_allclose(
        _values(s, [0, 20, 45, 70, 120, 121, 10_000]), [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0], atol=1e-6
    )
    down = schedules.linear(2.0, 0.5, steps=10)
    np.testing.assert_allclose(_values(down, [0, 5, 10, 50]), [2.0, 1.25, 0.5, 0.5], atol=1e-6)
    jump = schedules.linear(0.0, 1.0, steps=0, begin=7)
    np.testing.assert_allclose(_values(jump, [6, 7, 8]), [0.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        schedules.linear(0.0, 1.0, steps=-1)


def test_cyclical_fu_et_al():
    # 4 cycles over 400 steps, ramp for half of each cycle (Fu et al. 2019 defaults).
    s = schedules.cyclical(1.0, total_steps=400, num_cycles=4, ratio_increase=0.5)
    steps = [0, 25, 50, 75, 99, 100, 125, 150, 399, 400, 1000]
    np.testing.assert_allclose(_values(s, steps), [0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0], atol=1e-6)
    # Period form cycles for ever; ratio_zero holds min_value first.
    s = schedules.cyclical(2.0, period=100, ratio_increase=0.25, ratio_zero=0.25, min_value=0.5)
    np.testing.assert_allclose(
        _values(s, [0, 10, 25, 37, 50, 99, 1000, 1050]),
        [0.5, 0.5, 0.5, 0.5 + 1.5 * 12 / 25, 2.0, 2.0, 0.5, 2.0],
        atol=1e-5,
    )
    with pytest.raises(ValueError):
        schedules.cyclical(1.0)
    with pytest.raises(ValueError):
        schedules.cyclical(1.0, period=10, ratio_increase=0.8, ratio_zero=0.3)


def test_sigmoid():
    s = schedules.sigmoid(max_value=2.0, midpoint=1000, steepness=0.01)
    v = _values(s, [0, 1000, 2000, 10_000])
    np.testing.assert_allclose(v, 2.0 / (1.0 + np.exp(-0.01 * (np.array([0, 1000, 2000, 10_000]) - 1000))), rtol=1e-5)
    assert v[1] == pytest.approx(1.0) and v[-1] == pytest.approx(2.0)


def test_capacity_ramp():
    s = schedules.capacity(target=15.0, ramp_steps=300, begin=100)
    np.testing.assert_allclose(_values(s, [0, 100, 250, 400, 5000]), [0.0, 0.0, 7.5, 15.0, 15.0], atol=1e-5)


def test_join_schedules_phase1_zero_then_anneal():
    # Phase 1 (KL weight 0) for 50 steps, then a cyclical anneal restarting its own clock.
    joined = optax.join_schedules(
        [schedules.constant(0.0), schedules.cyclical(1.0, period=20, ratio_increase=0.5)], [50]
    )
    steps = [0, 49, 50, 55, 60, 69, 70, 75]
    expected = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5]
    np.testing.assert_allclose(_values(joined, steps), expected, atol=1e-6)


def test_from_config_dict_and_configdict():
    s = schedules.from_config({"kind": "linear", "start": 0.0, "end": 1.0, "steps": 10})
    assert float(s(5)) == pytest.approx(0.5)
    cfg = ml_collections.ConfigDict(
        {
            "kind": "cyclical",
            "max_value": 1.0,
            "period": None,
            "total_steps": 40,
            "num_cycles": 2,
            "ratio_increase": 0.5,
        }
    )
    s = schedules.from_config(cfg)
    np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10, 20)], [0.0, 0.5, 1.0, 0.0], atol=1e-6)
    assert float(schedules.from_config({"kind": "constant", "value": 0.2})(7)) == pytest.approx(0.2)
    assert float(schedules.from_config({"kind": "capacity", "target": 4.0, "ramp_steps": 4})(1)) == 1.0


def test_from_config_errors():
    with pytest.raises(ValueError, match=r"'exponential'.*constant.*linear.*cyclical.*sigmoid"):
        schedules.from_config({"kind": "exponential"})
    with pytest.raises(ValueError, match="steepnes"):
        schedules.from_config({"kind": "sigmoid", "steepnes": 1.0})
