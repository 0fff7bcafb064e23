"""flax_textvae: pretrained seq2seq Transformers finetuned into text VAEs, in JAX/Flax."""

import setuptools

JAX_VERSION = "0.10.2"
INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "huggingface_hub>=1.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "grain==0.2.18",
    "tensorboardX==2.6.5",
    "sacrebleu==2.6.0",
    "matplotlib==3.11.2",
]

# jax's accelerator builds (the plain pin above computes on the CPU only): pip install -e '.[cuda12]' on an
# NVIDIA GPU with a CUDA 12 driver, '.[cuda13]' with a CUDA 13 one, '.[tpu]' on a Cloud TPU VM.
ACCELERATORS = {name: [f"jax[{name}]=={JAX_VERSION}"] for name in ("cuda12", "cuda13", "tpu")}

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist==3.8.0",
    "torch==2.13.0",
    "ruff==0.14.0",
]

setuptools.setup(
    name="flax_textvae",
    version="0.1.0",
    description="Finetune pretrained BART / T5 into text variational autoencoders with JAX and Flax.",
    packages=setuptools.find_packages(include=["flax_textvae", "flax_textvae.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, **ACCELERATORS},
)
