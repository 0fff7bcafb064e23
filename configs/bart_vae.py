"""facebook/bart-base finetuned into a VAE (Park & Lee 2021, two phases).

  python run_train.py --config=configs/bart_vae.py --workdir=runs/bart \
      --config.data.train=PATH/train.txt --config.data.eval=PATH/valid.txt
Needs the hub (or --config.model.name_or_path=LOCAL_FOLDER holding config.json, model.safetensors or
flax_model.msgpack, and the tokenizer files). The shared settings are in configuration.finetune_config.
"""

from flax_textvae.configuration import finetune_config


def get_config():
    c = finetune_config("facebook/bart-base")
    c.vae.pooling = "mean"
    c.optimizer.learning_rate = 5e-5
    c.loss.kind = "free_bits"
    c.loss.free_bits = 0.5
    c.loss.kl_schedule.kind = "linear"
    c.loss.kl_schedule.start = 0.0
    c.loss.kl_schedule.steps = 10000
    c.denoise.delete_rate = 0.15
    return c.lock()
