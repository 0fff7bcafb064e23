"""facebook/bart-base finetuned into a VAE (Park & Lee 2021, two phases).

  python run_train.py --config=configs/bart_vae.py --workdir=runs/bart \
      --config.data.train=PATH/train.txt --config.data.eval=PATH/valid.txt
Needs the hub (or --config.model.name_or_path=LOCAL_FOLDER holding config.json, model.safetensors or
flax_model.msgpack, and the tokenizer files).
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
    c.data.max_length = 64
    c.data.num_buckets = 8
    c.batch_size = 64
    c.train_steps = 30000
    c.log_every = 100
    c.eval_every = 2000
    c.checkpoint_every = 2000
    c.optimizer.learning_rate = 5e-5
    c.optimizer.warmup_steps = 500
    c.phase1.steps = 5000
    c.loss.kind = "free_bits"
    c.loss.free_bits = 0.5
    c.loss.kl_schedule.kind = "linear"
    c.loss.kl_schedule.start = 0.0
    c.loss.kl_schedule.steps = 10000
    c.denoise.delete_rate = 0.15
    return c.lock()
