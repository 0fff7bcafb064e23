"""Prokhorov et al. (2019): does the KL constraint beta * |KL - C| set the rate to C?

  python -m flax_textvae.study --study=configs/studies/prokhorov.py --workdir=runs/study_prokhorov [--smoke]
      [--model=LOCAL_BART_FOLDER]   # a pretrained backbone instead of the tiny from-scratch BART

Base: ``configs/kl_constraint.py`` (the BART setup with ``loss.kind=constraint``, beta = 1, encoder-input
deletion up to 15%, two phases) with the backbone replaced, unless ``--model`` is given, by a tiny
from-scratch BART and its own word-level tokenizer trained on the finetuning file. One cell per target
C in {3, 15, 50, 100} nats per example; in phase 2 C ramps linearly from 0 to its target over the first
400 steps (smoke: 8), then holds. The question each cell answers: how close does the held-out KL land to C?

Data: finetune on PTB ``valid.txt`` (3,370 sentences) and evaluate on PTB ``test.txt``, both from
``../shared/data/ptb/`` next to the repository; without them, ``synthetic:`` corpora (a note says so).
In-training evaluations (and the phase-1 checkpoint choice) use the first sentences of the finetuning file,
never the held-out split.

Sizes. Full: BART d_model 64, 2 layers, 4 heads, feed-forward 128, dropout 0.1, latent 32; batch 32, max 64
tokens in 2 length buckets; 1,000 steps per cell (phase 1: 200), learning rate 2e-3 (warm-up 50, linear
decay per phase), C ramp 400 steps; held-out: the first 1,000 test sentences, iw_samples 10. About 3-6
minutes per cell, under 20 minutes for the 4 cells on a busy 2-core CPU. Smoke (``--smoke``): d_model 32, 1
layer, latent 8, 24 steps, 48 held-out sentences, iw_samples 4: under a minute for the 4 cells once the
compile cache is warm (compiling dominates). With ``--model`` the from-scratch sizes and learning rate are
not applied (the base config's learning rate 5e-5 is), the step counts are.
"""

import pathlib

from flax_textvae.study import Study, text_files_or_synthetic

REPO = pathlib.Path(__file__).resolve().parents[2]
PTB = REPO / ".." / "shared" / "data" / "ptb"
TARGETS = (3.0, 15.0, 50.0, 100.0)


def get_study(smoke: bool) -> Study:
    train, held_out, notes = text_files_or_synthetic(
        PTB / "valid.txt", PTB / "test.txt", ("synthetic:20000", "synthetic:1000:1")
    )
    steps, phase1, ramp = (24, 8, 8) if smoke else (1000, 200, 400)
    overrides = {
        "model.name_or_path": "scratch",
        "data.train": train,
        "data.eval": train,  # cut to monitor_max_examples: in-training evals never see the held-out split
        "data.max_length": 32 if smoke else 64,
        "data.num_buckets": 1 if smoke else 2,
        "batch_size": 16 if smoke else 32,
        "train_steps": steps,
        "phase1.steps": phase1,
        "log_every": 4 if smoke else 25,
        "eval_every": 0,  # in-training evaluations at the end of phase 1 (and of the run) only
        "checkpoint_every": steps if smoke else 200,
        "optimizer.warmup_steps": 2 if smoke else 50,
        "loss.kind": "constraint",
        "loss.beta": 1.0,
        "loss.target_ramp_steps": ramp,
    }
    scratch = {
        "model.scratch.d_model": 32 if smoke else 64,
        "model.scratch.num_layers": 1 if smoke else 2,
        "model.scratch.num_heads": 2 if smoke else 4,
        "model.scratch.ffn_dim": 64 if smoke else 128,
        "model.scratch.dropout": 0.0 if smoke else 0.1,
        "vae.latent_size": 8 if smoke else 32,
        "optimizer.learning_rate": 3e-3 if smoke else 2e-3,
    }
    cells = [(f"C_{c:g}", {"loss.target": c}) for c in TARGETS]
    return Study(
        name="prokhorov" + ("_smoke" if smoke else ""),
        config=str(REPO / "configs" / "kl_constraint.py"),
        overrides=overrides,
        scratch_overrides=scratch,
        eval_data=held_out,
        eval_max_examples=48 if smoke else 1000,
        iw_samples=4 if smoke else 10,
        monitor_max_examples=48 if smoke else 500,
        cells=cells,
        notes=notes,
    )
