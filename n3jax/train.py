"""Trains an n3jax model: `python -m n3jax.train --config=configs/tiny_cpu.py --workdir=/tmp/n3jax`.

Config values can be overridden on the command line, e.g. `--config.optimizer.lr=1e-4
--config.num_steps=50`; an unknown key is an error. Model fields go through `model_overrides`, which starts
empty in most configs, so any `ModelConfig` field may be given: `--config.model_overrides.quant=fp8`
(values are Python literals, else strings; an unknown field is one error). Rerunning with the same workdir
resumes from its newest intact checkpoint.
"""

import ast
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from n3jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard files and configs go.")
flags.mark_flags_as_required(["config", "workdir"])


_MODEL_OVERRIDE = re.compile(r"--config\.model_overrides\.([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
_model_overrides: dict[str, object] = {}


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _take_model_overrides(argv: list[str]) -> list[str]:
  """Takes `--config.model_overrides.FIELD=VALUE` out of `argv`: config_flags (which reads `sys.argv`) can
  only override keys the config file defines, and `model_overrides` may name any ModelConfig field (the
  trainer checks the names)."""
  rest = []
  for arg in argv:
    if m := _MODEL_OVERRIDE.fullmatch(arg):
      _model_overrides[m.group(1)] = _literal(m.group(2))
    else:
      rest.append(arg)
  return rest


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error for an unknown `--config.*` key (not a 3-deep traceback)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    text = str(e)
    if m := re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text):
      key, hint = m.group(2), f"; did you mean {m.group(1)!r}?"
    else:
      key, hint = (re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) or ["?"])[0], ""
    given = [a for a in argv[1:] if a.startswith("--config.") and key in re.split(r"[.=]", a)]
    sys.exit(f"Unknown config key {key!r} in {' '.join(given) or 'the --config overrides'}{hint} "
             "(all keys: n3jax._train_config.default_config())")
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Progress lines are printed; keep library INFO logs (orbax writes several per save) off the terminal.
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _model_overrides:
    with config.unlocked():
      overrides = config.model_overrides.to_dict() if config.get("model_overrides") else {}
      config.model_overrides = {**overrides, **_model_overrides}
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except trainer.InputError as e:  # found before compiling: one line, no traceback
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  sys.argv = _take_model_overrides(sys.argv)
  app.run(main, flags_parser=_parse_flags)
