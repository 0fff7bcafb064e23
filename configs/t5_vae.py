"""t5-small finetuned into a VAE with the Park & Lee (2021) setup.

Latent 32, max pooling, memory injection (one extra key/value slot per decoder self-attention layer),
per-example KL thresholding (free bits), encoder-input token deletion, two phases.

  python run_train.py --config=configs/t5_vae.py --workdir=runs/t5 \
      --config.data.train=PATH/train.txt --config.data.eval=PATH/valid.txt
"""
from flax_textvae.configuration import base_config


def get_config():
    c = base_config()
    c.model.name_or_path = "google-t5/t5-small"
    c.vae.latent_size = 32
    c.vae.pooling = "max"
    c.vae.injection = "memory"
    c.data.train = "tfds:text_vae_corpora/ptb:train"
    c.data.eval = "tfds:text_vae_corpora/ptb:valid"
    c.data.max_length = 64
    c.data.num_buckets = 8
    c.batch_size = 64
    c.train_steps = 30000
    c.log_every = 100
    c.eval_every = 2000
    c.checkpoint_every = 2000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 500
    c.phase1.steps = 5000
    c.loss.kind = "free_bits"
    c.loss.free_bits_mode = "per_example"
    c.loss.free_bits = 0.5
    c.loss.kl_schedule.kind = "constant"
    c.loss.kl_schedule.value = 1.0
    c.denoise.delete_rate = 0.4
    return c.lock()
