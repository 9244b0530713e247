"""Test setup: 8 fake CPU devices for the sharding tests, LLVM without optimisation passes, and one
compilation cache for the whole run. Runs before any JAX backend starts (pytest collects tests/ first, so
this applies to every test path).

XLA's CPU compiles dominate the suite (tiny models, compiled many times); `--xla_backend_optimization_level=0`
skips LLVM's optimisation of the generated code: the sharding tests went from 74 s to 51 s on a 2-core CPU
host. It moves results in the last bits (the tiny MoE's loss and gradients by at most 2e-9), which every
test allows: bit-exact tests compare runs made under the same flags.

The cache: many tests compile the same program (the tiny presets' forward, train step and decode step)
through different `jax.jit` wrappers, which jit's in-memory cache does not share; JAX's persistent cache,
keyed by the compiled program, does. It lives in a fresh temporary directory (removed at exit), so a run
never reuses another run's executables; subprocesses the tests start (the train CLI) inherit it. Measured:
tests/test_train.py + tests/test_models.py 397 s -> 343 s on a 2-core CPU host.

Workers: the README's test command runs the suite in parallel processes (pytest-xdist, `-n auto`), one per
core up to `_MAX_WORKERS` (each holds JAX, torch and its compiled programs: 3 to 4 GB resident at its peak,
seen with top). The suite is mostly single-threaded compile work: on 2 cores it took 1069 s against 1692 s in
one process. The workers inherit the controller's environment, so they share one cache directory. JAX writes
an entry without a lock; it takes one only when `jax_compilation_cache_max_size` is set, and then every write
walks the whole cache under it (a 2-worker run with it had done 77% of the tests after 29 minutes). An entry
read while another worker is still writing it is a truncated zstd/zlib stream: it fails to decompress, and
JAX's cache reader turns that into a warning and a miss (it compiles the program).
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="n3jax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import runpy  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

_MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core this process may use, at most `_MAX_WORKERS`."""
  del config
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(cores, _MAX_WORKERS))


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
