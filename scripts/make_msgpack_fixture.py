"""Writes tests/fixtures/tiny_bart_flax/: a tiny BART checkpoint in the transformers 4.x Flax format.

transformers 5 has no Flax models, so the flax_model.msgpack is produced by transformers 4.x itself, in a
separate throwaway virtual environment. The committed fixture was made with this route:

    python3 -m venv /tmp/venv_tf4
    /tmp/venv_tf4/bin/pip install "transformers==4.46.3" "flax==0.8.5" "jax[cpu]==0.4.30" "numpy<2" safetensors
    /work/venv/bin/python scripts/make_msgpack_fixture.py --flax-python /tmp/venv_tf4/bin/python

i.e. transformers 4.46.3 / flax 0.8.5 / jax 0.4.30 (`FlaxBartForConditionalGeneration.from_pretrained(
from_pt=True)` then `save_pretrained`) converted a random tiny BartForConditionalGeneration built in the
project venv (transformers 5.23 + torch 2.13, saved as model.safetensors; transformers 4.46 reads safetensors
through safetensors' flax backend, so the old venv needs no torch).

Stages (the script calls itself):
  1. project venv: build the torch model + word tokenizer (tests/helpers_hf.py) in a temporary folder, draw a
     padded reference batch and store it with the torch logits as .npy files;
  2. old venv (`--stage flax`): convert with transformers 4.x Flax and save config.json + flax_model.msgpack;
     also checks the HF Flax logits against the torch ones;
  3. project venv: copy tokenizer files, drop everything else; the fixture stays under ~200 KB.

`--fallback` skips stage 2 and writes flax_model.msgpack with flax.serialization.msgpack_serialize of
`flax_textvae.models.bart_weights.params_from_torch` (only for when transformers 4.x cannot be installed; that
route does NOT test compatibility with real HF Flax files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "tiny_bart_flax")
ARRAYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


def stage_torch(src: str, out: str) -> None:
    """Tiny torch BART (safetensors) + tokenizer in `src`; reference batch + torch logits into `out`."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import helpers_hf
    import torch

    model = helpers_hf.make_tiny_bart(
        src, seed=123, d_model=16, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32
    )
    rng = np.random.default_rng(123)
    ids, mask = helpers_hf.padded_batch(rng, [6, 3], model.config.vocab_size, model.config.pad_token_id)
    dec, dmask = helpers_hf.padded_batch(rng, [3, 5], model.config.vocab_size, model.config.pad_token_id)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
            decoder_attention_mask=torch.from_numpy(dmask).long(),
        ).logits.numpy()
    os.makedirs(out, exist_ok=True)
    for name, arr in zip(ARRAYS, (ids, mask, dec, dmask)):
        np.save(os.path.join(out, f"{name}.npy"), arr)
    np.save(os.path.join(out, "torch_logits.npy"), logits.astype(np.float32))


def stage_flax(src: str, out: str) -> None:
    """Runs under transformers 4.x: safetensors -> FlaxBartForConditionalGeneration -> flax_model.msgpack."""
    import transformers
    from transformers import FlaxBartForConditionalGeneration

    model = FlaxBartForConditionalGeneration.from_pretrained(src, from_pt=True)
    arrays = {name: np.load(os.path.join(out, f"{name}.npy")) for name in ARRAYS}
    logits = np.asarray(model(**arrays).logits)
    diff = float(np.abs(logits - np.load(os.path.join(out, "torch_logits.npy"))).max())
    print(f"transformers {transformers.__version__}: HF Flax vs torch max |diff| = {diff:.2e}")
    assert diff < 1e-4, diff
    model.save_pretrained(out)
    with open(os.path.join(out, "PRODUCED_BY.json"), "w") as f:
        import flax
        import jax

        json.dump(
            {
                "transformers": transformers.__version__,
                "flax": flax.__version__,
                "jax": jax.__version__,
                "route": "FlaxBartForConditionalGeneration.from_pretrained(from_pt=True).save_pretrained",
            },
            f,
            indent=1,
        )


def stage_fallback(src: str, out: str) -> None:
    """Without transformers 4.x: msgpack of our own torch->flax mapping (HF Flax layout)."""
    import flax
    from flax import serialization
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from flax_textvae.models import bart_weights

    config = AutoConfig.from_pretrained(src)
    params = bart_weights.params_from_torch(load_file(os.path.join(src, "model.safetensors")), config)
    params = {k: v for k, v in params.items()}
    with open(os.path.join(out, "flax_model.msgpack"), "wb") as f:
        f.write(
            serialization.msgpack_serialize(__import__("jax").tree.map(lambda x: np.asarray(x, np.float32), params))
        )
    shutil.copy(os.path.join(src, "config.json"), out)
    with open(os.path.join(out, "PRODUCED_BY.json"), "w") as f:
        json.dump({"flax": flax.__version__, "route": "fallback: msgpack_serialize(bart_weights.params_from_torch)"}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--flax-python", default="/tmp/venv_tf4/bin/python", help="python of a venv with transformers 4.x + flax + jax"
    )
    parser.add_argument("--out", default=FIXTURE)
    parser.add_argument("--fallback", action="store_true", help="skip transformers 4.x (see docstring)")
    parser.add_argument("--stage", choices=["flax"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "flax":
        stage_flax(args.src, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "torch"), os.path.join(tmp, "out")
        stage_torch(src, out)
        if args.fallback:
            stage_fallback(src, out)
        else:
            env = dict(os.environ, JAX_PLATFORMS="cpu", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
            subprocess.run(
                [args.flax_python, os.path.abspath(__file__), "--stage", "flax", "--src", src, "--out", out],
                check=True,
                env=env,
            )
        for name in os.listdir(src):
            if name.startswith("tokenizer") or name == "special_tokens_map.json":
                shutil.copy(os.path.join(src, name), out)
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        shutil.copytree(out, args.out)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out}: {sorted(os.listdir(args.out))} ({total / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
