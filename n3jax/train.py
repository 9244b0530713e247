"""Trains an n3jax model: `python -m n3jax.train --config=configs/tiny_cpu.py --workdir=/tmp/n3jax`.

Config values can be overridden on the command line, e.g. `--config.optimizer.lr=1e-4
--config.num_steps=50`; an unknown key is an error. Rerunning with the same workdir resumes from its
newest intact checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from n3jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard files and configs go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Progress lines are printed; keep library INFO logs (orbax writes several per save) off the terminal.
  logging.set_verbosity(logging.WARNING)
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
