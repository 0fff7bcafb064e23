"""The released Park & Lee (2021) recipe on t5-small, as exactly as this library can state it.

  python run_train.py --config=configs/park_lee_t5.py --workdir=runs/park_lee \
      --config.data.train=PATH/ptb/train.txt --config.data.eval=PATH/ptb/valid.txt

Latent 32, max pooling, the 'head_kv' memory slot (z -> one bias-free key = value vector per decoder layer in
head space, no cross-attention), bias-free posterior heads, per-example KL thresholding lambda = 3 nats per
dimension, encoder-input deletion up to 15%, AdamW lr 1e-4 with weight decay 0.01 and no schedule, batch 128.
Phase 1 (up to 15 epochs of PTB, best validation reconstruction kept) freezes the decoder, its embeddings,
the LM head and the z -> memory projection; phase 2 (10 epochs) trains everything with the KL weight rising
linearly from 0 by 1/100 per epoch (so about 0.1 at the end), the released rate. The epoch counts are for the
42,068-sentence PTB training split (329 steps per epoch at batch 128): scale phase1.steps, train_steps and
loss.kl_schedule.steps to another corpus by its steps per epoch.

Where this differs from the released code on purpose (docs/method.md lists each): padding is never pooled
and never scored, denoising keeps token ids and attention mask apart, latents never mix across the batch,
and NLL / MI are the exact estimators. Our other configs differ more; docs/method.md says where and why.
"""

from flax_textvae.configuration import FREEZE_DECODER_AND_MEMORY, finetune_config

STEPS_PER_EPOCH = 329  # ceil(42068 PTB training sentences / batch 128)


def get_config():
    c = finetune_config("google-t5/t5-small")
    c.vae.latent_size = 32
    c.vae.pooling = "max"
    c.vae.injection = "memory"
    c.vae.memory_style = "head_kv"
    c.vae.posterior_bias = False
    c.data.max_length = 256
    c.batch_size = 128
    c.phase1.steps = 15 * STEPS_PER_EPOCH
    c.phase1.frozen = FREEZE_DECODER_AND_MEMORY
    c.train_steps = c.phase1.steps + 10 * STEPS_PER_EPOCH
    c.eval_every = STEPS_PER_EPOCH
    c.checkpoint_every = STEPS_PER_EPOCH
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 0
    c.optimizer.decay = "constant"
    c.optimizer.grad_clip = 0.0
    c.loss.kind = "free_bits"
    c.loss.free_bits = 3.0
    c.loss.free_bits_mode = "per_example"
    c.loss.kl_schedule.kind = "linear"
    c.loss.kl_schedule.start = 0.0
    c.loss.kl_schedule.value = 1.0
    c.loss.kl_schedule.steps = 100 * STEPS_PER_EPOCH
    c.denoise.delete_rate = 0.15
    return c.lock()
