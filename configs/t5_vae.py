"""t5-small finetuned into a VAE with Park & Lee's (2021) method and this library's defaults.

Latent 32, max pooling, memory injection (one extra key/value slot per decoder self-attention layer, the
'hidden' style: z goes through each layer's own W_k / W_v), per-example KL thresholding (free bits 0.5) at
a constant KL weight of 1, encoder-input token deletion up to 40%, two phases, linear learning-rate decay.
The released recipe itself (head-space slot, lambda = 3, deletion 0.15, the released KL-weight ramp,
constant learning rate) is configs/park_lee_t5.py; docs/method.md compares the two.

  python run_train.py --config=configs/t5_vae.py --workdir=runs/t5 \
      --config.data.train=PATH/train.txt --config.data.eval=PATH/valid.txt
"""

from flax_textvae.configuration import finetune_config


def get_config():
    c = finetune_config("google-t5/t5-small")
    c.vae.pooling = "max"
    c.optimizer.learning_rate = 1e-4
    c.loss.kind = "free_bits"
    c.loss.free_bits_mode = "per_example"
    c.loss.free_bits = 0.5
    c.loss.kl_schedule.kind = "constant"
    c.loss.kl_schedule.value = 1.0
    c.denoise.delete_rate = 0.4
    return c.lock()
