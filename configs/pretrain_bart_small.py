"""A small BART pretrained from scratch by text infilling (flax_textvae.pretrain), as a stand-in backbone.

  python -m flax_textvae.pretrain --config=configs/pretrain_bart_small.py --workdir=runs/pretrain_bart_small

d_model 256, 3 + 3 layers, 4 heads, feed-forward 1024, a word-level vocabulary of up to 8,000 words trained
on the TED-talk training sentences in ../shared/data (7,602 lines); held-out loss on the first 1,000 lines of
the TED test set. Spans of Poisson(3) lengths, each one <mask>, until 30% of the tokens are masked. The
model lands in WORKDIR/export (or --export=DIR) in Hugging Face format; finetune it into a VAE with
--config.model.name_or_path=THAT_FOLDER (e.g. configs/bart_vae.py).

The data paths are resolved next to the repository (REPO/../shared/data/ted); where that folder is absent
(a fresh clone) the config falls back to the package's synthetic corpus, which the run's first lines name.
Any text file works: --config.data.train=FILE --config.data.eval=FILE.
"""

import os

from flax_textvae.pretrain import pretrain_config

_TED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "ted"))


def get_config():
    c = pretrain_config()
    c.model.name_or_path = "scratch"
    c.model.scratch.family = "bart"
    c.model.scratch.d_model = 256
    c.model.scratch.num_layers = 3
    c.model.scratch.num_heads = 4
    c.model.scratch.ffn_dim = 1024
    c.model.scratch.dropout = 0.1
    c.model.scratch.vocab_size = 8000
    if os.path.isfile(os.path.join(_TED, "train.txt")) and os.path.isfile(os.path.join(_TED, "test.txt")):
        c.data.train = os.path.join(_TED, "train.txt")
        c.data.eval = os.path.join(_TED, "test.txt")
    else:
        c.data.train, c.data.eval = "synthetic:20000", "synthetic:1000:1"
    c.data.eval_max_examples = 1000
    c.data.max_length = 64
    c.data.num_buckets = 4  # four compiled shapes
    c.pretrain.mask_rate = 0.3
    c.pretrain.poisson_lambda = 3.0
    c.batch_size = 32
    c.train_steps = 3000  # about 14 passes over the TED sentences
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = 300
    c.optimizer.decay = "cosine"
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip = 1.0
    return c.lock()
