"""What a run computes on, and an accelerator on the machine that the installed jax does not use.

The plain ``pip install`` of this package brings jax's CPU build: on a GPU box or a TPU VM a run would then
compute on the CPU without a word. Every run names its devices, and where jax computes on the CPU beside an
NVIDIA GPU or a Google TPU it says so and how to install jax's build for it.

* ``describe_devices()``: ``'devices: 4 x TPU v4 (tpu); jax 0.10.2'``.
* ``visible_accelerators(root='/')``: the accelerators the machine shows, from public driver files: NVIDIA's
  device nodes (``/dev/nvidia0``, ``/dev/nvidiactl``), and PCI functions of Google's vendor id whose device id
  is a TPU chip's (``/sys/bus/pci/devices/*/{vendor,device}``; Google's network card shares the vendor id).
* ``accelerator_note(backend, requested, visible, installed)``: the note for a CPU run beside one, or None;
  ``idle_accelerator_note()`` gives it for this process and machine.
* ``device_lines()``: what a training run prints.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
from typing import Mapping, Sequence

import jax

GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of Google's TPU chips (v2/v3, v4, v5p, v5e, v6e, TPU7x); other Google functions are not TPUs.
TPU_PCI_DEVICES = ("0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
NVIDIA_DEVICE_FILES = ("dev/nvidia0", "dev/nvidiactl")
# Per accelerator: what it is, the distributions of jax's build for it, and this package's extras for them.
ACCELERATORS = {
    "nvidia": ("an NVIDIA GPU", ("jax-cuda12-plugin", "jax-cuda13-plugin"), ("cuda12", "cuda13")),
    "tpu": ("a Google TPU", ("libtpu",), ("tpu",)),
}


def describe_devices() -> str:
    """One line naming what the run computes on, e.g. ``devices: 4 x TPU v4 (tpu); jax 0.10.2`` (with
    ``, N processes`` in a multi-host run). Starts jax's backend: call it after any distributed initialisation."""
    devices = jax.devices()
    kinds = " + ".join(sorted({d.device_kind for d in devices}))
    procs = jax.process_count()
    hosts = f", {procs} processes" if procs > 1 else ""
    return f"devices: {len(devices)} x {kinds} ({jax.default_backend()}){hosts}; jax {jax.__version__}"


def visible_accelerators(root: str = "/") -> list[str]:
    """Keys of :data:`ACCELERATORS` whose hardware the machine shows under ``root`` (a test passes a folder)."""
    found = []
    if any(os.path.exists(os.path.join(root, f)) for f in NVIDIA_DEVICE_FILES):
        found.append("nvidia")
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == GOOGLE_PCI_VENDOR and g.read().strip() in TPU_PCI_DEVICES:
                    found.append("tpu")
                    break
        except OSError:
            continue
    return found


def _installed(distributions: Sequence[str]) -> dict[str, str]:
    versions = {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def accelerator_note(
    backend: str, requested: str | None, visible: Sequence[str], installed: Mapping[str, str]
) -> str | None:
    """The note for a run whose jax computes on the CPU beside an accelerator, or None.

    Args:
      backend: ``jax.default_backend()``.
      requested: ``jax.config.jax_platforms`` (``JAX_PLATFORMS``): when set, the platform was chosen.
      visible: keys of :data:`ACCELERATORS` the machine shows (:func:`visible_accelerators`).
      installed: distribution -> version of jax's accelerator builds that are installed.

    Returns:
      None when jax computes on an accelerator, when the platform was chosen, or when the machine shows
      none; else the note: install jax's build for it, or (installed already) it did not start.
    """
    if backend != "cpu" or requested:
        return None
    for key in visible:
        what, distributions, extras = ACCELERATORS[key]
        have = [f"{d} {installed[d]}" for d in distributions if d in installed]
        if have:
            return (
                f"note: this machine has {what} and jax's build for it is installed ({', '.join(have)}), but it "
                "did not start, so the run computes on the CPU: see jax's warning above (driver version, "
                "visible devices)."
            )
        others = ", ".join(f"'.[{extra}]'" for extra in extras[1:])
        commands = f"pip install -e '.[{extras[0]}]'" + (f", or {others} for the other driver" if others else "")
        return (
            f"note: this machine has {what}, but the installed jax has only its CPU build, so the run computes "
            f"on the CPU. Install jax's build for it ({commands}); the first line of a run then names the device."
        )
    return None


def idle_accelerator_note() -> str | None:
    """:func:`accelerator_note` for this process and machine."""
    distributions = [d for _, names, _ in ACCELERATORS.values() for d in names]
    return accelerator_note(
        jax.default_backend(), jax.config.jax_platforms, visible_accelerators(), _installed(distributions)
    )


def device_lines() -> list[str]:
    """What a training run prints about its devices: :func:`describe_devices`, then the
    :func:`idle_accelerator_note` where there is one."""
    note = idle_accelerator_note()
    return [describe_devices()] + ([note] if note else [])
