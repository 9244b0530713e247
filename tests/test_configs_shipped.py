"""Every shipped experiment config builds: its keys are known, its model config is valid, the model
initialises under `jax.eval_shape`, and its optimizer and schedule build."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from n3jax import _optim
from n3jax import _train_config
from n3jax import models
from n3jax import sharding

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs():
  assert {p.stem for p in CONFIG_DIR.glob("*.py")} >= {
      "tiny_cpu", "tiny_sft_cpu", "gpu_1b_moe", "nemotron_3_nano_30b", "nemotron_3_super_120b", "nemotron_h_8b"}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_shipped_config_builds(path):
  config = _train_config.merge_with_defaults(_load(path).get_config())
  assert _load(path).__doc__, f"{path.name} needs a docstring with its run command"
  cfg = _train_config.build_model_config(config)
  assert config.data.seq_len <= cfg.max_position_embeddings
  assert config.batch_size % config.grad_accum_steps == 0
  params = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  assert jax.tree.leaves(params)
  # The config's mesh and layout split every param evenly (8 fake devices stand in for the cluster).
  mesh = sharding.make_mesh({k: v for k, v in config.mesh.to_dict().items() if v != 1} or {"data": -1})
  assert jax.tree.leaves(sharding.param_shardings(cfg, mesh, config.axis_rules))
  assert {x.dtype for x in jax.tree.leaves(params["layers"])} <= {np.dtype(cfg.param_dtype), np.dtype("float32")}
  tx, schedule = _optim.make_optimizer(config.optimizer, config.num_steps)
  assert jax.tree.leaves(jax.eval_shape(tx.init, params))
  lrs = [float(schedule(s)) for s in (0, config.num_steps // 2, config.num_steps - 1)]
  peak = config.optimizer.lr * (1 + 1e-6)  # the schedule is f32
  assert 0 < lrs[0] <= peak and 0 < lrs[2] <= lrs[1] <= peak
  if config.optimizer.schedule == "wsd":
    assert lrs[1] == pytest.approx(config.optimizer.lr, rel=1e-6)
