"""Train a text VAE: `python run_train.py --config=configs/bart_vae.py --workdir=runs/bart`.

With no --config, runs the embedded default (configs/demo.py): a small model trained from scratch on the
package's synthetic corpus, no download needed. Rerunning with the same --workdir resumes, with the same
config up to the loop's cadences, a larger train_steps and the parallel layout (anything else is refused:
use a new --workdir); one training process at a time holds a workdir.
Override any config field with --config.FIELD=VALUE (e.g. --config.batch_size=64); --print_config lists
every field with its meaning. A bad config, a missing data file or model ends with one error message
(exit code 2) before anything is written.
"""

import os
import sys

# Without PyTorch, transformers announces that its own models are unavailable; this CLI uses only its
# tokenizers and configs, so the notice would only mislead.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags, logging
from ml_collections import config_flags

from flax_textvae import cli, configuration, validation
from flax_textvae.train import NonFiniteLossError, train_and_evaluate

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")
# No default here (see cli.with_config): the default file is put on the command line when it names none.
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config() (default: configs/demo.py).", lock_config=True
)
flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, logs and evaluations "
    "(default: runs/<config file name>, e.g. runs/tiny for configs/tiny.py).",
)
flags.DEFINE_bool("print_config", False, "Print the resolved config, each field with its comment, and exit.")
flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep orbax / absl INFO chatter off the progress display
    config = FLAGS.config  # loads the config file (an OSError naming it when it cannot)
    config_file = config_flags.get_config_filename(FLAGS["config"])
    workdir = FLAGS.workdir or cli.default_workdir(config_file)
    if FLAGS.print_config:
        print(f"# --config={config_file}  (workdir: {workdir})\n{configuration.describe(config)}")
        validation.validate(config)
        return 0
    if not FLAGS.workdir:
        print(f"workdir: {workdir} (pass --workdir=DIR to choose another)", flush=True)
    try:
        train_and_evaluate(config, workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    cli.run(main, cli.with_config(sys.argv, DEFAULT_CONFIG))
