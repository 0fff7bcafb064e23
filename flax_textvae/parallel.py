"""Device mesh, shardings, multi-host start-up and host-to-device batch placement.

Two ways to run the same training step over several devices:

* ``mode='mesh'`` (default): one ``jax.jit`` over a 2-D mesh ``('data', 'fsdp')``. The batch is split
  over both axes; parameters and optimizer state are replicated over ``'data'`` and, when ``fsdp > 1``,
  split over ``'fsdp'`` along their largest divisible axis (ZeRO-3 style; XLA inserts the gathers).
* ``mode='pmap'``: the classic ``jax.pmap`` over local devices with an explicit ``pmean`` of gradients.

``make_placement`` returns the object that compiles the step and moves states, batches and metrics for the
chosen mode (:class:`MeshPlacement`, :class:`PmapPlacement`); the training loop never branches on the mode.

Per-example randomness (latent noise, denoising) is keyed by the example's *global* index, so every mode and
device count draws the same numbers for the same example.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_SHARD_SIZE = 2**14  # arrays with fewer elements stay replicated under fsdp (not worth a gather)


def initialize_distributed(parallel_cfg) -> None:
    """Calls ``jax.distributed.initialize`` when the config (or the environment) asks for several hosts.

    Single-host runs (the default: empty ``coordinator_address``, no cluster env) do nothing. On Cloud TPU
    VMs and SLURM, JAX can discover the cluster itself; set ``JAX_AUTO_DISTRIBUTED=1`` to ask for that.
    """
    if jax.distributed.is_initialized():
        return
    if parallel_cfg.coordinator_address:
        kwargs: dict[str, Any] = {"coordinator_address": parallel_cfg.coordinator_address}
        if parallel_cfg.num_processes > 0:
            kwargs["num_processes"] = parallel_cfg.num_processes
        if parallel_cfg.process_id >= 0:
            kwargs["process_id"] = parallel_cfg.process_id
        # CPU processes need a cross-process collectives implementation (gloo, the default of current JAX).
        # Do not ask jax.default_backend() here: it starts XLA, and initialize() then refuses to run.
        if not jax.config.jax_cpu_collectives_implementation:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        logging.info("jax.distributed.initialize(%s)", kwargs)
        jax.distributed.initialize(**kwargs)
    elif os.environ.get("JAX_AUTO_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh over all devices (of every host), with Auto axis types."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"parallel.fsdp={fsdp} must divide the number of devices ({n})")
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=axis_types, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _param_spec(shape: tuple, fsdp: int) -> P:
    """Shards the largest axis divisible by ``fsdp``; small or indivisible arrays stay replicated."""
    if fsdp <= 1 or not shape or int(np.prod(shape)) < MIN_SHARD_SIZE:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for axis in order:
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for a (possibly abstract) train-state pytree: fsdp-sharded parameters and moments."""
    fsdp = mesh.shape["fsdp"]

    def one(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, _param_spec(tuple(shape), fsdp))

    return jax.tree.map(one, abstract_state)


def global_batch_size_check(batch_size: int, mesh_or_count) -> None:
    n = mesh_or_count if isinstance(mesh_or_count, int) else mesh_or_count.size
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {n} devices; "
            f"use --config.batch_size={max(n, batch_size // n * n)} or a multiple of {n}"
        )


