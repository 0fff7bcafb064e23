"""Train a text VAE: `python run_train.py --config=configs/bart_vae.py --workdir=runs/bart`.

With no --config, runs the embedded default (configs/demo.py): a small model trained from scratch on the
package's synthetic corpus, no download needed. Rerunning with the same --workdir resumes.
Override any config field with --config.FIELD=VALUE (e.g. --config.batch_size=64).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "demo.py"),
                                "Path to a config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", "runs/demo", "Directory for checkpoints, logs and evaluations.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax / absl INFO chatter off the progress display
    from flax_textvae.train import NonFiniteLossError, train_and_evaluate

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
