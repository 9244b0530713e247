"""Test setup: 8 fake CPU devices for the sharding tests. Runs before any JAX backend starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import runpy  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def run_cli(monkeypatch):
  """Runs `python -m MODULE ARGS...` in this process (runpy) and returns its exit code; the absl flags the
  module defines are removed afterwards, so several tests can run the same CLI."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  def run(module: str, *args: str):
    before = set(flags.FLAGS)
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
      runpy.run_module(module, run_name="__main__")
      code = 0
    except SystemExit as e:
      code = e.code or 0
    finally:
      # absl names a __main__ module's flags after argv[0]; absl's own (app.run's) stay.
      mine = {f.name for f in flags.FLAGS.flags_by_module_dict().get(module, [])}
      for name in (set(flags.FLAGS) - before) & mine:
        delattr(flags.FLAGS, name)
    return code

  return run
