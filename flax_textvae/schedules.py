"""KL-weight and KL-capacity schedules, ``step -> value``, compatible with optax (docs/method.md).

Every builder returns a pure function of the step (a Python int or a traced integer / float array, of any
shape; it works elementwise) that returns a float32 array of the step's shape. They can be jitted, vmapped
and composed with ``optax.join_schedules`` like any ``optax.Schedule``.

Only jax / optax are imported, so ``import flax_textvae.schedules`` is cheap.
"""

from typing import Any, Callable, Dict, Mapping, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Schedule = Callable[[Union[int, Array]], Array]


def _step(step: Union[int, Array]) -> Array:
    return jnp.asarray(step, jnp.float32)


def constant(value: float) -> Schedule:
    """A schedule that always returns ``value``.

    Args:
      value: the constant value.

    Returns:
      ``step -> value`` (float32, shape of ``step``).
    """

    def schedule(step):
        return jnp.full(jnp.shape(step), value, jnp.float32)

    return schedule


def linear(start: float, end: float, steps: int, begin: int = 0) -> Schedule:
    """Monotonic linear warm-up (Bowman et al. 2016 KL annealing): ``start`` until ``begin``, a straight line
    to ``end`` over ``steps`` steps, then ``end`` for ever.

    Args:
      start: value at and before ``begin``.
      end: value at and after ``begin + steps``.
      steps: length of the ramp (0 jumps from ``start`` to ``end`` at ``begin``).
      begin: first step of the ramp.

    Returns:
      ``step -> value`` (float32, shape of ``step``).

    Raises:
      ValueError: if ``steps`` is negative.
    """
    if steps < 0:
        raise ValueError(f"linear schedule needs steps >= 0, got {steps}")

    def schedule(step):
        t = _step(step) - begin
        if steps == 0:
            frac = jnp.where(t >= 0, 1.0, 0.0)
        else:
            frac = jnp.clip(t / float(steps), 0.0, 1.0)
        return (start + (end - start) * frac).astype(jnp.float32)

    return schedule


def cyclical(
    max_value: float = 1.0,
    period: Optional[float] = None,
    *,
    total_steps: Optional[int] = None,
    num_cycles: Optional[int] = None,
    ratio_increase: float = 0.5,
    ratio_zero: float = 0.0,
    min_value: float = 0.0,
) -> Schedule:
    """Cyclical annealing (Fu et al. 2019).

    Within each cycle of length ``period`` and relative position ``tau = (step mod period) / period``:
    ``min_value`` while ``tau < ratio_zero``; a linear ramp from ``min_value`` to ``max_value`` while
    ``tau < ratio_zero + ratio_increase``; then ``max_value`` until the cycle ends. Give either ``period``
    (cycles for ever) or ``total_steps`` and ``num_cycles`` (``period = total_steps / num_cycles``; after
    ``total_steps`` the value holds at ``max_value``, as in Fu et al.'s released schedule).

    Args:
      max_value: value reached at the end of each ramp.
      period: cycle length in steps (may be fractional).
      total_steps: number of steps covered by the cycles (with ``num_cycles``).
      num_cycles: number of cycles in ``total_steps`` (Fu et al. use 4).
      ratio_increase: fraction of each cycle spent ramping (Fu et al. use 0.5).
      ratio_zero: fraction at the start of each cycle held at ``min_value`` (0 in Fu et al.).
      min_value: value at the start of each cycle.

    Returns:
      ``step -> value`` (float32, shape of ``step``).

    Raises:
      ValueError: for an inconsistent combination of arguments.
    """
    period = _cyclical_period(period, total_steps, num_cycles)
    if not (0.0 < ratio_increase <= 1.0 and 0.0 <= ratio_zero and ratio_zero + ratio_increase <= 1.0):
        raise ValueError(
            f"cyclical schedule needs 0 < ratio_increase, 0 <= ratio_zero and "
            f"ratio_zero + ratio_increase <= 1, got {ratio_increase}, {ratio_zero}"
        )

    def schedule(step):
        t = _step(step)
        tau = jnp.mod(t, period) / period
        frac = jnp.clip((tau - ratio_zero) / ratio_increase, 0.0, 1.0)
        value = min_value + (max_value - min_value) * frac
        if total_steps is not None:
            value = jnp.where(t >= total_steps, max_value, value)
        return value.astype(jnp.float32)

    return schedule


