"""Shared pytest setup: offline hub, CPU JAX, and paths to the optional shared data."""

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs and subprocesses of one test session share a persistent compile cache in a fresh folder: the same tiny
# programs are compiled once per session, and nothing is written to the user's cache.
if "FLAX_TEXTVAE_COMPILE_CACHE" not in os.environ:
    import tempfile

    os.environ["FLAX_TEXTVAE_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="flax_textvae_test_cache_")
# The suite is dominated by XLA:CPU compile time of tiny models; skipping backend optimisation passes
# roughly halves it and changes no result the tests check (subprocesses inherit the flag).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; skips the test when the folder is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA
