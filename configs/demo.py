"""The embedded default: a small from-scratch VAE on the package's synthetic corpus.

Needs no hub and no download; trains for a few minutes on a 2-core CPU, evaluates and prints
reconstructions. `python run_train.py` with no --config runs this file.
"""

from flax_textvae.configuration import base_config


def get_config():
    c = base_config()
    c.model.name_or_path = "scratch"
    c.model.scratch.d_model = 64
    c.model.scratch.num_heads = 4
    c.model.scratch.ffn_dim = 128
    c.model.scratch.num_layers = 2
    c.model.scratch.dropout = 0.0
    c.vae.latent_size = 32
    c.vae.pooling = "max"
    c.vae.injection = "memory,embedding"
    c.data.train = "synthetic:20000"
    c.data.eval = "synthetic:500:1"
    c.data.max_length = 48
    c.batch_size = 32
    c.train_steps = 6000
    c.log_every = 50
    c.eval_every = 2000
    c.checkpoint_every = 1000
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 50
    c.phase1.steps = 500
    c.loss.kind = "free_bits"
    c.loss.free_bits = 1.5
    c.loss.kl_schedule.kind = "linear"
    c.loss.kl_schedule.steps = 1000
    c.denoise.delete_rate = 0.1
    c.denoise.word_dropout = 0.25
    return c.lock()