def _cyclical_period(period: Optional[float], total_steps: Optional[int], num_cycles: Optional[int]) -> float:
    """The cycle length of :func:`cyclical`: ``period``, or ``total_steps / num_cycles`` when ``period`` is None.

    Raises:
      ValueError: unless exactly one of ``period`` and (``total_steps``, ``num_cycles``) is given, and positive.
    """
    if period is None:
        if total_steps is None or num_cycles is None:
            raise ValueError("cyclical schedule needs `period`, or `total_steps` and `num_cycles`")
        if total_steps <= 0 or num_cycles <= 0:
            raise ValueError(
                f"cyclical schedule needs total_steps > 0 and num_cycles > 0, got {total_steps}, {num_cycles}"
            )
        period = total_steps / num_cycles
    elif total_steps is not None or num_cycles is not None:
        raise ValueError("cyclical schedule: give `period` or (`total_steps`, `num_cycles`), not both")
    if period <= 0:
        raise ValueError(f"cyclical schedule needs period > 0, got {period}")
    return period


def sigmoid(max_value: float = 1.0, midpoint: float = 0.0, steepness: float = 1.0) -> Schedule:
    """Logistic annealing (Bowman et al. 2016): ``max_value / (1 + exp(-steepness * (step - midpoint)))``.

    Args:
      max_value: the asymptote.
      midpoint: the step at which the value is ``max_value / 2``.
      steepness: slope parameter k (per step); larger is sharper.

    Returns:
      ``step -> value`` (float32, shape of ``step``).
    """

    def schedule(step):
        return (max_value * jax.nn.sigmoid(steepness * (_step(step) - midpoint))).astype(jnp.float32)

    return schedule


def capacity(target: float, ramp_steps: int, begin: int = 0) -> Schedule:
    """The KL constraint's target C (Prokhorov et al. 2019): 0 until ``begin``, then a linear ramp to
    ``target`` over ``ramp_steps`` steps, then ``target``.

    Args:
      target: final C, nats per example.
      ramp_steps: length of the ramp.
      begin: first step of the ramp.

    Returns:
      ``step -> C`` (float32, shape of ``step``).
    """
    return linear(0.0, target, ramp_steps, begin)


_BUILDERS: Dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "linear": linear,
    "cyclical": cyclical,
    "sigmoid": sigmoid,
    "capacity": capacity,
}
_FIELDS = {
    "constant": ("value",),
    "linear": ("start", "end", "steps", "begin"),
    "cyclical": ("max_value", "period", "total_steps", "num_cycles", "ratio_increase", "ratio_zero", "min_value"),
    "sigmoid": ("max_value", "midpoint", "steepness"),
    "capacity": ("target", "ramp_steps", "begin"),
}


def from_config(cfg: Union[Mapping[str, Any], Any]) -> Schedule:
    """Builds a schedule from ``{'kind': KIND, **fields}`` (a dict or an ``ml_collections.ConfigDict``).

    Fields set to None are ignored (so one locked config can carry fields of several kinds).

    Example:
      ``from_config({'kind': 'linear', 'start': 0.0, 'end': 1.0, 'steps': 10_000})``

    Args:
      cfg: mapping with ``kind`` in ``constant | linear | cyclical | sigmoid | capacity`` and that kind's
        keyword arguments.

    Returns:
      ``step -> value``.

    Raises:
      ValueError: for a missing or unknown kind, or a field the kind does not take.
    """
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    fields = {k: v for k, v in dict(cfg).items() if v is not None}
    kind = fields.pop("kind", None)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown schedule kind {kind!r}; valid kinds: {', '.join(_BUILDERS)}")
    unknown = sorted(set(fields) - set(_FIELDS[kind]))
    if unknown:
        raise ValueError(f"schedule kind {kind!r} does not take {unknown}; its fields: {list(_FIELDS[kind])}")
    return _BUILDERS[kind](**fields)
