"""Prokhorov et al. (2019): set the rate with an explicit constraint, loss = rec + beta * |KL - C|.

C ramps linearly from 0 to `loss.target` nats per example over `loss.target_ramp_steps`, then holds.
Built on the BART setup; override model.name_or_path / data.* as for configs/bart_vae.py.
"""

from flax_textvae.configuration import finetune_config


def get_config():
    c = finetune_config("facebook/bart-base")
    c.vae.pooling = "mean"
    c.optimizer.learning_rate = 5e-5
    c.loss.kind = "constraint"
    c.loss.beta = 1.0
    c.loss.target = 15.0
    c.loss.target_ramp_steps = 5000
    c.denoise.delete_rate = 0.15
    return c.lock()
