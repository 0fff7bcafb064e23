"""Tiny from-scratch BART-architecture VAE on the built-in synthetic corpus: no download, seconds on CPU.

Shared by the tests and smoke runs:
  python run_train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from flax_textvae.configuration import base_config


def get_config():
    c = base_config()
    c.model.name_or_path = "scratch"
    c.model.scratch.d_model = 32
    c.model.scratch.num_heads = 2
    c.model.scratch.ffn_dim = 64
    c.model.scratch.num_layers = 1
    c.model.scratch.dropout = 0.0
    c.vae.latent_size = 8
    c.data.train = "synthetic:512"
    c.data.eval = "synthetic:64:1"
    c.data.max_length = 32
    c.data.num_buckets = 2
    c.batch_size = 16
    c.train_steps = 20
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 2
    c.phase1.steps = 10
    c.loss.kl_schedule.steps = 5
    return c.lock()
