"""What importing the package costs: ``import flax_textvae.losses`` in other people's code loads jax and the
loss functions, not the tokenizers, data readers, checkpointing or plotting the CLIs need; the training
CLI does not load plotting or TFDS until a run asks for them."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("transformers", "grain", "tensorflow_datasets", "orbax.checkpoint", "matplotlib", "sacrebleu", "torch")


def _loaded_after(code: str) -> list[str]:
    """The modules of HEAVY that a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["losses", "schedules", "metrics"])
def test_the_pure_modules_import_without_the_heavy_dependencies(module):
    assert _loaded_after(f"import flax_textvae.{module}") == []


def test_the_training_cli_loads_neither_plotting_nor_tfds_up_front():
    loaded = _loaded_after("import flax_textvae.cli, flax_textvae.train")
    assert "matplotlib" not in loaded and "tensorflow_datasets" not in loaded, loaded
    assert "transformers" in loaded  # the tokenizers: this is the probe telling the two cases apart


def test_the_package_names_resolve_on_first_use():
    import flax_textvae
    from flax_textvae import TextVAE, TrainedTextVAE, load
    from flax_textvae.inference import TrainedTextVAE as direct
    from flax_textvae.inference import load as direct_load

    assert TrainedTextVAE is direct and load is direct_load
    assert callable(TextVAE.load) and "flax_textvae.load" in TextVAE.load.__doc__
    assert {"TextVAE", "TrainedTextVAE", "load", "__version__"} <= set(dir(flax_textvae))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flax_textvae.nope  # noqa: B018


def test_textvae_load_is_the_alias_without_the_package_init(tmp_path):
    """``from flax_textvae.vae import TextVAE``: ``TextVAE.load`` is there and gives load's own error."""
    from flax_textvae.vae import TextVAE

    with pytest.raises(FileNotFoundError, match="not a flax_textvae run directory"):
        TextVAE.load(str(tmp_path))
