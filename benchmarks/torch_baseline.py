"""PyTorch + transformers baseline for the text-VAE training-step throughput benchmark.

The same text VAE as ``flax_textvae`` (docs/method.md), written with PyTorch and a randomly initialised Hugging
Face seq2seq model (no download), so that the JAX implementation can be compared against it:

  encoder -> masked mean pooling -> Linear to (mean, logvar) [B, latent] -> z = mean + exp(logvar/2) * eps
  -> Park & Lee / Optimus "memory" injection -> decoder -> token NLL summed per example + KL -> AdamW step.

Injection: z is projected by one Linear to ``num_decoder_layers * d_model``; slot l ([B, 1, D]) goes through
decoder layer l's own self-attention key and value projections and is prepended as one extra key/value
position. This is done through the transformers cache API: a ``DynamicCache`` pre-filled with the per-layer
[B, H, 1, d_head] keys/values is passed as ``past_key_values`` (gradients flow through it into the latent
projection). The decoder runs WITHOUT cross-attention (``encoder_hidden_states=None``), so z is its only view
of the input; this matches ``decode(memory=None, prefix_states=...)`` of the Flax models. Side effects of the
cache route (negligible for cost): decoder positions start at 1 (BART learned positions; T5 relative bias of
the prefix is that of distance -i instead of the Flax models' 0).

Padding modes: ``--pad=longest`` pads every batch to its longest sentence and sums the NLL over each
example's real tokens; ``--pad=256`` reproduces the released Park & Lee recipe's cost (every sentence padded
to 256 tokens, reconstruction loss averaged over all B*256 positions; attention masks are still applied).

Timed batches: ``benchmarks.lengths.batches_of_lengths(lengths, batch, steps, seed)`` (the same lengths the JAX
benchmark draws), token ids from ``make_batch`` with ``numpy.random.default_rng(seed)``; the ``--warmup``
untimed steps reuse those batches cyclically.

Usage (from the repository root)::

    python benchmarks/torch_baseline.py --arch=t5-small --batch=16 --steps=5 \
        --lengths-from=../shared/data/ptb/test.txt --pad=longest --json

On a GPU add ``--device=cuda --amp=bfloat16`` (bfloat16 autocast; attention is whatever transformers picks
for the model, SDPA where it supports it, reported as ``attn_implementation``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache

try:  # imported as benchmarks.torch_baseline (tests) or run as a script (benchmarks/ is sys.path[0])
    from benchmarks import archs
    from benchmarks import lengths as lengths_lib
except ImportError:  # pragma: no cover - script mode
    import archs
    import lengths as lengths_lib

ARCHS = ("t5-small", "bart-base", "tiny-t5", "tiny-bart")


def build_config(arch: str) -> T5Config | BartConfig:
    """The transformers config of ``arch`` (t5-small / bart-base shapes, or tiny ones for tests)."""
    if arch == "t5-small":
        return archs.hf_config(arch)
    if arch == "tiny-t5":
        return T5Config(
            vocab_size=128,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            feed_forward_proj="relu",
            dropout_rate=0.1,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    common = dict(
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        activation_function="gelu",
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        scale_embedding=False,
        max_position_embeddings=1024,
    )
    if arch == "bart-base":
        return archs.hf_config(arch, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    if arch == "tiny-bart":
        return BartConfig(
            vocab_size=128,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


class TorchTextVAE(nn.Module):
    """Seq2seq text VAE with z injected as one extra self-attention key/value slot per decoder layer.

    Args:
      config: a ``T5Config`` or ``BartConfig``; the seq2seq model is built from it with random weights.
      latent_size: dimension of z.
    """

    def __init__(self, config: T5Config | BartConfig, latent_size: int = 32):
        super().__init__()
        self.config = config
        self.is_t5 = config.model_type == "t5"
        if self.is_t5:
            self.seq2seq = T5ForConditionalGeneration(config)
            self.encoder, self.decoder = self.seq2seq.encoder, self.seq2seq.decoder
            attns = [block.layer[0].SelfAttention for block in self.decoder.block]
            self._kv = [(a.k, a.v, a.n_heads, a.key_value_proj_dim) for a in attns]
        else:
            self.seq2seq = BartForConditionalGeneration(config)
            self.encoder, self.decoder = self.seq2seq.model.encoder, self.seq2seq.model.decoder
            attns = [layer.self_attn for layer in self.decoder.layers]
            self._kv = [(a.k_proj, a.v_proj, a.num_heads, a.head_dim) for a in attns]
        d_model = config.d_model
        self.num_layers = len(self._kv)
        self.to_stats = nn.Linear(d_model, 2 * latent_size)
        self.to_memory = nn.Linear(latent_size, self.num_layers * d_model)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [B, T, D] decoder output -> float32 logits [B, T, V]."""
        if self.is_t5:
            if self.config.tie_word_embeddings:
                hidden = hidden * (self.config.d_model**-0.5)
            return self.seq2seq.lm_head(hidden).float()
        return (self.seq2seq.lm_head(hidden) + self.seq2seq.final_logits_bias).float()

    def forward(
        self, batch: dict[str, torch.Tensor], average_all_positions: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch.

        Args:
          batch: ``input_ids``/``attention_mask``/``decoder_input_ids``/``labels`` int64 [B, S] and
            ``label_weights`` float32 [B, S] (the ``lengths.make_batch`` layout).
          average_all_positions: Park & Lee recipe: reconstruction = mean NLL over all B*S positions
            (padding counted with weight 0 in the numerator); otherwise mean over examples of the summed NLL.

        Returns:
          ``(loss, aux)`` with scalar ``rec`` and ``kl`` (mean over examples of the total KL) in aux.
        """
        mask = batch["attention_mask"]
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state  # [B,S,D]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, D], padding never pooled
        mean, logvar = self.to_stats(pooled).chunk(2, dim=-1)  # [B, Dz] each
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        bsz = z.shape[0]
        slots = self.to_memory(z).view(bsz, self.num_layers, 1, -1)  # [B, L, 1, D]
        prefix = []
        for layer, (k_proj, v_proj, heads, head_dim) in enumerate(self._kv):
            slot = slots[:, layer]  # [B, 1, D]
            k = k_proj(slot).view(bsz, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, hd]
            v = v_proj(slot).view(bsz, 1, heads, head_dim).transpose(1, 2)
            prefix.append((k, v))
        cache = DynamicCache(prefix)
        dec_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # [B, 1 + S]: prefix always visible
        out = self.decoder(
            input_ids=batch["decoder_input_ids"], attention_mask=dec_mask, past_key_values=cache, use_cache=True
        )
        logits = self.logits_from_hidden(out.last_hidden_state)  # [B, S, V]
        nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")  # [B, S]
        nll = nll * batch["label_weights"]
        rec = nll.mean() if average_all_positions else nll.sum(1).mean()
        kl = (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).sum(-1).mean()
        return rec + kl, {"rec": rec.detach(), "kl": kl.detach()}


def to_torch(batch: dict[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
    """numpy batch -> torch tensors on ``device`` (ids int64, weights float32)."""
    out = {}
    for key, value in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        out[key] = (t.long() if value.dtype.kind in "iu" else t.float()).to(device)
    return out


def train_step(
    model: TorchTextVAE,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    average_all_positions: bool,
    amp: str = "none",
) -> float:
    """One AdamW step (zero_grad, forward, backward, step); returns the loss value.

    ``amp='bfloat16'`` runs the forward pass under ``torch.autocast`` in bfloat16 (parameters, optimizer and
    the float32 logits of ``logits_from_hidden`` stay float32).
    """
    optimizer.zero_grad(set_to_none=True)
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp == "bfloat16"):
        loss, _ = model(batch, average_all_positions)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="t5-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--lengths-from", default=None, help="text file, one sentence per line (default: synthetic)")
    p.add_argument("--tokens-per-word", type=float, default=1.0)
    p.add_argument("--pad", default="longest", help="'longest' or a fixed length such as 256")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", default="none", choices=["none", "bfloat16"], help="autocast compute dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1")
    lengths_lib.padded_length(np.array([1]), args.pad)  # validates --pad
    return args


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak CUDA memory allocated on a cuda ``device``, else peak resident set size of this process, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / (1024.0 * 1024.0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints a summary (and a JSON line with --json) and returns the result dict."""
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(args.threads)))
    torch.manual_seed(args.seed)
    config = build_config(args.arch)
    model = TorchTextVAE(config, args.latent).to(args.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    lengths = lengths_lib.load_lengths(args.lengths_from, tokens_per_word=args.tokens_per_word, seed=args.seed)
    # The timed batches are exactly batches_of_lengths(lengths, batch, steps, seed) (what the JAX benchmark
    # draws); the untimed warm-up steps reuse them cyclically.
    plan = lengths_lib.batches_of_lengths(lengths, args.batch, args.steps, args.seed)
    rng = np.random.default_rng(args.seed)
    batches = [
        lengths_lib.make_batch(
            b,
            vocab_size=config.vocab_size,
            pad_id=config.pad_token_id,
            eos_id=config.eos_token_id,
            decoder_start_id=config.decoder_start_token_id,
            rng=rng,
            pad=args.pad,
        )
        for b in plan
    ]
    average_all = args.pad != "longest"

    loss = float("nan")
    for i in range(args.warmup):
        loss = train_step(model, optimizer, to_torch(batches[i % len(batches)], args.device), average_all, args.amp)
    step_seconds, cpu_seconds = [], 0.0
    for batch in batches:
        tb = to_torch(batch, args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = train_step(model, optimizer, tb, average_all, args.amp)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize(args.device)  # the optimizer's kernels belong to this step
        step_seconds.append(time.perf_counter() - start)
        cpu_seconds += time.process_time() - cpu_start

    timed = batches
    seconds = float(sum(step_seconds))
    real = int(sum(b["label_weights"].sum() for b in timed))
    positions = int(sum(b["labels"].size for b in timed))
    result = {
        "framework": "torch",
        "arch": args.arch,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "pad": args.pad,
        "lengths_from": args.lengths_from,
        "seed": args.seed,
        "latent": args.latent,
        "injection": "prefix_kv_via_past_key_values_no_cross_attention",
        "examples_per_s": args.batch * len(timed) / seconds if seconds > 0 else float("nan"),
        "real_tokens_per_s": real / seconds if seconds > 0 else float("nan"),
        # CPU time of the whole process (all its threads): steadier than wall time on a shared machine.
        "real_tokens_per_cpu_s": real / cpu_seconds if cpu_seconds > 0 else float("nan"),
        "padded_tokens_per_s": positions / seconds if seconds > 0 else float("nan"),
        "padding_fraction": 1.0 - real / positions if positions else float("nan"),
        "mean_seq_len": positions / (args.batch * len(timed)) if timed else float("nan"),
        "seconds": seconds,
        "step_seconds": [round(s, 4) for s in step_seconds],
        "final_loss": loss,
        "peak_memory_mb": peak_memory_mb(args.device),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(
        f"[torch {args.arch} pad={args.pad} B={args.batch}] {result['examples_per_s']:.2f} ex/s, "
        f"{result['real_tokens_per_s']:.1f} real tok/s, padding {result['padding_fraction']:.3f}, "
        f"peak RSS {result['peak_memory_mb']:.0f} MB, {seconds:.2f} s for {len(timed)} steps"
    )
    if args.json:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