def host_local_rows(global_batch: int) -> tuple[int, int]:
    """(start, stop) rows of each global batch that this process feeds."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return start, start + per


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
    """Host-local numpy rows -> one global jax.Array per key (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_pmap(local_batch: dict, n_local: int) -> dict:
    """Host-local numpy rows -> ``[n_local, B/n_local, ...]`` arrays for ``pmap``."""
    return {k: v.reshape((n_local, v.shape[0] // n_local) + v.shape[1:]) for k, v in local_batch.items()}


def local_devices(num: int = 0) -> list:
    """This process's devices, or its first ``num`` (0: all)."""
    devs = jax.local_devices()
    if num < 0 or num > len(devs):
        raise ValueError(f"parallel.num_devices={num}, but this process has {len(devs)} devices")
    return devs[:num] if num else devs


def global_devices(num: int = 0) -> list:
    """Every process's first ``num`` local devices (0: all devices)."""
    if not num:
        return jax.devices()
    local_devices(num)  # validates
    return [d for p in range(jax.process_count()) for d in [x for x in jax.devices() if x.process_index == p][:num]]


def replicate_for_pmap(tree, devices=None, axis_name: str = "batch"):
    """Copies a pytree onto ``devices`` (default: all local ones) for a ``pmap`` over ``axis_name``.

    The copies carry the sharding the step's own outputs have (a mesh over the same axis name), so the
    step's second call finds the program of its first instead of tracing and compiling it again.
    """
    devices = devices or jax.local_devices()
    n = len(devices)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)
    return jax.pmap(lambda x: x, axis_name=axis_name, devices=devices)(stacked)


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


# ------------------------------------------------------------------------------------------- placements
class MeshPlacement:
    """One ``jit`` over a ``('data', 'fsdp')`` mesh: the default way a step runs on every device.

    Args:
      parallel_cfg: ``config.parallel`` (``num_devices``, ``fsdp``).
      batch_size: the global batch, checked to divide over the mesh.
      abstract_state: ``jax.eval_shape`` of the train state, to derive its shardings.
    """

    def __init__(self, parallel_cfg, batch_size: int, abstract_state):
        self.mesh = make_mesh(parallel_cfg.fsdp, global_devices(parallel_cfg.num_devices))
        global_batch_size_check(batch_size, self.mesh)
        self.batch_sh = batch_sharding(self.mesh)
        self.state_sh = state_shardings(abstract_state, self.mesh)

    def compile(self, step_fn):
        """``step_fn(state, batch) -> (state, metrics)`` jitted with explicit shardings, state donated."""
        return jax.jit(
            step_fn,
            in_shardings=(self.state_sh, self.batch_sh),
            out_shardings=(self.state_sh, replicated(self.mesh)),
            donate_argnums=0,
        )

    def place(self, state):
        return jax.device_put(state, self.state_sh)

    def abstract(self, state):
        """Restore target: shapes, dtypes and this placement's shardings."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, self.state_sh)

    def host(self, state):
        """The state as one logical copy (what is saved)."""
        return state

    def batch(self, local: dict) -> dict:
        return to_global(local, self.batch_sh)

    def metrics(self, metrics: dict) -> dict:
        return metrics


class PmapPlacement:
    """The same step under ``pmap`` over every process's local devices (state replicated per device).

    The mapped axis spans every process's devices, grouped by process (each process feeds its own local
    ones); with only the local devices each process would train alone on its own rows.
    """

    mesh = None
    axis_name = "batch"

    def __init__(self, parallel_cfg, batch_size: int):
        self.devices = local_devices(parallel_cfg.num_devices)
        global_batch_size_check(batch_size, len(self.devices) * jax.process_count())

    def compile(self, step_fn):
        """``step_fn(state, batch, axis_name=...)`` pmapped, state donated."""
        return jax.pmap(
            functools.partial(step_fn, axis_name=self.axis_name),
            axis_name=self.axis_name,
            donate_argnums=0,
            devices=global_devices(len(self.devices)),
        )

    def place(self, state):
        return replicate_for_pmap(state, self.devices, self.axis_name)

    def abstract(self, state):
        """Restore target: host-local and unreplicated (``place`` replicates it afterwards)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    def host(self, state):
        return unreplicate(state)

    def batch(self, local: dict) -> dict:
        return to_pmap(local, len(self.devices))

    def metrics(self, metrics: dict) -> dict:
        return unreplicate(metrics)


PARALLEL_MODES = ("mesh", "pmap")


def make_placement(parallel_cfg, batch_size: int, abstract_state):
    """The placement for ``parallel_cfg.mode``: :class:`MeshPlacement` or :class:`PmapPlacement`."""
    if parallel_cfg.mode == "mesh":
        return MeshPlacement(parallel_cfg, batch_size, abstract_state)
    if parallel_cfg.mode == "pmap":
        return PmapPlacement(parallel_cfg, batch_size)
    raise ValueError(f"parallel.mode={parallel_cfg.mode!r}; choose one of {PARALLEL_MODES}")
