"""Evaluate a trained run: `python run_eval.py --workdir=runs/bart [--data=SPEC] [--name=NAME] [--iw_samples=K]`.

Prints a table of held-out metrics (nats): rec (reconstruction -log p(x|z)), kl (KL(q(z|x)||p(z))),
neg_elbo (rec + kl), nll (importance-weighted -log p(x) with K = --iw_samples), ppl and ppl_elbo (per-token
perplexities from nll and neg_elbo), mi (mutual information I(x;z) over the whole split), au (active
latent units) and bleu (greedy reconstructions), then writes them to WORKDIR/eval/NAME.json (or
--output_dir=DIR/NAME.json, for a workdir that is read-only). SPEC is a
text file, `tfds:NAME[/CONFIG][:SPLIT]` or `synthetic:N[:SEED]` (default: the run's data.eval).
Other modes: --mode=reconstruct (--input=FILE or --text=...), --mode=sample (--num=N),
--mode=interpolate (--text=A --text=B --steps=N), --mode=plot (training curves + per-dim KL PNGs);
--output=FILE writes the sentences to a text file.
"""

import os
import sys

# Without PyTorch, transformers announces that its own models are unavailable; this CLI uses only its
# tokenizers and configs, so the notice would only mislead.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags, logging

from flax_textvae import cli

flags.DEFINE_string("workdir", None, "The run's workdir (holds config.json and checkpoints).", required=True)
flags.DEFINE_enum("mode", "metrics", ["metrics", "reconstruct", "sample", "interpolate", "plot"], "What to do.")
flags.DEFINE_string("data", None, "Split to evaluate (default: the config's data.eval).")
flags.DEFINE_string("name", None, "Output name: OUTPUT_DIR/NAME.json (default: the split's name).")
flags.DEFINE_string("output_dir", None, "metrics: folder for NAME.json and NAME.meta.json (default: WORKDIR/eval).")
flags.DEFINE_integer("iw_samples", 500, "Importance samples K for the NLL (0 skips nll and ppl).", lower_bound=0)
flags.DEFINE_integer("batch_size", None, "Eval batch size (results do not depend on it).")
flags.DEFINE_integer("seed", None, "Seed for every draw (default: the run's seed).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_string("input", None, "reconstruct: a text file, one sentence per line.")
flags.DEFINE_multi_string("text", [], "reconstruct / interpolate: sentences given on the command line.")
flags.DEFINE_integer("num", 10, "sample: how many sentences.", lower_bound=0)
flags.DEFINE_integer("steps", 5, "interpolate: number of points from A to B (inclusive).")
flags.DEFINE_string("output", None, "Also write the produced sentences (or PNG folder for plot) here.")
flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax / absl INFO chatter off the progress display
    sys.exit(cli.run_eval_main(FLAGS))


if __name__ == "__main__":
    cli.run(main)
