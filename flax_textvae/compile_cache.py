"""Persistent XLA compilation cache: a second start of the same run skips compiling its programs.

JAX can write every compiled executable to a folder, keyed by the program, the jax/jaxlib version, the
backend, the devices and the compiler flags, and load it instead of compiling when the same program is seen
again, in any later process. The CPU, GPU and TPU backends all support it. By default jax writes only
programs that took at least a second to compile; :func:`enable` lowers both thresholds (compile time and
entry size) so that the many small programs of a training run, and of CPU runs, are cached too. On GPUs jax
also keeps XLA's per-fusion autotuning results in the same folder.

Typical use, once per process before the first compile::

    from flax_textvae import compile_cache
    compile_cache.enable(config.compile_cache_dir)   # or enable() for the environment / default folder

Values of ``directory``:

  * ``None`` or ``'auto'``: the environment variable ``FLAX_TEXTVAE_COMPILE_CACHE`` when it is set (with the
    same meanings), else :func:`default_directory` (``$XDG_CACHE_HOME/flax_textvae/jax``, or
    ``~/.cache/flax_textvae/jax``);
  * ``''``, ``'off'``, ``'none'``, ``'false'``, ``'0'``: no persistent cache (also switches off one that was
    enabled earlier in this process);
  * anything else: the folder to use (``~`` is expanded; created when missing).

The cache is only ever a shortcut: an unreadable entry is recompiled (jax warns), never an error.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

ENV_VAR = "FLAX_TEXTVAE_COMPILE_CACHE"
OFF_VALUES = ("", "off", "none", "false", "0")
AUTO_VALUES = ("auto", "default")


def default_directory() -> str:
    """``$XDG_CACHE_HOME/flax_textvae/jax``, or ``~/.cache/flax_textvae/jax`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_textvae", "jax")


def resolve(directory: Optional[str] = None) -> Optional[str]:
    """The absolute cache folder that ``directory`` stands for, or None when the cache is off.

    Args:
      directory: see the module docstring.

    Returns:
      an absolute path, or None for "no persistent cache".
    """
    if directory is None or directory.strip().lower() in AUTO_VALUES:
        directory = os.environ.get(ENV_VAR)
        if directory is None or directory.strip().lower() in AUTO_VALUES:
            return default_directory()
    if directory.strip().lower() in OFF_VALUES:
        return None
    return os.path.abspath(os.path.expanduser(directory.strip()))


def enable(directory: Optional[str] = None, *, min_compile_time_secs: float = 0.0) -> Optional[str]:
    """Points jax's persistent compilation cache at ``directory`` (or switches it off).

    Call it before the first ``jit`` compile of the process; programs compiled earlier are not written.
    Calling it again with another folder moves the cache there; with an off value it stops reading and
    writing entries.

    Args:
      directory: a folder, ``None`` / ``'auto'`` (environment or default), or an off value; see the module
        docstring.
      min_compile_time_secs: programs that compiled faster than this are not written (jax's default is 1 s;
        0 writes every program, which is what makes small CPU programs and short runs benefit).

    Returns:
      the absolute folder in use, or None when the cache is off.
    """
    path = resolve(directory)
    current = jax.config.jax_compilation_cache_dir
    if path is None:
        if current is not None:
            jax.config.update("jax_compilation_cache_dir", None)
            _jax_cache.reset_cache()
        return None
    os.makedirs(path, exist_ok=True)
    if current is not None and os.path.abspath(current) != path:
        _jax_cache.reset_cache()  # jax opens its cache once per process; reopen it at the new folder
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    # -1: no minimum entry size, and jax does not substitute a filesystem-dependent one.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = [0]


def _count_hit(event: str, **kwargs) -> None:
    if event == _HIT_EVENT:
        _hits[0] += 1


jax.monitoring.register_event_listener(_count_hit)


def hits() -> int:
    """How many programs this process has loaded from the persistent cache instead of compiling them."""
    return _hits[0]


def is_enabled() -> bool:
    """True when jax will read and write a persistent cache folder in this process."""
    return bool(jax.config.jax_compilation_cache_dir) and bool(jax.config.jax_enable_compilation_cache)
