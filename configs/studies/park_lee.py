"""Park & Lee (2021), Table 2 style: which remedy keeps a finetuned seq2seq VAE from posterior collapse.

  python -m flax_textvae.study --study=configs/studies/park_lee.py --workdir=runs/study_park_lee [--smoke]
      [--model=LOCAL_BART_FOLDER]   # a pretrained backbone instead of the tiny from-scratch BART

Base: ``configs/bart_vae.py`` (latent 32, mean pooling, z as one extra self-attention memory slot per decoder
layer) with the backbone replaced, unless ``--model`` is given, by a tiny from-scratch BART and its own
word-level tokenizer trained on the finetuning file. Cells, each adding one remedy to the one before:

  vanilla          one phase, plain ELBO at KL weight 1 from the first step
  anneal           one phase, KL weight linear 0 -> 1 over its first 250 steps (smoke: 8)
  phase1_anneal    + phase 1 (encoder warm-up: KL weight 0, decoder frozen), then the annealed ELBO
  thresh_0.5       + per-example KL thresholding sum_d max(KL_d, 0.5)
  thresh_3         + thresholding with lambda = 3 (the released recipe's lambda)
  thresh_3_del_0.15  + encoder-input deletion, rate ~ U(0, 0.15) per sentence (the released rate)
  thresh_3_del_0.4   + deletion up to 0.4 (this library's t5_vae.py default)

Every cell trains the same number of steps (phase 1 included). The KL weight ramps to 1 (the ELBO is the
reported quantity), not to the released code's 0.1. With the from-scratch default nothing is pretrained:
phase 1 trains the encoder against a random frozen decoder (and frozen random embeddings), so the grid
measures how each remedy acts on a small model, not the pretrained setting of the paper; pass ``--model``
for that.

Data: finetune on PTB ``valid.txt`` (3,370 sentences) and evaluate on PTB ``test.txt``, both from
``../shared/data/ptb/`` next to the repository; without them, ``synthetic:`` corpora (a note says so).
In-training evaluations (and the phase-1 checkpoint choice) use the first sentences of the finetuning file,
never the held-out split.

Sizes. Full: BART d_model 64, 2 layers, 4 heads, feed-forward 128, dropout 0.1, latent 32; batch 32, max 64
tokens in 2 length buckets; 600 steps per cell (phase 1: 150), learning rate 2e-3 (warm-up 50, linear decay
per phase), KL ramp 250 steps; held-out: the first 1,000 test sentences, iw_samples 10. About 3.5-5 minutes
per cell, under 30 minutes for the 7 cells on a busy 2-core CPU. Smoke (``--smoke``): d_model 32, 1 layer,
latent 8, 24 steps, 48 held-out sentences, iw_samples 4: about 15 s per cell, under 2 minutes for the 7
cells once the compile cache is warm (compiling dominates). With ``--model`` the from-scratch sizes and
learning rate are not applied (the base config's learning rate 5e-5 is), the step counts are.
"""

import pathlib

from flax_textvae.study import Study, text_files_or_synthetic

REPO = pathlib.Path(__file__).resolve().parents[2]
PTB = REPO / ".." / "shared" / "data" / "ptb"


def get_study(smoke: bool) -> Study:
    train, held_out, notes = text_files_or_synthetic(
        PTB / "valid.txt", PTB / "test.txt", ("synthetic:20000", "synthetic:1000:1")
    )
    steps, phase1, ramp = (24, 8, 8) if smoke else (600, 150, 250)
    overrides = {
        "model.name_or_path": "scratch",
        "data.train": train,
        "data.eval": train,  # cut to monitor_max_examples: in-training evals never see the held-out split
        "data.max_length": 32 if smoke else 64,
        "data.num_buckets": 1 if smoke else 2,
        "batch_size": 16 if smoke else 32,
        "train_steps": steps,
        "log_every": 4 if smoke else 25,
        "eval_every": 0,  # in-training evaluations at the end of phase 1 (and of the run) only
        "checkpoint_every": steps if smoke else 200,
        "optimizer.warmup_steps": 2 if smoke else 50,
        "loss.kl_schedule.start": 0.0,
        "loss.kl_schedule.value": 1.0,
        "loss.kl_schedule.steps": ramp,
        "loss.free_bits_mode": "per_example",
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
    elbo = {"loss.kind": "elbo", "loss.free_bits": 0.0, "denoise.delete_rate": 0.0}
    annealed = {**elbo, "loss.kl_schedule.kind": "linear"}
    thresh = lambda lam, p=0.0: {
        **annealed,
        "phase1.steps": phase1,
        "loss.kind": "free_bits",
        "loss.free_bits": lam,
        "denoise.delete_rate": p,
    }
    cells = [
        ("vanilla", {**elbo, "phase1.steps": 0, "loss.kl_schedule.kind": "constant"}),
        ("anneal", {**annealed, "phase1.steps": 0}),
        ("phase1_anneal", {**annealed, "phase1.steps": phase1}),
        ("thresh_0.5", thresh(0.5)),
        ("thresh_3", thresh(3.0)),
        ("thresh_3_del_0.15", thresh(3.0, 0.15)),
        ("thresh_3_del_0.4", thresh(3.0, 0.4)),
    ]
    return Study(
        name="park_lee" + ("_smoke" if smoke else ""),
        config=str(REPO / "configs" / "bart_vae.py"),
        overrides=overrides,
        scratch_overrides=scratch,
        eval_data=held_out,
        eval_max_examples=48 if smoke else 1000,
        iw_samples=4 if smoke else 10,
        monitor_max_examples=48 if smoke else 500,
        cells=cells,
        notes=notes,
    )
