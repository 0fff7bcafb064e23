"""Prokhorov et al. (2019): set the rate with an explicit constraint, loss = rec + beta * |KL - C|.

C ramps linearly from 0 to `loss.target` nats per example over `loss.target_ramp_steps`, then holds.
Built on the BART setup; override model.name_or_path / data.* as for configs/bart_vae.py.
"""
from flax_textvae.configuration import base_config


def get_config():
    c = base_config()
    c.model.name_or_path = "facebook/bart-base"
    c.vae.latent_size = 32
    c.vae.pooling = "mean"
    c.vae.injection = "memory"
    c.data.train = "tfds:text_vae_corpora/ptb:train"
    c.data.eval = "tfds:text_vae_corpora/ptb:valid"
    c.data.num_buckets = 8
    c.batch_size = 64
    c.train_steps = 30000
    c.log_every = 100
    c.eval_every = 2000
    c.checkpoint_every = 2000
    c.optimizer.learning_rate = 5e-5
    c.optimizer.warmup_steps = 500
    c.phase1.steps = 5000
    c.loss.kind = "constraint"
    c.loss.beta = 1.0
    c.loss.target = 15.0
    c.loss.target_ramp_steps = 5000
    c.denoise.delete_rate = 0.15
    return c.lock()
